"""
Train PneumoLLM on one fold with the paper's recipe, choose the epoch on a validation split carved
from the training patients, and evaluate the held-out fold once, at the end.

    python train.py --fold 1 --model tiny              # the demo: no checkpoints needed, CPU is fine
    python train.py --fold 1 --data data/mine          # ViT-L/14 + LLaMA-7B on one GPU
    torchrun --nproc_per_node=4 train.py --fold 1 --data data/mine   # data-parallel, same global batch

Writes out/<data>/fold<N>/: config.json, log.jsonl, best.safetensors (trainable weights of the chosen
epoch), last.safetensors + state.pt (for --resume), metrics.json, predictions.csv.
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import pneumollm as P
from eval import metrics, report
from prepare import make_folds

DOWNLOAD = """{path} not found.
PneumoLLM needs two original checkpoints (nothing is converted, nothing is copied):
  --clip   OpenAI's ViT-L-14.pt (what `clip.load("ViT-L/14")` downloads into ~/.cache/clip) or a
           Hugging Face folder of openai/clip-vit-large-patch14 (config.json + model.safetensors)
  --llama  LLaMA-7B as Meta ships it (a folder with params.json + consolidated.00.pth) or a
           Hugging Face LLaMA folder (config.json + model*.safetensors)
Put them at checkpoints/ViT-L-14.pt and checkpoints/llama-7b/ or pass the paths.
To run everything without them: --model tiny (a small random-initialised model)."""


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo", help="a folder written by prepare.py")
    ap.add_argument("--fold", type=int, default=1, help="the test fold; the others train")
    ap.add_argument("--model", choices=["full", "tiny"], default="full")
    ap.add_argument("--clip", default="checkpoints/ViT-L-14.pt")
    ap.add_argument("--llama", default="checkpoints/llama-7b")
    ap.add_argument("--out", help="default: out/<data name>/fold<N>")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--min-lr", type=float, default=1e-7)
    ap.add_argument("--warmup-epochs", type=float, default=2)
    ap.add_argument("--warmup-lr", type=float, default=5e-7)
    ap.add_argument("--weight-decay", type=float, default=0.02)
    ap.add_argument("--adapter-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="frozen weights and autocast; default fp16 on GPU, fp32 on CPU")
    ap.add_argument("--norm", choices=["clip", "imagenet"], default="clip", help="imagenet = the authors' code")
    ap.add_argument("--val-frac", type=float, default=0.1, help="training patients held out to choose the epoch")
    ap.add_argument("--select", choices=["val", "last", "test"], default="val", help="test = the authors' leak, set by --authors-code")
    ap.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
                    help="torch.compile the model; reduce-overhead also replays CUDA graphs")
    ap.add_argument("--checkpoint-vit", action="store_true", help="recompute ViT activations in the backward: less memory, ~25%% slower")
    ap.add_argument("--resume", action="store_true")
    g = ap.add_argument_group("ablations (README: Ablations); the defaults are PneumoLLM as published")
    g.add_argument("--engine", choices=["multi", "coop", "cocoop", "none"], default="multi", help="Table 6")
    g.add_argument("--diag-tokens", type=int, default=4, help="K, Fig. 6b")
    g.add_argument("--cls-blocks", help="1-based ViT blocks giving CLS tokens, e.g. 12,24; default every 4th")
    g.add_argument("--no-emitter", action="store_true", help="Table 6: no Eq. 2 mask")
    g.add_argument("--no-vit-adapters", action="store_true", help="Table 6")
    g.add_argument("--no-llm-adapters", action="store_true", help="Table 6")
    g.add_argument("--no-llm", action="store_true", help="Table 4: ViT, engine, projection, head; LLaMA is not read")
    g.add_argument("--encoder", choices=["clip", "conv"], default="clip", help="Fig. 6a; any CLIP ViT file works for clip")
    g.add_argument("--question", help='Table 5, LaVIN-style text input, e.g. "Does the patient have pneumoconiosis?"')
    g.add_argument("--tokenizer", help="LLaMA's tokenizer.model; default: in --llama or its parent folder")
    g.add_argument("--authors-code", action="store_true", help="reproduce the authors' code, NOT the paper: engine frozen at "
                   "random init, ImageNet normalisation, BCE on one-hot targets, epoch chosen ON THE TEST FOLD (a leak)")
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("fp32" if a.device == "cpu" else "fp16")
    if a.authors_code:
        a.norm, a.select = "imagenet", "test"
    if a.question and a.no_llm:
        ap.error("--question feeds the LLM, so it cannot go with --no-llm")
    if a.cls_blocks and not all(b.strip().isdigit() for b in a.cls_blocks.split(",")):
        ap.error(f"--cls-blocks {a.cls_blocks!r}: give 1-based block numbers separated by commas, e.g. 12,24")
    a.out = a.out or f"out/{Path(a.data).name}/fold{a.fold}"
    return a


# ------------------------------------------------------------------------------------------------
# data: prepare.py's manifest, every image in memory once


class Data:
    def __init__(self, folder):
        self.folder = Path(folder)
        if not (self.folder / "manifest.csv").exists():
            raise SystemExit(f"{self.folder}/manifest.csv not found: run prepare.py first (e.g. `python prepare.py --demo`)")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.classes = self.meta["classes"]
        self.multi_label = self.meta.get("multi_label", False)
        with open(self.folder / "manifest.csv", newline="") as f:
            self.rows = list(csv.DictReader(f))

    def images(self, rows) -> torch.Tensor:  # (N, 1, H, W) uint8
        if not rows:  # e.g. the validation split of --val-frac 0
            return torch.zeros(0, 1, 0, 0, dtype=torch.uint8)
        return torch.from_numpy(np.stack([np.asarray(Image.open(self.folder / r["image"]).convert("L")) for r in rows]))[:, None]

    def split(self, fold: int, val_frac=0.1, seed=20, parts=("test",)) -> dict:
        """{'train'|'val'|'test': (rows, images, labels)}; val is carved from the training patients.
        Labels: class indices (N,), or multi-hot (N, C) for multi-label sets."""
        test = [r for r in self.rows if int(r["fold"]) == fold]
        if not test:
            raise SystemExit(f"{self.folder}/manifest.csv: fold {fold} is empty")
        rest = [r for r in self.rows if int(r["fold"]) != fold]
        groups = {"test": test, "train": rest, "val": []}
        if val_frac > 0:
            k = max(2, round(1 / val_frac))
            inner = make_folds([r["patient"] for r in rest], [r["label"] for r in rest], k, seed)
            groups["train"] = [r for r, f in zip(rest, inner) if f != 1]
            groups["val"] = [r for r, f in zip(rest, inner) if f == 1]
        seen = {r["patient"] for r in groups["train"] + groups["val"]}
        assert not seen & {r["patient"] for r in test}, "a test patient is in the training data"
        return {p: (g, self.images(g), self.labels(g)) for p, g in groups.items() if p in parts}

    def labels(self, rows) -> np.ndarray:
        if self.multi_label:
            return np.array([[c in r["label"].split("|") for c in self.classes] for r in rows], np.float32).reshape(-1, len(self.classes))
        return np.array([self.classes.index(r["label"]) for r in rows], np.int64)


# ------------------------------------------------------------------------------------------------
# model


def pneumo_args(cfg: dict) -> dict:
    """PneumoArgs fields set by flags (configs saved before a flag existed get its default)."""
    g = cfg.get
    kw = dict(adapter_dropout=g("adapter_dropout", 0.1), engine=g("engine", "multi"), n_diag=g("diag_tokens", 4),
              emitter=not g("no_emitter"), vit_adapters=not g("no_vit_adapters"), llm_adapters=not g("no_llm_adapters"),
              llm=not g("no_llm"), encoder=g("encoder", "clip"), question=g("question_ids") or [],
              train_engine=not g("authors_code"))
    if g("cls_blocks"):
        kw["cls_blocks"] = [int(b) for b in str(cfg["cls_blocks"]).split(",")]
    return kw


def tokenize_question(cfg: dict):
    """Adds question_ids and vocab_size to cfg, so that the run can be rebuilt without the tokenizer."""
    path = cfg["tokenizer"] or next((p for p in (Path(cfg["llama"]) / "tokenizer.model", Path(cfg["llama"]).parent / "tokenizer.model")
                                     if p.exists()), Path(cfg["llama"]) / "tokenizer.model")
    cfg["question_ids"], cfg["vocab_size"] = P.tokenize(path, cfg["question"])
    print(f"question {cfg['question']!r}: {len(cfg['question_ids'])} tokens (with BOS)")


def build(cfg: dict, n_classes: int) -> P.PneumoLLM:
    device, dtype = torch.device(cfg["device"]), {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg["dtype"]]
    torch.manual_seed(cfg["seed"])
    kw = dict(pneumo_args(cfg), n_classes=n_classes)
    if cfg["model"] == "tiny":
        model = P.PneumoLLM(P.tiny_args(vocab_size=cfg.get("vocab_size", -1), **kw)).to(device)
        for p in model.parameters():  # the dtype policy of from_pretrained: frozen in `dtype`, trained in fp32
            if not p.requires_grad:
                p.data = p.data.to(dtype)
        return model
    needed = ([cfg["clip"]] if kw["encoder"] == "clip" else []) + ([cfg["llama"]] if kw["llm"] else [])
    for path in needed:
        if not Path(path).exists():
            raise SystemExit(DOWNLOAD.format(path=path))
    return P.from_pretrained(cfg["clip"], cfg["llama"] if kw["llm"] else None, device, dtype, **kw)


def autocast(cfg):
    if cfg["dtype"] == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(cfg["device"]).type, dtype=torch.float16 if cfg["dtype"] == "fp16" else torch.bfloat16)


def normalise(x: torch.Tensor, cfg, size: int) -> torch.Tensor:  # (B, 1, H, W) uint8 -> (B, 3, size, size) float
    mean, std = (P.CLIP_MEAN, P.CLIP_STD) if cfg["norm"] == "clip" else (P.IMAGENET_MEAN, P.IMAGENET_STD)
    m, s = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    x = x.float() / 255
    if x.shape[-1] != size:  # e.g. ViT-L/14@336 on 224-px data; better: prepare.py --size 336
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - m) / s


def loss_fn(logits, y, cfg):  # logits (B, C) fp32, y (B,) class indices or (B, C) multi-hot
    if cfg.get("multi_label"):  # one independent sigmoid per finding, as evaluated
        return F.binary_cross_entropy_with_logits(logits, y)
    if cfg.get("authors_code"):  # BCE on one-hot targets, as the authors' code; evaluated with softmax all the same
        return F.binary_cross_entropy_with_logits(logits, F.one_hot(y, logits.shape[-1]).float())
    return F.cross_entropy(logits, y)  # one score definition: softmax, as evaluated


@torch.no_grad()
def predict(model, images, cfg, batch=32) -> np.ndarray:  # (N, C) probabilities: softmax, or sigmoids if multi-label
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = normalise(images[i:i + batch].to(cfg["device"]), cfg, model.args.vision.image_size)
        with autocast(cfg):
            logits = model(x).float()
            out.append((logits.sigmoid() if cfg.get("multi_label") else logits.softmax(-1)).cpu())
    return torch.cat(out).numpy()


def load_trained(cfg: dict, weights: Path, with_data=True):
    model = build(cfg, len(cfg["classes"]))
    model.load_trainable(weights)
    return model, Data(cfg["data"]) if with_data else None


def lr_at(it: int, cfg: dict, iters_per_epoch: int) -> float:
    """Per-iteration: linear warmup from warmup_lr, then cosine down to min_lr."""
    warm, total = int(cfg["warmup_epochs"] * iters_per_epoch), cfg["epochs"] * iters_per_epoch
    if it < warm:
        return cfg["warmup_lr"] + (cfg["lr"] - cfg["warmup_lr"]) * it / warm
    t = (it - warm) / max(1, total - warm)
    return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * t))


def distributed(a) -> tuple[int, int]:
    """Under torchrun: one process per GPU (NCCL) or per CPU process (gloo). Returns (rank, world size)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if a.device.startswith("cuda"):
        a.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(a.device)
    dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def save_atomic(obj, path: Path, model=None):
    tmp = path.with_name(path.name + ".tmp")
    model.save_trainable(tmp) if model is not None else torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    a = parse(argv)
    rank, world = distributed(a)
    lead = rank == 0  # the one process that evaluates, logs and writes files
    say = print if lead else (lambda *args, **kw: None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Data(a.data)
    prep = data.meta["settings"]  # so that eval.py --image preprocesses new images exactly the same way
    cfg = dict(vars(a), classes=data.classes, multi_label=data.multi_label, crop=prep["crop"], size=int(prep["size"]))
    if a.question:
        tokenize_question(cfg)
    model = build(cfg, len(data.classes))  # fails early, with the download message, if checkpoints are missing
    if a.select == "test":
        say("WARNING: the epoch is chosen ON THE TEST FOLD, as in the authors' code: its test metrics are optimistic", file=sys.stderr)
        s = data.split(a.fold, 0, parts=("train", "test"))
        s["val"] = s["test"]
    else:
        s = data.split(a.fold, a.val_frac, a.seed, parts=("train", "val"))  # the test fold is not even loaded
    (train_rows, train_x, train_y), (val_rows, val_x, val_y) = s["train"], s["val"]
    select = a.select if len(val_rows) else "last"
    say(f"fold {a.fold}: {len(train_rows)} train, {len(val_rows)} validation images (epoch chosen on: {select})"
        + (f"; {world} processes share each batch of {a.batch_size}" if world > 1 else ""))
    if lead:
        (out / "config.json").write_text(json.dumps(dict(cfg, select=select), indent=1))

    device = torch.device(a.device)
    train_x, val_x, train_yt = train_x.to(device), val_x.to(device), torch.from_numpy(train_y).to(device)  # once, not per epoch
    decay = [p for p in model.trainable_parameters() if p.dim() >= 2]
    no_decay = [p for p in model.trainable_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=a.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    # on every dtype, so that a step with inf/NaN gradients is skipped; with the fused AdamW on a GPU
    # the check happens on the device, without a host sync (the scaling itself only matters in fp16)
    scaler = torch.amp.GradScaler(device.type)
    if a.checkpoint_vit and isinstance(model.visual, P.VisionTransformer):
        model.visual.grad_checkpointing = True
    fwd = model
    if world > 1:  # gradients of the trainable weights are averaged across processes after each backward
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(fwd, mode=a.compile) if a.compile else fwd
    gen = torch.Generator().manual_seed(a.seed)  # the data order
    ipe = math.ceil(len(train_rows) / a.batch_size)
    epoch, best, best_epoch = 0, -1.0, 0
    if a.resume and (out / "state.pt").exists():
        st = torch.load(out / "state.pt", weights_only=True)
        model.load_trainable(out / "last.safetensors")
        opt.load_state_dict(st["opt"])
        scaler.load_state_dict(st["scaler"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda_rng"])
        epoch, best, best_epoch = st["epoch"], st["best"], st["best_epoch"]
        say(f"resumed after epoch {epoch}")
    log_path = out / "log.jsonl"
    old = log_path.read_text().splitlines() if a.resume and log_path.exists() else []
    if lead:
        log_path.write_text("".join(l + "\n" for l in old if json.loads(l).get("epoch", epoch + 1) <= epoch))  # drop what a killed run wrote past its checkpoint
    start = epoch

    t0 = time.time()
    while epoch < a.epochs:
        model.train()
        perm = torch.randperm(len(train_rows), generator=gen).to(device)
        losses, bad = torch.zeros((), device=device), torch.zeros((), device=device)  # summed on the device: no sync per step
        for i in range(ipe):
            lr = lr_at(epoch * ipe + i, cfg, ipe)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[i * a.batch_size:(i + 1) * a.batch_size]
            mine = idx[rank::world]  # this process's share of the global batch
            weight = len(mine) * world / len(idx)  # DDP averages over processes: this makes it the global-batch mean
            if not len(mine):  # nothing left for this process: it still joins the gradient all-reduce
                mine, weight = idx[:1], 0.0
            with autocast(cfg):
                logits = fwd(normalise(train_x[mine], cfg, model.args.vision.image_size))
            loss = loss_fn(logits.float(), train_yt[mine], cfg) * weight
            scaler.scale(loss).backward()  # under DDP a NaN in one process reaches every process's gradients
            scaler.step(opt)  # skipped if a gradient is inf/NaN: an fp16 overflow or a non-finite loss
            scaler.update()
            opt.zero_grad(set_to_none=True)
            finite = torch.isfinite(loss.detach())
            losses += torch.where(finite, loss.detach(), 0.0)
            bad += ~finite
        epoch += 1
        if world > 1:
            dist.all_reduce(losses)
            dist.all_reduce(bad, dist.ReduceOp.MAX)
            losses /= world
        n_bad = int(bad.item())
        if n_bad == ipe:
            raise SystemExit(f"every step of epoch {epoch} had a non-finite loss; stopping (try --dtype bf16/fp32 or a lower --lr)")
        if n_bad:
            say(f"epoch {epoch}: {n_bad} step(s) with a non-finite loss skipped", file=sys.stderr)
        rec = dict(epoch=epoch, loss=losses.item() / (ipe - n_bad), lr=lr, **({"skipped": n_bad} if n_bad else {}))
        if not lead:  # the others go straight on; the next gradient all-reduce waits for the lead
            continue
        if select != "last":
            m = metrics(val_y, predict(model, val_x, cfg))
            rec.update(val={k: m[k] for k in ("sensitivity", "specificity", "accuracy", "auc", "avg")})
            if m["avg"] > best:
                best, best_epoch = m["avg"], epoch
                save_atomic(None, out / "best.safetensors", model)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        save_atomic(None, out / "last.safetensors", model)
        st = dict(opt=opt.state_dict(), scaler=scaler.state_dict(), gen=gen.get_state(), rng=torch.get_rng_state(),
                  epoch=epoch, best=best, best_epoch=best_epoch)
        if device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state()
        save_atomic(st, out / "state.pt")  # written last: the commit point that --resume restarts from
        el = time.time() - t0
        done = epoch - start
        val = f"  val AVG {100 * rec['val']['avg']:.2f}" if "val" in rec else ""
        print(f"epoch {epoch:3d}/{a.epochs}  loss {rec['loss']:.4f}  lr {lr:.2e}{val}  {done * len(train_rows) / el:.1f} img/s  ETA {(a.epochs - epoch) * el / done:.0f}s")

    if not lead:
        dist.destroy_process_group()
        return None
    print(f"trained {epoch - start} epochs in {time.time() - t0:.0f} s (validation and checkpoints included)")
    # the one and only look at the test fold
    if select == "last":
        model.save_trainable(out / "best.safetensors")
    model.load_trainable(out / "best.safetensors")
    test_rows, test_x, test_y = data.split(a.fold, 0)["test"]
    prob = predict(model, test_x, cfg)
    m = metrics(test_y, prob)
    best_epoch = best_epoch if select != "last" else a.epochs
    (out / "metrics.json").write_text(json.dumps(dict(fold=a.fold, selected_on=select, epoch=best_epoch, n_test=len(test_y), metrics=m), indent=1))
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "probability", "prediction"])
        for r, p in zip(test_rows, prob):
            prob_text = f"{p[-1]:.6f}" if len(p) == 2 and not data.multi_label else " ".join(f"{q:.6f}" for q in p)
            pred = "|".join(c for c, q in zip(data.classes, p) if q > 0.5) if data.multi_label else data.classes[int(p.argmax())]
            w.writerow([Path(r["image"]).stem, r["label"], prob_text, pred])
    with open(log_path, "a") as f:
        f.write(json.dumps(dict(test=m, epoch_used=best_epoch)) + "\n")
    print(f"test fold {a.fold} ({len(test_y)} images, epoch {best_epoch} chosen on {select}): {report(m)}")
    print(f"confusion ({'per finding [[tn, fp], [fn, tp]]' if data.multi_label else 'rows true, cols predicted'}, {data.classes}): {m['confusion']}")
    if world > 1:
        dist.destroy_process_group()
    return m


if __name__ == "__main__":
    main()
