"""
Where prepare.py crops: the classical lung crop (numpy and Pillow only, about 4 ms per radiograph),
its fallback, and the box of a given lung mask (--masks).

On a 128 px copy, the lung fields are the two large dark regions, one each side of the midline, in
the upper three quarters of the film, that touch neither the film's sides nor its bottom (the top
only in its middle fifths, where apices are cut by collimation). Dark is below a threshold: Otsu's
on the film's central part first, then lower ones (which cut the lungs off the dark air and soft
tissue they touch), then higher ones (lungs brighter than the background). Portable AP films
darken towards the top; when no threshold separates the lungs, the same search runs on the film
minus its wide-scale brightness (a Gaussian blur of an eighth of its size). The box holds both
lungs, regrown a little at a threshold above the one that separated them, plus 8 % each side and
above and 16 % below: the lateral edges (under the ribs) and the bases (behind the diaphragm domes)
are brighter than the rest of the lungs and are often found short.

Where it fails: lungs that merge with the air outside the body at every threshold, a lung white
from consolidation or effusion (one dark region only), films that are not frontal chests. Then
the crop is the thorax with fixed margins (`thorax_box`), which depends on nothing in the lungs, so
whether an image falls back cannot tell its label; prepare.py counts fallbacks per class. Pass
lung masks (prepare.py --masks) where it matters.
"""
from typing import Optional

import numpy as np
from PIL import Image, ImageFilter

N = 128  # the working size


def otsu(img: np.ndarray) -> float:
    hist = np.bincount(img.ravel(), minlength=256).astype(float)
    w, mu = np.cumsum(hist), np.cumsum(hist * np.arange(256))
    between = (mu[-1] * w - mu * w[-1]) ** 2 / np.maximum(w * (w[-1] - w), 1)
    return float(np.argmax(between))


def components(mask: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected components of `mask` (0 outside): each run of mask pixels along a
    row, then along a column, takes the smallest pixel index in it, until nothing changes."""
    h, w = mask.shape
    rows = np.flatnonzero(mask)  # row-major: runs along rows
    cols = np.flatnonzero(mask.T)  # column-major positions; as row-major indices:
    cols = (cols % h) * w + cols // h
    passes = []
    for order, step, line in ((rows, 1, rows // w), (cols, w, cols % w)):  # a run stays in its row / column
        if len(order) == 0:
            return np.zeros_like(mask, dtype=np.int64)
        new_run = np.r_[True, (np.diff(order) != step) | (np.diff(line) != 0)]
        starts = np.flatnonzero(new_run)
        passes.append((order, starts, np.diff(np.r_[starts, len(order)])))
    lab = np.zeros(h * w, np.int64)
    lab[rows] = rows + 1
    while True:
        before = lab[rows].copy()
        for order, starts, lengths in passes:
            lab[order] = np.repeat(np.minimum.reduceat(lab[order], starts), lengths)
        if np.array_equal(before, lab[rows]):
            return lab.reshape(h, w)


def _shifted(m: np.ndarray):  # the four 4-neighbours of every pixel (outside the image: False)
    p = np.pad(m, 1)
    return p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]


def erode(m: np.ndarray, k: int) -> np.ndarray:
    for _ in range(k):
        up, down, left, right = _shifted(m)
        m = m & up & down & left & right
    return m


def grow(seed: np.ndarray, within: np.ndarray, k: int) -> np.ndarray:
    for _ in range(k):
        up, down, left, right = _shifted(seed)
        seed = (seed | up | down | left | right) & within
    return seed


# the film's edges that a lung may not touch: sides, bottom, and the top's outer fifths (2 px wide:
# the erosion keeps components 1 px away from the edge)
_EDGE = np.zeros((N, N), bool)
_EDGE[:, :2] = _EDGE[:, -2:] = _EDGE[-2:] = _EDGE[:2, :N // 5] = _EDGE[:2, -N // 5:] = True
_ROW, _COL = np.divmod(np.arange(N * N), N)


def lung_pair(a: np.ndarray, t: float) -> Optional[np.ndarray]:
    """The two lungs as a mask, when the dark pixels (< t, eroded by 1) hold a plausible pair."""
    lab = components(erode(a < t, 1)).ravel()
    area = np.bincount(lab, minlength=N * N + 1).astype(float)
    area[0] = 0
    big = np.flatnonzero(area > 0.015 * N * N)
    if len(big) < 2:
        return None
    sel = np.isin(lab, big)
    ids = np.searchsorted(big, lab[sel])
    cx = np.bincount(ids, _COL[sel], len(big)) / area[big]
    cy = np.bincount(ids, _ROW[sel], len(big)) / area[big]
    touch = np.bincount(ids, _EDGE.ravel()[sel], len(big))
    top, bottom = np.full(len(big), N), np.zeros(len(big), int)
    np.minimum.at(top, ids, _ROW[sel])
    np.maximum.at(bottom, ids, _ROW[sel])
    ok = (touch <= 0.02 * N) & (cy > 0.15 * N) & (cy < 0.7 * N)
    left = np.flatnonzero(ok & (cx > 0.08 * N) & (cx < N / 2))
    right = np.flatnonzero(ok & (cx >= N / 2) & (cx < 0.92 * N))
    if not len(left) or not len(right):
        return None
    l, r = left[np.argmax(area[big[left]])], right[np.argmax(area[big[right]])]
    overlap = min(bottom[l], bottom[r]) - max(top[l], top[r])
    if min(area[big[l]], area[big[r]]) < 0.25 * max(area[big[l]], area[big[r]]) or \
            overlap < 0.5 * min(bottom[l] - top[l], bottom[r] - top[r]):
        return None
    return np.isin(lab, big[[l, r]]).reshape(N, N)


def _search(a: np.ndarray):  # (x0, y0, x1, y1) of the lungs in `a`, or None
    centre = a[N // 10:-N // 10, N // 10:-N // 10]
    mid, low, high = otsu(centre), *np.percentile(centre, [8, 75])
    thresholds = [*np.linspace(mid, low, 10), *np.linspace(mid, high, 6)[1:]]
    for i, t in enumerate(thresholds):
        seed = lung_pair(a, t)
        if seed is None:
            continue
        lungs = grow(seed, a < (thresholds[i - 2] if 2 <= i < 10 else t), 2)  # back over the erosion, and a bit
        ys, xs = np.nonzero(lungs)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        if x1 - x0 >= 0.35 * N and y1 - y0 >= 0.25 * N:
            return x0, y0, x1, y1
    return None


def lung_fields(img8: np.ndarray):
    """(left, top, right, bottom) of the lung fields found in `img8`, in its pixels, or None."""
    h, w = img8.shape
    small = Image.fromarray(img8).resize((N, N), Image.BILINEAR)
    a = np.asarray(small.filter(ImageFilter.BoxBlur(1)))
    found = _search(a)
    if found is None:  # brightness varies across the film: compare each pixel with its wide surroundings
        wide = np.asarray(small.filter(ImageFilter.GaussianBlur(N / 8)), float)
        found = _search(np.clip(a - wide + 128, 0, 255).astype(np.uint8))
    return None if found is None else tuple(v * s / N for v, s in zip(found, (w, h, w, h)))


def lung_box(img8: np.ndarray):
    """The crop: the lung fields plus 8 % each side and above and 16 % below, within the image; or None."""
    found = lung_fields(img8)
    if found is None:
        return None
    (x0, y0, x1, y1), (h, w) = found, img8.shape
    mx, my = 0.08 * (x1 - x0), 0.08 * (y1 - y0)
    return tuple(int(round(v)) for v in (max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + 2 * my)))


def thorax_box(shape) -> tuple:
    """The fallback: fixed margins that cut the film's borders (where markers, labels and collimator
    edges sit) and keep the thorax of a frontal chest film; the same for every image."""
    h, w = shape
    return round(0.08 * w), round(0.04 * h), round(0.92 * w), round(0.9 * h)


def mask_box(mask: np.ndarray, margin=0.05):  # --masks: the mask's box plus 5 % each side
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    h, w = mask.shape
    return (int(max(0, x0 - mx)), int(max(0, y0 - my)), int(min(w, x1 + mx)), int(min(h, y1 + my)))


def rle_mask(rle: str, h: int, w: int) -> np.ndarray:  # CheXmask: 1-based (start, length) pairs, row-major
    runs = np.array(rle.split(), dtype=np.int64)
    flat = np.zeros(h * w, bool)
    for start, length in zip(runs[::2] - 1, runs[1::2]):
        flat[start:start + length] = True
    return flat.reshape(h, w)
