"""
The shortcut audit of prepare.py: what the acquisition says about each class, and whether it alone
separates the classes. Researchers lose months to confounders (portable AP films for the sick, one
scanner per hospital, crops that fall back more often on one class): a model learns them as readily
as the disease.

Attributes per image: view position (DICOM ViewPosition or the label file's view column), original
width and height, bit depth, photometric interpretation, manufacturer and model (not identifiers),
pixel spacing, the source's encoding (DICOM transfer syntax or file format, the file's bytes per
pixel, a JPEG's mean quantisation step), how the image was cropped, and the crop box's geometry
(corners, width, height, aspect): a framing that depends on the disease is a shortcut too. An
attribute no image has is "unknown", one with a single value "constant": both are untested, never
a chance AUC. A small logistic regression on
these attributes (one-hot and standardised, L2), cross-validated over prepare.py's patient folds,
scores each class (one-vs-rest; each finding of a multi-label set): each attribute alone, the film's
own attributes (view, size), those plus the crop's geometry, and all together. Any AUC of 0.65 or
more is a warning, and so is any flag (a categorical value of 10 images or more), however rare, whose
images are 95 % one class. numpy only.
"""
import numpy as np

from metrics import logistic, roc_auc

CATEGORICAL = ("view", "photometric", "manufacturer", "model", "bits", "crop", "encoding", "colour")
NUMERIC = ("width", "height", "spacing", "bytes_per_pixel", "jpeg_q")
GEOMETRY = ("box_x0", "box_y0", "box_x1", "box_y1", "box_w", "box_h", "box_aspect")  # the crop box
ENCODING = ("encoding", "bytes_per_pixel", "jpeg_q", "bits", "colour")  # how the source file was stored
CONTENT = "content_bytes_per_pixel"  # each film re-encoded the same way (radiographs.preprocess): its texture
SETS = {"film (view, size)": ("view", "width", "height"),
        "film + crop geometry": ("view", "width", "height", "crop") + GEOMETRY,
        "source encoding": ENCODING,
        "all attributes": CATEGORICAL + NUMERIC + GEOMETRY}
WARN_AUC = 0.65
PURE_MIN, PURE_SHARE = 10, 0.95


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
        w = logistic(x[train], y[train]) if 0 < y[train].sum() < train.sum() else np.zeros(x.shape[1] + 1)
        score[test] = np.c_[np.ones(test.sum()), x[test]] @ w
    return roc_auc(y, score)


def with_geometry(it: dict) -> dict:
    """An image's attributes plus its crop box's geometry (film pixels), as the audit reads them."""
    x0, y0, x1, y1 = it.get("box") or (None,) * 4
    if x0 is None:
        return it
    return dict(it, box_x0=x0, box_y0=y0, box_x1=x1, box_y1=y1, box_w=x1 - x0, box_h=y1 - y0,
                box_aspect=(x1 - x0) / max(y1 - y0, 1))


def shortcut_audit(items: list, classes: list, folds: list, multi_label: bool) -> dict:
    """Per class: the attributes' values (counts) or means. Per class vs the rest, the cross-validated
    AUC of each attribute alone, of each set in SETS and of all together; None where nothing could be
    tested: an attribute no image has ("unknown") or one value for every image ("constant"). The flags
    (categorical values) that are nearly one class; a warning when any AUC reaches WARN_AUC or any flag
    is pure."""
    items, folds = [with_geometry(it) for it in items], np.asarray(folds)
    member = {c: np.array([c in it["label"].split("|") if multi_label else it["label"] == c for it in items])
              for c in classes}
    per_class = {}
    for attr in CATEGORICAL + NUMERIC + GEOMETRY + (CONTENT,):
        vals = [it.get(attr) for it in items]
        if attr in CATEGORICAL:
            per_class[attr] = {c: {str(v): int(sum(m and str(x) == str(v) for m, x in zip(member[c], vals)))
                                   for v in sorted({str(x) for x in vals})} for c in classes}
        else:
            per_class[attr] = {c: _mean([x for m, x in zip(member[c], vals) if m]) for c in classes}
    untested = {a: why for a in CATEGORICAL + NUMERIC + GEOMETRY if (why := untestable(items, a))}
    targets = classes[-1:] if len(classes) == 2 and not multi_label else classes

    def auc_of(attrs):  # the best class's, or None when none of `attrs` can be tested
        x = columns(items, [a for a in attrs if a not in untested])
        return max(cv_auc(x, member[c].astype(float), folds) for c in targets) if x.shape[1] else None
    stored = None if "bytes_per_pixel" in untested else auc_of(["bytes_per_pixel"])
    content = auc_of([CONTENT]) if any(it.get(CONTENT) is not None for it in items) else None
    # storage told from content: a size signal that survives re-encoding every film the same way is content
    if stored is not None and content is not None and stored >= WARN_AUC and content >= stored - 0.05:
        untested["bytes_per_pixel"] = (f"content: it separates the classes as much with every film re-encoded the "
                                       f"same way ({content:.2f}; as stored {stored:.2f})")
    sets = {name: auc_of(attrs) for name, attrs in SETS.items()}
    alone = {attr: auc_of([attr]) for attr in CATEGORICAL + NUMERIC + GEOMETRY if attr not in untested}
    flags = pure_flags(items, member)
    worst = max([v for v in [*sets.values(), *alone.values()] if v is not None], default=0.5)
    film, crop = sets["film (view, size)"], sets["film + crop geometry"]
    return dict(per_class=per_class, auc_sets=sets, auc_by_attribute=alone, untested=untested, content_auc=content,
                crop_adds=None if film is None or crop is None else crop - film, flags=flags,
                differs=differs(per_class, member), warn_at=WARN_AUC, warning=worst >= WARN_AUC or bool(flags))


def untestable(items: list, attr: str):
    """'unknown' when no image has the attribute, 'constant: <value>' when every image has the same
    one; else None (it can be tested)."""
    values = [it.get(attr) for it in items]
    if all(v in (None, "") for v in values):
        return "unknown"
    if len({str(v) for v in values}) == 1:
        return f"constant: {values[0]}"
    return None


def pure_flags(items: list, member: dict) -> list:
    """Categorical values held by PURE_MIN or more images (not all), at least PURE_SHARE of them one
    class, where that class is not PURE_SHARE of all images anyway: however rare, a model can read them."""
    out = []
    for attr in CATEGORICAL:
        vals = np.array([str(it.get(attr)) for it in items])
        for v in sorted(set(vals)):
            has = vals == v
            if PURE_MIN <= has.sum() < len(items):
                for c, m in member.items():
                    share = m[has].mean()
                    if share >= PURE_SHARE > m.mean():
                        out.append(f"{attr}={v}: {has.sum()} images, {100 * share:.0f} % {c}")
    return out


def differs(per_class: dict, member: dict) -> dict:
    """Attributes whose distribution differs between two classes by 10 points or more (the largest
    gap in a value's share), or whose means differ by 10 % or more: confounders to report, even when
    they do not separate the classes on their own."""
    out = {}
    sizes = {c: m.sum() for c, m in member.items()}
    for attr, per in per_class.items():
        cs = [c for c in per if sizes[c] >= 20] if attr != CONTENT else []  # the pixels' texture: not acquisition
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
    lines = ["shortcut audit (attributes per class; docs/data.md):"]
    for attr, per in report["per_class"].items():
        values = {k for v in per.values() for k in v} if attr in CATEGORICAL else set(per.values())
        if len(values) > 1 and attr not in GEOMETRY:
            lines.append(f"  {attr}: " + "; ".join(f"{c} {v}" for c, v in per.items()))
    culprits = sorted(report["auc_by_attribute"].items(), key=lambda kv: -kv[1])[:3]
    said = lambda v: "untested" if v is None else f"{v:.2f}"  # noqa: E731
    adds = "" if report["crop_adds"] is None else f"; the crop adds {report['crop_adds']:+.2f}"
    lines.append("  cross-validated AUC (patient folds; chance 0.50): " + ", ".join(
        f"{k} {said(v)}" for k, v in report["auc_sets"].items()) + adds
                 + "; alone: " + ", ".join(f"{k} {v:.2f}" for k, v in culprits))
    untested = report.get("untested", {})
    if colour := sum(per.get("True", 0) for per in report["per_class"].get("colour", {}).values()):
        lines.append(f"  NOTE: {colour} sources were colour (RGB) images, converted to grey (luma)")
    stored = report["auc_by_attribute"].get("bytes_per_pixel")
    if stored is not None and stored >= WARN_AUC and report.get("content_auc") is not None:
        lines.append(f"  the files' bytes per pixel separate the classes ({stored:.2f}) but not re-encoded the same "
                     f"way ({report['content_auc']:.2f}): the classes were stored differently (format, compression); "
                     "convert every film the same way before preparing, or balance the sources across classes")
    if untested.get("bytes_per_pixel", "").startswith("content"):
        lines.append(f"  the files' bytes per pixel follow the films' pixels, not only their files: "
                     f"{untested['bytes_per_pixel'].split(': ', 1)[1]}. A texture that differs between classes: the "
                     "disease's own, or one that processing or lossy storage left in the pixels (jpeg_q and encoding "
                     "say whether storage differs); storing the files alike cannot remove it; the pixel baseline "
                     "and probe.py say whether a model leans on it")
    for kind in ("unknown", "constant"):
        names = [f"{a}{' (' + w.split(': ', 1)[1] + ')' if ': ' in w else ''}" for a, w in untested.items()
                 if w.startswith(kind) and a not in GEOMETRY]
        if names:
            lines.append(f"  untested, {kind}: {', '.join(names)}")
    for attr, how in report["differs"].items():
        if untested.get(attr, "").startswith("content"):
            continue  # said above, in words a user can act on
        lines.append(f"  FLAG {attr} differs between classes ({how}): a possible confounder")
    if report["warning"]:
        high = [f"{k} {v:.2f}" for k, v in {**report["auc_sets"], **report["auc_by_attribute"]}.items()
                if v is not None and v >= WARN_AUC]
        lines += ["!" * 100, "WARNING: what the acquisition or the framing says separates the classes:"]
        lines += [f"  AUC >= {WARN_AUC}: {', '.join(high)}"] if high else []
        lines += [f"  nearly one class: {f}" for f in report["flags"]]
        lines += ["A model can learn them instead of the disease: balance them across classes, or report per "
                  "stratum.", "!" * 100]
    return "\n".join(lines)
