"""
Evaluates finished runs from the predictions.csv that train.py writes, and scores new images and
other sites' folders with a run's model.

No model is rebuilt, except to score images:

    python eval.py --fold 1                  # fold 1's test set: the paper's figures, and what comes next
    python eval.py --all                     # the finished folds as the paper's Table 2 (markdown + JSON)
    python eval.py --fold 1 --image opt.dcm    # new images, with fold 1's model and operating point

- The paper's figures, unchanged: sensitivity (recall of disease), specificity, accuracy, ROC AUC
  and AVG (their mean) at the argmax, for comparison with Table 2.
- An operating point chosen on the run's validation split, never on the test fold: Youden's J, or
  the highest threshold reaching --sensitivity there. It is applied unchanged to the test fold:
  sensitivity, specificity, accuracy, PPV, NPV and F1. Multi-label sets get one threshold per finding
  (one-vs-rest), macro-averaged; multi-class sets keep the argmax.
- Calibration: Brier score and expected calibration error (15 equal-width bins of the predicted
  probability of each class: of disease in the binary case), reliability.png; --calibrate fits a
  temperature on validation and reports both.
- 95 % intervals resample patients, not images (one patient's images are not independent).
- A baseline to beat: logistic regression on the 32x32 grey image, trained on exactly the run's
  training patients; its AUC, and the paired difference, next to the model's.

Multi-class metrics are macro averages (sensitivity = mean recall, specificity = mean one-vs-rest
specificity, AUC = mean one-vs-rest AUC). Multi-label sets get each finding's binary metrics
(positive when its sigmoid > 0.5), macro-averaged; accuracy is the per-finding accuracy.
"""
import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common as C
import explain
import metrics as M
import plots
import pneumollm as P
import prepare
from folders import Data, Help, UserError, cli, encode_labels, lacking, positive_class, write_atomic, write_csv
from lungcrop import lung_fields


def read_predictions(path: Path, cfg: dict) -> tuple:  # (rows, labels, probabilities (N, C))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    prob = np.array([[float(r[f"p_{c}"]) for c in cfg["classes"]] for r in rows]).reshape(len(rows), -1)
    return rows, encode_labels([r["label"] for r in rows], cfg["classes"], cfg["multi_label"]), prob


# ------------------------------------------------------------------------------------------------
# the baseline


def run_data(cfg: dict) -> Data:  # the run's data folder, refused if it changed since the run was trained
    data = Data(cfg["data"])
    data.check_run(cfg, cfg["out"])
    return data


def pixels(data: Data, rows) -> np.ndarray:  # (N, 1024): the 32x32 grey image in [0, 1]
    return small(data.images(rows))


def small(images: np.ndarray) -> np.ndarray:  # (N, 1, H, W) uint8 -> (N, 1024) in [0, 1]
    return np.stack([np.asarray(Image.fromarray(img[0]).resize((32, 32), Image.BILINEAR), np.float32).ravel() / 255
                     for img in images])


def fit_logistic(x, y, n_classes: int, multi_label: bool, l2: float):
    """Logistic regression on standardised features by metrics.py's Newton solver: one sigmoid per class
    (one-vs-rest) or per finding; deterministic. Returns a function from features to probabilities.
    Two classes need one fit: class 0's weights are class 1's negated (the bias is not penalised)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    hot = M.one_hot(y, n_classes, multi_label)
    fits = [1] if n_classes == 2 and not multi_label else range(n_classes)
    w = np.stack([M.logistic((x - mean) / std, hot[:, c], l2, steps=10) for c in fits], 1)
    w = np.c_[-w, w] if len(fits) < n_classes else w

    def predict(features):  # (N, F) -> (N, C)
        p = 1 / (1 + np.exp(-np.c_[np.ones(len(features)), (features - mean) / std] @ w))
        return p if multi_label else p / p.sum(1, keepdims=True)
    return predict


def baseline_model(cfg: dict):
    """Logistic regression on 32x32 pixels, trained on the run's own training split (the same patients
    as the model), its L2 strength chosen on the run's validation split (the AUC) when there is one.
    Returns (the run's data folder, its split, features -> probabilities)."""
    data = run_data(cfg)
    split = data.run_split(cfg)
    x, y = pixels(data, split["train"]), data.labels(split["train"])
    fits = {l2: fit_logistic(x, y, len(cfg["classes"]), cfg["multi_label"], l2) for l2 in (1.0, 30.0, 1000.0)}
    best = 30.0
    if split["val"]:
        xv, yv = pixels(data, split["val"]), data.labels(split["val"])
        best = max(fits, key=lambda l2: M.metrics(yv, fits[l2](xv))["auc"])
    return data, split, fits[best]


def baseline(cfg: dict, test_rows: list) -> np.ndarray:  # the baseline's probabilities on the test fold
    data, split, predict = baseline_model(cfg)
    return predict(pixels(data, data.rows_of(test_rows)))


# ------------------------------------------------------------------------------------------------


def read_run(run: Path, fold: int) -> tuple:
    """(config, predictions.csv rows, labels, probabilities) of a finished run."""
    C.check_finished(run, fold)
    cfg = json.loads((run / "config.json").read_text())
    return (cfg, *read_predictions(run / "predictions.csv", cfg))


def operating_point(run: Path, cfg: dict, sensitivity=None, more=(), saved=True) -> dict:
    """Thresholds chosen on the run's validation predictions (pooled with those of the runs `more`: an
    ensemble's folds), never on the test fold. One rule for every mode: --fold (and --all) choose it,
    Youden's J or --sensitivity, and save it in operating_point.json; --image, --explain, --probe and
    --data apply the saved rule (`saved`) unless given --sensitivity, always to the validation
    predictions as they are now. A run trained with a validation split and missing its predictions is
    refused, never given 0.5."""
    if not cfg["multi_label"] and len(cfg["classes"]) > 2:
        return dict(rule="argmax (multi-class: no threshold)", thresholds={})
    names = cfg["classes"] if cfg["multi_label"] else cfg["classes"][1:]
    file = run / "operating_point.json"
    if sensitivity is None and saved and file.exists():
        sensitivity = json.loads(file.read_text()).get("sensitivity")
        how = f" (saved by eval.py --fold {cfg['fold']}: {file.name})"
    else:
        how = "" if sensitivity is None else " (--sensitivity)"
    if cfg.get("val_frac") == 0 or "val_frac" not in cfg and not (run / "val_predictions.csv").exists():
        return dict(rule="0.5 (the run has no validation split to choose a threshold on)", sensitivity=None,
                    thresholds={c: 0.5 for c in names})
    for r in (run, *more):
        if not (r / "val_predictions.csv").exists():
            raise UserError(f"{r / 'val_predictions.csv'}: missing, though the run held out --val-frac "
                            f"{cfg['val_frac']} of its patients to choose its threshold on; restore the file, or "
                            "train the run again with the same train.py command and --restart")
    vals = [read_predictions(r / "val_predictions.csv", cfg)[1:] for r in (run, *more)]
    yv, pv = (np.concatenate(v) for v in zip(*vals))
    rule = ("Youden's J" if sensitivity is None else f"sensitivity >= {sensitivity}") + how
    findings = M.as_binary(yv, pv, cfg["multi_label"])
    thresholds = {n: M.choose_threshold(y, s, sensitivity) for n, (_, y, s) in zip(names, findings)}
    youden = {n: sum(M.at_threshold(y, s, thresholds[n])[k] for k in ("sensitivity", "specificity")) - 1
              for n, (_, y, s) in zip(names, findings)}
    chance = [f"{n} (J {v:.2f})" for n, v in youden.items() if not v > 0]
    warn = f"; WARNING: no cut-off beats chance there for {', '.join(chance)}" if chance else ""
    return dict(rule=f"{rule} on the validation split ({len(yv)} images){warn}", sensitivity=sensitivity,
                thresholds=thresholds)


def evaluate(run: Path, fold: int, opt) -> dict:
    """Everything about one finished fold, as eval.json holds it."""
    cfg, rows, y, prob = read_run(run, fold)
    point = operating_point(run, cfg, opt.sensitivity, saved=False)
    write_atomic(run / "operating_point.json", json.dumps(point, indent=1))
    pb = baseline(cfg, rows)
    out, draws = figures(y, prob, [r["patient"] for r in rows], cfg, point, pb)
    if opt.calibrate and (run / "val_predictions.csv").exists():
        ml, (_, yv, pv) = cfg["multi_label"], read_predictions(run / "val_predictions.csv", cfg)
        temp = M.fit_temperature(yv, pv, ml)
        out["calibration"].update(temperature=temp, calibrated=M.calibration(y, M.with_temperature(prob, temp, ml), ml))
    return dict(dict(fold=fold, **out), _curves=(cfg, y, prob, draws, pb))


def figures(y, prob, patients: list, cfg: dict, point: dict, pb) -> tuple:
    """What eval.py reports on scored images (a test fold, or another site's folder): the paper's metrics
    with patient-level intervals, the figures at the operating point, calibration, and the pixel
    baseline's probabilities `pb` against the model's (the paired difference of AUC). Returns (the
    figures, the resamples)."""
    ml = cfg["multi_label"]
    draws = M.resamples(patients, y, prob.shape[1])
    m, model_draws = M.metrics(y, prob), [M.metrics(y[i], prob[i]) for i in draws]
    findings = zip(M.as_binary(y, prob, ml), point["thresholds"])
    auc, base_auc = M.metrics(y, pb)["auc"], [M.metrics(y[i], pb[i])["auc"] for i in draws]
    diff = M.interval([d["auc"] - b for d, b in zip(model_draws, base_auc)])
    verdict = "beats" if diff[0] > 0 else "does NOT beat" if m["auc"] <= auc else "is not clearly better than"
    return dict(images=len(y), patients=len(set(patients)), intervals=f"95 %, {len(draws)} resamples of patients",
                paper=dict(metrics=m, ci95={k: M.interval([d[k] for d in model_draws]) for k in M.METRICS}),
                operating_point=dict(point, per_finding={n: M.at_threshold(yb, s, point["thresholds"][n])
                                                         for (_, yb, s), n in findings}),
                calibration=dict(bins=15, test=M.calibration(y, prob, ml)),
                baseline=dict(what="logistic regression on the 32x32 grey image, trained on the run's training "
                                   "patients", auc=auc, auc_ci95=M.interval(base_auc),
                              model_minus_baseline_ci95=diff, verdict=f"the model {verdict} the baseline")), draws


def pct(v) -> str:
    return f"{100 * v:.1f}"


def report(out: dict, cfg: dict, what: str) -> str:
    m, ci = out["paper"]["metrics"], out["paper"]["ci95"]
    lines = [f"{what}: {out['images']} images of {out['patients']} patients; 95 % intervals resample patients",
             f"  the paper's figures (argmax; {positive_class(cfg['classes'], cfg['multi_label'])}): " + "  ".join(f"{k} {pct(m[k])} [{pct(ci[k][0])}, {pct(ci[k][1])}]"
                                                           for k in M.METRICS)]
    layout = "per finding [[tn, fp], [fn, tp]]" if cfg["multi_label"] else "rows true, cols predicted"
    lines.append(f"  confusion ({layout}, {cfg['classes']}): {m['confusion']}")
    op = out["operating_point"]
    for name, r in op["per_finding"].items():
        lines.append(f"  operating point for {name} ({op['rule']}: P >= {op['thresholds'][name]:.3f}): "
                     + "  ".join(f"{k} {pct(v)}" for k, v in r.items()))
    if not op["per_finding"]:
        lines.append(f"  operating point: {op['rule']}")
    cal = out["calibration"]
    test, after = cal["test"], ""
    if "temperature" in cal:
        after = (f"; with temperature {cal['temperature']:.2f} fitted on validation: Brier "
                 f"{cal['calibrated']['brier']:.3f}, ECE {cal['calibrated']['ece']:.3f}")
    lines.append(f"  calibration: Brier {test['brier']:.3f}, ECE {test['ece']:.3f} (15 bins)" + after)
    b = out["baseline"]
    (lo, hi), (dlo, dhi) = b["auc_ci95"], b["model_minus_baseline_ci95"]
    lines.append(f"  baseline ({b['what']}): AUC {pct(b['auc'])} [{pct(lo)}, {pct(hi)}]; model - baseline AUC "
                 f"[{pct(dlo)}, {pct(dhi)}]: {b['verdict']}")
    return "\n".join(lines)


def eval_fold(runs: Path, fold: int, opt) -> dict:
    run = runs / f"fold{fold}"
    out = evaluate(run, fold, opt)
    cfg, y, prob, draws, _ = out.pop("_curves")
    if note := Data(cfg["data"]).order_note():
        print(note)
    print(report(out, cfg, f"fold {fold}, test"))
    write_atomic(run / "eval.json", json.dumps(out, indent=1))
    draw_curves(run, out, cfg, y, prob, draws, f"fold {fold}")
    written = [n for n in ("eval.json", "operating_point.json") if (run / n).exists()] + sorted(
        p.name for p in run.glob("*.png") if p.name.startswith(("roc", "reliability")))
    print(f"wrote {', '.join(written)} in {run}")
    return out


def draw_curves(folder: Path, out: dict, cfg: dict, y, prob, draws, title: str):
    """roc.png (with the patients' 95 % band and the operating point) and reliability.png of the disease
    score (binary); of each finding (multi-label: roc-<finding>.png, reliability-<finding>.png, each
    with its own cut) or each class against the rest (multi-class, no cut: the argmax decides)."""
    cuts = out["operating_point"]["thresholds"]
    if cfg["multi_label"] or len(cfg["classes"]) > 2:
        hot = M.one_hot(y, prob.shape[1], cfg["multi_label"])
        curves = [(c, hot[:, i], prob[:, i], f"-{re.sub(r'[^A-Za-z0-9_.-]+', '_', c)}")
                  for i, c in enumerate(cfg["classes"])]
    else:
        curves = [(cfg["classes"][1], y, prob[:, 1], "")]
    for name, yb, score, tag in curves:
        cut = cuts.get(name)
        r = None if cut is None else M.at_threshold(yb, score, cut)
        fpr, tpr, _ = M.roc_curve(yb, score)
        rest = "" if len(curves) == 1 or cfg["multi_label"] else " against the rest"
        plots.draw_roc(folder / f"roc{tag}.png", [(f"AUC {M.roc_auc(yb, score):.3f}", fpr, tpr)],
                       f"{title}: ROC of P({name}){rest}, 95 % band over patients", M.roc_band(yb, score, draws),
                       None if r is None else (1 - r["specificity"], r["sensitivity"], f"operating point {cut:.2f}"))
        plots.draw_reliability(folder / f"reliability{tag}.png", score, yb, f"{title}: reliability of P({name})")


def table(runs: Path, opt) -> int:
    done = [f for f in range(1, opt.folds + 1) if C.finished(runs / f"fold{f}")]
    missing = [f for f in range(1, opt.folds + 1) if f not in done]
    if not done:
        raise UserError(f"{runs}: no finished fold among fold1..fold{opt.folds}; train them with "
                        f"python train.py --data DIR --fold N --out {runs}/foldN")
    C.check_same_runs({f: json.loads((runs / f"fold{f}/config.json").read_text()) for f in done})
    per = {f: evaluate(runs / f"fold{f}", f, opt) for f in done}
    vals = 100 * np.array([[o["paper"]["metrics"][k] for k in M.METRICS] + [o["baseline"]["auc"]]
                           for o in per.values()])
    sd = vals.std(0, ddof=1) if len(done) > 1 else np.full(vals.shape[1], np.nan)
    cfg = next(iter(per.values()))["_curves"][0]
    lines = [f"Sensitivity, specificity and AUC {positive_class(cfg['classes'], cfg['multi_label'])}.\n",
             "| fold | Sens. | Spec. | Acc. | AUC | AVG | baseline AUC |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {f} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for f, row in zip(per, vals)]
    lines.append("| mean ± sd | " + " | ".join(f"{mu:.2f} ± {s:.2f}" if len(done) > 1 else f"{mu:.2f}"
                                           for mu, s in zip(vals.mean(0), sd)) + " |")
    pooled = pool(runs, per)
    lines.append(f"\npooled over {len(done)} fold(s): AUC {pct(pooled['auc'])} (model), "
                 f"{pct(pooled['baseline_auc'])} (baseline: logistic regression on 32x32 pixels, same patients)")
    lines += [f"fold {f}: {o['baseline']['verdict']}" for f, o in per.items()]
    if missing:
        lines.append(f"not finished, left out: fold {', '.join(map(str, missing))}")
    text = "\n".join(lines)
    print(text)
    write_atomic(runs / "table.md", text + "\n")
    folds = {f: {k: v for k, v in o.items() if k != "_curves"} for f, o in per.items()}
    summary = dict(folds=folds, missing=missing, mean=dict(zip([*M.METRICS, "baseline_auc"], vals.mean(0))),
                   pooled=pooled)
    write_atomic(runs / "table.json", json.dumps(summary, indent=1))
    print(f"wrote table.md, table.json, roc.png in {runs}")
    return 0


def pool(runs: Path, per: dict) -> dict:
    """Every fold's test predictions together (the model's and the baseline's): pooled AUCs, and roc.png
    with each fold's curve (binary: disease; multi-label: the first finding)."""
    curves, ys, scores, base = [], [], [], []
    for f, o in per.items():
        cfg, y, prob, _, pb = o["_curves"]
        model_and_baseline = zip(M.as_binary(y, prob, cfg["multi_label"])[:1], M.as_binary(y, pb, cfg["multi_label"]))
        for (_, yb, s), (_, _, b) in model_and_baseline:
            curves.append((f"fold {f}", *M.roc_curve(yb, s)[:2]))
            ys, scores, base = ys + [yb], scores + [s], base + [b]
    if not ys:
        return dict(auc=float("nan"), baseline_auc=float("nan"))
    y, s = np.concatenate(ys), np.concatenate(scores)
    auc = M.roc_auc(y, s)
    pooled = (f"pooled: AUC {auc:.3f}", *M.roc_curve(y, s)[:2])
    plots.draw_roc(runs / "roc.png", curves + [pooled], "every fold's ROC, and pooled")
    return dict(auc=auc, baseline_auc=M.roc_auc(y, np.concatenate(base)))


def score_images(runs: Path, opt) -> int:
    run = runs / f"fold{opt.fold}"
    C.check_finished(run, opt.fold)
    cfg = json.loads((run / "config.json").read_text())
    point = operating_point(run, cfg, opt.sensitivity)
    writable(run if not (opt.csv and (opt.explain is None or opt.explain_dir)) else None)
    if cfg["crop"] not in ("thorax", "none"):
        raise UserError(f"{run}: trained on a data folder cropped by the density lung search ({cfg['crop']!r}), "
                        "which depended on the diagnosis and is gone; prepare the data and train again")
    if cfg.get("synthetic"):
        print("NOTE: this model was trained on the synthetic demo set: it is a demo, not for diagnosis")
    if cfg.get("masks"):
        print("NOTE: the run's images were cropped to lung masks; new images are framed by the thorax box")
    if (Path(cfg["data"]) / "meta.json").exists():  # the data may have moved away; if it is there, it must match
        run_data(cfg)
    model, cfg = C.load_run(run, opt.device, True, opt.cpu_dtype)
    files = [f for p in opt.image for f in (sorted(x for x in Path(p).rglob("*") if x.is_file() and
                                                    x.suffix.lower() in prepare.IMAGE_SUFFIXES)
                                             if Path(p).is_dir() else [Path(p)])]
    failed, scored = [], []  # scored: (place in the listing, file, crop, how it was cropped)
    for n, p in enumerate(files, 1):
        if not p.is_file():
            failed.append(f"{p}: no such file")
            continue
        try:  # exactly prepare.py's pipeline: read, window, 8 bits, crop, resize
            img, _, how, _ = prepare.preprocess(p, cfg["crop"], cfg["size"])
        except prepare.Skip as e:
            failed.append(f"{p}: {e}")
            continue
        scored.append((n, p, img, how))
    if scored:
        images = np.stack([s[2] for s in scored])[:, None]
        if (Path(cfg["data"]) / "meta.json").exists():  # a film of the run's own data is not a new film
            own_films(cfg, Path("--image"), images)
        probs = C.predict(model, images, cfg, batch=16, progress=True)
        table = Path(opt.csv) if opt.csv else fresh(run / "image_scores.csv")
        maps = Path(opt.explain_dir) if opt.explain_dir else fresh(run / "explain")
        report_images(model, scored, probs, cfg, point, opt, table, maps)
    for line in failed:
        print(f"skipped {line}", file=sys.stderr)
    return 2 if not scored else 0  # nothing scored: a mistake in the input


def writable(folder):
    """A folder that results will be written into, checked before the work that makes them."""
    if folder is not None and not os.access(folder, os.W_OK):
        raise UserError(f"{folder}: not writable, and the results go there; make it writable, or copy the run "
                        "folder somewhere writable")


def fresh(path: Path) -> Path:  # path, else path-2, path-3, ..: each command's results beside the earlier ones
    k = 1
    while (p := path if k == 1 else path.with_name(f"{path.stem}-{k}{path.suffix}")).exists():
        k += 1
    return p


def report_images(model, scored: list, probs: np.ndarray, cfg: dict, point: dict, opt, table: Path, maps: Path):
    """A line per image for a handful (and their crops and maps when asked), a count for more; the CSV
    names images by their place in the listing (image<N>), never by file name: it can name a patient."""
    weights = []
    for (n, p, img, how), prob in zip(scored, probs) if len(scored) <= 10 else ():
        if opt.save_crops:
            Path(opt.save_crops).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(Path(opt.save_crops) / f"crop{n}.png")
        print(f"{p}: " + describe(prob, cfg, point) + f"; crop: {how}"
              + (f"; crop saved as crop{n}.png" if opt.save_crops else ""))
        if opt.explain is not None:
            weights.append(explain_image(model, img, cfg, maps / f"image{n}.explain.png",
                                         called(prob, cfg, point)))
    if len(scored) > 10:
        calls = [decision(prob, cfg, point) for prob in probs]
        print(f"{len(scored)} images scored: " + ", ".join(f"{c} {calls.count(c)}" for c in sorted(set(calls)))
              + " at the run's operating point")
    write_csv(table, ["image", *(f"p_{c}" for c in cfg["classes"]), "decision"],
              [[f"image{n}", *(f"{q:.6f}" for q in prob), decision(prob, cfg, point)]
               for (n, *_), prob in zip(scored, probs)])
    print(f"wrote {table} (image<N>: the N-th file given, folders listed in sorted order)")
    if weights and weights[0] is not None:
        print(explain.describe_weights(torch.cat(weights), model.visual.cls_blocks))


def calls(prob, cfg: dict, point: dict) -> np.ndarray:  # (..., C) probabilities -> (..., C) bool
    """The one rule of a call at the run's operating point: a class with a threshold is called where its
    probability is >= the threshold; a class without one (multi-class runs: every class) never is."""
    return np.asarray(prob) >= np.array([point["thresholds"].get(c, np.inf) for c in cfg["classes"]])


def decision(prob, cfg: dict, point: dict) -> str:  # at the run's thresholds; multi-class: the argmax
    if not point["thresholds"]:
        return cfg["classes"][int(np.argmax(prob))]
    found = [c for c, on in zip(cfg["classes"], calls(prob, cfg, point)) if on]
    return "|".join(found) if cfg["multi_label"] else (found[0] if found else cfg["classes"][0])


def explain_image(model, img: np.ndarray, cfg: dict, path: Path, target=None):
    """<name>.explain.png: the crop the model saw under the Grad-CAM map of class `target` (default:
    the argmax); returns the engine's weights."""
    target = None if target is None else [target]
    heats, explained, weights = explain.explain_images(model, torch.tensor(img)[None, None], cfg, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    plots.overlay(img, heats[0], f"map of {cfg['classes'][int(explained[0])]}").save(path)
    print(f"  explanation: {path}")
    return weights


def explain_fold(runs: Path, opt) -> int:
    """explain.png in the run folder: K test images (true and false positives and negatives, taken in
    turn), each under the map of the class called at the run's threshold, captioned with its outcome,
    probability and pseudonym."""
    run = runs / f"fold{opt.fold}"
    cfg, rows, y, prob = read_run(run, opt.fold)
    writable(run)
    point = operating_point(run, cfg, opt.sensitivity)
    if cfg["multi_label"] or len(cfg["classes"]) != 2:
        raise UserError("--explain with --fold shows true/false positives/negatives: binary runs only; "
                        "use --image")
    positive = calls(prob, cfg, point)[:, 1]
    kinds = {"TP": (y == 1) & positive, "FP": (y == 0) & positive, "FN": (y == 1) & ~positive,
             "TN": (y == 0) & ~positive}
    queues = {k: list(np.flatnonzero(m)) for k, m in kinds.items()}
    chosen = []
    while len(chosen) < opt.explain and any(queues.values()):
        chosen += [(k, q.pop(0)) for k, q in queues.items() if q][:opt.explain - len(chosen)]
    model, cfg = C.load_run(run, opt.device, True, opt.cpu_dtype)
    data = run_data(cfg)
    images = torch.from_numpy(data.images(data.rows_of([rows[i] for _, i in chosen])))
    heats, _, weights = explain.explain_images(model, images, cfg, [int(positive[i]) for _, i in chosen])
    tiles = [plots.overlay(img, heat, f"{kind} P={prob[i, 1]:.2f} {rows[i]['image'][:10]}\n"
                                      f"map of {cfg['classes'][int(positive[i])]}")
             for (kind, i), img, heat in zip(chosen, images[:, 0].numpy(), heats)]
    plots.sheet(tiles).save(run / "explain.png")
    kinds_shown = ", ".join(k for k, _ in chosen)
    print(f"{run / 'explain.png'}: {len(tiles)} test images ({kinds_shown}) under their Grad-CAM maps")
    if weights is not None:
        print(explain.describe_weights(weights, model.visual.cls_blocks))
    return 0


def probe(runs: Path, opt) -> int:
    """--probe: where the model reads. The test fold (or with --data DIR every image of that folder) is
    scored again (a) with each cell of an 8 x 8 grid over the crop in turn replaced by the mean of the
    probed films there (the same pixels for every film: it hides what differs between films, and leaves
    no grey patch for the model to react to): the AUC drop per cell with its patient interval, and how
    much of each cell lies outside the lung fields
    (lungcrop.lung_fields: the lung masks, or approximate ellipses); (b) with the lung fields hidden;
    (c) with the reference framing where the run was cropped otherwise. A verdict that must hold with
    the lung fields grown and shrunk by 3 % of the crop, else "inconclusive". Writes probe.json (or
    probe-<name>-<tag>.json) and probe.png (the drops over the mean crop, the lung fields outlined)."""
    run = runs / f"fold{opt.fold}"
    cfg, rows, y, prob = read_run(run, opt.fold)
    writable(run)
    if cfg["multi_label"] or len(cfg["classes"]) != 2:
        raise UserError("--probe compares the disease score of binary runs; this run has classes "
                        f"{cfg['classes']}{' (multi-label)' if cfg['multi_label'] else ''}")
    point = operating_point(run, cfg, opt.sensitivity)
    cut = point["thresholds"][cfg["classes"][1]]
    model, cfg = C.load_run(run, opt.device, True, opt.cpu_dtype)
    if opt.data:  # another site's folder: all of it but the run's own films, labels in the run's names
        data, test, labels, images = external_films(cfg, opt.data, opt.classes)
        y = encode_labels(labels, cfg["classes"], False)
        rows, prob = test, C.predict(model, images, cfg, batch=16, progress=True)
        written = f"probe-{data.folder.name}-{folder_tag(data.folder)}"
    else:
        data, written = run_data(cfg), "probe"
        test = data.rows_of(rows)
        images = data.images(test)
    draws = M.resamples([r["patient"] for r in rows], y, 2)  # as eval's: one interval for one AUC
    size = images.shape[-1]
    masks = [data.folder / "masks" / Path(r["image"]).name for r in test]
    masks = [np.asarray(Image.open(m)) > 127 if m.exists() else None for m in masks]
    regions = [[float(v) for v in r["lungs"].split()] for r in test]
    fields = {g: np.stack([lung_fields(x, size, g, m) for x, m in zip(regions, masks)]) for g in (-0.03, 0.0, 0.03)}
    scores = {"as trained": prob[:, 1]}
    if any(r["reference"] != r["image"] for r in test):
        scores["reference framing"] = C.predict(model, data.images(test, "reference"), cfg)[:, 1]
    mean = images.mean(0).round().astype(np.uint8)  # (1, H, W): what hides a place, the same for every film
    scores["lung fields hidden"] = C.predict(model, np.where(fields[0.0][:, None], mean, images), cfg)[:, 1]
    out = dict(fold=opt.fold, images=len(y), threshold=cut, intervals=f"95 %, {len(draws)} resamples of patients",
               lung_fields=dict(what="the lung masks" if all(m is not None for m in masks) else
                                "approximate: two ellipses where the lungs lie on average (lungcrop.LUNG_FIELDS)",
                                share_of_crop=float(fields[0.0].mean())))
    for name, s in scores.items():
        out[name] = dict(auc=M.roc_auc(y, s), auc_ci95=M.interval([M.roc_auc(y[i], s[i]) for i in draws]),
                         mean_p={c: float(s[y == k].mean()) for k, c in enumerate(cfg["classes"])},
                         positive={c: float(calls(np.stack([1 - s, s], 1), cfg, point)[y == k, 1].mean())
                                   for k, c in enumerate(cfg["classes"])})
        print(f"{name}: AUC {pct(out[name]['auc'])} [{pct(out[name]['auc_ci95'][0])}, "
              f"{pct(out[name]['auc_ci95'][1])}]; mean P({cfg['classes'][1]}) " + ", ".join(
                  f"{c} {v:.3f}" for c, v in out[name]["mean_p"].items()) + f"; called positive at {cut:.3f}: "
              + ", ".join(f"{c} {pct(v)} %" for c, v in out[name]["positive"].items()))
    out["occlusion"] = occlusion(model, images, mean, scores["as trained"], cfg, y, draws, fields)
    out["verdict"] = probe_verdict(out, y, scores, draws)
    print("\n".join(out["verdict"]))
    write_atomic(run / f"{written}.json", json.dumps(out, indent=1))
    grid = out["occlusion"]
    plots.draw_probe(run / f"{written}.png", images.mean(0)[0], np.array(grid["drop"]), np.array(grid["significant"]),
                     fields[0.0].mean(0) >= 0.5, f"P({cfg['classes'][1]}): AUC drop when each cell is hidden (red; "
                     f"darkest {pct(max(0, np.max(grid['drop'])))} points), lung fields "
                     f"({out['lung_fields']['what'].split(':')[0]}) in green")
    print(f"wrote {run / written}.json, {run / written}.png")
    return 0


def occlusion(model, images: np.ndarray, mean, s0, cfg: dict, y, draws: list, fields: dict, grid=8) -> dict:
    """Each of grid x grid cells of the crop in turn replaced by `mean` (the films' mean) on every image: the
    AUC drop (as trained, `s0`, minus with the cell hidden) with its paired patient interval; which cells
    lower it beyond chance, tested together (each cell's p-value: the share of patient resamples where its
    drop is not above 0; Holm's test at 5 % family-wise, so that 64 cells do not bring 64 chances of a
    false alarm); each cell's share outside the lung fields for each growth of `fields` ({grow: (N, H, W)
    bool}); the share of the total positive drop that comes from outside them."""
    size = images.shape[-1]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    weights = np.stack([np.bincount(i, minlength=len(y)) for i in draws])  # (B, N): each resample's draws
    auc0, base = M.roc_auc(y, s0), M.roc_auc_weighted(y, s0, weights)
    drop, boot = np.zeros((grid, grid)), np.zeros((len(draws), grid, grid))
    outside = {g: np.zeros((grid, grid)) for g in fields}
    for r in range(grid):
        for c in range(grid):
            rs, cs = slice(edges[r], edges[r + 1]), slice(edges[c], edges[c + 1])
            hidden = images.copy()
            hidden[..., rs, cs] = mean[..., rs, cs]
            s = C.predict(model, hidden, cfg)[:, 1]
            drop[r, c] = auc0 - M.roc_auc(y, s)
            boot[:, r, c] = base - M.roc_auc_weighted(y, s, weights)
            for g, f in fields.items():
                outside[g][r, c] = 1 - f[:, rs, cs].mean()
    ci = np.percentile(boot, [2.5, 97.5], axis=0).transpose(1, 2, 0)
    p = ((boot <= 0).sum(0) + 1) / (len(draws) + 1)  # (grid, grid): one-sided bootstrap p-values
    positive = np.clip(drop, 0, None)
    share = {g: float((positive * o).sum() / positive.sum()) if positive.sum() else None for g, o in outside.items()}
    return dict(grid=grid, cell_px=int(edges[1]), auc=auc0, drop=drop.tolist(), drop_ci95=ci.tolist(),
                p=p.tolist(), significant=M.holm(p.ravel()).reshape(grid, grid).tolist(),
                outside={str(g): o.tolist() for g, o in outside.items()},
                outside_share_of_drop={str(g): v for g, v in share.items()})


def probe_verdict(out: dict, y, scores: dict, draws: list) -> list:
    """The alarm: a cell whose hiding lowers the AUC beyond chance (its interval above 0) and lies mostly
    outside the lung fields; it must hold with the fields grown and shrunk by 3 % of the crop, else the
    verdict is "inconclusive". Where no single cell matters, the lung fields hidden whole must leave
    chance (an interval holding 0.5), else the signal outside them is spread over many cells. Then the
    framing (the paired interval of as trained minus the reference framing)."""
    occ, lf = out["occlusion"], out["lung_fields"]
    significant = np.array(occ["significant"])
    culprits = {g: [(r, c) for r, c in zip(*np.nonzero(significant)) if o[r][c] >= 0.5]
                for g, o in occ["outside"].items()}
    alarms = {g: bool(v) for g, v in culprits.items()}
    share = occ["outside_share_of_drop"]["0.0"]
    fields = f"lung fields ({lf['what']}; {pct(lf['share_of_crop'])} % of the crop)"
    said = (f"hiding each of {occ['grid']}x{occ['grid']} cells of {occ['cell_px']} px in turn: "
            f"{int(significant.sum())} lower the AUC ({pct(occ['auc'])}) beyond chance" + ("" if share is None else
            f"; {pct(share)} % of the total drop comes from outside the {fields}"))
    hidden = out["lung fields hidden"]
    lo, hi = hidden["auc_ci95"]
    whole = f"with the lung fields hidden whole the AUC is {pct(hidden['auc'])} [{pct(lo)}, {pct(hi)}]"
    if all(alarms.values()):
        where = ", ".join(f"row {r + 1} col {c + 1}" for r, c in culprits["0.0"])
        lines = [f"{said}: the model reads something outside the lungs (markers, text, devices, the body's edge): "
                 f"cells {where} (probe.png)"]
    elif any(alarms.values()):
        lines = [f"{said}: inconclusive: whether a cell that matters lies outside the lungs depends on how "
                 "large the lung fields are drawn (grown or shrunk by 3 % of the crop); see probe.png"]
    elif lo > 0.5 or hi < 0.5:  # no single cell, yet the fields hidden whole leave the classes apart
        lines = [f"{said}; but {whole}: the model reads something outside the lung fields spread over many cells "
                 "(the body's outline, the view, the exposure, or lung near the fields' edges: they are drawn "
                 "smaller than the lungs)"]
    else:
        lines = [f"{said}: no cell outside the lung fields lowers it beyond chance: no sign that the model reads "
                 "anything outside the lungs"]
    lines.append(whole + (": the model still separates the classes without them" if lo > 0.5 or hi < 0.5 else
                          ", which holds chance"))
    if "reference framing" in scores:
        diff = M.interval([M.roc_auc(y[i], scores["as trained"][i]) - M.roc_auc(y[i], scores["reference framing"][i])
                         for i in draws])
        moved = diff[0] > 0 or diff[1] < 0
        lines.append(f"as trained minus reference framing, AUC: [{pct(diff[0])}, {pct(diff[1])}]: "
                     + ("the framing changes what the model says" if moved else "no sign that the framing matters"))
    else:
        lines.append("the run's framing is the reference framing (the thorax box, the same for every film)")
    return lines


def external(runs: Path, opt) -> int:
    """--data DIR: every image of another prepared folder, scored by fold --fold's model, or with
    --ensemble by the mean probability of the finished folds' models; the operating point carried over
    from the run's validation split (the folds' pooled, for the ensemble), never chosen on DIR."""
    folds = [f for f in range(1, opt.folds + 1) if C.finished(runs / f"fold{f}")] if opt.ensemble else [opt.fold]
    if not folds:
        raise UserError(f"{runs}: no finished fold to score {opt.data} with; train one first")
    for f in folds:
        C.check_finished(runs / f"fold{f}", f)
    C.check_same_runs({f: json.loads((runs / f"fold{f}/config.json").read_text()) for f in folds})
    cfg = json.loads((runs / f"fold{folds[0]}/config.json").read_text())
    other, rows, labels, images = external_films(cfg, opt.data, opt.classes)
    y = encode_labels(labels, cfg["classes"], cfg["multi_label"])
    what = f"{other.folder}, scored by " + (f"the mean of folds {folds}" if opt.ensemble else f"fold {folds[0]}")
    scores = []
    for f in folds:
        model, run_cfg = C.load_run(runs / f"fold{f}", opt.device, True, opt.cpu_dtype)
        scores.append(C.predict(model, images, run_cfg, batch=16, progress=True))
    prob = np.mean(scores, 0)
    point = operating_point(runs / f"fold{folds[0]}", cfg, opt.sensitivity, [runs / f"fold{f}" for f in folds[1:]])
    if point["thresholds"]:
        point["rule"] = "carried over: " + point["rule"]
    x = small(images)  # the baseline's pixels, from the images already read
    base = np.mean([baseline_model(json.loads((runs / f"fold{f}/config.json").read_text()))[2](x) for f in folds], 0)
    out, draws = figures(y, prob, [r["patient"] for r in rows], cfg, point, base)
    out = dict(data=str(other.folder), folds=folds, classes_mapping=opt.classes, left_out_as_own=len(other.rows) - len(rows),
               **out, shift=shift(Data(cfg["data"]).meta, other.meta))
    mapping = f"-classes-{hashlib.sha256(opt.classes.encode()).hexdigest()[:6]}" if opt.classes else ""
    folder = runs / f"external-{other.folder.name}-{folder_tag(other.folder)}{mapping}" / (
        "ensemble" if opt.ensemble else f"fold{folds[0]}")
    folder.mkdir(parents=True, exist_ok=True)
    write_external(folder, rows, labels, prob, cfg, point)
    write_atomic(folder / "eval.json", json.dumps(out, indent=1))
    draw_curves(folder, out, cfg, y, prob, draws, other.folder.name)
    print(report(out, cfg, what))
    print("\n".join(beside_the_run(out, runs / f"fold{folds[0]}", cfg, y, prob, point)))
    print("\n".join(f"  shift in {k}: run {v['run']}, this data {v['data']}" for k, v in out["shift"].items()))
    if not cfg["multi_label"] and len(cfg["classes"]) == 2:
        probe_command = shlex.join(["python", "eval.py", "--runs", str(runs), "--fold", str(folds[0]), "--probe",
                                    "--data", str(other.folder), *(["--classes", opt.classes] if opt.classes else [])])
        print(f"  where the model reads on these films (the probe's occlusion grid): {probe_command}")
    written = ["predictions.csv", "eval.json"] + sorted(p.name for p in folder.glob("*.png"))
    print(f"wrote {', '.join(written)} in {folder}")
    return 0


def external_films(cfg: dict, folder, classes) -> tuple:
    """(the folder, its rows, labels in the run's names, images) of another site, less the run's own films
    and patients; every reason not to score it found before any model runs: labels that do not map,
    another --size, the run's data folder missing (the baseline and the shift report need it), a class
    with no film left."""
    other = Data(folder)
    labels = mapped_labels(other, cfg, classes)
    if int(other.meta["settings"]["size"]) != int(cfg["size"]):
        raise UserError(f"{other.folder} was prepared at --size {other.meta['settings']['size']}, the run's data at "
                        f"{cfg['size']}: prepare it again with --size {cfg['size']} (into another --out)")
    if not (Path(cfg["data"]) / "meta.json").exists():
        raise UserError(f"the run's data folder {cfg['data']} is not here; external validation needs it (its own "
                        "films are left out, the pixel baseline trains on it, the shift report reads it): restore it")
    ours, images = run_data(cfg), other.images(other.rows)
    shared = {r["patient"] for r in other.rows} & {r["patient"] for r in ours.rows}
    own = own_films(cfg, other.folder, images) | np.array([r["patient"] in shared for r in other.rows])
    if shared:
        print(f"WARNING: {len(shared)} patients of {other.folder} are patients of the run's data (the same "
              "pseudonyms): their films are left out, as the run may have trained on them")
    if own.all():
        raise UserError(f"{other.folder}: all {len(own)} films are the run's own (the same pixels as in {cfg['data']}, "
                        "or its patients'); external validation needs films the run never saw: eval.py --fold (and "
                        "--probe) score its test fold")
    keep = [i for i, o in enumerate(own) if not o]
    y = encode_labels([labels[i] for i in keep], cfg["classes"], cfg["multi_label"])
    missed = [c for c, m in zip(cfg["classes"], lacking(y, len(cfg["classes"]), cfg["multi_label"])) if m]
    if missed:
        raise UserError(f"{other.folder}: after leaving out the run's own films, {len(keep)} remain with no images "
                        f"{'with and without ' if cfg['multi_label'] else 'of '}{', '.join(missed)}: nothing to "
                        "compare; add films of that class")
    return other, [other.rows[i] for i in keep], [labels[i] for i in keep], images[keep]


def own_films(cfg: dict, folder: Path, images: np.ndarray) -> np.ndarray:
    """(N,) bool: which of `folder`'s `images` are films of the run's own data folder, by pixel content
    (names can differ, or mean other films): their 16 x 16 thumbnails within 2 grey levels (RMS) of one
    there. All of them: refused; some: a warning (the callers leave them out)."""
    ours = run_data(cfg)

    def thumbs(x):  # (N, 1, H, W) uint8 -> (N, 256) float
        t = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(x, dtype=torch.float32), 16)
        return t.flatten(1).numpy()
    a, b = thumbs(images), thumbs(ours.images(ours.rows))
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T  # squared distances, (N, M)
    own = d2.min(1) < 256 * 2.0**2
    same = f"the run's own (the same pixels as in {cfg['data']})"
    if own.any():
        print(f"WARNING: {own.sum()} of {len(own)} films of {folder} are {same}: left out; the other "
              f"{(~own).sum()} are scored")
    return own


def beside_the_run(out: dict, run: Path, cfg: dict, y, prob, point: dict) -> list:
    """The external figures next to the run's own test fold (calibration, the share called positive),
    and warnings: an AUC interval below chance, a cut-off that calls nearly every film one way."""
    _, _, yt, pt = read_run(run, cfg["fold"])
    ml = cfg["multi_label"]
    here, there = M.calibration(y, prob, ml), M.calibration(yt, pt, ml)
    lines = [f"  beside the run's own test fold: Brier {here['brier']:.3f} (test fold {there['brier']:.3f}), "
             f"ECE {here['ece']:.3f} ({there['ece']:.3f})"]
    shares, tests = calls(prob, cfg, point).mean(0), calls(pt, cfg, point).mean(0)  # (C,) called positive
    for name, cut in point["thresholds"].items():
        share, test = shares[cfg["classes"].index(name)], tests[cfg["classes"].index(name)]
        lines.append(f"  {name}: called positive at P >= {cut:.3f}: {pct(share)} % of these films (test fold "
                     f"{pct(test)} %)")
        if max(share, 1 - share) >= 0.95:
            lines.append(f"WARNING: the carried-over cut-off calls {pct(max(share, 1 - share))} % of these films "
                         f"{'positive' if share >= 0.5 else 'negative'} for {name}: it does not carry over to this "
                         "site; choose one on labelled films from it")
    lo, hi = out["paper"]["ci95"]["auc"]
    if hi < 0.5:
        lines.append(f"WARNING: the AUC's interval [{pct(lo)}, {pct(hi)}] lies below 0.5: the model ranks these "
                     "films backwards. Are the labels or --classes reversed? If not, it reads something that "
                     "flips between the sites")
    elif out["paper"]["metrics"]["auc"] < 0.5:
        lines.append(f"NOTE: the AUC {pct(out['paper']['metrics']['auc'])} is below 0.5 (its interval holds chance): "
                     "if the labels or a --classes mapping are reversed, every figure here is of the other class")
    base = out["baseline"]
    if base["auc_ci95"][1] < 0.5:
        lines.append(f"WARNING: the pixel baseline's AUC interval [{pct(base['auc_ci95'][0])}, "
                     f"{pct(base['auc_ci95'][1])}] lies below 0.5 too: what tells the classes apart in the run's "
                     "pixels is reversed here (another scanner, exposure or framing)")
    elif base["auc"] < 0.5:
        lines.append(f"NOTE: the pixel baseline's AUC {pct(base['auc'])} is below 0.5 here: the run's pixel "
                     "cues do not carry over to this site")
    return lines


def mapped_labels(other: Data, cfg: dict, classes) -> list:
    """DIR's labels in the run's names (each finding of a multi-label set): equal class sets, or --classes
    'theirs=ours,...'; else one line naming both."""
    pairs = [p.split("=") for p in classes.split(",")] if classes else []
    if any(len(p) != 2 or not all(x.strip() for x in p) for p in pairs):
        raise UserError(f"--classes {classes!r}: give pairs theirs=ours separated by commas, e.g. "
                        f"'healthy={cfg['classes'][0]}', with DIR's label names ({', '.join(other.classes)}) on the "
                        "left")
    names = {a.strip(): b.strip() for a, b in pairs}
    unknown = sorted(set(names) - set(other.classes)) + sorted(set(names.values()) - set(cfg["classes"]))
    if unknown:
        raise UserError(f"--classes {classes!r}: {unknown} are not labels of {other.folder} ({other.classes}) "
                        f"on the left, or of the run ({cfg['classes']}) on the right")
    theirs = sorted(names.get(c, c) for c in other.classes)
    if theirs != sorted(cfg["classes"]) or other.multi_label != cfg["multi_label"]:
        kind = lambda ml: " (multi-label)" if ml else ""  # noqa: E731
        raise UserError(f"{other.folder} has labels {theirs}{kind(other.multi_label)}, the run {cfg['classes']}"
                        f"{kind(cfg['multi_label'])}: map names that mean the same with --classes 'theirs=ours,...'")
    if other.multi_label:
        return ["|".join(names.get(f, f) for f in r["label"].split("|")) for r in other.rows]
    return [names.get(r["label"], r["label"]) for r in other.rows]


def shift(ours: dict, theirs: dict) -> dict:
    """The acquisition attributes (the audit's) pooled over classes: shares of each value in the run's
    data and in DIR, for view, bit depth and photometric interpretation; mean width and height; "unknown"
    where no image says."""
    out = {}
    for attr in ("view", "bits", "photometric"):
        shares = []
        for meta in (ours, theirs):
            counts = {}
            for per in meta["audit"]["per_class"].get(attr, {}).values():
                for v, n in per.items():
                    counts[v] = counts.get(v, 0) + n
            total = max(sum(counts.values()), 1)
            known = set(counts) - {"", "None"}
            shares.append({v: round(n / total, 3) for v, n in counts.items()} if known else "unknown")
        out[attr] = dict(run=shares[0], data=shares[1])
    for attr in ("width", "height"):
        means = {who: [v for v in m["audit"]["per_class"].get(attr, {}).values() if v is not None]
                 for who, m in (("run", ours), ("data", theirs))}
        out[attr] = {who: float(np.mean(v)) if v else "unknown" for who, v in means.items()}
    return out


def folder_tag(folder: Path) -> str:  # a short tag of a folder's full path, to name the output folder
    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]


def write_external(folder: Path, rows: list, labels: list, prob, cfg: dict, point: dict):
    header = ["image", "patient", "label", *(f"p_{c}" for c in cfg["classes"]), "decision"]
    write_csv(folder / "predictions.csv", header,
              [[Path(r["image"]).stem, r["patient"], label, *(f"{q:.6f}" for q in p), decision(p, cfg, point)]
               for r, label, p in zip(rows, labels, prob)])


def called(prob, cfg: dict, point: dict):  # binary: the class called at the run's threshold; else None (argmax)
    if cfg["multi_label"] or len(cfg["classes"]) != 2:
        return None
    return int(calls(prob, cfg, point)[1])


def describe(prob, cfg: dict, point: dict) -> str:
    if not point["thresholds"]:  # multi-class: the argmax
        each = ", ".join(f"P({c}) = {q:.3f}" for c, q in zip(cfg["classes"], prob))
        return f"{each}: {cfg['classes'][prob.argmax()]}"
    words, on = [], calls(prob, cfg, point)
    for name, cut in point["thresholds"].items():
        k = cfg["classes"].index(name)
        words.append(f"P({name}) = {prob[k]:.3f}, {'positive' if on[k] else 'negative'} at the run's threshold "
                     f"{cut:.3f} ({point['rule'].split(' on the ')[0]})")
    return "; ".join(words)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=Help)
    ap.add_argument("--runs", default="out/demo", help="folder holding fold1/, fold2/, ... from train.py")
    ap.add_argument("--fold", type=int, default=1, help="the fold to score (or whose model scores --image)")
    ap.add_argument("--all", action="store_true", help="every finished fold of 1..--folds, as the paper's Table 2")
    ap.add_argument("--folds", type=int, default=5, help="how many folds --all expects")
    ap.add_argument("--sensitivity", type=float, help="choose the threshold reaching this sensitivity on "
                    "validation (default: Youden's J)")
    ap.add_argument("--calibrate", action="store_true", help="also fit a temperature on validation; report both")
    ap.add_argument("--image", nargs="+", help="DICOM/PNG/JPEG files or folders to score with fold --fold's model")
    ap.add_argument("--csv", help="with --image: where to write one row per image (default: the run folder's "
                    "image_scores.csv, or image_scores-2.csv, .. where earlier results are)")
    ap.add_argument("--save-crops", metavar="DIR", help="with --image: write the crop the model saw")
    ap.add_argument("--explain", nargs="?", type=int, const=8, metavar="K", help="Grad-CAM maps (explain.py): "
                    "with --image, one <name>.explain.png each; with --fold, a sheet of K test images")
    ap.add_argument("--probe", action="store_true", help="with --fold: re-score the test fold with the reference "
                    "framing and with the lung fields hidden; says whether the model reads outside the lungs")
    ap.add_argument("--data", help="another prepared folder to score (external validation), with fold --fold's "
                    "model or --ensemble; the run's operating point carried over")
    ap.add_argument("--ensemble", action="store_true", help="with --data: the mean probability of the finished folds")
    ap.add_argument("--classes", help="with --data: map its label names to the run's, e.g. 'healthy=normal,silicosis="
                    "pneumoconiosis'")
    ap.add_argument("--explain-dir", help="where --image --explain writes (default: the run folder's explain/, or "
                    "explain-2/, .. where earlier maps are)")
    ap.add_argument("--device", help="where --image, --explain, --probe and --data run the model (default: the run's)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: the cores idle now)")
    ap.add_argument("--cpu-dtype", choices=["auto", "stored", *C.DTYPES], default="auto",
                    help="on a CPU, the dtype the frozen ViT and LLaMA compute in: auto measures which this CPU "
                    "multiplies fastest (docs/performance.md); stored keeps the checkpoints'")
    return ap


WITH = {  # a flag that only one kind of command uses -> the commands that use it
    "--ensemble": ("--data",), "--classes": ("--data", "--probe --data"), "--calibrate": ("--fold", "--all"),
    "--csv": ("--image",), "--save-crops": ("--image",), "--explain-dir": ("--image",)}


def check_combination(opt):
    """What the command is (--image [--explain], --all, --explain, --probe [--data], --data, or --fold alone),
    and every flag that would be ignored by it refused in one line."""
    modes = [m for m, on in (("--image", opt.image), ("--all", opt.all), ("--explain", opt.explain is not None),
                             ("--probe", opt.probe)) if on]
    if len(modes) > 1 and modes != ["--image", "--explain"]:
        raise UserError(f"{' and '.join(modes)}: one at a time (--explain goes with --image, or alone with --fold)")
    if opt.data and modes not in ([], ["--probe"]):
        raise UserError(f"--data scores another folder (or --probe --data probes it); it cannot go with {modes[0]}")
    command = " ".join(modes[:1] + ["--data"] * bool(opt.data)) or "--fold"
    for flag, commands in WITH.items():
        if getattr(opt, flag[2:].replace("-", "_")) and command not in commands:
            raise UserError(f"{flag} goes with {' or '.join(commands)}, not with {command}")


def main(argv=None):
    opt = parser().parse_args(argv)
    if opt.sensitivity is not None and not 0 < opt.sensitivity <= 1:
        raise UserError(f"--sensitivity {opt.sensitivity}: give a fraction in (0, 1], e.g. 0.9")
    check_combination(opt)
    if opt.explain is not None and opt.explain < 1:
        raise UserError(f"--explain {opt.explain}: give how many test images to explain, 1 or more")
    runs = Path(opt.runs)
    if opt.image:
        C.apply_threads(opt.threads)
        return score_images(runs, opt)
    if opt.all:
        return table(runs, opt)
    if opt.explain is not None:
        C.apply_threads(opt.threads)
        return explain_fold(runs, opt)
    if opt.probe:
        C.apply_threads(opt.threads)
        return probe(runs, opt)
    if opt.data:
        C.apply_threads(opt.threads)
        return external(runs, opt)
    eval_fold(runs, opt.fold, opt)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main, (P.CheckpointError,)))
