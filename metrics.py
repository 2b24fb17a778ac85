"""
The numbers, numpy only: the paper's metrics (sensitivity, specificity, accuracy, ROC AUC and AVG,
checked against scikit-learn in the tests), one-hot labels, and the small logistic regression that
both the shortcut audit (audit.py) and the pixel baseline (eval.py) fit; then what eval.py reports
beyond the paper: ROC curves, operating points, calibration, and intervals from resampled patients.
"""
import numpy as np

METRICS = ("sensitivity", "specificity", "accuracy", "auc", "avg")
RESAMPLES = 2000  # patient bootstrap draws of every interval; Holm over the probe's 64 cells needs p < 0.05 / 64


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


def roc_auc_weighted(y, score, weights: np.ndarray) -> np.ndarray:
    """roc_auc under each row of weights (B, N), e.g. how often each bootstrap resample draws each image,
    all rows at once: the weighted Mann-Whitney U, ties counting half."""
    order = np.argsort(score, kind="mergesort")
    s, y, w = np.asarray(score)[order], np.asarray(y).astype(bool)[order], np.asarray(weights, float)[:, order]
    first = np.r_[0, np.nonzero(np.diff(s))[0] + 1]  # where each run of tied scores starts
    group = np.repeat(np.arange(len(first)), np.diff(np.r_[first, len(s)]))
    pos, neg = w * y, w * ~y
    tied = np.add.reduceat(neg, first, axis=1)  # (B, G): the negatives' weight in each run of ties
    below = np.cumsum(tied, 1) - tied  # the negatives' weight under each run
    return (pos * (below + tied / 2)[:, group]).sum(1) / (pos.sum(1) * neg.sum(1))


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
    Newton's method: the minimiser of sum(log-loss) + l2/2 |w|^2. With fewer rows than features (a few
    hundred films of 1,024 pixels) each step solves an N x N system instead of an F x F one."""
    n, f = x.shape
    b, w = 0.0, np.zeros(f)
    k = x @ x.T if n < f else None  # (N, N)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(b + x @ w)))
        s, g = p * (1 - p), np.r_[(p - y).sum(), x.T @ (p - y) + l2 * w]  # the Hessian's weights, the gradient
        if k is None:
            xb = np.c_[np.ones(n), x]
            step = np.linalg.solve(xb.T @ (xb * s[:, None]) + l2 * np.diag(np.r_[0, np.ones(f)]), g)
        else:
            step = _newton_step_few_rows(x, k, s, g, l2)
        b, w = b - step[0], w - step[1:]
    return np.r_[b, w]


def _newton_step_few_rows(x, k, s, g, l2) -> np.ndarray:
    """H^-1 g for H = [[sum(s), u^T], [u, D]], u = X^T s, D = X^T S X + l2 I, never forming D (F x F):
    D^-1 v = (v - X^T R M^-1 R X v) / l2 with R = diag(sqrt(s)), M = l2 I + R K R (N x N, Woodbury);
    the bias by its Schur complement."""
    r = np.sqrt(s)[:, None]
    u = x.T @ s
    v = np.c_[g[1:], u]  # (F, 2)
    dv = (v - x.T @ (r * np.linalg.solve(l2 * np.eye(len(s)) + r * k * r.T, r * (x @ v)))) / l2  # D^-1 v
    db = (g[0] - u @ dv[:, 0]) / (s.sum() - u @ dv[:, 1])
    return np.r_[db, dv[:, 0] - dv[:, 1] * db]


# ------------------------------------------------------------------------------------------------
# what eval.py reports beyond the paper: the operating point, calibration, patient intervals


def as_binary(y, prob, multi_label: bool) -> list:
    """[(name, y (N,) 0/1, p (N,))]: the disease score of a binary set, or each finding of a multi-label set."""
    if multi_label:
        return [(c, y[:, c], prob[:, c]) for c in range(prob.shape[1])]
    return [("", y, prob[:, 1])] if prob.shape[1] == 2 else []


def roc_curve(y, score):
    """(fpr, tpr, thresholds) from the highest threshold down, one point per distinct score."""
    y, score = np.asarray(y).astype(bool), np.asarray(score)
    order = np.argsort(-score, kind="mergesort")
    y, s = y[order], score[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)], np.r_[np.inf, s[last]]


def roc_band(y, score, draws, grid=np.linspace(0, 1, 101)):  # pointwise 95 % band of tpr over fpr
    tprs = []
    for i in draws:
        fpr, tpr, _ = roc_curve(y[i], score[i])
        tprs.append(np.interp(grid, fpr, tpr))
    lo, hi = np.percentile(tprs, [2.5, 97.5], axis=0)
    return grid, lo, hi


def choose_threshold(y, score, sensitivity=None) -> float:
    """On validation: maximise Youden's J (sensitivity + specificity - 1) over the scores as cut-offs
    (never one above them all, which would call every image negative), or take the highest threshold
    whose sensitivity reaches `sensitivity`. Positive means score >= threshold."""
    fpr, tpr, thr = (v[1:] for v in roc_curve(y, score))  # [0]: the cut-off above every score
    if sensitivity is None:
        return float(thr[np.argmax(tpr - fpr)])
    return float(thr[np.argmax(tpr >= sensitivity)])


def at_threshold(y, score, cut: float) -> dict:
    y, pred = np.asarray(y).astype(bool), np.asarray(score) >= cut
    tp, tn, fp, fn = (y & pred).sum(), (~y & ~pred).sum(), (~y & pred).sum(), (y & ~pred).sum()
    ratio = lambda a, b: float(a / b) if b else float("nan")  # noqa: E731
    return dict(sensitivity=ratio(tp, tp + fn), specificity=ratio(tn, tn + fp), accuracy=ratio(tp + tn, len(y)),
                ppv=ratio(tp, tp + fp), npv=ratio(tn, tn + fn), f1=ratio(2 * tp, 2 * tp + fp + fn))


def calibration(y, prob, multi_label: bool, bins=15) -> dict:
    """Brier score: the mean squared difference between a probability and its 0/1 outcome, for the
    disease class of a binary set (each finding of a multi-label set, averaged; multi-class: summed
    over classes). ECE: over 15 equal-width bins of that probability, |mean predicted - observed
    frequency| weighted by the share of images in the bin, summed (averaged over findings/classes)."""
    hot = one_hot(y, prob.shape[1], multi_label)
    cols = [1] if prob.shape[1] == 2 and not multi_label else list(range(prob.shape[1]))
    sq = (prob - hot)[:, cols] ** 2
    brier = sq.sum(1).mean() if not multi_label and len(cols) > 1 else sq.mean()
    eces = []
    for c in cols:
        b = np.minimum((prob[:, c] * bins).astype(int), bins - 1)
        gaps = [abs(prob[b == i, c].mean() - hot[b == i, c].mean()) * (b == i).mean() for i in np.unique(b)]
        eces.append(sum(gaps))
    return dict(brier=float(brier), ece=float(np.mean(eces)))


def with_temperature(prob, temperature: float, multi_label: bool):
    """Softmax(log p / T) (sigmoid(logit / T) per finding for multi-label sets): T > 1 softens."""
    p = np.clip(prob, 1e-7, 1 - 1e-7)
    if multi_label:
        return 1 / (1 + np.exp(-np.log(p / (1 - p)) / temperature))
    z = np.log(p) / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def fit_temperature(y, prob, multi_label: bool) -> float:
    """The T that minimises the validation set's negative log-likelihood, on a fine log grid."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 601))
    hot = one_hot(y, prob.shape[1], multi_label)
    nll = [-(hot * np.log(np.clip(q, 1e-12, 1)) + (1 - hot) * np.log(np.clip(1 - q, 1e-12, 1)) * multi_label).sum()
           for q in (with_temperature(prob, temp, multi_label) for temp in grid)]
    return float(grid[int(np.argmin(nll))])


def resamples(patients, y, n_classes: int, n=RESAMPLES, seed=0) -> list:
    """Image indices of n bootstrap resamples of the patients (each drawn patient brings all its
    images); resamples lacking a class (a finding's 0s or 1s) are redrawn. Patients are numbered in the
    order they first appear, so the draws do not depend on their pseudonyms (on prepare.py's key)."""
    rng, y = np.random.default_rng(seed), np.asarray(y)
    complete = (lambda i: np.unique(y[i]).size == n_classes) if y.ndim == 1 else (lambda i: np.ptp(y[i], 0).all())
    if not len(y) or not complete(np.arange(len(y))):
        raise ValueError(f"the {len(y)} images lack a class (or a finding's positives or negatives): no interval")
    _, first, of = np.unique(np.asarray(patients), return_index=True, return_inverse=True)
    of = np.argsort(np.argsort(first))[of]  # patient k: the k-th to appear
    images_of = [np.flatnonzero(of == p) for p in range(of.max() + 1)]
    out = []
    while len(out) < n:  # ends: the whole set holds every class, so each draw may (1 - 1/e per rare patient)
        i = np.concatenate([images_of[p] for p in rng.integers(0, len(images_of), len(images_of))])
        if complete(i):
            out.append(i)
    return out


def interval(values) -> list:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def holm(p: np.ndarray, alpha=0.05) -> np.ndarray:
    """Holm's step-down test of K hypotheses at family-wise error `alpha`: which of the p-values (K,) reject."""
    order, reject = np.argsort(p), np.zeros(len(p), bool)
    for rank, k in enumerate(order):
        if p[k] > alpha / (len(p) - rank):
            break
        reject[k] = True
    return reject
