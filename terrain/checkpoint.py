"""Model sources for the battery: a reader over a model's weights with its config, and the matrices a
stage needs alone (the token embedding, the output head), without instantiating the model. The readers
themselves (safetensors shards streamed tensor by tensor, pickled weights through weights_only, an
instantiated module, GGUF files) are in terrain/readers.py and terrain/ggufsource.py.
"""
from __future__ import annotations

import os

import numpy as np

from terrain.models import (TerrainError, _not_offline, gguf_file, load_config, load_open_clip, plan,
                            resolve_model_name)
from terrain.ggufsource import GGUFWeights
from terrain.readers import (ModuleWeights, PickledWeights, SafetensorsWeights, open_weights,  # noqa: F401
                             shard_files)


def open_source(name: str | None):
    """(weight reader, config, kind) for a model id, local folder or open_clip spec, reading
    only config.json and the safetensors headers (no model is instantiated)."""
    if name and name.startswith("open_clip:"):
        model, config = load_open_clip(name[len("open_clip:"):])
        return ModuleWeights(model), config, "module"
    path = resolve_model_name(name)
    g = gguf_file(path) if os.path.exists(path) else None
    if g:
        src = GGUFWeights(g)
        return src, src.config, "gguf"
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
