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
import copy
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
import cpu_policy as CP
import formats
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


def timed(fn, device, warmup, iters) -> tuple[float, float]:
    """(first call, median of `iters` calls after `warmup` more) in s; the first pays for compiling and so on."""
    times = []
    for _ in range(1 + warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times[1 + warmup:])


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


def bench_read_vit(d: Path):  # from here: full size, random ViT-L/14 and LLaMA-7B files in the real layouts
    """The TorchScript ViT-L/14 read as eval.py reads it, in a fresh process: private memory (RssAnon)
    and file pages (RssFile) after reading and after touching every weight, against the file's size and
    against the earlier reader, which copied each record into memory."""
    if not (d / "ViT-L-14.pt").exists():
        formats.write_vit(d.mkdir(parents=True, exist_ok=True) or d)
    size = (d / "ViT-L-14.pt").stat().st_size / 2**30
    for how in ("mapped", "copied"):
        code = ("import sys, zipfile, torch, pneumollm as P, bench\n"
                "path, how = P.Path(sys.argv[1]), sys.argv[2]\n"
                "before = bench.status('RssAnon'), bench.status('RssFile')\n"
                "if how == 'mapped':\n"
                "    t = P.read_torchscript(path)\n"
                "else:  # the earlier reader: each record read into a bytearray\n"
                "    z = zipfile.ZipFile(path)\n"
                "    t = {n: torch.frombuffer(bytearray(z.read(n)), dtype=torch.uint8) for n in z.namelist()\n"
                "         if '/data/' in n and z.getinfo(n).file_size}\n"
                "total = sum(float(v.float().sum()) for v in t.values())  # every page touched\n"
                "print(*(f'{bench.status(k) - b:.2f}' for k, b in zip(('RssAnon', 'RssFile'), before)))\n")
        out = subprocess.run([sys.executable, "-c", code, str(d / "ViT-L-14.pt"), how], capture_output=True,
                             text=True, cwd=Path(__file__).parent)
        anon, file = out.stdout.split() if out.returncode == 0 else ("?", out.stderr[-300:])
        print(f"ViT-L-14.pt ({size:.2f} GiB) {how}: private memory +{anon} GiB, file pages +{file} GiB")


def usage() -> tuple:  # this process's CPU seconds so far (user, kernel) and page faults
    return *os.times()[:2], resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def status(key: str) -> float:  # GiB, from /proc/self/status: VmRSS, VmHWM (peak), RssAnon, RssFile
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) / 2**20


GOALS = dict(batch=0.6, one=2.0, startup=20.0, rss=1.15)  # s per image at 16, s for one, s, x the files


def load_full(clip: Path, llama: Path, floors=False, cpu_dtype="auto"):
    """In a fresh process, scoring as eval.py does on a CPU (the frozen weights read as stored, memory-
    mapped; then common.for_cpu_scoring's measured dtypes; common.predict, no autocast): start-up from a
    cold page cache (the files' pages dropped first; reading and converting included), the first image,
    one image again, a batch of 16, peak RSS, each against its goal; with `floors`, where the time goes;
    last, one image with the weights as stored (after the peak RSS is read)."""
    files = [clip, *llama.glob("*")]
    for f in files if hasattr(os, "posix_fadvise") else []:  # as after a reboot, whichever layout ran last
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    size, t, before = sum(f.stat().st_size for f in files) / 2**30, time.perf_counter(), usage()
    model = P.from_pretrained(clip, llama, "cpu").eval()
    force = None if cpu_dtype == "auto" else cpu_dtype
    line = "weights as stored" if cpu_dtype == "stored" else CP.for_cpu_scoring(model, force)
    startup, (cpu, kernel, faults) = time.perf_counter() - t, (b - a for a, b in zip(before, usage()))
    print(f"{llama.name}: files {size:.2f} GiB; {torch.get_num_threads()} threads; {line}\n"
          f"  start-up {startup:.1f} s (goal {GOALS['startup']:.0f} s): CPU {cpu:.1f} s, kernel {kernel:.1f} s, "
          f"{faults / 1e6:.1f} M page faults (docs/performance.md: when new memory is slow)", flush=True)
    cfg, res = dict(device="cpu", dtype="as stored", norm="clip"), model.args.vision.image_size
    images = torch.randint(0, 256, (16, 1, res, res), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def measure(n: int, what: str, goal=None, tries=1) -> float:  # the fastest of `tries` calls
        ends = [time.perf_counter()]
        for _ in range(tries):
            C.predict(model, images[:n], cfg, batch=n)
            ends.append(time.perf_counter())
        s = min(b - a for a, b in zip(ends, ends[1:])) / n
        print(f"  {what}: {s:.3f} s per image" + (f" (goal {goal} s)" if goal else ""), flush=True)
        return s

    measure(1, "first image")
    one, batch = measure(1, "one image", GOALS["one"]), measure(16, "a batch of 16, best of 3", GOALS["batch"], 3)
    peak = status("VmHWM")
    print(f"  peak RSS {peak:.2f} GiB = {peak / size:.2f}x the files (goal {GOALS['rss']}x); now "
          f"{status('RssAnon'):.2f} GiB private, {status('RssFile'):.2f} GiB mapped from the files", flush=True)
    met = {k: v <= GOALS[k] for k, v in dict(batch=batch, one=one, startup=startup, rss=peak / size).items()}
    print("  goals met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()), flush=True)
    if floors:
        floor(clip, model, P.normalise(images, res, cfg["norm"]), batch)
    del model
    model = P.from_pretrained(clip, llama, "cpu").eval()
    measure(1, "one image with the weights as stored (no conversion)")


def flops(a: P.PneumoArgs) -> tuple[int, int]:
    """Multiply-add FLOPs per image of the ViT (patch embedding; q/k/v, out, MLP, QK^T and AV in each block
    up to the last one kept) and of LLaMA on its T tokens (q/k/v/o, SwiGLU, QK^T and AV); the engine,
    projection, adapters and head add well under 0.1 %."""
    v, l = a.vision, a.llama
    patches, kv = (v.image_size // v.patch_size) ** 2, (l.n_kv_heads or l.n_heads) * (l.dim // l.n_heads)
    n, t = patches + 1, len(a.cls_blocks) + a.n_diag * (a.engine != "none")
    vit = 2 * patches * 3 * v.patch_size**2 * v.width + 2 * a.cls_blocks[-1] * n * (12 * v.width**2 + 2 * n * v.width)
    llama = 2 * l.n_layers * t * (2 * l.dim**2 + 2 * l.dim * kv + 3 * l.dim * l.hidden_dim() + 2 * t * l.dim)
    return vit, llama


def products_rate(blocks, rows: int, dtype) -> float:
    """GFLOP/s of the blocks' own products (x @ W.T for each frozen 2-D weight) on `rows` tokens in `dtype`,
    through as many distinct copies of one block as the part has (up to 1 GiB), streamed from memory as
    the model's are: a cache that holds one layer flatters its rate. Median of 3 passes after one."""
    shapes = [p.shape for p in blocks[0].parameters() if p.dim() == 2 and not p.requires_grad]
    copies = min(len(blocks), -(-2**30 // (sum(s.numel() for s in shapes) * dtype.itemsize)))
    weights = [torch.rand(s, dtype=dtype) for _ in range(copies) for s in shapes]
    x = {n: torch.rand(rows, n, dtype=dtype) for n in {w.shape[1] for w in weights}}
    took = timed(lambda: [F.linear(x[w.shape[1]], w) for w in weights], torch.device("cpu"), 0, 3)[1]
    return 2 * rows * sum(w.numel() for w in weights) / took / 1e9


def floor(clip: Path, model: P.PneumoLLM, x, measured: float):
    """The floor: each part's FLOPs at the rate of its own products in this run (products_rate, 16 images'
    rows, the dtypes chosen), beside the rate the policy times (one square layer, reused); where the
    batch's time goes; then each dtype's precision."""
    vit, llama = flops(model.args)
    flop, parts = dict(ViT=vit, LLaMA=llama), CP.cpu_parts(model)
    chosen = dict(ViT=model.visual.conv1.weight.dtype, LLaMA=model.llama.norm.weight.dtype)  # never upcast per call
    rows = dict(ViT=16 * parts["ViT"][2], LLaMA=parts["LLaMA"][2])
    rate = {n: products_rate(parts[n][1], rows[n], chosen[n]) for n in parts}
    square = {n: CP.matmul_rate(rows[n], parts[n][3], chosen[n], chosen[n], False) for n in parts}
    print("  products at batch 16, GFLOP/s at their own shapes with their weights streamed (on one square layer "
          "reused): " + ", ".join(f"{n} in {chosen[n]} {rate[n]:.0f} ({square[n]:.0f})" for n in parts))
    at, cached = (sum(flop[n] / r[n] for n in parts) / 1e9 for r in (rate, square))
    print(f"  floor per image at batch 16: the FLOPs ({vit / 1e9:.1f} + {llama / 1e9:.1f} GFLOP) at those rates "
          f"{at:.3f} s (at the square layer's {cached:.3f} s); measured {measured:.3f} s = {measured / at:.2f}x the "
          f"floor ({measured / cached:.2f}x the square layer's)")
    p, n, k = model.args.llama, len(model.args.cls_blocks), model.args.n_diag
    h, mask = torch.randn(16, n + k, p.dim), P.emitter_mask(n, k)
    with torch.no_grad():  # each part alone on the batch, as the policy runs it
        took = dict(ViT=timed(lambda: model.visual(x), torch.device("cpu"), 0, 3)[1],
                    LLaMA=timed(lambda: model.llama(h.to(chosen["LLaMA"]), mask), torch.device("cpu"), 0, 3)[1])
    print("  where a batch of 16 goes, per image (medians of 3): " + ", ".join(
        f"{name} {took[name] / 16:.3f} s ({16 * flop[name] / took[name] / 1e9:.0f} GFLOP/s)" for name in parts))
    precision(clip, model, x, h, mask)


def precision(clip: Path, model: P.PneumoLLM, x, h, mask):
    """Each dtype against fp32 on the same fp16 weights: the ViT's CLS tokens on 2 images (folded as scoring
    runs it), one LLaMA layer's output on 16 x T tokens."""
    cos, sin = model.llama.rope_tables(h.shape[1], "cpu")
    fp16 = P.from_pretrained(clip, None, "cpu", llm=False).visual.eval()
    layer = P.TransformerBlock(model.args).eval()  # LLaMA-7B's layer shapes, random weights
    with torch.no_grad():
        for q in [*fp16.parameters(), *layer.parameters()]:  # the fp16-rounded weights in fp32: the reference
            q.data = q.data.to(torch.float16).float()
        cls_ref, out_ref = fp16(x[:2]), layer(h, cos, sin, mask)
        for d in ("fp16", "bf16"):
            t = C.DTYPES[d]
            vit_d, layer_d = copy.deepcopy(fp16), copy.deepcopy(layer).to(t)
            CP.fold_quick_gelu(vit_d.transformer.resblocks, t)  # as scoring on a CPU runs it
            vit_d.to(t)
            cls_d, out_d = vit_d(x[:2]).float(), layer_d(h.to(t), cos, sin, mask).float()
            err = [((a - b).norm(dim=-1) / b.norm(dim=-1)).max() for a, b in ((cls_d, cls_ref), (out_d, out_ref))]
            print(f"  {d} against fp32: the ViT's CLS tokens off by at most {err[0]:.1e} of their norm, "
                  f"a LLaMA layer's output by {err[1]:.1e}")


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


def choice(clip: Path, llama: Path):
    """The CPU dtype policy's choice and the rates behind it, for the real shapes (one fresh process)."""
    model = P.from_pretrained(clip, llama, "cpu").eval()
    parts = CP.choose_cpu_dtypes(model)
    print(f"  {llama.name}: " + "; ".join(f"{name} {d} {how} (prior {first}; GFLOP/s, best of {CP.TRIES}: "
                                         + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + ")"
                                         for name, (d, how, rates, _, first) in parts.items()), flush=True)


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
    s_unmerged = timed(infer, device, 2, opt.iters)[1]
    model.merge_adapters()
    fwd = torch.compile(model, mode=opt.compile) if opt.compile else model
    s_merged = timed(infer, device, warm, opt.iters)[1]
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
        first, s = timed(step, device, warm, opt.iters)
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
        return bench_read_vit(Path(opt.read_vit))
    if opt.load_step:
        step, folder = opt.load_step
        d = Path(folder)  # the floors once, with Meta's layout
        if step.startswith("choice:"):
            return choice(d / "ViT-L-14.pt", d / step.split(":")[1])
        return formats.write_full(d) if step == "write" else load_full(d / "ViT-L-14.pt", d / step, step == "llama-7b",
                                                               opt.cpu_dtype)
    return bench_model(opt)


if __name__ == "__main__":
    main()
