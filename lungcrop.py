"""
Where prepare.py crops, and where the lung fields lie in the crop (for probe.py).

The default framing (`thorax_box`) is the film minus a 2 % border: the same fraction of every film,
computed from its width and height alone. Nothing in the pixels moves it, so it cannot depend on the
disease. A framing found in the pixels can: a density threshold fails where the lungs are white, that
is, on the sick (on a pediatric pneumonia set an earlier lung search fell back on 12.9 % of the
pneumonias and 0.06 % of the normals, and the crop box alone predicted the label at AUC 0.85).
Lungs reach close to the film's edges on real films (5 % from the side, 1.5 % from the bottom on
the hand-outlined NIH films of the tests), so a tighter fixed box would cut them.

The paper crops the bounding box of CheXmask's lung masks (HybridGNet, a segmenter that keeps a
plausible lung shape under opacities): pass them with prepare.py --masks (`mask_box`).

`LUNG_REGION` (fractions of the crop's width and height) is a fixed rectangle that holds the
hand-outlined lungs of the tests' NIH films; manifest.csv keeps it per image (with --masks, the mask's
own box). It is 81 % of the crop, shoulders, heart and diaphragm included, so probe.py does not hide it:
it reads the lung fields as `lung_fields` draws them: with --masks the mask itself (prepare.py writes
it into the crop, masks/<id>.png), else two ellipses placed where the lungs of those films lie on
average (approximate: about a third of the crop).
"""
import numpy as np
from PIL import Image, ImageFilter

BORDER = 0.02  # of the film's width and height, cut on every side: the film's edge, markers at its rim
LUNG_REGION = (0.05, 0.03, 0.95, 0.93)  # left, top, right, bottom: fractions of the thorax crop


LUNG_FIELDS = ((0.32, 0.44, 0.18, 0.31), (0.68, 0.44, 0.18, 0.31))  # (cx, cy, rx, ry) of each lung, thorax crop


def lung_fields(lungs, size: int, grow=0.0, mask=None) -> np.ndarray:
    """(size, size) bool: an image's lung fields in its crop, grown by `grow` (a fraction of the crop;
    negative shrinks). `mask`: the image's lung mask in the crop (prepare.py --masks), grown or shrunk
    by whole pixels; else the two LUNG_FIELDS ellipses, carried from the thorax box's LUNG_REGION to
    `lungs`, the image's region in manifest.csv (x0, y0, x1, y1 fractions of the crop)."""
    if mask is not None:
        px = round(abs(grow) * size)
        im = Image.fromarray(mask.astype(np.uint8) * 255)
        if px:
            im = im.filter(ImageFilter.MaxFilter(2 * px + 1) if grow > 0 else ImageFilter.MinFilter(2 * px + 1))
        return np.asarray(im) > 127
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size
    x0, y0, x1, y1 = lungs
    sx, sy = (x1 - x0) / (LUNG_REGION[2] - LUNG_REGION[0]), (y1 - y0) / (LUNG_REGION[3] - LUNG_REGION[1])
    fields = [(((xx - x0 - (cx - LUNG_REGION[0]) * sx) / (rx * sx + grow)) ** 2
               + ((yy - y0 - (cy - LUNG_REGION[1]) * sy) / (ry * sy + grow)) ** 2) <= 1
              for cx, cy, rx, ry in LUNG_FIELDS]
    return fields[0] | fields[1]


def thorax_box(shape) -> tuple:
    """(left, top, right, bottom) of the default crop of an image of `shape` (h, w): the same for every
    film of that size."""
    h, w = shape
    return round(BORDER * w), round(BORDER * h), round((1 - BORDER) * w), round((1 - BORDER) * h)


def resized(img8: np.ndarray, box, size: int) -> np.ndarray:  # the crop, Lanczos-resized (anti-aliased)
    return np.asarray(Image.fromarray(img8).crop(box).resize((size, size), Image.LANCZOS))


def mask_box(mask: np.ndarray, margin=0.05):  # --masks: the mask's box plus 5 % each side
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    h, w = mask.shape
    return (int(max(0, x0 - mx)), int(max(0, y0 - my)), int(min(w, x1 + mx)), int(min(h, y1 + my)))


def region_in_crop(box, lungs) -> tuple:
    """The box `lungs` (film pixels) as fractions of the crop `box` (film pixels), clipped to it."""
    x0, y0, x1, y1 = box
    fx = [min(max((v - x0) / (x1 - x0), 0.0), 1.0) for v in (lungs[0], lungs[2])]
    fy = [min(max((v - y0) / (y1 - y0), 0.0), 1.0) for v in (lungs[1], lungs[3])]
    return round(fx[0], 4), round(fy[0], 4), round(fx[1], 4), round(fy[1], 4)


def rle_mask(rle: str, h: int, w: int) -> np.ndarray:  # CheXmask: 1-based (start, length) pairs, row-major
    runs = np.array(rle.split(), dtype=np.int64)
    flat = np.zeros(h * w, bool)
    for start, length in zip(runs[::2] - 1, runs[1::2]):
        flat[start:start + length] = True
    return flat.reshape(h, w)
