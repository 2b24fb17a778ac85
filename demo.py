"""
A synthetic but realistic demo set for `python prepare.py --demo`: posterior-anterior chest
phantoms written as real DICOM files, normal vs pneumoconiosis-like.

    python demo.py data/demo_dicom                       # what prepare.py --demo writes
    python demo.py data/shortcut_dicom --shortcut corner # diseased films carry a bright marker

Each phantom has a body outline, two lung fields with smooth parenchymal texture, a heart and
mediastinum, a spine, ribs and clavicles, detector noise; each is exposed and framed its own way, as
NIH's films are (densities, a display curve, the body's place and size; docs/demo.md). Disease follows the ILO classification of
pneumoconiosis: small rounded opacities of one size class per patient (p, q, r; NODULE_RADIUS_MM),
a profusion category from 1 to 3.5, and the zones of each lung filled upper first (phantom()), at
random places within each zone. Files vary as real archives do: CR or DX,
MONOCHROME1 or MONOCHROME2, 12-16 bits stored, with or without window tags, 1-3 images per patient.
The window is set from the anatomy, as an exposure would be, never from the opacities, and they
stay fainter than the heart, so neither the window nor a percentile range of the pixels depends on
the disease: a model cannot learn the diagnosis from the contrast. Patients get obviously fake
names and ids (DEMO^...). Deterministic. truth.npz records each image's lung box, opacity and marker masks,
for tests (nothing else reads it).

--shortcut corner plants what a model must not read: a bright "L" in the bottom left corner of every
diseased film, outside the lung fields (lungcrop.LUNG_REGION) but inside the crop; probe.py
must catch a model trained on it. --shortcut lungs puts it inside the left lung, where the probe
hides it: a model that reads it reads the lungs, and the probe must stay quiet. Its 368 pixels are
fewer than the 0.5 % of the film above the percentile window, so the window does not move.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from folders import write_csv

SIZE, SPACING = 512, 0.7  # pixels, mm per pixel
SHIFT_SD, SCALE_SD, EDGE_MM = 28, 0.1, 2.1  # the body's place (px) and size vary as NIH's films do; edges blurred
SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
NODULE_RADIUS_MM = {"p": (0.6, 0.75), "q": (0.75, 1.5), "r": (1.5, 3.0)}  # ILO: diameters < 1.5, 1.5-3, 3-10 mm
OPACITIES_PER_ZONE = 70  # per zone of each lung and profusion category


def ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def smooth_noise(rng, n, scale):
    small = rng.standard_normal((n, n)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC)) * scale


ZONES = 3  # ILO: each lung in upper, middle and lower thirds


def zones_of(lungs: np.ndarray) -> np.ndarray:
    """(SIZE, SIZE) int: 0 outside the lungs, 1-3 upper, middle, lower third of the lungs' height."""
    rows = np.nonzero(lungs.any(1))[0]
    third = (np.arange(SIZE) - rows[0]) * ZONES // (rows[-1] + 1 - rows[0])
    return np.where(lungs, np.clip(third, 0, ZONES - 1)[:, None] + 1, 0)


def spots(rng, img, base, where: np.ndarray, n: int, radius_mm: tuple, height: float) -> np.ndarray:
    """Adds to img n round gaussian opacities (radius drawn in mm) centred at random pixels of `where`;
    overlapping ones do not pile up (each is added to `base`, img without them). Returns their mask."""
    mask = np.zeros(img.shape, bool)
    py, px = np.nonzero(where) if n else ((), ())
    for _ in range(n if len(py) else 0):
        i = rng.integers(len(py))
        r = rng.uniform(*radius_mm) / SPACING
        y, x, h = py[i], px[i], int(3 * r) + 2
        sl = np.s_[max(0, y - h):min(y + h, img.shape[0]), max(0, x - h):min(x + h, img.shape[1])]
        yy, xx = np.ogrid[sl]
        bump = height * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (r / 1.5) ** 2))
        img[sl] = np.maximum(img[sl], base[sl] + bump)
        mask[sl] |= bump > 0.05
    return mask


def blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """A gaussian blur (sigma in pixels, edges replicated), one axis after the other; float32."""
    r = int(3 * sigma) + 1
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2)).astype(np.float32)
    img = np.asarray(img, np.float32)
    for axis in (0, 1):
        pad, out = np.pad(img, [(r, r) if a == axis else (0, 0) for a in (0, 1)], mode="edge"), np.zeros_like(img)
        for i, w in enumerate(k / k.sum()):
            out += w * (pad[i:i + len(img)] if axis == 0 else pad[:, i:i + img.shape[1]])
        img = out
    return img


def phantom(rng, profusion=0.0, size_class="q", heart=1.0) -> tuple:
    """Attenuation images in [0, 1] (bright = dense), (SIZE, SIZE) float32, with and without the
    opacities (the second sets the window); the lung fields and the opacities as (SIZE, SIZE) masks;
    and the anatomy that pretrain() learns to describe: the body's shift, its scale, the heart's size.

    profusion: the ILO major category (0 normal; 1-3, fractions are subcategories). Small rounded
    opacities of one size class fill the upper zones first: zone z (1 upper .. 3 lower) of each lung
    gets OPACITIES_PER_ZONE * (profusion - z + 1) of them, none below 0."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    c, s = SIZE / 2 + rng.normal(0, SHIFT_SD), SIZE / 512 * np.clip(1 + rng.normal(0, SCALE_SD), 0.75, 1.25)
    room = SIZE / 2 - 35 - 162 * s  # the lungs' outer edges (c -+ 162 s) stay 35 px inside the film's sides,
    c = np.clip(c, SIZE / 2 - room, SIZE / 2 + room)  # inside lungcrop.LUNG_REGION, as a chest is framed
    tissue, lung, gamma = rng.uniform(0.45, 0.62), rng.uniform(0.10, 0.30), rng.uniform(0.7, 1.4)  # body, exposure
    img = np.where(ellipse(yy, xx, 270, c, 250 * s, 215 * s), tissue, 0.04).astype(np.float32)
    lungs = np.zeros_like(img, bool)
    for side in (-1, 1):
        lungs |= ellipse(yy, xx, 225 + rng.normal(0, 5), c + side * 92 * s, 150 * s, 70 * s)
    lungs &= yy > 80
    img[lungs] = lung
    tilt = rng.normal(0, 0.04) * (yy - 225) / 150  # density that varies slowly over each lung, as vessels give
    img += lungs * (smooth_noise(rng, 24, 0.03) + smooth_noise(rng, 4, 0.04) + tilt)
    for side in (-1, 1):  # ribs: arcs across each lung field (drawn within its bounding box); clavicles on top
        field = lungs & (side * (xx - c) > 0)
        rows, cols = np.nonzero(field.any(1))[0], np.nonzero(field.any(0))[0]
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        y, x, field = yy[box], xx[box], field[box]
        arc, tilt = 0.0025 * (x - c - side * 40) ** 2, side * 0.15 * (x - c)
        for k in range(9):
            y0 = 100 + 30 * k + rng.normal(0, 2)
            img[box] += 0.09 * ((np.abs(y - (y0 + arc + tilt)) < 4.5) & field)
        img += 0.15 * ellipse(yy, xx, 95, c + side * 80 * s, 7, 75 * s)
    img = np.maximum(img, 0.68 * ellipse(yy, xx, 320, c + 25, 95 * s * heart, 85 * s * heart))
    img = np.maximum(img, 0.62 * (np.abs(xx - c) < 28 * s) * (yy > 40))  # mediastinum and spine
    noise = rng.normal(0, rng.uniform(0.003, 0.015), img.shape).astype(np.float32)  # the detector's
    anatomy = blur(img, EDGE_MM / SPACING) + noise
    img = anatomy.copy()
    zones, opacities = zones_of(lungs), np.zeros_like(lungs)
    for z in range(1, ZONES + 1):
        n = round(OPACITIES_PER_ZONE * max(0.0, profusion - z + 1))
        for side in (-1, 1):  # each lung
            zone = (zones == z) & (side * (xx - c) > 0)
            opacities |= spots(rng, img, anatomy, zone, n, NODULE_RADIUS_MM[size_class], 0.3)
    img, anatomy = (np.clip(a, 0, 1) ** gamma for a in (img, anatomy))  # a display curve per film
    return img, anatomy, lungs, opacities, (c - SIZE / 2, s, heart)


def to_dicom(path: Path, img: np.ndarray, anatomy: np.ndarray, rng, patient: int, image: int):
    modality = "CR" if rng.random() < 0.5 else "DX"
    mono1, bits = rng.random() < 0.4, int(rng.choice([12, 14, 15, 16]))
    top = 2**bits - 1
    gain = top * rng.uniform(0.8, 1.0)
    stored, plain = (np.round(a * gain).astype(np.uint16) for a in (img, anatomy))
    if mono1:
        stored, plain = (top - stored).astype(np.uint16), (top - plain).astype(np.uint16)
    meta = FileMetaDataset()
    uid = generate_uid(entropy_srcs=[f"demo-{patient}-{image}"])
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SOP_CLASS[modality], uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASS[modality], uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"demo-study-{patient}-{image}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"demo-series-{patient}-{image}"])
    ds.PatientName, ds.PatientID = f"DEMO^PATIENT{patient:04d}", f"DEMO{patient:04d}"
    ds.PatientBirthDate, ds.PatientSex = f"19{50 + patient % 40}0101", "MF"[patient % 2]
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", "PA"
    ds.StudyDate, ds.AccessionNumber = f"2024{1 + image:02d}15", f"DEMOACC{patient:04d}{image}"
    ds.Rows, ds.Columns, ds.PixelSpacing = SIZE, SIZE, [SPACING, SPACING]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if rng.random() < 0.6:  # a window over the anatomy's range; else the reader falls back to percentiles
        lo, hi = np.percentile(plain, [1, 99.5])
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.1f}", f"{hi - lo:.1f}"
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


MARKER_AT = {"corner": (472, 14), "lungs": (200, 150)}  # (top, left) of the "L" in film pixels


def marker(img: np.ndarray, where: str) -> tuple:
    """--shortcut: a bright "L", 28 px (5 % of the film) tall. "corner": the film's bottom left corner,
    beside and below the lung fields that probe.py hides but inside the thorax crop (lungcrop.py: film
    2-98 %, lung fields 3-93 % of the crop). "lungs": inside the left lung field, where the probe hides
    it. Returns the film and the marker's mask."""
    (y, x), mask = MARKER_AT[where], np.zeros(img.shape, bool)
    mask[y:y + 28, x:x + 8] = mask[y + 20:y + 28, x:x + 26] = True
    return np.where(mask, 1.0, img), mask


def write_demo(folder: Path, n_patients=330, seed=20, shortcut=None) -> Path:
    """About 600 images, ~60 % disease; returns the labels CSV. Skips work already on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = folder / "labels.csv"
    if labels.exists():
        return labels
    rng = np.random.default_rng(seed)
    rows, truth = [], dict(names=[], lung_boxes=[], opacities=[], markers=[])
    print(f"writing {n_patients} synthetic patients (1-3 DICOMs each, ~1 MB a file) to {folder}"
          + (f" with a marker ({shortcut}) on every diseased film" if shortcut else ""), file=sys.stderr)
    for p in range(n_patients):
        if p and p % 50 == 0:
            print(f"  {p}/{n_patients} patients", file=sys.stderr)
        disease = rng.random() < 0.6
        size_class, profusion = str(rng.choice(list("pqr"))), disease * rng.uniform(1, 3.5)
        for i in range(int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))):
            name = f"demo_{p:04d}_{i}.dcm"
            img, anatomy, lungs, opacities, _ = phantom(rng, profusion, size_class)
            mark = np.zeros(img.shape, bool)
            if shortcut and disease:
                img, mark = marker(img, shortcut)
            to_dicom(folder / name, img, anatomy, rng, p, i)
            rows.append((name, "pneumoconiosis" if disease else "normal"))
            ys, xs = np.nonzero(lungs)
            truth["names"].append(name)
            truth["lung_boxes"].append((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))  # left top right bottom
            truth["opacities"].append(np.packbits(opacities))
            truth["markers"].append(np.packbits(mark))
    # for the tests only (prepare.py and the model never read it): where the lungs and opacities are
    np.savez_compressed(folder / "truth.npz", **{k: np.array(v) for k, v in truth.items()})
    write_csv(labels, ("image", "label"), rows)  # patients come from the DICOM tags
    print(f"wrote {len(rows)} DICOMs of {n_patients} patients ({sum(r[1] != 'normal' for r in rows)} diseased)",
          file=sys.stderr)
    return labels


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    ap.add_argument("out", help="folder for the DICOMs and labels.csv, e.g. data/demo_dicom")
    ap.add_argument("--patients", type=int, default=330, help="synthetic patients, 1-3 films each (default 330)")
    ap.add_argument("--seed", type=int, default=20, help="another seed writes other patients: a second site for "
                    "external.py --data (default 20)")
    ap.add_argument("--shortcut", choices=list(MARKER_AT), help="a bright marker on every diseased film, in the "
                    "film's corner (outside the lung fields) or in a lung; for probe.py")
    return ap


def main(argv=None) -> int:
    opt = parser().parse_args(argv)
    labels = write_demo(Path(opt.out), opt.patients, opt.seed, opt.shortcut)
    print(f"prepare it: python prepare.py --images {opt.out} --labels {labels} --out data/NAME")
    return 0


if __name__ == "__main__":
    sys.exit(main())
