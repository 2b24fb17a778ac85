"""
Train PneumoLLM on one fold with the paper's recipe, choose the epoch on a validation split carved
from the training patients, and predict the held-out fold once, at the end.

    python train.py --fold 1 --model tiny              # the demo: no checkpoints needed, CPU is fine
    python train.py --fold 1 --data data/mine          # ViT-L/14 + LLaMA-7B on one GPU
    torchrun --nproc_per_node=4 train.py --fold 1 --data data/mine   # data-parallel, same global batch

Writes out/<data>/fold<N>/: config.json (every setting, as the run used it), log.jsonl,
best.safetensors (trainable weights of the chosen epoch), state.pt (the resume point), metrics.json,
val_predictions.csv and, last, predictions.csv (the test fold's: what eval.py reads). A run is never lost by accident:
the same command again resumes an interrupted run or leaves a finished one alone, other settings
in the same folder are refused, and --restart starts over.
"""
import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common as C
import metrics as M
import pneumollm as P
import pretrain
from folders import (Data, Help, Interrupted, UserError, changed, cli, locked, positive_class, refuse_changed,
                     replacing, write_atomic)
from ranks import Ranks
from runs import EARLIER, confusion, eval_dir, write_predictions

MODELS = {  # --model: where its checkpoints are, and its recipe's own defaults
    "full": dict(clip="checkpoints/ViT-L-14.pt", llama="checkpoints/llama-7b", lr=3e-4, epochs=100),
    "tiny": dict(clip="checkpoints/tiny/ViT-tiny.pt", llama="checkpoints/tiny/llama-tiny", lr=3e-3, epochs=30),
    "random": dict(clip=None, llama=None, lr=3e-3, epochs=30),
}
RUN_FILES = ("config.json", "log.jsonl", "best.safetensors", "state.pt", "metrics.json", "val_predictions.csv",
             "predictions.csv")  # what train.py writes; eval's scripts write into eval/ (runs.eval_dir)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=Help)
    ap.add_argument("--data", default="data/demo", help="a folder written by prepare.py")
    ap.add_argument("--fold", type=int, default=1, help="the test fold; the others train")
    model_flags(ap.add_argument_group("the frozen model (docs/checkpoints.md)"))
    ap.add_argument("--out", help="the run folder (default: out/<data name>/fold<N>)")
    ap.add_argument("--restart", action="store_true", help="discard the run in --out and train from scratch "
                    "(without it an interrupted run resumes and a finished one is left alone)")
    r = ap.add_argument_group("recipe (paper §4.1)")
    r.add_argument("--epochs", type=int, help="epochs (default: 100 (full, the paper's), 30 (tiny, random))")
    r.add_argument("--batch-size", type=int, default=16, help="images per step (over all processes)")
    r.add_argument("--lr", type=float, help="peak learning rate (default: 3e-4 (full, the paper's), 3e-3 (tiny, "
                   "random: a few-MB model needs larger steps))")
    r.add_argument("--min-lr", type=float, default=1e-7, help="learning rate at the end of the cosine")
    r.add_argument("--warmup-epochs", type=float, default=2, help="linear warmup length")
    r.add_argument("--warmup-lr", type=float, default=5e-7, help="learning rate at step 0")
    r.add_argument("--weight-decay", type=float, default=0.02, help="AdamW decay of the >=2-D trainable tensors")
    r.add_argument("--seed", type=int, default=20, help="initialisation, data order and the validation split")
    r.add_argument("--dtype", choices=list(C.DTYPES),
                   help="frozen weights and autocast (default: fp16 on GPU, fp32 on CPU)")
    r.add_argument("--norm", choices=["clip", "imagenet"], default="clip", help="imagenet = the authors' code")
    r.add_argument("--val-frac", type=float, default=0.1, help="training patients held out to choose the epoch")
    r.add_argument("--select", choices=["val", "last", "test"], default="val",
                   help="the epoch kept: the best on validation, the last, or the best ON THE TEST FOLD (the authors' "
                   "code; its test figures are optimistic)")
    C.runtime_flags(ap)
    ap.add_argument("--checkpoint-vit", action="store_true",
                    help="recompute ViT activations in the backward: less memory, ~25%% slower")
    g = C.ablation_flags(ap)
    g.add_argument("--question", help='Table 5, LaVIN-style text, e.g. "Does the patient have pneumoconiosis?"')
    g.add_argument("--tokenizer", help="LLaMA's tokenizer.model (default: in --llama or its parent folder)")
    g.add_argument("--authors-code", action="store_true", help="reproduce the authors' code, NOT the paper: "
                   "engine frozen at random init, ImageNet normalisation, BCE on one-hot targets, epoch chosen "
                   "ON THE TEST FOLD")
    return ap


def model_flags(g):
    g.add_argument("--model", choices=list(MODELS), default="full",
                   help="full: ViT-L/14 + LLaMA-7B; tiny: the demo's, pretrained once (pretrain.py); random: tiny "
                   "with random frozen weights (tests; what the pretraining buys)")
    g.add_argument("--clip", help="CLIP checkpoint (default: checkpoints/ViT-L-14.pt (full), "
                   "checkpoints/tiny/ViT-tiny.pt (tiny))")
    g.add_argument("--llama", help="LLaMA folder, Meta's or Hugging Face's (default: checkpoints/llama-7b (full), "
                   "checkpoints/tiny/llama-tiny (tiny))")
    g.add_argument("--clip-act", choices=["quick_gelu", "gelu"], help="the ViT MLP's activation, for an "
                   "OpenAI-layout state dict of an OpenCLIP/LAION tower (gelu); a Hugging Face config states it "
                   "(default: the config's, else quick_gelu, OpenAI's)")
    g.add_argument("--clip-heads", type=int, help="the ViT's attention heads, for an OpenAI-layout file wider "
                   "than ViT-L (e.g. 16 for OpenCLIP's ViT-H/14); a Hugging Face config states them (default: "
                   "the config's, else width / 64, OpenAI's rule)")


def check_numbers(cfg: dict):
    """Values no run can use, refused by flag before anything is written."""
    wrong = {"epochs": (cfg["epochs"] < 1, "1 or more"), "batch-size": (cfg["batch_size"] < 1, "1 or more"),
             "lr": (not cfg["lr"] > 0, "a rate above 0"), "min-lr": (not cfg["min_lr"] >= 0, "0 or more"),
             "warmup-epochs": (not cfg["warmup_epochs"] >= 0, "0 or more"),
             "warmup-lr": (not cfg["warmup_lr"] >= 0, "0 or more"),
             "weight-decay": (not cfg["weight_decay"] >= 0, "0 or more"),
             "val-frac": (not (cfg["val_frac"] == 0 or 0 < cfg["val_frac"] <= 0.5
                               and abs(1 / cfg["val_frac"] - round(1 / cfg["val_frac"])) < 0.02),
                          "0, or 1/k of the training patients (one of k patient folds): 0.5, 0.25, 0.2, 0.1, .."),
             "adapter-dropout": (not 0 <= cfg["adapter_dropout"] < 1, "a probability in [0, 1)")}
    for flag, (bad, give) in wrong.items():
        if bad:
            raise UserError(f"--{flag} {cfg[flag.replace('-', '_')]:g}: give {give}")


def parse(argv=None) -> dict:
    """The run's settings, under the flags' names: contradictions refused, no-op flags normalised (one
    model, one config.json)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = vars(parser().parse_args(argv))
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if cfg["model"] == "random" and {"--clip", "--llama"} & given:
        raise UserError("--model random reads no checkpoints: pass --model tiny or full with --clip/--llama")
    cfg.update({k: v for k, v in MODELS[cfg["model"]].items() if cfg[k] is None})
    cfg["dtype"] = cfg["dtype"] or ("fp32" if cfg["device"] == "cpu" else "fp16")
    cfg["out"] = cfg["out"] or f"out/{Path(cfg['data']).name}/fold{cfg['fold']}"
    one_way(cfg, given)
    check_numbers(cfg)
    if cfg["device"] != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {cfg['device']}: this torch sees no GPU (a CPU-only build, or no driver); "
                        "pass --device cpu, or install a CUDA build of torch")
    try:
        P.PneumoArgs(**C.pneumo_fields(dict(cfg, question_ids=[])))
    except ValueError as e:  # e.g. --n-diag 0
        raise UserError(f"{e} (check the ablation flags)") from None
    return cfg


def one_way(cfg: dict, given: set):
    """Settings that imply others, written as the run will use them: a flag they contradict is refused,
    one they would silently drop is refused, one that changes nothing leaves no trace."""
    if cfg["authors_code"]:
        authors = dict(norm="imagenet", select="test", train_engine=False)
        clash = [f"--{k.replace('_', '-')} {cfg[k]}" for k in authors
                 if {f"--{k.replace('_', '-')}", f"--no-{k.replace('_', '-')}"} & given and cfg[k] != authors[k]]
        if clash:
            raise UserError(f"--authors-code sets --norm imagenet, --select test and --no-train-engine; it cannot go "
                            f"with {', '.join(clash)}")
        cfg.update(authors)
    if cfg["select"] == "test":  # the epoch (and eval's threshold) chosen on the test fold: nothing held out
        if "--val-frac" in given and cfg["val_frac"] > 0:
            raise UserError("--select test chooses the epoch on the test fold and holds out no validation split: "
                            "drop --val-frac")
        cfg["val_frac"] = 0
    if cfg["val_frac"] == 0 and cfg["select"] == "val":
        if "--select" in given:
            raise UserError("--select val chooses the epoch on the validation split, which --val-frac 0 leaves empty: "
                            "pass --select last, or a --val-frac above 0")
        cfg["select"] = "last"
    if cfg["question"] and not cfg["llm"]:
        raise UserError("--question feeds the LLM, so it cannot go with --no-llm")
    unused = {"none": ("--n-diag", "--emitter", "--no-train-engine"), "no-llm": ("--llm-adapters",)}  # would be lost
    for mode, on in (("none", cfg["engine"] == "none"), ("no-llm", not cfg["llm"])):
        if on and (said := [f for f in unused[mode] if f in given]):
            raise UserError(f"{said[0]} does nothing with {'--engine none' if mode == 'none' else '--no-llm'} "
                            f"({'no diagnosis tokens' if mode == 'none' else 'no LLaMA blocks'}): drop one of them")
    if cfg["engine"] == "none":  # no diagnosis tokens: nothing to mask, count or train
        cfg.update(emitter=False, n_diag=0, train_engine=True)


# ------------------------------------------------------------------------------------------------
# the run folder: resumed, refused or kept, never silently overwritten


def claim(out: Path, cfg: dict) -> str:
    """'new', 'resume' or 'finished'. A run in `out` with other settings is refused, naming them, unless it
    never finished an epoch (a command that failed early): then it starts again with the new settings."""
    if cfg["restart"] or not (out / "config.json").exists():
        return "new"
    old = C.read_config(out)
    # a finished run is the same run on another machine: its dtype followed the device it trained on
    ignored = C.RUNTIME + (("dtype",) if C.finished(out) else ()) + C.unrecorded(old)
    diff = changed(old, cfg, ignored)
    if diff and not C.finished(out) and not (out / "state.pt").exists():  # it never finished an epoch: nothing to keep
        print(f"{out}: a run that never finished an epoch, with other settings ({', '.join(diff[:4])}): started "
              "again with these")
        cfg["restart"] = True
        return "new"
    if "data_fingerprint" in diff:
        Data(cfg["data"]).check_run(old, out)
    refuse_changed(out, "holds a run", old, cfg, diff, "discard it")
    return "finished" if C.finished(out) else "resume" if (out / "state.pt").exists() else "new"


def start_folder(out: Path, cfg: dict):
    out.mkdir(parents=True, exist_ok=True)
    if cfg["restart"]:
        for name in RUN_FILES + tuple(p.name for pattern in EARLIER for p in out.glob(pattern)):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(eval_dir(out), ignore_errors=True)  # every result of the old model
    write_atomic(out / "config.json", json.dumps(cfg, indent=1))


# ------------------------------------------------------------------------------------------------
# the recipe


def lr_at(it: int, cfg: dict, iters_per_epoch: int) -> float:
    """Per iteration: linear warmup from warmup_lr, then cosine down to min_lr."""
    warm, total = int(cfg["warmup_epochs"] * iters_per_epoch), cfg["epochs"] * iters_per_epoch
    if it < warm:
        return cfg["warmup_lr"] + (cfg["lr"] - cfg["warmup_lr"]) * it / warm
    progress = (it - warm) / max(1, total - warm)
    return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * progress))


def loss_fn(logits, y, cfg):  # logits (B, C) fp32, y (B,) class indices or (B, C) multi-hot -> (B,) per image
    if cfg["multi_label"]:  # one independent sigmoid per finding, as evaluated
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
    if cfg["authors_code"]:  # BCE on one-hot targets, as the authors' code; evaluated with softmax all the same
        hot = F.one_hot(y, logits.shape[-1]).float()
        return F.binary_cross_entropy_with_logits(logits, hot, reduction="none").mean(1)
    return F.cross_entropy(logits, y, reduction="none")  # one score definition: softmax, as evaluated


class Training:
    """What a resumed run needs: the model's trainable weights, AdamW, the scaler, the data order
    and the best epoch so far, all in state.pt (dropout is seeded per epoch)."""

    def __init__(self, model: P.PneumoLLM, cfg: dict):
        self.model, self.cfg, self.device = model, cfg, torch.device(cfg["device"])
        params = model.trainable_parameters()
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg["weight_decay"]),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8, fused=fused)
        # on every dtype, so that a step with inf/NaN gradients is skipped; with the fused AdamW on a
        # GPU the check stays on the device, without a host sync (the scaling itself matters in fp16)
        self.scaler = torch.amp.GradScaler(self.device.type)
        self.gen = torch.Generator().manual_seed(cfg["seed"])  # the data order
        self.epoch, self.best, self.best_epoch = 0, -1.0, 0

    def save(self, out: Path):
        """The resume point: one file, replaced at once, so that a kill at any instant resumes exactly."""
        st = dict(model={n: p.detach().cpu() for n, p in self.model.own_state_dict().items()},
                  opt=self.opt.state_dict(), scaler=self.scaler.state_dict(), gen=self.gen.get_state(),
                  epoch=self.epoch, best=self.best, best_epoch=self.best_epoch)
        with replacing(out / "state.pt") as tmp:
            torch.save(st, tmp)

    def restore(self, out: Path):
        st = C.read_state(out)
        C.load_trainable(self.model, st["model"])
        self.opt.load_state_dict(st["opt"])  # moves AdamW's state onto the parameters' device
        self.scaler.load_state_dict(st["scaler"])
        self.gen.set_state(st["gen"])
        self.epoch, self.best, self.best_epoch = st["epoch"], st["best"], st["best_epoch"]


def batches(perm: torch.Tensor, size: int):
    """(indices (size,), weights (size,)) per step: every batch full, so that a compiled step never
    sees a new shape; the last one is padded with rows of weight 0 (any images, repeated if need be)."""
    for i in range(0, len(perm), size):
        idx = perm[i:i + size]
        pad = perm[torch.arange(size - len(idx), device=perm.device) % len(perm)]
        yield torch.cat([idx, pad]), (torch.arange(size, device=perm.device) < len(idx)).float()


def train_epoch(tr: Training, fwd, x: torch.Tensor, y: torch.Tensor, ranks: Ranks) -> dict:
    """One pass over the training images in a fresh order, with no host sync per step. Dropout's
    masks come from (seed, epoch, rank): a resumed epoch draws what it drew, each process its own."""
    cfg, size = tr.cfg, tr.cfg["batch_size"]
    ipe = math.ceil(len(x) / size)
    torch.manual_seed(cfg["seed"] * 1_000_003 + tr.epoch * 1_009 + ranks.rank)
    tr.model.train()
    perm = torch.randperm(len(x), generator=tr.gen).to(tr.device)
    losses, bad = torch.zeros((), device=tr.device), torch.zeros((), device=tr.device)  # summed on the device
    taken = steps_taken(tr)
    for i, (idx, weight) in enumerate(batches(perm, size)):
        lr = lr_at(tr.epoch * ipe + i, cfg, ipe)
        for g in tr.opt.param_groups:
            g["lr"] = lr
        mine, w = idx[ranks.rank::ranks.world], weight[ranks.rank::ranks.world]
        with C.autocast(cfg):
            logits = fwd(P.normalise(x[mine], tr.model.args.vision.image_size, cfg["norm"]))
        # the mean over the batch's real rows; DDP averages the processes' gradients, hence * world
        real = min(size, len(x) - i * size)
        loss = (loss_fn(logits.float(), y[mine], cfg) * w).sum() * (ranks.world / real)
        tr.scaler.scale(loss).backward()  # under DDP a NaN in one process reaches every process's gradients
        tr.scaler.step(tr.opt)  # skipped if a gradient is inf/NaN: an fp16 overflow or a non-finite loss
        tr.scaler.update()
        tr.opt.zero_grad(set_to_none=True)
        finite = torch.isfinite(loss.detach())
        losses += torch.where(finite, loss.detach(), 0.0)
        bad += ~finite
    tr.epoch += 1
    losses, bad = ranks.gather(losses, bad)
    n_bad, skipped = int(bad.item()), ipe - (steps_taken(tr) - taken)
    if n_bad == ipe:
        raise UserError(f"every step of epoch {tr.epoch} had a non-finite loss; stopping "
                        "(try --dtype bf16/fp32 or a lower --lr)")
    scale = tr.scaler.get_scale()
    if skipped:
        print(f"epoch {tr.epoch}: {skipped} of {ipe} steps skipped ({n_bad} with a non-finite loss, the rest inf/NaN "
              f"gradients: an fp16 overflow); loss scale now {scale:g}", file=sys.stderr)
    return dict(epoch=tr.epoch, loss=losses.item() / (ipe - n_bad), lr=lr, skipped=skipped, scale=scale)


def steps_taken(tr: Training) -> int:  # AdamW's step count (GradScaler's skipped steps do not count)
    state = tr.opt.state.get(tr.model.head.weight, {})
    return int(state["step"]) if "step" in state else 0


def validate_and_save(tr: Training, rec: dict, val_x, val_y, out: Path):
    """The lead's end of an epoch: validation metrics, best.safetensors if better, log, resume point."""
    if tr.cfg["select"] != "last":
        m = M.metrics(val_y, C.predict(tr.model, val_x, tr.cfg))
        rec["val"] = {k: m[k] for k in M.METRICS}
        if m["avg"] > tr.best:
            tr.best, tr.best_epoch = m["avg"], tr.epoch
            with replacing(out / "best.safetensors") as tmp:
                C.save_trainable(tr.model, tmp)
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    tr.save(out)


def save_predictions(path: Path, rows: list, prob, cfg: dict):  # the paper's calls (argmax; > 0.5 per finding)
    write_predictions(path, [Path(r["image"]).stem for r in rows], prob, cfg, None, [r["patient"] for r in rows],
                      [r["label"] for r in rows])


def final_test(model: P.PneumoLLM, data: Data, split: dict, cfg: dict, epoch: int, out: Path) -> dict:
    """The one and only look at the test fold, with the chosen epoch's weights. Writes the validation
    split's predictions (eval.py chooses its operating point there), metrics.json, then predictions.csv:
    the run is finished."""
    C.load_trainable(model, out / "best.safetensors")
    if split["val"]:
        val = C.predict(model, data.images(split["val"]), cfg)
        save_predictions(out / "val_predictions.csv", split["val"], val, cfg)
    rows = split["test"]
    y, prob = data.labels(rows), C.predict(model, data.images(rows), cfg)
    m = M.metrics(y, prob)
    meta = dict(fold=cfg["fold"], selected_on=cfg["select"], epoch=epoch, n_test=len(rows), metrics=m)
    write_atomic(out / "metrics.json", json.dumps(meta, indent=1))
    save_predictions(out / "predictions.csv", rows, prob, cfg)
    print(f"test fold {cfg['fold']} ({len(rows)} images, epoch {epoch} chosen on {cfg['select']}; "
          f"{positive_class(cfg['classes'], cfg['multi_label'])}): "
          + "  ".join(f"{k} {100 * m[k]:.2f}" for k in M.METRICS))
    print(confusion(m, cfg))
    move = "" if out.name == f"fold{cfg['fold']}" else \
        f"mv {out} {out.parent}/fold{cfg['fold']} (eval.py reads a fold's run as <runs>/fold<N>), then "
    print(f"the run is in {out}; next: {move}python eval.py --runs {out.parent} --fold {cfg['fold']}")
    return m


def setup(argv) -> tuple:
    """Flags, data, the run folder's verdict and the split; every check before any file is written."""
    cfg = parse(argv)
    C.apply_threads(cfg["threads"])
    data = Data(cfg["data"])
    if cfg["model"] == "tiny" and (cfg["clip"], cfg["llama"]) == (MODELS["tiny"]["clip"], MODELS["tiny"]["llama"]):
        pretrain.pretrain(Path(cfg["clip"]).parent)  # the demo's backbones, made once (pretrain.py)
    settings = data.meta["settings"]  # so that score.py preprocesses new images exactly the same way
    cfg.update(classes=data.classes, multi_label=data.multi_label, crop=settings["crop"], masks=settings["masks"],
               size=int(settings["size"]), synthetic=bool(data.meta.get("demo")),
               data_fingerprint=data.meta.get("fingerprint"), frozen_files=C.frozen_files(cfg))
    if note := data.order_note():
        print(note)
    if cfg["question"]:
        C.tokenize_question(cfg)
    split = data.run_split(cfg)
    if cfg["select"] == "test":
        print("WARNING: the epoch is chosen ON THE TEST FOLD, as in the authors' code: its test metrics are "
              "optimistic", file=sys.stderr)
    data.check_split(split, cfg)
    return cfg, data, split, claim(Path(cfg["out"]), cfg)


def main(argv=None):
    cfg, data, split, verdict = setup(argv)
    out = Path(cfg["out"])
    if verdict == "finished" and not (out / "best.safetensors").exists():
        raise UserError(f"{out / 'best.safetensors'}: missing, so the finished run has no model; pass --restart "
                        "to train it again")
    if verdict == "finished":
        print(f"{out}: this run is finished; eval.py reads it; pass --restart to train it again")
        return json.loads((out / "metrics.json").read_text())["metrics"]
    ranks = Ranks(cfg)
    model = C.build(cfg)  # fails early, with the download message, if checkpoints are missing
    if not ranks.lead:
        return run(model, cfg, data, split, verdict, ranks)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, "train.py"):  # a second command on a live run is refused
        return run(model, cfg, data, split, claim(out, cfg), ranks)


def begin(tr: Training, out: Path, verdict: str, ranks: Ranks):
    """A new run's folder, or the resume point; the log cut back to it (a killed run logs past it)."""
    if ranks.lead and verdict == "new":
        start_folder(out, tr.cfg)
    if verdict == "resume":
        tr.restore(out)
        print(f"{out}: resuming the interrupted run after epoch {tr.epoch} of {tr.cfg['epochs']}")
    if ranks.lead:
        lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
        write_atomic(out / "log.jsonl", "".join(l + "\n" for l in lines if json.loads(l)["epoch"] <= tr.epoch))


def run(model: P.PneumoLLM, cfg: dict, data: Data, split: dict, verdict: str, ranks: Ranks):
    """Start or resume the run, train to the last epoch, then the one look at the test fold."""
    out, tr = Path(cfg["out"]), Training(model, cfg)
    begin(tr, out, verdict, ranks)
    device = tr.device
    x = torch.from_numpy(data.images(split["train"])).to(device)  # every image on the device, once
    y = torch.from_numpy(data.labels(split["train"])).to(device)
    val_x, val_y = torch.from_numpy(data.images(split["select"])).to(device), data.labels(split["select"])
    if cfg["checkpoint_vit"] and isinstance(model.visual, P.VisionTransformer):
        model.visual.grad_checkpointing = True
    fwd = ranks.wrap(model, device)
    fwd = torch.compile(fwd, mode=cfg["compile"]) if cfg["compile"] else fwd
    print(f"fold {cfg['fold']}: {len(x)} train, {len(val_x)} validation images (epoch chosen on: {cfg['select']})"
          + (f"; {ranks.world} processes share each batch of {cfg['batch_size']}" if ranks.world > 1 else ""))
    t0, start = time.time(), tr.epoch
    try:
        while tr.epoch < cfg["epochs"]:
            rec = train_epoch(tr, fwd, x, y, ranks)
            if not ranks.lead:  # the others go straight on; the next gradient all-reduce waits for the lead
                continue
            validate_and_save(tr, rec, val_x, val_y, out)
            el, done = time.time() - t0, tr.epoch - start
            val = f"  val AUC {rec['val']['auc']:.3f} AVG {100 * rec['val']['avg']:.2f}" if "val" in rec else ""
            print(f"epoch {tr.epoch:3d}/{cfg['epochs']}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}{val}  "
                  f"{done * len(x) / el:.1f} img/s  ETA {(cfg['epochs'] - tr.epoch) * el / done:.0f}s")
    except KeyboardInterrupt:
        done = C.read_state(out)["epoch"] if (out / "state.pt").exists() else 0
        raise Interrupted(f"after epoch {done} of {cfg['epochs']}, which is saved; run the same command to "
                          "resume") from None
    ranks.close()
    if not ranks.lead:
        return None
    n = tr.epoch - start
    print(f"trained {n} epoch{'s' * (n != 1)} in {time.time() - t0:.0f} s (validation and checkpoints included)")
    if cfg["select"] == "last":
        with replacing(out / "best.safetensors") as tmp:
            C.save_trainable(model, tmp)
    chosen = tr.best_epoch if cfg["select"] != "last" else cfg["epochs"]
    return final_test(model, data, split, cfg, chosen, out)


if __name__ == "__main__":
    sys.exit(cli(main, (P.CheckpointError,)))
