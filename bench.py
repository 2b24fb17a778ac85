"""
Speed and memory of one training step and of inference, at a given size, with random weights (no
checkpoint needed). Prints figures; nothing here is a test.

    python bench.py --model tiny                                  # CPU
    python bench.py --model full --device cuda --dtype fp16       # ViT-L/14 + LLaMA-7B shapes
    python bench.py --prepare ../shared/data/dicom/RG1_UNCR.dcm   # prepare.py images/s, all cores
"""
import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import pneumollm as P

SIZES = {"tiny": P.tiny_args, "mid": lambda: P.PneumoArgs(P.VisionArgs(256, 8, 4, 14, 224), P.LlamaArgs(dim=512, n_layers=4, n_heads=8), cls_every=2),
         "full": P.PneumoArgs}


def random_model(args, device, dtype):
    """The real shapes with random frozen weights, built on `meta` and filled in place on `device`."""
    with torch.device("meta"):
        model = P.PneumoLLM(args)
    g = torch.Generator(device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        if not p.requires_grad:
            t = torch.empty(p.shape, device=device, dtype=dtype)
            t.fill_(1.0) if "norm" in name or "ln_" in name else t.normal_(0, 0.02, generator=g)
            P._assign(model, name, t)
    P.materialise_own(model, device)
    return model


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_prepare(dicom: str, n: int):
    """prepare.py's throughput on n copies of one radiograph, with every core."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import prepare
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "in")
        src.mkdir()
        for i in range(n):
            shutil.copy(dicom, src / f"{i}.dcm")
        Path(d, "labels.csv").write_text("image,label\n" + "".join(f"{i}.dcm,{i % 2}\n" for i in range(n)))
        t = time.perf_counter()
        prepare.main(["--images", str(src), "--labels", str(Path(d, "labels.csv")), "--out", str(Path(d, "out")),
                      "--key-file", str(Path(d, "key"))])
        s = time.perf_counter() - t
    print(f"prepare.py: {n} copies of {dicom} in {s:.1f}s = {n / s:.1f} images/s with {os.cpu_count()} workers")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", metavar="DICOM", help="time prepare.py on copies of this file instead of the model")
    ap.add_argument("--n", type=int, default=32, help="copies for --prepare")
    ap.add_argument("--model", choices=list(SIZES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    if a.prepare:
        return bench_prepare(a.prepare, a.n)
    device = torch.device(a.device)
    a.dtype = a.dtype or ("fp32" if device.type == "cpu" else "fp16")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, frozen {a.dtype}, torch {torch.__version__}, compile {a.compile}, model {a.model}, batch {a.batch}")
    t = time.perf_counter()
    model = random_model(SIZES[a.model](), device, dtype)
    print(f"built in {time.perf_counter() - t:.1f}s, {sum(p.numel() for p in model.trainable_parameters()):,} trainable")
    fwd = torch.compile(model) if a.compile else model
    res = model.args.vision.image_size
    x = torch.randn(a.batch, 3, res, res, device=device)
    y = torch.randint(0, model.args.n_classes, (a.batch,), device=device)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=a.dtype == "fp16")
    amp = torch.autocast(device.type, dtype=dtype, enabled=a.dtype != "fp32")

    def step():
        with amp:
            loss = F.cross_entropy(fwd(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer():
        with amp:
            fwd(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    warm = 3 if not a.compile else 5
    s = timed(step, device, warm, a.iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    steps_100 = 100 * -(-504 // 16)
    print(f"train step: {1000 * s:.1f} ms median, {a.batch / s:.1f} images/s, peak {'GPU' if device.type == 'cuda' else 'RSS'} memory {peak:.2f} GiB")
    print(f"projected 100 epochs on 504 images at batch 16: {steps_100 * s * 16 / a.batch / 60:.2f} min (training steps only)")
    model.eval()
    s_unmerged = timed(infer, device, 2, a.iters)
    model.merge_adapters()
    fwd = torch.compile(model) if a.compile else model
    s_merged = timed(infer, device, warm, a.iters)
    print(f"inference: {a.batch / s_unmerged:.1f} images/s with adapters, {a.batch / s_merged:.1f} images/s merged")


if __name__ == "__main__":
    main()
