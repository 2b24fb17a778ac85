"""
From a folder of radiographs (DICOM, PNG, JPEG, TIFF) and a label list to cropped 224 px PNGs in
patient-level folds, as in PneumoLLM §4.1: window with the DICOM's own VOI settings, to 8 bits,
crop to the thorax (the film minus a 2 % border; with --masks, the lungs' box), resize.

    python prepare.py --images DIR --labels labels.csv --out data/NAME [--classes normal,disease]
    python prepare.py --demo        # synthetic DICOM phantoms -> data/demo (see demo.py)

Labels are one class per image, or several findings per image written a|b (multi-label: the classes
are the findings, and a "normal"/"No Finding" image has none of them). --classes declares the label
set and its order; without it, two spellings of one label (case, spaces) are an error.

Writes data/NAME/{images/*.png, records.jsonl (one line per image), manifest.csv, meta.json, preview.png},
and with --masks reference/*.png (the thorax framing) and masks/*.png (each lung mask in its crop).
Nothing from the input that could name a patient reaches the folder: images and patients are named
by keyed hashes (HMAC-SHA256) whose key lives outside it (--key-file); the pseudonym -> source file
mapping is written beside the key (or to --mapping), never into the folder.

meta.json also holds a shortcut audit: what the acquisition says per class (view, size, bit depth,
photometric interpretation, manufacturer, model, pixel spacing, lung crop status), and how well a
logistic regression on those attributes alone separates the classes (cross-validated by fold). At
0.65 or more it warns: a model can learn the acquisition instead of the disease.

A folder holds one preparation: a rerun with the same settings adds what is missing and reuses the
rest; other settings are refused (--restart redoes everything); a second run into the same folder
at the same time is refused (a lock file). Lung crop: lungcrop.py (its docstring says where it fails).
"""
import argparse
import csv
import hashlib
import hmac
import json
import os
import secrets
import signal
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw

import audit
import demo
import labels as L
import radiographs as R
from folders import (Data, Help, Interrupted, UserError, changed, cli, encode_labels, lacking, locked, make_folds,
                     refuse_changed, write_atomic, write_csv)

MANIFEST = ("image", "label", "patient", "fold", "crop", "reference", "lungs")  # manifest.csv's columns


# ------------------------------------------------------------------------------------------------
# one image (runs in a worker): crop, resize, and a record of what was done


def load_masks(spec: str) -> dict:
    """--masks: a folder of mask PNGs named like the images, or a CheXmask-style CSV."""
    p = Path(spec)
    if p.is_dir():
        return {m.stem: m for m in p.rglob("*.png")}
    return {Path(r.get("ImageID") or r.get("dicom_id") or r["image"]).stem:
            (r["Left Lung"] + " " + r["Right Lung"], int(r["Height"]), int(r["Width"])) for r in L.read_table(p)[0]}


def prepare_one(job) -> dict:
    """Writes images/<id>.png (and reference/<id>.png where the crop is not the reference framing, and
    masks/<id>.png, the lung mask in the crop, with --masks);
    returns its record (crop status, attributes) for records.jsonl."""
    path, out_png, crop, mask, size, max_pixels, source, key = job
    img, reference, how, attrs = R.preprocess(path, crop, size, mask, max_pixels)
    attrs["pixels"] = hmac.new(key, attrs["pixels"].encode(), hashlib.sha256).hexdigest()[:16]  # keyed: see fingerprint
    lung_mask = attrs.pop("lung_mask", None)  # --masks: the mask in the crop, masks/<id>.png
    if lung_mask is not None:
        Image.fromarray(lung_mask.astype(np.uint8) * 255).save(out_png.parent.parent / "masks" / out_png.name)
    # zlib RLE: fast and small; no text chunks. Half an image (a crash) has no record: it is redone
    Image.fromarray(img).save(out_png, format="PNG", compress_type=3)
    if reference is not None:
        Image.fromarray(reference).save(out_png.parent.parent / "reference" / out_png.name, format="PNG",
                                        compress_type=3)
    return dict(attrs, crop=how, source=source)


def safe_prepare(job):
    try:
        return job, prepare_one(job), None
    except R.Skip as e:
        return job, None, str(e)
    except Exception as e:  # an unexpected failure on one file must not lose the others
        return job, None, f"{type(e).__name__}: {R.first_line(e)}"


# ------------------------------------------------------------------------------------------------
# labels, patients, folds


def pseudonym(key: bytes, kind: str, value: str, n=16) -> str:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:n]


def read_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(32))
        path.chmod(0o600)
    return path.read_bytes()


# ------------------------------------------------------------------------------------------------
# the output folder: one preparation, one writer


def settings_of(opt, key: bytes) -> dict:  # what the images and labels depend on; no paths (they can name patients)
    return dict(crop=opt.crop, size=opt.size, masks=bool(opt.masks), multi_label=bool(opt.multi_label),
                classes=opt.classes or "", folds=opt.folds, seed=opt.seed,
                key=pseudonym(key, "key", "check", 8))  # another --key-file: other pseudonyms, other files


def check_settings(out: Path, opt, key: bytes):
    """Refuse other settings than the folder's (unless --restart, which empties it)."""
    meta = out / "meta.json"
    if meta.exists() and not opt.restart:
        old, new = json.loads(meta.read_text()).get("settings", {}), settings_of(opt, key)
        diff = changed(old, new, () if "key" in old else ("key",))  # a folder prepared before the key was recorded
        refuse_changed(out, "was prepared", old, new, diff, "prepare it again from scratch")


def check_apart(out: Path, images: Path):
    """--out and --images never overlap: a rerun would read its own PNGs as sources, and --restart could
    reach the user's films."""
    o, i = out.resolve(), images.resolve()
    how = "the same folder as" if o == i else "holds" if i.is_relative_to(o) else "inside" if o.is_relative_to(i) \
        else None
    if how:
        raise UserError(f"--out {out}: {how} --images {images}; prepared files and source films must not share a "
                        "folder: pass an --out outside it, e.g. data/NAME")


def empty_for_restart(out: Path, opt):
    """--restart removes what the folder's records say prepare wrote there, and nothing else."""
    if opt.restart:
        ids = set(read_records(out / "records.jsonl")) if (out / "records.jsonl").exists() else set()
        if (out / "manifest.csv").exists():
            with open(out / "manifest.csv", newline="") as f:
                ids |= {Path(r["image"]).stem for r in csv.DictReader(f)}
        for i in ids:
            for sub in ("images", "reference", "masks"):
                (out / sub / f"{i}.png").unlink(missing_ok=True)
        for name in ("records.jsonl", "manifest.csv", "meta.json", "preview.png"):
            (out / name).unlink(missing_ok=True)
    for sub in ("images", "reference", "masks"):
        (out / sub).mkdir(exist_ok=True)


# ------------------------------------------------------------------------------------------------


def contact_sheet(out: Path, rows: list, names: list, per_class=8, tile=112):
    """preview.png: a row of crops per class, the lung fields (what probe.py hides) outlined in green,
    each tile labelled with its pseudonym in white on black."""
    row = tile + 16  # the pseudonym goes under its tile, white on black, covering none of the image
    sheet = Image.new("RGB", (per_class * tile + 120, len(names) * row), 0)
    draw = ImageDraw.Draw(sheet)
    for ci, name in enumerate(names):
        draw.text((6, ci * row + tile // 2), str(name)[:16], fill="white")
        for j, r in enumerate([r for r in rows if L.has(r["label"], name)][:per_class]):
            x, y = 120 + j * tile, ci * row
            with Image.open(out / r["image"]) as im:
                sheet.paste(im.convert("RGB").resize((tile, tile), Image.LANCZOS), (x, y))
            x0, y0, x1, y1 = (float(v) * (tile - 1) for v in r["lungs"].split())
            draw.rectangle([x + x0, y + y0, x + x1, y + y1], outline=(60, 200, 60))
            draw.text((x + 4, y + tile + 2), Path(r["image"]).stem[:12], fill=(255, 255, 255))
    sheet.save(out / "preview.png")


def read_records(log: Path) -> dict:
    """{image id: record} of the images that earlier runs finished. A last line cut off by a crash is
    dropped from the file (its image is redone), so that the next record starts a line of its own."""
    text = log.read_text() if log.exists() else ""
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        log.write_text(text)
    return {r.pop("image"): r for r in map(json.loads, text.splitlines())}


def process(jobs: list, workers: int, log: Path, names: dict) -> tuple:
    """({image id: record}, {image id: why it was skipped}), with a progress line every 2 s. Each record
    is appended to `log` as its image is finished: a run that is stopped loses no finished image. Skips
    name the source file (`names`: id -> file) on the terminal only; meta.json names the pseudonym."""
    done, skipped, t0, last = {}, {}, time.time(), time.time()
    try:
        with Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool, \
                open(log, "a") as f:
            for i, (job, record, err) in enumerate(pool.imap_unordered(safe_prepare, jobs, chunksize=4), 1):
                name = job[1].stem
                if err:
                    skipped[name] = err
                    print(f"skip {names[name]}: {err}", file=sys.stderr)
                else:
                    done[name] = record
                    f.write(json.dumps(dict(record, image=name)) + "\n")
                    f.flush()
                if time.time() - last > 2 or i == len(jobs):
                    rate, last = i / max(time.time() - t0, 1e-9), time.time()
                    print(f"{i}/{len(jobs)} images, {rate:.1f}/s, ETA {(len(jobs) - i) / rate:.0f}s", file=sys.stderr)
    except KeyboardInterrupt:
        raise Interrupted(f"{len(done)} of {len(jobs)} images prepared and kept; run the same command to "
                          "prepare the rest") from None
    return done, skipped


def mapping_path(opt, out: Path, key: bytes) -> Path:
    """Where the pseudonym -> source file CSV goes: beside the key (or --mapping), never in the data
    folder. Its default name holds a keyed hash of the folder's full path: two folders of the same name
    never share one."""
    folder = out.resolve()
    beside_key = Path(opt.key_file).expanduser().parent / f"{folder.name}-{pseudonym(key, 'folder', str(folder), 8)}" \
        ".mapping.csv"
    path = Path(opt.mapping) if opt.mapping else beside_key
    if path.resolve().is_relative_to(folder):
        raise UserError(f"--mapping {path}: inside the data folder {out}; file names can name patients: "
                        "put it elsewhere")
    if not path.parent.is_dir():
        raise UserError(f"--mapping {path}: its folder {path.parent} does not exist; create it or choose another")
    if not os.access(path.parent, os.W_OK) or path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"--mapping {path}: not writable; choose another place (it is written before any image)")
    return path


def run(opt) -> int:
    out = Path(opt.out)
    check_apart(out, Path(opt.images))
    items, names = L.read_labels(opt)
    key_file = Path(opt.key_file).expanduser()
    if key_file.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--key-file {key_file}: inside the data folder {out}; the key must stay outside it")
    key = read_key(key_file)
    mapping = mapping_path(opt, out, key)
    for it in items:
        it["id"], it["source"] = pseudonym(key, "image", it["rel"]), fingerprint(key, it["path"])
    L.same_film(items, "source", "the same file's bytes", opt)  # before any work: copies under two labels
    check_settings(out, opt, key)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out, "prepare.py"):
        empty_for_restart(out, opt)
        return prepare_images(opt, out, items, names, key, mapping)


def prepare_images(opt, out: Path, items: list, names: list, key: bytes, mapping: Path) -> int:
    masks = load_masks(opt.masks) if opt.masks else {}
    for it in items:
        if opt.masks and Path(it["rel"]).stem not in masks:
            raise UserError(f"{opt.masks}: no mask for line {it['line']} of {opt.labels}")
    jobs = [(it["path"], out / "images" / f"{it['id']}.png", opt.crop, masks.get(Path(it["rel"]).stem), opt.size,
             opt.max_pixels, it["source"], key) for it in items]
    log = out / "records.jsonl"
    source = {it["id"]: it["source"] for it in items}
    kept = {i: r for i, r in read_records(log).items() if (out / "images" / f"{i}.png").exists() and i in source}
    before = {i: r for i, r in kept.items() if r.get("source") == source[i] and "pixels" in r}
    changed = len(kept) - len(before)
    jobs = [job for job in jobs if job[1].stem not in before]
    per_class = ", ".join(f"{n}: {sum(L.has(it['label'], n) for it in items)}" for n in names)
    print(f"{len(items)} images ({per_class}): {len(before)} finished before, "
          + (f"{changed} whose source file changed since (prepared again), " if changed else "")
          + f"preparing {len(jobs)} with {opt.workers} workers")
    write_csv(mapping, ["image", "source"], [[it["id"], it["path"]] for it in items])
    done, skipped = process(jobs, opt.workers, log, {it["id"]: it["rel"] for it in items})
    done.update(before)
    kept = [it for it in items if it["id"] in done]
    for it in kept:
        it["pixels"] = done[it["id"]]["pixels"]
    kept = L.same_film(kept, "pixels", "the same pixels", opt)
    if not kept:
        raise UserError(f"nothing was prepared ({len(skipped)} skipped; the reasons are above)")
    return write_outputs(opt, out, kept, names, done, skipped, key, mapping)


def fingerprint(key: bytes, path: Path) -> str:
    """A keyed hash of a source file's size and its first and last MiB: a different file under the same
    name is prepared again. Keyed, so that it cannot confirm that a known file is in the folder."""
    h, size = hmac.new(key, digestmod=hashlib.sha256), path.stat().st_size
    with open(path, "rb") as f:
        h.update(str(size).encode() + f.read(2**20))
        f.seek(max(size - 2**20, 0))
        h.update(f.read(2**20))
    return h.hexdigest()[:16]


def write_outputs(opt, out: Path, kept: list, names: list, done: dict, skipped: dict, key: bytes, mapping) -> int:
    alone = 0
    for it in kept:  # patients: the label file's column, else the DICOM's PatientID, else the image itself
        raw = it["patient"] or R.dicom_patient(it["path"])
        alone += not raw
        it["patient"] = "P" + pseudonym(key, "patient", raw or f"image:{it['rel']}", 12)
        it.update(done[it["id"]], view=it["view"] or done[it["id"]].get("view", ""))
    folds = make_folds([it["patient"] for it in kept], [it["label"] for it in kept], opt.folds, opt.seed,
                       opt.multi_label)
    check_folds(kept, folds, names, opt)
    patients = (f"{alone} of {len(kept)} images have no patient (no --patient-col, no DICOM PatientID): each is "
                "its own patient, so one patient's films can land in training and test folds alike, and the "
                "figures come out optimistic; give the label file a patient column") if alone else "from the label " \
        "file or the DICOMs' PatientID"
    rows = [dict(image=f"images/{it['id']}.png", label=it["label"], patient=it["patient"], fold=f, crop=it["crop"],
                 reference=f"{'images' if it['crop'] == 'thorax' else 'reference'}/{it['id']}.png",
                 lungs=" ".join(f"{v:g}" for v in it["lungs"])) for it, f in zip(kept, folds)]
    manifest = write_csv(out / "manifest.csv", MANIFEST, [[r[k] for k in MANIFEST] for r in rows])
    # what a run pins (train.py's config.json): the rows, their folds, and which source file made each image
    sources = "".join(f"{it['id']} {it['source']}\n" for it in sorted(kept, key=lambda it: it["id"]))
    fingerprint = hashlib.sha256((manifest + sources).encode()).hexdigest()[:16]
    counts = {str(f): {n: sum(r["fold"] == f and L.has(r["label"], n) for r in rows) for n in names}
              for f in range(1, opt.folds + 1)}
    report = audit.shortcut_audit(kept, names, folds, opt.multi_label)
    crops = {n: {c: sum(L.has(it["label"], n) and it["crop"] == c for it in kept)
                 for c in ("thorax", "mask", "none")} for n in names}
    meta = dict(settings=settings_of(opt, key), demo=opt.demo, classes=names, multi_label=opt.multi_label,
                counts=counts, prepared=len(rows), fingerprint=fingerprint, patients=patients, crops=crops,
                skipped=skipped, audit=report,
                versions=dict(numpy=np.__version__, pydicom=pydicom.__version__, pillow=Image.__version__))
    write_atomic(out / "meta.json", json.dumps(meta, indent=1))
    contact_sheet(out, rows, names)
    print(f"{len(rows)} prepared into {out}, {len(skipped)} skipped; pseudonym -> source file: {mapping}")
    print("  crop: " + ("the lung masks' boxes (--masks)" if opt.masks else "the film minus a 2 % border, the same "
                         "rule for every film" if opt.crop == "thorax" else "none, the whole film"))
    for f, c in counts.items():
        size = sum(str(r["fold"]) == f for r in rows)
        print(f"  fold {f}: {size:4d} images  " + "  ".join(f"{n}: {v}" for n, v in c.items()))
    if alone:
        print(f"WARNING: {patients}", file=sys.stderr)
    print(audit.describe(report))
    if note := Data(out).order_note():
        print(note)
    return 0


def check_folds(kept: list, folds: list, names: list, opt):
    """Before anything is written: two classes or more, and every fold holding every class (a test fold
    without one cannot be scored, and a run on it could never finish)."""
    y, folds = encode_labels([it["label"] for it in kept], names, opt.multi_label), np.asarray(folds)
    missed = [(f, n) for f in range(1, opt.folds + 1)
              for n, m in zip(names, lacking(y[folds == f], len(names), opt.multi_label)) if m]
    if missed:
        patients = {n: len({it["patient"] for it in kept if L.has(it["label"], n)}) for n in names}
        what = "images with and without " if opt.multi_label else ""
        said = ", ".join(f"fold {f} has no {what}{n!r}" for f, n in missed[:3])
        raise UserError(f"{said} (patients per class: {patients}): pass fewer --folds (at most the patients of "
                        "the rarest class), or add data")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=Help)
    ap.add_argument("--images", help="folder of DICOM / PNG / JPEG / TIFF files (searched recursively)")
    ap.add_argument("--labels", help="CSV naming each image, its label and optionally its patient and view")
    ap.add_argument("--out", help="output folder, e.g. data/NAME")
    ap.add_argument("--demo", action="store_true", help="write synthetic DICOM phantoms, prepare them (data/demo)")
    ap.add_argument("--classes", help="the label set in order, e.g. normal,pneumoconiosis (default: those found)")
    ap.add_argument("--image-col", help="the label file's column of image names (default: found by name)")
    ap.add_argument("--label-col", help="the label file's column of labels (default: found by name, e.g. label)")
    ap.add_argument("--patient-col", help="the label file's column of patient ids (default: found by name, else "
                    "the DICOM's PatientID, else each image is its own patient)")
    ap.add_argument("--view-col", help="the label file's column of view positions, e.g. AP/PA (default: found by "
                    "name, else the DICOM's ViewPosition)")
    ap.add_argument("--multi-label", action="store_true", help="labels list findings as a|b (automatic with a |)")
    ap.add_argument("--crop", choices=["thorax", "none"], default="thorax",
                    help="thorax: the film minus a 2%% border, the same for every film (lungcrop.py); none: the "
                    "whole film; --masks crops to lung masks instead")
    ap.add_argument("--masks", help="folder of lung-mask PNGs named like the images, or a CheXmask-style CSV")
    ap.add_argument("--folds", type=int, default=5, help="patient-level stratified folds")
    ap.add_argument("--seed", type=int, default=20, help="fold assignment (train.py's --seed too: the paper's)")
    ap.add_argument("--size", type=int, default=224, help="output side in pixels")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes")
    ap.add_argument("--restart", action="store_true", help="empty --out and prepare everything again")
    ap.add_argument("--max-pixels", type=int, default=R.MAX_PIXELS, help="skip images with more pixels than this "
                    "(a film is at most ~15 million; this bounds each worker's memory)")
    ap.add_argument("--key-file", default="~/.config/pneumollm/pseudonym.key",
                    help="secret for pseudonyms; keep it out of the data folder")
    ap.add_argument("--mapping", help="where to write the pseudonym -> source file CSV (default: beside the key)")
    return ap


def main(argv=None):
    opt = parser().parse_args(argv)
    for flag, value, least in (("--folds", opt.folds, 1), ("--workers", opt.workers, 1), ("--size", opt.size, 8)):
        if value < least:
            raise UserError(f"{flag} {value}: give {least} or more")
    if opt.demo and (opt.images or opt.labels):
        raise UserError("--demo writes its own phantoms and labels (into data/demo_dicom); it cannot go with "
                        "--images or --labels: drop them, or drop --demo to prepare your films")
    if opt.demo:
        src = Path("data/demo_dicom")
        demo.write_demo(src)  # the tiny model's encoder is pretrained by train.py --model tiny, once
        opt.images, opt.labels, opt.out = src, src / "labels.csv", opt.out or "data/demo"
    if not (opt.images and opt.labels and opt.out):
        raise UserError("give --images, --labels and --out (or --demo)")
    return run(opt)


if __name__ == "__main__":
    sys.exit(cli(main))
