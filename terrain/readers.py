"""Read a model's weights one tensor at a time, without instantiating the model.

A Hugging Face folder keeps its weights in safetensors shards (model.safetensors, or
model-0000i-of-0000n.safetensors listed by model.safetensors.index.json). A safetensors file
is an 8-byte header length, a JSON header (dtype, shape and byte range of each tensor) and the
raw little-endian data; nothing in it can run code. `SafetensorsWeights` parses the headers,
checks every byte range against the file sizes (so a truncated or missing shard is one clear
error before any work), and reads a tensor with a plain seek + read into a float32 array,
converting bfloat16 / float16 exactly. Peak memory is the tensor being read, whatever the
size of the checkpoint; nothing is memory-mapped, so the resident size stays small.

Folders with only pickled weights (pytorch_model.bin) fall back to torch.load(weights_only=True)
with mmap, which refuses anything but plain tensors, and a one-line note about memory.
`ModuleWeights` gives the same interface over an instantiated torch module (open_clip towers,
tests, models already in memory).
"""
from __future__ import annotations

import math
import os
import struct
import sys

import numpy as np

import safeio
from terrain.errors import TerrainError

# safetensors dtype -> (numpy dtype of the stored bytes, bytes per element)
_DTYPES = {"F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
           "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
           "U8": (np.uint8, 1), "BOOL": (np.bool_, 1)}
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # bytes of JSON header accepted (the safetensors library's own limit)
_FIX = "re-download the model folder (huggingface-cli download ID --local-dir DIR) or pass another --model"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_header(raw: bytes, shard: str, size: int) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """The tensors of one safetensors header, every field checked at the boundary:
    name -> (dtype, shape, begin, end) with begin/end absolute byte offsets in the file.
    A header that is not an object of objects, an unknown dtype, a shape that is not a list of
    non-negative integers, byte offsets that are not two integers 0 <= a <= b, whose length is
    not the shape's element count times the item size (products in Python integers: no
    overflow), that run past the end of the file or overlap another tensor's: one line naming
    the file and the tensor."""
    header = safeio.parse_json(raw, f"the safetensors header of {shard}")
    if not isinstance(header, dict):
        raise TerrainError(f"{shard}: the safetensors header is a JSON {type(header).__name__}, not an object; {_FIX}")
    start = 8 + len(raw)
    out, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise TerrainError(f"{shard}: the safetensors __metadata__ must map names to strings; {_FIX}")
            continue
        where = f"{shard}: tensor {name[:120]!r}"
        if not isinstance(info, dict):
            raise TerrainError(f"{where} is described by a JSON {type(info).__name__}, not an object; {_FIX}")
        dt = info.get("dtype")
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise TerrainError(f"{where} has dtype {dt!r:.40}; supported: {', '.join(_DTYPES)}")
        shape = info.get("shape")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise TerrainError(f"{where}: its shape must be a list of non-negative integers, got {shape!r:.80}; {_FIX}")
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise TerrainError(f"{where}: data_offsets must be two integers 0 <= begin <= end, got {offsets!r:.80}; "
                               f"{_FIX}")
        a, b = offsets
        need = math.prod(shape) * _DTYPES[dt][1]
        if b - a != need:
            raise TerrainError(f"{where}: its byte range holds {b - a:,} bytes but shape {shape} of {dt} needs "
                               f"{need:,}; {_FIX}")
        if start + b > size:
            raise TerrainError(f"{shard} is truncated: tensor {name[:120]!r} ends at byte {start + b:,} but the file "
                               f"has {size:,} bytes; {_FIX}")
        out[name] = (dt, tuple(shape), start + a, start + b)
        if b > a:
            spans.append((a, b, name))
    spans.sort()
    for (a0, b0, n0), (a1, b1, n1) in zip(spans, spans[1:]):
        if a1 < b0:
            raise TerrainError(f"{shard}: the bytes of tensors {n0[:80]!r} and {n1[:80]!r} overlap; {_FIX}")
    return out


class SafetensorsWeights:
    """Tensor-by-tensor reader over the safetensors shards of one folder (or one file)."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute offset, nbytes)
        shards = shard_files(path)
        for shard in shards:
            self._read_header(shard)
        if not self.entries:
            raise TerrainError(f"no tensors in {', '.join(shards[:3]) or 'the safetensors files of ' + path}; {_FIX}")

    def _read_header(self, shard: str) -> None:
        try:
            size = os.path.getsize(shard)
            with open(shard, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise TerrainError(f"{shard} is truncated (no safetensors header); {_FIX}")
                (n,) = struct.unpack("<Q", raw)
                if n < 2 or n > size - 8 or n > MAX_HEADER:
                    raise TerrainError(f"{shard} is not a valid safetensors file (header length {n:,}, file size "
                                       f"{size:,}); {_FIX}")
                raw = f.read(n)
        except OSError as e:
            raise TerrainError(f"cannot read {shard}: {e.strerror or e}") from None
        for name, (dt, shape, a, b) in parse_header(raw, shard, size).items():
            if name in self.entries:
                raise TerrainError(f"tensor {name[:120]!r} is stored twice (in {self._where[name][0]} and {shard}); "
                                   f"{_FIX}")
            self.entries[name] = shape
            self.dtypes[name] = dt
            self._where[name] = (shard, a, b - a)

    def integer_names(self) -> set[str]:
        """Tensors of integer or boolean type: buffers such as position ids, not parameters."""
        return {n for n, dt in self.dtypes.items() if dt == "BOOL" or dt[0] in "IU"}

    def nbytes(self, name: str, itemsize: int = 4) -> int:
        """Bytes of the tensor once converted to itemsize-byte floats (Python integers)."""
        return math.prod(self.entries[name]) * itemsize

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (bfloat16 and float16 convert exactly)."""
        return self.read_rows(name, 0, self.entries[name][0] if self.entries[name] else 1)

    def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows a:b (along the first axis) of the tensor as float32, reading only their bytes."""
        file, offset, nbytes = self._where[name]
        shape = self.entries[name]
        np_dtype, width = _DTYPES[self.dtypes[name]]
        rows = shape[0] if shape else 1
        if not 0 <= a <= b <= rows:
            raise ValueError(f"rows {a}:{b} of tensor {name} with {rows} rows")
        row = math.prod(shape[1:])
        count = (b - a) * row
        # the stored bytes, their float32 copy and room for the float64 copy the statistics make
        safeio.check_fits(count * (width + 12), f"tensor {name} {list(shape)} of {file}",
                          "pass a smaller model or use a machine with more memory")
        with open(file, "rb") as f:
            f.seek(offset + a * row * width)
            x = np.fromfile(f, dtype=np.dtype(np_dtype).newbyteorder("<"), count=count)
        if x.size != count:
            raise TerrainError(f"{file} is truncated while reading {name}; {_FIX}")
        if self.dtypes[name] == "BF16":
            x = (x.astype(np.uint32) << 16).view(np.float32)
        x = x.astype(np.float32, copy=False)
        return x.reshape((b - a,) + tuple(shape[1:])) if shape else x.reshape(())


def _inside_model(folder: str, rel: str, what: str) -> str:
    """folder/rel for a file name read from the model folder (a shard index), refusing one that is
    absolute or leads outside the folder. The Hugging Face cache links snapshots/<rev>/<file> to
    ../../blobs/<hash>: a link into the same cached repository is accepted."""
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) \
            or ".." in rel.replace("\\", "/").split("/"):
        raise TerrainError(f"{what} {rel!r:.80} must be a file name inside {folder}; refused")
    try:
        return safeio.inside(folder, rel, what)
    except safeio.InputError as e:
        snapshots = os.path.dirname(os.path.abspath(folder))
        full = os.path.join(folder, rel)
        if os.path.basename(snapshots) == "snapshots":
            repo = os.path.realpath(os.path.dirname(snapshots))
            if os.path.commonpath([repo, os.path.realpath(full)]) == repo:
                return full
        raise TerrainError(str(e)) from None


def shard_files(path: str) -> list[str]:
    """The safetensors files of a folder: those of its index when there is one (each must
    exist inside the folder), else every *.safetensors in it; a single file is its own list."""
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, INDEX)
    if os.path.lexists(index):
        try:
            idx = safeio.read_json(index, "shard index", kind=dict)
            weight_map = safeio.check_field(idx, "weight_map", dict, index)
        except safeio.InputError as e:
            raise TerrainError(f"{e}; {_FIX}") from None
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise TerrainError(f"{index}: the weight_map entry {bad[0][:80]!r} must name a shard file, got "
                               f"{bad[1]!r:.60}; {_FIX}")
        if not weight_map:
            raise TerrainError(f"{index}: the weight_map names no tensors; {_FIX}")
        files = [_inside_model(path, s, f"{index}: shard") for s in sorted(set(weight_map.values()))]
        missing = [os.path.relpath(s, path) for s in files if not os.path.exists(s)]
        if missing:
            raise TerrainError(f"{len(missing)} shard(s) listed in {INDEX} are missing from {path} "
                               f"({', '.join(missing[:3])}); {_FIX}")
        folders = [s for s in files if not os.path.isfile(s)]
        if folders:
            raise TerrainError(f"{folders[0]}, listed in {INDEX}, is not a file; {_FIX}")
        return files
    names = sorted(s for s in os.listdir(path) if s.endswith(".safetensors"))
    files = [_inside_model(path, s, "safetensors file") for s in names]
    folders = [s for s in files if not os.path.isfile(s)]
    if folders:
        raise TerrainError(f"{folders[0]} is not a file; {_FIX}")
    return files


class ModuleWeights:
    """The same interface over an instantiated torch module."""

    def __init__(self, module):
        self._params = dict(module.named_parameters())
        self.entries = {n: tuple(p.shape) for n, p in self._params.items()}

    def integer_names(self) -> set[str]:
        return {n for n, p in self._params.items() if not (p.is_floating_point() or p.is_complex())}

    def read(self, name: str) -> np.ndarray:
        return self._params[name].detach().float().cpu().numpy()

    def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        return self._params[name][a:b].detach().float().cpu().numpy()


class PickledWeights(ModuleWeights):
    """pytorch_model.bin: loaded whole with weights_only=True (plain tensors only) and mmap."""

    def __init__(self, files: list[str]):
        import torch
        print(f"note: {os.path.dirname(files[0])} has no safetensors; reading the pickled weights with "
              f"weights_only=True, which holds all of them in memory (convert to safetensors to stream)",
              file=sys.stderr)
        self._params = {}
        for file in files:
            try:
                try:
                    sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:  # files of the pre-zip format cannot be memory-mapped
                    if "mmap" not in str(e):
                        raise
                    sd = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - anything but plain tensors is refused here
                raise TerrainError(f"{file} could not be read as plain weights ({safeio.first_line(e)}); "
                                   f"only weight files without code are accepted; {_FIX}") from e
            self._params.update({k: v for k, v in sd.items() if hasattr(v, "shape")})
        self.entries = {n: tuple(p.shape) for n, p in self._params.items()}


def open_weights(path: str):
    """A reader over the weights of a local model folder: safetensors when present, else the
    pickled weights through weights_only=True."""
    if not os.path.exists(path):
        raise TerrainError(f"model folder {path} does not exist; pass --model with a local folder holding "
                           f"config.json and the weights")
    if os.path.isfile(path) or shard_files(path):
        return SafetensorsWeights(path)
    bins = sorted(os.path.join(path, s) for s in os.listdir(path)
                  if s.startswith("pytorch_model") and s.endswith(".bin"))
    if bins:
        return PickledWeights(bins)
    raise TerrainError(f"{path} holds no weights (no *.safetensors, no pytorch_model.bin); {_FIX}")
