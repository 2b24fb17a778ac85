"""
The full-size model on a CPU, as bench.py --load and --read-vit measure it: random ViT-L/14 and LLaMA-7B
checkpoints in the real layouts (formats.write_full), read and scored as eval.py's scripts do, each
figure beside its goal and its floor; and the timer all of bench.py's figures use.
"""
import copy
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common as C
import cpu_policy as CP
import formats
import pneumollm as P


GOALS = dict(batch=0.6, one=2.0, startup=20.0, rss=1.15)  # s per image at 16, s for one, s, x the files


def load_full(clip: Path, llama: Path, floors=False, cpu_dtype="auto"):
    """In a fresh process, scoring as eval.py does on a CPU (the frozen weights read as stored, memory-
    mapped; then common.for_cpu_scoring's measured dtypes, LLaMA converted in the background; common.predict,
    no autocast), from a cold page cache (the files' pages dropped first): start-up (until the model takes
    images), the first image (which waits for the conversion) and the first score's time from the start,
    one image again, a batch of 16, peak RSS, each against its goal; the files' read from disk alone, the
    first score's floor; with `floors`, where a batch's time goes; last, one image with the weights as
    stored (after the peak RSS is read)."""
    files = [clip, *llama.glob("*")]
    for f in files:  # as after a reboot, whichever layout ran last
        uncache(f)
    size, t, before = sum(f.stat().st_size for f in files) / 2**30, time.perf_counter(), usage()
    model = P.from_pretrained(clip, llama, "cpu").eval()
    force = None if cpu_dtype == "auto" else cpu_dtype
    line = "weights as stored" if cpu_dtype == "stored" else CP.for_cpu_scoring(model, force, background=True)
    startup, later = time.perf_counter() - t, "in the background" in line
    print(f"{llama.name}: files {size:.2f} GiB; {torch.get_num_threads()} threads; {line}\n"
          f"  start-up {startup:.1f} s (goal {GOALS['startup']:.0f} s): the model takes images"
          + (" (LLaMA still converting)" if later else ""), flush=True)
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

    measure(1, "first image" + (" (LLaMA's first call waits for its conversion)" if later else ""))
    score, (cpu, kernel, faults) = time.perf_counter() - t, (b - a for a, b in zip(before, usage()))
    print(f"  first score {score:.1f} s after the start: CPU {cpu:.1f} s, kernel {kernel:.1f} s, {faults / 1e6:.1f} M "
          "page faults (docs/performance.md: when new memory is slow)", flush=True)
    one, batch = measure(1, "one image", GOALS["one"]), measure(16, "a batch of 16, best of 3", GOALS["batch"], 3)
    peak = status("VmHWM")
    print(f"  peak RSS {peak:.2f} GiB = {peak / size:.2f}x the files (goal {GOALS['rss']}x); now "
          f"{status('RssAnon'):.2f} GiB private, {status('RssFile'):.2f} GiB mapped from the files", flush=True)
    met = {k: v <= GOALS[k] for k, v in dict(batch=batch, one=one, startup=startup, rss=peak / size).items()}
    print("  goals met: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()), flush=True)
    print(f"  the files alone take {read_time(files):.1f} s to read from disk: a first score's floor", flush=True)
    if floors:
        floor(clip, model, P.normalise(images, res, cfg["norm"]), batch)
    del model
    model = P.from_pretrained(clip, llama, "cpu").eval()
    measure(1, "one image with the weights as stored (no conversion)")


def uncache(f: Path, at=0, n=0):  # the file's pages (n bytes from `at`; 0: all) out of the page cache
    if hasattr(os, "posix_fadvise"):  # elsewhere (macOS) they stay: the start and the read may be warm
        with open(f, "rb") as fh:
            os.posix_fadvise(fh.fileno(), at, n, os.POSIX_FADV_DONTNEED)


def read_time(files: list) -> float:  # s to read the files from disk, their pages dropped before and behind
    buf, t = bytearray(2**26), time.perf_counter()
    for f in files:
        uncache(f)
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                uncache(f, fh.tell() - n, n)
    return time.perf_counter() - t


def usage() -> tuple:  # this process's CPU seconds so far (user, kernel) and page faults
    return *os.times()[:2], resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def status(key: str) -> float:  # GiB, from /proc/self/status: VmRSS, VmHWM (peak), RssAnon, RssFile
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) / 2**20


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


def choice(clip: Path, llama: Path):
    """The CPU dtype policy's choice and the rates behind it, for the real shapes (one fresh process)."""
    model = P.from_pretrained(clip, llama, "cpu").eval()
    parts = CP.choose_cpu_dtypes(model)
    print(f"  {llama.name}: " + "; ".join(f"{name} {d} {how} (prior {first}; GFLOP/s, best of {CP.TRIES}: "
                                         + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + ")"
                                         for name, (d, how, rates, _, first) in parts.items()), flush=True)


def read_vit(d: Path):
    """The TorchScript ViT-L/14 read as eval.py reads it, in a fresh process: private memory (RssAnon)
    and file pages (RssFile) after reading and after touching every weight, against the file's size and
    against the earlier reader, which copied each record into memory."""
    if not (d / "ViT-L-14.pt").exists():
        formats.write_vit(d.mkdir(parents=True, exist_ok=True) or d)
    size = (d / "ViT-L-14.pt").stat().st_size / 2**30
    for how in ("mapped", "copied"):
        code = ("import sys, zipfile, torch, pneumollm as P, fullsize\n"
                "path, how = P.Path(sys.argv[1]), sys.argv[2]\n"
                "before = fullsize.status('RssAnon'), fullsize.status('RssFile')\n"
                "if how == 'mapped':\n"
                "    t = P.read_torchscript(path)\n"
                "else:  # the earlier reader: each record read into a bytearray\n"
                "    z = zipfile.ZipFile(path)\n"
                "    t = {n: torch.frombuffer(bytearray(z.read(n)), dtype=torch.uint8) for n in z.namelist()\n"
                "         if '/data/' in n and z.getinfo(n).file_size}\n"
                "total = sum(float(v.float().sum()) for v in t.values())  # every page touched\n"
                "print(*(f'{fullsize.status(k) - b:.2f}' for k, b in zip(('RssAnon', 'RssFile'), before)))\n")
        out = subprocess.run([sys.executable, "-c", code, str(d / "ViT-L-14.pt"), how], capture_output=True,
                             text=True, cwd=Path(__file__).parent)
        anon, file = out.stdout.split() if out.returncode == 0 else ("?", out.stderr[-300:])
        print(f"ViT-L-14.pt ({size:.2f} GiB) {how}: private memory +{anon} GiB, file pages +{file} GiB")


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
