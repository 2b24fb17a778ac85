"""
Where prepare.py crops: the classical lung crop (numpy and Pillow only, about 1.3 ms per radiograph),
its fallback, and the box of a given lung mask (--masks).

On a 128 px copy (box means, then bilinear), the lung fields are the two large dark regions, one
each side of the midline, in the upper three quarters of the film, that touch neither the film's
sides nor its bottom (the top only in its middle fifths, where apices are cut by collimation). Dark
is below a threshold: Otsu's on the film's central part first, then lower ones (which cut the lungs
off the dark air and soft tissue they touch), then higher ones (lungs brighter than the background).
Portable AP films darken towards the top; when no threshold separates the lungs, the same search
runs on the film minus its wide-scale brightness (a Gaussian blur of an eighth of its size). The box
holds both lungs, regrown a little at a threshold above the one that separated them, plus 8 % each
side and above and 16 % below: the lateral edges (under the ribs) and the bases (behind the
diaphragm domes) are brighter than the rest of the lungs and are often found short.

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


def levels(img: np.ndarray) -> tuple:
    """Otsu's threshold of a uint8 image and its 8th and 75th percentiles (numpy's, linear), from one
    histogram: the k-th smallest pixel is the first grey level whose cumulative count exceeds k."""
    hist = np.bincount(img.ravel(), minlength=256)
    count, mu = np.cumsum(hist), np.cumsum(hist * np.arange(256.0))
    between = (mu[-1] * count - mu * count[-1]) ** 2 / np.maximum(count * (count[-1] - count), 1)
    rank = np.array([0.08, 0.75]) * (count[-1] - 1)
    below, above = (np.searchsorted(count, k, "right") for k in (np.floor(rank), np.floor(rank) + 1))
    return float(np.argmax(between)), *(below + (rank - np.floor(rank)) * (above - below))


def runs(mask: np.ndarray) -> tuple:
    """The horizontal runs of `mask`, row-major: their row, first column, end column (exclusive) and
    4-connected component (0, 1, ...). Runs in neighbouring rows that share a column are linked. Each
    run points to a run of its component (at first itself); for every link whose two ends reach
    different roots, the larger root is hooked under the smaller, and every run then points to its
    root (pointer jumping), until each link's ends share their root."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    steps = (padded[:, 1:] - padded[:, :-1]).ravel()  # +1: a run starts, -1: it ended
    row, start = np.divmod(np.flatnonzero(steps == 1), mask.shape[1] + 1)
    end = np.flatnonzero(steps == -1) % (mask.shape[1] + 1)
    run_of = np.zeros(mask.shape, np.int64)
    run_of[mask] = np.repeat(np.arange(len(row)), end - start)
    both = mask[:-1] & mask[1:]
    up, down = run_of[:-1][both], run_of[1:][both]  # one link per shared column; a pair's columns adjoin:
    new = np.ones(len(up), bool)
    new[1:] = (up[1:] != up[:-1]) | (down[1:] != down[:-1])
    up, down = up[new], down[new]
    root = np.arange(len(row))
    while (differ := root[up] != root[down]).any():
        a, b = root[up][differ], root[down][differ]
        np.minimum.at(root, np.maximum(a, b), np.minimum(a, b))
        while (root[root] != root).any():
            root = root[root]
    return row, start, end, np.unique(root, return_inverse=True)[1]


def erode(m: np.ndarray) -> np.ndarray:  # a pixel stays when its four neighbours are set (outside: not)
    kept = np.zeros_like(m)
    kept[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return kept


def grow(seed: np.ndarray, within: np.ndarray, k: int) -> np.ndarray:  # k steps to 4-neighbours within
    for _ in range(k):
        grown = seed.copy()
        grown[1:] |= seed[:-1]
        grown[:-1] |= seed[1:]
        grown[:, 1:] |= seed[:, :-1]
        grown[:, :-1] |= seed[:, 1:]
        seed = grown & within
    return seed


# the film's edges that a lung may not touch: sides, bottom, and the top's outer fifths (2 px wide:
# the erosion keeps components 1 px away from the edge)
_EDGE = np.zeros((N, N), bool)
_EDGE[:, :2] = _EDGE[:, -2:] = _EDGE[-2:] = _EDGE[:2, :N // 5] = _EDGE[:2, -N // 5:] = True
_EDGES_BEFORE = np.pad(np.cumsum(_EDGE, 1), ((0, 0), (1, 0)))  # [r, c]: edge pixels in row r left of c


def lung_pair(a: np.ndarray, t: float) -> Optional[np.ndarray]:
    """The two lungs as a mask, when the dark pixels (< t, eroded by 1) hold a plausible pair."""
    dark = erode(a < t)
    row, start, end, comp = runs(dark)
    if len(row) == 0:
        return None
    length = end - start
    area = np.bincount(comp, length)  # per component
    cx = np.bincount(comp, length * (start + end - 1) / 2) / area
    cy = np.bincount(comp, length * row) / area
    touch = np.bincount(comp, _EDGES_BEFORE[row, end] - _EDGES_BEFORE[row, start])
    top, bottom = np.full(len(area), N), np.zeros(len(area), int)
    np.minimum.at(top, comp, row)
    np.maximum.at(bottom, comp, row)
    ok = (area > 0.015 * N * N) & (touch <= 0.02 * N) & (cy > 0.15 * N) & (cy < 0.7 * N)
    left = np.flatnonzero(ok & (cx > 0.08 * N) & (cx < N / 2))
    right = np.flatnonzero(ok & (cx >= N / 2) & (cx < 0.92 * N))
    if not len(left) or not len(right):
        return None
    l, r = left[np.argmax(area[left])], right[np.argmax(area[right])]
    overlap = min(bottom[l], bottom[r]) - max(top[l], top[r])
    if min(area[l], area[r]) < 0.25 * max(area[l], area[r]) or \
            overlap < 0.5 * min(bottom[l] - top[l], bottom[r] - top[r]):
        return None
    lungs = np.zeros_like(dark)
    lungs[dark] = np.repeat((comp == l) | (comp == r), length)
    return lungs


def _search(a: np.ndarray):  # (x0, y0, x1, y1) of the lungs in `a`, or None
    centre = a[N // 10:-N // 10, N // 10:-N // 10]
    mid, low, high = levels(centre)
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
    small = Image.fromarray(img8).resize((N, N), Image.BILINEAR, reducing_gap=1.0)  # box means first: fast
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
