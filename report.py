"""
What eval.py and external.py report on scored images: the paper's figures with patient-level
intervals, the figures at the operating point, calibration, the curves, and the trivial answer every
figure stands beside: a logistic regression on the 32 x 32 grey image, trained on the run's own
training patients, with the paired difference of AUC.
"""
import re
from pathlib import Path

import numpy as np
from PIL import Image

import metrics as M
import plots
from folders import Data, positive_class
from runs import confusion, pct, run_data


def small(images: np.ndarray) -> np.ndarray:  # (N, 1, H, W) uint8 -> (N, 1024) in [0, 1]
    return np.stack([np.asarray(Image.fromarray(img[0]).resize((32, 32), Image.BILINEAR), np.float32).ravel() / 255
                     for img in images])


def pixels(data: Data, rows) -> np.ndarray:  # (N, 1024): the 32x32 grey image in [0, 1]
    return small(data.images(rows))


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


def report(out: dict, cfg: dict, what: str) -> str:
    m, ci = out["paper"]["metrics"], out["paper"]["ci95"]
    lines = [f"{what}: {out['images']} images of {out['patients']} patients; 95 % intervals resample patients",
             f"  the paper's figures (argmax; {positive_class(cfg['classes'], cfg['multi_label'])}): "
             + "  ".join(f"{k} {pct(m[k])} [{pct(ci[k][0])}, {pct(ci[k][1])}]" for k in M.METRICS)]
    lines.append("  " + confusion(m, cfg))
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
