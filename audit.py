"""
The shortcut audit of prepare.py: what the acquisition says about each class, and whether it alone
separates the classes. Researchers lose months to confounders (portable AP films for the sick, one
scanner per hospital, crops that fall back more often on one class): a model learns them as readily
as the disease.

Attributes per image: view position (DICOM ViewPosition or the label file's view column), original
width and height, bit depth, photometric interpretation, manufacturer and model (not identifiers),
pixel spacing, and how the lung crop went. A small logistic regression on these attributes (one-hot
and standardised, L2), cross-validated over prepare.py's patient folds, scores each class (one-vs-rest;
each finding of a multi-label set); its AUC at 0.65 or more is a warning. Each attribute is also
scored alone, to name the culprit. numpy only.
"""
import numpy as np

from metrics import logistic, roc_auc

CATEGORICAL = ("view", "photometric", "manufacturer", "model", "bits", "crop")
NUMERIC = ("width", "height", "spacing")
WARN_AUC = 0.65


def columns(items: list, attrs) -> np.ndarray:
    """(N, F) features: one-hot for categorical values (when there are two or more), standardised
    numbers (a missing value is 0, with an indicator column)."""
    cols = []
    for attr in attrs:
        values = [it.get(attr) for it in items]
        if attr in CATEGORICAL:
            kinds = sorted({str(v) for v in values})
            cols += [[str(v) == k for v in values] for k in kinds] if len(kinds) > 1 else []
        else:
            x = np.array([np.nan if v is None else float(v) for v in values])
            if np.isnan(x).all():
                continue
            if np.nanstd(x) > 0:
                cols.append(np.nan_to_num((x - np.nanmean(x)) / np.nanstd(x)))
            if np.isnan(x).any() and not np.isnan(x).all():
                cols.append(np.isnan(x))
    return np.array(cols, float).T.reshape(len(items), -1)


def cv_auc(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> float:
    """AUC of out-of-fold predictions: each fold is scored by a model fitted on the others."""
    if x.shape[1] == 0 or y.all() or not y.any():
        return 0.5
    score = np.zeros(len(y))
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        w = logistic(x[train], y[train]) if 0 < y[train].mean() < 1 else np.zeros(x.shape[1] + 1)
        score[test] = np.c_[np.ones(test.sum()), x[test]] @ w
    return roc_auc(y, score)


def shortcut_audit(items: list, classes: list, folds: list, multi_label: bool) -> dict:
    """Per class: the attributes' values (counts) or means; per class vs the rest: the cross-validated
    AUC of all attributes together and of each alone; a warning at WARN_AUC or more."""
    folds = np.asarray(folds)
    member = {c: np.array([c in it["label"].split("|") if multi_label else it["label"] == c for it in items])
              for c in classes}
    per_class = {}
    for attr in CATEGORICAL + NUMERIC:
        vals = [it.get(attr) for it in items]
        if attr in CATEGORICAL:
            per_class[attr] = {c: {str(v): int(sum(m and str(x) == str(v) for m, x in zip(member[c], vals)))
                                   for v in sorted({str(x) for x in vals})} for c in classes}
        else:
            per_class[attr] = {c: _mean([x for m, x in zip(member[c], vals) if m]) for c in classes}
    targets = classes[-1:] if len(classes) == 2 and not multi_label else classes
    auc = {c: cv_auc(columns(items, CATEGORICAL + NUMERIC), member[c].astype(float), folds) for c in targets}
    alone = {attr: max(cv_auc(columns(items, [attr]), member[c].astype(float), folds) for c in targets)
             for attr in CATEGORICAL + NUMERIC}
    worst = max(auc.values())
    return dict(per_class=per_class, auc=auc, auc_by_attribute=alone, differs=differs(per_class, member),
                warn_at=WARN_AUC, warning=worst >= WARN_AUC)


def differs(per_class: dict, member: dict) -> dict:
    """Attributes whose distribution differs between two classes by 10 points or more (the largest
    gap in a value's share), or whose means differ by 10 % or more: confounders to report, even when
    they do not separate the classes on their own."""
    out = {}
    sizes = {c: m.sum() for c, m in member.items()}
    for attr, per in per_class.items():
        cs = [c for c in per if sizes[c] >= 20]
        for i, a in enumerate(cs):
            for b in cs[i + 1:]:
                if attr in CATEGORICAL:
                    gap = max(abs(per[a][v] / sizes[a] - per[b][v] / sizes[b]) for v in per[a])
                    if gap >= 0.1:
                        out[attr] = f"{a} vs {b}: shares differ by up to {100 * gap:.0f} points"
                elif per[a] and per[b] and abs(per[a] - per[b]) >= 0.1 * max(abs(per[a]), abs(per[b])):
                    out[attr] = f"{a} vs {b}: means {per[a]} vs {per[b]}"
    return out


def _mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return round(float(np.mean(xs)), 4) if xs else None


def describe(report: dict) -> str:
    lines = ["shortcut audit (attributes per class; README: prepare.py):"]
    for attr, per in report["per_class"].items():
        values = {k for v in per.values() for k in v} if attr in CATEGORICAL else set(per.values())
        if len(values) > 1:
            lines.append(f"  {attr}: " + "; ".join(f"{c} {v}" for c, v in per.items()))
    auc = ", ".join(f"{c} {v:.2f}" for c, v in report["auc"].items())
    culprits = sorted(report["auc_by_attribute"].items(), key=lambda kv: -kv[1])[:3]
    lines.append(f"  cross-validated AUC of the attributes alone: {auc} (alone: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in culprits) + ")")
    for attr, how in report["differs"].items():
        lines.append(f"  FLAG {attr} differs between classes ({how}): a possible confounder")
    if report["warning"]:
        lines += ["!" * 100, f"WARNING: acquisition attributes alone separate the classes (AUC >= {WARN_AUC}).",
                  "A model can learn them instead of the disease: balance them across classes, or report per "
                  "stratum.",
                  "!" * 100]
    return "\n".join(lines)
