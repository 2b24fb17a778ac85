"""
Checkpoints in the original formats with random values, for bench.py (the real sizes: OpenAI's
TorchScript ViT-L-14.pt, Meta's llama-7b/, a Hugging Face llama-7b-hf/) and for the tests (any
state dict as an OpenAI-style TorchScript archive). Nothing here is read by training or evaluation.
"""
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

import pneumollm as P


def rand(*shape):
    return torch.empty(shape, dtype=torch.float16).normal_(0, 0.02)


def write_full(d: Path):
    """OpenAI's TorchScript ViT-L-14.pt (visual tower), Meta's llama-7b/ (one consolidated.00.pth) and a
    Hugging Face llama-7b-hf/ (5 safetensors shards + index), all fp16 with random values."""
    p = P.LlamaArgs(vocab_size=32000)
    layer = {f"attention.w{x}.weight": (4096, 4096) for x in "qkvo"}
    layer.update({"feed_forward.w1.weight": (p.hidden_dim(), 4096),
             "feed_forward.w2.weight": (4096, p.hidden_dim()), "feed_forward.w3.weight": (p.hidden_dim(), 4096),
             "attention_norm.weight": (4096,), "ffn_norm.weight": (4096,)})
    sd = {"tok_embeddings.weight": rand(32000, 4096), "norm.weight": rand(4096),
          "output.weight": rand(32000, 4096)}
    sd.update({f"layers.{i}.{k}": rand(*s) for i in range(p.n_layers) for k, s in layer.items()})
    (d / "llama-7b").mkdir(parents=True)
    params = dict(dim=4096, multiple_of=256, n_heads=32, n_layers=32, norm_eps=1e-6, vocab_size=-1)
    (d / "llama-7b/params.json").write_text(json.dumps(params))
    torch.save(sd, d / "llama-7b/consolidated.00.pth")
    hf = {"model.embed_tokens.weight": sd.pop("tok_embeddings.weight"), "model.norm.weight": sd.pop("norm.weight"),
          "lm_head.weight": sd.pop("output.weight")}
    names = {"attention.w": "self_attn.", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for k in list(sd):
        new = "model." + k
        for a, b in names.items():
            new = new.replace(a, b)
        hf[re.sub(r"self_attn\.([qkvo])\.", r"self_attn.\1_proj.", new)] = sd.pop(k)
    (d / "llama-7b-hf").mkdir()
    config = dict(hidden_size=4096, intermediate_size=p.hidden_dim(), num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=32000,
                  torch_dtype="float16")
    (d / "llama-7b-hf/config.json").write_text(json.dumps(config))
    keys, weight_map = list(hf), {}
    for i, chunk in enumerate([keys[j::5] for j in range(5)]):
        name = f"model-{i + 1:05d}-of-00005.safetensors"
        save_file({k: hf.pop(k) for k in chunk}, str(d / "llama-7b-hf" / name))
        weight_map.update({k: name for k in chunk})
    (d / "llama-7b-hf/model.safetensors.index.json").write_text(json.dumps(dict(weight_map=weight_map)))
    write_vit(d)


def write_vit(d: Path):
    """OpenAI's TorchScript ViT-L-14.pt (the visual tower only), fp16 with random values."""
    v = P.VisionArgs()
    grid = v.image_size // v.patch_size
    clip = {"conv1.weight": rand(v.width, 3, v.patch_size, v.patch_size), "class_embedding": rand(v.width),
            "positional_embedding": rand(grid * grid + 1, v.width), "proj": rand(v.width, 768)}
    clip.update({f"{ln}.{x}": rand(v.width) for ln in ("ln_pre", "ln_post") for x in ("weight", "bias")})
    for i in range(v.layers):
        b, w = f"transformer.resblocks.{i}.", v.width
        shapes = {"attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
                  "attn.out_proj.bias": (w,), "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,),
                  "mlp.c_proj.weight": (w, 4 * w), "mlp.c_proj.bias": (w,)}
        clip.update({b + k: rand(*s) for k, s in shapes.items()})
        clip.update({b + f"{ln}.{x}": rand(w) for ln in ("ln_1", "ln_2") for x in ("weight", "bias")})
    save_torchscript({"visual." + k: t for k, t in clip.items()}, d / "ViT-L-14.pt")


def save_torchscript(sd: dict, path: Path):
    """A TorchScript archive holding `sd`'s tensors under their dotted names, as OpenAI's ViT-L-14.pt does."""
    root = torch.nn.Module()
    for k, t in sd.items():
        *parents, leaf = k.split(".")
        m = root
        for part in parents:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    torch.jit.save(torch.jit.script(root), str(path))
