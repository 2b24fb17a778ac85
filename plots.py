"""
The pictures eval.py writes, with Pillow alone: ROC curves (ticks, a bootstrap band, the operating
point), reliability diagrams, explanation overlays and contact sheets, and the probe's occlusion map.
"""
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def frame(title: str, xlabel: str, ylabel: str, size=400, pad=50):
    """A white canvas with a square plot area, ticks at 0, 0.2, .., 1 and a light grid; returns the
    canvas, its drawer and a function from (x, y) in [0, 1] to pixels."""
    im = Image.new("RGB", (size + 2 * pad, size + 2 * pad), "white")
    d = ImageDraw.Draw(im)
    xy = lambda x, y: (pad + x * size, pad + size - y * size)  # noqa: E731
    for v in np.linspace(0, 1, 6):
        d.line([xy(v, 0), xy(v, 1)], fill=(235, 235, 235))
        d.line([xy(0, v), xy(1, v)], fill=(235, 235, 235))
        d.text((xy(v, 0)[0] - 8, pad + size + 6), f"{v:.1f}", fill="black")
        d.text((pad - 28, xy(0, v)[1] - 6), f"{v:.1f}", fill="black")
    d.text((pad, 12), title, fill="black")
    d.text((pad + size // 2 - 40, pad + size + 24), xlabel, fill="black")
    d.text((6, 26), ylabel, fill="black")
    return im, d, xy


def outline(d, xy):  # the plot's border and its diagonal, drawn over the data
    d.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    d.line([xy(0, 0), xy(1, 1)], fill=(150, 150, 150))


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def draw_roc(path: Path, curves: list, title: str, band=None, point=None):
    """curves: [(label, fpr, tpr)], the last drawn thickest; band: (fpr grid, lower, upper) tpr;
    point: (fpr, tpr, label) of the operating point."""
    im, d, xy = frame(title, "1 - specificity", "sensitivity")
    if band is not None:
        grid, lo, hi = band
        d.polygon([xy(f, t) for f, t in zip(grid, hi)] + [xy(f, t) for f, t in zip(grid[::-1], lo[::-1])],
                  fill=(255, 205, 205))
    outline(d, xy)
    for i, (label, fpr, tpr) in enumerate(curves):
        last = i == len(curves) - 1
        colour = (200, 30, 30) if last else COLOURS[i % len(COLOURS)]
        d.line([xy(f, t) for f, t in zip(fpr, tpr)], fill=colour, width=3 if last else 1)
        d.text((xy(0.45, 0)[0], xy(0, 0.05 + 0.06 * (len(curves) - 1 - i))[1]), label, fill=colour)
    if point is not None:
        x, y = xy(point[0], point[1])
        d.ellipse([x - 5, y - 5, x + 5, y + 5], outline="black", width=2)
        d.text((x + 8, y + 4), point[2], fill="black")
    im.save(path)


def draw_reliability(path: Path, score, y, title: str, bins=15):
    im, d, xy = frame(title, "predicted probability", "observed frequency")
    b = np.minimum((np.asarray(score) * bins).astype(int), bins - 1)
    for i in np.unique(b):
        lo, hi = i / bins, (i + 1) / bins
        d.rectangle([xy(lo, y[b == i].mean()), xy(hi, 0)], fill=(120, 160, 220), outline=(40, 70, 140))
        d.text((xy(lo, 0)[0] + 2, xy(0, 1)[1] - 12), str(int((b == i).sum())), fill=(90, 90, 90))
    outline(d, xy)
    d.text((xy(0, 0)[0], xy(0, 0)[1] + 36), "bars: observed frequency per bin; at the top: images in each bin",
           fill="black")
    im.save(path)


def overlay(crop: np.ndarray, heat: np.ndarray, caption: str) -> Image.Image:
    """The grey crop with the map over it (transparent to red to yellow), a colour scale on the right
    (the map's 0 to its peak, 1) and a caption of one or more lines."""
    grey, a = np.stack([crop.astype(float)] * 3, -1), alpha(heat)
    im = Image.fromarray((grey * (1 - a) + colours(heat) * a).astype(np.uint8))
    d = ImageDraw.Draw(im)
    lines = caption.splitlines()
    d.rectangle([0, 0, im.width, 13 * len(lines)], fill=(0, 0, 0))
    for i, line in enumerate(lines):
        d.text((3, 1 + 13 * i), line, fill=(255, 255, 255))
    top, bottom = 13 * len(lines) + 4, im.height - 4  # the scale: 1 at its top, 0 at its bottom
    scale = np.linspace(1, 0, bottom - top)[:, None].repeat(8, 1)
    im.paste(Image.fromarray(colours(scale).astype(np.uint8)), (im.width - 12, top))
    d.text((im.width - 20, top - 1), "1", fill=(255, 255, 255))
    d.text((im.width - 20, bottom - 11), "0", fill=(255, 255, 255))
    return im


def colours(heat: np.ndarray) -> np.ndarray:  # (..., 3) in [0, 255]: black, red, yellow, white
    return 255 * np.stack([np.clip(3 * heat - k, 0, 1) for k in range(3)], -1)


def alpha(heat: np.ndarray) -> np.ndarray:  # (..., 1): how much of the map shows over the image
    return 0.6 * np.clip(heat * 1.5, 0, 1)[..., None]


def sheet(tiles: list, columns=4) -> Image.Image:
    w, h = tiles[0].size
    out = Image.new("RGB", (columns * w, -(-len(tiles) // columns) * h), "white")
    for i, t in enumerate(tiles):
        out.paste(t, ((i % columns) * w, (i // columns) * h))
    return out


def draw_probe(path: Path, mean_crop: np.ndarray, drop: np.ndarray, significant: np.ndarray, lungs: np.ndarray,
               caption: str, scale=2):
    """probe.py's picture: the mean crop, each grid cell tinted red by its AUC drop (its share of the
    largest; none for a drop <= 0), cells that lower the AUC beyond chance framed in red with their drop
    in AUC points, the lung fields' outline in green."""
    size, grid = mean_crop.shape[0] * scale, drop.shape[0]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    heat = np.clip(drop / max(drop.max(), 1e-9), 0, 1)
    index = np.searchsorted(edges, np.arange(size), "right") - 1  # the cell of each pixel row / column
    cells = heat[index][:, index]
    grey = np.kron(mean_crop, np.ones((scale, scale)))
    a = 0.55 * cells[..., None]
    rgb = np.stack([grey] * 3, -1) * (1 - a) + np.array([255.0, 0, 0]) * a
    edge = np.kron(lungs, np.ones((scale, scale), bool))
    edge = edge & ~(np.roll(edge, 1, 0) & np.roll(edge, -1, 0) & np.roll(edge, 1, 1) & np.roll(edge, -1, 1))
    rgb[edge] = (0, 220, 0)
    im = Image.new("RGB", (size, size + 30), "black")
    im.paste(Image.fromarray(rgb.astype(np.uint8)), (0, 30))
    d = ImageDraw.Draw(im)
    for r, c in zip(*np.nonzero(significant)):
        d.rectangle([edges[c], 30 + edges[r], edges[c + 1] - 1, 30 + edges[r + 1] - 1], outline=(255, 60, 60))
        d.text((edges[c] + 3, 30 + edges[r] + 3), f"{100 * drop[r, c]:.0f}", fill=(255, 255, 0))
    for i, line in enumerate(textwrap.wrap(caption, 75)[:2]):
        d.text((3, 2 + 13 * i), line, fill=(255, 255, 255))
    im.save(path)
