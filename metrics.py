"""
The numbers, numpy only: the paper's metrics (sensitivity, specificity, accuracy, ROC AUC and AVG,
checked against scikit-learn in the tests), one-hot labels, and the small logistic regression that
both the shortcut audit (audit.py) and the pixel baseline (eval.py) fit.
"""
import numpy as np

METRICS = ("sensitivity", "specificity", "accuracy", "auc", "avg")


def roc_auc(y, score) -> float:
    """Mann-Whitney U with average ranks for ties: P(score of a positive > score of a negative)."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("ROC AUC is undefined: the labels hold only one class")
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    first = np.r_[0, np.nonzero(np.diff(s))[0] + 1]  # where each run of tied scores starts
    last = np.r_[first[1:], len(s)] - 1
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((first + last) / 2 + 1, last - first + 1)  # average rank over each run
    n_pos, n_neg = y.sum(), (~y).sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def one_hot(y, n_classes: int, multi_label: bool) -> np.ndarray:  # (N,) indices or (N, C) multi-hot -> (N, C)
    return np.asarray(y, float) if multi_label else np.eye(n_classes)[np.asarray(y)]


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


def logistic(x: np.ndarray, y: np.ndarray, l2=1.0, steps=25) -> np.ndarray:
    """Weights (bias first) of an L2-regularised logistic regression (the bias is not penalised), by
    Newton's method: the minimiser of sum(log-loss) + l2/2 |w|^2."""
    x = np.c_[np.ones(len(x)), x]
    w = np.zeros(x.shape[1])
    ridge = l2 * np.diag(np.r_[0, np.ones(x.shape[1] - 1)])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        w -= np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + ridge, x.T @ (p - y) + ridge @ w)
    return w
