"""
Scoring on a CPU with the real checkpoints: each frozen part (the ViT, LLaMA) computes in the dtype
this CPU multiplies fastest. The checkpoints are read as stored (memory-mapped, never copied:
LLaMA-7B in fp32 would need 27 GB); a part is converted once where the copy is small, or upcast block
by block as it runs where it is not, and only where a measured matrix product says it pays. The ViT,
a copy of its own, is also reshaped for speed: adapters merged into q/k/v, QuickGELU folded into one
silu; and freed memory is kept for the next batch (keep_freed_blocks). eval's scripts call
for_cpu_scoring through common.load_run, which converts LLaMA in the background (in_background) while
they read their films; bench.py --load prints the choice.
"""
import ctypes
import hashlib
import json
import mmap
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

import pneumollm as P
from folders import write_atomic

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype, --cpu-dtype


def cpu_parts(model: P.PneumoLLM) -> dict:
    """The frozen parts to place: name -> (module, its blocks, rows and width of its products at a
    batch of 16). The ViT multiplies 257 tokens per image (one image's rows stand for the batch's);
    LLaMA the batch's 16 x T tokens."""
    a, parts = model.args, {}
    if isinstance(model.visual, P.VisionTransformer):
        v = a.vision
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        parts["ViT"] = model.visual, model.visual.transformer.resblocks, tokens, v.width
    if model.llama is not None:  # its sources: the CLS tokens, or the conv stem's patch tokens
        v = a.vision
        sources = len(a.cls_blocks) if a.encoder == "clip" else (v.image_size // v.patch_size) ** 2
        t = sources + a.n_diag * (a.engine != "none") + len(a.question_ids)
        parts["LLaMA"] = model.llama, model.llama.layers, 16 * t, a.llama.dim
    return parts


def matmul_rate(rows: int, width: int, dtype, stored, per_call: bool) -> float:
    """GFLOP/s of x (rows, width) @ W.T, W (width, width) stored in `stored`, computed in `dtype`;
    per_call: W is converted on every call (the part's weights upcast as its blocks run). W as large as
    a layer's (LLaMA's: 32 MiB, past most caches), so that few rows are as memory-bound as they are in
    the model; a large L3 (480 MiB on one Xeon VM) still holds it, and there the rate flatters LLaMA,
    whose layers stream from memory. One untimed call (the kernel's set-up), then calls for >= 20 ms."""
    x, w = torch.randn(rows, width).to(dtype), torch.randn(width, width).to(stored)
    w_now = w if per_call else w.to(dtype)
    op = (lambda: F.linear(x, w.to(dtype))) if per_call else (lambda: F.linear(x, w_now))
    op()
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < 0.02:
        op()
        n += 1
    return 2 * rows * width * w.shape[0] * n / (time.perf_counter() - t0) / 1e9


MARGIN = 1.1  # another dtype replaces the prior only this much faster: the choice is never further from the best
TRIES = 5  # interleaved timings per dtype, each dtype's best kept: contention only ever slows a try down


def cpu_flags() -> set:
    """The CPU's instruction-set flags (Linux's /proc/cpuinfo), or none where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def prior(stored, candidates: list) -> str:
    """What the CPU says it multiplies fast, before any timing: bf16 with AMX or AVX512-BF16, fp16 with
    AMX-FP16; else the stored dtype. A measurement must beat it by MARGIN to replace it."""
    flags = cpu_flags()
    if {"amx_bf16", "avx512_bf16"} & flags and "bf16" in candidates:
        return "bf16"
    if "amx_fp16" in flags and "fp16" in candidates:
        return "fp16"
    return next(d for d, t in DTYPES.items() if t == stored)


def best_rates(rates, rows: int, width: int, dtypes: list, stored, upcast: dict) -> dict:
    """{dtype: GFLOP/s}, the best of TRIES timings taken in turn (a dtype, the next, .., again)."""
    best = {d: 0.0 for d in dtypes}
    for _ in range(TRIES):
        for d in dtypes:
            best[d] = max(best[d], rates(rows, width, DTYPES[d], stored, upcast[d]))
    return best


def cached(key: str, measure):
    """measure()'s result, measured once per machine and torch (the key names both): in
    $PNEUMOLLM_CACHE or ~/.cache/pneumollm/cpu-dtypes.json, so that a fresh process chooses as the last."""
    path = Path(os.environ.get("PNEUMOLLM_CACHE") or Path.home() / ".cache/pneumollm") / "cpu-dtypes.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = measure()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(table, indent=1))
        except OSError:
            pass  # a read-only home: measured again next time
    return table[key]


def machine() -> str:  # what a measurement depends on: torch, and the CPU's model and instruction sets
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        name = "?"
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:8]
    return f"torch {torch.__version__}, {name}, flags {flags}, {torch.get_num_threads()} threads"


def choose_cpu_dtypes(model: P.PneumoLLM, force=None, rates=None, spare=2**30) -> dict:
    """Per part: (dtype, how, {dtype: GFLOP/s}, rows, the prior). The candidates lose no range: fp16
    weights may compute in fp16, bf16 or fp32, bf16 ones in bf16 or fp32, fp32 ones in fp32 (nothing
    measured). The prior (what the CPU's flags say) is kept unless another dtype measures >= MARGIN x
    its rate, each rate the best of TRIES interleaved timings, measured once per machine (cached) when
    `rates` is the real matmul_rate. `how`: "as stored", "converted" once (to a dtype no wider, or when
    the copy adds under 1 GiB), else "upcast" block by block as each runs (LLaMA-7B in fp32 would need
    27 GB; `spare`: bytes), for calls of at least `rows` tokens: fewer (one image) are memory-bound, and
    there the stored dtype is measured against it. `force`: a DTYPES name for every part."""
    frozen, out, real = {id(p) for p in model.frozen_parameters()}, {}, rates is None
    rates = rates or matmul_rate
    for name, (module, _, rows, width) in cpu_parts(model).items():
        weights = [p for p in module.parameters() if id(p) in frozen]
        stored, n = weights[0].dtype, sum(p.numel() for p in weights)
        wider = [d for d, t in DTYPES.items() if t.itemsize > stored.itemsize or t == stored
                 or (stored == torch.float16 and t == torch.bfloat16)]
        how = {d: "as stored" if DTYPES[d] == stored else "converted" if DTYPES[d].itemsize <= stored.itemsize
               or n * (DTYPES[d].itemsize - stored.itemsize) < spare else "upcast" for d in wider}
        upcast = {d: how[d] == "upcast" for d in wider}
        measure = lambda: best_rates(rates, rows, width, wider, stored, upcast) if len(wider) > 1 else {}  # noqa
        gflops = cached(f"{machine()} | {name} {rows}x{width} {stored} {sorted(upcast.items())}", measure) \
            if real else measure()
        first = prior(stored, wider)
        top = max(gflops, key=gflops.get) if gflops else first
        dtype = force or (top if gflops and gflops[top] >= MARGIN * gflops[first] else first)
        least = 0
        if how.get(dtype) == "upcast" and not force:  # from how many images a call does upcasting pay?
            kept = next(d for d in wider if DTYPES[d] == stored)
            at = [best_rates(rates, r, width, [dtype, kept], stored, upcast) for r in (rows // 16, rows // 4)]
            least = next((r for r, g in zip((rows // 16, rows // 4), at) if g[dtype] > 1.25 * g[kept]), rows)
        out[name] = dtype, how.get(dtype, "converted"), gflops, least, first
    return out


def for_cpu_scoring(model: P.PneumoLLM, force=None, rates=None, spare=2**30, background=False) -> str:
    """Puts each frozen part in the dtype choose_cpu_dtypes picks; returns the line that says so.
    `background`: LLaMA's blocks (13 GB to read from disk and convert) are converted in a thread of their
    own while the caller goes on (reading and cropping its films); LLaMA's first call waits for them."""
    frozen, said = {id(p) for p in model.frozen_parameters()}, []
    for name, (dtype, how, gflops, least, first) in choose_cpu_dtypes(model, force, rates, spare).items():
        module, blocks, rows = cpu_parts(model)[name][:3]
        t, inside = DTYPES[dtype], {id(p) for b in blocks for p in b.parameters()}
        vit = name == "ViT" and how != "upcast"  # its blocks reshaped for speed (scoring only)
        folded = fold_quick_gelu(blocks, t) if vit else 0
        merged = vit and any(isinstance(b.adapter_attn, P.RepAdapter) for b in blocks)
        later = background and name == "LLaMA" and how == "converted"
        params = [p for p in module.parameters() if id(p) in frozen]
        outside = [p for p in params if id(p) not in inside]  # LLaMA's final norm, the ViT's stem and ln_pre
        if how == "upcast":  # the blocks' weights stay as stored; each block upcasts its own as it runs
            convert(outside, t)
            for b in blocks:
                upcast_while_running(b, [p for p in b.parameters() if id(p) in frozen], t, least)
        elif later:  # the blocks in a thread of their own, the rest now
            convert(outside, t)
            in_background(module, [p for p in params if id(p) in inside], t)
        else:  # converted, or as stored
            convert(params, t)
            if merged:  # 0.02 s per image of a batch on 2 cores; LLaMA's would add 10 s of start-up
                model.merge_adapters(llm=False)
        why = "forced" if force else (f"the CPU's flags say {first}; GFLOP/s here, best of {TRIES}: "
                                      + ", ".join(f"{d} {r:.0f}" for d, r in gflops.items())
                                      if gflops else "nothing wider to try")
        images = f" for batches of {max(1, 16 * least // rows)}+ images (smaller ones in the stored dtype)" \
            if least > rows // 16 else ""
        said.append(f"{name} in {dtype}, {how}{' block by block' + images if how == 'upcast' else ''}"
                    + (" in the background (its first call waits for it)" if later else "") + f" ({why})"
                    + (", its adapters merged into q/k/v" if merged else "")
                    + (", its QuickGELU folded into one silu" if folded else ""))
    kept = "; freed memory kept for reuse" if keep_freed_blocks() else ""
    return "scoring on this CPU: " + "; ".join(said) + kept


def in_background(module: torch.nn.Module, params: list, dtype):
    """convert(params, dtype) in a thread of its own; the module's forward waits for it, and raises what
    it raised. A process that ends first stops it at the next tensor (convert's reader is a thread pool,
    which takes no new work once the interpreter shuts down) instead of waiting for all of them."""
    pool = ThreadPoolExecutor(1)
    done = pool.submit(convert, params, dtype)
    pool.shutdown(wait=False)
    module.register_forward_pre_hook(lambda *_: done.result())


def keep_freed_blocks() -> bool:
    """glibc gives every freed block over 32 MiB back to the OS (a ViT batch's MLP activations: 34 MB),
    so the next batch faults every page in afresh, which made a 34 MB copy 5x as slow on one Xeon and a
    batch of 16 through ViT-L/14 and LLaMA-7B 8 % slower. From here on (after the conversion, or beside
    LLaMA's in the background: its sources, file pages, still go back) freed blocks of any size stay for
    reuse: mallopt's mmap and trim thresholds.
    Returns whether the C library took it (glibc does; elsewhere nothing changes)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, 2**30) and libc.mallopt(-1, 2**31 - 1))  # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def fold_quick_gelu(blocks, dtype):
    """The ViT's QuickGELU blocks (OpenAI's) as one fused silu: c_fc's weight and bias times 1.702, c_proj's
    weight divided by it (equal in real numbers; each weight computed in fp32 and rounded once to `dtype`).
    On a CPU the three elementwise passes of h * sigmoid(1.702 h) cost as much as a third of the ViT.
    Returns how many blocks it folded."""
    folded = 0
    for b in blocks:
        if b.act == "quick_gelu":
            for p, scale in ((b.mlp.c_fc.weight, P.QUICK_GELU), (b.mlp.c_fc.bias, P.QUICK_GELU),
                             (b.mlp.c_proj.weight, 1 / P.QUICK_GELU)):
                old, p.data = p.data, (p.data.float() * scale).to(dtype)
                release(old)
            b.act, folded = "silu", folded + 1
    return folded


def convert(params: list, dtype):
    """In place, one tensor at a time; each source's whole pages go back to the OS at once (a memory-
    mapped checkpoint's pages would otherwise stay counted until the last tensor is converted), and a
    file's pages leave the page cache too: LLaMA-7B's 13 GB cached beside its 13 GB copy overfill a
    24 GB machine, whose kernel then spent seconds reclaiming them. In the order the sources lie in
    memory (a checkpoint's own order), the next one read in by a thread while this one converts."""
    users = Counter(p.untyped_storage().data_ptr() for p in params)  # tied weights: one storage, two names
    todo = sorted((p for p in params if p.dtype != dtype), key=lambda p: p.data_ptr())  # in file order
    files = file_mappings()
    with ThreadPoolExecutor(1) as reader:
        read = reader.submit(touch, todo[0].data) if todo else None
        for p, after in zip(todo, todo[1:] + [None]):
            read.result()
            read = reader.submit(touch, after.data) if after is not None else None
            old, p.data = p.data, cast(p.data, dtype)
            if users[old.untyped_storage().data_ptr()] == 1:
                release(old, from_file=any(lo <= old.data_ptr() < hi for lo, hi in files))


def cast(t: torch.Tensor, dtype, chunk=2**18) -> torch.Tensor:
    """t.to(dtype), bit for bit; between fp16 and bf16 through fp32, a chunk at a time: torch converts
    that pair element by element, and its two conversions through a buffer that stays in cache are 3x
    as fast (one Xeon, one thread: 0.8 against 2.5 G elements/s; two threads: 1.3 against 5.3)."""
    if {t.dtype, dtype} != {torch.float16, torch.bfloat16} or not t.is_contiguous():
        return t.to(dtype)
    out, buffer = t.new_empty(t.shape, dtype=dtype), t.new_empty(min(chunk, t.numel()), dtype=torch.float32)
    src, dst = t.reshape(-1), out.view(-1)
    for i in range(0, t.numel(), chunk):
        n = min(chunk, t.numel() - i)
        dst[i:i + n].copy_(buffer[:n].copy_(src[i:i + n]))
    return out


def file_mappings() -> list:
    """(start, end) of each range of this process's memory that maps a file, from /proc/self/maps
    (Linux; elsewhere none)."""
    try:
        with open("/proc/self/maps") as f:
            lines = [line.split() for line in f]
    except OSError:
        return []
    return [tuple(int(a, 16) for a in w[0].split("-")) for w in lines if len(w) > 5 and w[5].startswith("/")]


def touch(t: torch.Tensor):  # one byte of each page read: a memory-mapped file's pages come in from disk
    t.reshape(-1).view(torch.uint8)[::mmap.PAGESIZE].sum()


def release(t: torch.Tensor, from_file=False):
    """madvise(MADV_DONTNEED) over the pages that lie wholly inside t, which is about to be dropped
    and shares its storage with nothing else: file pages are dropped (read again if touched), private
    ones freed. `from_file` (t maps a file): MADV_PAGEOUT first, which takes the file's pages out of
    the page cache as well (Linux 5.4+). Linux and macOS; elsewhere the pages go when the last tensor
    of the file goes."""
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size() or not hasattr(ctypes, "CDLL") or os.name != "posix":
        return
    page = mmap.PAGESIZE
    start = -(-storage.data_ptr() // page) * page
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if end > start:
        libc, at, size = ctypes.CDLL(None), ctypes.c_void_p(start), ctypes.c_size_t(end - start)
        if from_file and sys.platform == "linux":
            libc.madvise(at, size, 21)  # MADV_PAGEOUT: on an older kernel, EINVAL, and nothing happens
        libc.madvise(at, size, 4)  # MADV_DONTNEED


def upcast_while_running(block: torch.nn.Module, frozen: list, dtype, least=0):
    """The block's `frozen` weights in `dtype` for the length of its forward only (one block's copy at
    a time), the stored ones put back after it. A call of fewer than `least` tokens runs in the stored
    dtype instead (its input cast to it); the output leaves in `dtype` either way."""
    stored = []

    def before(_, args):
        if args[0].shape[:-1].numel() < least:
            return (args[0].to(frozen[0].dtype), *args[1:])
        stored[:] = [p.data for p in frozen]
        for p in frozen:
            p.data = p.data.to(dtype)

    def after(_, args, out):
        for p, s in zip(frozen, stored):
            p.data = s
        stored.clear()
        return out.to(dtype)
    block.register_forward_pre_hook(before)
    block.register_forward_hook(after)
