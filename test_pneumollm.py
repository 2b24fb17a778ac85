"""Tests: tiny random weights, CPU, fp32, no network. Parity against independent implementations
(transformers, scikit-learn, SPEC and the paper, hand computations) for every borrowed component,
loaders on tiny files in the exact original formats, the model's own invariants, and the pipeline on
real DICOMs and real radiographs (../shared/data, or $PNEUMOLLM_SHARED_DATA). Sections, in pipeline order:
  1. the model (pneumollm.py): its invariants, every ablation, the recipe's model lines (SPEC)
  2. loaders: parity with transformers through every format; loud; nothing in a file runs
  3. prepare.py: real DICOMs and radiographs, framing that cannot know the label, the audit, folders
  4. train.py: the recipe line by line, resumable runs, data-parallel, compiled
  5. eval.py: metrics against scikit-learn, operating point, calibration, intervals, baseline, probe
  6. explain.py: Grad-CAM against its definition; the maps and sheets eval.py writes
  7. command lines: one-line errors with exit 2, help
"""
import argparse
import collections
import copy
import csv as _csv
import ctypes
import importlib.util
import io
import json
import math
import mmap
import multiprocessing.pool
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from scipy import ndimage
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import audit
import bench
import common as C
import cpu_policy as CP
import demo
import pretrain
import eval as ev
import external
import fullsize
import labels as L
import probe as PB
import radiographs as R
import report
import runs
import safeload
import score
import sites
import explain
import formats
import lungcrop
import metrics as M
import plots
import pneumollm as P
import prepare
import train
from folders import Data, Interrupted, UserError, cli, make_folds, write_csv

transformers = pytest.importorskip("transformers")
sklearn_metrics = pytest.importorskip("sklearn.metrics")
torch.set_num_threads(2)
IDLE_CORES = C.idle_cores  # the real measure, for its own test


@pytest.fixture(autouse=True)
def two_idle_cores(monkeypatch):
    """eval.py without --threads measures the idle cores for 0.2 s on every call; the suite runs on the two
    threads it pins (train_args' --threads 2), whatever else the machine is doing."""
    monkeypatch.setattr(C, "idle_cores", lambda window=0.2: 2.0)


@pytest.fixture(autouse=True)
def a_cpu_that_says_nothing(monkeypatch, tmp_path_factory):
    """The CPU dtype policy's prior comes from the CPU's flags and its measurements are cached per machine:
    the suite starts every test from no prior and an empty cache of its own, whatever machine runs it."""
    monkeypatch.setattr(CP, "cpu_flags", lambda: set())
    monkeypatch.setenv("PNEUMOLLM_CACHE", str(tmp_path_factory.mktemp("cache")))



SHARED = next((p for p in [os.environ.get("PNEUMOLLM_SHARED_DATA", ""), os.path.join(os.path.dirname(__file__),
                                                                                     "../shared/data"),
                           "/work/shared/data"] if p and os.path.isdir(p)), None)
needs_data = pytest.mark.skipif(SHARED is None, reason="../shared/data (real DICOMs, NIH set) not found")
DICOM = os.path.join(SHARED or "", "dicom")


# ==================================================================================================
# fixtures and helpers: tiny checkpoints in the original layouts, tiny models, a small demo set


def randomize(module: nn.Module, seed: int):
    """Every weight random (norms and biases too), so parity tests cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name.lower():
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise / (p[0].numel() ** 0.5 if p.dim() > 1 else 10))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny CLIP written three ways: HF folder, OpenAI state dict (.pt), OpenAI TorchScript."""
    d = tmp_path_factory.mktemp("clip")
    vc = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512, patch_size=14,
              image_size=56, hidden_act="quick_gelu", projection_dim=16)
    tc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50,
              max_position_embeddings=8, bos_token_id=0, eos_token_id=1)
    cfg = transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16)
    hf = transformers.CLIPModel(cfg).eval()
    randomize(hf, 0)
    hf.save_pretrained(d / "hf")
    oa = openai_layout(hf.state_dict(), 4)
    oa.update({"token_embedding.weight": torch.zeros(50, 32), "positional_embedding": torch.zeros(8, 32),
               "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(96, 32), "ln_final.weight": torch.ones(32),
               "text_projection": torch.zeros(32, 16), "logit_scale": torch.tensor(4.6)})
    torch.save(oa, d / "openai.pt")
    formats.save_torchscript({k: t.clone() for k, t in oa.items()}, d / "ViT-tiny.pt")  # as OpenAI's ViT-L-14.pt
    return dict(hf=d / "hf", pt=d / "openai.pt", jit=d / "ViT-tiny.pt", ref=hf.vision_model, sd=oa)


def openai_layout(sd: dict, layers: int) -> dict:
    """A transformers CLIPModel's vision weights in OpenAI's layout, written independently of the loader's
    own mapping."""
    sd, oa = {k: v.clone() for k, v in sd.items()}, {}
    pre = "vision_model.encoder.layers"
    for i in range(layers):
        a, b = f"{pre}.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            oa[b + f"attn.in_proj_{kind}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            oa[b + f"attn.out_proj.{kind}"] = sd[a + f"self_attn.out_proj.{kind}"]
            oa[b + f"ln_1.{kind}"] = sd[a + f"layer_norm1.{kind}"]
            oa[b + f"ln_2.{kind}"] = sd[a + f"layer_norm2.{kind}"]
            oa[b + f"mlp.c_fc.{kind}"] = sd[a + f"mlp.fc1.{kind}"]
            oa[b + f"mlp.c_proj.{kind}"] = sd[a + f"mlp.fc2.{kind}"]
    oa["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    oa["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    oa["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        oa[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
        oa[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
    oa["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    return oa


def meta_from_hf_qk(w, heads):
    """HF row (h, j, i) holds Meta row (h, 2i + j): rebuild Meta's interleaved layout index by index."""
    d = w.shape[0] // heads
    idx = [h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)]
    return w[idx]


# Meta's llama/model.py builds each weight with one of fairscale's model-parallel layers; each layer type
# splits its weight along its own dimension (norms and rope.freqs are plain tensors: every shard holds them)
META_LAYERS = {"wq": "ColumnParallelLinear", "wk": "ColumnParallelLinear", "wv": "ColumnParallelLinear",
               "wo": "RowParallelLinear", "w1": "ColumnParallelLinear", "w2": "RowParallelLinear",
               "w3": "ColumnParallelLinear", "output": "ColumnParallelLinear", "tok_embeddings": "ParallelEmbedding"}


SPLIT_DIM = {"ColumnParallelLinear": 0,  # output features split: each shard's weight is (out / p, in)
             "RowParallelLinear": 1,  # input features split: (out, in / p)
             "ParallelEmbedding": 1}  # embedding dimension split: (vocab, dim / p)


def write_llama(d, n_kv_heads):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=n_kv_heads, intermediate_size=192, vocab_size=40,
                                   rms_norm_eps=1e-6, rope_theta=10000.0, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    randomize(hf, 1)
    hf.save_pretrained(d / "hf")
    hf.save_pretrained(d / "hf_sharded", max_shard_size="50KB")
    sd = hf.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.randn(8)}
    names = dict(q_proj="attention.wq", k_proj="attention.wk", v_proj="attention.wv", o_proj="attention.wo")
    for i in range(2):
        a, b = f"model.layers.{i}.", f"layers.{i}."
        for hfn, mn in names.items():
            w = sd[a + f"self_attn.{hfn}.weight"]
            if hfn in ("q_proj", "k_proj"):
                w = meta_from_hf_qk(w, 4 if hfn == "q_proj" else n_kv_heads)
            meta[b + mn + ".weight"] = w
        for hfn, mn in dict(gate_proj="w1", down_proj="w2", up_proj="w3").items():
            meta[b + f"feed_forward.{mn}.weight"] = sd[a + f"mlp.{hfn}.weight"]
        meta[b + "attention_norm.weight"] = sd[a + "input_layernorm.weight"]
        meta[b + "ffn_norm.weight"] = sd[a + "post_attention_layernorm.weight"]
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, multiple_of=32, norm_eps=1e-6,
                  rope_theta=10000.0, vocab_size=40)
    (d / "meta").mkdir()
    (d / "meta/params.json").write_text(json.dumps(params))
    torch.save(meta, d / "meta/consolidated.00.pth")
    (d / "meta2").mkdir()  # two model-parallel shards, split as Meta's fairscale layers split them
    (d / "meta2/params.json").write_text(json.dumps(params))
    for s in range(2):
        shard = {}
        for k, t in meta.items():
            layer = META_LAYERS.get(k.split(".")[-2] if k.endswith(".weight") else k)  # None: replicated
            shard[k] = t.clone() if layer is None else t.chunk(2, SPLIT_DIM[layer])[s].clone()
        torch.save(shard, d / f"meta2/consolidated.0{s}.pth")
    return dict(hf=d / "hf", hf_sharded=d / "hf_sharded", meta=d / "meta", meta2=d / "meta2", ref=hf.model, sd=meta)


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def llama_files(request, tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp(f"llama{request.param}"), request.param)


def load(clip, llama, **kw):
    torch.manual_seed(0)
    return P.from_pretrained(clip, llama, "cpu", **dict(dict(cls_blocks=[1, 2, 3, 4]), **kw)).eval()


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return P.PneumoLLM(P.tiny_args(**kw)).eval()


def perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, P.RepAdapter):
                m.up_weight.copy_(0.1 * torch.randn(m.up_weight.shape, generator=g))
                m.up_bias.copy_(0.1 * torch.randn(m.up_bias.shape, generator=g))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    demo.write_demo(d / "dicom", n_patients=60)
    assert prepare.main(["--images", str(d / "dicom"), "--labels", str(d / "dicom/labels.csv"), "--out",
                         str(d / "data"),
                         "--key-file", str(d / "key"), "--workers", "2"]) == 0
    return d / "data"


@pytest.fixture(scope="module")
def demo_runs(demo_data, tmp_path_factory):
    """Folds 1 and 2 of the demo, one epoch each: finished runs for the tests that only read them."""
    runs = tmp_path_factory.mktemp("runs")
    for f in (1, 2):
        train.main(train_args(demo_data, runs / f"fold{f}", "--epochs", "1", "--fold", str(f)))
    return runs


def train_args(data, out, *extra):  # two threads, as the suite sets them, not the idle cores it would measure
    return ["--data", str(data), "--out", str(out), "--model", "random", "--batch-size", "16", "--threads", "2", *extra]


def last_weights(run) -> dict:  # the trainable weights of a run's resume point
    return torch.load(run / "state.pt", weights_only=True)["model"]


def write_labels(path, rows, header=("image", "label")):
    with open(path, "w", newline="") as f:
        _csv.writer(f).writerows([header, *rows])
    return path


def run_prepare(tmp_path, images, rows, *extra, header=("image", "label")):
    labels = write_labels(tmp_path / "labels.csv", rows, header)
    out = tmp_path / "out"
    rc = prepare.main(["--images", str(images), "--labels", str(labels), "--out", str(out),
                       "--key-file", str(tmp_path / "key"), "--workers", "2", *extra])
    return rc, out


def csv_rows(path) -> list:
    with open(path, newline="") as f:
        return list(_csv.DictReader(f))


def loaded_image(path) -> Image.Image:  # loaded, its file closed
    with Image.open(path) as im:
        im.load()
        return im


def manifest(out):
    return csv_rows(out / "manifest.csv")


def skipped_files(out):  # meta.json names skipped images by pseudonym; the mapping beside the key names their files
    mapping, = out.parent.glob("out-*.mapping.csv")
    sources = {r["image"]: os.path.basename(r["source"]) for r in csv_rows(mapping)}
    return {sources[k]: v for k, v in json.loads((out / "meta.json").read_text())["skipped"].items()}


def pngs(folder, n, value=lambda i: 100 + i):  # distinct films: one film is one row
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((64, 64), value(i), np.uint8)).save(folder / f"im{i}.png")
    return folder


def run_script(*args, cwd=None):
    return subprocess.run([sys.executable, *args], cwd=cwd or Path(__file__).parent, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


VARIANTS = {  # train.py flags
    "published": [], "no-llm": ["--no-llm"], "simplified": ["--engine", "none", "--no-emitter"],
    "no-adapters": ["--engine", "none", "--no-emitter", "--no-vit-adapters", "--no-llm-adapters"],
    "coop": ["--engine", "coop", "--no-emitter"], "cocoop": ["--engine", "cocoop"], "no-emitter": ["--no-emitter"],
    "no-vit-adapters": ["--no-vit-adapters"], "no-llm-adapters": ["--no-llm-adapters"], "k16": ["--n-diag", "16"],
    "cls-blocks": ["--cls-blocks", "2,3"], "conv": ["--encoder", "conv"], "authors": ["--authors-code"],
}


def tiny_variant(flags, seed=0):
    cfg = dict(train.parse(["--model", "random", *flags]), multi_label=False)
    torch.manual_seed(seed)
    return P.PneumoLLM(P.tiny_args(**C.pneumo_fields(cfg))), cfg


CLIP_SHAPES = {"ViT-L-14.pt": P.VisionArgs(), "ViT-B-32.pt": P.VisionArgs(768, 12, 12, 32, 224),
               "ViT-B-16.pt": P.VisionArgs(768, 12, 12, 16, 224), "ViT-L-14-336px.pt": P.VisionArgs(1024, 24, 16, 14,
                                                                                                    336)}


# ==================================================================================================
# 1. the model (pneumollm.py): its invariants, every ablation, the recipe's model lines (SPEC)


def test_adapter_is_identity_at_init_and_perturbing_changes_output():
    model, img = tiny(), torch.randn(2, 3, 224, 224)
    a = model.visual.transformer.resblocks[0].adapter_attn
    x = torch.randn(3, 5, 64)
    assert torch.equal(a(x), x)
    with torch.no_grad():
        before = model(img)
        for blk in [*model.visual.transformer.resblocks, *model.llama.layers]:
            blk.adapter_attn = nn.Identity()
        assert torch.equal(model(img), before)
    model = tiny()
    perturb_adapters(model)
    with torch.no_grad():
        assert (model(img) - before).abs().max() > 1e-3


def test_grouped_up_projection_keeps_groups_apart():
    a = P.RepAdapter(8, 4, 2, 0.0)
    perturb_adapters(a)
    with torch.no_grad():
        a.down.weight.zero_()
        a.down.bias.copy_(torch.tensor([1.0, 0, 0, 0]))  # only hidden unit 0 (group 0) is on
        y = a(torch.zeros(1, 8)) - a.up_bias
    assert torch.count_nonzero(y[0, :4]) == 4 and torch.count_nonzero(y[0, 4:]) == 0


NO = float("-inf")


def eq2(n, t):  # Eq. 2 row by row: every token (CLS or diagnosis) may read the n CLS columns, nothing else
    return torch.tensor([[0.0] * n + [NO] * (t - n)] * t)


def test_emitter_mask_hides_diagnosis_tokens_from_every_row():
    by_hand = torch.tensor([[0, 0, 0, NO, NO],  # CLS 1..3 read CLS 1..3
                            [0, 0, 0, NO, NO],
                            [0, 0, 0, NO, NO],
                            [0, 0, 0, NO, NO],  # diagnosis tokens read the CLS tokens, not themselves
                            [0, 0, 0, NO, NO]])
    assert torch.equal(P.emitter_mask(3, 2), by_hand) and torch.equal(eq2(3, 5), by_hand)
    model = tiny()
    perturb_adapters(model)
    h = torch.randn(2, 10, 64)
    h2 = h.clone()
    h2[:, 6:] = torch.randn(2, 4, 64)
    with torch.no_grad():
        a, b = model.llama(h, eq2(6, 10)), model.llama(h2, eq2(6, 10))
    assert torch.equal(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_engine_tokens_are_convex_combinations_of_cls():
    """Eq. 1: each diagnosis token is sum_i w_i cls_i with w >= 0 and sum w = 1. The n CLS tokens are
    linearly independent in W dimensions, so w is read back from the output alone (least squares),
    without recomputing the engine."""
    torch.manual_seed(0)
    engine = P.MultiTokenEngine(64, 12, 4).double()
    with torch.no_grad():
        engine.fc2.weight.mul_(30)  # sharp weights, far from uniform
    cls = torch.randn(3, 6, 64, dtype=torch.float64)
    diag = engine(cls)
    assert diag.shape == (3, 4, 64)
    w = torch.linalg.lstsq(cls.transpose(1, 2), diag.transpose(1, 2)).solution.transpose(1, 2)  # (B, K, n)
    torch.testing.assert_close(torch.einsum("bkn,bnw->bkw", w, cls), diag)  # in the CLS tokens' span
    assert (w > -1e-9).all() and torch.allclose(w.sum(-1), torch.ones(3, 4, dtype=torch.float64))
    assert w.max() > 0.6


def test_trainable_set_and_gradients():
    model = tiny().train()
    perturb_adapters(model)  # with up = 0 the down-projection's gradient is exactly zero
    adapters = [b.adapter_attn for b in [*model.visual.transformer.resblocks, *model.llama.layers]]
    assert model.own_modules() == adapters + [model.engine, model.proj, model.head]
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    loss = model(torch.randn(2, 3, 224, 224)).logsumexp(-1).sum()
    loss.backward()
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_full_size_model_on_meta_has_the_papers_trainable_count():
    with torch.device("meta"):
        model = P.PneumoLLM(P.PneumoArgs())
    parts = {"llama adapters": sum(p.numel() for b in model.llama.layers for p in b.adapter_attn.parameters()),
             "vit adapters": sum(p.numel() for b in model.visual.transformer.resblocks
                                 for p in b.adapter_attn.parameters()),
             "proj": sum(p.numel() for p in model.proj.parameters()),
             "head": model.head.weight.numel(), "engine": sum(p.numel() for p in model.engine.parameters())}
    assert parts == {"llama adapters": 1_704_192, "vit adapters": 319_680, "proj": 659_584, "head": 8_192,
                     "engine": 12_352}
    assert sum(p.numel() for p in model.trainable_parameters()) == 2_704_000
    assert model.args.cls_blocks == [4, 8, 12, 16, 20,
                                   24] and model.llama.layers[0].feed_forward.w1.weight.shape == (11008, 4096)


def test_safetensors_are_read_from_their_header_as_safetensors_reads_them(tmp_path):
    """safeload.read_safetensors (memory-mapped from the header, no per-tensor reads): every dtype the
    format shares with torch, a scalar, an empty tensor and metadata come out as safetensors' own reader
    gives them; a truncated file, a file that is not one, and an unknown dtype are refused by name."""
    from safetensors import safe_open
    g = torch.Generator().manual_seed(0)
    tensors = {str(d): (torch.randn(3, 5, generator=g) * 100).to(d) for d in
               (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32,
                torch.int16, torch.int8, torch.uint8, torch.bool)}
    tensors.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 4, dtype=torch.float16))
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    got = safeload.read_safetensors(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        want = {k: f.get_tensor(k) for k in f.keys()}
    assert got.keys() == want.keys() == tensors.keys()
    assert all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k])
               for k in want)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(P.CheckpointError, match=r"cut\.safetensors: tensor .* claims bytes .* damaged or truncated"):
        safeload.read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "no.safetensors").write_bytes(b"\x10" + bytes(30))
    with pytest.raises(P.CheckpointError, match=r"no\.safetensors: not a safetensors file"):
        safeload.read_safetensors(tmp_path / "no.safetensors")
    head = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "f8.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + bytes(2))
    with pytest.raises(P.CheckpointError, match=r"f8\.safetensors: tensor 'w' is .*F8_E4M3.*not a dtype this reader"):
        safeload.read_safetensors(tmp_path / "f8.safetensors")
    head = json.dumps({"w": {"dtype": "F16", "shape": [1], "data_offsets": [2]}}).encode()
    (tmp_path / "one.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + bytes(2))
    with pytest.raises(P.CheckpointError, match=r"one\.safetensors: tensor 'w' is .*shape and data offsets"):
        safeload.read_safetensors(tmp_path / "one.safetensors")


def test_save_load_round_trip_and_refusals(tmp_path):
    model, img = tiny(), torch.randn(2, 3, 224, 224)
    perturb_adapters(model)
    C.save_trainable(model, tmp_path / "t.safetensors")
    assert (tmp_path / "t.safetensors").stat().st_size < 2_000_000
    fresh = P.PneumoLLM(P.tiny_args()).eval()
    fresh.load_state_dict({n: t for n, t in model.state_dict().items()})  # same frozen weights
    C.save_trainable(tiny(seed=5), tmp_path / "other.safetensors")
    C.load_trainable(fresh, tmp_path / "other.safetensors")
    assert not torch.equal(fresh(img), model(img))
    C.load_trainable(fresh, tmp_path / "t.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(img), model(img))
    save_file({"head.weight": torch.zeros(2, 64)}, str(tmp_path / "few.safetensors"))
    with pytest.raises(P.CheckpointError, match=r"few\.safetensors: trainable keys do not match"):
        C.load_trainable(fresh, tmp_path / "few.safetensors")
    C.save_trainable(tiny(n_classes=3), tmp_path / "three.safetensors")
    with pytest.raises(P.CheckpointError, match=r"three\.safetensors: head\.weight is \[3, 64\], expected \[2, 64\]"):
        C.load_trainable(fresh, tmp_path / "three.safetensors")


def test_merged_adapters_give_the_same_logits():
    model, img = tiny(), torch.randn(3, 3, 224, 224)
    perturb_adapters(model)
    with torch.no_grad():
        before = model(img)
        model.merge_adapters()
        after = model(img)
    assert not any(isinstance(m, P.RepAdapter) for m in model.modules())
    assert model.llama.layers[0].attention.wq.bias is not None
    assert ((after - before).abs().max() / before.abs().max()) < 1e-5


@pytest.mark.parametrize("name", VARIANTS)
def test_every_ablation_builds_and_trains_a_step(name):
    model, cfg = tiny_variant(VARIANTS[name])
    perturb_adapters(model)  # with up = 0 the down-projection's gradient is exactly zero
    model.train()
    trainable = {id(p) for p in model.trainable_parameters()}
    loss = train.loss_fn(model(torch.randn(4, 3, 224, 224)).float(), torch.tensor([0, 1, 0, 1]), cfg).mean()
    loss.backward()
    for n, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    kinds = {type(m) for m in model.modules()}
    assert (P.RepAdapter in kinds) == (name != "no-adapters")
    assert (model.llama is None) == (name == "no-llm") and (model.engine is None) == (name in ("simplified",
                                                                                               "no-adapters"))
    assert isinstance(model.visual, P.ConvStem if name == "conv" else P.VisionTransformer)
    assert all(p.requires_grad for p in model.visual.parameters()) == (name == "conv")
    if name == "authors":
        assert not any(p.requires_grad for p in model.engine.parameters())
        assert cfg["norm"] == "imagenet" and cfg["select"] == "test"
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(model.own_state_dict()) > trained  # the frozen engine is saved


def test_impossible_ablations_fail_with_a_message(capsys):
    with pytest.raises(ValueError, match=r"CLS blocks \[4, 30\] must lie in 1\.\.24"):
        P.PneumoArgs(cls_blocks=[30, 4])
    with pytest.raises(ValueError, match="needs at least one diagnosis token"):
        P.PneumoArgs(n_diag=0)
    with pytest.raises(ValueError, match="unknown engine 'coopp'"):
        P.PneumoArgs(engine="coopp")
    with pytest.raises(ValueError, match="a question needs the LLM"):
        P.PneumoArgs(question_ids=[1, 2])  # vocab_size unknown
    for flags, msg in [(["--question", "x", "--no-llm"], "cannot go with --no-llm"), (["--n-diag", "0"],
                                                                                      "diagnosis token"),
                       (["--cls-blocks", "4,30"], r"CLS blocks \[4, 30\] must lie in 1\.\.24")]:
        with pytest.raises(UserError, match=msg):
            train.parse(flags)
    with pytest.raises(SystemExit):
        train.parse(["--cls-blocks", "12;24"])
    assert "give 1-based block numbers" in capsys.readouterr().err


def test_contradictory_flags_are_refused_and_no_op_flags_leave_no_trace(demo_data, tmp_path):
    for flags, msg in [(["--authors-code", "--norm", "clip"], r"cannot go with --norm clip"),
                       (["--authors-code", "--select", "val"], r"cannot go with --select val"),
                       (["--authors-code", "--train-engine"], r"cannot go with --train-engine True"),
                       (["--val-frac", "0", "--select", "val"], r"--val-frac 0 leaves empty"),
                       (["--engine", "none", "--n-diag", "8"], r"--n-diag does nothing with --engine none"),
                       (["--engine", "none", "--emitter"], r"--emitter does nothing with --engine none"),
                       (["--no-llm", "--llm-adapters"], r"--llm-adapters does nothing with --no-llm")]:
        with pytest.raises(UserError, match=msg):
            train.parse(flags)
    assert train.parse(["--authors-code", "--norm", "imagenet"])["select"] == "test"  # agreeing is fine
    assert train.parse(["--val-frac", "0"])["select"] == "last"
    one, other = train.parse(["--engine", "none"]), train.parse(["--engine", "none", "--no-emitter"])
    assert one == other and not one["emitter"]  # one model, one config
    with pytest.raises(UserError, match=r"CLS blocks \[8\] must lie in 1\.\.4 .*check the ablation flags"):
        train.main(train_args(demo_data, tmp_path / "run", "--cls-blocks", "8"))  # the tiny ViT has 4 blocks
    assert not (tmp_path / "run").exists()
    cfg = train.parse(["--authors-code"])  # the run's facts as it ran: no validation split held out
    assert (cfg["select"], cfg["val_frac"]) == ("test", 0)
    with pytest.raises(UserError, match="--select test .* holds out no validation split: drop --val-frac"):
        train.parse(["--select", "test", "--val-frac", "0.2"])


def tokens_into_llama(model, img):
    seen = {}
    model.llama.register_forward_pre_hook(lambda m, args: seen.update(h=args[0], mask=args[1]))
    with torch.no_grad():
        model(img)
    return seen["h"], seen["mask"]


@pytest.mark.parametrize("name, t, masked", [("published", 8, True), ("no-emitter", 8, False), ("simplified", 4, False),
                                             ("k16", 20, True), ("cls-blocks", 6, True), ("conv", 68, True)])
def test_tokens_and_mask_that_reach_the_llm(name, t, masked):
    model, _ = tiny_variant(VARIANTS[name])
    h, mask = tokens_into_llama(model.eval(), torch.randn(2, 3, 224, 224))
    n = {"simplified": 4, "cls-blocks": 2, "conv": 64}.get(name, 4)  # source tokens: CLS (or patch) tokens
    assert h.shape == (2, t, 64)
    assert torch.equal(mask, eq2(n, t)) if masked else mask is None


def test_coop_tokens_are_shared_and_cocoop_tokens_follow_the_image():
    coop, cocoop, cls = P.LearnedTokens(64, 4, False), P.LearnedTokens(64, 4, True), torch.randn(3, 5, 64)
    t = coop(cls)
    assert t.shape == (3, 4, 64) and all(torch.equal(t[i], coop.ctx) for i in range(3))
    t = cocoop(cls)
    torch.testing.assert_close(t, cocoop.ctx + cocoop.meta_net(cls[:, -1])[:, None])
    assert not torch.allclose(t[0], t[1])
    assert [n for n, _ in cocoop.named_parameters()] == ["ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                                         "meta_net.linear2.weight", "meta_net.linear2.bias"]


def test_cls_blocks_are_those_blocks_and_later_blocks_are_skipped():
    img = torch.randn(2, 3, 224, 224)
    full, part = tiny(), tiny(cls_blocks=[3, 2])
    with torch.no_grad():
        every, some = full.visual(img), part.visual(img)
        assert torch.equal(some, every[:, [1, 2]])
        part.visual.transformer.resblocks[3].mlp.c_fc.weight.fill_(float("nan"))  # block 4 is never run
        assert torch.equal(part.visual(img), some)


def hand_count(flags: str) -> int:
    """A README row's trainable parameters from SPEC's shapes alone, counted by hand: CLIP width W with its
    blocks, LLaMA dim 4096 in 32 blocks, 2 classes. An adapter on width C: A (C -> 8, bias) and the grouped
    D (weight C x 4, bias C); the engine: Linear(W, 12) and Linear(12, K); CoOp: K x W tokens; CoCoOp: those
    and meta_net W -> W/16 -> W; the projection W -> 128 -> 4096; the head 4096 x 2, no bias."""
    f = flags.split()
    w, blocks = (768, 12) if "ViT-B" in flags else (1024, 24)
    k = int(f[f.index("--n-diag") + 1]) if "--n-diag" in f else 4
    adapter = lambda c: c * 8 + 8 + c * 4 + c  # noqa: E731
    cls = [int(b) for b in f[f.index("--cls-blocks") + 1].split(",")] if "--cls-blocks" in f else [blocks]
    vit = 0 if "--no-vit-adapters" in f or "--encoder" in f else max(cls) * adapter(w)  # blocks past the last unused
    llm = 0 if "--no-llm-adapters" in f or "--no-llm" in f else 32 * adapter(4096)
    engine = {"none": 0, "coop": k * w, "cocoop": k * w + w * (w // 16) + w // 16 + (w // 16) * w + w}.get(
        f[f.index("--engine") + 1] if "--engine" in f else "multi", w * 12 + 12 + 12 * k + k)
    engine = 0 if "--authors-code" in f else engine  # frozen at random init in their code
    stem = 3 * 14 * 14 * w + w if "--encoder" in f else 0
    return vit + llm + engine + stem + (w * 128 + 128 + 128 * 4096 + 4096) + 4096 * 2


def test_readme_ablation_table_counts_are_hand_counts_and_the_models():
    text = (Path(__file__).parent / "README.md").read_text().split("## Ablations")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([^`]*)` \|.*\| ([\d,]+) \|[^|]*\|$", text, re.M)
    assert len(rows) >= 18
    for flags, count in rows:
        assert f"{hand_count(flags):,}" == count, flags  # the README against SPEC's shapes
        cfg = train.parse(shlex.split(flags.replace("(defaults)", "")))
        kw = dict(C.pneumo_fields(cfg), question_ids=[1, 2, 3] if cfg["question"] else [])
        with torch.device("meta"):
            model = P.PneumoLLM(P.PneumoArgs(CLIP_SHAPES[Path(cfg["clip"]).name], P.LlamaArgs(vocab_size=32000), **kw))
        assert f"{sum(p.numel() for p in model.trainable_parameters()):,}" == count, flags  # the code against both


def test_adapter_dropout_is_p_0_1_in_training_and_off_in_eval():
    model = tiny()
    adapters = [m for m in model.modules() if isinstance(m, P.RepAdapter)]
    a = adapters[0]
    with torch.no_grad():
        a.down.bias.fill_(1.0)  # every hidden unit on, so that a zero is a dropped unit
        a.up_weight.fill_(0.1)
    dropped = []
    a.dropout.register_forward_hook(lambda m, i, out: dropped.append((out == 0).float().mean().item()))
    x = torch.randn(4000, 64) * 1e-3
    model.train()
    train_out = [a(x), a(x)]
    assert abs(dropped[0] - 0.1) < 0.005 and abs(dropped[1] - 0.1) < 0.005  # 32,000 units: sd 0.0017
    assert not torch.equal(*train_out)  # new masks every call
    model.eval()
    out = a(x)
    h = x @ a.down.weight.T + a.down.bias  # by hand, no dropout: each group of 4 hidden units feeds 32 channels
    y = torch.cat([h[:, :4] @ a.up_weight[:32].T, h[:, 4:] @ a.up_weight[32:].T], 1) + a.up_bias
    torch.testing.assert_close(out, x + y)
    assert dropped[-1] == 0.0 and all(m.dropout.p == 0.1 for m in adapters)
    built = P.PneumoLLM(P.tiny_args(**C.pneumo_fields(train.parse(["--model", "random"]))))  # train.py's default too
    assert {m.dropout.p for m in built.modules() if isinstance(m, P.RepAdapter)} == {0.1}


def test_head_means_all_tokens_then_a_bias_free_linear_layer():
    model = tiny()
    perturb_adapters(model)
    seen = {}
    model.llama.register_forward_hook(lambda m, i, out: seen.update(h=out))
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 224, 224))
    h = seen["h"]
    assert h.shape == (3, 4 + 4, 64)  # T = n + K: 4 CLS tokens (tiny ViT) and 4 diagnosis tokens
    assert model.head.bias is None
    torch.testing.assert_close(logits, (h.sum(1) / 8) @ model.head.weight.T)


def xavier_bound(w):  # nn.init.xavier_uniform_: U(-b, b) with b = sqrt(6 / (fan_in + fan_out))
    return (6 / (w.shape[0] + w.shape[1])) ** 0.5


def default_bound(w):  # nn.Linear's default init: U(-b, b) with b = 1 / sqrt(fan_in), weight and bias alike
    return w.shape[1] ** -0.5


def uniform_with_bound(t, b):  # all inside, and the largest close to the bound (n draws: max ~ b (1 - 1/n))
    return t.abs().max() <= b and t.abs().max() > 0.9 * b and abs(t.std() - b / 3 ** 0.5) < 0.15 * b


def check_init(model):
    adapters = [m for m in model.modules() if isinstance(m, P.RepAdapter)]
    assert len(adapters) == 4 + 2
    for a in adapters:  # down xavier + zero bias, up zero: the adapter starts as the identity
        assert uniform_with_bound(a.down.weight, xavier_bound(a.down.weight)) and not a.down.bias.any()
        assert not a.up_weight.any() and not a.up_bias.any()
    for fc in (model.proj.fc1, model.proj.fc2):  # xavier, zero biases
        assert uniform_with_bound(fc.weight, xavier_bound(fc.weight)) and not fc.bias.any()
    for fc in (model.engine.fc1, model.engine.fc2, model.head):  # PyTorch's default, as the authors' code
        b = default_bound(fc.weight)
        assert uniform_with_bound(fc.weight, b) and (fc.bias is None or (fc.bias.abs().max() <= b and fc.bias.any()))


def test_initialisation_of_everything_trained(clip_files, llama_files):
    check_init(tiny())
    check_init(load(clip_files["pt"], llama_files["meta"]))  # built on meta, then materialised


def test_vit_activation_checkpointing_gives_the_same_gradients_and_keeps_less():
    grads, kept = [], []
    for recompute in (False, True):
        model = tiny().train()
        perturb_adapters(model)
        model.visual.grad_checkpointing = recompute
        torch.manual_seed(3)  # the same dropout masks; checkpoint() replays them in the recomputation
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            vit = model.visual(torch.randn(2, 3, 224, 224))
        kept.append(sum(saved))
        model.head(model.proj(vit)).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in model.trainable_parameters() if p.grad is not None])
    assert len(grads[0]) == 4 * 4 + 2 + 2 + 1 and all(torch.equal(a, b) for a,
                                                      b in zip(*grads))  # 4 ViT adapters, proj, head
    assert kept[1] < kept[0] / 4


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    """The CPU's bf16 path (frozen weights in bf16, autocast) gives logits within 3 % of their scale of
    fp32's (1.3 % measured on this model)."""
    model = tiny()
    perturb_adapters(model)
    x = P.normalise(torch.randint(0, 256, (8, 1, 224, 224), dtype=torch.uint8), 224)
    with torch.no_grad():
        fp32 = model(x)
        C.cast_frozen(model, torch.bfloat16)
        with C.autocast(dict(device="cpu", dtype="bf16")):
            bf16 = model(x).float()
    assert model.visual.conv1.weight.dtype == torch.bfloat16 and model.head.weight.dtype == torch.float32
    err = (bf16 - fp32).abs().max() / fp32.abs().max()
    assert 0 < err < 0.03


def fake_rates(fast):  # GFLOP/s as a CPU would measure them: `fast` at 300, fp32 at 50, the rest at 5
    return lambda rows, width, dtype, stored, per_call: 300.0 if dtype == C.DTYPES[fast] else \
        50.0 if dtype == torch.float32 else 5.0


@pytest.mark.parametrize("fast, want", [
    ("bf16", dict(ViT=("bf16", "converted"), LLaMA=("bf16", "converted"))),  # e.g. Intel with AMX
    ("fp16", dict(ViT=("fp16", "as stored"), LLaMA=("fp16", "as stored"))),  # fp16 units (AMX-FP16, AVX512-FP16)
    ("fp32", dict(ViT=("fp32", "upcast"), LLaMA=("fp32", "upcast"))),  # neither: AVX2 only
])
def test_cpu_scoring_follows_the_measured_rates_and_stays_close_to_fp32(fast, want, capsys):
    """Each frozen part of a model stored in fp16 computes in the dtype its (faked) measured rates favour:
    bf16 converted once, fp16 as stored, or fp32 upcast block by block as each block runs (what LLaMA-7B
    gets, as its 27 GB fp32 copy would not fit: here forced by a zero memory allowance). This project's parts
    stay fp32. Probabilities stay within 5e-3 of an fp32 model's (measured: bf16 4e-4, fp16 3e-4,
    fp32 1e-5: the weights' fp16 rounding), batched equals one image at a time, and the upcast blocks hand
    their stored weights back."""
    cfg = dict(device="cpu", dtype="as stored", norm="clip")
    ref = tiny()
    perturb_adapters(ref)
    model = C.cast_frozen(copy.deepcopy(ref), torch.float16)
    line = CP.for_cpu_scoring(model, rates=fake_rates(fast), spare=0)
    assert line.startswith("scoring on this CPU: ViT in ") and f"{fast} 300" in line
    frozen = {id(p) for p in model.frozen_parameters()}
    for name, p in model.named_parameters():
        part = "ViT" if name.startswith("visual.") else "LLaMA"
        stays = want[part][1] == "upcast" and (".layers." in name or ".resblocks." in name)
        expect = torch.float32 if id(p) not in frozen else torch.float16 if stays else C.DTYPES[want[part][0]]
        assert p.dtype == expect, name
    images = torch.randint(0, 256, (6, 1, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batched = C.predict(model, images, cfg, batch=6)
    alone = np.concatenate([C.predict(model, images[i:i + 1], cfg) for i in range(6)])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert model.llama.layers[0].attention.wq.weight.dtype == (torch.float16 if fast == "fp32" else C.DTYPES[fast])
    with torch.no_grad():
        fp32 = ref(P.normalise(images, 224, cfg["norm"])).softmax(-1)
        rounded = C.cast_frozen(copy.deepcopy(ref), torch.float16).float()(P.normalise(images, 224)).softmax(-1)
    err = (torch.as_tensor(batched) - fp32).abs().max()
    assert 0 < err < 5e-3
    if fast == "fp32":  # fp16 weights computed in fp32: the fp32 model of the fp16-rounded weights, exactly
        torch.testing.assert_close(torch.as_tensor(batched), rounded, rtol=0, atol=1e-6)


def test_llama_converted_in_the_background_is_waited_for(monkeypatch):
    """for_cpu_scoring(background=True), as the scripts call it: LLaMA's blocks are converted in another
    thread (still fp16 when it returns; the final norm, outside the blocks, already bf16), LLaMA's first
    call waits for them and scores exactly as the model converted in the foreground; an error in the
    thread is raised by that call."""
    convert, main = CP.convert, threading.get_ident()

    def slow(params, dtype):  # the thread's conversion held back 0.3 s: the first call must wait for it
        if threading.get_ident() != main:
            time.sleep(0.3)
        convert(params, dtype)
    model = C.cast_frozen(tiny(), torch.float16)
    ahead = copy.deepcopy(model)
    CP.for_cpu_scoring(ahead, rates=fake_rates("bf16"))
    monkeypatch.setattr(CP, "convert", slow)
    line = CP.for_cpu_scoring(model, rates=fake_rates("bf16"), background=True)
    assert "LLaMA in bf16, converted in the background (its first call waits for it) (the CPU" in line
    blocks = [p for p in model.llama.layers.parameters() if not p.requires_grad]
    assert {p.dtype for p in blocks} == {torch.float16} and model.llama.norm.weight.dtype == torch.bfloat16
    cfg, images = dict(device="cpu", dtype="as stored", norm="clip"), torch.zeros(2, 1, 224, 224, dtype=torch.uint8)
    np.testing.assert_array_equal(C.predict(model, images, cfg), C.predict(ahead, images, cfg))
    assert {p.dtype for p in blocks} == {torch.bfloat16}

    def broken(params, dtype):
        if threading.get_ident() != main:
            raise OSError("the disk went away")
        convert(params, dtype)
    monkeypatch.setattr(CP, "convert", broken)
    model = C.cast_frozen(tiny(), torch.float16)
    CP.for_cpu_scoring(model, rates=fake_rates("bf16"), background=True)
    with pytest.raises(OSError, match="the disk went away"):
        C.predict(model, images, cfg)


def test_a_process_that_ends_does_not_wait_for_its_background_conversion():
    """A script that stops before scoring (every film unreadable: exit 2) ends at once: the conversion,
    here held back to 1 s a tensor (18 s for the tiny LLaMA's blocks), stops at the next tensor."""
    code = ("import sys, threading, time, torch, common as C, cpu_policy as CP, pneumollm as P\n"
            "cast, main = CP.cast, threading.main_thread()\n"
            "CP.cast = lambda t, d: time.sleep(threading.current_thread() != main) or cast(t, d)  # a slow disk\n"
            "model = C.cast_frozen(P.PneumoLLM(P.tiny_args()), torch.float16)\n"
            "rates = lambda rows, width, dtype, stored, per_call: 300.0 if dtype == torch.bfloat16 else 5.0\n"
            "print(CP.for_cpu_scoring(model, rates=rates, background=True))\n"
            "print(sum(p.dtype == torch.float16 for p in model.llama.layers.parameters()), time.perf_counter())\n"
            "sys.exit(2)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    ended, (left, at) = time.perf_counter(), run.stdout.split()[-2:]
    assert run.returncode == 2 and "LLaMA in bf16, converted in the background" in run.stdout, run.stderr
    assert int(left) >= 17 and ended - float(at) < 5  # the same clock (CLOCK_MONOTONIC) in both processes


def test_quick_gelu_folded_for_cpu_scoring_still_matches_transformers(clip_files, llama_files):
    """Scoring on a CPU folds QuickGELU's 1.702 into c_fc and c_proj (one silu pass instead of three): the
    folded fp32 ViT's CLS tokens still equal transformers' QuickGELU CLIPVisionModel; c_fc is 1.702 times
    the file's, c_proj divided by it; an exact-GELU tower is left as it is."""
    model = load(clip_files["pt"], llama_files["meta"])
    before = copy.deepcopy(model.visual.transformer.resblocks[0].mlp)
    assert "ViT in fp32, as stored (forced), its adapters merged into q/k/v, its QuickGELU folded into one silu; " \
           "LLaMA in fp32, as stored (forced)" in CP.for_cpu_scoring(model, force="fp32")
    block = model.visual.transformer.resblocks[0]
    assert {b.act for b in model.visual.transformer.resblocks} == {"silu"}
    torch.testing.assert_close(block.mlp.c_fc.weight, 1.702 * before.c_fc.weight)
    torch.testing.assert_close(block.mlp.c_fc.bias, 1.702 * before.c_fc.bias)
    torch.testing.assert_close(block.mlp.c_proj.weight, before.c_proj.weight / 1.702)
    torch.testing.assert_close(block.mlp.c_proj.bias, before.c_proj.bias, rtol=0, atol=0)
    img = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model.visual(img)
        ref = clip_files["ref"](pixel_values=img, output_hidden_states=True).hidden_states
    for i in range(4):
        torch.testing.assert_close(ours[:, i], ref[i + 1][:, 0], rtol=1e-5, atol=1e-5)
    gelu = load(clip_files["pt"], llama_files["meta"], clip_act="gelu")
    assert "folded" not in CP.for_cpu_scoring(gelu, force="fp32")
    assert {b.act for b in gelu.visual.transformer.resblocks} == {"gelu"}


def test_cpu_scoring_merges_the_vits_trained_adapters_and_keeps_llamas():
    """The ViT's adapters (trained: perturbed here) merged into its q/k/v when it is a copy of its own: the
    same probabilities as the unmerged model (fp32 forced), its blocks' adapters gone, LLaMA's kept (its
    q/k/v stay as stored); where the ViT is upcast block by block (weights as stored) nothing is merged."""
    ref = tiny()
    perturb_adapters(ref)
    model = copy.deepcopy(ref)
    CP.for_cpu_scoring(model, force="fp32")
    assert not any(isinstance(m, P.RepAdapter) for m in model.visual.modules())
    assert all(isinstance(b.adapter_attn, P.RepAdapter) for b in model.llama.layers)
    x = P.normalise(torch.randint(0, 256, (3, 1, 224, 224), dtype=torch.uint8), 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x).softmax(-1), ref(x).softmax(-1), rtol=0, atol=1e-5)
    upcast = C.cast_frozen(copy.deepcopy(ref), torch.float16)
    line = CP.for_cpu_scoring(upcast, rates=fake_rates("fp32"), spare=0)
    assert "merged" not in line and "folded" not in line
    assert all(isinstance(b.adapter_attn, P.RepAdapter) for b in upcast.visual.transformer.resblocks)


def test_upcasting_runs_only_for_batches_where_it_was_measured_faster():
    """Where fp32 wins only from 4 images a call (one image is memory-bound), LLaMA's blocks upcast for
    a batch of 6 and run one image in the stored fp16; the line says from how many images."""
    def rates(rows, width, dtype, stored, per_call):  # fp32 (upcast) faster than fp16 from 4 images a call
        return 1.0 if dtype == stored else 0.5 if dtype == torch.bfloat16 else 2.0 if rows >= 4 * t else 0.9
    model = C.cast_frozen(tiny(), torch.float16)
    t = CP.cpu_parts(model)["LLaMA"][2] // 16
    line = CP.for_cpu_scoring(model, rates=rates, spare=0)
    assert "LLaMA in fp32, upcast block by block for batches of 4+ images" in line
    seen = []
    wq = model.llama.layers[0].attention.wq
    wq.register_forward_pre_hook(lambda m, args: seen.append((args[0].shape[0], m.weight.dtype, args[0].dtype)))
    cfg = dict(device="cpu", dtype="as stored", norm="clip")
    images = torch.randint(0, 256, (6, 1, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batched, alone = C.predict(model, images, cfg), C.predict(model, images[:1], cfg)
    assert seen == [(6, torch.float32, torch.float32), (1, torch.float16, torch.float16)]
    np.testing.assert_allclose(batched[:1], alone, atol=2e-3)
    assert wq.weight.dtype == torch.float16


def test_cpu_dtype_choice_margin_candidates_and_force():
    """The prior (no flags: the stored dtype) is kept unless another is >= 1.1x as fast; fp32 weights are never narrowed
    (nothing measured); bf16 ones never become fp16; --cpu-dtype forces one dtype for both parts."""
    calls = []
    def rates(bf16, fp32=1.0):
        return lambda rows, width, dtype, stored, per_call: calls.append((rows, width, dtype, per_call)) or \
            {torch.float16: 1.0, torch.bfloat16: bf16, torch.float32: fp32}[dtype]
    model = C.cast_frozen(tiny(), torch.float16)
    assert {k: v[0] for k, v in CP.choose_cpu_dtypes(model, rates=rates(1.05)).items()} == dict(ViT="fp16", LLaMA="fp16")
    assert {k: v[0] for k, v in CP.choose_cpu_dtypes(model, rates=rates(1.15)).items()} == dict(ViT="bf16", LLaMA="bf16")
    a = model.args  # rows: one image's tokens (patches + CLS) for the ViT, 16 images' T tokens for LLaMA
    tokens = (a.vision.image_size // a.vision.patch_size) ** 2 + 1
    t = len(a.cls_blocks) + a.n_diag
    assert {(r, w) for r, w, *_ in calls} == {(tokens, a.vision.width), (16 * t, a.llama.dim)}
    calls.clear()
    assert CP.for_cpu_scoring(tiny(), rates=rates(9.0)).count("fp32, as stored (nothing wider to try)") == 2
    assert calls == []
    bf16 = C.cast_frozen(tiny(), torch.bfloat16)
    assert {v[0] for v in CP.choose_cpu_dtypes(bf16, rates=rates(1.0, 0.1)).values()} == {"bf16"}
    assert {d for *_, d, _ in calls} == {torch.bfloat16, torch.float32}  # never fp16 (less range)
    line = CP.for_cpu_scoring(model, force="fp32", rates=rates(9.0))
    assert "ViT in fp32, converted (forced)" in line and "LLaMA in fp32, converted (forced)" in line
    assert {p.dtype for p in model.frozen_parameters()} == {torch.float32}


def test_cpu_scoring_keeps_freed_blocks_so_a_batch_does_not_fault_its_pages_afresh():
    """After for_cpu_scoring, a 64 MiB block freed and allocated again reuses its pages (glibc would hand it
    back to the OS and fault all 16,384 of its pages in again); the scoring line says so. In a fresh process:
    the setting is the process's."""
    code = ("import resource, torch, cpu_policy as CP, pneumollm as P\n"
            "def faults():  # minor page faults of filling a fresh 64 MiB tensor twice\n"
            "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    for _ in range(2):\n"
            "        torch.ones(2**24)\n"
            "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
            "faults()\n"
            "plain = faults()\n"
            "line = CP.for_cpu_scoring(P.PneumoLLM(P.tiny_args()).eval(), force='fp32')\n"
            "faults(), faults()  # the heap settles: one or two rounds, with the heap's layout so far\n"
            "print(plain, faults(), line.endswith('; freed memory kept for reuse'))\n")
    out = run_script("-c", code)
    plain, kept, said = out.stdout.split()
    assert int(plain) > 2 * 16384 * 0.9 and int(kept) < 2000 and said == "True"


def test_cast_between_fp16_and_bf16_gives_torchs_bits():
    """cpu_policy.cast goes through fp32 a chunk at a time (torch's direct kernel is 3x slower): every
    one of the 65,536 fp16 bit patterns and of the bf16 ones comes out as torch's .to gives it (NaN as
    NaN), across chunk edges and in 2-D; a tensor that is not contiguous takes torch's own path."""
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    for a, b in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        x = every.view(a).reshape(256, 256)
        got, want = CP.cast(x, b, chunk=1000), x.to(b)  # 65,536 = 65 chunks of 1,000 and a part one
        assert got.shape == (256, 256) and got.dtype == b and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[~want.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
    t = torch.randn(64, 32).half().t()
    assert torch.equal(CP.cast(t, torch.bfloat16), t.to(torch.bfloat16)) and not t.is_contiguous()


def page_cache_share(path: Path) -> float:
    """The share of a file's pages in the page cache: mincore(2) over a fresh mapping of it."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    pages = -(-m.size() // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(np.frombuffer(m, np.uint8).ctypes.data),
                                     ctypes.c_size_t(m.size()), vec) == 0
    return sum(v & 1 for v in vec) / pages


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssFile from /proc (Linux)")
def test_converting_a_memory_mapped_checkpoint_hands_its_pages_back(tmp_path):
    """LLaMA converted once from a memory-mapped file: each source tensor's pages leave the process as it
    is converted, so that the file pages and the converted copy never add up (13 + 13 GB at real size)."""
    torch.save({f"w{i}": torch.randn(2048, 2048).half() for i in range(8)}, tmp_path / "c.pth")  # 8 x 8 MiB
    with open(tmp_path / "c.pth", "rb") as f:
        os.fsync(f.fileno())  # written back: only clean pages can leave the page cache
    sd = torch.load(tmp_path / "c.pth", mmap=True, weights_only=True)
    params = [torch.nn.Parameter(t, requires_grad=False) for t in sd.values()]
    del sd
    rss = lambda: int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                           if l.startswith("RssFile:")).split()[1]) / 1024
    before = rss()
    assert sum(float(p.float().sum()) for p in params) != 0  # every page read: 64 MiB mapped
    touched, cached = rss(), page_cache_share(tmp_path / "c.pth")
    CP.convert(params[:4], torch.bfloat16)  # half of them: the file is still mapped for the other half
    half = rss()
    CP.convert(params[4:], torch.bfloat16)
    assert touched - before > 60 and 28 < half - before < 36 and rss() - before < 4, (before, touched, half, rss())
    (tmp_path / "probe").write_bytes(bytes(2**20))
    with open(tmp_path / "probe", "rb") as f:  # a filesystem whose pages can leave the cache (not tmpfs)
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if page_cache_share(tmp_path / "probe") < 0.05:
        assert cached > 0.95 and page_cache_share(tmp_path / "c.pth") < 0.05  # out of the page cache too
    assert all(p.dtype == torch.bfloat16 for p in params)
    sums = [float(p.float().sum()) for p in params]  # the converted copies are intact
    assert sums == [float(t.bfloat16().float().sum()) for t in
                    torch.load(tmp_path / "c.pth", weights_only=True).values()]
    w = torch.nn.Parameter(torch.randn(2048, 2048), requires_grad=False)  # tied: one storage under two names
    tied = torch.nn.Parameter(w.data, requires_grad=False)
    want = w.data.bfloat16().clone()
    CP.convert([w, tied], torch.bfloat16)
    assert torch.equal(w.data, want) and torch.equal(tied.data, want)  # the second read before the pages went


def test_eval_scores_with_the_policy_and_says_so(demo_runs, monkeypatch, capsys):
    """load_run as eval.py calls it on a CPU: a run whose checkpoints store fp16 is put in the measured
    dtype and the line says which part computes in what and why; --cpu-dtype stored keeps fp16."""
    build = C.build
    monkeypatch.setattr(C, "build", lambda cfg, as_stored: C.cast_frozen(build(cfg, as_stored), torch.float16))
    monkeypatch.setattr(CP, "matmul_rate", fake_rates("bf16"))
    model, cfg = C.load_run(demo_runs / "fold1", keep_checkpoint_dtype=True)
    assert "ViT in bf16, converted (the CPU's flags say fp16; GFLOP/s here, best of 5: fp16 5, bf16 300, fp32 50)" \
        in capsys.readouterr().out and "LLaMA in bf16, converted in the background" in cfg["cpu_scoring"]
    C.predict(model, np.zeros((1, 1, cfg["size"], cfg["size"]), np.uint8), cfg)  # LLaMA's first call waits
    assert cfg["dtype"] == "as stored" and model.llama.layers[0].attention.wq.weight.dtype == torch.bfloat16
    model, _ = C.load_run(demo_runs / "fold1", keep_checkpoint_dtype=True, cpu_dtype="stored")
    assert {p.dtype for p in model.frozen_parameters()} == {torch.float16}
    assert "scoring on this CPU" not in capsys.readouterr().out


# ==================================================================================================
# 2. loaders: parity with transformers through every format; loud; nothing in a file runs


@pytest.mark.parametrize("fmt", ["hf", "pt", "jit"])
def test_vit_cls_tokens_match_transformers(clip_files, llama_files, fmt):
    model = load(clip_files[fmt], llama_files["meta"])
    img = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model.visual(img)  # (B, 4, W): after blocks 1..4
        ref = clip_files["ref"](pixel_values=img, output_hidden_states=True).hidden_states
    assert ours.shape == (2, 4, 128)  # heads = width // 64, as OpenAI builds it
    for i in range(4):
        torch.testing.assert_close(ours[:, i], ref[i + 1][:, 0], rtol=1e-5, atol=1e-5)


def test_a_gelu_run_is_rebuilt_by_eval_with_its_activation(clip_files, llama_files, demo_data, tmp_path):
    """train.py --clip-act gelu on an OpenAI-layout state dict; eval.py's load_run rebuilds the run from its
    config.json with the same activation: its CLS tokens equal transformers' CLIPVisionModel with exact GELU
    on the same weights, and not the QuickGELU one's."""
    out = tmp_path / "runs/fold1"
    train.main(train_args(demo_data, out, "--epochs", "1", "--model", "full", "--clip", str(clip_files["pt"]),
                          "--clip-act", "gelu", "--llama", str(llama_files["meta"]), "--cls-blocks", "1,2,3,4"))
    model, cfg = C.load_run(out, keep_checkpoint_dtype=True, cpu_dtype="stored")
    with torch.no_grad():  # the trained adapters back to the identity: the frozen ViT alone is compared
        for m in model.modules():
            if isinstance(m, P.RepAdapter):
                m.up_weight.zero_(), m.up_bias.zero_()
    quick = clip_files["ref"]
    config = transformers.CLIPVisionConfig(**dict(quick.config.to_dict(), hidden_act="gelu"))
    gelu = transformers.CLIPVisionModel(config).eval()
    gelu.load_state_dict(quick.state_dict())  # the same weights (transformers 5: no .vision_model level)
    img = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours = model.eval().visual(img)
        want = gelu(pixel_values=img, output_hidden_states=True).hidden_states
        other = quick(pixel_values=img, output_hidden_states=True).hidden_states
    assert cfg["clip_act"] == "gelu"
    for i in range(4):
        torch.testing.assert_close(ours[:, i], want[i + 1][:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[:, 3], other[4][:, 0], atol=1e-3)


def test_an_openclip_style_gelu_vit_matches_transformers_and_unknown_math_is_refused(clip_files, llama_files,
                                                                                      tmp_path):
    """LAION/OpenCLIP ViTs use exact GELU: a Hugging Face folder says so (hidden_act), an OpenAI-layout state dict
    needs clip_act="gelu". Both match transformers' CLIPVisionModel; config fields whose math this model does not
    compute are refused in one line, naming them."""
    vc = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=512, patch_size=14,
              image_size=56, hidden_act="gelu")
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vc)).eval()
    randomize(hf, 1)
    hf.save_pretrained(tmp_path / "laion")
    model = P.from_pretrained(tmp_path / "laion", None, "cpu", llm=False, cls_blocks=[1, 2, 3, 4])
    img = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ours, ref = model.visual(img), hf(pixel_values=img, output_hidden_states=True).hidden_states
    for i in range(4):
        torch.testing.assert_close(ours[:, i], ref[i + 1][:, 0], rtol=1e-5, atol=1e-5)
    with pytest.raises(P.CheckpointError, match=r"hidden_act is 'gelu', not --clip-act 'quick_gelu'"):
        P.read_clip(tmp_path / "laion", "quick_gelu")
    vision, entries = P.read_clip(clip_files["pt"], "gelu")  # OpenAI's layout, OpenCLIP's activation
    assert vision.act == "gelu"
    config = json.loads((tmp_path / "laion/config.json").read_text())
    for field, value in (("hidden_act", "relu"), ("layer_norm_eps", 1e-6)):
        (tmp_path / "laion/config.json").write_text(json.dumps(dict(config, **{field: value})))
        with pytest.raises(P.CheckpointError, match=rf"config\.json: {field} = .* is not supported"):
            P.read_clip(tmp_path / "laion")
    llama_config = json.loads((llama_files["hf"] / "config.json").read_text())
    for field, value in (("attention_bias", True), ("hidden_act", "gelu"), ("head_dim", 8)):
        shutil.copytree(llama_files["hf"], tmp_path / field)
        (tmp_path / field / "config.json").write_text(json.dumps(dict(llama_config, **{field: value})))
        with pytest.raises(P.CheckpointError, match=rf"config\.json: {field} = .* is not supported"):
            P.read_llama(tmp_path / field)


@pytest.mark.parametrize("fmt", ["meta", "meta2", "hf", "hf_sharded"])
def test_llama_blocks_match_transformers(clip_files, llama_files, fmt):
    model = load(clip_files["pt"], llama_files[fmt])
    h = torch.randn(2, 6, 64)
    mask = P.emitter_mask(4, 2)
    with torch.no_grad():
        ours = model.llama(h, mask)
        ref = llama_files["ref"](inputs_embeds=h, attention_mask=mask[None, None].expand(2, 1, 6, 6))
    torch.testing.assert_close(ours, ref.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_llama_each_layer_matches_transformers(clip_files, llama_files):
    model = load(clip_files["pt"], llama_files["meta"])
    ref, h, mask = llama_files["ref"], torch.randn(1, 6, 64), P.emitter_mask(4, 2)
    with torch.no_grad():
        cos, sin = model.llama.rope_tables(6, "cpu")
        pe = ref.rotary_emb(h, torch.arange(6)[None])
        for ours, theirs in zip(model.llama.layers, ref.layers):
            x = ours(h, cos, sin, mask)
            torch.testing.assert_close(x, theirs(h, attention_mask=mask[None, None], position_embeddings=pe),
                                       rtol=1e-5, atol=1e-5)
            h = x


def test_sharded_meta_checkpoint_equals_unsplit(clip_files, llama_files):
    a = load(clip_files["pt"], llama_files["meta"]).state_dict()
    b = load(clip_files["jit"], llama_files["meta2"]).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_unknown_and_missing_keys_fail_naming_key_and_file(clip_files, llama_files, tmp_path):
    sd = dict(llama_files["sd"])
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra/params.json").write_text((llama_files["meta"] / "params.json").read_text())
    torch.save({**sd, "layers.0.attention.wz.weight": torch.zeros(2)}, tmp_path / "extra/consolidated.00.pth")
    with pytest.raises(P.CheckpointError,
                       match=r"consolidated\.00\.pth: unexpected key 'layers\.0\.attention\.wz\.weight'"):
        load(clip_files["pt"], tmp_path / "extra")
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing/params.json").write_text((llama_files["meta"] / "params.json").read_text())
    torch.save({k: t for k, t in sd.items() if k != "layers.1.ffn_norm.weight"},
               tmp_path / "missing/consolidated.00.pth")
    with pytest.raises(P.CheckpointError, match=r"consolidated\.00\.pth: missing key 'layers\.1\.ffn_norm\.weight'"):
        load(clip_files["pt"], tmp_path / "missing")
    bad = dict(clip_files["sd"], **{"visual.ln_pre.weight": torch.ones(127)})
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(P.CheckpointError, match=r"bad\.pt: 'visual\.ln_pre\.weight' is \[127\], expected \[128\]"):
        load(tmp_path / "bad.pt", llama_files["meta"])


def write_tokenizer(path, vocab):
    text = ["Does the patient have pneumoconiosis?", "Small rounded opacities in both upper zones.",
            "Silica dust exposure in coal miners.", "No abnormality in the lung fields."] * 10
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=vocab, model_type="bpe",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


QUESTION = "Does the patient have pneumoconiosis?"


@pytest.mark.parametrize("fmt", ["meta2", "hf_sharded", "meta_vocab_unset"])
def test_text_branch_prepends_the_checkpoints_question_embeddings(clip_files, llama_files, tmp_path, fmt):
    tok = write_tokenizer(tmp_path / "tokenizer.model", 40)  # the tiny LLaMA's vocabulary
    ids, vocab = C.tokenize(tok, QUESTION)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert ids[0] == sp.bos_id() == 1 and sp.decode(ids[1:]) == QUESTION and vocab == sp.vocab_size() <= 40
    folder = llama_files.get(fmt)
    if fmt == "meta_vocab_unset":  # Meta's LLaMA-1 params.json says vocab_size -1: read it off the embedding
        folder = shutil.copytree(llama_files["meta"], tmp_path / "meta")
        params = json.loads((folder / "params.json").read_text())
        (folder / "params.json").write_text(json.dumps(dict(params, vocab_size=-1)))
    model = load(clip_files["pt"], folder, question_ids=ids)
    assert model.llama.tok_embeddings.weight.shape == (40, 64)
    h, mask = tokens_into_llama(model, torch.randn(2, 3, 56, 56))
    q, n = len(ids), len(model.args.cls_blocks)
    assert h.shape == (2, q + n + 4, 64)
    assert torch.equal(h[:, :q], llama_files["sd"]["tok_embeddings.weight"][ids].expand(2, -1, -1))
    assert torch.equal(mask, eq2(q + n, q + n + 4))  # the question is a source: nobody reads the diagnosis tokens
    with pytest.raises(UserError, match=r"nope/tokenizer\.model: no sentencepiece"):
        C.tokenize(tmp_path / "nope/tokenizer.model", QUESTION)


def test_no_llm_and_conv_stem_read_only_what_they_use(clip_files, llama_files):
    model = load(clip_files["pt"], None, llm=False)  # no LLaMA file at all
    assert model.llama is None and model(torch.randn(2, 3, 56, 56)).shape == (2, 2)
    torch.manual_seed(0)
    model = P.from_pretrained("nope.pt", llama_files["meta"], "cpu", encoder="conv", vision=P.VisionArgs(32, 1, 1, 14,
                                                                                                         56))
    assert isinstance(model.visual, P.ConvStem) and model.visual(torch.randn(1, 3, 56, 56)).shape[1] == (56 // 14) ** 2
    assert torch.equal(model.llama.layers[0].attention.wv.weight, llama_files["sd"]["layers.0.attention.wv.weight"])
    assert model(torch.randn(2, 3, 56, 56)).shape == (2, 2)


def test_any_clip_size_is_inferred_from_the_file(clip_files, tmp_path):
    sd = {k: t for k, t in clip_files["sd"].items() if k.startswith("visual.")}
    sd["visual.positional_embedding"] = torch.randn(6 * 6 + 1, 128)  # a 6x6 grid of 14-px patches: an "@84px" model
    torch.save(sd, tmp_path / "ViT-84px.pt")
    vision, _ = P.read_clip(tmp_path / "ViT-84px.pt")
    assert vision == P.VisionArgs(128, 4, 2, 14, 84)
    model = P.PneumoLLM(P.PneumoArgs(vision, P.LlamaArgs(dim=64, n_layers=1, n_heads=4, multiple_of=32)))
    x = P.normalise(torch.randint(0, 256, (2, 1, 224, 224), dtype=torch.uint8), 84)
    assert x.shape == (2, 3, 84, 84) and model(x).shape == (2, 2)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED']}",))


def test_pickle_that_runs_code_is_refused(clip_files, llama_files, tmp_path, monkeypatch):
    flag = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(flag))
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil/params.json").write_text((llama_files["meta"] / "params.json").read_text())
    torch.save({"norm.weight": Exploit()}, tmp_path / "evil/consolidated.00.pth")
    with open(tmp_path / "evil.pt", "wb") as f:  # an old plain pickle: refused too, its globals unnamed
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(P.CheckpointError,
                       match=r"consolidated\.00\.pth: holds code-bearing objects \(\w+\.system\); not loaded$"):
        load(clip_files["pt"], tmp_path / "evil")
    with pytest.raises(P.CheckpointError, match=r"evil\.pt: is not a plain tensor checkpoint; not loaded$"):
        load(tmp_path / "evil.pt", llama_files["meta"])
    assert not flag.exists()


def test_torchscript_archive_is_read_without_running_it(clip_files):
    theirs = torch.jit.load(str(clip_files["jit"])).state_dict()  # the oracle, on the test's own benign file
    ours = P.read_torchscript(clip_files["jit"])
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype, k
    assert P.read_torchscript(clip_files["pt"]) is None  # torch.save's zip: not TorchScript


class Evil(nn.Module):  # a "CLIP" whose TorchScript __setstate__ writes a file when the archive is loaded
    def __init__(self, path: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 4, 4, bias=False)
        self.path = path

    def forward(self, x):
        return self.conv1(x)

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.conv1.weight, self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        torch.save(state[0], state[1])
        self.path, self.training = state[1], state[2]


def test_torchscript_that_runs_code_is_never_run(tmp_path, llama_files):
    root = nn.Module()
    root.visual = Evil(str(tmp_path / "written"))
    torch.jit.save(torch.jit.script(root), str(tmp_path / "ViT-L-14.pt"))
    with pytest.raises(P.CheckpointError, match=r"ViT-L-14\.pt: no visual\.conv1\.weight") as e:
        P.from_pretrained(tmp_path / "ViT-L-14.pt", llama_files["meta"])
    assert "\n" not in str(e.value) and not (tmp_path / "written").exists()
    with pytest.raises(RuntimeError):  # what the loader avoids: torch.jit.load runs __setstate__
        torch.jit.load(str(tmp_path / "ViT-L-14.pt"))
    assert (tmp_path / "written").exists()


class Record:  # a reference to a data/ record, in a crafted archive's data.pkl
    def __init__(self, key, numel, storage=torch.HalfStorage):
        self.key, self.numel, self.storage = key, numel, storage


class View:  # a tensor as TorchScript pickles it: torch._utils._rebuild_tensor_v2(storage, offset, size, stride)
    def __init__(self, record, size, stride, offset=0):
        self.args = (record, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Node:  # a module of the archive's own code, at the top level of __torch__ (not __torch__.something)
    def __init__(self, **state):
        self.__dict__.update(state)


Node.__module__ = "__torch__"


def crafted_archive(path, obj, records=None, compress=False, data_pkl=True):
    """A TorchScript-shaped zip (archive/constants.pkl, archive/data.pkl, archive/data/<key>) whose data.pkl
    pickles `obj`, Records becoming storage references as TorchScript writes them."""
    class Writer(pickle.Pickler):
        def persistent_id(self, o):
            return ("storage", o.storage, o.key, "cpu", o.numel) if isinstance(o, Record) else None
    buf = io.BytesIO()
    Writer(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/constants.pkl", pickle.dumps(()))
        if data_pkl:
            z.writestr("archive/data.pkl", buf.getvalue())
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
    return path


def hostile_archives(d) -> dict:  # {file: what its refusal must say}; None: read, and must stay small
    mib40 = Record("0", 20 * 2**20)
    return {
        crafted_archive(d / "system.pt", {"x": os.system}): r"holds code-bearing objects \(posix\.system\)",
        crafted_archive(d / "eval.pt", {"x": eval}): r"holds code-bearing objects \(__builtin__\.eval\)",
        crafted_archive(d / "load.pt", {"x": torch.load}): r"code-bearing objects \(torch\.serialization\.load\)",
        crafted_archive(d / "bomb.pt", Node(w=View(Record("0", 2**27), [2**27], [1])), {"0": bytes(2**28)},
                        compress=True): r"record 0 is compressed",
        crafted_archive(d / "stride0.pt", Node(w=View(Record("0", 4), [4194304, 4], [0, 1])), {"0": bytes(8)}):
            r"a stride of 0",
        crafted_archive(d / "past.pt", Node(w=View(Record("0", 4), [8], [1])), {"0": bytes(8)}): r"past the end",
        crafted_archive(d / "nopkl.pt", {}, data_pkl=False): r"without data\.pkl",
        crafted_archive(d / "cycle.pt", cyclic()): r"nested more than 64 deep",
        crafted_archive(d / "repeated.pt", Node(**{f"w{i}": View(mib40, [20 * 2**20], [1]) for i in range(25)}),
                        {"0": bytes(40 * 2**20)}): None,
    }


def cyclic():
    node = Node()
    node.child = node
    return node


def test_hostile_torchscript_archives_are_refused_in_one_line_with_bounded_memory(tmp_path, monkeypatch):
    """Each read in a fresh process: refused in one line naming the file, or (25 references to one 40 MiB
    record) read as views of one memory-mapped record; the peak RSS of all of them stays under 1.5 GiB
    (the 256 MiB bomb is 0.25 MiB on disk)."""
    torch_module = types.ModuleType("__torch__")
    torch_module.Node = Node
    monkeypatch.setitem(sys.modules, "__torch__", torch_module)
    cases = hostile_archives(tmp_path)
    script = ("import resource, sys, pneumollm as P\n"
              "for f in sys.argv[1:]:\n"
              "    try:\n"
              "        t = P.read_torchscript(P.Path(f))\n"
              "        print('read', len(t), len({v.untyped_storage().data_ptr() for v in t.values()}))\n"
              "    except P.CheckpointError as e:\n"
              "        print('refused', e)\n"
              "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    r = run_script("-c", script, *map(str, cases))
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == len(cases) + 1, r.stderr[-2000:]
    for (path, expected), line in zip(cases.items(), lines):
        if expected is None:
            assert line == "read 25 1", (path.name, line)  # 25 tensors, one storage
        else:
            assert line.startswith(f"refused {path}: ") and line.endswith("; not loaded"), line
            assert re.search(expected, line), (path.name, line)
    assert int(lines[-1].split()[1]) < 1.5 * 2**20, lines[-1]  # KiB


def test_a_benign_top_level_torchscript_class_is_read(tmp_path, monkeypatch):
    torch_module = types.ModuleType("__torch__")
    torch_module.Node = Node
    monkeypatch.setitem(sys.modules, "__torch__", torch_module)
    values = torch.arange(6, dtype=torch.float16)
    path = crafted_archive(tmp_path / "ok.pt", Node(w=View(Record("0", 6), [2, 3], [3, 1]), sub=Node(b=View(
        Record("0", 6), [3], [1], offset=3))), {"0": values.numpy().tobytes()})
    got = P.read_torchscript(path)
    assert set(got) == {"w", "sub.b"}
    assert torch.equal(got["w"], values.view(2, 3)) and torch.equal(got["sub.b"], values[3:])


def test_a_torchscript_record_shorter_or_longer_than_its_storage_is_refused(tmp_path, monkeypatch):
    """A storage that declares 6 fp16 values (12 bytes) over a record of 10 or 14 bytes: refused in one line
    naming both sizes, never read past its end or half-filled."""
    torch_module = types.ModuleType("__torch__")
    torch_module.Node = Node
    monkeypatch.setitem(sys.modules, "__torch__", torch_module)
    for n in (5, 7):
        values = torch.arange(n, dtype=torch.float16).numpy().tobytes()
        path = crafted_archive(tmp_path / f"r{n}.pt", Node(w=View(Record("0", 6), [2, 3], [3, 1])), {"0": values})
        with pytest.raises(P.CheckpointError, match=f"record 0 holds {2 * n} bytes, its storage declares 12"):
            P.read_torchscript(path)


def test_refusals_are_one_line_and_never_suggest_turning_the_safety_off(tmp_path, monkeypatch):
    monkeypatch.setenv("PWNED", str(tmp_path / "pwned"))
    torch.save({"x": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(P.CheckpointError) as e:
        P.read_clip(tmp_path / "evil.pt")
    msg = str(e.value)
    assert msg == f"{tmp_path / 'evil.pt'}: holds code-bearing objects (posix.system); not loaded"
    assert "weights_only" not in msg
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(P.CheckpointError, match=r"junk\.pt: is not a plain tensor checkpoint; not loaded$"):
        P.read_clip(tmp_path / "junk.pt")


# ==================================================================================================
# 3. prepare.py: real DICOMs and radiographs, framing that cannot know the label, the audit, folders


@needs_data
def test_every_real_dicom_is_prepared_or_skipped_with_its_reason(tmp_path):
    files = sorted(os.listdir(DICOM))
    rc, out = run_prepare(tmp_path, DICOM, [(f, "01"[i % 2]) for i, f in enumerate(files)], "--folds", "1")
    meta = json.loads((out / "meta.json").read_text())
    skipped = skipped_files(out)
    lossless = {"fodicom_GH133_mg_voilutseq.dcm", "fodicom_CR-ModalitySequenceLUT_dental.dcm"}
    if importlib.util.find_spec("pylibjpeg"):  # with a decoder plug-in they decode
        lossless = set()
    assert rc == 0 and set(skipped) == lossless
    for reason in skipped.values():
        assert "JPEG Lossless" in reason and "pip install pylibjpeg pylibjpeg-libjpeg" in reason
    assert len(manifest(out)) == len(files) - len(lossless) == meta["prepared"]
    for r in manifest(out):
        with Image.open(out / r["image"]) as im:
            assert im.size == (224, 224) and im.mode == "L"
    assert loaded_image(out / "preview.png").size[0] > 224


@needs_data
def test_jpeg2000_twin_and_inverted_mono1_twin():
    uncr = R.read_image(Path(DICOM, "RG1_UNCR.dcm"))[0]
    j2k = R.read_image(Path(DICOM, "RG1_J2KI.dcm"))[0]
    assert uncr.shape == j2k.shape == (1955, 1841)
    assert np.abs(uncr - j2k).mean() < 0.005 and np.corrcoef(uncr.ravel(), j2k.ravel())[0, 1] > 0.999
    mono2 = R.read_image(Path(DICOM, "siim_cr_chest_pa_mono2_jpeg.dcm"))[0]
    fake1 = R.read_image(Path(DICOM, "siim_cr_chest_pa_FAKE_mono1_jpeg.dcm"))[0]
    np.testing.assert_allclose(fake1, 1 - mono2, atol=1e-12)
    # lungs (air) come out dark: the image centre's lung fields are darker than the mediastinum
    h, w = uncr.shape
    assert uncr[h // 3, w // 4] < uncr[h // 3, w // 2]


@needs_data
def test_presentation_lut_inverse_on_mono1_inverts_once():
    ds = pydicom.dcmread(os.path.join(DICOM, "highdicom_dx_thorax_vet_mono1.dcm"))
    y = R.read_image(Path(DICOM, "highdicom_dx_thorax_vet_mono1.dcm"))[0]
    raw = ds.pixel_array.astype(float)
    assert np.corrcoef(y.ravel(), raw.ravel())[0, 1] < -0.99  # inverted, not twice


@needs_data
def test_planted_identifiers_leave_no_trace(tmp_path, capsys):
    ds = pydicom.dcmread(os.path.join(DICOM, "RG1_UNCR.dcm"))
    planted = {"PatientName": "Zyxwquv^Qwertina", "PatientID": "PID-98765-XQZ", "PatientBirthDate": "19410203",
               "AccessionNumber": "ACC555777"}
    for k, v in planted.items():
        setattr(ds, k, v)
    (tmp_path / "in").mkdir()
    name = "Zyxwquv_ACC555777_1.2.840.99887766.dcm"  # file names often hold names, accession numbers, UIDs
    ds.save_as(tmp_path / "in" / name)
    (tmp_path / "in/junk.dcm").write_bytes(b"not a dicom")  # a skipped file is named in meta.json too
    shutil.copy(os.path.join(DICOM, "barre_CR-MONO1-10-chest.dcm"), tmp_path / "in/other.dcm")
    rows = [(name, "pneumoconiosis"), ("junk.dcm", "normal"), ("other.dcm", "normal")]
    rc, out = run_prepare(tmp_path, tmp_path / "in", rows, "--folds", "1")
    logs = capsys.readouterr()
    assert rc == 0 and "skip junk.dcm: not a DICOM file" in logs.err  # the terminal names a skipped file for its user
    files = [p.read_bytes() for p in out.rglob("*") if p.is_file()] + [str(p).encode() for p in out.rglob("*")]
    for v in [*planted.values(), "junk", "99887766", str(tmp_path / "in")]:
        for token in {v, v.replace("^", " "), "Zyxwquv", "98765"}:
            assert not any(token.encode() in b for b in files), token  # the data folder: never
            assert token == "junk" or token.encode() not in (logs.out + logs.err).encode(), token
    mapping, = tmp_path.glob("out-*.mapping.csv")  # beside the key, named after the data folder's full path
    assert name in mapping.read_text()  # traceable, from outside the data folder
    with pytest.raises(UserError, match="inside the data folder"):
        run_prepare(tmp_path, tmp_path / "in", rows, "--mapping", str(out / "map.csv"))


def test_label_file_problems_fail_before_any_work(tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / "in/a.png")
    cases = [([("a.png", "1"), ("b.png", "0")], "no file 'b.png'"), ([("a.png", "1"), ("a.png", "0")],
                                                                     "duplicate row for 'a.png'"),
             ([("a.png", "")], "missing label for 'a.png'")]
    for rows, msg in cases:
        with pytest.raises(UserError, match=msg):
            run_prepare(tmp_path, tmp_path / "in", rows)
        assert not (tmp_path / "out/images").exists() or not any((tmp_path / "out/images").iterdir())
    with pytest.raises(UserError, match="no column 'grade'"):
        run_prepare(tmp_path, tmp_path / "in", [("a.png", "1")], "--label-col", "grade")


@needs_data
def test_corrupt_and_truncated_files_are_skipped_and_the_rest_prepared(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    good = ["barre_CR-MONO1-10-chest.dcm", "nih_dx_chest_nofinding_google.dcm"]
    for g in good:
        shutil.copy(os.path.join(DICOM, g), src / g)
    data = Path(DICOM, "RG1_UNCR.dcm").read_bytes()
    (src / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (src / "notdicom.dcm").write_bytes(b"hello, this is not a DICOM file at all" * 10)
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(src / "dot.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    bad = ["truncated.dcm", "notdicom.dcm", "dot.png", "broken.png"]
    rc, out = run_prepare(tmp_path, src, [(f, "0" if i % 2 else "1") for i, f in enumerate(good + bad)], "--folds", "1")
    skipped = skipped_files(out)
    assert rc == 0 and set(skipped) == set(bad) and len(manifest(out)) == 2
    assert "too small" in skipped["dot.png"]
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    rc2, _ = run_prepare(tmp_path, src, [(f, "0" if i % 2 else "1") for i, f in enumerate(good + bad)], "--folds", "1")
    assert rc2 == 0 and {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes  # not redone
    with pytest.raises(UserError, match=r"nothing was prepared \(4 skipped"):
        run_prepare(tmp_path, src, [(f, "01"[i % 2]) for i, f in enumerate(bad)], "--folds", "1")


def test_sixteen_bit_png_is_windowed_not_clipped(tmp_path):
    x = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(x).save(tmp_path / "a.png")
    assert loaded_image(tmp_path / "a.png").mode.startswith("I;16")
    img, attrs = R.read_image(tmp_path / "a.png")
    lo, hi = np.percentile(x, [0.5, 99.5])  # a DICOM without VOI tags gets the same robust range
    np.testing.assert_allclose(img, np.clip((x - lo) / (hi - lo), 0, 1))
    assert attrs["bits"] == 16 and 0.4 < img.mean() < 0.6  # convert("L") made it all white


@needs_data
def test_nih_folds_are_patient_disjoint_and_balanced():
    with open(os.path.join(SHARED, "nih_cxr_pneumonia/labels.csv"), newline="") as f:
        rows = list(_csv.DictReader(f))
    patients, labels = [r["patient_id"] for r in rows], [r["label"] for r in rows]
    folds = make_folds(patients, labels, 5, seed=0)
    assert folds == make_folds(patients, labels, 5, seed=0)
    assert folds != make_folds(patients, labels, 5, seed=1)
    of = {}
    for p, f in zip(patients, folds):
        assert of.setdefault(p, f) == f  # no patient in two folds, ever
    for k in range(1, 6):
        ys = [int(y) for y, f in zip(labels, folds) if f == k]
        assert 180 <= len(ys) <= 220 and abs(np.mean(ys) - 0.5) < 0.04


@needs_data
def test_multi_label_folds_balance_images_and_every_finding():
    """NIH's own findings as a multi-label set (15 findings in 80 combinations, "No Finding" among them):
    5 folds of about 200 images each, every finding with 25 images or more within 40 % of its fair share
    in every fold, no patient in two folds. Balancing the combinations instead (each one a class, as
    single-label sets do) misses it."""
    with open(os.path.join(SHARED, "nih_cxr_pneumonia/labels.csv"), newline="") as f:
        rows = list(_csv.DictReader(f))
    patients, labels = [r["patient_id"] for r in rows], [r["nih_findings"] for r in rows]

    def balanced(folds):
        sizes = np.bincount(folds, minlength=6)[1:]
        findings = {x for y in labels for x in y.split("|")}
        per = {x: np.bincount([f for y, f in zip(labels, folds) if x in y.split("|")], minlength=6)[1:]
               for x in findings}
        fair = all(abs(c - c.sum() / 5).max() <= 0.4 * c.sum() / 5 for c in per.values() if c.sum() >= 25)
        return sizes.min() >= 180 and sizes.max() <= 220 and fair
    folds = make_folds(patients, labels, 5, seed=0, multi_label=True)
    of = {}
    for p, f in zip(patients, folds):
        assert of.setdefault(p, f) == f
    assert balanced(folds) and not balanced(make_folds(patients, labels, 5, seed=0))


@needs_data
def test_nih_subset_prepares_with_the_patient_column(tmp_path):
    src = os.path.join(SHARED, "nih_cxr_pneumonia")
    with open(os.path.join(src, "labels.csv"), newline="") as f:
        every = list(_csv.DictReader(f))
    rows = [r for r in every if r["label"] == "0"][:15] + [r for r in every if r["label"] == "1"][:15]
    rc, out = run_prepare(tmp_path, src, [(r["image"], r["label"], r["patient_id"]) for r in rows], "--folds", "3",
                          header=("image", "label", "patient_id"))
    m = manifest(out)
    assert rc == 0 and len(m) == 30 and {r["fold"] for r in m} == {"1", "2", "3"}
    pid = {r["image"]: r["patient_id"] for r in rows}
    names = {os.path.basename(k) for k in pid}
    assert not any(r["patient"] in pid.values() or r["image"].split("/")[-1] in names for r in m)


def test_names_and_labels_with_commas_survive_every_csv_written(tmp_path):
    """A file name and a label holding a comma (and a quote) are quoted in the mapping and the manifest, and
    read back whole (they used to be joined with bare commas: the row split in two)."""
    imgs = pngs(tmp_path / "imgs", 6, value=lambda i: 40 * i)
    for i in range(6):
        (imgs / f"im{i}.png").rename(imgs / f'film {i}, "PA".png')
    rows = [(f'film {i}, "PA".png', "silicosis, simple" if i % 2 else "normal", f"p{i}") for i in range(6)]
    rc, out = run_prepare(tmp_path, imgs, rows, "--folds", "2", "--mapping", str(tmp_path / "map.csv"),
                          header=("image", "label", "patient"))
    assert rc == 0
    assert {r["label"] for r in manifest(out)} == {"normal", "silicosis, simple"}
    sources = {Path(r["source"]).name for r in csv_rows(tmp_path / "map.csv")}
    assert sources == {f'film {i}, "PA".png' for i in range(6)}


def test_demo_generator_is_deterministic_and_another_seed_is_another_site(tmp_path):
    demo.write_demo(tmp_path / "a", n_patients=4)
    demo.write_demo(tmp_path / "b", n_patients=4)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(files) > 4
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert demo.main([str(tmp_path / "c"), "--patients", "1", "--seed", "21"]) == 0
    first, other = (pydicom.dcmread(tmp_path / d / "demo_0000_0.dcm").pixel_array for d in ("a", "c"))
    assert first.shape == other.shape and not np.array_equal(first, other)
    ds = pydicom.dcmread(next((tmp_path / "a").glob("*.dcm")))
    assert ds.PatientName.family_name == "DEMO" and ds.Modality in ("CR", "DX")


def test_the_demo_disease_fills_the_upper_zones_first_in_ilo_sizes():
    """ILO profusion by zone (demo.phantom): category 1 puts opacities in the upper zones only, 2 in the
    upper and middle, 3 in all; each zone of each lung gets OPACITIES_PER_ZONE * (profusion - z + 1)
    opacities (counted here as connected blobs of the truth mask, which overlaps can merge: at most that
    many, and most of them); a normal film has none, and the opacities' radius is the size class's."""
    for profusion, zones_hit in ((0.0, set()), (1.0, {1}), (2.0, {1, 2}), (3.0, {1, 2, 3})):
        img, anatomy, lungs, opac, (shift, _, _) = demo.phantom(np.random.default_rng(5), profusion, "p")
        zones, (labels, n) = demo.zones_of(lungs), ndimage.label(opac)
        centres = np.round(ndimage.center_of_mass(opac, labels, range(1, n + 1))).astype(int).reshape(-1, 2)
        for z in (1, 2, 3):
            for left in (True, False):  # each opacity counted once, in the zone and lung of its centre
                side = (zones[centres[:, 0], centres[:, 1]] == z) & ((centres[:, 1] < demo.SIZE / 2 + shift) == left)
                expected = round(demo.OPACITIES_PER_ZONE * max(0.0, profusion - z + 1))
                assert (0.6 * expected <= side.sum() <= expected) if z in zones_hit else side.sum() <= 1, \
                    (profusion, z, side.sum(), expected)
        assert (img >= anatomy).all() and (profusion or np.array_equal(img, anatomy))
    for size, (lo, hi) in demo.NODULE_RADIUS_MM.items():  # a bump of height 0.3, sigma r / 1.5, exceeds 0.05
        _, _, _, opac, _ = demo.phantom(np.random.default_rng(5), 1.0, size)  # out to r * sqrt(2 ln 6) * 1/1.5
        labels, n = ndimage.label(opac)
        radii = np.sqrt(np.bincount(labels.ravel())[1:] / np.pi) * demo.SPACING / (np.sqrt(2 * np.log(6)) / 1.5)
        assert lo * 0.8 <= np.median(radii) <= hi * 1.2, (size, np.median(radii))


def test_demo_films_vary_as_real_ones_and_the_disease_barely_moves_their_brightness():
    """demo.phantom: each film's exposure, body and display curve are its own (NIH's 999 films: the lung
    fields' mean spreads by 24 grey levels, docs/demo.md), so the lung fields' mean brightness, windowed as
    to_dicom windows, spreads by over 10 grey levels between films, and the disease (profusion 2.5) moves
    it by under a quarter of that; demo.blur, which softens the anatomy's edges, is a gaussian filter."""
    means = {0: [], 1: []}
    for i in range(60):
        img, anatomy, lungs, _, _ = demo.phantom(np.random.default_rng([7, i]), 2.5 * (i % 2), "q")
        lo, hi = np.percentile(anatomy, [1, 99.5])
        means[i % 2].append(np.clip((img[lungs] - lo) / (hi - lo), 0, 1).mean() * 255)
    spread = np.std(means[0] + means[1])
    assert spread > 10 and abs(np.mean(means[1]) - np.mean(means[0])) < spread / 4, (spread, means)
    x = np.random.default_rng(0).random((64, 80)).astype(np.float32)
    assert np.allclose(demo.blur(x, 3.0), ndimage.gaussian_filter(x, 3.0, mode="nearest", truncate=10 / 3), atol=1e-6)


def test_pretrain_writes_a_tiny_clip_and_llama_that_the_real_loaders_read(tmp_path, monkeypatch):
    """pretrain.py: an OpenAI-layout CLIP state dict (visual.*, fp16, ln_post and proj included) and a Meta
    LLaMA folder, read by read_clip / read_llama with the shapes written; train.py --model tiny builds the
    model from them through from_pretrained (the frozen weights equal the files'); its films are other
    patients (seed 1000) with no disease; a thumbnail target is each 28 px cell's mean, by hand."""
    profusions = []
    real = demo.phantom
    monkeypatch.setattr(demo, "phantom", lambda rng, profusion=0.0, *a, **k: profusions.append(profusion) or
                        real(rng, profusion, *a, **k))
    crop, target = pretrain.film((pretrain.SEED, 3))
    assert profusions == [0.0]
    assert crop.shape == (224, 224) and crop.dtype == np.uint8 and target.shape == (3 + 64 + 64,)
    cell = np.s_[28:56, 84:112]  # patch (1, 3): its mean, and the spread of its fine grain (3 x 3 blur off)
    assert target[3 + 1 * 8 + 3] == pytest.approx(crop[cell].astype(float).mean() / 255, abs=1e-5)
    fine = crop - np.round(ndimage.uniform_filter(crop.astype(float), 3, mode="nearest"))
    assert target[3 + 64 + 1 * 8 + 3] == pytest.approx(np.log(fine[cell].std() + 0.5), abs=0.02)
    monkeypatch.setattr(demo, "phantom", real)
    folder = pretrain.pretrain(tmp_path / "tiny", films=16, epochs=1, workers=1)
    vision, entries = P.read_clip(folder / "ViT-tiny.pt")
    assert (vision.width, vision.layers, vision.heads, vision.patch_size, vision.image_size) == (64, 4, 1, 28, 224)
    assert {"visual.ln_post.weight", "visual.proj", "visual.conv1.weight"} <= set(entries)
    assert all(e.get().dtype == torch.float16 for e in entries.values())
    llama, blocks = P.read_llama(folder / "llama-tiny")
    assert (llama.dim, llama.n_layers, llama.n_heads) == (64, 2, 4) and "layers.1.feed_forward.w2.weight" in blocks
    cfg = dict(train.parse(["--model", "tiny", "--clip", str(folder / "ViT-tiny.pt"), "--llama",
                            str(folder / "llama-tiny")]), classes=["a", "b"], multi_label=False)
    model = C.build(cfg)
    assert torch.equal(model.visual.conv1.weight, entries["visual.conv1.weight"].get().float())
    assert torch.equal(model.llama.layers[1].feed_forward.w2.weight, blocks["layers.1.feed_forward.w2.weight"].get().float())
    before = (folder / "ViT-tiny.pt").stat().st_mtime_ns
    pretrain.pretrain(folder, films=16, epochs=1, workers=1)  # made once: a second call keeps the files
    assert (folder / "ViT-tiny.pt").stat().st_mtime_ns == before


def test_pretraining_keeps_its_fixed_patch_filters_zero_mean_at_their_spread(monkeypatch):
    """pretrain.fit: the first FIXED patch filters are zero-mean (blind to brightness) and respond with a
    spread of GAIN on the films, before and after training; the other filters learn."""
    monkeypatch.setattr(pretrain, "BATCH", 4)
    films = [pretrain.film((pretrain.SEED, i)) for i in range(8)]
    x, y = torch.from_numpy(np.stack([f[0] for f in films])[:, None]), torch.randn(8, 3 + 64 + 64)
    torch.manual_seed(0)
    model = pretrain.TinyCLIP()
    learned = model.visual.conv1.weight[pretrain.FIXED:].clone()
    pretrain.fit(model, x, y, epochs=5)
    w = model.visual.conv1.weight.detach()
    response = torch.einsum("bchw,fchw->bf", P.normalise(x, 224).unfold(2, 28, 28).unfold(3, 28, 28)
                            .permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 28, 28), w[:pretrain.FIXED])
    assert w[:pretrain.FIXED].sum((1, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(response.std(0), torch.full((pretrain.FIXED,), pretrain.GAIN), rtol=1e-3)
    assert not torch.allclose(w[pretrain.FIXED:], learned)


def test_each_model_has_its_own_recipe_defaults_and_random_reads_no_checkpoint(tmp_path):
    full, tiny, random = (train.parse(["--model", m]) for m in ("full", "tiny", "random"))
    assert (full["lr"], full["epochs"], full["clip"]) == (3e-4, 100, "checkpoints/ViT-L-14.pt")  # the paper's
    assert (tiny["lr"], tiny["epochs"], tiny["clip"]) == (3e-3, 30, "checkpoints/tiny/ViT-tiny.pt")
    assert (random["lr"], random["epochs"]) == (3e-3, 30)
    assert train.parse(["--model", "tiny", "--lr", "1e-4", "--epochs", "5"])["lr"] == 1e-4
    with pytest.raises(UserError, match="--model random reads no checkpoints"):
        train.parse(["--model", "random", "--clip", "x.pt"])
    cfg = dict(tiny, clip=str(tmp_path / "none.pt"), classes=["a", "b"], multi_label=False)
    with pytest.raises(UserError, match="python pretrain.py writes the tiny model's checkpoints"):
        C.build(cfg)
    help_text = train.parser().format_help()
    assert "3e-3 (tiny" in help_text and "3e-4 (full" in help_text


# Lung fields outlined by hand on 20 shared NIH films, 13 pneumonias (label 1) and 7 normals (0), among them
# hazy and consolidated portable AP films (00010524_001, 00003528_017, 00007256_004): the outermost lung
# pixels, apices to costophrenic angles (left, top, right, bottom; 512 px), read off a 32 px grid.
NIH_LUNGS = """image,label,left,top,right,bottom
00001300_000,0,38,62,455,305
00001803_017,0,60,115,425,350
00002673_019,0,55,95,430,465
00000573_008,1,28,30,480,378
00005228_002,1,92,58,448,398
00010352_022,1,105,45,415,322
00007845_001,1,105,75,455,390
00010943_000,1,100,55,430,335
00010066_007,1,60,90,420,335
00010524_001,1,95,110,420,400
00007256_004,1,55,95,420,480
00003528_017,1,55,85,400,430
00011585_000,1,90,30,450,325
00000766_010,1,110,125,440,360
00002451_007,1,35,25,455,385
00008715_000,1,60,60,440,385
00002555_000,0,155,120,450,345
00002070_003,0,80,60,400,370
00003310_000,0,55,120,460,505
00003441_000,0,60,35,450,305
"""


def inside(box, crop) -> float:  # the share of `box`'s area that lies in `crop` (both left, top, right, bottom)
    ix, iy = max(0, min(box[2], crop[2]) - max(box[0], crop[0])), max(0, min(box[3], crop[3]) - max(box[1], crop[1]))
    return ix * iy / ((box[2] - box[0]) * (box[3] - box[1]))


def in_film(box, region):  # a region given as fractions of the crop `box`, in film pixels
    return [box[0] + region[0] * (box[2] - box[0]), box[1] + region[1] * (box[3] - box[1]),
            box[0] + region[2] * (box[2] - box[0]), box[1] + region[3] * (box[3] - box[1])]


@needs_data
def test_the_crop_holds_every_hand_outlined_nih_lung():
    """>= 98 % of every outlined lung field lies in the crop (99.2-100 % measured), and >= 90 % in the lung
    region that --probe hides (90.3-100 %)."""
    hand = list(_csv.DictReader(NIH_LUNGS.splitlines()))
    assert len(hand) == 20 and {r["label"] for r in hand} == {"0", "1"}
    for r in hand:
        _, _, how, attrs = R.preprocess(Path(SHARED, "nih_cxr_pneumonia/images", r["image"] + ".png"))
        lungs = [int(r[k]) for k in ("left", "top", "right", "bottom")]
        assert how == "thorax" and inside(lungs, attrs["box"]) >= 0.98, r["image"]
        assert inside(lungs, in_film(attrs["box"], attrs["lungs"])) >= 0.9, r["image"]


def test_the_crop_holds_the_demo_phantoms_lungs(demo_data):
    truth = np.load(demo_data.parent / "dicom/truth.npz")
    for name, lungs in zip(truth["names"], truth["lung_boxes"]):
        _, _, how, attrs = R.preprocess(demo_data.parent / "dicom" / name)
        assert how == "thorax" and inside(lungs, attrs["box"]) == 1, name
        assert inside(lungs, in_film(attrs["box"], attrs["lungs"])) >= 0.98, name


@needs_data
def test_the_framing_does_not_move_when_the_lungs_turn_white(tmp_path):
    """What the disease changes must not move the crop or the lung region: real films of both classes, and
    the same films with their outlined lung fields painted white (as consolidation or an effusion would),
    are framed alike. (The density lung search this replaced moved or fell back on such films.)"""
    for r in list(_csv.DictReader(NIH_LUNGS.splitlines()))[:8]:
        img = np.array(loaded_image(Path(SHARED, "nih_cxr_pneumonia/images", r["image"] + ".png")).convert("L"))
        x0, y0, x1, y1 = (int(r[k]) for k in ("left", "top", "right", "bottom"))
        white = img.copy()
        white[y0:y1, x0:x1] = 255
        Image.fromarray(img).save(tmp_path / "film.png")
        Image.fromarray(white).save(tmp_path / "white.png")
        (a, _, how_a, attrs_a), (b, _, how_b, attrs_b) = (R.preprocess(tmp_path / n) for n in ("film.png",
                                                                                                     "white.png"))
        assert (how_a, attrs_a["box"], attrs_a["lungs"]) == (how_b, attrs_b["box"], attrs_b["lungs"]), r["image"]
        assert not np.array_equal(a, b)


@needs_data
def test_nih_framing_tells_nothing_the_film_does_not_and_the_view_confounder_is_flagged(tmp_path, capsys):
    src = os.path.join(SHARED, "nih_cxr_pneumonia")
    rc, out = run_prepare(tmp_path, src, [(r["image"], r["label"], r["patient_id"], r["view"]) for r in
                                          csv_rows(os.path.join(src, "labels.csv"))],
                          header=("image", "label", "patient_id", "view"))
    printed, err = capsys.readouterr()
    meta, rows = json.loads((out / "meta.json").read_text()), manifest(out)
    # NIH's 00002658_001 and _002 (one patient's follow-ups 1 and 2, label 0) hold the same pixels: one film
    assert "1 row(s) of" in err and "(the same pixels, the same label): lines 255 = 256" in err
    assert rc == 0 and len(rows) == 999 and {r["crop"] for r in rows} == {"thorax"}
    assert meta["crops"] == {c: {"thorax": n, "mask": 0, "none": 0} for c, n in (("0", 499), ("1", 500))}
    audit = meta["audit"]
    assert audit["per_class"]["view"] == {"0": {"AP": 341, "PA": 158}, "1": {"AP": 225, "PA": 275}}
    assert "view" in audit["differs"] and "FLAG view differs between classes" in printed
    sets = audit["auc_sets"]  # the films are all 512 px: the film's attributes are its view (0.617 by hand)
    assert 0.55 < sets["film (view, size)"] < 0.65 and audit["crop_adds"] <= 0.03
    assert not audit["flags"]
    # the source files' bytes per pixel separate the classes (AUC 0.86 by hand, 5 patient folds): pneumonia's
    # PNGs are 13 % larger. Every film re-encoded the same way separates them as much (0.84): the size follows
    # the films' texture, not how they were stored, and the audit says so instead of advising to rebalance
    assert audit["untested"]["bytes_per_pixel"].startswith("content") and audit["content_auc"] > 0.8
    assert "bytes per pixel follow the films' pixels, not only their files" in printed and not audit["warning"]
    assert "FLAG bytes_per_pixel" not in printed
    # what could not be tested says so, never a chance AUC: every film is a 512-px 8-bit PNG, no maker
    assert {a: audit["untested"][a] for a in ("width", "height", "encoding", "bits", "manufacturer", "jpeg_q")} == \
        dict(width="constant: 512", height="constant: 512", encoding="constant: PNG", bits="constant: 8",
             manufacturer="unknown", jpeg_q="unknown")
    assert "width" not in audit["auc_by_attribute"] and "view" in audit["auc_by_attribute"]
    assert "untested, unknown: photometric, manufacturer, model, spacing, jpeg_q" in printed
    assert "untested, constant: bits (8), crop (thorax), encoding (PNG), colour (False), width (512), height (512)" \
        in printed
    sheet = np.asarray(loaded_image(out / "preview.png").convert("RGB")).astype(int)
    assert ((sheet[..., 1] > 180) & (sheet[..., 0] < 90) & (sheet[..., 2] < 90)).sum() > 1000  # lung regions in green
    pid = {r["image"]: r["patient_id"] for r in csv_rows(os.path.join(src, "labels.csv"))}
    assert not any(r["patient"] in pid.values() or os.path.basename(r["image"]) in {os.path.basename(k) for k in pid}
                   for r in rows)


def test_precomputed_masks_png_folder_and_chexmask_rle(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    img = np.zeros((40, 60), np.uint8)
    img[10:30, 20:40] = np.arange(20, dtype=np.uint8)[None] * 12  # a gradient only inside the masked box
    Image.fromarray(img).save(src / "a.png")
    img[0, 0] = 1  # another film, outside the mask
    Image.fromarray(img).save(src / "b.png")
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 20:40] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks/a.png")
    Image.fromarray(mask).save(tmp_path / "masks/b.png")
    rows = [("a.png", "1"), ("b.png", "0")]
    rc, out = run_prepare(tmp_path, src, rows, "--masks", str(tmp_path / "masks"), "--size", "20", "--folds", "1")
    crop = np.asarray(loaded_image(out / manifest(out)[0]["image"]))
    assert rc == 0 and crop.shape == (20, 20) and crop[:, 0].mean() < crop[:, -1].mean()  # the gradient fills the crop
    # the mask in the crop, for --probe: the crop is the mask's box plus 1 px (5 %) each side, so its edge is out
    lungs = np.asarray(loaded_image(out / "masks" / Path(manifest(out)[0]["image"]).name)) > 127
    assert lungs.shape == (20, 20) and lungs[2:-2, 2:-2].all() and not lungs[0].any() and not lungs[:, -1].any()
    flat = np.flatnonzero(mask.ravel())  # CheXmask RLE: 1-based starts, row by row
    runs = " ".join(f"{s + 1} 20" for s in flat[::20])
    assert np.array_equal(lungcrop.rle_mask(runs, 40, 60), mask > 0)
    write_labels(tmp_path / "chexmask.csv", [(n, runs, "", 40, 60) for n in ("a.png", "b.png")],
                 ("ImageID", "Left Lung", "Right Lung", "Height", "Width"))
    shutil.rmtree(out)
    rc, out = run_prepare(tmp_path, src, rows, "--masks", str(tmp_path / "chexmask.csv"), "--size", "20",
                          "--folds", "1")
    assert rc == 0 and np.array_equal(np.asarray(loaded_image(out / manifest(out)[0]["image"])), crop)


def audit_items(n=300, seed=0, **shortcut):
    """Synthetic audit inputs, half 'sick': view, size and crop box drawn independently of the label, unless
    `shortcut` says otherwise (rare_flag: 12 sick images share a manufacturer; box: sick boxes end higher)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        sick = i % 2 == 1
        w, h = int(rng.integers(1800, 2600)), int(rng.integers(1800, 2600))
        bottom = h - int(rng.integers(0, 200)) - (int(rng.integers(300, 600)) if sick and shortcut.get("box") else 0)
        items.append(dict(label="sick" if sick else "well", view=str(rng.choice(["AP", "PA"])), width=w, height=h,
                          manufacturer="X" if shortcut.get("rare_flag") and sick and i < 24 else "Y",
                          box=[int(0.02 * w), int(0.02 * h), int(0.98 * w), bottom], crop="thorax"))
    return items, [1 + i % 5 for i in range(n)]


def run_audit(items, folds):
    return audit.shortcut_audit(items, ["well", "sick"], folds, False)


def test_the_audit_warns_on_a_rare_pure_flag_and_on_a_framing_shortcut_and_not_otherwise():
    clean = run_audit(*audit_items())
    assert not clean["warning"] and not clean["flags"] and max(v for v in clean["auc_sets"].values() if v) < 0.6
    assert clean["auc_sets"]["source encoding"] is None  # these items say nothing of their files
    rare = run_audit(*audit_items(rare_flag=True))
    assert rare["flags"] == ["manufacturer=X: 12 images, 100 % sick"] and rare["warning"]
    assert rare["auc_by_attribute"]["manufacturer"] < 0.65  # too rare for the AUC rule: the flag rule catches it
    framed = run_audit(*audit_items(box=True))
    assert framed["warning"] and framed["auc_sets"]["film + crop geometry"] > 0.9 and framed["crop_adds"] > 0.3
    assert framed["auc_sets"]["film (view, size)"] < 0.6
    printed = audit.describe(framed)
    assert "WARNING" in printed and "film + crop geometry" in printed


def test_the_audit_reads_the_source_encoding_and_says_what_it_could_not_test(tmp_path, capsys):
    """Sick films stored as JPEG quality 40, well ones as quality 95, same pixels otherwise: the source
    encoding separates the classes and the audit warns; each file's bytes per pixel is its size over its
    pixels. The view column is absent (unknown) and every film is 64 px (constant): untested."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        img = (rng.random((64, 64)) * 60 + np.linspace(60, 180, 64)[None]).astype(np.uint8)
        Image.fromarray(img).save(src / f"im{i}.jpg", quality=40 if i % 2 else 95)
        rows.append((f"im{i}.jpg", "sick" if i % 2 else "well", f"p{i}"))
    rc, out = run_prepare(tmp_path, src, rows, "--crop", "none", header=("image", "label", "patient"))
    report = json.loads((out / "meta.json").read_text())["audit"]
    assert rc == 0 and report["warning"] and report["auc_sets"]["source encoding"] > 0.9
    assert report["auc_by_attribute"]["jpeg_q"] > 0.9 and report["untested"]["view"] == "unknown"
    assert report["untested"]["width"] == "constant: 64" and report["auc_sets"]["film (view, size)"] is None
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["bytes_per_pixel"] for r in records) == sorted(round(f.stat().st_size / 64**2, 4)
                                                                   for f in src.glob("*.jpg"))
    printed = capsys.readouterr().out
    assert "film (view, size) untested" in printed and "untested, unknown: view" in printed
    assert "follow the films' pixels" in printed and "lossy storage" in printed  # q40 left its mark in the pixels
    for i, (name, label, _) in enumerate(rows):  # alike films stored losslessly, compressed more for one class
        img = (rng.random((64, 64)) * 60 + np.linspace(60, 180, 64)[None]).astype(np.uint8)
        Image.fromarray(img).save(src / f"{name[:-4]}.png", compress_level=9 * (i % 2))
    rows = [(f"{n[:-4]}.png", label, p) for n, label, p in rows]
    rc, out = run_prepare(tmp_path, src, rows, "--crop", "none", "--restart", header=("image", "label", "patient"))
    printed = capsys.readouterr().out
    assert "but not re-encoded the same way" in printed and "stored differently" in printed  # storage, said so


def test_the_pure_flag_rule_on_an_imbalanced_set():
    """97 % sick, 3 % well: a value held only by sick films says nothing the base rate does not (not a flag);
    one held by 10 of the 12 well films is (a flag), however rare."""
    labels = ["sick"] * 388 + ["well"] * 12
    makers = ["X"] * 20 + ["Y"] * 368 + ["Z"] * 10 + ["Y"] * 2
    items = [dict(label=label, manufacturer=m) for label, m in zip(labels, makers)]
    member = {c: np.array([label == c for label in labels]) for c in ("well", "sick")}
    assert audit.pure_flags(items, member) == ["manufacturer=Z: 10 images, 100 % well"]


def test_the_thorax_box_of_a_non_square_film_cuts_2_percent_of_each_side(tmp_path):
    """(left, top, right, bottom): 2 % of the width off the sides, 2 % of the height off top and bottom."""
    assert lungcrop.thorax_box((1000, 600)) == (12, 20, 588, 980)
    Image.fromarray(np.full((1000, 600), 90, np.uint8)).save(tmp_path / "tall.png")
    _, _, how, attrs = R.preprocess(tmp_path / "tall.png")
    assert how == "thorax" and attrs["box"] == [12, 20, 588, 980] and (attrs["width"], attrs["height"]) == (600, 1000)


def test_audit_cross_validated_auc_is_scikit_learns_logistic_regression_out_of_fold():
    """The audit's model is L2 logistic regression with an unpenalised bias: scikit-learn's with C = 1 / l2."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    items, folds = audit_items(box=True)
    items = [audit.with_geometry(it) for it in items]
    x, y, folds = audit.columns(items, audit.GEOMETRY), np.array([it["label"] == "sick" for it in items],
                                                                 float), np.array(folds)
    score = np.zeros(len(y))
    for f in range(1, 6):
        fit = linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x[folds != f], y[folds != f])
        score[folds == f] = fit.decision_function(x[folds == f])
    assert audit.cv_auc(x, y, folds) == pytest.approx(sklearn_metrics.roc_auc_score(y, score), abs=1e-9)


def test_acquisition_that_separates_the_classes_is_a_loud_warning(tmp_path, capsys):
    src = pngs(tmp_path / "in", 60, lambda i: 60 + i)
    rows = [(f"im{i}.png", "sick" if i % 2 else "well", f"p{i}", "AP" if i % 2 else "PA") for i in range(60)]
    rc, out = run_prepare(tmp_path, src, rows, "--crop", "none", header=("image", "label", "patient", "view"))
    report = json.loads((out / "meta.json").read_text())["audit"]
    assert rc == 0 and report["auc_sets"]["all attributes"] > 0.95 and report["warning"]
    assert "WARNING: what the acquisition or the framing says separates the classes" in capsys.readouterr().out


def test_labels_never_go_silently_wrong(tmp_path):
    src = pngs(tmp_path / "in", 4)
    with pytest.raises(UserError, match=r"'Normal' and 'normal ?' differ only in case or spaces"):
        run_prepare(tmp_path, src, [("im0.png", "Normal"), ("im1.png", "normal"), ("im2.png", "sick")])
    with pytest.raises(UserError,
                       match=r"labels not in --classes 'normal,sick' on 1 row\(s\), e\.g\. line 4 \('sikc'\)"):
        run_prepare(tmp_path, src, [("im0.png", "normal"), ("im1.png", "sick"), ("im2.png", "sikc")], "--classes",
                    "normal,sick")
    rc, out = run_prepare(tmp_path, src, [("im0.png", "sick"), ("im1.png", "normal")], "--classes", "sick,normal",
                          "--crop", "none", "--folds", "1")
    assert rc == 0 and json.loads((out / "meta.json").read_text())["classes"] == ["sick", "normal"]
    (tmp_path / "both/b").mkdir(parents=True)
    shutil.copytree(src, tmp_path / "both/in")
    shutil.copy(src / "im0.png", tmp_path / "both/b/im0.png")
    with pytest.raises(UserError,
                       match=r"'im0\.png' matches b/im0\.png and in/im0\.png under .*: give the relative path"):
        run_prepare(tmp_path, tmp_path / "both", [("im0.png", "sick"), ("in/im1.png", "normal")])


def test_excel_csvs_with_a_bom_or_semicolons_are_read(tmp_path):
    src = pngs(tmp_path / "in", 2)
    for text in ("\ufeffimage,label\nim0.png,a\nim1.png,b\n", "image;label\nim0.png;a\nim1.png;b\n"):
        (tmp_path / "labels.csv").write_text(text, encoding="utf-8")
        rc = prepare.main(["--images", str(src), "--labels", str(tmp_path / "labels.csv"), "--out",
                           str(tmp_path / "out"),
                           "--key-file", str(tmp_path / "key"), "--workers", "1", "--crop", "none", "--folds", "1",
                           "--image-col", "image", "--restart"])
        assert rc == 0 and [r["label"] for r in manifest(tmp_path / "out")] == ["a", "b"]


def test_a_data_folder_is_consistent_or_refused(tmp_path):
    src = pngs(tmp_path / "in", 6, lambda i: 40 * i)
    rows = [(f"im{i}.png", "ab"[i % 2]) for i in range(6)]
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2")
    first = json.loads((out / "meta.json").read_text())
    images = {p: p.read_bytes() for p in (out / "images").iterdir()}
    with pytest.raises(UserError, match=r"out was prepared with other settings \(crop 'thorax' there, 'none' now; "
                                                r"size 224 there, 128 now\)"):
        run_prepare(tmp_path, src, rows, "--folds", "2", "--crop", "none", "--size", "128")
    assert {p: p.read_bytes() for p in (out / "images").iterdir()} == images
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2")  # the same settings: images reused, records read back
    assert rc == 0 and json.loads((out / "meta.json").read_text())["crops"] == first["crops"]
    (out / ".lock").write_text(str(os.getppid()))  # a live process holds the folder
    with pytest.raises(UserError, match=r"out is in use by another prepare\.py \(process \d+\)"):
        run_prepare(tmp_path, src, rows, "--folds", "2")
    (out / ".lock").write_text("999999999")  # a dead one does not
    assert run_prepare(tmp_path, src, rows, "--folds", "2")[0] == 0 and not (out / ".lock").exists()
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2", "--crop", "none", "--size", "128", "--restart")
    assert rc == 0 and loaded_image(out / manifest(out)[0]["image"]).size == (128, 128)


def test_data_folders_know_their_sources_and_settings(tmp_path, capsys):
    """Another file under the same name is prepared again; two folders of one name keep their own mappings;
    another --seed or --folds is refused; a run trained on a folder refuses it once it was prepared again."""
    src = pngs(tmp_path / "in", 8, lambda i: 30 * i)
    rows = [(f"im{i}.png", "ab"[i % 2]) for i in range(8)]
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2")
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(src / "im3.png")  # other pixels, the same name
    capsys.readouterr()
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2")
    said = capsys.readouterr().out
    assert rc == 0 and "7 finished before, 1 whose source file changed since (prepared again)" in said
    after = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    assert sum(before[n] != after[n] for n in before) == 1
    with pytest.raises(UserError, match=r"other settings \(seed 20 there, 7 now\)"):
        run_prepare(tmp_path, src, rows, "--folds", "2", "--seed", "7")
    with pytest.raises(UserError, match=r"other settings \(folds 2 there, 3 now\)"):
        run_prepare(tmp_path, src, rows, "--folds", "3")
    train.main(train_args(out, tmp_path / "fold1", "--epochs", "1", "--val-frac", "0", "--batch-size", "2"))
    run_prepare(tmp_path, src, rows, "--folds", "2", "--seed", "7", "--restart")  # other folds, same folder
    with pytest.raises(UserError, match=r"out changed since .*fold1 was trained on it"):
        ev.main(["--runs", str(tmp_path), "--fold", "1", "--calibrate"])
    with pytest.raises(UserError, match=r"out changed since .*fold1 was trained on it .*train\.py --restart"):
        train.main(train_args(out, tmp_path / "fold1", "--epochs", "1", "--val-frac", "0", "--batch-size", "2"))
    for place in ("p1", "p2"):
        prepare.main(["--images", str(src), "--labels", str(tmp_path / "labels.csv"), "--out",
                      str(tmp_path / place / "mine"), "--key-file", str(tmp_path / "key"), "--folds", "2"])
    assert len(list(tmp_path.glob("mine-*.mapping.csv"))) == 2  # one per folder, though both are called mine


def test_prepare_refuses_what_could_never_train_and_says_what_it_risks(tmp_path, capsys):
    src = pngs(tmp_path / "in", 6, lambda i: 30 * i)
    (tmp_path / "labels.csv").write_text("image,label\n")
    with pytest.raises(UserError, match="a header and no rows"):
        prepare.main(["--images", str(src), "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing left behind
    with pytest.raises(UserError, match=r"one class only \('a', 6 images\)"):
        run_prepare(tmp_path, src, [(f"im{i}.png", "a") for i in range(6)], "--folds", "1")
    rows = [(f"im{i}.png", "a" if i < 5 else "b") for i in range(6)]
    with pytest.raises(UserError, match=r"fold \d has no 'b' .*patients per class: \{'a': 5, 'b': 1\}.*fewer --folds"):
        run_prepare(tmp_path, src, rows, "--folds", "2")
    rows = [(f"im{i}.png", "a|b" if i % 2 else "a") for i in range(6)]  # every film has finding a: no fold can score it
    with pytest.raises(UserError, match=r"fold \d has no images with and without 'a'"):
        run_prepare(tmp_path, src, rows, "--folds", "2")
    assert not (tmp_path / "out/meta.json").exists()  # no folder a run could be started on
    capsys.readouterr()
    rc, out = run_prepare(tmp_path, src, [(f"im{i}.png", "ab"[i % 2]) for i in range(6)], "--folds", "1")
    err = capsys.readouterr().err
    assert rc == 0 and "WARNING: 6 of 6 images have no patient" in err and "optimistic" in err
    assert json.loads((out / "meta.json").read_text())["patients"].startswith("6 of 6 images have no patient")
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(big / "large.png")
    for i in range(2):
        Image.fromarray(np.full((64, 64), i, np.uint8)).save(big / f"s{i}.png")
    rc, out = run_prepare(tmp_path, big, [("large.png", "a"), ("s0.png", "a"), ("s1.png", "b")], "--folds", "1",
                          "--max-pixels", "10000", "--restart")
    assert rc == 0 and "300x300 pixels, more than --max-pixels 10000" in skipped_files(out)["large.png"]
    with pytest.raises(UserError, match="--key-file .*inside the data folder"):
        run_prepare(tmp_path, big, [("s0.png", "a"), ("s1.png", "b")], "--key-file", str(out / "key"))
    with pytest.raises(UserError, match=r"--mapping .*nope/map\.csv: its folder .*nope does not exist"):
        run_prepare(tmp_path, big, [("s0.png", "a"), ("s1.png", "b")], "--mapping", str(tmp_path / "nope/map.csv"))


def test_a_stopped_preparation_says_how_much_is_kept(tmp_path, monkeypatch):
    src = pngs(tmp_path / "in", 6, lambda i: 30 * i)
    real = multiprocessing.pool.Pool.imap_unordered

    def stopped_after_two(self, *args, **kw):
        for i, result in enumerate(real(self, *args, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield result
    monkeypatch.setattr(multiprocessing.pool.Pool, "imap_unordered", stopped_after_two)
    with pytest.raises(Interrupted, match="2 of 6 images prepared and kept; run the same command to prepare the rest"):
        run_prepare(tmp_path, src, [(f"im{i}.png", "ab"[i % 2]) for i in range(6)], "--folds", "1")


def test_a_stopped_preparation_resumes_and_loses_no_finished_image(tmp_path, capsys):
    src = pngs(tmp_path / "in", 6, lambda i: 40 * i)
    rows = [(f"im{i}.png", "ab"[i % 2]) for i in range(6)]
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2")
    first, log = json.loads((out / "meta.json").read_text()), out / "records.jsonl"
    lines = log.read_text().splitlines()
    assert rc == 0 and len(lines) == 6 and not list((out / "images").glob("*.json"))
    ids = [json.loads(line)["image"] for line in lines]
    (out / "images" / f"{ids[0]}.png").unlink()  # stopped before its image was written,
    log.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])  # or while its record was
    mtimes = {i: (out / "images" / f"{i}.png").stat().st_mtime_ns for i in ids[1:5]}
    capsys.readouterr()
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2")
    assert rc == 0 and "6 images (a: 3, b: 3): 4 finished before, preparing 2" in capsys.readouterr().out
    assert {i: (out / "images" / f"{i}.png").stat().st_mtime_ns for i in ids[1:5]} == mtimes
    assert sorted(prepare.read_records(log)) == sorted(ids) and all((out / "images" / f"{i}.png").exists() for i in ids)
    assert json.loads((out / "meta.json").read_text())["crops"] == first["crops"]


# ==================================================================================================
# 4. train.py: the recipe line by line, resumable runs, data-parallel, compiled


def test_normalisation_constants_and_grey_to_three_channels():
    grey = torch.full((1, 1, 224, 224), 128, dtype=torch.uint8)
    clip = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # CLIP's, SPEC step 1
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert train.parse([])["norm"] == "clip" and train.parse(["--norm", "imagenet"])["norm"] == "imagenet"
    for norm, (mean, std) in (("clip", clip), ("imagenet", imagenet)):
        x = P.normalise(grey, 224, norm)
        assert x.shape == (1, 3, 224, 224)
        for c in range(3):
            assert torch.allclose(x[0, c], torch.tensor((128 / 255 - mean[c]) / std[c]), atol=1e-6)
    img = torch.randint(0, 256, (2, 1, 224, 224), dtype=torch.uint8)
    x = P.normalise(img, 224)
    rgb = x * torch.tensor(clip[1]).view(1, 3, 1, 1) + torch.tensor(clip[0]).view(1, 3, 1, 1)
    torch.testing.assert_close(rgb, (img.float() / 255).expand(-1, 3, -1, -1), atol=1e-6, rtol=0)


def test_adamw_settings_and_weight_decay_groups():
    model = tiny()
    cfg = dict(train.parse(["--model", "random"]), multi_label=False)
    opt = train.Training(model, cfg).opt
    trainable = model.trainable_parameters()
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in trainable) and len(seen) == len(set(seen))  # each exactly once
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.02 for p in g["params"]}
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["weight_decay"] in (0.0, 0.02)
               for g in opt.param_groups)
    # SPEC: decay on the weight matrices only (adapters' A and grouped D, engine, projection, head), by name
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in names.items() if id(p) in decay} == {n for n in names if n.endswith("weight")}
    assert len(decay) == 2 * (4 + 2) + 2 + 2 + 1  # A and D in 4 ViT and 2 LLaMA blocks, engine, projection, head


def test_learning_rate_schedule_at_known_iterations(demo_data, tmp_path, monkeypatch):
    cfg, ipe = train.parse([]), 32  # the paper: 504 images / 16 = 32 steps per epoch, 100 epochs
    assert train.lr_at(0, cfg, ipe) == pytest.approx(5e-7)
    assert train.lr_at(2 * ipe, cfg, ipe) == pytest.approx(3e-4)  # end of the 2-epoch warmup
    assert train.lr_at(ipe, cfg, ipe) == pytest.approx((5e-7 + 3e-4) / 2)  # halfway up, linearly
    mid = 2 * ipe + (100 * ipe - 2 * ipe) // 2
    assert train.lr_at(mid, cfg, ipe) == pytest.approx((3e-4 + 1e-7) / 2)  # the cosine's midpoint
    assert train.lr_at(100 * ipe, cfg, ipe) == pytest.approx(1e-7)
    seen, real = [], torch.amp.GradScaler.step  # and the training loop uses it at every step

    def spy(self, opt, *args, **kw):
        seen.append(opt.param_groups[0]["lr"])
        return real(self, opt, *args, **kw)

    monkeypatch.setattr(torch.amp.GradScaler, "step", spy)
    train.main(train_args(demo_data, tmp_path / "run", "--epochs", "3", "--warmup-epochs", "1"))
    n, peak = len(seen) // 3, 3e-3  # the tiny models' own peak
    warm = [5e-7 + (peak - 5e-7) * i / n for i in range(n)]
    cos = [1e-7 + 0.5 * (peak - 1e-7) * (1 + math.cos(math.pi * i / (2 * n))) for i in range(2 * n)]
    np.testing.assert_allclose(seen, warm + cos, rtol=1e-12)


def test_validation_patients_are_disjoint_from_training_and_test(demo_data):
    data = Data(demo_data)
    for fold in data.folds:
        s = data.split(fold, 0.1, 20)
        pats = {k: {r["patient"] for r in rows} for k, rows in s.items()}
        assert pats["val"] and not pats["val"] & pats["train"] and not pats["val"] & pats["test"]
        assert not pats["train"] & pats["test"]
        assert len(s["train"]) + len(s["val"]) + len(s["test"]) == len(data.rows)
        assert 0.05 < len(s["val"]) / (len(s["train"]) + len(s["val"])) < 0.2


def test_test_fold_is_loaded_only_for_the_final_evaluation(demo_data, tmp_path, monkeypatch):
    calls, real = [], Data.images

    def spy(self, rows):
        calls.append(({int(r["fold"]) for r in rows}, (tmp_path / "run/state.pt").exists()))
        return real(self, rows)

    monkeypatch.setattr(Data, "images", spy)
    train.main(train_args(demo_data, tmp_path / "run", "--epochs", "2", "--fold", "2"))
    with_test = [i for i, (folds, _) in enumerate(calls) if 2 in folds]
    assert with_test == [len(calls) - 1] and calls[-1] == ({2}, True)  # once, last, after training


def test_every_step_sees_a_full_batch_and_padding_weighs_nothing():
    perm = torch.randperm(37)
    got = list(train.batches(perm, 16))
    assert [len(i) for i, _ in got] == [16, 16, 16] and [int(w.sum()) for _, w in got] == [16, 16, 5]
    assert torch.equal(torch.cat([i[w > 0] for i, w in got]), perm)  # each image once, in order, pads after
    model, cfg = tiny(adapter_dropout=0.0), dict(multi_label=False, authors_code=False)
    x, y = torch.randn(16, 3, 224, 224), torch.randint(0, 2, (16,))
    idx, w = got[-1]
    padded = (train.loss_fn(model(x), y, cfg) * w).sum() / 5  # train_epoch's loss on the short last batch
    real = F.cross_entropy(model(x[:5]), y[:5])  # the mean over its 5 real images
    torch.testing.assert_close(padded, real)


def test_train_epochs_loss_is_the_mean_over_each_batchs_real_images():
    """train_epoch itself on 21 images in batches of 16 (a full batch, then 5 real images and 11 pads), at
    a learning rate too small to move the weights: its loss is the mean of the two batches' mean
    cross-entropies, each over its real images only, in the order the run's seed draws (by hand)."""
    cfg = train.parse(["--model", "random", "--device", "cpu", "--lr", "1e-20", "--min-lr", "0", "--warmup-lr", "0",
                       "--warmup-epochs", "0", "--adapter-dropout", "0", "--batch-size", "16", "--seed", "3",
                       "--epochs", "1", "--val-frac", "0", "--threads", "2"]) | dict(multi_label=False)
    torch.manual_seed(0)
    model = P.PneumoLLM(P.tiny_args(n_classes=2, adapter_dropout=0.0))
    perturb_adapters(model)
    x = torch.randint(0, 256, (21, 1, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (21,), generator=torch.Generator().manual_seed(2))
    tr = train.Training(model, cfg)
    rec = train.train_epoch(tr, model, x, y, train.Ranks(cfg))
    order = torch.randperm(21, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        logits = model(P.normalise(x[order], model.args.vision.image_size, cfg["norm"]))
    by_hand = (F.cross_entropy(logits[:16], y[order][:16]) + F.cross_entropy(logits[16:], y[order][16:])) / 2
    assert rec["loss"] == pytest.approx(float(by_hand), rel=1e-5) and rec["skipped"] == 0


def test_non_finite_steps_are_skipped_and_an_all_bad_epoch_stops(demo_data, tmp_path, monkeypatch):
    real, calls = train.loss_fn, []

    def nan_on_the_second_step(logits, y, cfg):
        calls.append(1)
        return real(logits, y, cfg) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(train, "loss_fn", nan_on_the_second_step)
    train.main(train_args(demo_data, tmp_path / "one", "--epochs", "1", "--val-frac", "0"))
    rec = json.loads((tmp_path / "one/log.jsonl").read_text().splitlines()[0])
    assert rec["skipped"] == 1 and np.isfinite(rec["loss"])
    assert all(torch.isfinite(t).all() for t in last_weights(tmp_path / "one").values())
    monkeypatch.setattr(train, "loss_fn", lambda logits, y, cfg: real(logits, y, cfg) * float("nan"))
    with pytest.raises(UserError, match="every step of epoch 1 had a non-finite loss"):
        train.main(train_args(demo_data, tmp_path / "all", "--epochs", "1", "--val-frac", "0"))


def test_fp16_overflow_steps_are_counted_and_the_loss_scale_logged(demo_data, tmp_path, monkeypatch, capsys):
    """GradScaler skips a step whose gradients overflow; the log says how many were skipped in each epoch
    (the second counted from its own first step) and the scale."""
    real, calls = train.Training.__init__, []

    def overflow_every_other_backward(self, model, cfg):
        real(self, model, cfg)
        model.head.weight.register_hook(lambda g: calls.append(1) or (g * float("inf") if len(calls) % 2 else g))
    monkeypatch.setattr(train.Training, "__init__", overflow_every_other_backward)
    train.main(train_args(demo_data, tmp_path / "run", "--epochs", "2", "--val-frac", "0"))
    first, second = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    steps = len(calls) // 2  # per epoch; the 1st, 3rd, ... backward of the run overflowed
    odd = lambda a, b: sum(k % 2 for k in range(a, b + 1))  # noqa: E731
    assert [first["skipped"], second["skipped"]] == [odd(1, steps), odd(steps + 1, 2 * steps)]  # each epoch its own
    assert np.isfinite(first["loss"]) and np.isfinite(second["loss"])
    assert second["scale"] == 65536.0 / 2 ** (first["skipped"] + second["skipped"])  # halved at each skipped step
    assert f"{first['skipped']} of {steps} steps skipped" in capsys.readouterr().err


def test_kill_and_resume_equals_uninterrupted(demo_data, tmp_path, monkeypatch, capsys):
    args = ["--epochs", "3", "--val-frac", "0.2"]
    full = train.main(train_args(demo_data, tmp_path / "full", *args))
    real_save, saves = train.Training.save, []

    def killed_after_epoch_2(self, out):
        real_save(self, out)
        saves.append(self.epoch)
        if len(saves) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train.Training, "save", killed_after_epoch_2)
    with pytest.raises(Interrupted, match="after epoch 2 of 3, which is saved; run the same command to resume"):
        train.main(train_args(demo_data, tmp_path / "resumed", *args))
    monkeypatch.setattr(train.Training, "save", real_save)
    capsys.readouterr()
    resumed = train.main(train_args(demo_data, tmp_path / "resumed", *args))  # the same command again
    assert "resuming the interrupted run after epoch 2 of 3" in capsys.readouterr().out
    assert resumed == full
    full_w, resumed_w = last_weights(tmp_path / "full"), last_weights(tmp_path / "resumed")
    assert full_w.keys() == resumed_w.keys() and all(torch.equal(full_w[k], resumed_w[k]) for k in full_w)
    assert (tmp_path / "full/log.jsonl").read_text() == (tmp_path / "resumed/log.jsonl").read_text()


def test_a_resume_point_written_on_a_gpu_is_read_on_a_cpu(demo_data, tmp_path, monkeypatch, capsys):
    """state.pt's tensors tagged cuda:0 (as a GPU run saves fused AdamW's state) load on a machine without one."""
    args = train_args(demo_data, tmp_path / "run", "--epochs", "1")
    monkeypatch.setattr(train, "final_test", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped after its last epoch, before the test fold
        train.main(args)
    monkeypatch.undo()
    st = torch.load(tmp_path / "run/state.pt", weights_only=True)
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(st, tmp_path / "run/state.pt")
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA"):  # what the reader faced before map_location
        torch.load(tmp_path / "run/state.pt", weights_only=True)
    with pytest.raises(UserError, match="training stopped at epoch 1 of 1"):
        C.check_finished(tmp_path / "run", 1)
    capsys.readouterr()
    train.main(args)
    assert "resuming the interrupted run after epoch 1 of 1" in capsys.readouterr().out
    assert C.finished(tmp_path / "run")


def test_a_finished_gpu_run_is_read_and_kept_on_a_cpu_in_its_stored_dtype(demo_data, tmp_path, monkeypatch, capsys):
    """A GPU run's config says cuda and fp16 (its default there): on a CPU its command again says the run is
    finished (an unfinished one with another dtype is refused), and scoring computes in the frozen weights'
    stored dtype instead of recasting them on every call under autocast."""
    out = tmp_path / "run"
    train.main(train_args(demo_data, out, "--epochs", "1"))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(cfg, device="cuda:3", dtype="fp16")))
    capsys.readouterr()
    train.main(train_args(demo_data, out, "--epochs", "1"))
    assert "this run is finished" in capsys.readouterr().out
    model, loaded = C.load_run(out, keep_checkpoint_dtype=True)
    assert loaded["device"] == "cpu" and loaded["dtype"] == "as stored"
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # a CPU-trained tiny run: fp32 as stored
    (out / "predictions.csv").unlink()  # unfinished now: resuming in another dtype would change the run
    with pytest.raises(UserError, match=r"other settings \(dtype 'fp16' there, 'fp32' now\)"):
        train.main(train_args(demo_data, out, "--epochs", "1"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [C.available(d) for d in ("cuda:3", "cuda:0", "cuda", "cpu")] == ["cuda", "cuda:0", "cuda", "cpu"]


def test_several_processes_with_cuda_graphs_are_refused(demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="reduce-overhead .* with several processes is untested"):
        train.main(train_args(demo_data, tmp_path / "run", "--compile", "reduce-overhead"))
    assert not (tmp_path / "run/state.pt").exists()


def test_a_kill_at_any_write_resumes_exactly(demo_data, tmp_path, monkeypatch):
    """Every file a run writes is replaced whole: failing each replace in turn (a kill there), then running
    the same command again, ends with the uninterrupted run's weights and figures."""
    args = ("--epochs", "2", "--adapter-dropout", "0.1")
    full = train.main(train_args(demo_data, tmp_path / "full", *args))
    real, calls = os.replace, []
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append(b) or real(a, b))
    train.main(train_args(demo_data, tmp_path / "count", *args))
    monkeypatch.undo()
    for k in range(len(calls)):
        run, seen = tmp_path / f"kill{k}", []

        def killed_at_k(a, b):
            seen.append(b)
            if len(seen) == k + 1:
                raise KeyboardInterrupt
            real(a, b)
        monkeypatch.setattr(os, "replace", killed_at_k)
        with pytest.raises((Interrupted, KeyboardInterrupt)):
            train.main(train_args(demo_data, run, *args))
        monkeypatch.undo()
        assert train.main(train_args(demo_data, run, *args)) == full, Path(calls[k]).name
        w, ref = last_weights(run), last_weights(tmp_path / "full")
        assert all(torch.equal(w[n], ref[n]) for n in ref), Path(calls[k]).name


def test_a_second_command_on_a_live_run_is_refused(demo_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))  # a live process holds the run
    with pytest.raises(UserError, match=r"run is in use by another train\.py \(process \d+\)"):
        train.main(train_args(demo_data, out, "--epochs", "1"))
    (out / ".lock").write_text("999999999")  # a dead one does not
    train.main(train_args(demo_data, out, "--epochs", "1"))
    assert C.finished(out) and not (out / ".lock").exists()


def test_a_run_folder_resumes_refuses_or_keeps_but_never_overwrites(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(demo_data, out, "--epochs", "1"))
    log = (out / "log.jsonl").read_text()
    with pytest.raises(UserError, match=r"run holds a run with other settings \(epochs 1 there, 2 now\): pass "
                                                r"another --out, or --restart to discard it"):
        train.main(train_args(demo_data, out, "--epochs", "2"))
    capsys.readouterr()
    again = train.main(train_args(demo_data, out, "--epochs", "1", "--threads", "2"))  # runtime flags may differ
    assert "this run is finished" in capsys.readouterr().out
    assert again == json.loads((out / "metrics.json").read_text())["metrics"]
    assert (out / "log.jsonl").read_text() == log
    train.main(train_args(demo_data, out, "--epochs", "2", "--restart"))
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    failed = tmp_path / "failed"  # a command that failed before its first epoch ended: nothing to keep
    failed.mkdir()
    cfg = json.loads((out / "config.json").read_text())
    (failed / "config.json").write_text(json.dumps(dict(cfg, out=str(failed), lr=-1.0, epochs=7)))
    (failed / "log.jsonl").write_text('{"epoch": 1, "loss": 9.9}\n')
    capsys.readouterr()
    train.main(train_args(demo_data, failed, "--epochs", "1"))
    assert "a run that never finished an epoch, with other settings (epochs, lr): started again" in \
        capsys.readouterr().out
    assert [json.loads(line)["loss"] != 9.9 for line in (failed / "log.jsonl").read_text().splitlines()] == [True]
    assert json.loads((failed / "config.json").read_text())["epochs"] == 1


def test_refused_runs_leave_no_folder_behind(demo_data, tmp_path):
    for flags, msg in [(["--fold", "6"], r"--fold 6: .* has folds \[1, 2, 3, 4, 5\]"),
                       (["--model", "full", "--clip", str(tmp_path / "nope.pt")], "nope.pt not found"),
                       (["--val-frac", "0.5", "--epochs", "1"], None)]:
        out = tmp_path / "out" / "fold"
        if msg is None:  # a validation split holding one class: checked before any training
            one = shutil.copytree(demo_data, tmp_path / "one_normal")
            rows = manifest(one)
            normal = next(r["patient"] for r in rows if r["label"] == "normal" and r["fold"] != "1")
            kept = [r for r in rows if r["label"] != "normal" or r["fold"] == "1" or r["patient"] == normal]
            (one / "manifest.csv").write_text("image,label,patient,fold\n" + "".join(
                f"{r['image']},{r['label']},{r['patient']},{r['fold']}\n" for r in kept))
            flags, msg = ["--data", str(one), *flags], r"split of fold 1 \(\d+ images\) has no images of normal"
        with pytest.raises(UserError, match=msg):
            train.main(train_args(demo_data, out, *flags))
        assert not (tmp_path / "out").exists()


def test_missing_checkpoint_gives_the_download_message(demo_data, tmp_path):
    with pytest.raises(UserError, match=r"nope/ViT-L-14\.pt not found: .*--model tiny runs on the demo"):
        train.main(["--data", str(demo_data), "--out", str(tmp_path), "--clip", "nope/ViT-L-14.pt", "--llama",
                    "nope/llama"])


def test_authors_code_flag_reproduces_their_choices(demo_data, tmp_path, capsys):
    out = tmp_path / "authors"
    train.main(train_args(demo_data, out, "--epochs", "2", "--authors-code"))
    assert "ON THE TEST FOLD" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["selected_on"] == "test"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm"] == "imagenet" and cfg["authors_code"]
    fresh = C.build(cfg)  # the same seed: the engine as initialised, which must not have moved
    trained, _ = C.load_run(out)
    assert all(torch.equal(a, b) for a, b in zip(fresh.engine.parameters(), trained.engine.parameters()))
    assert not torch.equal(fresh.proj.fc1.weight, trained.proj.fc1.weight)


def test_combined_ablation_flags_survive_the_run_and_the_reload(demo_data, tmp_path):
    tok = write_tokenizer(tmp_path / "tokenizer.model", 60)
    out = tmp_path / "run"
    flags = ["--question", QUESTION, "--tokenizer", str(tok), "--engine", "cocoop", "--cls-blocks", "2,4",
             "--no-vit-adapters"]
    train.main(train_args(demo_data, out, "--epochs", "1", *flags))
    cfg = json.loads((out / "config.json").read_text())
    model, _ = C.load_run(out)
    a = model.args
    assert (a.question_ids, a.engine, a.cls_blocks, a.vit_adapters) == (cfg["question_ids"], "cocoop", [2, 4], False)
    data = Data(demo_data)
    prob = C.predict(model, data.images(data.split(1, 0)["test"]), cfg)[:, 1]
    saved = [float(r["p_pneumoconiosis"]) for r in csv_rows(out / "predictions.csv")]
    np.testing.assert_allclose(prob, saved, atol=2e-6)


@pytest.mark.parametrize("kind", ["multi-label", "multi-class"])
def test_multilabel_and_multiclass_sets_prepare_train_evaluate_and_score_another_folder(demo_data, second_site,
                                                                                          tmp_path, kind, monkeypatch):
    """The demo again with a second finding on every other diseased film (multi-label: `a|b`) or a third
    class instead: prepared, trained, evaluated, and scored as an external folder with the decision at
    each finding's carried-over threshold (multi-label) or the argmax (multi-class)."""
    def relabelled(data, where):  # the prepared films of `data`, prepared again with the second finding or class
        src = where / "png"
        src.mkdir(parents=True)
        rows = []
        for r in manifest(data):
            name = Path(r["image"]).name
            shutil.copy(data / r["image"], src / name)
            second = len(rows) % 2 and r["label"] != "normal"
            label = (("pneumoconiosis | opacity" if kind == "multi-label" else "silicosis") if second else r["label"])
            rows.append((name, label, r["patient"]))
        return rows, *run_prepare(where, src, rows, "--crop", "none", header=("image", "label", "patient"))
    rows, rc, out = relabelled(demo_data, tmp_path)
    *_, other = relabelled(second_site, tmp_path / "other")
    meta = json.loads((out / "meta.json").read_text())
    ml = kind == "multi-label"
    assert rc == 0 and meta["multi_label"] == ml
    if ml:
        assert meta["classes"] == ["opacity", "pneumoconiosis"]
        assert {r["label"] for r in manifest(out)} == {"normal", "pneumoconiosis", "opacity|pneumoconiosis"}
        assert sum(c["opacity"] for c in meta["counts"].values()) == sum("opacity" in l for _, l, _ in rows)
    else:
        assert sorted(meta["classes"]) == ["normal", "pneumoconiosis", "silicosis"]
    m = train.main(train_args(out, tmp_path / "run/fold1", "--epochs", "2", "--val-frac", "0.2"))
    assert set(m) >= {"sensitivity", "specificity", "accuracy", "auc", "avg"}
    assert np.array(m["confusion"]).shape == ((2, 2, 2) if ml else (3, 3))
    pred = csv_rows(tmp_path / "run/fold1/predictions.csv")
    probs = np.array([[float(p[f"p_{c}"]) for c in meta["classes"]] for p in pred])
    assert np.allclose(probs.sum(1), 1) != ml  # sigmoids per finding, or a softmax
    assert ev.main(["--runs", str(tmp_path / "run"), "--fold", "1"]) == 0
    drawn = []
    monkeypatch.setattr(plots, "draw_roc", lambda path, curves, title, band, point: drawn.append((title, point)))
    assert external.main(["--runs", str(tmp_path / "run"), "--fold", "1", "--data", str(other)]) == 0
    folder, = (tmp_path / "run/fold1/eval").glob("external-out-*/*")
    scored, result = csv_rows(folder / "predictions.csv"), json.loads((folder / "eval.json").read_text())
    cuts = result["operating_point"]["thresholds"]
    if ml:  # a curve per finding, each with that finding's operating point
        assert len(drawn) == 2
        for name in meta["classes"]:
            at = result["operating_point"]["per_finding"][name]
            (title, (x, y, _)), = [d for d in drawn if f"P({name})" in d[0]]
            assert (x, y) == (1 - at["specificity"], at["sensitivity"])
            assert (folder / f"reliability-{name}.png").exists()
    else:  # each class against the rest, no cut (the argmax decides)
        assert len(drawn) == 3 and all(point is None and "against the rest" in title for title, point in drawn)
        assert sorted(p.name for p in folder.glob("reliability-*.png")) == [
            f"reliability-{c}.png" for c in sorted(meta["classes"])]
    assert [r["image"] for r in scored] == [Path(r["image"]).stem for r in manifest(other)]
    assert sorted(cuts) == (meta["classes"] if ml else [])
    for r in scored:  # (a score can sit on its cut: the CSV holds 6 decimals)
        p = {c: float(r[f"p_{c}"]) for c in meta["classes"]}
        if not any(abs(p[c] - cut) < 2e-6 for c, cut in cuts.items()):
            assert r["decision"] == ("|".join(c for c in meta["classes"] if p[c] >= cuts[c]) if ml else
                                     max(p, key=p.get))


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(demo_data, tmp_path):

    args = ["--epochs", "2", "--val-frac", "0.2", "--adapter-dropout", "0",  # dropout masks would differ per process
            "--lr", "3e-4"]  # the paper's step: the tiny models' 3e-3 would magnify the all-reduce's rounding
    one = train.main(train_args(demo_data, tmp_path / "one", *args))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py",
                          *train_args(demo_data, tmp_path / "two", *args)], cwd=Path(__file__).parent, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 processes share each batch of 16" in run.stdout
    a, b = last_weights(tmp_path / "one"), last_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # the all-reduce sums in another order; Adam magnifies that where gradients are small (the
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5, msg=k)  # engine's biases: 3e-5 measured)
    logs = [[json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [r.get("epoch") for r in logs[0]] == [r.get("epoch") for r in logs[1]]
    for r1, r2 in zip(*logs):
        assert abs(r1.get("loss", 0) - r2.get("loss", 0)) < 1e-5
    two = json.loads((tmp_path / "two/metrics.json").read_text())["metrics"]
    assert abs(one["auc"] - two["auc"]) < 1e-4 and one["confusion"] == two["confusion"]


@pytest.mark.slow
def test_compiled_training_step_is_one_graph_and_matches_eager():
    """`--compile` (and the CUDA graphs of reduce-overhead) want the whole model as one graph: a graph
    break fails here (fullgraph=True) instead of silently splitting it. ViT checkpointing included."""
    grads, logits = [], []
    for compiled in (False, True):
        model = tiny(adapter_dropout=0.0).train()
        perturb_adapters(model)
        model.visual.grad_checkpointing = True
        fwd = torch.compile(model, fullgraph=True) if compiled else model
        out = fwd(torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(5)))
        torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 1, 0])).backward()
        logits.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters()]))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    assert (grads[1] - grads[0]).norm() < 1e-4 * grads[0].norm() and grads[0].norm() > 0


# ==================================================================================================
# 5. eval.py: metrics against scikit-learn, operating point, calibration, intervals, baseline, probe


def test_binary_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    score = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.25, 200), 0, 1), 1)  # heavy ties
    prob = np.stack([1 - score, score], 1)
    m = M.metrics(y, prob)
    pred = prob.argmax(1)
    assert m["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, score), abs=1e-12)
    assert m["sensitivity"] == pytest.approx(sklearn_metrics.recall_score(y, pred, pos_label=1))
    assert m["specificity"] == pytest.approx(sklearn_metrics.recall_score(y, pred, pos_label=0))
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, pred))
    assert m["confusion"] == sklearn_metrics.confusion_matrix(y, pred).tolist()
    assert m["avg"] == pytest.approx(np.mean([m[k] for k in ("sensitivity", "specificity", "accuracy", "auc")]))
    fpr, tpr, thr = M.roc_curve(y, score)
    f2, t2, th2 = sklearn_metrics.roc_curve(y, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr, th2)
    assert M.roc_auc(np.array([0, 0, 1, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.5


@pytest.mark.parametrize("rows", [40, 400])  # fewer rows than features (N x N Newton steps), and more
def test_logistic_regression_is_scikit_learns(rows):
    """metrics.logistic, the baseline's and the audit's model: L2 logistic regression with an unpenalised
    bias, by Newton's method; its weights are scikit-learn's with C = 1 / l2 either way it solves a step."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 100))
    y = (x[:, :3].sum(1) + rng.normal(size=rows) > 0.5).astype(float)
    for l2 in (1.0, 30.0):
        ref = linear_model.LogisticRegression(C=1 / l2, tol=1e-12, max_iter=100_000).fit(x, y)
        np.testing.assert_allclose(M.logistic(x, y, l2), np.r_[ref.intercept_, ref.coef_[0]], atol=1e-5)


def test_multiclass_metrics_match_sklearn_macro():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[y]
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = M.metrics(y, prob)
    assert m["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert m["sensitivity"] == pytest.approx(sklearn_metrics.recall_score(y, prob.argmax(1), average="macro"))


def test_multilabel_metrics_match_sklearn_per_finding_macro():
    rng = np.random.default_rng(2)
    y = (rng.random((200, 3)) < [0.2, 0.5, 0.7]).astype(np.float32)
    prob = 1 / (1 + np.exp(-(rng.normal(size=(200, 3)) + 2 * y - 1)))
    m, pred = M.metrics(y, prob), prob > 0.5
    assert m["auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, prob, average="macro"))
    assert m["sensitivity"] == pytest.approx(sklearn_metrics.recall_score(y, pred, average="macro"))
    assert m["specificity"] == pytest.approx(sklearn_metrics.recall_score(1 - y, ~pred, average="macro"))
    assert m["accuracy"] == pytest.approx(1 - sklearn_metrics.hamming_loss(y, pred))
    assert m["avg"] == pytest.approx(np.mean([m[k] for k in ("sensitivity", "specificity", "accuracy", "auc")]))
    assert np.array(m["confusion"]).shape == (3, 2, 2)


def test_one_class_edge_cases_raise_clear_errors():
    with pytest.raises(ValueError, match="only one class"):
        M.roc_auc(np.ones(5), np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match=r"every class present; counts per class: \[0, 4\]"):
        M.metrics(np.ones(4, int), np.full((4, 2), 0.5))


def test_unfinished_runs_are_not_evaluated_and_the_table_names_missing_folds(demo_data, tmp_path, monkeypatch, capsys):
    train.main(train_args(demo_data, tmp_path / "fold1", "--epochs", "1"))
    real_save = train.Training.save

    def killed(self, out):
        real_save(self, out)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.Training, "save", killed)
    with pytest.raises(Interrupted):
        train.main(train_args(demo_data, tmp_path / "fold2", "--epochs", "3", "--fold", "2"))
    with pytest.raises(UserError, match=r"fold2: training stopped at epoch 1 of 3; run the same train\.py command"):
        ev.main(["--runs", str(tmp_path), "--fold", "2"])
    with pytest.raises(UserError, match=r"fold3: no run there; train it first"):
        score.main(["--runs", str(tmp_path), "--fold", "3", "--image", "x.png"])
    capsys.readouterr()
    assert ev.main(["--runs", str(tmp_path), "--all"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\| 1 \| [\d.]+ \|", out, re.M) and "not finished, left out: fold 2, 3, 4, 5" in out
    assert json.loads((tmp_path / "table/youden/table.json").read_text())["missing"] == [2, 3, 4, 5]


def test_no_operating_point_calls_every_image_negative_and_chance_is_said(tmp_path):
    # Youden's J by hand over the cut-offs 0.9, 0.8, 0.2, 0.1: -0.5, -1, -0.5, 0; above them all (nobody positive): 0
    assert M.choose_threshold([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) == 0.1
    (tmp_path / "val_predictions.csv").write_text("image,label,p_normal,p_sick\n" + "".join(
        f"i{i},{'sick' if i % 2 else 'normal'},{1 - p},{p}\n" for i, p in enumerate([0.9, 0.1, 0.8, 0.2])))
    point = runs.operating_point(tmp_path, dict(classes=["normal", "sick"], multi_label=False, select="val",
                                                    val_frac=0.1))
    assert point["thresholds"] == {"sick": 0.1} and "WARNING: no cut-off beats chance there for sick (J 0.00)" in \
        point["rule"]


def test_operating_point_is_chosen_on_validation_and_applied_to_test(demo_data, tmp_path, monkeypatch, capsys):
    train.main(train_args(demo_data, tmp_path / "fold1", "--epochs", "8", "--lr", "3e-3"))
    seen, real = [], M.choose_threshold
    monkeypatch.setattr(M, "choose_threshold", lambda y, s, sens=None: seen.append(np.asarray(y)) or real(y, s, sens))
    ev.main(["--runs", str(tmp_path), "--fold", "1"])
    val = [r["label"] == "pneumoconiosis" for r in csv_rows(tmp_path / "fold1/val_predictions.csv")]
    assert len(seen) == 1 and seen[0].tolist() == val  # the validation labels, never the test fold's
    out = json.loads((tmp_path / "fold1/eval/youden/eval.json").read_text())
    t = json.loads((tmp_path / "fold1/eval/operating_point.json").read_text())["thresholds"]["pneumoconiosis"]
    pred = csv_rows(tmp_path / "fold1/predictions.csv")
    y = np.array([r["label"] == "pneumoconiosis" for r in pred])
    p = np.array([float(r["p_pneumoconiosis"]) for r in pred])
    tp, fp, fn, tn = (y & (p >= t)).sum(), (~y & (p >= t)).sum(), (y & (p < t)).sum(), (~y & (p < t)).sum()
    got = out["operating_point"]["per_finding"]["pneumoconiosis"]
    assert got["sensitivity"] == pytest.approx(tp / (tp + fn)) and got["specificity"] == pytest.approx(tn / (tn + fp))
    assert got["ppv"] == pytest.approx(tp / (tp + fp), nan_ok=True) and got["npv"] == pytest.approx(tn / (tn + fn),
                                                                                                    nan_ok=True)
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    yv = np.array(val)
    pv = np.array([float(r["p_pneumoconiosis"]) for r in csv_rows(tmp_path / "fold1/val_predictions.csv")])
    youden = max(((pv[yv] >= c).mean() + (pv[~yv] < c).mean() - 1, c) for c in np.unique(pv))  # by hand, over cut-offs
    assert (pv[yv] >= t).mean() + (pv[~yv] < t).mean() - 1 == pytest.approx(youden[0])
    ev.main(["--runs", str(tmp_path), "--fold", "1", "--sensitivity", "0.9"])
    t90 = json.loads((tmp_path / "fold1/eval/operating_point.json").read_text())["thresholds"]["pneumoconiosis"]
    assert (pv[yv] >= t90).mean() >= 0.9 and not any((pv[yv] >= c).mean() >= 0.9 for c in np.unique(pv) if c > t90)
    for name in ("roc.png", "reliability.png"):
        assert loaded_image(tmp_path / "fold1/eval/sensitivity-0.9" / name).size == (500, 500)


def test_calibration_figures_by_hand():
    y = np.array([0, 1, 1, 1, 0])
    p1 = np.array([0.13, 0.14, 0.15, 0.8, 0.6])
    prob = np.stack([1 - p1, p1], 1)
    cal = M.calibration(y, prob, False)
    assert cal["brier"] == pytest.approx((0.13 ** 2 + 0.86 ** 2 + 0.85 ** 2 + 0.2 ** 2 + 0.6 ** 2) / 5)
    # bins of width 1/15: 0.13 in bin 1, {0.14, 0.15} in bin 2 (mean 0.145, both positive), 0.6 in 9, 0.8 in 12
    assert cal["ece"] == pytest.approx((0.13 + 2 * abs(0.145 - 1) + 0.6 + 0.2) / 5)
    softened = M.with_temperature(np.array([[0.2, 0.8]]), 2.0, False)[0, 1]
    assert softened == pytest.approx(0.8 ** 0.5 / (0.2 ** 0.5 + 0.8 ** 0.5))
    rng = np.random.default_rng(0)  # outcomes drawn from calibrated logits z, scores from 2 z: T = 2 undoes it
    z = rng.normal(0, 2, 4000)
    yy = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    sharp = 1 / (1 + np.exp(-2 * z))
    t = M.fit_temperature(yy, np.stack([1 - sharp, sharp], 1), False)
    assert 1.7 < t < 2.3


def test_bootstrap_resamples_patients_not_images():
    patients = ["a", "a", "a", "b", "c", "c", "d", "e", "e", "f"]
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1, 1, 0])
    groups = {p: [i for i, q in enumerate(patients) if q == p] for p in set(patients)}
    sizes = set()
    for idx in M.resamples(patients, y, 2, n=200):
        counts = np.bincount(idx, minlength=len(y))
        for p, members in groups.items():  # a drawn patient brings all its images, as often as it is drawn
            assert len(set(counts[members])) == 1, p
        assert sum(counts[m[0]] for m in groups.values()) == len(groups)  # as many patients as there are
        sizes.add(len(idx))
    assert len(sizes) > 3  # so the number of images varies
    renamed = [{"a": "z", "b": "y", "c": "x", "d": "w", "e": "v", "f": "u"}[p] for p in patients]  # another key
    assert all(np.array_equal(i, j) for i, j in zip(M.resamples(patients, y, 2, n=50), M.resamples(renamed, y, 2, n=50)))
    with pytest.raises(ValueError, match="lack a class"):  # no class 1 at all: never a hang
        M.resamples(patients, np.zeros(10, int), 2, n=10)


def test_baseline_is_trained_on_the_training_patients_only(demo_data, tmp_path, monkeypatch):
    train.main(train_args(demo_data, tmp_path / "fold2", "--epochs", "1", "--fold", "2"))
    trained_on, real = [], report.fit_logistic
    monkeypatch.setattr(report, "fit_logistic", lambda x, y, *a: trained_on.append(x) or real(x, y, *a))
    seen, real_pixels = [], report.pixels
    monkeypatch.setattr(report, "pixels", lambda data, rows: seen.append(rows) or real_pixels(data, rows))
    ev.main(["--runs", str(tmp_path), "--fold", "2"])
    split = Data(demo_data).split(2, 0.1, 20)
    assert [r["image"] for r in seen[0]] == [r["image"] for r in split["train"]]  # what the fits saw
    assert all(x.shape == (len(split["train"]), 32 * 32) for x in trained_on) and len(trained_on) == 3
    assert {r["fold"] for r in seen[0]} == {"1", "3", "4", "5"}
    out = json.loads((tmp_path / "fold2/eval/youden/eval.json").read_text())["baseline"]
    assert out["verdict"].startswith("the model ")


@needs_data
def test_baseline_is_scikit_learns_logistic_regression_with_l2_chosen_on_validation(demo_data, demo_runs, nih_subset):
    """The baseline: logistic regression on the standardised 32x32 pixels of the run's training split, with
    the L2 strength (1, 30 or 1000) whose validation AUC is highest: scikit-learn's with C = 1 / l2. Every
    fold's split of the demo and of 240 NIH films; at least one of them must make the choice matter (on the
    demo, where the pixels see the disease, every strength can tie)."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    run, choices = json.loads((demo_runs / "fold1/config.json").read_text()), []
    nih = dict(run, data=str(nih_subset), classes=["0", "1"], data_fingerprint=Data(nih_subset).meta["fingerprint"])
    for fold, cfg in [(f, dict(run, fold=f)) for f in Data(demo_data).folds] + [(1, dict(nih, fold=1))]:
        data = Data(cfg["data"])
        split = data.run_split(cfg)
        x = {k: report.pixels(data, split[k]) for k in ("train", "val", "test")}
        y = {k: data.labels(split[k]) for k in x}
        mean, std = x["train"].mean(0), x["train"].std(0) + 1e-6
        z = {k: ((v - mean) / std).astype(np.float64) for k, v in x.items()}
        fits = {l2: linear_model.LogisticRegression(C=1 / l2, tol=1e-9, max_iter=10_000).fit(z["train"], y["train"])
                for l2 in (1.0, 30.0, 1000.0)}
        val = {l2: sklearn_metrics.roc_auc_score(y["val"], f.predict_proba(z["val"])[:, 1]) for l2, f in fits.items()}
        ours = report.baseline(cfg, [dict(image=Path(r["image"]).stem) for r in split["test"]])
        best = max(val, key=lambda l2: round(val[l2], 12))  # the first of equals (to rounding), as the code takes it
        np.testing.assert_allclose(ours[:, 1], fits[best].predict_proba(z["test"])[:, 1], atol=1e-4, err_msg=str(fold))
        choices.append(len(set(np.round(list(val.values()), 9))) > 1 and best != 1.0)
    assert any(choices)


MARKS = dict(apex=(10, 32), lung=(112, 56))  # (top, left) of a 14 px square, 224 px crop


@pytest.fixture(scope="module")
def nih_subset(tmp_path_factory):
    """240 NIH films (the first 120 of each class), prepared as a user would."""
    tmp = tmp_path_factory.mktemp("nih")
    src = Path(SHARED, "nih_cxr_pneumonia")
    rows = csv_rows(src / "labels.csv")
    chosen = [r for r in rows if r["label"] == "0"][:120] + [r for r in rows if r["label"] == "1"][:120]
    rc, out = run_prepare(tmp, src, [(r["image"], r["label"], r["patient_id"]) for r in chosen],
                          header=("image", "label", "patient_id"))
    assert rc == 0
    return out


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("where", list(MARKS))
def test_the_probe_finds_a_mark_outside_the_lungs_on_real_films(nih_subset, tmp_path, capsys, monkeypatch, where):
    """Real NIH films of both classes; every pneumonia film carries a small bright square (14 px of the 224
    px crop) (a) over the right shoulder above the apex: just outside the lungs, inside the 81 % rectangle
    the probe used to hide (a mark in a corner, farther out, is the easier case), or (b) inside the right
    lung. The tiny model learns it (train.py, fold 1, lr 6e-3, the last of 20 epochs: 20 validation images
    choose an epoch too noisily here; 15 epochs are too few). --probe's 8 x 8 occlusion grid finds the
    marked cell; (a) raises the alarm with the lung fields grown or shrunk alike, (b) is not blamed on the
    outside. What the probe hides as the lung fields is, pixel for pixel, lungcrop.lung_fields of the
    manifest's region."""
    data = shutil.copytree(nih_subset, tmp_path / "data")
    (top, left), cell = MARKS[where], 28
    for r in manifest(data):
        if r["label"] == "1":
            img = np.array(loaded_image(data / r["image"]))
            img[top:top + 14, left:left + 14] = 255
            Image.fromarray(img).save(data / r["image"])
    m = train.main(train_args(data, tmp_path / "runs/fold1", "--epochs", "20", "--lr", "6e-3", "--select", "last"))
    assert m["auc"] > 0.9
    seen, predict = [], C.predict
    monkeypatch.setattr(C, "predict", lambda model, x, *a, **k: seen.append(np.array(x)) or predict(model, x, *a, **k))
    capsys.readouterr()
    assert PB.main(["--runs", str(tmp_path / "runs"), "--fold", "1"]) == 0
    out, probe = capsys.readouterr().out, json.loads((tmp_path / "runs/fold1/eval/probe/youden/probe.json").read_text())
    occ = probe["occlusion"]
    r, c = (top + 7) // cell, (left + 7) // cell
    assert occ["significant"][r][c] and occ["drop"][r][c] == max(max(row) for row in occ["drop"])
    outside = {g: o[r][c] for g, o in occ["outside"].items()}
    if where == "lung":
        assert max(outside.values()) < 0.5 and "the model reads something outside the lungs" not in out
    else:
        assert min(outside.values()) >= 0.5 and "the model reads something outside the lungs" in out
        assert f"row {r + 1} col {c + 1}" in out and occ["outside_share_of_drop"]["0.0"] > 0.5
    rows = [by for by in manifest(data) if by["fold"] == "1"]
    images = np.stack([np.array(loaded_image(data / x["image"])) for x in rows])
    fields = np.stack([lungcrop.lung_fields([float(v) for v in x["lungs"].split()], 224) for x in rows])
    mean = np.broadcast_to(images.mean(0).round().astype(np.uint8), images.shape)  # the fill: the films' mean
    hidden = next(x for x in seen if len(x) == len(rows) and (x[:, 0] != images).any() and
                  ((x[:, 0] == mean) | (x[:, 0] == images)).all() and (x[:, 0][fields] == mean[fields]).all())
    np.testing.assert_array_equal(hidden[:, 0], np.where(fields, mean, images))
    assert probe["lung_fields"]["share_of_crop"] == pytest.approx(fields.mean())
    assert (tmp_path / "runs/fold1/eval/probe/youden/probe.png").exists()
    if where == "lung":  # the rest of what a user runs next on a trained fold
        assert ev.main(["--runs", str(tmp_path / "runs"), "--fold", "1"]) == 0
        assert (tmp_path / "runs/fold1/eval/youden/roc.png").exists()
        assert score.main(["--runs", str(tmp_path / "runs"), "--fold", "1", "--image", os.path.join(DICOM,
                                                                                                 "RG1_UNCR.dcm")]) == 0
        assert re.search(r"RG1_UNCR\.dcm: P\(1\) = [01]\.\d{3}, (positive|negative) at the run's threshold",
                         capsys.readouterr().out)


def test_a_masks_run_is_probed_with_its_own_masks(demo_data, tmp_path, capsys, monkeypatch):
    """prepare.py --masks (here each demo film's lung box, drawn as a mask), a run, then --probe: the lung
    fields it hides are the masks prepare.py wrote into the crops (masks/<id>.png), pixel for pixel, and
    the output names them as masks, not as the approximate ellipses."""
    dicoms, truth = demo_data.parent / "dicom", np.load(demo_data.parent / "dicom/truth.npz")
    (tmp_path / "masks").mkdir()
    for name, (x0, y0, x1, y1) in zip(truth["names"], truth["lung_boxes"]):
        shape = pydicom.dcmread(dicoms / name).pixel_array.shape
        mask = np.zeros(shape, np.uint8)
        mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / (Path(name).stem + ".png"))
    data = tmp_path / "data"
    assert prepare.main(["--images", str(dicoms), "--labels", str(dicoms / "labels.csv"), "--out", str(data),
                         "--masks", str(tmp_path / "masks"), "--key-file", str(tmp_path / "key"),
                         "--workers", "2"]) == 0
    train.main(train_args(data, tmp_path / "runs/fold1", "--epochs", "1"))
    seen, predict = [], C.predict
    monkeypatch.setattr(C, "predict", lambda model, x, *a, **k: seen.append(np.array(x)) or predict(model, x, *a, **k))
    capsys.readouterr()
    assert PB.main(["--runs", str(tmp_path / "runs"), "--fold", "1"]) == 0
    probe = json.loads((tmp_path / "runs/fold1/eval/probe/youden/probe.json").read_text())
    rows = [r for r in manifest(data) if r["fold"] == "1"]
    masks = np.stack([np.array(loaded_image(data / "masks" / Path(r["image"]).name)) > 127 for r in rows])
    images = np.stack([np.array(loaded_image(data / r["reference"])) for r in rows])
    assert probe["lung_fields"]["what"] == "the lung masks"
    assert probe["intervals"] == "95 %, 2000 resamples of patients"  # what the probe draws (Holm needs p < 1/64/20)
    assert "lung fields (the lung masks;" in capsys.readouterr().out
    assert probe["lung_fields"]["share_of_crop"] == pytest.approx(masks.mean())
    crops = np.stack([np.array(loaded_image(data / r["image"])) for r in rows])
    mean = crops.mean(0).round().astype(np.uint8)  # what hides a place: the films' mean there
    assert any(len(x) == len(rows) and np.array_equal(x[:, 0], np.where(masks, mean, crops)) for x in seen)
    assert "reference framing" in probe and images.shape == crops.shape


def test_the_probe_verdict_alarms_only_when_every_variant_agrees_and_reads_intervals_both_ways():
    """probe_verdict on hand-made figures: a significant cell outside the lung fields under every growth is
    the alarm, under some only is "inconclusive", under none is quiet only if the lung fields hidden whole
    hold chance; an interval above or below it (a score that ranks backwards still reads the classes) is
    a signal spread outside them."""
    def out(outside, hidden):
        grid = np.zeros((8, 8), bool)
        grid[0, 1] = True
        occ = dict(grid=8, cell_px=28, auc=0.9, significant=grid.tolist(), outside_share_of_drop={"0.0": 0.7},
                   outside={g: np.full((8, 8), v).tolist() for g, v in zip(("-0.03", "0.0", "0.03"), outside)})
        return {"occlusion": occ, "lung_fields": dict(what="approximate: two ellipses", share_of_crop=0.35),
                "lung fields hidden": dict(auc=float(np.mean(hidden)), auc_ci95=list(hidden))}
    y, draws = np.array([0, 1]), []
    alarm = PB.probe_verdict(out((0.9, 0.8, 0.6), (0.4, 0.6)), y, {}, draws)
    assert "the model reads something outside the lungs" in alarm[0] and "cells row 1 col 2" in alarm[0]
    assert "holds chance" in alarm[1]
    assert "inconclusive" in PB.probe_verdict(out((0.9, 0.6, 0.3), (0.4, 0.6)), y, {}, draws)[0]
    assert "inconclusive" in PB.probe_verdict(out((0.6, 0.4, 0.2), (0.4, 0.6)), y, {}, draws)[0]  # shrunk alone
    quiet = PB.probe_verdict(out((0.2, 0.1, 0.0), (0.4, 0.6)), y, {}, draws)
    assert "no sign that the model reads anything outside the lungs" in quiet[0] and "holds chance" in quiet[1]
    for hidden in ((0.2, 0.4), (0.6, 0.8)):  # no single cell, but the lungs hidden whole leave the classes apart
        spread = PB.probe_verdict(out((0.2, 0.1, 0.0), hidden), y, {}, draws)  # (below chance: read backwards)
        assert "reads something outside the lung fields spread over many cells" in spread[0]
        assert "still separates the classes without them" in spread[1]


@needs_data
def test_the_approximate_lung_fields_lie_in_the_hand_outlined_lungs():
    """The probe's lung fields without masks (two ellipses, 35 % of the thorax crop): on the 20 hand-outlined
    NIH films, at least 65 % of their area lies in the outlined lungs' box on every film and 85 % on
    average (measured: 67-100 %, mean 89 %); grown and shrunk by 3 % of the crop they cover 43 % and 26 %.
    Another crop's region carries them along; a mask (--masks) is used as it is, grown by whole pixels."""
    fields = lungcrop.lung_fields(lungcrop.LUNG_REGION, 224)
    assert fields.mean() == pytest.approx(0.351, abs=0.002)
    yy, xx = (np.mgrid[:224, :224] + 0.5) / 224
    shares = []
    for r in _csv.DictReader(NIH_LUNGS.splitlines()):
        b = lungcrop.thorax_box((512, 512))
        x0, y0, x1, y1 = ((int(r[k]) - b[i % 2]) / (b[2 + i % 2] - b[i % 2])
                          for i, k in enumerate(("left", "top", "right", "bottom")))
        box = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        shares.append((fields & box).sum() / fields.sum())
    assert min(shares) >= 0.65 and np.mean(shares) >= 0.85
    for grow, share in ((0.03, 0.435), (-0.03, 0.264)):
        assert lungcrop.lung_fields(lungcrop.LUNG_REGION, 224, grow).mean() == pytest.approx(share, abs=0.002)
    # another crop's region carries the ellipses with it: the whole film ("none"), by hand
    region = (0.1, 0.2, 0.7, 0.8)  # x0, y0, x1, y1
    moved = lungcrop.lung_fields(region, 224)
    sx = sy = 0.6 / 0.9
    cx, cy = 0.1 + (0.32 - 0.05) * sx, 0.2 + (0.44 - 0.03) * sy
    inside = ((xx - cx) / (0.18 * sx)) ** 2 + ((yy - cy) / (0.31 * sy)) ** 2 <= 1
    assert (moved & inside).sum() == inside.sum() and moved.mean() == pytest.approx(0.351 * sx * sy, abs=0.002)
    mask = np.zeros((224, 224), bool)  # a mask (--masks) as it is, grown and shrunk by 3 % of 224 px: 7 px
    mask[100:140, 50:90] = True
    assert np.array_equal(lungcrop.lung_fields(region, 224, 0.0, mask), mask)
    for grow, side in ((0.03, 54), (-0.03, 26)):
        assert lungcrop.lung_fields(region, 224, grow, mask).sum() == side**2


@pytest.mark.parametrize("script, flags, msg", [
    (ev, ["--image", "x.png"], "eval.py --image moved to python score.py"),
    (ev, ["--probe"], "eval.py --probe moved to python probe.py"),
    (ev, ["--data", "d", "--ensemble"], "eval.py --data moved to python external.py (probe.py --data for the probe)"),
    (ev, ["--csv=f.csv"], "eval.py --csv moved to python score.py"),
    (ev, ["--all", "--explain"], "--explain maps one fold's test images; it cannot go with --all"),
    (ev, ["--calibrate", "--explain", "3"], "it cannot go with --calibrate"),
    (PB, ["--classes", "a=b"], "--classes maps the label names of --data; give --data DIR"),
    (score, ["--image", "x.png", "--explain-dir", "maps"], "--explain-dir says where --explain writes"),
])
def test_a_moved_or_ignored_flag_is_refused_in_one_line_naming_where_it_went(tmp_path, script, flags, msg):
    """eval.py's old flags name the script they moved to; the few flags a script would ignore are refused;
    all before any run is read (the runs folder here does not exist)."""
    with pytest.raises(UserError, match=re.escape(msg)):
        script.main(["--runs", str(tmp_path / "none"), *flags])


def test_resampled_aucs_at_once_equal_scikit_learns_weighted_auc():
    """M.roc_auc_weighted (the probe's 4,000 resamples at once) against scikit-learn's roc_auc_score with
    each image weighted by how often a resample draws it; scores with ties, patients with several films."""
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 40), rng.integers(0, 8, 40) / 8  # ties on purpose
    draws = M.resamples(rng.integers(0, 15, 40), y, 2, n=50)
    weights = np.stack([np.bincount(i, minlength=40) for i in draws])
    want = [sklearn_metrics.roc_auc_score(y, s, sample_weight=w) for w in weights]
    np.testing.assert_allclose(M.roc_auc_weighted(y, s, weights), want, rtol=1e-12)


def test_one_rule_calls_a_class_at_the_operating_point():
    """eval.calls, behind every decision eval.py prints or writes: P >= the class's threshold is called (the
    cut itself included), a class without a threshold never is; decision() reads it (binary: the negative
    class when nothing is called; multi-label: the findings called; multi-class: the argmax)."""
    binary, point = dict(classes=["normal", "sick"], multi_label=False), dict(thresholds={"sick": 0.3})
    assert runs.calls(np.array([[0.7, 0.3], [0.71, 0.29]]), binary, point).tolist() == [[False, True], [False, False]]
    assert [runs.decision(p, binary, point) for p in ([0.7, 0.3], [0.8, 0.2])] == ["sick", "normal"]
    multi = dict(classes=["a", "b", "c"], multi_label=True)
    assert runs.decision(np.array([0.9, 0.1, 0.5]), multi, dict(thresholds={"a": 0.5, "b": 0.05, "c": 0.6})) == "a|b"
    many = dict(classes=["a", "b", "c"], multi_label=False)
    assert runs.decision(np.array([0.2, 0.5, 0.3]), many, dict(thresholds={})) == "b"


def test_holms_test_rejects_step_down_by_hand():
    """Holm at 5 %: sorted p-values against 0.05/4, 0.05/3, 0.05/2, 0.05/1, stopping at the first that fails
    (by hand: 0.005 <= 0.0125, 0.01 <= 0.0167, 0.03 > 0.025: stop, so 0.04 is kept though <= 0.05)."""
    assert M.holm(np.array([0.01, 0.04, 0.03, 0.005])).tolist() == [True, False, False, True]
    assert M.holm(np.array([0.0005] * 64)).all() and not M.holm(np.array([0.001] + [0.9] * 63)).any()  # 0.05/64 = 0.00078


def test_the_probe_stays_quiet_on_the_clean_demo(demo_data, tmp_path, capsys):
    train.main(train_args(demo_data, tmp_path / "fold1", "--epochs", "3"))
    capsys.readouterr()
    assert PB.main(["--runs", str(tmp_path), "--fold", "1"]) == 0
    assert "no sign that the model reads anything outside the lungs" in capsys.readouterr().out


@pytest.fixture(scope="module")
def second_site(tmp_path_factory) -> Path:  # another demo site: other patients (another seed), prepared once
    d = tmp_path_factory.mktemp("second_site")
    labels = demo.write_demo(d / "site_dicom", n_patients=16, seed=7)
    assert prepare.main(["--images", str(d / "site_dicom"), "--labels", str(labels), "--out", str(d / "site"),
                         "--key-file", str(d / "key"), "--workers", "2"]) == 0
    return d / "site"


def test_external_validation_scores_every_image_with_the_runs_own_operating_point(demo_data, demo_runs, second_site,
                                                                                    tmp_path, monkeypatch, capsys):
    """--data: one row per prepared image; --ensemble is the mean of the folds' probabilities (by hand); the
    cut is chosen on the runs' validation labels only; batched scoring equals one image at a time; another
    label set is refused unless --classes maps it."""
    shutil.copytree(demo_runs, tmp_path, dirs_exist_ok=True)  # its own copy: the outputs land in the runs folder
    site = second_site
    chosen, real = [], M.choose_threshold
    monkeypatch.setattr(M, "choose_threshold", lambda y, s, *a: chosen.append(np.asarray(y)) or real(y, s, *a))
    drawn, resamples = [], M.resamples
    monkeypatch.setattr(M, "resamples", lambda p, *a, **k: drawn.append((list(p), resamples(p, *a, **k)))
                        or drawn[-1][1])
    assert external.main(["--runs", str(tmp_path), "--data", str(site), "--ensemble"]) == 0
    folder, = (tmp_path / "ensemble").glob("external-site-*/*")
    rows = csv_rows(folder / "predictions.csv")
    patients, draws = drawn[0]  # the intervals resample patients, each with all of its films
    assert patients == [r["patient"] for r in rows] and len(set(patients)) < len(patients)
    films = {p: [i for i, q in enumerate(patients) if q == p] for p in set(patients)}
    for draw in draws[:100]:
        count = collections.Counter(draw.tolist())
        for p, own in films.items():
            assert len({count[i] for i in own}) == 1, p  # a patient's films are drawn together, or not at all
    data = Data(site)
    assert [r["image"] for r in rows] == [Path(r["image"]).stem for r in data.rows]  # every prepared image, once
    images, by_hand = data.images(data.rows), []
    for f in (1, 2):
        model, cfg = C.load_run(tmp_path / f"fold{f}", keep_checkpoint_dtype=True)
        batched = C.predict(model, images, cfg)
        one_by_one = np.concatenate([C.predict(model, images[i:i + 1], cfg) for i in range(20)])
        np.testing.assert_allclose(batched[:20], one_by_one, atol=1e-5)
        by_hand.append(batched)
    np.testing.assert_allclose([float(r["p_pneumoconiosis"]) for r in rows], np.mean(by_hand, 0)[:, 1], atol=2e-6)
    val = np.concatenate([runs.read_predictions(tmp_path / f"fold{f}/val_predictions.csv", cfg)[1] for f in (1, 2)])
    assert len(chosen) == 1 and np.array_equal(chosen[0], val)  # the validation labels, never the external ones
    result = json.loads((folder / "eval.json").read_text())
    cut = result["operating_point"]["thresholds"]["pneumoconiosis"]
    assert set(result["shift"]) == {*audit.CATEGORICAL, *audit.NUMERIC, audit.CONTENT}  # every attribute audited
    assert isinstance(result["shift"]["bytes_per_pixel"]["data"], float) and "Explicit VR Little Endian" in str(result["shift"]["encoding"])
    assert all(r["decision"] == ("pneumoconiosis" if float(r["p_pneumoconiosis"]) >= cut else "normal") for r in rows)
    other = tmp_path / "renamed"
    shutil.copytree(site, other)
    manifest_text = (other / "manifest.csv").read_text()
    (other / "manifest.csv").write_text(manifest_text.replace(",normal,", ",healthy,"))
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(dict(meta, classes=["healthy", "pneumoconiosis"])))
    with pytest.raises(UserError, match=r"labels \['healthy', 'pneumoconiosis'\], the run \['normal', "
                                        r"'pneumoconiosis'\]"):
        external.main(["--runs", str(tmp_path), "--data", str(other)])
    capsys.readouterr()
    assert external.main(["--runs", str(tmp_path), "--data", str(other), "--classes", "healthy=normal"]) == 0
    command = re.search(r"where the model reads on these films .*: python probe\.py (.*)", capsys.readouterr().out)
    assert PB.main(shlex.split(command[1])) == 0  # the command it prints runs the probe on the same folder
    probed, = (tmp_path / "fold1/eval").glob("probe-renamed-*/youden/probe.json")  # on every film of the other folder
    assert json.loads(probed.read_text())["images"] == len(rows)


def test_external_validation_refuses_the_runs_own_films_and_warns_when_it_should(demo_data, demo_runs, second_site,
                                                                                tmp_path, capsys):
    """--data on the run's own films is refused, by pixels (under other label names too); a folder where
    some films are the run's own scores the rest and says how many it left out; a --classes mapping is
    recorded and kept apart from the unmapped result; an AUC interval below 0.5 and a cut-off calling
    95 % of the films one way are warned about, beside the run's own test fold."""
    runs, n = shutil.copytree(demo_runs, tmp_path / "runs"), len(Data(demo_data).rows)
    with pytest.raises(UserError, match=rf"all {n} films are the run's own \(the same pixels as in"):
        external.main(["--runs", str(runs), "--data", str(demo_data)])
    renamed = shutil.copytree(demo_data, tmp_path / "renamed")
    (renamed / "manifest.csv").write_text((renamed / "manifest.csv").read_text().replace(",normal,", ",healthy,"))
    meta = json.loads((renamed / "meta.json").read_text())
    (renamed / "meta.json").write_text(json.dumps(dict(meta, classes=["healthy", "pneumoconiosis"])))
    with pytest.raises(UserError, match="films are the run's own"):
        external.main(["--runs", str(runs), "--data", str(renamed), "--classes", "healthy=normal"])
    with pytest.raises(UserError, match=rf"all {n} films are the run's own .* eval.py and probe.py score"):
        PB.main(["--runs", str(runs), "--fold", "1", "--data", str(demo_data)])
    mixed = shutil.copytree(second_site, tmp_path / "mixed")
    theirs, ours = manifest(mixed), manifest(demo_data)
    for a, b in zip(theirs[:3], ours[:3]):  # three of the run's films among the other site's
        shutil.copy(demo_data / b["image"], mixed / a["image"])
    capsys.readouterr()
    assert external.main(["--runs", str(runs), "--data", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: 3 of {len(theirs)} films of {mixed} are the run's own" in out
    assert "beside the run's own test fold: Brier" in out and "% of these films (test fold" in out
    folder, = (runs / "fold1/eval").glob("external-mixed-*/*")
    kept = [r["image"] for r in csv_rows(folder / "predictions.csv")]
    assert kept == [Path(r["image"]).stem for r in theirs[3:]]
    flipped = "normal=pneumoconiosis,pneumoconiosis=normal"
    assert external.main(["--runs", str(runs), "--data", str(mixed), "--classes", flipped]) == 0
    apart = [p for p in (runs / "fold1/eval").glob("external-mixed-*/*") if p != folder]
    assert len(apart) == 1 and json.loads((apart[0] / "eval.json").read_text())["classes_mapping"] == flipped
    assert json.loads((folder / "eval.json").read_text())["classes_mapping"] is None
    cfg = json.loads((runs / "fold1/config.json").read_text())
    y = np.array([0, 1] * 20)
    backwards = np.stack([y * 0.5 + 0.3, 0.7 - y * 0.5], 1)  # every diseased film below every normal one
    point = dict(thresholds={"pneumoconiosis": 0.1})  # calls all 40 films positive
    def figures(auc, ci, base, base_ci):
        return dict(paper=dict(metrics=dict(auc=auc), ci95=dict(auc=ci)), baseline=dict(auc=base, auc_ci95=base_ci))
    lines = external.beside_the_run(figures(0.0, [0.0, 0.0], 0.3, [0.2, 0.4]), runs / "fold1", cfg, y, backwards, point)
    assert any(x.startswith("WARNING: the carried-over cut-off calls 100.0 % of these films positive") for x in lines)
    assert any(x.startswith("WARNING: the AUC's interval [0.0, 0.0] lies below 0.5") for x in lines)
    assert any(x.startswith("WARNING: the pixel baseline's AUC interval [20.0, 40.0] lies below 0.5") for x in lines)
    said = external.beside_the_run(figures(0.45, [0.3, 0.6], 0.482, [0.4, 0.56]), runs / "fold1", cfg, y, backwards[:, ::-1],
                             dict(thresholds={"pneumoconiosis": 0.5}))
    assert any(x.startswith("NOTE: the AUC 45.0 is below 0.5") and "--classes mapping" in x for x in said)
    assert any(x.startswith("NOTE: the pixel baseline's AUC 48.2 is below 0.5") for x in said)
    calm = external.beside_the_run(figures(0.6, [0.4, 0.7], 0.6, [0.5, 0.7]), runs / "fold1", cfg, y, backwards[:, ::-1],
                             dict(thresholds={"pneumoconiosis": 0.5}))
    assert not any("WARNING" in x or "NOTE" in x for x in calm)


def test_image_scores_a_folder_in_batches_into_a_csv_without_file_names(demo_data, demo_runs, tmp_path, capsys):
    shutil.copytree(demo_runs / "fold1", tmp_path / "fold1")
    folder = tmp_path / "new"
    folder.mkdir()
    for i, r in enumerate(manifest(demo_data)[:12]):
        shutil.copy(demo_data / r["image"], folder / f"DOE_JANE_{i:02d}.png")  # names that name a patient
    (folder / "notes.txt").write_text("not an image")
    capsys.readouterr()
    assert score.main(["--runs", str(tmp_path), "--fold", "1", "--image", str(folder)]) == 0
    out = capsys.readouterr().out
    counts = re.search(r"12 images scored: (normal \d+|pneumoconiosis \d+|normal \d+, pneumoconiosis \d+) at the run's "
                       r"operating point", out)
    assert counts and sum(map(int, re.findall(r"\d+", counts[1]))) == 12
    text = (tmp_path / "fold1/eval/image_scores.csv").read_text()
    rows = list(_csv.DictReader(text.splitlines()))
    assert [r["image"] for r in rows] == [f"image{i}" for i in range(1, 13)] and "DOE" not in text
    cfg = json.loads((tmp_path / "fold1/config.json").read_text())
    cut = runs.operating_point(tmp_path / "fold1", cfg)["thresholds"]["pneumoconiosis"]  # the run's, from validation
    assert all(r["decision"] == ("pneumoconiosis" if float(r["p_pneumoconiosis"]) >= cut else "normal") for r in rows)
    assert score.main(["--runs", str(tmp_path), "--fold", "1", "--image", str(folder)]) == 0  # again: beside, not over
    assert (tmp_path / "fold1/eval/image_scores.csv").read_text() == text
    assert (tmp_path / "fold1/eval/image_scores-2.csv").read_text() == text
    capsys.readouterr()
    sources = sorted((demo_data.parent / "dicom").glob("*.dcm"))[:3]  # the run's own films, as first given
    assert score.main(["--runs", str(tmp_path), "--fold", "1", "--image", *map(str, sources)]) == 0
    assert "WARNING: 3 of 3 films of --image are the run's own" in capsys.readouterr().out


def test_the_saved_operating_point_is_the_one_applied_and_a_lost_validation_file_is_refused(demo_data, demo_runs,
                                                                                               tmp_path, capsys):
    """--fold --sensitivity saves its rule; --image then applies that rule (not Youden's J) and names it;
    --fold without it saves Youden's again. A run trained with a validation split whose
    val_predictions.csv is gone is refused in one line, and its saved point is left as it was."""
    run = shutil.copytree(demo_runs / "fold1", tmp_path / "fold1")
    cfg = json.loads((run / "config.json").read_text())
    _, yv, pv = runs.read_predictions(run / "val_predictions.csv", cfg)
    assert ev.main(["--runs", str(tmp_path), "--fold", "1", "--sensitivity", "0.9"]) == 0
    saved = json.loads((run / "eval/operating_point.json").read_text())
    cut = saved["thresholds"]["pneumoconiosis"]
    assert saved["sensitivity"] == 0.9 and (pv[yv == 1, 1] >= cut).mean() >= 0.9  # sensitivity on validation
    images = [str(demo_data / r["image"]) for r in manifest(demo_data)[:3]]
    capsys.readouterr()
    assert score.main(["--runs", str(tmp_path), "--fold", "1", "--image", *images]) == 0
    out = capsys.readouterr().out
    assert out.count(f"at the run's threshold {cut:.3f} (sensitivity >= 0.9 (saved by eval.py --fold 1: "
                     "operating_point.json))") == 3
    assert ev.main(["--runs", str(tmp_path), "--fold", "1"]) == 0
    youden = json.loads((run / "eval/operating_point.json").read_text())
    assert youden["sensitivity"] is None and youden["rule"].startswith("Youden's J on the validation split")
    (run / "val_predictions.csv").unlink()
    with pytest.raises(UserError, match=r"val_predictions.csv: missing, though the run held out --val-frac 0.1 .*"
                                        r"--restart"):
        ev.main(["--runs", str(tmp_path), "--fold", "1"])
    assert json.loads((run / "eval/operating_point.json").read_text()) == youden


def test_a_model_trained_on_the_demo_says_it_is_not_for_diagnosis(demo_data, tmp_path, capsys):
    data = shutil.copytree(demo_data, tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps(dict(meta, demo=True)))  # as prepare.py --demo writes it
    train.main(train_args(data, tmp_path / "fold1", "--epochs", "1"))
    assert json.loads((tmp_path / "fold1/config.json").read_text())["synthetic"] is True
    image = next((data / "images").glob("*.png"))
    cfg = json.loads((tmp_path / "fold1/config.json").read_text())  # trained on a GPU, scored where there may be none
    (tmp_path / "fold1/config.json").write_text(json.dumps(dict(cfg, device="cuda:0", dtype="fp16")))
    capsys.readouterr()
    assert score.main(["--runs", str(tmp_path), "--fold", "1", "--image", str(image)]) == 0
    assert "trained on the synthetic demo set: it is a demo, not for diagnosis" in capsys.readouterr().out


# ==================================================================================================
# 6. explain.py: Grad-CAM against its definition; the maps and sheets eval.py writes


def test_grad_cam_maps_are_normalised_deterministic_and_survive_merging():
    model = tiny()
    perturb_adapters(model)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    maps, predicted, weights = explain.grad_cam(model, x)
    assert maps.shape == (3, 224, 224) and maps.min() >= 0 and torch.allclose(maps.flatten(1).amax(1), torch.ones(3))
    assert torch.equal(predicted, model(x).argmax(-1))
    # by the definition (issue 15): d logit[class] / d patch tokens entering each kept block (1-4), times those
    # tokens, summed over channels, ReLU; mean over the blocks; bilinear from 8 x 8 patches to the crop; / its peak
    seen = {}
    hooks = [model.visual.transformer.resblocks[b - 1].register_forward_pre_hook(
        lambda m, args, b=b: seen.__setitem__(b, args[0])) for b in (1, 2, 3, 4)]
    logits = model(x.clone().requires_grad_(True))
    for h in hooks:
        h.remove()
    for target in (predicted, 1 - predicted):
        grads = torch.autograd.grad(logits[torch.arange(3), target].sum(), [seen[b] for b in (1, 2, 3, 4)],
                                    retain_graph=True)
        cam = sum(F.relu((g * seen[b]).sum(-1))[:, 1:] for b, g in zip((1, 2, 3, 4), grads)) / 4  # (3, 64)
        cam = F.interpolate(cam.view(3, 1, 8, 8), size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
        ours, explained, _ = explain.grad_cam(model, x, None if target is predicted else target)
        assert torch.equal(explained, target)
        assert torch.allclose(ours, cam / cam.flatten(1).amax(1)[:, None, None], atol=1e-5)
    again, _, _ = explain.grad_cam(model, x)
    assert torch.equal(maps, again)  # deterministic: eval mode, no dropout
    assert weights.shape == (3, 4, 4) and torch.allclose(weights.sum(-1), torch.ones(3, 4))  # convex mixes
    with torch.no_grad():
        model.merge_adapters()
    merged, _, _ = explain.grad_cam(model, x)  # no trainable weight left in the ViT: the gradient flows from the input
    assert (merged - maps).abs().max() < 1e-3
    with torch.no_grad():
        model.head.weight.zero_()  # the logits no longer depend on the image
    flat, _, _ = explain.grad_cam(model, x)
    assert not flat.any()


def test_explain_writes_a_map_per_image_and_a_sheet_per_fold(demo_data, tmp_path, capsys, monkeypatch):
    train.main(train_args(demo_data, tmp_path / "fold1", "--epochs", "2"))
    capsys.readouterr()
    targets, real = [], explain.explain_images
    monkeypatch.setattr(explain, "explain_images", lambda *a: targets.append(a[3]) or real(*a))
    assert ev.main(["--runs", str(tmp_path), "--fold", "1", "--explain", "6"]) == 0
    out = capsys.readouterr().out
    sheet = loaded_image(tmp_path / "fold1/eval/youden/explain.png")
    kinds = re.search(r"6 test images \((((TP|FP|FN|TN), ){5}(TP|FP|FN|TN))\)", out).group(1).split(", ")
    assert sheet.size == (4 * 224, 2 * 224) and targets == [[int(k in ("TP", "FP")) for k in kinds]]  # as called
    rows = re.findall(r"diagnosis token \d: ((?:[01]\.\d\d\s*){4})", out)
    assert len(rows) == 4 and all(abs(sum(map(float, r.split())) - 1) < 0.03 for r in rows)
    if SHARED:
        assert score.main(["--runs", str(tmp_path), "--fold", "1", "--image", os.path.join(DICOM, "RG1_UNCR.dcm"),
                        "--explain", "--explain-dir", str(tmp_path / "maps")]) == 0
        assert os.listdir(tmp_path / "maps") == ["image1.explain.png"]  # never the input's name: it can name a patient
        assert loaded_image(tmp_path / "maps/image1.explain.png").size == (224, 224)
        called = re.search(r"(positive|negative) at the run's threshold", capsys.readouterr().out).group(1)
        assert targets[-1] == [int(called == "positive")]  # the map of the class called, not of the argmax


# ==================================================================================================
# 7. command lines: one-line errors with exit 2, help


def test_user_mistakes_are_one_line_and_exit_2(demo_data, tmp_path, monkeypatch, capsys):
    here = Path(__file__).parent
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.csv").write_text("image,label,patient,fold\n")
    write_labels(tmp_path / "labels.csv", [("a.png", "x")])
    (tmp_path / "header.csv").write_text("image,label\n")
    (tmp_path / "latin1.csv").write_bytes("image,label\nJosé.png,normal\n".encode("latin1"))
    run = tmp_path / "runs/fold1"
    train.main(train_args(demo_data, run, "--epochs", "1"))
    (run / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes()[:100])  # truncated
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.json").write_text((run / "config.json").read_text().replace(str(run), str(stopped)))
    (stopped / "state.pt").write_bytes((run / "state.pt").read_bytes()[:1000])
    (tmp_path / "a_file").write_text("")
    write_labels(pngs(tmp_path / "imgs", 2) / "labels.csv", [("im0.png", "a"), ("im1.png", "b")])
    cases = [
        (["eval.py", "--runs", str(run.parent), "--fold", "9"], "--fold 9: the runs in"),
        (["prepare.py", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "imgs/labels.csv"), "--out",
          str(tmp_path / "a_file/data")], "a_file/data"),  # the system refuses the folder: one line all the same
        (["eval.py", "--runs", str(run.parent), "--fold", "1", "--explain", "0"], "--explain 0: give how many"),
        (["eval.py", "--runs", str(run.parent), "--fold", "1", "--explain", "-3"], "--explain -3: give how many"),
        (["score.py", "--runs", str(run.parent), "--image", str(tmp_path / "labels.csv")],
         "best.safetensors: not a readable safetensors file"),
        (["train.py", "--data", str(demo_data), "--model", "random", "--batch-size", "16", "--epochs", "1", "--out",
          str(stopped)], "state.pt: is not a plain tensor checkpoint; not loaded; pass --restart"),
        (["prepare.py", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "header.csv"), "--out",
          str(tmp_path / "p")], "a header and no rows"),
        (["eval.py", "--runs", str(tmp_path / "none"), "--fold", "1"], "no run there"),
        (["score.py", "--runs", str(tmp_path / "none"), "--image", "a.png"], "no run there"),
        (["probe.py", "--runs", str(tmp_path / "none")], "no run there"),
        (["train.py", "--data", str(bare), "--model", "random", "--out", str(tmp_path / "o")], "meta.json not found"),
        (["prepare.py", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "labels.csv"), "--out",
          str(tmp_path / "p"),
          "--folds", "0"], "--folds 0: give 1 or more"),
        (["prepare.py", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "labels.csv"), "--out",
          str(tmp_path / "p"),
          "--workers", "0"], "--workers 0: give 1 or more"),
        (["external.py", "--runs", str(run.parent), "--data", str(demo_data), "--classes", "garbage"],
         "--classes 'garbage': give pairs theirs=ours"),
        (["external.py", "--runs", str(run.parent), "--data", str(demo_data), "--classes", "sick=pneumoconiosis"],
         "['sick'] are not labels of"),
        (["prepare.py", "--images", str(tmp_path / "no_such_folder"), "--labels", str(tmp_path / "labels.csv"),
          "--out", str(tmp_path / "p")], "no_such_folder: no such folder"),
        (["prepare.py", "--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "latin1.csv"), "--out",
          str(tmp_path / "p")], "latin1.csv: not UTF-8 (byte 15); save it as 'CSV UTF-8'"),
    ] + [(["train.py", "--data", str(demo_data), "--model", "random", "--out", str(tmp_path / "o"), flag, value],
          f"{flag} {value}: give") for flag, value in (("--batch-size", "0"), ("--lr", "-1"), ("--epochs", "0"),
                                                      ("--val-frac", "1.5"), ("--min-lr", "nan"), ("--lr", "nan"),
                                                      ("--lr", "0"), ("--val-frac", "1"), ("--val-frac", "0.6"))
    ] + [(["train.py", "--data", str(demo_data), "--model", "random", "--out", str(tmp_path / "o"), "--cls-blocks",
           "4,4"], "CLS blocks [4, 4] name a block twice")
    ] + ([] if torch.cuda.is_available() else [(["train.py", "--data", str(demo_data), "--model", "random", "--out",
                                                 str(tmp_path / "o"), "--device", "cuda"], "this torch sees no GPU")])
    first = {}  # one case per script as a real process (its exit status, no traceback); all in this one
    for case in cases:
        first.setdefault(case[0][0], case)
    with multiprocessing.pool.ThreadPool(2) as pool:
        runs = pool.map(lambda case: run_script(str(here / case[0][0]), *case[0][1:], cwd=tmp_path), first.values())
    for (args, msg), r in zip(first.values(), runs):
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    scripts = {"train.py": (train, (P.CheckpointError,)), "eval.py": (ev, (P.CheckpointError,)),
               "score.py": (score, (P.CheckpointError,)), "probe.py": (PB, (P.CheckpointError,)),
               "external.py": (external, (P.CheckpointError,)), "prepare.py": (prepare, ())}
    monkeypatch.chdir(tmp_path)
    for args, msg in cases:  # as each script's `sys.exit(cli(main, errors))` runs it
        module, errors = scripts[args[0]]
        rc, err = cli(lambda: module.main(args[1:]), errors), capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and msg in err, (args, err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "o").exists()


def test_a_full_disk_while_training_is_one_line_and_leaves_no_temporary_file(demo_data, tmp_path, monkeypatch,
                                                                               capsys):
    """torch.save failing half-way (its writer's RuntimeError, as on a full disk): exit 2, one line naming
    the file, no state.pt.tmp left; the same command then resumes or starts cleanly."""
    real = torch.save
    def full(obj, f, *a, **kw):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\nfile write failed")
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert cli(lambda: train.main(train_args(demo_data, out, "--epochs", "1"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {out / 'state.pt'}: could not be written" in err and "disk full" in err
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", real)
    train.main(train_args(demo_data, out, "--epochs", "1"))
    assert (out / "predictions.csv").exists()


def test_a_live_run_a_lost_model_and_an_empty_file_are_named(demo_data, tmp_path):
    """eval.py on a run that is still training says so (not 'training stopped'); train.py on a finished
    run whose best.safetensors is gone says to --restart; a 0-byte image is skipped as empty."""
    run = tmp_path / "fold1"
    train.main(train_args(demo_data, run, "--epochs", "1"))
    (run / "predictions.csv").rename(run / "held.csv")
    (run / ".lock").write_text(str(os.getpid()))  # a live train.py holds it
    with pytest.raises(UserError, match=r"fold1: still training \(process \d+, epoch 1 of 1 done\)"):
        C.check_finished(run, 1)
    (run / ".lock").unlink()
    with pytest.raises(UserError, match="training stopped at epoch 1 of 1"):
        C.check_finished(run, 1)
    (run / "held.csv").rename(run / "predictions.csv")
    (run / "best.safetensors").unlink()
    with pytest.raises(UserError, match=r"best.safetensors: missing, so the finished run has no model; pass --restart"):
        train.main(train_args(demo_data, run, "--epochs", "1"))
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(R.Skip, match="an empty file"):
        R.read_image(tmp_path / "empty.dcm")


def test_a_read_only_mapping_target_is_refused_before_any_image(tmp_path, monkeypatch):
    """(As root every path is writable, so the OS's answer is faked for the one target.)"""
    write_labels(pngs(tmp_path / "imgs", 4) / "labels.csv", [(f"im{i}.png", "ab"[i % 2]) for i in range(4)])
    target = tmp_path / "locked" / "map.csv"
    target.parent.mkdir()
    access = os.access
    monkeypatch.setattr(prepare.os, "access", lambda p, mode: Path(p) != target.parent and access(p, mode))
    with pytest.raises(UserError, match=r"--mapping .*map.csv: not writable; choose another place"):
        prepare.main(["--images", str(tmp_path / "imgs"), "--labels", str(tmp_path / "imgs/labels.csv"), "--out",
                      str(tmp_path / "p"), "--key-file", str(tmp_path / "key"), "--mapping", str(target),
                      "--folds", "2"])
    assert not (tmp_path / "p").exists()


def test_a_run_is_refused_on_data_prepared_again_from_changed_source_pixels(tmp_path):
    """Same file names, one source film's pixels changed, prepare.py again into the same folder (it redoes
    that film): the run trained on the old folder is refused by eval.py, never scored against new pixels."""
    src = pngs(tmp_path / "imgs", 24, lambda i: 40 + 8 * i)
    rows = [(f"im{i}.png", "ab"[i % 2], f"p{i}") for i in range(24)]
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2", header=("image", "label", "patient"))
    assert rc == 0
    train.main(train_args(out, tmp_path / "runs/fold1", "--epochs", "1", "--val-frac", "0"))
    assert ev.main(["--runs", str(tmp_path / "runs"), "--fold", "1"]) == 0
    Image.fromarray(np.full((64, 64), 250, np.uint8)).save(src / "im3.png")  # the same name, other pixels
    rc, _ = run_prepare(tmp_path, src, rows, "--folds", "2", header=("image", "label", "patient"))
    assert rc == 0
    with pytest.raises(UserError, match=r"changed since .*fold1 was trained on it"):
        ev.main(["--runs", str(tmp_path / "runs"), "--fold", "1"])


def test_the_default_threads_are_the_idle_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    try:
        for idle, threads in ((0.1, 1), (1.2, 1), (2.6, 3), (3.9, 4)):
            monkeypatch.setattr(C, "idle_cores", lambda: idle)
            C.apply_threads(None)
            assert torch.get_num_threads() == threads, idle
        C.apply_threads(2)
        assert torch.get_num_threads() == 2
        assert 0 <= IDLE_CORES() <= 4.01
    finally:
        torch.set_num_threads(2)


def test_bench_times_a_tiny_training_step_and_inference(capsys):
    try:
        bench.main(["--model", "tiny", "--iters", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(2)
    out = capsys.readouterr().out
    assert re.search(r"train step: [\d.]+ ms median", out) and re.search(r"[\d.]+ merged", out)


def test_bench_counts_the_flops_that_run(clip_files, llama_files):
    """bench.py's FLOP count, the README's floor for CPU scoring, equals torch's FlopCounterMode on the ViT
    and the LLaMA blocks as they run (attention in its math form, so that it is counted; no adapters,
    which the count leaves out), with MHA and with grouped-query attention."""
    model = load(clip_files["jit"], llama_files["meta"], vit_adapters=False, llm_adapters=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as vit:
            src = model.visual(torch.randn(1, 3, 56, 56))
        h = model.proj(torch.cat([src, model.engine(src)], 1))
        with FlopCounterMode(display=False) as llama:
            model.llama(h, P.emitter_mask(4, 4))
    assert fullsize.flops(model.args) == (vit.get_total_flops(), llama.get_total_flops())


def test_bench_scores_as_eval_does_at_batch_1_and_16(clip_files, tmp_path, capsys):
    """`bench.py --load`'s measurement, on tiny checkpoints in the real formats: eval.py's policy line, the
    first image, one image, a batch of 16 and start-up against their goals, the floor from this run's
    rates and each dtype's precision; fp32 weights are never narrowed."""
    fullsize.load_full(clip_files["jit"], write_llama(tmp_path, 4)["meta"], floors=True)
    out = capsys.readouterr().out
    assert "scoring on this CPU: ViT in fp32, as stored (nothing wider to try), its adapters merged into q/k/v, " \
           "its QuickGELU folded into one silu; LLaMA in fp32" in out
    assert len(re.findall(r"(first image|one image|a batch of 16, best of 3): [\d.]+ s per image", out)) == 3
    assert re.search(r"goals met: batch (yes|NO), one (yes|NO), startup (yes|NO), rss (yes|NO)", out)
    assert re.search(r"products at batch 16, GFLOP/s at their own shapes with their weights streamed \(on one square "
                     r"layer reused\): ViT in torch.float32 \d+ \(\d+\), LLaMA in torch.float32 \d+ \(\d+\)", out)
    assert re.search(r"start-up [\d.]+ s \(goal 20 s\): the model takes images\n", out)
    assert re.search(r"first score [\d.]+ s after the start: CPU [\d.]+ s, kernel [\d.]+ s, [\d.]+ M page faults", out)
    assert re.search(r"the files alone take [\d.]+ s to read from disk", out)
    assert re.search(r"floor per image at batch 16: .* measured [\d.]+ s = [\d.]+x the floor", out)
    assert re.search(r"bf16 against fp32: the ViT's CLS tokens off by at most \d\.\de-0\d", out)
    assert "one image with the weights as stored (no conversion)" in out


def test_the_floor_times_each_parts_own_products_through_distinct_copies(monkeypatch):
    """fullsize.products_rate: every frozen 2-D weight of a block, at its own shape, in the dtype asked for, on the
    rows asked for, through one distinct copy per block of the part (a cache must not hold the next one)."""
    blocks = P.Llama(P.tiny_args()).layers
    for b in blocks:
        b.requires_grad_(False)
    calls = []
    monkeypatch.setattr(fullsize.F, "linear", lambda x, w: calls.append((x.shape[0], tuple(w.shape), w.dtype,
                                                                       w.data_ptr())))
    assert fullsize.products_rate(blocks, 160, torch.bfloat16) > 0
    shapes = [tuple(p.shape) for p in blocks[0].parameters() if p.dim() == 2]
    assert len(calls) == 4 * len(blocks) * len(shapes) and {(r, d) for r, _, d, _ in calls} == {(160, torch.bfloat16)}
    assert sorted(c[1] for c in calls[:len(calls) // 4]) == sorted(shapes * len(blocks))
    assert len({c[3] for c in calls}) == len(blocks) * len(shapes)  # distinct weights, each used once per pass


def test_every_flag_has_help_and_a_shown_default_and_threads_work(demo_data, tmp_path):
    for script in (train, ev, prepare, bench):
        ap = script.parser()
        assert all(a.help for a in ap._actions), script.__name__
        text = ap.format_help()
        for action in ap._actions:  # a default, where there is one, is said once, and "None" never
            said = ap._get_formatter()._expand_help(action).count("(default")
            assert said <= 1 and said >= (action.default not in (None, False, "", argparse.SUPPRESS)), action.dest
        assert "(default: None)" not in text, script.__name__
    text = train.parser().format_help()
    for flag, default in [("--epochs", "100 (full"), ("--model", "full)"), ("--lr", "3e-4 (full"), ("--seed", "20)")]:
        assert re.search(rf"{flag} .*?\(default: {re.escape(default)}", text, re.S), flag
    assert prepare.parser().get_default("seed") == train.parser().get_default("seed") == 20  # one fold seed
    try:
        train.main(train_args(demo_data, tmp_path / "run", "--epochs", "1", "--threads", "1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(2)


def test_restart_never_deletes_a_source_film_or_anything_prepare_did_not_write(tmp_path, capsys):
    """--out equal to --images, --images inside --out and --out inside --images are refused before anything is
    written; --restart removes only the files the folder's records list: a file the user put there survives."""
    for layout in ("same", "images inside out", "out inside images"):
        site = tmp_path / layout.replace(" ", "_")
        src = pngs(site / "images", 6, lambda i: 40 * i)
        write_labels(site / "labels.csv", [(f"im{i}.png", "ab"[i % 2]) for i in range(6)])
        sources = {p: p.read_bytes() for p in src.rglob("*")}
        out = {"same": src, "images inside out": site, "out inside images": src / "data"}[layout]
        for extra in ([], ["--restart"]):
            args = ["--images", str(src), "--labels", str(site / "labels.csv"), "--out", str(out),
                    "--key-file", str(tmp_path / "key"), "--folds", "2", *extra]
            with pytest.raises(UserError, match=r"--out .*: (the same folder as|holds|inside) --images"):
                prepare.main(args)
            assert {p: p.read_bytes() for p in src.rglob("*")} == sources, layout
    src = pngs(tmp_path / "in", 6, lambda i: 40 * i)
    rows = [(f"im{i}.png", "ab"[i % 2]) for i in range(6)]
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2")
    mine = {out / "images/notes.png": b"the user's own", out / "reference/x.png": b"x", out / "readme.txt": b"r"}
    for p, b in mine.items():
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b)
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2", "--crop", "none", "--restart")
    assert rc == 0 and all(p.read_bytes() == b for p, b in mine.items())
    assert len(list((out / "images").glob("*.png"))) == 6 + 1


def test_one_film_is_one_row_whatever_its_names(tmp_path, capsys):
    """A bare name and its relative path are one file; a byte copy or a re-encoding (the same pixels) under
    another label is refused naming both lines, before any work for copies; under the same label the
    first row is kept, so that a film never sits in two folds under two patients."""
    src = pngs(tmp_path / "in", 8, lambda i: 30 * i)
    (src / "NORMAL").mkdir()
    shutil.move(src / "im7.png", src / "NORMAL/im7.png")
    rows = [(f"im{i}.png", "ab"[i % 2], f"p{i}") for i in range(7)]
    header = ("image", "label", "patient")
    with pytest.raises(UserError, match=r"lines 9 and 10 name the same file \('NORMAL/im7.png'\)"):
        run_prepare(tmp_path, src, rows + [("im7.png", "a", "p7"), ("NORMAL/im7.png", "b", "p8")], "--folds", "2", header=header)
    shutil.copy(src / "im2.png", src / "copy.png")
    with pytest.raises(UserError, match=r"line 4 \('a'\), line 10 \('b'\) are one film \(the same file's bytes\)"):
        run_prepare(tmp_path, src, rows + [("NORMAL/im7.png", "b", "p7"), ("copy.png", "b", "p9")], "--folds", "2", header=header)
    assert not (tmp_path / "out/images").exists()  # refused before any image was prepared
    loaded_image(src / "im3.png").save(src / "im3.tif")  # the same pixels, another encoding
    with pytest.raises(UserError, match=r"line 5 \('b'\), line 10 \('a'\) are one film \(the same pixels\)"):
        run_prepare(tmp_path, src, rows + [("NORMAL/im7.png", "b", "p7"), ("im3.tif", "a", "p9")], "--folds", "2", header=header)
    capsys.readouterr()
    rc, out = run_prepare(tmp_path, src, rows + [("NORMAL/im7.png", "b", "p7"), ("im3.tif", "b", "p9"),
                                                 ("copy.png", "a", "p10")], "--folds", "2", header=header)
    err = capsys.readouterr().err
    assert rc == 0 and "2 row(s) of" in err and "lines 4 = 11; 5 = 10" in err and "first of each is kept" in err
    assert len(manifest(out)) == 8


@pytest.mark.parametrize("labels", [("TB", "non-TB"), ("disease", "no_disease"), ("TB-negative", "TB"),
                                    ("not sick", "sick")])
def test_the_disease_class_is_never_guessed_from_a_name_that_reads_both_ways(tmp_path, labels):
    src = pngs(tmp_path / "in", 4, lambda i: 40 * i)
    rows = [(f"im{i}.png", labels[i % 2]) for i in range(4)]
    healthy = next(n for n in labels if L.NEGATION.search(n.lower()))
    with pytest.raises(UserError, match=rf"reads as a negation.*--classes {re.escape(healthy)},"):
        run_prepare(tmp_path, src, rows, "--folds", "1")
    assert not (tmp_path / "out").exists()


def test_names_that_read_healthy_come_first_without_classes():
    opt = argparse.Namespace(classes=None, multi_label=False, labels="labels.csv")
    for pair in (("sick", "well"), ("pneumonia", "control"), ("TB", "healthy")):
        assert L.label_set([dict(label=x) for x in pair], opt)[0] == pair[1]


def test_every_figure_names_its_positive_class_and_an_undeclared_order_is_said(demo_data, tmp_path, capsys):
    src = pngs(tmp_path / "in", 8, lambda i: 30 * i)
    rows = [(f"im{i}.png", ("pneumonia", "normal")[i % 2]) for i in range(8)]
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2", "--classes", "pneumonia,normal")
    assert "'normal' is class 1, the positive class" in capsys.readouterr().err
    run_prepare(tmp_path, src, [(f"im{i}.png", "ab"[i % 2]) for i in range(8)], "--folds", "2", "--restart")
    said = capsys.readouterr().out
    assert "did not declare its classes: 'b' is taken as the disease" in said and "--classes b,a --restart" in said
    train.main(train_args(out, tmp_path / "runs/fold1", "--epochs", "1", "--val-frac", "0", "--batch-size", "4"))
    said = capsys.readouterr().out
    assert "'b' is taken as the disease" in said and "of 'b' (positive) against 'a'): sensitivity" in said
    ev.main(["--runs", str(tmp_path / "runs"), "--fold", "1"])
    said = capsys.readouterr().out
    assert "the paper's figures (argmax; of 'b' (positive) against 'a'): sensitivity" in said
    assert "'b' is taken as the disease" in said
    ev.main(["--runs", str(tmp_path / "runs"), "--all", "--folds", "1"])
    assert "Sensitivity, specificity and AUC of 'b' (positive) against 'a'" in (tmp_path / "runs/table/0.5/table.md").read_text()
    train.main(train_args(demo_data, tmp_path / "demo/fold1", "--epochs", "1"))
    assert "'pneumoconiosis' is taken as the disease" in capsys.readouterr().out  # the demo's folder, undeclared


def test_a_run_is_pinned_to_its_frozen_checkpoints(clip_files, demo_data, tmp_path):
    """A replaced ViT file (the same keys and shapes, other weights) is refused by every command that loads
    the run's model, naming the file; the same file copied elsewhere is not needed: the path is the record."""
    clip = tmp_path / "ViT.pt"
    shutil.copy(clip_files["pt"], clip)
    out = tmp_path / "runs/fold1"
    train.main(train_args(demo_data, out, "--epochs", "1", "--model", "full", "--clip", str(clip), "--no-llm",
                          "--cls-blocks", "1,2,3,4"))
    assert json.loads((out / "config.json").read_text())["frozen_files"] == {str(clip): C.fingerprint(clip)}
    C.load_run(out)  # unchanged: loads
    other = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in clip_files["sd"].items()}
    torch.save(other, clip)
    with pytest.raises(UserError, match=r"ViT\.pt is not the checkpoint .*fold1 was trained with"):
        score.main(["--runs", str(out.parent), "--fold", "1", "--image", str(demo_data / "images")])


def test_vit_heads_are_read_where_stated_and_refused_where_not(tmp_path):
    """An OpenCLIP ViT-H-like tower (1280 wide, 16 heads of 80), one block: an OpenAI-layout file states no
    head count, and width / 64 would give 20: refused without --clip-heads, equal to transformers with it;
    a Hugging Face folder states 16."""
    vc = dict(hidden_size=1280, num_hidden_layers=1, num_attention_heads=16, intermediate_size=5120, patch_size=14,
              image_size=28, hidden_act="gelu", projection_dim=16)
    tc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50,
              max_position_embeddings=8, bos_token_id=0, eos_token_id=1)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16)).eval()
    randomize(hf, 0)
    hf.save_pretrained(tmp_path / "hf")
    torch.save(openai_layout(hf.state_dict(), 1), tmp_path / "vit-h.pt")
    with pytest.raises(P.CheckpointError, match=r"vit-h\.pt: a ViT 1280 wide, whose head count the file does not "
                                                r"state.*pass --clip-heads N"):
        P.read_clip(tmp_path / "vit-h.pt", "gelu")
    with pytest.raises(P.CheckpointError, match=r"num_attention_heads is 16, not --clip-heads 20"):
        P.read_clip(tmp_path / "hf", None, 20)
    img = torch.randn(2, 3, 28, 28)
    want = hf.vision_model(pixel_values=img, output_hidden_states=True).hidden_states[1][:, 0]
    for path, heads in ((tmp_path / "vit-h.pt", 16), (tmp_path / "hf", None)):
        model = P.from_pretrained(path, None, clip_act="gelu" if heads else None, clip_heads=heads, llm=False,
                                  cls_blocks=[1], vit_adapters=False)
        assert model.args.vision.heads == 16
        with torch.no_grad():
            torch.testing.assert_close(model.eval().visual(img)[:, 0], want, rtol=1e-4, atol=1e-4)


def test_folds_of_another_experiment_are_never_pooled_and_hints_are_whole_commands(demo_data, tmp_path, capsys):
    src = pngs(tmp_path / "in", 8, lambda i: 30 * i)
    rc, other = run_prepare(tmp_path, src, [(f"im{i}.png", "ab"[i % 2]) for i in range(8)], "--folds", "2")
    runs = tmp_path / "runs"
    train.main(train_args(demo_data, runs / "fold1", "--epochs", "1"))
    with pytest.raises(UserError, match=rf"{re.escape(str(runs / 'fold2'))}: no run there; train it first: python "
                                        rf"train\.py --data {re.escape(str(demo_data))} --model random --fold 2"):
        ev.main(["--runs", str(runs), "--fold", "2"])
    train.main(train_args(other, runs / "fold2", "--epochs", "1", "--fold", "2", "--val-frac", "0", "--batch-size", "2"))
    for script, args in ((ev, ["--all"]), (external, ["--ensemble", "--data", str(demo_data)])):
        with pytest.raises(UserError, match=rf"fold 2 is not the experiment of fold 1: its data is '{other}', fold 1's "
                                            rf"'{demo_data}' and more"):
            script.main(["--runs", str(runs), *args])
    train.main(train_args(demo_data, tmp_path / "flat", "--epochs", "1"))
    assert f"mv {tmp_path / 'flat'} {tmp_path}/fold1" in capsys.readouterr().out


def test_external_validation_finds_every_reason_to_refuse_before_any_model_runs(demo_data, demo_runs, second_site,
                                                                                tmp_path, monkeypatch, capsys):
    runs = shutil.copytree(demo_runs, tmp_path / "runs")
    monkeypatch.setattr(C, "load_run", lambda *a, **k: pytest.fail("a model was loaded before the refusal"))
    small = shutil.copytree(second_site, tmp_path / "small")
    meta = json.loads((small / "meta.json").read_text())
    (small / "meta.json").write_text(json.dumps(dict(meta, settings=dict(meta["settings"], size=128))))
    with pytest.raises(UserError, match=r"small was prepared at --size 128, the run's data at 224"):
        external.main(["--runs", str(runs), "--data", str(small)])
    one_class = shutil.copytree(demo_data, tmp_path / "one_class")  # the run's films, and 3 others, all normal
    rows = manifest(one_class)
    theirs = [r for r in manifest(second_site) if r["label"] == "normal"][:3]
    for r, t in zip(rows, theirs):
        shutil.copy(second_site / t["image"], one_class / r["image"])
        r["patient"], r["label"] = "P" + t["patient"], "normal"
    write_csv(one_class / "manifest.csv", prepare.MANIFEST, [[r[k] for k in prepare.MANIFEST] for r in rows])
    with pytest.raises(UserError, match=r"after leaving out the run's own films, 3 remain with no images of "
                                        r"pneumoconiosis"):
        external.main(["--runs", str(runs), "--data", str(one_class)])
    shared = shutil.copytree(second_site, tmp_path / "shared")  # other films under the run's patients' pseudonyms
    rows, ours = manifest(shared), manifest(demo_data)
    rows[0]["patient"], rows[1]["patient"] = sorted({r["patient"] for r in ours})[:2]
    write_csv(shared / "manifest.csv", prepare.MANIFEST, [[r[k] for k in prepare.MANIFEST] for r in rows])
    cfg = json.loads((runs / "fold1/config.json").read_text())
    capsys.readouterr()
    _, kept, _, _ = sites.external_films(cfg, shared, None)
    assert "WARNING: 2 patients of" in capsys.readouterr().out and len(kept) == len(rows) - 2
    moved = dict(cfg, data=str(tmp_path / "gone"))
    with pytest.raises(UserError, match=r"the run's data folder .*gone is not here; external validation needs it"):
        sites.external_films(moved, second_site, None)


def test_label_files_as_users_write_them_are_read_or_refused_before_any_work(tmp_path, monkeypatch):
    src = pngs(tmp_path / "in", 6, lambda i: 40 * i)
    monkeypatch.setattr(prepare, "process", lambda *a: pytest.fail("images were prepared before the refusal"))
    header = ("image", "label", "patient")
    cases = [([(f"im{i}.png", "a", f"p{i}") for i in range(6)], "one class only ('a', 6 images)", ()),
             ([(f"im{i}.png", "ab"[i % 2], "ab"[i % 2]) for i in range(6)],
              "'a' has 1 patient(s), 'b' has 1 patient(s), fewer than --folds 5", ()),
             ([(f"im{i}.png", "ab"[i % 2], f"p{i}") for i in range(6)], "--patient-col label: that is the label column",
              ("--patient-col", "label")),
             ([(f"im{i}.png", "ab"[i % 2], f"p{i}") for i in range(6)], "--demo writes its own phantoms", ("--demo",))]
    for rows, msg, extra in cases:
        with pytest.raises(UserError, match=re.escape(msg)):
            run_prepare(tmp_path, src, rows, *extra, header=header)
    monkeypatch.undo()
    rows = [(f"im{i}", "ab"[i % 2], f"p{i}") for i in range(6)] + [("", "", "")] * 3  # no extensions; Excel's tail
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2", header=header)
    assert rc == 0 and len(manifest(out)) == 6
    with pytest.raises(UserError, match=r"out was prepared with other settings \(key '[0-9a-f]{8}' there"):
        run_prepare(tmp_path, src, rows, "--folds", "2", "--key-file", str(tmp_path / "another.key"), header=header)


def test_checkpoint_mistakes_are_named_and_the_cpu_policy_counts_the_tokens_llama_sees(clip_files, tmp_path):
    with pytest.raises(P.CheckpointError, match="the LLM is on .* no LLaMA checkpoint was given"):
        P.from_pretrained(clip_files["pt"], None)
    with pytest.raises(P.CheckpointError, match=r"nope\.pt: No such file or directory; not loaded"):
        P.read_tensors(tmp_path / "nope.pt")
    for encoder in ("clip", "conv"):
        model = P.PneumoLLM(P.tiny_args(encoder=encoder)).eval()
        seen = []
        model.llama.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:-1].numel()))
        with torch.no_grad():
            model(P.normalise(torch.zeros(16, 1, 224, 224, dtype=torch.uint8), 224))
        assert CP.cpu_parts(model)["LLaMA"][2] == seen[0], encoder  # rows of a batch of 16


def test_every_run_fact_is_read_from_where_the_run_wrote_it(demo_data, second_site, tmp_path, capsys):
    """An --authors-code run (no validation split, its epoch chosen on the test fold) is evaluated, its
    threshold chosen there too and said; results of another operating point go beside the first, never
    over them; --restart leaves no file of the old model in the run folder."""
    run = tmp_path / "runs/fold1"
    train.main(train_args(demo_data, run, "--epochs", "1", "--authors-code"))
    assert C.read_config(run)["val_frac"] == 0 and not (run / "val_predictions.csv").exists()
    capsys.readouterr()
    assert ev.main(["--runs", str(run.parent), "--fold", "1"]) == 0
    out = capsys.readouterr().out
    assert "the paper's figures (argmax" in out and "on the TEST FOLD (the authors' code: optimistic)" in out
    args = ["--runs", str(run.parent), "--fold", "1", "--data", str(second_site)]
    assert external.main(args) == 0 and external.main([*args, "--sensitivity", "0.9"]) == 0
    first, other = sorted((run / "eval").glob("external-*/*/eval.json"))
    assert [p.parent.name for p in (first, other)] == ["sensitivity-0.9-on-test", "youden-on-test"]
    assert json.loads(first.read_text())["operating_point"]["sensitivity"] == 0.9
    assert json.loads(other.read_text())["operating_point"]["sensitivity"] is None
    assert score.main(["--runs", str(run.parent), "--fold", "1", "--image", str(demo_data / "images")]) == 0
    for name in ("eval.json", "roc-normal.png", "probe-site-1.json", "image_scores-2.csv"):  # an earlier version's
        (run / name).write_text("{}")
    train.main(train_args(demo_data, run, "--epochs", "1", "--restart"))
    assert sorted(p.name for p in run.iterdir()) == sorted(["config.json", "log.jsonl", "best.safetensors", "state.pt",
                                                           "metrics.json", "val_predictions.csv", "predictions.csv"])


def readme_commands() -> list:
    """Every `python <script>.py ...` command in README.md's and docs/'s code blocks, loops and && split."""
    here, found = Path(__file__).parent, []
    for page in [here / "README.md", *sorted((here / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|;", line.split("#")[0]):
                    words = shlex.split(part.replace("$f", "1"))
                    if words[:1] == ["python"] and words[1].endswith(".py"):
                        found.append((page.name, words[1], words[2:]))
    return found


def test_every_command_in_the_readme_and_docs_is_one_the_scripts_accept():
    """Each documented command names a script that exists, and its flags parse as written (what the
    command then does is each script's own tests'); none uses a flag that moved."""
    commands = readme_commands()
    assert {s for _, s, _ in commands} >= {"prepare.py", "train.py", "eval.py", "score.py", "probe.py",
                                            "external.py"}
    for page, script, args in commands:
        module = importlib.import_module(script[:-3])
        assert not set(getattr(module, "MOVED", {})) & {a.split("=")[0] for a in args}, (page, script, args)
        try:
            module.parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{page}: python {script} {shlex.join(args)} is refused by its parser")


@pytest.mark.parametrize("one_image, upcast_from", [(1.2, 4), (1.3, 1)])
def test_upcasting_pays_its_margin_for_one_image_too(one_image, upcast_from):
    """The stored dtype keeps a call of one image unless the upcast dtype measures at least 1.25x its rate
    there too: 1.2x leaves one image stored (upcasting from 4 images, where fp32 is 2x), 1.3x upcasts it."""
    def rates(rows, width, dtype, stored, per_call):
        if dtype == stored:
            return 1.0
        return 0.5 if dtype == torch.bfloat16 else 2.0 if rows >= 4 * t else one_image
    model = C.cast_frozen(tiny(), torch.float16)
    t = CP.cpu_parts(model)["LLaMA"][2] // 16
    line = CP.for_cpu_scoring(model, rates=rates, spare=0)
    assert f"LLaMA in fp32, upcast block by block for batches of {upcast_from}+ images" in line or \
        (upcast_from == 1 and "LLaMA in fp32, upcast block by block (" in line), line


def test_a_carried_over_cut_that_calls_nearly_every_film_negative_warns(demo_runs):
    cfg = json.loads((demo_runs / "fold1/config.json").read_text())
    y = np.array([0, 1] * 20)
    prob = np.stack([1 - 0.05 * np.ones(40), 0.05 * np.ones(40)], 1)  # every film at P = 0.05
    figures = dict(paper=dict(metrics=dict(auc=0.6), ci95=dict(auc=[0.5, 0.7])),
                   baseline=dict(auc=0.6, auc_ci95=[0.5, 0.7]))
    lines = external.beside_the_run(figures, demo_runs / "fold1", cfg, y, prob, dict(thresholds={"pneumoconiosis": 0.5}))
    assert any(x.startswith("WARNING: the carried-over cut-off calls 100.0 % of these films negative") for x in lines)


def test_an_attribute_some_films_lack_is_tested_on_those_that_have_it():
    """A view stated on half the films (and separating the classes there) is tested, never 'unknown'."""
    items, folds = audit_items(200, seed=3)
    for i, it in enumerate(items):
        it["view"] = ("PA" if it["label"] == "sick" else "AP") if i % 4 < 2 else ""
    report = run_audit(items, folds)
    assert "view" not in report["untested"] and report["auc_by_attribute"]["view"] > 0.65


def test_multi_label_folds_balance_images_when_patients_have_many_films():
    """200 patients with 1 to 12 films each, findings independent of the count: every fold within 4 % of a
    fifth of the images (2.8 % measured; 5.4 % without the images column the folds balance beside the
    findings)."""
    rng = np.random.default_rng(0)
    patients, labels = [], []
    for p in range(200):
        finding = ["a", "b", "a|b", "No Finding"][p % 4]
        for _ in range(int(rng.integers(1, 13)) if p % 3 else 1):
            patients.append(f"p{p}")
            labels.append(finding)
    sizes = np.bincount(make_folds(patients, labels, 5, seed=0, multi_label=True), minlength=6)[1:]
    assert abs(sizes - len(labels) / 5).max() <= 0.04 * len(labels) / 5, sizes


def test_the_few_rows_newton_step_is_the_dense_hessians_solve():
    """metrics' Woodbury step against np.linalg.solve of the whole (F+1) x (F+1) Hessian, bias first."""
    rng = np.random.default_rng(0)
    n, f, l2 = 12, 40, 3.0
    x, s, g = rng.normal(size=(n, f)), rng.uniform(0.05, 0.25, n), rng.normal(size=f + 1)
    xb = np.c_[np.ones(n), x]
    hessian = xb.T @ (xb * s[:, None]) + l2 * np.diag(np.r_[0, np.ones(f)])
    np.testing.assert_allclose(M._newton_step_few_rows(x, x @ x.T, s, g, l2), np.linalg.solve(hessian, g),
                               rtol=1e-9, atol=1e-12)


def test_every_arm_of_the_probe_is_scored_by_one_model_in_one_dtype(demo_data, tmp_path):
    """The probe's 'as trained' arm is the loaded model's score, not predictions.csv's (written at training,
    on another device or dtype, rounded): flattening the file changes nothing; probe.json names the dtype."""
    runs = tmp_path / "runs"
    train.main(train_args(demo_data, runs / "fold1", "--epochs", "4"))
    assert PB.main(["--runs", str(runs), "--fold", "1", "--threads", "2"]) == 0
    first = json.loads((runs / "fold1/eval/probe/youden/probe.json").read_text())
    text = (runs / "fold1/predictions.csv").read_text()
    flat = re.sub(r",0\.\d{6},0\.\d{6},", ",0.500000,0.500000,", text)
    assert flat != text
    (runs / "fold1/predictions.csv").write_text(flat)
    assert PB.main(["--runs", str(runs), "--fold", "1", "--threads", "2"]) == 0
    again = json.loads((runs / "fold1/eval/probe/youden/probe.json").read_text())
    assert again["as trained"] == first["as trained"] and first["as trained"]["auc"] != 0.5
    assert again["scored_with"]["dtype"] == "as stored" and "scoring on this CPU" in again["scored_with"]["cpu"]


@pytest.mark.parametrize("flags, want", [(set(), "fp32"), ({"amx_bf16"}, "bf16"), ({"avx512_bf16"}, "bf16")])
def test_the_cpu_dtype_choice_does_not_flip_with_noisy_timings(monkeypatch, flags, want):
    """True rates: fp16 (stored) 50, bf16 60, fp32 62 GFLOP/s. Another job slows a burst of up to 6
    consecutive timings (of the 15 a part takes: 5 tries of 3 dtypes, in turn) 2-50x. With no flags the
    prior is the stored fp16 and fp32 beats it by more than the 1.1 margin; with AMX or AVX512-BF16 the
    prior bf16 stays, fp32 being within the margin. 60 bursts give the quiet machine's choice every time
    (timing each dtype once, as before, flipped it)."""
    monkeypatch.setattr(CP, "cpu_flags", lambda: flags)
    true = {torch.float16: 50.0, torch.bfloat16: 60.0, torch.float32: 62.0}
    model = C.cast_frozen(tiny(), torch.float16)
    for seed in range(60):
        rng = np.random.default_rng(seed)
        start, length, slow, calls = rng.integers(0, 30), rng.integers(1, 7), rng.uniform(2, 50), []

        def noisy(rows, width, dtype, stored, per_call):
            calls.append(dtype)
            return true[dtype] / (slow if start <= len(calls) - 1 < start + length else 1)
        assert {v[0] for v in CP.choose_cpu_dtypes(model, rates=noisy).values()} == {want}, seed


def test_the_cpu_dtype_measurements_are_cached_per_machine_and_torch(monkeypatch, tmp_path):
    """The real measurement runs once per machine (torch, CPU model and flags, threads): a second model of
    the same shapes reads the cache, and chooses as the first whatever the machine does now."""
    monkeypatch.setenv("PNEUMOLLM_CACHE", str(tmp_path))
    timed = []
    monkeypatch.setattr(CP, "matmul_rate", lambda rows, width, dtype, stored, per_call: timed.append(dtype) or
                        {torch.float16: 5.0, torch.bfloat16: 300.0, torch.float32: 50.0}[dtype])
    first = CP.choose_cpu_dtypes(C.cast_frozen(tiny(), torch.float16))
    n = len(timed)
    monkeypatch.setattr(CP, "matmul_rate", lambda *a: pytest.fail("measured again"))
    assert CP.choose_cpu_dtypes(C.cast_frozen(tiny(), torch.float16)) == first and n == 2 * 3 * CP.TRIES
    table = json.loads((tmp_path / "cpu-dtypes.json").read_text())
    assert all(k.startswith(f"torch {torch.__version__}, ") for k in table) and len(table) == 2
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: measured again
    monkeypatch.setattr(CP, "matmul_rate", lambda rows, width, dtype, stored, per_call: 1.0)
    CP.choose_cpu_dtypes(C.cast_frozen(tiny(), torch.float16))
    assert len(json.loads((tmp_path / "cpu-dtypes.json").read_text())) == 4


def test_an_opacity_at_the_films_edge_is_drawn_cut_off():
    """A lung that reaches the film's edge (a body shifted far) gets its opacities there too, cut at the edge."""
    img = np.zeros((demo.SIZE, demo.SIZE), np.float32)
    where = np.zeros_like(img, bool)
    where[-1, -1] = where[0, 0] = True
    mask = demo.spots(np.random.default_rng(0), img, img.copy(), where, 6, (2.0, 3.0), 0.3)
    assert mask[-1, -1] or mask[0, 0]
    assert img.max() == pytest.approx(0.3, rel=1e-6)


@needs_data
def test_the_runs_own_films_are_found_shifted_cropped_rescaled_or_re_encoded_and_others_never(nih_subset):
    """Real NIH films: the run's films moved 2 or 4 px, cropped by 4 px a side, rescaled 224 -> 230 -> 224 or
    re-encoded as JPEG 75 are found among the run's (measured on the whole set: 99, 92, 87, 100, 100 %); the
    films of patients the run never saw are not (0 of 1,830 over 40 random fifths held out)."""
    data = Data(nih_subset)
    patients, images = np.array([r["patient"] for r in data.rows]), data.images(data.rows)
    held = np.isin(patients, list(dict.fromkeys(patients))[::5])  # a fifth of the patients (not by pseudonym)
    ours, copies = images[~held], []
    for img in ours[:30, 0]:
        im = Image.fromarray(img)
        shifted = lambda k: np.pad(img, ((k, 0), (k, 0)), mode="edge")[:224, :224]  # noqa: E731
        jpeg = io.BytesIO()
        im.save(jpeg, "JPEG", quality=75)
        copies += [shifted(2), shifted(4), np.asarray(im.crop((4, 4, 220, 220)).resize((224, 224), Image.BILINEAR)),
                   np.asarray(im.resize((230, 230), Image.BILINEAR).resize((224, 224), Image.BILINEAR)),
                   np.asarray(Image.open(jpeg))]
    found = sites.same_films(np.stack(copies)[:, None], ours, patients[~held]).reshape(-1, 5).sum(0)
    assert all(found >= [29, 25, 25, 30, 30]) and found.sum() >= 140, found  # 2 px, 4 px, crop, rescale, JPEG
    assert not sites.same_films(images[held], ours, patients[~held]).any()


def test_the_audit_says_nothing_of_storage_where_the_files_bytes_do_not_separate():
    """Bytes per pixel at chance as stored, the re-encoded content separating (the disease's own texture, as on
    the demo): no 'follows the pixels' line, and bytes per pixel stays a tested attribute."""
    items, folds = audit_items(200, seed=4)
    rng = np.random.default_rng(0)
    for it in items:
        it["bytes_per_pixel"] = float(rng.uniform(2.0, 2.01))
        it[audit.CONTENT] = float(rng.normal(0.8 + 0.05 * (it["label"] == "sick"), 0.01))
    report = run_audit(items, folds)
    assert "bytes_per_pixel" in report["auc_by_attribute"] and report["content_auc"] > 0.9
    assert "follow the films' pixels" not in audit.describe(report)


def test_runs_and_folders_made_before_a_fact_was_recorded_are_still_read(demo_data, tmp_path, capsys):
    """A run folder whose config.json predates frozen_files and clip_heads resumes and pools with a new one; a data
    folder whose settings predate the key's record is prepared again without a refusal."""
    runs = tmp_path / "runs"
    for f in (1, 2):
        train.main(train_args(demo_data, runs / f"fold{f}", "--epochs", "1", "--fold", str(f)))
    old = {k: v for k, v in C.read_config(runs / "fold1").items() if k not in C.RECORDED}
    (runs / "fold1/config.json").write_text(json.dumps(old))
    capsys.readouterr()
    train.main(train_args(demo_data, runs / "fold1", "--epochs", "1"))
    assert "this run is finished" in capsys.readouterr().out
    assert ev.main(["--runs", str(runs), "--all", "--folds", "2"]) == 0
    src = pngs(tmp_path / "in", 6, lambda i: 40 * i)
    rows = [(f"im{i}.png", "ab"[i % 2]) for i in range(6)]
    rc, out = run_prepare(tmp_path, src, rows, "--folds", "2")
    meta = json.loads((out / "meta.json").read_text())
    del meta["settings"]["key"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert run_prepare(tmp_path, src, rows, "--folds", "2")[0] == 0
