"""GGUF files as a model source: the weights read one tensor at a time, dequantised to float32, under
the Hugging Face names and layout the rest of terrain/ knows.

A GGUF file (llama.cpp's format) is a header of typed key-value metadata and tensor descriptions,
then the tensors, many of them quantised in blocks (Q4_1: 32 weights share a scale and a minimum,
each weight keeps 4 bits). `GGUFWeights` reads the header with the `gguf` package's reader, which
memory-maps the file, so a tensor's bytes are read only when it is asked for, and dequantises that
tensor alone with the package's own dequantisation: peak memory is one tensor, whatever the size
of the model.

Names: GGUF's `blk.N.attn_q.weight`, `token_embd.weight`, ... are mapped to the Hugging Face names
of the same architecture (`model.layers.N.self_attn.q_proj.weight`, `model.embed_tokens.weight`,
...), so the role table, head layouts and every statistic apply unchanged. Layout: the llama.cpp
converter permutes the rows of a Llama model's query and key projections within each head (the
two halves of the rotary pairs interleaved); the permutation is undone here, so per-head forms
and head splits are those of the original model (tests compare every matrix with what
transformers dequantises from the same file). Each tensor's quantisation type is kept
(`dtypes`), for the JSON and for the quantisation nulls.

The config comes from the file's metadata as a transformers config of the same family; the stages
that run a forward pass load GGUF files through transformers (`from_pretrained(..., gguf_file=)`).

Supported: llama (also Mistral-style files written as llama), qwen2, qwen3 (their q/k are not
permuted) and bert (weights only: transformers cannot load a BERT GGUF file).
"""
from __future__ import annotations

import os
import re

import numpy as np

import safeio
from terrain.errors import TerrainError

LLAMA_NAMES = {  # GGUF name (with {i} for the block) -> Hugging Face name
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
BERT_NAMES = {
    "token_embd.weight": "embeddings.word_embeddings.weight",
    "token_types.weight": "embeddings.token_type_embeddings.weight",
    "position_embd.weight": "embeddings.position_embeddings.weight",
    "token_embd_norm.weight": "embeddings.LayerNorm.weight",
    "token_embd_norm.bias": "embeddings.LayerNorm.bias",
    **{f"blk.{{i}}.{g}.{p}": f"encoder.layer.{{i}}.{h}.{p}" for g, h in (
        ("attn_q", "attention.self.query"), ("attn_k", "attention.self.key"), ("attn_v", "attention.self.value"),
        ("attn_output", "attention.output.dense"), ("attn_output_norm", "attention.output.LayerNorm"),
        ("ffn_up", "intermediate.dense"), ("ffn_down", "output.dense"), ("layer_output_norm", "output.LayerNorm"))
       for p in ("weight", "bias")},
}
ARCHS = {"llama": LLAMA_NAMES, "qwen2": LLAMA_NAMES, "qwen3": LLAMA_NAMES, "bert": BERT_NAMES}
PERMUTED_QK = ("llama",)   # architectures whose q/k rows the llama.cpp converter permutes
MAX_GGUF_BYTES = 2 ** 40


def find_gguf(path: str) -> str | None:
    """The GGUF file a --model names: the file itself, or the one .gguf in a folder (None when the
    folder holds none; several are one line asking to name one)."""
    if os.path.isfile(path):
        return path if path.lower().endswith(".gguf") else None
    if not os.path.isdir(path):
        return None
    found = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf") and os.path.isfile(os.path.join(path, f)))
    if len(found) > 1:
        raise TerrainError(f"{path} holds {len(found)} GGUF files ({', '.join(found[:3])}); pass --model with the "
                           f"path of one of them")
    return os.path.join(path, found[0]) if found else None


def _pattern(names: dict) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in names.items()]


_PATTERNS = {arch: _pattern(names) for arch, names in ARCHS.items()}


def hf_name(arch: str, name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor of `arch`, or None for one terrain does not analyse."""
    for pat, h in _PATTERNS[arch]:
        m = pat.match(name)
        if m:
            return h.replace("{i}", m.group(1)) if m.groups() else h
    return None


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes the llama.cpp converter's rotary permutation of a q or k projection
    with n_heads heads: within each head the converter stores the rotary pairs (i, i + d/2)
    interleaved as rows (2i, 2i + 1); original row r of head h is stored row idx[r]."""
    d = n_rows // n_heads
    if n_heads < 1 or n_rows % n_heads or d % 2:
        raise TerrainError(f"a query/key projection of {n_rows} rows cannot be split into {n_heads} heads of even width")
    idx = np.arange(n_rows).reshape(n_heads, d // 2, 2)       # stored row of (head, pair i, half j) ...
    return idx.transpose(0, 2, 1).reshape(-1)                  # ... taken in the original order (head, half, i)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        v = f.contents()
    except Exception:  # noqa: BLE001 - a field the reader cannot decode: treated as absent
        return default
    return v


def open_reader(path: str):
    """The gguf package's reader over a file, with one line (TerrainError) for a file that is not a
    GGUF file, is truncated, names an unknown quantisation type or lies about its sizes."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise TerrainError("reading GGUF files needs the gguf package (pip install gguf, part of "
                           "requirements.txt)") from None
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        size = os.path.getsize(path)
    except OSError as e:
        raise TerrainError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise TerrainError(f"{path} is not a GGUF file (its first bytes are {magic!r}, not b'GGUF')")
    if size > MAX_GGUF_BYTES:
        raise TerrainError(f"{path} has {size:,} bytes, more than terrain reads")
    try:
        return GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, KeyError, IndexError, ... on a bad file
        text = safeio.first_line(e, 200)
        if "is not a valid GGMLQuantizationType" in text or "GGMLQuantizationType" in text:
            raise TerrainError(f"{path} holds a tensor of an unknown quantisation type ({text}); a newer gguf "
                               f"package may read it") from None
        raise TerrainError(f"{path} is not a readable GGUF file: truncated, or its header does not match its size "
                           f"({type(e).__name__}: {text})") from None


class GGUFWeights:
    """Tensor-by-tensor reader over a GGUF file, with the interface of terrain.readers: 
    `entries` (Hugging Face name -> shape as nn.Linear stores it: (out, in)), `dtypes` (the GGUF
    quantisation type of each), `read`, `read_rows`, `integer_names`, and `config`."""

    def __init__(self, path: str):
        self.path = path
        self.reader = open_reader(path)
        arch = _field(self.reader, "general.architecture")
        if arch not in ARCHS:
            raise TerrainError(f"{path}: GGUF architecture {arch!r:.40} is not one terrain maps to Hugging Face names "
                               f"({', '.join(ARCHS)})")
        self.arch = arch
        self.meta = {k: _field(self.reader, k) for k in self.reader.fields if not k.startswith("tokenizer.")}
        self.entries: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        self.skipped: list[str] = []
        self._tensor = {}
        size = os.path.getsize(path)
        for t in self.reader.tensors:
            name = hf_name(arch, t.name)
            if name is None:
                self.skipped.append(t.name)
                continue
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))   # GGUF lists ne0 (the row length) first
            if any(s < 1 for s in shape) or int(t.data_offset) + int(t.n_bytes) > size:
                raise TerrainError(f"{path}: tensor {t.name} claims shape {list(shape)} at byte {int(t.data_offset):,} "
                                   f"({int(t.n_bytes):,} bytes) in a file of {size:,} bytes")
            self.entries[name] = shape
            self.dtypes[name] = t.tensor_type.name
            self._tensor[name] = t
        if not self.entries:
            raise TerrainError(f"{path} holds no tensor terrain knows for the {arch} architecture")
        self.config = self._config()
        self._perm = {}
        if arch in PERMUTED_QK:
            lay_h, lay_kv = self.config.num_attention_heads, self.config.num_key_value_heads
            for name, shape in self.entries.items():
                if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                    heads = lay_h if ".q_proj." in name else lay_kv
                    self._perm[name] = unpermute_rows(shape[0], heads)

    # ------------------------------------------------------------------ config
    def _meta(self, key: str, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def _config(self):
        """A transformers config of the file's family from its metadata (the fields terrain uses)."""
        import transformers as tf
        g = self._meta
        n_layers = g("block_count")
        heads, d = g("attention.head_count"), g("embedding_length")
        vocab = self._tensor.get("model.embed_tokens.weight", self._tensor.get("embeddings.word_embeddings.weight"))
        vocab = int(vocab.shape[-1]) if vocab is not None else g("vocab_size")
        fields = {"num_hidden_layers": n_layers, "num_attention_heads": heads, "hidden_size": d,
                  "intermediate_size": g("feed_forward_length"), "vocab_size": vocab}
        for k, v in fields.items():
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= int(v) <= 2 ** 24:
                raise TerrainError(f"{self.path}: the metadata {self.arch}.{k} is {v!r:.40}, not a positive integer")
        fields = {k: int(v) for k, v in fields.items()}
        if self.arch == "bert":
            return tf.BertConfig(**fields, max_position_embeddings=int(g("context_length", 512) or 512),
                                 layer_norm_eps=float(g("attention.layer_norm_epsilon", 1e-12) or 1e-12),
                                 architectures=["BertModel"])
        kv = g("attention.head_count_kv", heads)
        if not isinstance(kv, (int, np.integer)) or not 1 <= int(kv) <= heads or heads % int(kv):
            raise TerrainError(f"{self.path}: {self.arch}.attention.head_count_kv is {kv!r:.40}; it must divide "
                               f"the {heads} heads")
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[self.arch]
        head_dim = g("attention.key_length") or fields["hidden_size"] // heads
        return cls(**fields, num_key_value_heads=int(kv), head_dim=int(head_dim),
                   rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6) or 1e-6),
                   max_position_embeddings=int(g("context_length", 2048) or 2048),
                   tie_word_embeddings="lm_head.weight" not in self.entries,
                   architectures=[cls.__name__.replace("Config", "ForCausalLM")])

    # ------------------------------------------------------------------ reading
    def integer_names(self) -> set[str]:
        return {n for n, t in self.dtypes.items() if t.startswith("I")}

    def nbytes(self, name: str, itemsize: int = 4) -> int:
        return int(np.prod(self.entries[name], dtype=np.int64)) * itemsize

    def read(self, name: str) -> np.ndarray:
        """The whole tensor as float32 in the Hugging Face layout."""
        return self.read_rows(name, 0, self.entries[name][0])

    def read_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """Rows a:b (Hugging Face order) as float32, dequantising only the stored rows that hold them."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize
        shape = self.entries[name]
        if not 0 <= a <= b <= shape[0]:
            raise TerrainError(f"{self.path}: rows {a}:{b} of {name} ({shape[0]} rows) asked for")
        t = self._tensor[name]
        safeio.check_fits(8 * (b - a) * int(np.prod(shape[1:], dtype=np.int64)), f"{name} of {self.path}",
                          "a smaller model")
        perm = self._perm.get(name)
        rows = perm[a:b] if perm is not None else None
        data = t.data
        if len(shape) == 1:
            x = data if t.tensor_type in (GGMLQuantizationType.F32,) else dequantize(data, t.tensor_type)
            return np.asarray(x, dtype=np.float32).reshape(shape)[a:b]
        try:
            if rows is None:
                block = data[a:b]
            else:
                lo, hi = int(rows.min()), int(rows.max()) + 1
                block = data[lo:hi]
            x = block if t.tensor_type == GGMLQuantizationType.F32 else dequantize(np.asarray(block), t.tensor_type)
        except Exception as e:  # noqa: BLE001 - the gguf package's errors on a corrupt tensor
            raise TerrainError(f"{self.path}: tensor {t.name} cannot be dequantised ({safeio.first_line(e)})") from None
        x = np.asarray(x, dtype=np.float32).reshape(-1, *shape[1:])
        return x if rows is None else x[rows - int(rows.min())]
