"""
Metrics as the paper reports them: sensitivity (recall of disease), specificity (recall of normal),
accuracy, ROC AUC and AVG (their mean), with 95 % bootstrap intervals and the confusion matrix. Read
from the predictions.csv that train.py writes when a run finishes: no model is rebuilt, except to
score new images.

    python eval.py --fold 1                  # fold 1's test set
    python eval.py --all                     # the finished folds as the paper's Table 2 (markdown + JSON)
    python eval.py --fold 1 --image a.dcm    # probabilities for new images with fold 1's model

Multi-class label sets get macro-averaged metrics (sensitivity = mean recall over classes,
specificity = mean one-vs-rest specificity, AUC = mean one-vs-rest AUC). Multi-label sets get each
finding's binary metrics (positive when its sigmoid > 0.5), macro-averaged; accuracy is then the
per-finding accuracy (1 - Hamming loss). Intervals resample patients, not images: the images of one
patient are not independent.
"""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import common as C
from prepare import UserError


def read_run(run: Path, fold: int) -> tuple:
    """(config, predictions.csv rows, labels, probabilities (N, C)) of a finished run."""
    C.check_finished(run, fold)
    cfg = json.loads((run / "config.json").read_text())
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    prob = np.array([[float(r[f"p_{c}"]) for c in cfg["classes"]] for r in rows]).reshape(len(rows), -1)
    return cfg, rows, C.encode_labels([r["label"] for r in rows], cfg["classes"], cfg["multi_label"]), prob


def roc_curve(y, score):
    """(fpr, tpr) points from the highest threshold down, one point per distinct score."""
    y, score = np.asarray(y).astype(bool), np.asarray(score)
    order = np.argsort(-score, kind="mergesort")
    y, s = y[order], score[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def bootstrap(y, prob, patients, n=1000, seed=0) -> dict:
    """95 % percentile intervals over resampled patients (each drawn patient brings all its images);
    resamples lacking a class are redrawn."""
    rng, y, prob = np.random.default_rng(seed), np.asarray(y), np.asarray(prob)
    _, of = np.unique(np.asarray(patients), return_inverse=True)
    images_of = [np.flatnonzero(of == p) for p in range(of.max() + 1)]
    draws = []
    while len(draws) < n:
        i = np.concatenate([images_of[p] for p in rng.integers(0, len(images_of), len(images_of))])
        present = np.unique(y[i]).size == prob.shape[1] if y.ndim == 1 else np.ptp(y[i], 0).all()  # multi-label: 0s and 1s
        if present:
            m = C.metrics(y[i], prob[i])
            draws.append([m[k] for k in C.METRICS])
    lo, hi = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
    return {k: [float(a), float(b)] for k, a, b in zip(C.METRICS, lo, hi)}


def report(m: dict, ci: dict = None) -> str:
    return "  ".join(f"{k} {100 * m[k]:.2f}" + (f" [{100 * ci[k][0]:.1f}, {100 * ci[k][1]:.1f}]" if ci else "") for k in C.METRICS)


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


def eval_fold(runs: Path, fold: int) -> dict:
    run = runs / f"fold{fold}"
    cfg, rows, y, prob = read_run(run, fold)
    m, ci = C.metrics(y, prob), bootstrap(y, prob, [r["patient"] for r in rows])
    layout = "per finding [[tn, fp], [fn, tp]]" if cfg["multi_label"] else "rows true, cols predicted"
    print(f"fold {fold} ({len(y)} test images, {len({r['patient'] for r in rows})} patients; 95 % intervals resample "
          f"patients): {report(m, ci)}\nconfusion ({layout}, {cfg['classes']}): {m['confusion']}")
    (run / "eval.json").write_text(json.dumps(dict(metrics=m, ci95=ci, ci_resamples="patients"), indent=1))
    if prob.shape[1] == 2 and not cfg["multi_label"]:
        draw_roc(run / "roc.png", y == 1, prob[:, 1], f"fold {fold}: AUC {m['auc']:.3f}")
    return m


def table(runs: Path, n_folds: int) -> int:
    done = [f for f in range(1, n_folds + 1) if C.finished(runs / f"fold{f}")]
    missing = [f for f in range(1, n_folds + 1) if f not in done]
    if not done:
        raise UserError(f"{runs}: no finished fold among fold1..fold{n_folds}; train them with python train.py --fold N")
    per = {f: C.metrics(*read_run(runs / f"fold{f}", f)[2:]) for f in done}
    vals = np.array([[m[k] for k in C.METRICS] for m in per.values()]) * 100
    sd = vals.std(0, ddof=1) if len(done) > 1 else np.full(len(C.METRICS), np.nan)
    lines = ["| fold | Sens. | Spec. | Acc. | AUC | AVG |", "|---|---|---|---|---|---|"]
    lines += [f"| {f} | " + " | ".join(f"{100 * m[k]:.2f}" for k in C.METRICS) + " |" for f, m in per.items()]
    lines.append("| mean ± sd | " + " | ".join(f"{mu:.2f} ± {s:.2f}" for mu, s in zip(vals.mean(0), sd)) + " |")
    if missing:
        lines.append(f"\nnot finished, left out: fold {', '.join(map(str, missing))}")
    text = "\n".join(lines)
    print(text)
    (runs / "table.md").write_text(text + "\n")
    summary = dict(folds=per, missing=missing, mean=dict(zip(C.METRICS, vals.mean(0))), sd=dict(zip(C.METRICS, sd)))
    (runs / "table.json").write_text(json.dumps(summary, indent=1))
    return 0


def score_images(runs: Path, fold: int, images: list, device) -> int:
    import torch

    import prepare
    run = runs / f"fold{fold}"
    C.check_finished(run, fold)
    model, cfg = C.load_run(run, device)
    failed = []
    for p in images:
        try:  # exactly prepare.py's pipeline: read, window, 8 bits, lung crop, resize
            img, _ = prepare.preprocess(Path(p), cfg["crop"], cfg["size"])
        except prepare.Skip as e:
            failed.append(f"{p}: {e}")
            continue
        prob = C.predict(model, torch.tensor(img)[None, None], cfg)[0]
        binary = len(prob) == 2 and not cfg["multi_label"]
        print(f"{p}: P({cfg['classes'][-1]}) = {prob[-1]:.3f}" if binary else f"{p}: " + ", ".join(
            f"{c} {q:.3f}" for c, q in zip(cfg["classes"], prob)))
    for line in failed:
        print(f"skipped {line}", file=sys.stderr)
    return int(len(failed) == len(images))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runs", default="out/demo", help="folder holding fold1/, fold2/, ... from train.py")
    ap.add_argument("--fold", type=int, default=1, help="the fold to score (or whose model scores --image)")
    ap.add_argument("--all", action="store_true", help="every finished fold of 1..--folds, as the paper's Table 2")
    ap.add_argument("--folds", type=int, default=5, help="how many folds --all expects")
    ap.add_argument("--image", nargs="+", help="DICOM/PNG/JPEG files to score with fold --fold's model")
    ap.add_argument("--device", help="for --image (default: the run's)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch, for --image")
    return ap


def main(argv=None):
    a = parser().parse_args(argv)
    runs = Path(a.runs)
    if a.image:
        C.apply_threads(a.threads)
        return score_images(runs, a.fold, a.image, a.device)
    if a.all:
        return table(runs, a.folds)
    eval_fold(runs, a.fold)
    return 0


if __name__ == "__main__":
    sys.exit(C.cli(main))
