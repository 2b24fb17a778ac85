"""
What train.py and eval.py share, so that neither imports the other: a prepared data folder, a model
built from a run's config.json, the image normalisation, prediction, the paper's metrics, and the
command-line plumbing (runtime flags, one-line errors).

A run folder (out/<data>/fold<N>/) holds config.json, the only record of how the run was made:
every flag of train.py under its own name (the ablation flags are PneumoArgs' field names), plus
what the data folder says (classes, crop, size).
"""
import csv
import json
import sys
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image

import pneumollm as P
from audit import roc_auc  # noqa: F401 (numpy only, so prepare.py's audit uses it too)
from prepare import UserError, make_folds

METRICS = ("sensitivity", "specificity", "accuracy", "auc", "avg")


def cli(main):
    """Run a script's main; a mistake in the user's input is one line on stderr and exit status 2."""
    try:
        rc = main()
        return rc if isinstance(rc, int) else 0
    except (UserError, P.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def runtime_flags(ap):
    """Flags that change where and how fast a run goes, not what it computes."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, help="CPU threads for torch; 1-2 is often fastest on a busy or small "
                    "machine (default: torch's choice, one per core)")
    ap.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead",
                                                                       "max-autotune"],
                    help="torch.compile the model; reduce-overhead also replays CUDA graphs (GPU)")


def apply_threads(n):
    if n is not None:
        if n < 1:
            raise UserError(f"--threads {n}: give 1 or more")
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# data: prepare.py's manifest, every image in memory once


class Data:
    def __init__(self, folder):
        self.folder = Path(folder)
        for name in ("manifest.csv", "meta.json"):
            if not (self.folder / name).exists():
                raise UserError(f"{self.folder / name} not found: prepare the data first (python prepare.py "
                                f"--demo, or --images/--labels/--out {self.folder})")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.classes, self.multi_label = self.meta["classes"], self.meta.get("multi_label", False)
        with open(self.folder / "manifest.csv", newline="") as f:
            self.rows = list(csv.DictReader(f))
        self.folds = sorted({int(r["fold"]) for r in self.rows})

    def images(self, rows) -> torch.Tensor:  # (N, 1, H, W) uint8
        if not rows:  # e.g. the validation split of --val-frac 0
            return torch.zeros(0, 1, 0, 0, dtype=torch.uint8)
        arrays = [np.asarray(Image.open(self.folder / r["image"]).convert("L")) for r in rows]
        return torch.from_numpy(np.stack(arrays))[:, None]

    def split(self, fold: int, val_frac=0.1, seed=20) -> dict:
        """{'train', 'val', 'test': rows}; val is carved from the training patients, by patient."""
        if fold not in self.folds:
            raise UserError(f"--fold {fold}: {self.folder}/manifest.csv has folds {self.folds}")
        test = [r for r in self.rows if int(r["fold"]) == fold]
        rest = [r for r in self.rows if int(r["fold"]) != fold]
        out = {"test": test, "train": rest, "val": []}
        if val_frac > 0:
            k = max(2, round(1 / val_frac))  # inner folds; the first is the validation split
            inner = make_folds([r["patient"] for r in rest], [r["label"] for r in rest], k, seed)
            out["train"] = [r for r, f in zip(rest, inner) if f != 1]
            out["val"] = [r for r, f in zip(rest, inner) if f == 1]
        seen = {r["patient"] for r in out["train"] + out["val"]}
        assert not seen & {r["patient"] for r in test}, "a test patient is in the training data"
        return out

    def labels(self, rows) -> np.ndarray:
        return encode_labels([r["label"] for r in rows], self.classes, self.multi_label)


def encode_labels(labels: list, classes: list, multi_label: bool) -> np.ndarray:
    """Class indices (N,), or multi-hot (N, C) for multi-label sets (findings written a|b)."""
    if multi_label:
        hot = [[c in label.split("|") for c in classes] for label in labels]
        return np.array(hot, np.float32).reshape(-1, len(classes))
    return np.array([classes.index(label) for label in labels], np.int64)


# ------------------------------------------------------------------------------------------------
# a model from a run's config


def pneumo_fields(cfg: dict) -> dict:
    """The PneumoArgs fields that a run's config sets (flags carry the fields' names; --llama is a path)."""
    names = {f.name for f in fields(P.PneumoArgs)} - {"vision", "llama"}
    return {k: cfg[k] for k in names if k in cfg}


def build(cfg: dict, as_stored=False) -> P.PneumoLLM:
    """The run's model with fresh trainable weights (seeded): tiny and random, or from the checkpoints,
    whose frozen weights are cast to the run's dtype, or kept as stored (memory-mapped, no copy)."""
    device, dtype = torch.device(cfg["device"]), None if as_stored else P.DTYPES[cfg["dtype"]]
    torch.manual_seed(cfg["seed"])
    kw = dict(pneumo_fields(cfg), n_classes=len(cfg["classes"]))
    if cfg["model"] == "tiny":
        model = P.PneumoLLM(P.tiny_args(vocab_size=cfg.get("vocab_size", -1), **kw)).to(device)
        return cast_frozen(model, dtype) if dtype else model
    for path, needed in ((cfg["clip"], kw["encoder"] == "clip"), (cfg["llama"], kw["llm"])):
        if needed and not Path(path).exists():
            raise UserError(f"{path} not found: PneumoLLM needs OpenAI's ViT-L-14.pt (--clip) and LLaMA-7B as "
                            "Meta or Hugging Face ship it (--llama); README 'The real model' says what to put "
                            "where; --model tiny runs without them")
    return P.from_pretrained(cfg["clip"], cfg["llama"] if kw["llm"] else None, device, dtype, **kw)


def cast_frozen(model: P.PneumoLLM, dtype) -> P.PneumoLLM:  # from_pretrained's dtype policy for a random model
    own = {id(p) for m in model.own_modules() for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in own:  # CLIP's and LLaMA's weights in `dtype`; this project's stay fp32
            p.data = p.data.to(dtype)
    return model


def finished(run: Path) -> bool:
    return (run / "predictions.csv").exists()


def check_finished(run: Path, fold: int):
    """Evaluation reads finished runs only: an interrupted run's weights are not the run's result."""
    if finished(run):
        return
    if not (run / "config.json").exists():
        raise UserError(f"{run}: no run there; train it first: python train.py --fold {fold} --out {run}")
    cfg = json.loads((run / "config.json").read_text())
    epoch = torch.load(run / "state.pt", weights_only=True)["epoch"] if (run / "state.pt").exists() else 0
    raise UserError(f"{run}: training stopped at epoch {epoch} of {cfg['epochs']}; run the same train.py command "
                    "again to finish it (it resumes)")


def load_run(run: Path, device=None, keep_checkpoint_dtype=False) -> tuple[P.PneumoLLM, dict]:
    """A finished run's model with the weights of its chosen epoch, and its config. On a CPU,
    keep_checkpoint_dtype scores with the frozen weights as the checkpoints store them: memory-mapped,
    never copied (LLaMA-7B in fp32 would need 27 GB)."""
    cfg = json.loads((run / "config.json").read_text())
    trained_on = cfg["device"] if cfg["device"] == "cpu" or torch.cuda.is_available() else "cpu"  # no GPU here
    cfg["device"] = device or trained_on
    model = build(cfg, as_stored=keep_checkpoint_dtype and cfg["device"] == "cpu")
    model.load_trainable(run / "best.safetensors")
    return model, cfg


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
    if cfg["dtype"] == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(cfg["device"]).type, dtype=P.DTYPES[cfg["dtype"]])


def normalise(x: torch.Tensor, cfg, size: int) -> torch.Tensor:  # (B, 1, H, W) uint8 -> (B, 3, size, size)
    """Grey to CLIP's (default) or ImageNet's (--norm imagenet, the authors' code) normalised RGB."""
    mean, std = (P.CLIP_MEAN, P.CLIP_STD) if cfg["norm"] == "clip" else (P.IMAGENET_MEAN, P.IMAGENET_STD)
    m, s = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    x = x.float() / 255
    if x.shape[-1] != size:  # e.g. ViT-L/14@336 on 224-px data; better: prepare.py --size 336
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - m) / s  # the one grey channel broadcasts to three identical ones


@torch.no_grad()
def predict(model, images, cfg, batch=32) -> np.ndarray:  # (N, C): softmax, or sigmoids if multi-label
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = normalise(images[i:i + batch].to(cfg["device"]), cfg, model.args.vision.image_size)
        with autocast(cfg):
            logits = model(x).float()
        out.append((logits.sigmoid() if cfg.get("multi_label") else logits.softmax(-1)).cpu())
    return torch.cat(out).numpy()


# ------------------------------------------------------------------------------------------------
# the paper's metrics (checked against scikit-learn in the tests)


def metrics(y, prob) -> dict:
    """y (N,) class indices, prob (N, C) probabilities; class 0 is 'normal' in the binary case.
    Multi-label: y (N, C) multi-hot, prob (N, C) sigmoids, each finding scored on its own, then
    macro-averaged. Multi-class: macro averages of one-vs-rest."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=float)
    if y.ndim == 2:
        per = [metrics(y[:, c].astype(int), np.stack([1 - prob[:, c], prob[:, c]], 1)) for c in range(y.shape[1])]
        macro = {k: float(np.mean([m[k] for m in per])) for k in METRICS}
        return dict(macro, confusion=[m["confusion"] for m in per])
    n_classes = prob.shape[1]
    counts = np.bincount(y, minlength=n_classes)
    if counts.min() == 0:
        raise ValueError(f"metrics need every class present; counts per class: {counts.tolist()}")
    cm = np.zeros((n_classes, n_classes), int)
    np.add.at(cm, (y, prob.argmax(1)), 1)
    recall = cm.diagonal() / cm.sum(1)
    if n_classes == 2:
        sens, spec, auc = recall[1], recall[0], roc_auc(y == 1, prob[:, 1])
    else:
        tn = [cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c] for c in range(n_classes)]
        spec = np.mean([tn[c] / (cm.sum() - cm[c].sum()) for c in range(n_classes)])
        sens, auc = recall.mean(), np.mean([roc_auc(y == c, prob[:, c]) for c in range(n_classes)])
    acc = cm.diagonal().sum() / cm.sum()
    out = dict(sensitivity=float(sens), specificity=float(spec), accuracy=float(acc), auc=float(auc))
    out["avg"] = float(np.mean(list(out.values())))
    return dict(out, confusion=cm.tolist())
