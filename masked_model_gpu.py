"""BERT-style masked-patch transformer on the circles series: train, evaluate, draw.

Model: input (batch, seq, 20) -> masked steps replaced by a learnable [MASK] vector ->
Linear(20 -> d_model) -> positions -> N encoder layers (multi-head attention through
torch's scaled_dot_product_attention, GELU feed-forward, dropout) -> Linear(d_model -> d_ff)
-> GELU -> Linear(d_ff -> 20). The loss is the MSE on masked steps only.

Positions (--pos-encoding):
  sinusoidal  absolute sine/cosine table added to the embeddings
  t5          learned per-head relative bias with T5's logarithmic buckets, shared by all
              layers, passed to attention as a broadcastable (1, heads, S, S) additive mask
  rope        rotary embedding of queries and keys
None of them has a fixed maximum length: windows longer than the training windows evaluate.

Training: AdamW, linear warmup then cosine decay, gradient clipping; BF16 autocast and
torch.compile on CUDA (off with --no-amp / --no-compile), fp32 on CPU. Validation on a
held-out time block with fixed masks, the noise floor beside every validation MSE, and a
final test-block MSE from the best checkpoint.

Usage:
    python masked_model_gpu.py --data-dir data --epochs 500 --n-layers 7 --seq-len 1024 \\
        --stride 64 --mask-patch-min 8 --mask-patch-max 128 --pos-encoding rope
    python masked_model_gpu.py --eval runs/masked/best.pt        # reload, report, redraw
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import safeio
import training
from cliargs import Parser, at_least, between, positive
from dataset import task_datasets, train_eval_windows
from positions import t5_relative_bucket  # noqa: F401 (re-exported)
from training import (ModelSpec, TrainingError, add_training_arguments, autocast, command_argv, decay_groups,
                      eval_main, given_flags, load_exported, plot_prediction_window, train_main)

MODEL_TYPE = "masked_transformer"
POS_ENCODINGS = ("sinusoidal", "t5", "rope")


# ----------------------------------------------------------------------------- model

@dataclass
class ModelConfig:
    in_dim: int = 20
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    dropout: float = 0.1
    attn_dropout: float | None = None  # dropout on attention probabilities; None: same as dropout
    pos_encoding: str = "sinusoidal"
    t5_num_buckets: int = 32
    t5_max_distance: int = 128
    rope_base: float = 10000.0
    norm_first: bool = False  # the original code's layers are post-LN (PyTorch's default)

    def validate(self) -> None:
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"--pos-encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if min(self.d_model, self.n_heads, self.n_layers, self.d_ff) < 1:
            raise ValueError("--d-model, --n-heads, --n-layers and --d-ff must be positive")
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model {self.d_model} is not divisible by --n-heads {self.n_heads}")
        if self.pos_encoding == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("RoPE needs an even head dimension (d_model / n_heads)")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise ValueError("sinusoidal positions need an even --d-model")
        if self.pos_encoding == "t5" and (self.t5_num_buckets < 4 or self.t5_max_distance < self.t5_num_buckets // 4):
            raise ValueError("--t5-num-buckets must be >= 4 and --t5-max-distance >= num_buckets / 4")


def sinusoidal_table(length: int, dim: int, device, dtype=torch.float32) -> torch.Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe.to(dtype)


def rope_cos_sin(length: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)  # (S, head_dim): rotate the two halves together
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., S, head_dim) by position: pairs (i, i + head_dim/2) turn by angle pos * inv_i."""
    h = x.shape[-1] // 2
    rotated = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.ff1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.dropout = cfg.dropout
        self.attn_dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
        self.norm_first = cfg.norm_first

    def attention(self, x, bias, rope):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = bias.to(q.dtype) if bias is not None else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.out(a.transpose(1, 2).reshape(B, S, D))

    def feed_forward(self, x):
        return self.ff2(F.dropout(F.gelu(self.ff1(x)), self.dropout, self.training))

    def forward(self, x, bias=None, rope=None):
        drop = lambda t: F.dropout(t, self.dropout, self.training)  # noqa: E731
        if self.norm_first:
            x = x + drop(self.attention(self.norm1(x), bias, rope))
            return x + drop(self.feed_forward(self.norm2(x)))
        x = self.norm1(x + drop(self.attention(x, bias, rope)))
        return self.norm2(x + drop(self.feed_forward(x)))


class MaskedTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(cfg.in_dim))
        self.embed = nn.Linear(cfg.in_dim, cfg.d_model)
        if cfg.pos_encoding == "t5":
            self.rel_bias = nn.Embedding(cfg.t5_num_buckets, cfg.n_heads)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.head = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.in_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    @classmethod
    def from_pretrained(cls, path: str) -> "MaskedTransformer":
        """The model of an --export folder (model.safetensors + config.json)."""
        return load_exported(path, MODEL_TYPE, cls, ModelConfig)

    @property
    def layer_names(self) -> list[str]:
        """Names of the representations: raw input, each layer's output, the prediction."""
        return ["input"] + [str(i + 1) for i in range(self.cfg.n_layers)] + ["output"]

    def position_bias(self, S: int, device) -> torch.Tensor:
        """T5 relative bias as a (1, heads, S, S) additive attention mask."""
        pos = torch.arange(S, device=device)
        bucket = t5_relative_bucket(pos[None, :] - pos[:, None], self.cfg.t5_num_buckets, self.cfg.t5_max_distance)
        return self.rel_bias(bucket).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_hidden: bool = False):
        """x (B, S, in_dim), mask (B, S) bool (True = hidden from the model) -> prediction (B, S, in_dim).

        With return_hidden, also the list of representations named by layer_names.
        """
        if x.shape[-1] != self.cfg.in_dim:
            raise ValueError(f"the model takes {self.cfg.in_dim}-D inputs, got {x.shape[-1]}-D")
        hidden = [x] if return_hidden else None
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        h = self.embed(x)
        S = h.shape[1]
        bias = rope = None
        if self.cfg.pos_encoding == "sinusoidal":
            h = h + sinusoidal_table(S, self.cfg.d_model, h.device, h.dtype)
        elif self.cfg.pos_encoding == "t5":
            bias = self.position_bias(S, h.device)
        else:
            rope = rope_cos_sin(S, self.cfg.d_model // self.cfg.n_heads, self.cfg.rope_base, h.device)
        for layer in self.layers:
            h = layer(h, bias, rope)
            if return_hidden:
                hidden.append(h)
        out = self.head(self.final_norm(h))
        if return_hidden:
            hidden.append(out)
            return out, hidden
        return out


def masked_mse(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors over masked steps and dims, number of masked elements)."""
    err = ((pred.float() - x.float()) ** 2).sum(-1)
    n = mask.sum() * x.shape[-1]
    return (err * mask).sum(), n


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_mse(model, loader, device, amp: bool) -> dict:
    """Masked-step MSE against the data ("mse") and, when the data folder has the noise-free
    series, against the signal ("signal_mse", else None)."""
    model.eval()
    ds = loader.dataset
    sse = ssig = 0.0
    n, i0 = 0, 0
    for x, _, m in loader:
        x, m = x.to(device, non_blocking=True), m.to(device, non_blocking=True)
        with autocast(device, amp):
            pred = model(x, m)
        s, c = masked_mse(pred, x, m)
        sse += s.item()
        n += c.item()
        sig = ds.signal_windows(i0, i0 + len(x))
        if sig is not None:
            ssig += masked_mse(pred, torch.as_tensor(sig, device=device), m)[0].item()
        i0 += len(x)
    return {"mse": sse / max(n, 1), "signal_mse": ssig / max(n, 1) if ds.signal is not None else None}


@torch.no_grad()
def step_predictions(model, loader, device, amp: bool) -> np.ndarray:
    """The prediction of every step of every window (N, L, D), given its window with the mask
    applied (a model is scored on the masked steps)."""
    model.eval()
    out = []
    for x, _, m in loader:
        with autocast(device, amp):
            out.append(model(x.to(device), m.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, loader.dataset.seq_len, model.cfg.in_dim))


@torch.no_grad()
def plot_predictions(model, dataset, device, plots_dir, n_states, amp=False, n_windows=3,
                     prefix="bert_prediction") -> list[str]:
    """Four rows per window: state strip (masked steps grey), truth, prediction, masked-only error."""
    model.eval()
    paths = []
    idx = np.linspace(0, len(dataset) - 1, n_windows).round().astype(int)
    for j, i in enumerate(idx):
        x, s, m = dataset[int(i)]
        xt = torch.as_tensor(x, device=device)[None]
        mt = torch.as_tensor(m, device=device)[None]
        with autocast(device, amp):
            pred = model(xt, mt)[0].float().cpu().numpy()
        err = np.where(m[:, None], (pred - x) ** 2, np.nan)
        p = plot_prediction_window(
            os.path.join(plots_dir, f"{prefix}_{j}.png"), x, s, pred, err, n_states,
            f"Held-out window at step {int(dataset.starts[i])}: masked MSE {np.nanmean(err):.2f} "
            f"(grey in the strip = masked)", "prediction", "sq. error\n(masked)", mask=m)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Train or evaluate the masked-patch transformer on a circles dataset: "
                    "python masked_model_gpu.py [train] [flags] | eval CKPT [flags] (the same as --eval CKPT).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_training_arguments(p, seq_len=512, stride=128, batch_size=128, lr=1e-3, warmup_epochs=20, epochs=100)
    g = p.add_argument_group("masks")
    g.add_argument("--mask-ratio", type=between(0, 1, open_lo=True, open_hi=True), default=0.15,
                   help="fraction of steps masked (exact)")
    g.add_argument("--mask-patch-size", type=at_least(1), default=16, help="fixed patch length")
    g.add_argument("--mask-patch-min", type=at_least(1), default=None, help="stochastic patch lengths: minimum")
    g.add_argument("--mask-patch-max", type=at_least(1), default=None, help="stochastic patch lengths: maximum")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=at_least(1), default=128, help="width of the residual stream")
    g.add_argument("--n-heads", type=at_least(1), default=4, help="attention heads (must divide --d-model)")
    g.add_argument("--n-layers", type=at_least(1), default=4, help="transformer layers")
    g.add_argument("--d-ff", type=at_least(1), default=512, help="width of the feed-forward layer")
    g.add_argument("--dropout", type=between(0, 1, open_hi=True), default=0.1, help="dropout in every layer")
    g.add_argument("--attn-dropout", type=between(0, 1, open_hi=True), default=None,
                   help="dropout on attention probabilities (default: --dropout); 0 lets CPU attention "
                        "use its fused kernel")
    g.add_argument("--pos-encoding", choices=POS_ENCODINGS, default="sinusoidal",
                   help="sinusoidal: absolute table; t5: learned relative bias; rope: rotary queries and keys")
    g.add_argument("--t5-num-buckets", type=at_least(2), default=32, help="T5 relative-position buckets")
    g.add_argument("--t5-max-distance", type=at_least(2), default=128,
                   help="T5: distances from here on share the last bucket")
    g.add_argument("--rope-base", type=positive(), default=10000.0, help="RoPE frequency base")
    g.add_argument("--norm-first", action="store_true", help="pre-LN layers (+ final LayerNorm)")
    return p


def config_from_args(args, in_dim: int) -> ModelConfig:
    return ModelConfig(in_dim=in_dim, d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers,
                       d_ff=args.d_ff, dropout=args.dropout, attn_dropout=args.attn_dropout,
                       pos_encoding=args.pos_encoding, t5_num_buckets=args.t5_num_buckets,
                       t5_max_distance=args.t5_max_distance, rope_base=args.rope_base, norm_first=args.norm_first)


def datasets_for(series, data_args: dict):
    return task_datasets(series, data_args, "masked")


def batch_loss(model, batch, device, amp):
    x, _, mask = (t.to(device, non_blocking=True) for t in batch)
    with autocast(device, amp):
        pred = model(x, mask)
    sse, n = masked_mse(pred, x, mask)
    return sse / n


def spec():
    return ModelSpec(
        model_type=MODEL_TYPE, run_prefix="masked", config_from_args=config_from_args, build=MaskedTransformer,
        datasets=datasets_for,
        data_keys=("data_dir", "seq_len", "stride", "mask_ratio", "mask_patch_size", "mask_patch_min",
                   "mask_patch_max", "val_frac", "test_frac", "seed", "train_data"),
        param_groups=lambda m, a: decay_groups(m, a.weight_decay, ("rel_bias",)),
        batch_loss=batch_loss, evaluate=evaluate_mse, plot_predictions=plot_predictions,
        describe=lambda m, c: f"{c.n_layers} layers, d_model {c.d_model}, {c.pos_encoding} positions",
        run_name=lambda a: a.pos_encoding,
        plot_title=lambda c: f"Masked model ({c.pos_encoding}, {c.n_layers} layers)",
        loss_labels=("train loss (masked MSE, training mode)", "train MSE (fixed masks, eval mode)",
                     "validation MSE (fixed masks)"),
        train_eval_windows=train_eval_windows, figures=tuple(f"bert_prediction_{i}.png" for i in range(3)),
        step_predictions=step_predictions,
        memory=activation_bytes)


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """About what one training step keeps for the backward pass: per layer the residual stream,
    queries/keys/values and feed-forward activations, and the attention probabilities (the
    fused kernel does not store them, the math path used with attention dropout or a bias does)."""
    tokens = batch * seq_len
    per_layer = tokens * (12 * cfg.d_model + 3 * cfg.d_ff) + batch * cfg.n_heads * seq_len ** 2 * 2
    return 4 * (cfg.n_layers * per_layer + tokens * (cfg.d_ff + 4 * cfg.in_dim))


def load_model(ckpt: dict) -> MaskedTransformer:
    """The model of a checkpoint written by this script (used by evaluate_representations.py)."""
    return training.load_model(ckpt, spec(), ModelConfig)


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    argv = command_argv(argv, subcommands=False)
    args = build_parser().parse_args(argv)
    if args.eval:
        return eval_main(args, spec(), ModelConfig, given_flags(build_parser, argv))
    return train_main(args, spec(), given_flags(build_parser, argv))


if __name__ == "__main__":
    sys.exit(main())
