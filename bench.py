"""
Speed and memory of one training step and of inference, at a given size, with random weights (no
checkpoint needed). Prints figures; nothing here is a test.

    python bench.py --model tiny                                  # CPU
    python bench.py --model full --device cuda --dtype fp16       # ViT-L/14 + LLaMA-7B shapes
    python bench.py --prepare ../shared/data/nih_cxr_pneumonia/labels.csv   # prepare.py now and before
    python bench.py --load /tmp/full                              # real-size scoring on a CPU (~28 GB of disk)
    python bench.py --read-vit /tmp/vit                           # the TorchScript ViT-L/14's reading memory
    python bench.py --suite --model full                          # on a GPU: training configurations side by side
"""
import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import common as C
import formats
import fullsize
import pneumollm as P
from folders import Data, Help
from lungcrop import LUNG_REGION, lung_fields


def mid_args(**kw) -> P.PneumoArgs:  # between tiny and full: a quick look at how figures scale
    kw["cls_blocks"] = kw.get("cls_blocks") or [2, 4, 6, 8]
    return P.PneumoArgs(P.VisionArgs(256, 8, 4, 14, 224), P.LlamaArgs(dim=512, n_layers=4, n_heads=8), **kw)


SIZES = {"tiny": P.tiny_args, "mid": mid_args, "full": P.PneumoArgs}


SUITE = [  # full size, batch 16, each in a fresh process; most wanted first, in case time runs out
    "--dtype bf16 --compile reduce-overhead --checkpoint-vit", "--dtype bf16 --compile reduce-overhead",
    "--dtype bf16 --compile", "--dtype fp16 --compile reduce-overhead --checkpoint-vit", "--dtype bf16",
    "--dtype fp16", "--dtype bf16 --checkpoint-vit"]


def random_model(args, device, dtype):
    """The real shapes with random frozen weights, built on `meta` and filled in place on `device`."""
    with torch.device("meta"):
        model = P.PneumoLLM(args)
    g = torch.Generator(device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        if not p.requires_grad:
            t = torch.empty(p.shape, device=device, dtype=dtype)
            t.fill_(1.0) if "norm" in name or "ln_" in name else t.normal_(0, 0.02, generator=g)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, torch.nn.Parameter(t, requires_grad=False))
    P.materialise_own(model, device)
    return model


def bench_prepare(labels: str, against: str, workers: int, repeat: int):
    """prepare.py's images/s on a labelled folder, side by side with commit `against` (its tree taken
    from git): each in a fresh process with the same workers, into a fresh folder, taking turns
    `repeat` times; the medians and their ratio. Folders are deleted only at the end: ext4 is slow to
    create files for minutes after thousands were deleted, which would slow whichever run came next."""
    labels, here = Path(labels).resolve(), Path(__file__).resolve().parent
    n = sum(1 for _ in open(labels)) - 1
    rates = {f"before ({against})": [], "now": []}
    with tempfile.TemporaryDirectory() as d:
        tree = subprocess.run(["git", "archive", against], cwd=here, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", Path(d, "before").mkdir() or Path(d, "before")], input=tree, check=True)
        for i in range(repeat):  # each commit's prepare.py with its own modules beside it
            for name, script in zip(rates, (Path(d, "before/prepare.py"), here / "prepare.py")):
                out = Path(d, f"{name.split()[0]}{i}")
                flags = ["--images", labels.parent, "--labels", labels, "--out", out, "--key-file", Path(d, "key"),
                         "--workers", workers]
                t = time.perf_counter()
                subprocess.run([sys.executable, script, *map(str, flags)], check=True, capture_output=True,
                               cwd=script.parent)
                rates[name].append(n / (time.perf_counter() - t))
                print(f"prepare.py {name}: {n} images, {rates[name][-1]:.1f} images/s with {workers} workers")
    before, now = (statistics.median(r) for r in rates.values())
    print(f"median of {repeat}: {before:.1f} images/s before, {now:.1f} now = {now / before:.2f}x")


def bench_load(folder: str, threads, cpu_dtype):
    d = Path(folder)
    flags = (["--threads", str(threads)] if threads else []) + ["--cpu-dtype", cpu_dtype]
    if not (d / "ViT-L-14.pt").exists():  # random full-size checkpoints in both layouts, written once
        subprocess.run([sys.executable, __file__, "--load-step", "write", folder], check=True)
    for llama in ("llama-7b", "llama-7b-hf"):  # each in a fresh process, so that its peak RSS is its own
        for _ in range(3):  # the dtype choice, measured afresh each time (an empty cache): it must not flip
            with tempfile.TemporaryDirectory() as cache:
                subprocess.run([sys.executable, __file__, "--load-step", f"choice:{llama}", folder, *flags],
                               check=True, env=dict(os.environ, PNEUMOLLM_CACHE=cache))
        subprocess.run([sys.executable, __file__, "--load-step", llama, folder, *flags], check=True)


def suite(model: str):
    for flags in SUITE:
        command = [sys.executable, __file__, "--model", model, *shlex.split(flags)]
        run = subprocess.run(command, capture_output=True, text=True)
        lines = run.stdout.splitlines() if run.returncode == 0 else [f"FAILED ({run.returncode}): {run.stderr[-600:]}"]
        print(f"== {flags}\n" + "\n".join(lines), flush=True)


def spread(folders: list):
    """What a thumbnail sees, per film of prepared folders (the 224 px crops): the lung fields' mean and
    contrast (lungcrop's approximate fields), the body's width and centre (columns brighter than half
    way up the mid-rows' profile), the noise (the fields' pixels minus a 3 x 3 box blur); 5/50/95 % and
    each class's mean."""
    for folder in map(Path, folders):
        data = Data(folder)
        fields = lung_fields(LUNG_REGION, int(data.meta["settings"]["size"]))
        per = []
        for img in data.images(data.rows)[:, 0]:
            x = img.astype(np.float32)
            blur = np.asarray(Image.fromarray(img).filter(ImageFilter.BoxBlur(1)), np.float32)
            profile = x[len(x) * 3 // 10:len(x) * 7 // 10].mean(0)
            body = profile > profile.min() + 0.5 * (profile.max() - profile.min())
            per.append([x[fields].mean(), x[fields].std(), body.mean(), np.flatnonzero(body).mean() / len(body) - 0.5,
                        (x - blur)[fields].std()])
        per, labels = np.array(per), np.array([r["label"] for r in data.rows])
        print(f"{folder} ({len(per)} films)")
        for k, name in enumerate(("lung mean", "lung contrast", "body width", "body centre", "noise")):
            v, means = per[:, k], ", ".join(f"{c} {per[labels == c, k].mean():.3f}" for c in data.classes)
            print(f"  {name:13s} 5/50/95 %: " + " ".join(f"{q:8.3f}" for q in np.percentile(v, [5, 50, 95]))
                  + f"  sd {v.std():7.3f}; per class: {means}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    ap.add_argument("--prepare", metavar="LABELS", help="time prepare.py on this label file's images, side by "
                    "side with --against")
    ap.add_argument("--against", default="c812046", help="a git commit whose prepare.py --prepare also times, side by "
                    "side (default: c812046, an earlier commit of this repository)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="prepare.py's processes for --prepare")
    ap.add_argument("--repeat", type=int, default=3, help="--prepare: runs of each, taking turns (medians)")
    ap.add_argument("--model", choices=list(SIZES), default="tiny", help="full: ViT-L/14 + LLaMA-7B, random")
    ap.add_argument("--dtype", choices=list(C.DTYPES), help="frozen weights, autocast (default: fp16 GPU, fp32 CPU)")
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--iters", type=int, default=10, help="timed steps (after the warm-up)")
    C.runtime_flags(ap)
    ap.add_argument("--checkpoint-vit", action="store_true", help="recompute ViT activations in the backward")
    ap.add_argument("--load", metavar="DIR", help="write full-size random checkpoints to DIR (once); time loading "
                    "and scoring on a CPU")
    ap.add_argument("--cpu-dtype", choices=["auto", "stored", *C.DTYPES], default="auto",
                    help="--load: the frozen parts' dtype, as the scoring scripts' --cpu-dtype")
    ap.add_argument("--load-step", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--read-vit", metavar="DIR", help="write a random ViT-L/14 TorchScript to DIR (once); the memory "
                    "of reading it, mapped and as the earlier reader copied it")
    ap.add_argument("--suite", action="store_true", help="the GPU figures: " + "; ".join(SUITE))
    ap.add_argument("--variant", default="", help='train.py ablation flags, e.g. --variant="--no-llm"')
    ap.add_argument("--spread", nargs="+", metavar="DATA", help="prepared folders: how much their films vary in "
                    "what a thumbnail sees (docs/demo.md)")
    return ap


@contextmanager
def sync_warnings(device):
    """Records torch.cuda.set_sync_debug_mode("warn")'s warnings (the first line of each) on a GPU."""
    if device.type != "cuda":
        yield []
        return
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = []
        yield seen
    torch.cuda.set_sync_debug_mode(0)
    seen += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


def bench_model(opt):
    """A training step and inference (with adapters, then merged) at the size and variant asked for."""
    device = torch.device(opt.device)
    opt.dtype = opt.dtype or ("fp32" if device.type == "cpu" else "fp16")
    dtype = C.DTYPES[opt.dtype]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {name}, frozen {opt.dtype}, torch {torch.__version__}, compile {opt.compile}, "
          f"checkpoint-vit {opt.checkpoint_vit}, model {opt.model} {opt.variant}, batch {opt.batch}")
    t = time.perf_counter()
    flags = argparse.ArgumentParser()
    C.ablation_flags(flags)
    variant = C.pneumo_fields(vars(flags.parse_args(shlex.split(opt.variant))))
    model = random_model(SIZES[opt.model](**variant), device, dtype)
    model.visual.grad_checkpointing = opt.checkpoint_vit
    n = sum(p.numel() for p in model.trainable_parameters())
    print(f"built in {time.perf_counter() - t:.1f}s, {n:,} trainable")
    fwd = torch.compile(model, mode=opt.compile) if opt.compile else model
    res = model.args.vision.image_size
    x = torch.randn(opt.batch, 3, res, res, device=device)
    amp = torch.autocast(device.type, dtype=dtype, enabled=opt.dtype != "fp32")
    warm = 2 if not opt.compile else 4
    time_training(model, fwd, x, amp, warm, opt)

    @torch.no_grad()
    def infer():
        with amp:
            fwd(x)

    model.eval()
    s_unmerged = fullsize.timed(infer, device, 2, opt.iters)[1]
    model.merge_adapters()
    fwd = torch.compile(model, mode=opt.compile) if opt.compile else model
    s_merged = fullsize.timed(infer, device, warm, opt.iters)[1]
    print(f"inference: {opt.batch / s_unmerged:.1f} images/s with adapters, {opt.batch / s_merged:.1f} merged")


def time_training(model, fwd, x, amp, warm: int, opt):
    """train.py's step (AdamW, GradScaler, autocast): its median time, peak memory, host syncs (GPU)."""
    device = x.device
    y = torch.randint(0, model.args.n_classes, (opt.batch,), device=device)
    adamw = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type)  # as train.py: on every dtype, no host sync with the fused AdamW

    def step():
        with amp:
            loss = F.cross_entropy(fwd(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(adamw)
        scaler.update()
        adamw.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    with sync_warnings(device) as syncs:  # on a GPU: every host sync of the step, and Inductor's cudagraph skips
        first, s = fullsize.timed(step, device, warm, opt.iters)
    if device.type == "cuda":
        skips = dict(torch._dynamo.utils.counters.get("inductor", {})).get("cudagraph_skips", 0)
        print(f"host syncs in the timed steps: {len(syncs)}" + "".join(f"\n  {w}" for w in sorted(set(syncs))[:5])
              + f"; cudagraph skips: {skips}")
    gpu = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    steps = 100 * -(-504 // 16) * s * 16 / opt.batch  # seconds of steps for 100 epochs of 504 images at batch 16
    print(f"train step: {1000 * s:.1f} ms median, {opt.batch / s:.1f} images/s, "
          f"peak {'GPU' if gpu else 'RSS'} memory {peak:.2f} GiB")
    print(f"first step {first:.1f} s (compilation and warm-up); projected 100 epochs on 504 images at batch 16: "
          f"{steps / 60:.2f} min of steps, {(first + steps) / 60:.2f} min with the first step")


def main(argv=None):
    opt = parser().parse_args(argv)
    C.apply_threads(opt.threads)
    if opt.suite:
        return suite(opt.model)
    if opt.spread:
        return spread(opt.spread)
    if opt.prepare:
        return bench_prepare(opt.prepare, opt.against, opt.workers, opt.repeat)
    if opt.load:
        return bench_load(opt.load, opt.threads, opt.cpu_dtype)
    if opt.read_vit:
        return fullsize.read_vit(Path(opt.read_vit))
    if opt.load_step:
        step, folder = opt.load_step
        d = Path(folder)  # the floors once, with Meta's layout
        if step.startswith("choice:"):
            return fullsize.choice(d / "ViT-L-14.pt", d / step.split(":")[1])
        if step == "write":
            return formats.write_full(d)
        return fullsize.load_full(d / "ViT-L-14.pt", d / step, step == "llama-7b", opt.cpu_dtype)
    return bench_model(opt)


if __name__ == "__main__":
    main()
