"""
Tensor files read without running code: torch.save's (weights only) and TorchScript archives, such as
OpenAI's ViT-L-14.pt, which torch.jit.load would run. pneumollm.py's loaders read every pickle-based
checkpoint through these two functions, and safetensors files (which hold no code) through
read_safetensors; train.py's resume point goes through read_tensors too.
"""
import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given; the message names the file (scripts print one line)."""


def read_tensors(path: Path) -> dict:
    """torch.load of tensors only, memory-mapped where it can be (torch.save's zip, not an old plain pickle);
    a file that would build anything else (run code), or a damaged one, is refused in one line."""
    try:
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except OSError as e:  # missing, unreadable: said as the system says it
        raise CheckpointError(f"{path}: {e.strerror or type(e).__name__}; not loaded") from None
    except Exception:
        try:  # which globals it would import, read without unpickling (torch.save's zip format only)
            foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            foreign = []
        kind = f"holds code-bearing objects ({foreign[0]})" if foreign else "is not a plain tensor checkpoint"
        raise CheckpointError(f"{path}: {kind}; not loaded") from None


_SAFETENSORS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def read_safetensors(path: Path) -> dict:
    """A safetensors file's tensors, memory-mapped (copy-on-write: the file is never written), found from
    its header alone: safetensors' own reader reads each tensor's first pages as it hands it out, which
    from a cold disk cost 9 ms a tensor (2.7 s for LLaMA-7B's 291) before anything else could start. The
    format: 8 bytes (the header's length, little-endian), a JSON header {name: {dtype, shape,
    data_offsets}} (offsets from the end of the header), then the data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 8 + n <= size else None
    except OSError as e:
        raise CheckpointError(f"{path}: {e.strerror or type(e).__name__}; not loaded") from None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (no JSON header); not loaded")
    raw, out = np.memmap(path, np.uint8, "c") if size > 8 + n else None, {}
    for key, h in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = _SAFETENSORS[h["dtype"]], [int(s) for s in h["shape"]], h["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r} is {h!r}, not a dtype this reader knows "
                                  f"({', '.join(_SAFETENSORS)}), shape and data offsets; not loaded") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= start <= end <= size - 8 - n or end - start != nbytes or min(shape, default=0) < 0:
            raise CheckpointError(f"{path}: tensor {key!r} ({h['dtype']} {shape}) claims bytes {start} to {end} "
                                  f"of {size - 8 - n}; the file is damaged or truncated; not loaded")
        out[key] = torch.from_numpy(raw[8 + n + start:8 + n + end]).view(dtype).reshape(shape) if nbytes \
            else torch.empty(shape, dtype=dtype)
    return out


_STORAGES = {f"torch.{n}Storage": getattr(torch, d) for n, d in zip(  # a storage class stands for its dtype
    "Half BFloat16 Float Double Int Long Short Char Byte Bool".split(),
    "float16 bfloat16 float32 float64 int32 int64 int16 int8 uint8 bool".split())}
MAX_DEPTH = 64  # nested modules in a TorchScript archive (CLIP's: 6)


class _Inert:  # stands in for a TorchScript class (`__torch__.*`): keeps its pickled state, runs nothing
    def __setstate__(self, state):
        self.state = state


class _Refused(Exception):
    """What makes an archive unsafe or inconsistent; read_torchscript names the file."""


def _view(storage: torch.Tensor, offset: int, size, stride, *_) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2, for a view that must lie inside its storage, with no stride 0."""
    if len(size) != len(stride) or min([offset, *size, *stride]) < 0:
        raise _Refused(f"a tensor view of size {tuple(size)}, stride {tuple(stride)}, offset {offset}")
    if any(s == 0 and n > 1 for n, s in zip(size, stride)):
        raise _Refused(f"a tensor view with a stride of 0 (size {tuple(size)}): one value repeated")
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.numel():
        raise _Refused(f"a tensor view of size {tuple(size)} past the end of its storage ({storage.numel()})")
    return storage.as_strided(size, stride, offset)


class _TorchScriptReader(pickle.Unpickler):
    """An archive's data.pkl, building only tensors (_view), OrderedDicts and _Inert stand-ins for the
    archive's own classes; any other global is refused. Each data/ record is memory-mapped once."""

    def __init__(self, archive: zipfile.ZipFile, raw, prefix: str):
        super().__init__(archive.open(prefix + "data.pkl"))
        self.archive, self.raw, self.prefix, self.storages = archive, raw, prefix, {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):  # the archive's own classes, top-level too
            return _Inert
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _view
        if f"{module}.{name}" in _STORAGES:
            return _STORAGES[f"{module}.{name}"]
        raise _Refused(f"holds code-bearing objects ({module}.{name})")

    def persistent_load(self, pid):  # ('storage', dtype, record, location, numel) -> flat tensor, once per record
        _, dtype, key, _, numel = pid
        if key not in self.storages:
            self.storages[key] = self._record(str(key), dtype, int(numel))
        return self.storages[key]

    def _record(self, key: str, dtype, numel: int) -> torch.Tensor:  # copy-on-write: the file is never written
        info = self.archive.getinfo(f"{self.prefix}data/{key}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Refused(f"record {key} is compressed (TorchScript stores records as they are)")
        size = numel * torch.empty(0, dtype=dtype).element_size()
        if info.file_size != size:
            raise _Refused(f"record {key} holds {info.file_size} bytes, its storage declares {size}")
        if not size:
            return torch.empty(0, dtype=dtype)
        self.raw.seek(info.header_offset + 26)  # the local header: 30 bytes, then the name and the extra field
        start = info.header_offset + 30 + sum(struct.unpack("<HH", self.raw.read(4)))
        return torch.from_numpy(np.memmap(self.raw, np.uint8, "c", start, (size,))).view(dtype)


def _module_tensors(obj, at="", depth=0) -> dict:  # the stand-ins' tensor attributes, by module path
    if depth > MAX_DEPTH:
        raise _Refused(f"modules nested more than {MAX_DEPTH} deep (a cycle?)")
    state = obj.state if isinstance(getattr(obj, "state", None), dict) else {}
    out = {at + k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for k, v in state.items():
        out.update(_module_tensors(v, f"{at}{k}.", depth + 1) if isinstance(v, _Inert) else {})
    return out


def read_torchscript(path: Path) -> Optional[dict]:
    """Every tensor of a TorchScript archive (OpenAI's ViT-L-14.pt) by module path, or None if `path` is
    not one, read without running any of it (torch.jit.load would run the archive's code)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        top = [n for n in archive.namelist() if n.count("/") == 1]  # <name>/data.pkl, <name>/constants.pkl, ...
        if not any(n.endswith("/constants.pkl") for n in top):
            return None  # a zip from torch.save, for read_tensors
        pkl = next((n for n in top if n.endswith("/data.pkl")), None)
        try:
            if pkl is None:
                raise _Refused("a TorchScript archive without data.pkl")
            return _module_tensors(_TorchScriptReader(archive, raw, pkl[:-len("data.pkl")]).load())
        except _Refused as e:
            raise CheckpointError(f"{path}: {e}; not loaded") from None
        except Exception as e:  # a damaged archive: one line
            raise CheckpointError(f"{path}: not a readable TorchScript archive ({type(e).__name__})") from None
