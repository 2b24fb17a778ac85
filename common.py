"""
What the scripts share about models and runs, so that no script imports another: a model built from
a run's config.json (its frozen checkpoints pinned), prediction, the runtime and ablation flags, the
run folder's state (finished, resumable), and one experiment's folds. (The image normalisation is
pneumollm.normalise; the data folder's contract is folders.py; the metrics are metrics.py; the CPU
dtype policy is cpu_policy.py.)

A run folder (out/<data>/fold<N>/) holds config.json, the only record of how the run was made:
every flag of train.py under its own name (the ablation flags are PneumoArgs' field names) as the
run used it, plus what the data folder says (classes, crop, size, fingerprint) and the frozen
checkpoints' fingerprints.
"""
import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from safetensors.torch import load_file, save_file

import pneumollm as P
from cpu_policy import DTYPES, for_cpu_scoring
from folders import Data, Help, UserError, changed, pid_alive

RUNTIME = ("device", "threads", "compile", "checkpoint_vit", "restart")  # may differ when a run resumes
RECORDED = ("frozen_files", "clip_heads")  # facts newer runs record: a run made before them is compared without


def runtime_flags(ap, scoring=False):
    """Flags that change where and how fast a script runs, not what it computes: train.py's (--compile),
    or a scoring script's (--cpu-dtype; the device defaults to the run's)."""
    device = "the run's" if scoring else "cuda if this torch sees a GPU, else cpu"
    ap.add_argument("--device", default=None if scoring else "cuda" if torch.cuda.is_available() else "cpu",
                    help=f"cpu, cuda or cuda:N (default: {device})")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: as many as the cores idle when it "
                    "starts, at least 1)")
    if scoring:
        ap.add_argument("--cpu-dtype", choices=["auto", "stored", *DTYPES], default="auto",
                        help="on a CPU, the dtype the frozen ViT and LLaMA compute in: auto measures which this CPU "
                        "multiplies fastest (docs/performance.md); stored keeps the checkpoints'")
    else:
        ap.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead",
                                                                           "max-autotune"],
                        help="torch.compile the model; reduce-overhead also replays CUDA graphs (GPU)")


def scoring_flags(description: str):
    """The parser every scoring script starts from: --runs and --fold, --sensitivity, the runtime flags."""
    ap = argparse.ArgumentParser(description=description, formatter_class=Help)
    ap.add_argument("--runs", default="out/demo", help="folder holding fold1/, fold2/, ... from train.py")
    ap.add_argument("--fold", type=int, default=1, help="the fold whose run is read")
    ap.add_argument("--sensitivity", type=float, help="the threshold reaching this sensitivity on validation "
                    "(default: the rule eval.py --fold saved, else Youden's J)")
    runtime_flags(ap, scoring=True)
    return ap


def scoring_options(ap, argv, model=True):
    """A scoring script's flags, --sensitivity checked, and --threads applied where a `model` will run
    (measuring the idle cores takes 0.2 s)."""
    opt = ap.parse_args(argv)
    if opt.sensitivity is not None and not 0 < opt.sensitivity <= 1:
        raise UserError(f"--sensitivity {opt.sensitivity}: give a fraction in (0, 1], e.g. 0.9")
    if model:
        apply_threads(opt.threads)
    return opt


def ablation_flags(ap):
    """The model's flags (train.py's; bench.py --variant), named after PneumoArgs fields; returns the group."""
    g = ap.add_argument_group("ablations (README: Ablations)",
                              "flags named after PneumoArgs fields; the defaults are PneumoLLM as published")
    on = dict(action=argparse.BooleanOptionalAction, default=True)  # --x / --no-x
    g.add_argument("--engine", choices=["multi", "coop", "cocoop", "none"], default="multi", help="Table 6")
    g.add_argument("--n-diag", type=int, default=4, help="K diagnosis tokens, Fig. 6b (with an --engine other "
                   "than none)")
    g.add_argument("--cls-blocks", type=blocks, help="1-based ViT blocks giving CLS tokens, e.g. 12,24 "
                   "(default: 4, 8, ..)")
    g.add_argument("--emitter", **on, help="Eq. 2's mask (Table 6; with an --engine other than none)")
    g.add_argument("--vit-adapters", **on, help="Table 6")
    g.add_argument("--llm-adapters", **on, help="Table 6")
    g.add_argument("--llm", **on, help="Table 4: --no-llm reads no LLaMA")
    g.add_argument("--encoder", choices=["clip", "conv"], default="clip", help="Fig. 6a (clip: any CLIP ViT file)")
    g.add_argument("--adapter-dropout", type=float, default=0.1, help="dropout inside every adapter")
    g.add_argument("--train-engine", **on, help="the authors' code: no (with an --engine other than none)")
    return g


def blocks(text: str) -> list:
    if not all(b.strip().isdigit() for b in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: give 1-based block numbers separated by commas, e.g. 12,24")
    return [int(b) for b in text.split(",")]


def apply_threads(n):
    """--threads, or as many as the cores left idle now (at least one): torch's default, one per core,
    ran the tiny demo at 1.8x the time of one thread while another job held both cores of a 2-core
    machine (docs/performance.md)."""
    if n is not None and n < 1:
        raise UserError(f"--threads {n}: give 1 or more")
    idle = None if n else idle_cores()
    if n or idle is not None:  # else torch's own choice, where /proc/stat is not to be read
        torch.set_num_threads(n or max(1, min(os.cpu_count() or 1, round(idle))))


def idle_cores(window=0.2):
    """How many cores sat idle over the next `window` seconds (Linux's /proc/stat), or None. Not the load
    average: it lags a minute, and counts this user's job that just ended."""
    def ticks():  # (all, idle + iowait) since boot, summed over the cores
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    try:
        (t0, i0), _, (t1, i1) = ticks(), time.sleep(window), ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (i1 - i0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------
# a model from a run's config


def pneumo_fields(cfg: dict) -> dict:
    """The PneumoArgs fields that a run's config sets (flags carry the fields' names; --llama is a path)."""
    names = {f.name for f in fields(P.PneumoArgs)} - {"vision", "llama"}
    return {k: cfg[k] for k in names if k in cfg}


def build(cfg: dict, as_stored=False) -> P.PneumoLLM:
    """The run's model with fresh trainable weights (seeded): tiny and random (--model random), or from
    the checkpoints (--model tiny: the demo's, from pretrain.py), whose frozen weights are cast to the
    run's dtype, or kept as stored (memory-mapped where the file allows it, never copied)."""
    device, dtype = torch.device(cfg["device"]), None if as_stored else DTYPES[cfg["dtype"]]
    torch.manual_seed(cfg["seed"])
    kw = dict(pneumo_fields(cfg), n_classes=len(cfg["classes"]))
    try:  # flags are checked again against the real shapes (e.g. --cls-blocks beyond the ViT's blocks)
        if cfg["model"] == "random":
            model = P.PneumoLLM(P.tiny_args(vocab_size=cfg.get("vocab_size", -1), **kw)).to(device)
            return cast_frozen(model, dtype) if dtype else model
    except ValueError as e:
        raise UserError(f"{e} (check the ablation flags)") from None
    for path, needed in ((cfg["clip"], kw["encoder"] == "clip"), (cfg["llama"], kw["llm"])):
        if needed and not Path(path).exists():
            raise UserError(f"{path} not found: " + ("python pretrain.py writes the tiny model's checkpoints "
                            "(train.py --model tiny does at its default paths)" if cfg["model"] == "tiny" else
                            "PneumoLLM needs OpenAI's ViT-L-14.pt (--clip) and LLaMA-7B as Meta or Hugging Face "
                            "ship it (--llama); docs/checkpoints.md says what to put where; --model tiny runs on the "
                            "demo's small checkpoints instead"))
    try:
        return P.from_pretrained(cfg["clip"], cfg["llama"] if kw["llm"] else None, device, dtype,
                                 cfg.get("clip_act"), cfg.get("clip_heads"), **kw)
    except P.CheckpointError:
        raise
    except ValueError as e:  # PneumoArgs against the checkpoints' shapes
        raise UserError(f"{e} (check the ablation flags)") from None


def frozen_files(cfg: dict) -> dict:
    """{--clip/--llama path: fingerprint} of the checkpoints the run reads: what train.py pins in config.json,
    so that a replaced file (the same shapes, other weights) is refused instead of silently scored."""
    used = (("clip", cfg["encoder"] == "clip"), ("llama", cfg["llm"]))
    return {cfg[k]: fingerprint(Path(cfg[k])) for k, on in used if on and cfg[k] and Path(cfg[k]).exists()}


def fingerprint(path: Path, blocks=16, block=2**16) -> str:
    """Cheap: each file's name and size and a hash of `blocks` evenly spaced blocks of it (a folder: every
    file in it, in name order)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else ''} {size}\n".encode())
        with open(f, "rb") as fh:
            for k in range(blocks):
                fh.seek(k * max(size - block, 0) // max(blocks - 1, 1))
                h.update(fh.read(block))
    return h.hexdigest()[:16]


def check_frozen_files(cfg: dict, run):
    """The run's checkpoints as they were when it trained, or one line naming the one that changed."""
    for path, pinned in cfg.get("frozen_files", {}).items():
        if not Path(path).exists():
            continue  # build() names a missing checkpoint
        if fingerprint(Path(path)) != pinned:
            raise UserError(f"{path} is not the checkpoint {run} was trained with (its contents changed since); "
                            "restore that file, or train the run again (train.py --restart) on this one")


def cast_frozen(model: P.PneumoLLM, dtype) -> P.PneumoLLM:  # from_pretrained's dtype policy for a random model
    for p in model.frozen_parameters():  # CLIP's and LLaMA's weights in `dtype`; this project's stay fp32
        p.data = p.data.to(dtype)
    return model


def check_same_runs(cfgs: dict):
    """Folds pooled into one figure (eval.py --all, --ensemble) must be one experiment: the same data folder
    as prepared then, the same classes, the same settings; else one line naming the first difference."""
    (f0, first), *rest = cfgs.items()
    for f, cfg in rest:
        diff = changed(first, cfg, RUNTIME + ("fold", "out", "dtype") + unrecorded(first, cfg))
        if diff:
            k = min(diff, key=lambda k: ("data", "classes", "data_fingerprint", k).index(k))  # the telling one first
            raise UserError(f"fold {f} is not the experiment of fold {f0}: its {k} is {cfg.get(k)!r}, fold {f0}'s "
                            f"{first.get(k)!r}{' and more' if len(diff) > 1 else ''}; evaluate them apart, or train "
                            f"fold {f} again as fold {f0} was ({train_command(first, f, cfg['out'])} --restart)")


def unrecorded(*cfgs) -> tuple:  # the RECORDED facts one of these configs (an older run's) lacks
    return tuple(k for k in RECORDED if not all(k in c for c in cfgs))


def train_command(cfg: dict, fold: int, out) -> str:
    """The train.py command that makes fold `fold` of the experiment `cfg` (a sibling's config) in `out`."""
    return shlex.join(["python", "train.py", "--data", cfg["data"], "--model", cfg["model"], "--fold", str(fold),
                       "--out", str(out)])


def read_config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def finished(run: Path) -> bool:
    return (run / "predictions.csv").exists()


def check_finished(run: Path, fold: int):
    """Evaluation reads finished runs only: an interrupted run's weights are not the run's result."""
    if finished(run):
        return
    if not (run / "config.json").exists():
        other = next(run.parent.glob("fold*/config.json"), None)  # a sibling run names the data folder
        folds = Data(json.loads(other.read_text())["data"]).folds if other else [fold]
        if fold not in folds:
            raise UserError(f"--fold {fold}: the runs in {run.parent} are of a data folder with folds {folds}")
        how = train_command(json.loads(other.read_text()), fold, run) if other else \
            f"python train.py --data DIR --fold {fold} --out {run}"
        raise UserError(f"{run}: no run there; train it first: {how}")
    cfg = read_config(run)
    epoch = read_state(run)["epoch"] if (run / "state.pt").exists() else 0
    lock = run / ".lock"
    pid = lock.read_text().strip() if lock.exists() else ""
    if pid.isdigit() and pid_alive(int(pid)):
        raise UserError(f"{run}: still training (process {pid}, epoch {epoch} of {cfg['epochs']} done); evaluate "
                        "it when it finishes")
    raise UserError(f"{run}: training stopped at epoch {epoch} of {cfg['epochs']}; run the same train.py command "
                    "again to finish it (it resumes)")


def read_state(run: Path) -> dict:
    """A run's resume point (train.py's state.pt) on the CPU, whatever device wrote it; tensors only."""
    try:
        return P.read_tensors(run / "state.pt")
    except P.CheckpointError as e:  # truncated, or it would build more than tensors: never unpickled with code
        raise UserError(f"{e}; pass --restart to train the run again from scratch") from None


def save_trainable(model: P.PneumoLLM, path):
    """Only this project's own weights (a few MB); the run's config.json says how to rebuild the rest."""
    save_file({n: p.detach().contiguous() for n, p in model.own_state_dict().items()}, str(path))


@torch.no_grad()
def load_trainable(model: P.PneumoLLM, source):
    """This project's own weights, from a file that save_trainable wrote or a {name: tensor} dict."""
    where = "the given weights" if isinstance(source, dict) else str(source)
    try:
        source = source if isinstance(source, dict) else load_file(where)
    except Exception as e:  # truncated or not safetensors: one line
        raise P.CheckpointError(f"{where}: not a readable safetensors file ({type(e).__name__})") from None
    own = model.own_state_dict()
    if set(source) != set(own):
        raise P.CheckpointError(f"{where}: trainable keys do not match this model, e.g. "
                                f"{sorted(set(source) ^ set(own))[:3]}")
    for name, t in source.items():
        if t.shape != own[name].shape:
            raise P.CheckpointError(f"{where}: {name} is {list(t.shape)}, expected {list(own[name].shape)}")
        own[name].copy_(t)


def load_run(run: Path, device=None, keep_checkpoint_dtype=False, cpu_dtype="auto") -> tuple[P.PneumoLLM, dict]:
    """A finished run's model with the weights of its chosen epoch, and its config. On a CPU,
    keep_checkpoint_dtype scores with the frozen weights read as the checkpoints store them (memory-
    mapped, never copied: LLaMA-7B in fp32 would need 27 GB), then each part put in the dtype this CPU
    multiplies fastest (for_cpu_scoring; `cpu_dtype` forces one, "stored" keeps them), without autocast;
    LLaMA's conversion goes on in the background while the caller reads its films."""
    cfg = read_config(run)
    check_frozen_files(cfg, run)
    cfg["device"] = device or available(cfg["device"])
    as_stored = keep_checkpoint_dtype and cfg["device"] == "cpu"
    model = build(cfg, as_stored=as_stored)
    load_trainable(model, run / "best.safetensors")
    if as_stored:
        cfg["dtype"] = "as stored"
        if cpu_dtype != "stored":
            cfg["cpu_scoring"] = for_cpu_scoring(model, None if cpu_dtype == "auto" else cpu_dtype, background=True)
            print(cfg["cpu_scoring"])
    return model, cfg


def available(device: str) -> str:
    """The run's device where this machine has it: cuda:N with fewer GPUs is cuda; no GPU at all is cpu."""
    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    index = torch.device(device).index
    return device if index is None or index < torch.cuda.device_count() else "cuda"


def tokenize_question(cfg: dict):
    """Adds question_ids and vocab_size to cfg, so that the run can be rebuilt without the tokenizer."""
    if not cfg["tokenizer"] and not cfg["llama"]:
        raise UserError("--question: --model random has no LLaMA folder to find the tokenizer in; pass --tokenizer")
    llama = Path(cfg["llama"] or "")
    near = [p for p in (llama / "tokenizer.model", llama.parent / "tokenizer.model") if p.exists()]
    path = cfg["tokenizer"] or (near + [llama / "tokenizer.model"])[0]
    cfg["question_ids"], cfg["vocab_size"] = tokenize(path, cfg["question"])
    print(f"question {cfg['question']!r}: {len(cfg['question_ids'])} tokens (with BOS)")


def tokenize(tokenizer, text: str) -> tuple[list, int]:
    """The question as LLaMA reads it: BOS + the pieces of LLaMA's sentencepiece `tokenizer.model`.
    Returns (token ids, vocabulary size)."""
    if not Path(tokenizer).is_file():
        raise UserError(f"{tokenizer}: no sentencepiece tokenizer.model there (it ships with LLaMA); "
                        "pass --tokenizer")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    return [sp.bos_id()] + sp.encode(text), sp.vocab_size()


# ------------------------------------------------------------------------------------------------
# images in, probabilities out


def autocast(cfg):
    if cfg["dtype"] in ("fp32", "as stored"):
        return nullcontext()
    return torch.autocast(torch.device(cfg["device"]).type, dtype=DTYPES[cfg["dtype"]])


@torch.no_grad()
def predict(model, images, cfg, batch=32, progress=False) -> np.ndarray:  # (N, C): softmax, or sigmoids
    """Probabilities in batches (sigmoids if multi-label); `progress`: a line on stderr every 10 s."""
    model.eval()
    out, last = [], time.time()
    for i in range(0, len(images), batch):
        if progress and time.time() - last > 10:
            print(f"  {i}/{len(images)} images scored", file=sys.stderr)
            last = time.time()
        x = torch.as_tensor(images[i:i + batch]).to(cfg["device"])
        x = P.normalise(x, model.args.vision.image_size, cfg["norm"])
        with autocast(cfg):
            logits = model(x).float()
        out.append((logits.sigmoid() if cfg.get("multi_label") else logits.softmax(-1)).cpu())
    return torch.cat(out).numpy()
