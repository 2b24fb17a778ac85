"""
From a folder of radiographs (DICOM, PNG, JPEG) and a label list to cropped 224 px PNGs in
patient-level folds, as in PneumoLLM §4.1: window with the DICOM's own VOI settings, to 8 bits,
crop to the lungs, resize.

    python prepare.py --images DIR --labels labels.csv --out data/NAME
    python prepare.py --demo        # synthetic DICOM phantoms -> data/demo (see demo.py)

Labels are one class per image, or several findings per image written a|b (multi-label: the classes
are the findings, and a "normal"/"No Finding" image has none of them).

Writes data/NAME/{images/*.png, manifest.csv, meta.json, preview.png}. No patient identifier from
the input reaches an output: images and patients are named by keyed hashes (HMAC-SHA256) whose key
lives outside the output folder (--key-file), so the names are stable across runs but cannot be
reversed from the outputs alone.

Lung crop (--crop lungs): on a 256 px copy, dark pixels (below Otsu's threshold) that are not
connected to the image border are the lungs (air outside the body touches the border; air inside
the chest does not); the crop is the box holding the central 98% of them in each direction, plus a
5% margin. It fails when a lung touches the border (tight collimation) or the body does not fill
the frame; then, or when the box is implausibly small, it keeps the whole image and counts a
fallback in meta.json. For better crops pass precomputed masks (--masks).
"""
import argparse
import csv
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFilter
from pydicom.pixels import apply_modality_lut, apply_voi_lut

IMAGE_SUFFIXES = {".dcm", ".dicom", ".dic", "", ".png", ".jpg", ".jpeg"}
IMAGE_COLS, LABEL_COLS = ("image", "file", "filename", "path", "Image Index"), ("label", "class", "diagnosis", "target")
PATIENT_COLS = ("patient", "patient_id", "Patient ID", "subject")
NORMAL_NAMES = {"normal", "no finding", "no_finding", "healthy", "negative", "no"}


class Skip(Exception):
    """An input that cannot be prepared; the run reports it and goes on."""


class UserError(Exception):
    """A mistake in the user's input (a file, a flag): the scripts print its one line and exit with 2."""


# ------------------------------------------------------------------------------------------------
# reading: DICOM through pydicom's own LUT functions, PNG/JPEG through Pillow -> float [0, 1], bright = dense


def read_dicom(path: Path) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        raise Skip(f"not readable as DICOM ({type(e).__name__})")
    if "PixelData" not in ds:
        raise Skip("no pixel data")
    if "TransferSyntaxUID" not in ds.file_meta:  # old ACR-NEMA-style file without a meta header
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise Skip(f"colour image ({ds.get('PhotometricInterpretation')}), not a radiograph")
    try:
        arr = ds.pixel_array
    except Exception as e:
        name = ds.file_meta.TransferSyntaxUID.name
        hint = " (needs a decoder plug-in: pip install pylibjpeg pylibjpeg-libjpeg)" if "Lossless" in name else ""
        raise Skip(f"pixel data not decodable: {name}{hint}" if hint or "ompress" in str(e) else f"pixel data not decodable ({first_line(e)})")
    if arr.ndim == 3:  # multi-frame grey: the first frame, as documented
        arr = arr[0]
    if arr.ndim != 2:
        raise Skip(f"pixel array of shape {arr.shape} is not a grey image")
    x = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        y = apply_voi_lut(x, ds, index=0).astype(np.float64)  # the first window when there are several
        ends = np.array([x.min() - 1e6, x.max() + 1e6]).astype(x.dtype if x.dtype.kind == "f" else np.int64)
        lo, hi = sorted(apply_voi_lut(ends, ds, index=0).astype(float))  # the VOI's output range
    else:  # no VOI in the file: a robust range
        y = x.astype(np.float64)
        lo, hi = np.percentile(y, [0.5, 99.5])
    y = np.clip((y - lo) / max(hi - lo, 1e-6), 0, 1)
    # MONOCHROME1 (low = white) or an INVERSE presentation LUT: either says invert; never twice
    if ds.get("PhotometricInterpretation") == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
        y = 1 - y
    return y


def read_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("L"), dtype=np.float64) / 255
        except Exception as e:
            raise Skip(f"not a readable image ({type(e).__name__})")
    else:
        img = read_dicom(path)
    if min(img.shape) < 8:
        raise Skip(f"image of {img.shape[1]}x{img.shape[0]} pixels is too small")
    return img


# ------------------------------------------------------------------------------------------------
# cropping


def otsu(img: np.ndarray) -> float:
    hist = np.bincount(img.ravel(), minlength=256).astype(float)
    w = np.cumsum(hist)
    mu = np.cumsum(hist * np.arange(256))
    between = (mu[-1] * w - mu * w[-1]) ** 2 / np.maximum(w * (w[-1] - w), 1)
    return float(np.argmax(between))


def lung_box(img8: np.ndarray):
    """Box (left, top, right, bottom) of the lung fields, or None when not found."""
    h, w = img8.shape
    small = Image.fromarray(img8).resize((256, 256), Image.BILINEAR).filter(ImageFilter.BoxBlur(2))
    a = np.asarray(small)
    dark = Image.fromarray(((a < otsu(a)) * 255).astype(np.uint8)).copy()  # own buffer: floodfill writes in place
    for x, y in [(i, 0) for i in range(256)] + [(i, 255) for i in range(256)] + [(0, i) for i in range(256)] + [(255, i) for i in range(256)]:
        if dark.getpixel((x, y)) == 255:  # air outside the body: connected to the border
            ImageDraw.floodfill(dark, (x, y), 0)
    ys, xs = np.nonzero(np.asarray(dark))
    if len(xs) < 0.03 * 256 * 256:
        return None
    (x0, x1), (y0, y1) = np.percentile(xs, [1, 99]), np.percentile(ys, [1, 99])
    if (x1 - x0) < 0.3 * 256 or (y1 - y0) < 0.3 * 256:
        return None
    mx, my = 0.05 * (x1 - x0), 0.05 * (y1 - y0)
    box = (max(0, x0 - mx), max(0, y0 - my), min(256, x1 + mx), min(256, y1 + my))
    return tuple(int(round(v * s / 256)) for v, s in zip(box, (w, h, w, h)))


def mask_box(mask: np.ndarray, margin=0.05):
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


def load_masks(spec: str) -> dict:
    """--masks: a folder of mask PNGs named like the images, or a CheXmask-style CSV."""
    p = Path(spec)
    if p.is_dir():
        return {m.stem: m for m in p.rglob("*.png")}
    out = {}
    with open(p, newline="") as f:
        for row in csv.DictReader(f):
            key = Path(row.get("ImageID") or row.get("dicom_id") or row["image"]).stem
            out[key] = (row["Left Lung"] + " " + row["Right Lung"], int(row["Height"]), int(row["Width"]))
    return out


# ------------------------------------------------------------------------------------------------
# one image (runs in a worker)


def preprocess(path: Path, crop="lungs", size=224, mask=None):
    """read -> 8 bits -> crop -> resize: a (size, size) uint8 array, and whether the lung crop fell back."""
    img8 = (read_image(path) * 255 + 0.5).astype(np.uint8)
    box = None
    if mask is not None:
        m = np.asarray(Image.open(mask)) > 0 if isinstance(mask, Path) else rle_mask(*mask)
        if m.shape[:2] != img8.shape:
            raise Skip(f"mask is {m.shape[:2]}, image is {img8.shape}")
        box = mask_box(m if m.ndim == 2 else m.any(-1))
    elif crop == "lungs":
        box = lung_box(img8)
    im = Image.fromarray(img8)
    im = (im.crop(box) if box else im).resize((size, size), Image.LANCZOS)  # Lanczos: anti-aliased
    return np.asarray(im), crop != "none" and box is None


def prepare_one(job):
    path, out_png, crop, mask, size = job
    if out_png.exists():  # idempotent: finished images are not redone
        return False
    img, fell_back = preprocess(path, crop, size, mask)
    tmp = out_png.with_suffix(".tmp")
    Image.fromarray(img).save(tmp, format="PNG")  # no text chunks: nothing but pixels
    os.replace(tmp, out_png)  # atomic: a crash never leaves half an image
    return fell_back


def safe_prepare(job):
    try:
        return job[0], prepare_one(job), None
    except Skip as e:
        return job[0], None, str(e)
    except Exception as e:  # an unexpected failure on one file must not lose the others
        return job[0], None, f"{type(e).__name__}: {first_line(e)}"


# ------------------------------------------------------------------------------------------------
# labels, patients, folds


def first_line(e: Exception) -> str:  # an error's message, whole but on one line
    return (str(e).strip().splitlines() or [""])[0]


def pseudonym(key: bytes, kind: str, value: str, n=16) -> str:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:n]


def read_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


def pick(cols, given, candidates, what, path):
    if given:
        if given not in cols:
            raise UserError(f"{path}: no column {given!r} (columns: {', '.join(cols)})")
        return given
    found = next((c for c in cols if c in candidates or c.lower() in candidates), None)
    if found is None and what != "patient":
        raise UserError(f"{path}: no {what} column found among {', '.join(cols)}; name it with --{what}-col")
    return found


def read_labels(a):
    """All label-file problems are errors before any work is done."""
    with open(a.labels, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        ic, lc = pick(cols, a.image_col, IMAGE_COLS, "image", a.labels), pick(cols, a.label_col, LABEL_COLS, "label", a.labels)
        pc = pick(cols, a.patient_col, PATIENT_COLS, "patient", a.labels)
        rows = list(reader)
    files = {str(p.relative_to(a.images)): p for p in Path(a.images).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    by_name = {}
    for rel, p in files.items():
        by_name.setdefault(Path(rel).name, []).append(p)
    items, seen = [], set()
    for i, r in enumerate(rows, start=2):
        name, label = (r.get(ic) or "").strip(), (r.get(lc) or "").strip()
        if not label:
            raise UserError(f"{a.labels}:{i}: missing label for {name!r}")
        if name in seen:
            raise UserError(f"{a.labels}:{i}: duplicate row for {name!r}")
        seen.add(name)
        path = files.get(name) or (by_name.get(name) or [None])[0]
        if path is None:
            raise UserError(f"{a.labels}:{i}: no file {name!r} under {a.images}")
        if "|" in label:  # several findings: one canonical order, so that equal sets are equal strings
            label = "|".join(sorted({x.strip() for x in label.split("|") if x.strip()}))
        items.append(dict(path=path, rel=name, label=label, patient=(r.get(pc) or "").strip() if pc else ""))
    if a.multi_label or any("|" in it["label"] for it in items):  # classes are the findings; "normal" is none of them
        a.multi_label = True
        names = sorted({x for it in items for x in it["label"].split("|") if x.lower() not in NORMAL_NAMES})
        return items, names
    names = sorted({it["label"] for it in items}, key=lambda s: (int(s), s) if s.lstrip("-").isdigit() else (s.lower() not in NORMAL_NAMES, s))
    return items, names


def has(label: str, name: str) -> bool:  # single-label: equality; multi-label: one of the findings
    return name in label.split("|")


def dicom_patient(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=["PatientID"])
        return str(ds.get("PatientID", "") or "")
    except Exception:
        return ""


def make_folds(patients: list, labels: list, k: int, seed: int) -> list:
    """Stratified k folds grouped by patient: shuffled patients, largest first, each into the fold
    where its labels are least represented so far. No patient is ever in two folds."""
    classes = sorted(set(labels))
    groups = {}
    for p, y in zip(patients, labels):
        groups.setdefault(p, np.zeros(len(classes)))[classes.index(y)] += 1
    order = list(groups)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda p: -groups[p].sum())
    total = np.maximum(sum(groups.values()), 1)
    counts, fold_of = np.zeros((k, len(classes))), {}
    for p in order:
        cost = (((counts + groups[p]) / total) ** 2).sum(1) + 1e-9 * np.arange(k)
        fold_of[p] = int(np.argmin(cost))
        counts[fold_of[p]] += groups[p]
    return [fold_of[p] + 1 for p in patients]


# ------------------------------------------------------------------------------------------------


def contact_sheet(out: Path, rows: list, names: list, per_class=8, tile=112):
    sheet = Image.new("L", (per_class * tile + 120, len(names) * tile), 0)
    draw = ImageDraw.Draw(sheet)
    for ci, name in enumerate(names):
        draw.text((6, ci * tile + tile // 2), str(name)[:16], fill=255)
        picks = [r for r in rows if has(r["label"], name)][:per_class]
        for j, r in enumerate(picks):
            with Image.open(out / r["image"]) as im:
                sheet.paste(im.resize((tile, tile), Image.LANCZOS), (120 + j * tile, ci * tile))
    sheet.save(out / "preview.png")


def write_atomic(path: Path, text: str):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run(a) -> int:
    out = Path(a.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items, names = read_labels(a)
    key = read_key(Path(a.key_file).expanduser())
    masks = load_masks(a.masks) if a.masks else {}
    jobs = []
    for it in items:
        it["id"] = pseudonym(key, "image", it["rel"])
        mask = masks.get(Path(it["rel"]).stem) if a.masks else None
        if a.masks and mask is None:
            raise UserError(f"{a.masks}: no mask for {it['rel']!r}")
        jobs.append((it["path"], out / "images" / f"{it['id']}.png", a.crop, mask, a.size))
    per_class = ", ".join(f"{n}: {sum(has(it['label'], n) for it in items)}" for n in names)
    print(f"preparing {len(jobs)} images ({per_class}) with {a.workers} workers")
    done, skipped, fallbacks, t0, last = {}, {}, 0, time.time(), time.time()
    with Pool(a.workers) as pool:
        for i, (path, fell_back, err) in enumerate(pool.imap_unordered(safe_prepare, jobs, chunksize=4), 1):
            if err:
                skipped[str(path)] = err
                print(f"skip {path}: {err}", file=sys.stderr)
            else:
                done[path], fallbacks = True, fallbacks + bool(fell_back)
            if time.time() - last > 2 or i == len(jobs):
                rate, last = i / max(time.time() - t0, 1e-9), time.time()
                print(f"{i}/{len(jobs)} images, {rate:.1f}/s, ETA {(len(jobs) - i) / rate:.0f}s", file=sys.stderr)
    kept = [it for it in items if it["path"] in done]
    if not kept:
        print(f"nothing was prepared ({len(skipped)} skipped)", file=sys.stderr)
        return 1
    for it in kept:  # patients: the label file's column, else the DICOM's PatientID, else the image itself
        raw = it["patient"] or dicom_patient(it["path"]) or f"image:{it['rel']}"
        it["patient"] = "P" + pseudonym(key, "patient", raw, 12)
    folds = make_folds([it["patient"] for it in kept], [it["label"] for it in kept], a.folds, a.seed)
    rows = [dict(image=f"images/{it['id']}.png", label=it["label"], patient=it["patient"], fold=f) for it, f in zip(kept, folds)]
    write_atomic(out / "manifest.csv", "image,label,patient,fold\n" + "".join(f"{r['image']},{r['label']},{r['patient']},{r['fold']}\n" for r in rows))
    counts = {str(f): {n: sum(r["fold"] == f and has(r["label"], n) for r in rows) for n in names} for f in range(1, a.folds + 1)}
    settings = {k: str(v) for k, v in vars(a).items() if k not in ("key_file",)}
    meta = dict(settings=settings, classes=names, multi_label=a.multi_label, counts=counts, prepared=len(rows), crop_fallbacks=fallbacks,
                skipped=skipped, versions=dict(numpy=np.__version__, pydicom=pydicom.__version__, pillow=Image.__version__))
    write_atomic(out / "meta.json", json.dumps(meta, indent=1))
    contact_sheet(out, rows, names)
    print(f"{len(rows)} prepared into {out}, {len(skipped)} skipped, {fallbacks} crop fallbacks (whole image kept)")
    for f, c in counts.items():
        print(f"  fold {f}: {sum(c.values()):4d} images  " + "  ".join(f"{n}: {v}" for n, v in c.items()))
    for path, err in skipped.items():
        print(f"  skipped {path}: {err}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--images", help="folder of DICOM / PNG / JPEG files (searched recursively)")
    ap.add_argument("--labels", help="CSV naming each image, its label and optionally its patient")
    ap.add_argument("--out", help="output folder, e.g. data/NAME")
    ap.add_argument("--demo", action="store_true", help="write synthetic DICOM phantoms and prepare them into data/demo")
    ap.add_argument("--image-col", help="the label file's column of image names (default: found by name, e.g. image)")
    ap.add_argument("--label-col", help="the label file's column of labels (default: found by name, e.g. label)")
    ap.add_argument("--patient-col", help="the label file's column of patient ids (default: found by name, else the DICOM's "
                    "PatientID, else each image is its own patient)")
    ap.add_argument("--multi-label", action="store_true", help="labels list findings as a|b (automatic when a label has |)")
    ap.add_argument("--crop", choices=["lungs", "none"], default="lungs", help="crop to the lungs (see the docstring) or not")
    ap.add_argument("--masks", help="folder of lung-mask PNGs named like the images, or a CheXmask-style CSV")
    ap.add_argument("--folds", type=int, default=5, help="patient-level stratified folds")
    ap.add_argument("--seed", type=int, default=20, help="fold assignment (train.py's --seed is 20 too: the paper's seed)")
    ap.add_argument("--size", type=int, default=224, help="output side in pixels")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes")
    ap.add_argument("--key-file", default="~/.config/pneumollm/pseudonym.key", help="secret for pseudonyms; keep it out of the data folder")
    return ap


def main(argv=None):
    ap = parser()
    a = ap.parse_args(argv)
    if a.demo:
        import demo
        src = Path(a.images or "data/demo_dicom")
        demo.write_demo(src)
        a.images, a.labels, a.out = src, src / "labels.csv", a.out or "data/demo"
    if not (a.images and a.labels and a.out):
        ap.error("give --images, --labels and --out (or --demo)")
    for flag, value, least in (("--folds", a.folds, 1), ("--workers", a.workers, 1), ("--size", a.size, 8)):
        if value < least:
            raise UserError(f"{flag} {value}: give {least} or more")
    return run(a)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
