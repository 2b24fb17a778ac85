"""
Metrics as the paper reports them: sensitivity (recall of disease), specificity (recall of normal),
accuracy, ROC AUC and AVG (their mean), with 95 % bootstrap intervals and the confusion matrix.

    python eval.py --fold 1                  # score fold 1's test set with its trained checkpoint
    python eval.py --all                     # five folds as the paper's Table 2 (markdown + JSON)
    python eval.py --image a.dcm b.png ...   # probability of disease per image (single-patient use)

Multi-class label sets get macro-averaged metrics (sensitivity = mean recall over classes,
specificity = mean one-vs-rest specificity, AUC = mean one-vs-rest AUC). Multi-label sets get each
finding's binary metrics (positive when its sigmoid > 0.5), macro-averaged; accuracy is then the
per-finding accuracy (1 - Hamming loss).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KEYS = ("sensitivity", "specificity", "accuracy", "auc", "avg")


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney U with average ranks for ties: P(score of a positive > score of a negative)."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("ROC AUC is undefined: the labels hold only one class")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):  # average rank over each run of tied scores
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = y.sum(), (~y).sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(y, score):
    """(fpr, tpr) points from the highest threshold down, one point per distinct score."""
    y, score = np.asarray(y).astype(bool), np.asarray(score)
    order = np.argsort(-score, kind="mergesort")
    y, s = y[order], score[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def metrics(y, prob) -> dict:
    """y (N,) class indices, prob (N, C) probabilities; class 0 is 'normal' in the binary case.
    Multi-label: y (N, C) multi-hot, prob (N, C) sigmoids."""
    y, prob = np.asarray(y), np.asarray(prob, dtype=float)
    if y.ndim == 2:
        per = [metrics(y[:, c].astype(int), np.stack([1 - prob[:, c], prob[:, c]], 1)) for c in range(y.shape[1])]
        return dict({k: float(np.mean([m[k] for m in per])) for k in KEYS}, confusion=[m["confusion"] for m in per])
    n_classes = prob.shape[1]
    if np.bincount(y, minlength=n_classes).min() == 0:
        raise ValueError(f"metrics need every class present; counts per class: {np.bincount(y, minlength=n_classes).tolist()}")
    pred = prob.argmax(1)
    cm = np.zeros((n_classes, n_classes), int)
    np.add.at(cm, (y, pred), 1)
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


def bootstrap(y, prob, n=1000, seed=0) -> dict:
    """95 % percentile intervals over resampled images (resamples lacking a class are redrawn)."""
    rng, y, prob = np.random.default_rng(seed), np.asarray(y), np.asarray(prob)
    draws = []
    while len(draws) < n:
        i = rng.integers(0, len(y), len(y))
        present = np.unique(y[i]).size == prob.shape[1] if y.ndim == 1 else np.ptp(y[i], 0).all()  # multi-label: 0s and 1s per finding
        if present:
            m = metrics(y[i], prob[i])
            draws.append([m[k] for k in KEYS])
    lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    return {k: [float(a), float(b)] for k, a, b in zip(KEYS, lo, hi)}


def report(m: dict, ci: dict = None) -> str:
    return "  ".join(f"{k} {100 * m[k]:.2f}" + (f" [{100 * ci[k][0]:.1f}, {100 * ci[k][1]:.1f}]" if ci else "") for k in KEYS)


def draw_roc(path: Path, y, score, title: str):
    fpr, tpr = roc_curve(y, score)
    size, pad = 400, 40
    im = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([pad, pad, pad + size, pad + size], outline="black")
    d.line([(pad, pad + size), (pad + size, pad)], fill=(180, 180, 180))
    d.line([(pad + f * size, pad + size - t * size) for f, t in zip(fpr, tpr)], fill=(200, 30, 30), width=3)
    d.text((pad, 10), title, fill="black")
    d.text((pad + size // 2 - 60, pad + size + 12), "1 - specificity", fill="black")
    d.text((4, pad + size // 2), "sens.", fill="black")
    im.save(path)


# ------------------------------------------------------------------------------------------------


def eval_fold(a, fold: int) -> dict:
    import train
    run = Path(a.runs) / f"fold{fold}"
    if not (run / "best.safetensors").exists():
        raise SystemExit(f"{run}/best.safetensors not found: train it first with `python train.py --fold {fold}`")
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(device=a.device or cfg["device"])
    model, data = train.load_trained(cfg, run / "best.safetensors")
    rows, images, y = data.split(fold)["test"]
    prob = train.predict(model, images, cfg)
    m, ci = metrics(y, prob), bootstrap(y, prob)
    layout = "per finding [[tn, fp], [fn, tp]]" if cfg.get("multi_label") else "rows true, cols predicted"
    print(f"fold {fold} ({len(y)} test images): {report(m, ci)}\nconfusion ({layout}, {cfg['classes']}): {m['confusion']}")
    (run / "eval.json").write_text(json.dumps(dict(metrics=m, ci95=ci), indent=1))
    if prob.shape[1] == 2 and not cfg.get("multi_label"):
        draw_roc(run / "roc.png", y == 1, prob[:, 1], f"fold {fold}: AUC {m['auc']:.3f}")
    return m


def table(a):
    per = {f: json.loads((Path(a.runs) / f"fold{f}/metrics.json").read_text())["metrics"] for f in range(1, a.folds + 1)}
    lines = ["| fold | Sens. | Spec. | Acc. | AUC | AVG |", "|---|---|---|---|---|---|"]
    lines += [f"| {f} | " + " | ".join(f"{100 * m[k]:.2f}" for k in KEYS) + " |" for f, m in per.items()]
    vals = np.array([[m[k] for k in KEYS] for m in per.values()]) * 100
    lines.append("| mean ± sd | " + " | ".join(f"{mu:.2f} ± {sd:.2f}" for mu, sd in zip(vals.mean(0), vals.std(0, ddof=1))) + " |")
    text = "\n".join(lines)
    print(text)
    (Path(a.runs) / "table.md").write_text(text + "\n")
    (Path(a.runs) / "table.json").write_text(json.dumps(dict(folds=per, mean=dict(zip(KEYS, vals.mean(0))), sd=dict(zip(KEYS, vals.std(0, ddof=1)))), indent=1))


def score_images(a):
    import torch
    import prepare
    import train
    cfg = json.loads((Path(a.runs) / f"fold{a.fold}/config.json").read_text())
    cfg.update(device=a.device or cfg["device"])
    model, _ = train.load_trained(cfg, Path(a.runs) / f"fold{a.fold}/best.safetensors", with_data=False)
    failed = 0
    for p in a.image:
        try:  # exactly prepare.py's pipeline: read, window, 8 bits, lung crop, resize
            img, _ = prepare.preprocess(Path(p), cfg["crop"], cfg["size"])
        except prepare.Skip as e:
            print(f"{p}: skipped: {e}")
            failed += 1
            continue
        prob = train.predict(model, torch.tensor(img)[None, None], cfg)[0]
        print(f"{p}: P({cfg['classes'][-1]}) = {prob[-1]:.3f}" if len(prob) == 2 and not cfg.get("multi_label") else f"{p}: " + ", ".join(f"{c} {q:.3f}" for c, q in zip(cfg["classes"], prob)))
    return int(failed == len(a.image))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fold", type=int, default=1)
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--image", nargs="+", help="DICOM/PNG/JPEG files to score with fold --fold's model")
    ap.add_argument("--runs", default="out/demo", help="folder holding fold1/, fold2/, ... from train.py")
    ap.add_argument("--device")
    a = ap.parse_args(argv)
    if a.image:
        return score_images(a)
    if a.all:
        return table(a)
    eval_fold(a, a.fold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
