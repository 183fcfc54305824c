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

import json
import os
import struct
import sys

import numpy as np

from terrain.models import TerrainError, _not_offline, load_config, load_open_clip, plan, resolve_model_name

# safetensors dtype -> (numpy dtype of the stored bytes, bytes per element)
_DTYPES = {"F64": (np.float64, 8), "F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
           "I64": (np.int64, 8), "I32": (np.int32, 4), "I16": (np.int16, 2), "I8": (np.int8, 1),
           "U8": (np.uint8, 1), "BOOL": (np.bool_, 1)}
INDEX = "model.safetensors.index.json"
_FIX = "re-download the model folder (huggingface-cli download ID --local-dir DIR) or pass another --model"


class SafetensorsWeights:
    """Tensor-by-tensor reader over the safetensors shards of one folder (or one file)."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._where: dict[str, tuple[str, int, int]] = {}  # name -> (file, absolute offset, nbytes)
        for shard in shard_files(path):
            self._read_header(shard)
        if not self.entries:
            raise TerrainError(f"no tensors in the safetensors files of {path}; {_FIX}")

    def _read_header(self, shard: str) -> None:
        size = os.path.getsize(shard)
        with open(shard, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise TerrainError(f"{shard} is truncated (no safetensors header); {_FIX}")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise TerrainError(f"{shard} is not a valid safetensors file (header length {n}); {_FIX}")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise TerrainError(f"{shard} has a corrupted safetensors header ({e}); {_FIX}") from e
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dt = info.get("dtype")
            if dt not in _DTYPES:
                raise TerrainError(f"{shard}: tensor {name} has unsupported dtype {dt!r}")
            shape = tuple(int(s) for s in info["shape"])
            a, b = (int(x) for x in info["data_offsets"])
            if b - a != int(np.prod(shape, dtype=np.int64)) * _DTYPES[dt][1] or a < 0:
                raise TerrainError(f"{shard}: tensor {name} has a byte range that does not match its shape; {_FIX}")
            if start + b > size:
                raise TerrainError(f"{shard} is truncated: tensor {name} ends at byte {start + b:,} but the file "
                                   f"has {size:,} bytes; {_FIX}")
            self.entries[name] = shape
            self.dtypes[name] = dt
            self._where[name] = (shard, start + a, b - a)

    def integer_names(self) -> set[str]:
        """Tensors of integer or boolean type: buffers such as position ids, not parameters."""
        return {n for n, dt in self.dtypes.items() if dt == "BOOL" or dt[0] in "IU"}

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (bfloat16 and float16 convert exactly)."""
        return self.read_rows(name, 0, self.entries[name][0] if self.entries[name] else 1)

    def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows a:b (along the first axis) of the tensor as float32, reading only their bytes."""
        file, offset, nbytes = self._where[name]
        shape = self.entries[name]
        np_dtype, width = _DTYPES[self.dtypes[name]]
        row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        count = (b - a) * row
        with open(file, "rb") as f:
            f.seek(offset + a * row * width)
            x = np.fromfile(f, dtype=np.dtype(np_dtype).newbyteorder("<"), count=count)
        if x.size != count:
            raise TerrainError(f"{file} is truncated while reading {name}; {_FIX}")
        if self.dtypes[name] == "BF16":
            x = (x.astype(np.uint32) << 16).view(np.float32)
        x = x.astype(np.float32, copy=False)
        return x.reshape((b - a,) + tuple(shape[1:])) if shape else x.reshape(())


def shard_files(path: str) -> list[str]:
    """The safetensors files of a folder: those of its index when there is one (each must
    exist), else every *.safetensors in it; a single file is its own list."""
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise TerrainError(f"{index} is not a valid shard index ({e}); {_FIX}") from e
        missing = [s for s in files if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise TerrainError(f"{len(missing)} shard(s) listed in {INDEX} are missing from {path} "
                               f"({', '.join(missing[:3])}); {_FIX}")
        return [os.path.join(path, s) for s in files]
    return sorted(os.path.join(path, s) for s in os.listdir(path) if s.endswith(".safetensors"))


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
                raise TerrainError(f"{file} could not be read as plain weights ({str(e).splitlines()[0]}); "
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


def open_source(name: str | None):
    """(weight reader, config, kind) for a model id, local folder or open_clip spec, reading
    only config.json and the safetensors headers (no model is instantiated)."""
    if name and name.startswith("open_clip:"):
        model, config = load_open_clip(name[len("open_clip:"):])
        return ModuleWeights(model), config, "module"
    path = resolve_model_name(name)
    if not os.path.isdir(path):
        raise _not_offline(name, f"no folder {path}")
    config = load_config(path)
    src = open_weights(path)
    return src, config, "pickle" if isinstance(src, PickledWeights) else "safetensors"


EMBEDDING_STACKS = ("main", "text", "encoder", "decoder")


def embedding_matrix(name: str | None) -> tuple[np.ndarray, object]:
    """(token embedding matrix (vocab, d) as float32, config), read alone from the checkpoint:
    the rest of the model is never loaded. The input embedding of the text / main stack."""
    src, config, _ = open_source(name)
    refs = [r for r in plan(src.entries, config).refs if r.role == "embedding"]
    refs.sort(key=lambda r: EMBEDDING_STACKS.index(r.stack) if r.stack in EMBEDDING_STACKS else 99)
    if not refs:
        raise TerrainError(f"{name} has no token embedding matrix (a vision model?)")
    return refs[0].load(src), config


def output_head(name: str | None) -> tuple[np.ndarray, bool]:
    """(output head (vocab, d) as float32, tied). When the checkpoint holds no separate head
    (lm_head), the head is the input embedding (tied weights, or an encoder saved without a
    head): that matrix is returned with tied True."""
    src, config, _ = open_source(name)
    refs = [r for r in plan(src.entries, config).refs if r.role == "unembedding"]
    if not refs:
        return embedding_matrix(name)[0], True
    return refs[0].load(src), False
