"""
Another site's prepared folder, as probe.py --data and external.py score it: its labels in the run's
names, and never the run's own films (found by their pixels) or patients (by their pseudonyms); its
acquisition beside the run's (the shift report).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import audit
from folders import Data, UserError, encode_labels, lacking
from runs import run_data


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
    own = own_films(ours, other.folder, images) | np.array([r["patient"] in shared for r in other.rows])
    if shared:
        print(f"WARNING: {len(shared)} patients of {other.folder} are patients of the run's data (the same "
              "pseudonyms): their films are left out, as the run may have trained on them")
    if own.all():
        raise UserError(f"{other.folder}: all {len(own)} films are the run's own (the same pixels as in {cfg['data']}, "
                        "or its patients'); external validation needs films the run never saw: eval.py and probe.py "
                        "score its test fold")
    keep = [i for i, o in enumerate(own) if not o]
    y = encode_labels([labels[i] for i in keep], cfg["classes"], cfg["multi_label"])
    missed = [c for c, m in zip(cfg["classes"], lacking(y, len(cfg["classes"]), cfg["multi_label"])) if m]
    if missed:
        raise UserError(f"{other.folder}: after leaving out the run's own films, {len(keep)} remain with no images "
                        f"{'with and without ' if cfg['multi_label'] else 'of '}{', '.join(missed)}: nothing to "
                        "compare; add films of that class")
    return other, [other.rows[i] for i in keep], [labels[i] for i in keep], images[keep]


def own_films(ours: Data, folder, images: np.ndarray) -> np.ndarray:
    """(N,) bool: which of `folder`'s `images` are films of the run's data folder `ours` (names can differ,
    or mean other films), by same_films. Some: a warning (the callers leave them out)."""
    own = same_films(images, ours.images(ours.rows), [r["patient"] for r in ours.rows])
    if own.any():
        print(f"WARNING: {own.sum()} of {len(own)} films of {folder} are the run's own (the same films as in "
              f"{ours.folder}, maybe shifted, cropped, rescaled or re-encoded): left out; the other "
              f"{(~own).sum()} are scored")
    return own


SHIFTS, SCALES = np.arange(-6, 7, 2) / 112, (0.94, 0.97, 1.0, 1.03, 1.06)  # +-6 px of 224, +-6 %
RATIO, NEAR = 0.5, 6.0  # distinct patients' films: ratio >= 0.59 on NIH, >= 0.71 on the demo; NIH's >= 9.6 apart


def same_films(images: np.ndarray, theirs: np.ndarray, patients: list) -> np.ndarray:
    """(N,) bool: which `images` (N, 1, H, W) are films of `theirs` (M, ..., of `patients`), allowing a
    shift of up to 6 px, a crop or rescale of up to 6 %, a re-encoding. Each film's 16 x 16 thumbnail is
    compared, over 245 such alignments, with theirs (RMS grey levels): a film is theirs when its nearest
    is within 2 levels, or nearer than RATIO x the nearest film of any other patient (a ratio test: the
    films of a set lie at their own typical distances, and a copy stands out from them)."""
    ref = F.avg_pool2d(F.adaptive_avg_pool2d(torch.as_tensor(theirs, dtype=torch.float32), 64), 4).flatten(1)
    grid = torch.tensor([[[s, 0, x], [0, s, y]] for s in SCALES for x in SHIFTS for y in SHIFTS], dtype=torch.float32)
    patients, out = np.asarray(patients), []
    with torch.no_grad():
        for chunk in torch.as_tensor(images, dtype=torch.float32).split(32):
            small = F.adaptive_avg_pool2d(chunk, 64).repeat_interleave(len(grid), 0)  # (n * A, 1, 64, 64)
            moved = F.grid_sample(small, F.affine_grid(grid.repeat(len(chunk), 1, 1), small.shape, align_corners=False),
                                  padding_mode="border", align_corners=False)
            q = F.avg_pool2d(moved, 4).flatten(1)  # (n * A, 256)
            d = torch.cdist(q, ref).view(len(chunk), len(grid), -1).amin(1) / 16  # (n, M) RMS over 256 pixels
            nearest = d.argmin(1)
            others = torch.as_tensor(patients[None] != patients[nearest.numpy()][:, None])
            d1, d2 = d.min(1).values, torch.where(others, d, torch.inf).min(1).values
            out.append(((d1 < 2) | (d1 < NEAR) & (d1 < RATIO * d2)).numpy())
    return np.concatenate(out) if out else np.zeros(0, bool)


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
    """Every attribute the shortcut audit tests, pooled over classes, in the run's data and in DIR: the
    share of each value (view, bit depth, photometric interpretation, maker, model, crop, encoding,
    colour), the mean of the classes' means (size, spacing, bytes per pixel as stored and re-encoded,
    JPEG quantisation); "unknown" where no image says."""
    out = {}
    for attr in audit.CATEGORICAL:
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
    for attr in (*audit.NUMERIC, audit.CONTENT):
        means = {who: [v for v in m["audit"]["per_class"].get(attr, {}).values() if v is not None]
                 for who, m in (("run", ours), ("data", theirs))}
        out[attr] = {who: round(float(np.mean(v)), 4) if v else "unknown" for who, v in means.items()}
    return out
