"""Pre-LN transformers for the task: attention-only (no MLP parameters at all) or standard
(attention + MLP); learned positions; the class is read out at the last position.
Attention is written out (W_Q, W_K, W_V, W_O without biases) so its matrices can be
snapshotted and its probabilities measured."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from training import load_exported


MODEL_TYPE = "modadd_transformer"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    T: int
    n_classes: int
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 5
    mlp: bool = False            # False: attention-only
    d_ff: int = 512

    @classmethod
    def from_dict(cls, c: dict, task) -> "ModelConfig":
        """The model of a run's configuration, for its TaskConfig (vocabulary, length, classes)."""
        return cls(task.vocab_size, task.T, task.C, c["d_model"], c["n_heads"], c["n_layers"], c["mlp"], c["d_ff"])


class Attention(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.W_Q = nn.Linear(d, d, bias=False)
        self.W_K = nn.Linear(d, d, bias=False)
        self.W_V = nn.Linear(d, d, bias=False)
        self.W_O = nn.Linear(d, d, bias=False)
        self.topk: int | None = None

    def forward(self, x: torch.Tensor, keep: dict | None = None) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (w(x).view(B, T, self.h, d // self.h).transpose(1, 2) for w in (self.W_Q, self.W_K, self.W_V))
        scores = q @ k.transpose(-1, -2) / (d // self.h) ** 0.5
        if self.topk is not None and self.topk < T:        # keep each row's top-k keys (bubbling test)
            kth = scores.topk(self.topk, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        att = torch.softmax(scores, dim=-1)                 # (B, h, T, T)
        if keep is not None:
            keep.setdefault("attn", []).append(att)
        return self.W_O((att @ v).transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        if cfg.mlp:
            self.ln2 = nn.LayerNorm(cfg.d_model)
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x, keep=None):
        x = x + self.attn(self.ln1(x), keep)
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.ln2(x))
        return x


class ModAddTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.T, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)

    def residual(self, tokens: torch.Tensor, upto: int | None = None, keep: dict | None = None) -> torch.Tensor:
        """Residual stream after `upto` blocks (all when None)."""
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks[:upto]:
            x = blk(x, keep)
        return x

    def finish(self, x: torch.Tensor, start: int, keep: dict | None = None) -> torch.Tensor:
        """Run blocks start.. on a residual stream and read out the last position."""
        for blk in self.blocks[start:]:
            x = blk(x, keep)
        return self.head(self.ln_f(x[:, -1]))

    def forward(self, tokens: torch.Tensor, keep: dict | None = None) -> torch.Tensor:
        return self.finish(self.residual(tokens, 0, keep), 0, keep)

    @classmethod
    def from_pretrained(cls, path: str) -> "ModAddTransformer":
        """The model of an export folder (model.safetensors + config.json, from modadd.train --export). Its
        model configuration is checked first (types, ranges, a size that fits in memory): one line naming
        the file and the field, before anything is built."""
        check_export_config(path)
        return load_exported(path, MODEL_TYPE, cls, ModelConfig)

    def attention_matrices(self) -> dict[str, torch.Tensor]:
        return {f"L{i}.{n}": getattr(b.attn, n).weight for i, b in enumerate(self.blocks)
                for n in ("W_Q", "W_K", "W_V", "W_O")}


def check_export_config(path: str) -> None:
    """The model_config of an export folder's config.json, when it is one of this model's: every field of
    ModelConfig of the right type and range, and parameters that fit in memory."""
    import os

    import safeio
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return                                    # load_exported names what is missing
    c = safeio.read_json(cfg_path, "exported model configuration", kind=dict)
    mc = c.get("model_config")
    if c.get("model_type") != MODEL_TYPE or not isinstance(mc, dict):
        return                                    # load_exported names the other model type
    safeio.check_dataclass_fields(ModelConfig, mc, f"{cfg_path} model_config")
    for name, lo, required in (("vocab_size", 1, True), ("T", 1, True), ("n_classes", 1, True), ("d_model", 1, False),
                               ("n_heads", 1, False), ("n_layers", 1, False), ("d_ff", 1, False)):
        safeio.check_field(mc, name, int, f"{cfg_path} model_config", lo=lo, hi=2 ** 31 - 1, required=required)
    cfg = ModelConfig(**mc)
    if cfg.d_model % cfg.n_heads:
        raise safeio.InputError(f"{cfg_path} model_config: d_model {cfg.d_model} is not divisible by n_heads "
                                f"{cfg.n_heads}")
    safeio.check_fits(4 * 2 * n_parameters(cfg), f"{cfg_path}: a model of {n_parameters(cfg):,} parameters",
                      "it cannot be loaded on this machine")


def set_topk(model: "ModAddTransformer", k: int | None) -> None:
    for b in model.blocks:
        b.attn.topk = k


def n_parameters(cfg: ModelConfig) -> int:
    """Closed form, for the tests."""
    d = cfg.d_model
    per_block = 4 * d * d + 2 * d + ((2 * d + d * cfg.d_ff + cfg.d_ff + cfg.d_ff * d + d) if cfg.mlp else 0)
    return cfg.vocab_size * d + cfg.T * d + cfg.n_layers * per_block + 2 * d + d * cfg.n_classes + cfg.n_classes


def readout_entropy(keep: dict) -> torch.Tensor:
    """Entropy (nats) of the last position's attention, per layer and head: (layers, heads)."""
    out = []
    for att in keep["attn"]:
        p = att[:, :, -1, :]
        out.append(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean(0))
    return torch.stack(out)


def accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(tokens)
        return float((logits.argmax(-1) == labels).float().mean()), float(F.cross_entropy(logits, labels))
