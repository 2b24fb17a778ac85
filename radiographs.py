"""
Radiographs in, 8-bit crops out: what prepare.py does to every film and score.py to every new one, so
that both see a film exactly alike. DICOM (windowed with the file's own VOI settings, MONOCHROME1
inverted once), PNG/JPEG/TIFF (16-bit and float windowed like a DICOM without VOI), then the crop
(lungcrop.py) and the resize. Also what the file says about its acquisition, for the shortcut audit.
"""
import hashlib
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from lungcrop import LUNG_REGION, mask_box, region_in_crop, resized, rle_mask, thorax_box

IMAGE_SUFFIXES = {".dcm", ".dicom", ".dic", "", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000  # a film is at most ~4300 x 3500: beyond this, a mistake or a decompression bomb


class Skip(Exception):
    """An input that cannot be prepared; the run reports it and goes on."""


def first_line(e: Exception) -> str:  # an error's message, whole but on one line
    return (str(e).strip().splitlines() or [""])[0]


# ------------------------------------------------------------------------------------------------
# reading -> float [0, 1], bright = dense, and what the file says about its acquisition


def read_dicom(path: Path, max_pixels=MAX_PIXELS) -> tuple:
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        raise Skip(f"not readable as DICOM ({type(e).__name__})")
    if "PixelData" not in ds:  # force=True reads anything: say which it is
        with open(path, "rb") as f:
            dicom = f.read(132)[128:] == b"DICM" or "SOPClassUID" in ds or "Modality" in ds
        raise Skip("no pixel data" if dicom else "not a DICOM file")
    pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    if pixels > max_pixels:
        raise Skip(f"{ds.Columns}x{ds.Rows} pixels, more than --max-pixels {max_pixels}")
    if "TransferSyntaxUID" not in ds.file_meta:  # old ACR-NEMA-style file without a meta header
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise Skip(f"colour image ({ds.get('PhotometricInterpretation')}), not a radiograph")
    try:
        arr = ds.pixel_array
    except Exception as e:
        name = ds.file_meta.TransferSyntaxUID.name
        hint = " (needs a decoder plug-in: pip install pylibjpeg pylibjpeg-libjpeg)" if "Lossless" in name else ""
        raise Skip(f"pixel data not decodable: {name}{hint}" if hint or "ompress" in str(e)
                   else f"pixel data not decodable ({first_line(e)})")
    if arr.ndim == 3:  # multi-frame grey: the first frame, as documented
        arr = arr[0]
    if arr.ndim != 2:
        raise Skip(f"pixel array of shape {arr.shape} is not a grey image")
    x = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        y = apply_voi_lut(x, ds, index=0).astype(np.float64)  # the first window when there are several
        ends = np.array([x.min() - 1e6, x.max() + 1e6]).astype(x.dtype if x.dtype.kind == "f" else np.int64)
        lo, hi = sorted(apply_voi_lut(ends, ds, index=0).astype(float))  # the VOI's output range
        y = np.clip((y - lo) / max(hi - lo, 1e-6), 0, 1)
    else:  # no VOI in the file: a robust range
        y = robust_window(x)
    # MONOCHROME1 (low = white) or an INVERSE presentation LUT: either says invert; never twice
    if ds.get("PhotometricInterpretation") == "MONOCHROME1" or ds.get("PresentationLUTShape") == "INVERSE":
        y = 1 - y
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    tag = lambda name: str(ds.get(name, "") or "")  # noqa: E731
    return y, dict(view=tag("ViewPosition"), bits=int(ds.get("BitsStored", 0) or 0),
                   encoding=ds.file_meta.TransferSyntaxUID.name,
                   photometric=tag("PhotometricInterpretation"), manufacturer=tag("Manufacturer"),
                   model=tag("ManufacturerModelName"),
                   spacing=float(spacing[0]) if spacing else None)


def robust_window(x) -> np.ndarray:  # 0.5-99.5 percentiles to [0, 1]: for files that carry no window
    y = np.asarray(x, np.float64)
    lo, hi = np.percentile(y, [0.5, 99.5])
    return np.clip((y - lo) / max(hi - lo, 1e-6), 0, 1)


def read_picture(path: Path, max_pixels=MAX_PIXELS) -> tuple:
    """PNG/JPEG/TIFF. 16-bit and float files are windowed like a DICOM without VOI tags (an 8-bit
    conversion would clip them); colour files are converted to grey; 8-bit grey ones are kept as
    they are (uint8: no window to apply). The size is checked before the pixels are decoded."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise Skip(f"{im.width}x{im.height} pixels, more than --max-pixels {max_pixels}")
            tables = getattr(im, "quantization", None) or {}  # JPEG: lower steps, higher quality
            stored = dict(encoding=" ".join(str(x) for x in (im.format, im.info.get("compression")) if x),
                          jpeg_q=float(np.mean(tables[0])) if 0 in tables else None)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return robust_window(np.asarray(im)), dict(stored, bits=16 if im.mode.startswith("I;16") else 32)
            colour = im.mode not in ("L", "1", "P", "LA") and len(im.getbands()) > 1  # RGB sources, made grey
            return np.asarray(im if im.mode == "L" else im.convert("L")), dict(stored, bits=8, colour=colour)
    except Skip:
        raise
    except Exception as e:
        raise Skip(f"not a readable image ({type(e).__name__})")


def read_image(path: Path, max_pixels=MAX_PIXELS) -> tuple:  # (float in [0, 1] or 8-bit as stored, attributes)
    if path.stat().st_size == 0:
        raise Skip("an empty file (0 bytes)")
    picture = path.suffix.lower() in IMAGE_SUFFIXES - {".dcm", ".dicom", ".dic", ""}
    img, attrs = read_picture(path, max_pixels) if picture else read_dicom(path, max_pixels)
    if min(img.shape) < 8:
        raise Skip(f"image of {img.shape[1]}x{img.shape[0]} pixels is too small")
    return img, dict(attrs, width=img.shape[1], height=img.shape[0],
                     bytes_per_pixel=round(path.stat().st_size / img.size, 4))


def list_images(paths) -> list:
    """The files given, each folder's image files (by suffix) in sorted order in its place."""
    return [f for p in map(Path, paths) for f in (sorted(x for x in p.rglob("*") if x.is_file() and
                                                         x.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p])]


def preprocess(path: Path, crop="thorax", size=224, mask=None, max_pixels=MAX_PIXELS) -> tuple:
    """read -> 8 bits -> crop -> resize. Returns the (size, size) uint8 crop; the reference framing
    (the thorax box, for probe.py) likewise, or None where the crop is that box; how it was
    cropped (thorax, mask, none); the acquisition attributes, with the crop's box (film pixels) and
    the lung fields in the crop (fractions of its width and height)."""
    img, attrs = read_image(path, max_pixels)
    img8 = img if img.dtype == np.uint8 else (img * 255 + 0.5).astype(np.uint8)
    h, w = img8.shape
    thorax = thorax_box(img8.shape)
    if mask is not None:
        m = np.asarray(Image.open(mask)) > 0 if isinstance(mask, Path) else rle_mask(*mask)
        if m.shape[:2] != img8.shape:
            raise Skip(f"mask is {m.shape[:2]}, image is {img8.shape}")
        m = m if m.ndim == 2 else m.any(-1)
        if not m.any():
            raise Skip("its lung mask is empty")
        box, how = mask_box(m), "mask"
        lungs = region_in_crop(box, mask_box(m, margin=0))
        outline = resized(m.astype(np.uint8) * 255, box, size) > 127  # the lung fields in the crop, for probe.py
    elif crop == "thorax":
        box, how, lungs, outline = thorax, "thorax", LUNG_REGION, None
    else:  # the whole film; the lung fields where the thorax crop would put them
        box, how, outline = (0, 0, w, h), "none", None
        tx0, ty0, tx1, ty1 = thorax
        x0, y0, x1, y1 = LUNG_REGION
        lungs = region_in_crop(box, (tx0 + x0 * (tx1 - tx0), ty0 + y0 * (ty1 - ty0),
                                     tx0 + x1 * (tx1 - tx0), ty0 + y1 * (ty1 - ty0)))
    framed = [resized(img8, b, size) for b in (box, thorax)]
    reference = None if how == "thorax" else framed[1]
    extra = {} if outline is None else dict(lung_mask=outline)
    pixels = hashlib.sha256(f"{img8.shape}".encode() + img8.tobytes()).hexdigest()  # the film's decoded 8 bits
    step = max(1, max(h, w) // 512)  # the film re-encoded the same way for every film: what its content costs
    content = round(len(zlib.compress(np.ascontiguousarray(img8[::step, ::step]).tobytes(), 6)) /
                    img8[::step, ::step].size, 4)
    return framed[0], reference, how, dict(attrs, box=[int(v) for v in box], lungs=list(lungs), pixels=pixels,
                                         content_bytes_per_pixel=content, **extra)


def dicom_patient(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True, specific_tags=["PatientID"])
        return str(ds.get("PatientID", "") or "")
    except Exception:
        return ""
