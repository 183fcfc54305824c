"""Mamba's selective scan in pure PyTorch, fast on CPU, with the parameters of mamba_ssm.Mamba.

The recurrence, per channel d and state n:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      y_t = C_t . h_t + D * u_t

`SelectiveScan` is an autograd Function whose forward and backward each run one fused
multiply-add per time step over a (batch, channels, states) tensor; everything that does
not recur (exp(delta A), delta B u, the contraction with C and all gradients of those) is
computed for all steps at once outside the loops. Autograd through a Python loop of
slices instead allocates a full-size gradient per step, which is what makes the usual
pure-PyTorch fallback take minutes.

`MambaBlock` has exactly mamba_ssm.Mamba's parameters (in_proj, conv1d, x_proj, dt_proj,
A_log, D, out_proj) and initialisation, so state dicts move between the two; it runs
mamba_ssm's CUDA kernel when that imports and the input is on CUDA, and this scan
otherwise. `step` advances one time step from a carried (conv, ssm) state for O(T)
generation.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional CUDA kernels
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan
except Exception:  # ImportError, or a CUDA build mismatch
    _cuda_scan = None


def cuda_kernels_available() -> bool:
    return _cuda_scan is not None and torch.cuda.is_available()


class SelectiveScan(torch.autograd.Function):
    """y = scan(dA, dBu, C): dA, dBu (T, B, D, N); C (T, B, N) -> y (T, B, D), states h (T, B, D, N)."""

    @staticmethod
    def forward(ctx, dA, dBu, C):
        h = torch.empty_like(dBu)
        prev = torch.zeros_like(dBu[0])
        for t in range(dBu.shape[0]):
            prev = torch.addcmul(dBu[t], dA[t], prev, out=h[t])
        y = torch.einsum("tbdn,tbn->tbd", h, C)
        ctx.save_for_backward(dA, C, h)
        return y, h[-1].clone()

    @staticmethod
    def backward(ctx, gy, g_last):
        dA, C, h = ctx.saved_tensors
        # G_t = dL/dh_t = gy_t C_t + dA_{t+1} G_{t+1}
        G = torch.einsum("tbd,tbn->tbdn", gy, C)
        if g_last is not None:
            G[-1] += g_last
        for t in range(G.shape[0] - 2, -1, -1):
            G[t].addcmul_(dA[t + 1], G[t + 1])
        g_C = torch.einsum("tbd,tbdn->tbn", gy, h)
        g_dA = torch.empty_like(G)
        g_dA[0] = 0
        torch.mul(G[1:], h[:-1], out=g_dA[1:])
        return g_dA, G, g_C


def selective_scan(u, delta, A, B, C, D=None, z=None, return_last_state: bool = False):
    """Reference-compatible selective scan (mamba_ssm's layout).

    u, delta: (batch, D, T); A: (D, N); B, C: (batch, N, T); D: (D,); z: (batch, D, T).
    delta is used as given (apply softplus and the bias before). Returns y (batch, D, T)
    and, if asked, the last state (batch, D, N).
    """
    dl = delta.permute(2, 0, 1)                      # (T, b, D)
    dA = torch.exp(dl.unsqueeze(-1) * A)             # (T, b, D, N)
    dBu = (dl * u.permute(2, 0, 1)).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)
    y, last = SelectiveScan.apply(dA, dBu, C.permute(2, 0, 1))
    y = y.permute(1, 2, 0)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return (y, last) if return_last_state else y


class MambaBlock(nn.Module):
    """Mamba mixer: same parameter names, shapes and initialisation as mamba_ssm.Mamba."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():  # bias = softplus^-1(dt), so softplus(bias) starts at dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def _project(self, x: torch.Tensor):
        """in_proj -> causal depthwise conv + SiLU -> x_proj, channel-first: (conv input,
        u, z, dt before dt_proj, B, C); shared by both scan paths and by prefill."""
        T = x.shape[1]
        u_in, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (b, D, T) each
        u = F.silu(self.conv1d(u_in)[..., :T])
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return u_in, u, z, dt, B.transpose(1, 2), C.transpose(1, 2)

    def signals(self, x: torch.Tensor) -> dict:
        """The block's input-dependent quantities for x (batch, T, d_model), channel-first:
        u (conv output after SiLU), z, delta (after softplus), B, C."""
        _, u, z, dt, B, C = self._project(x)
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2)       # (b, D, T)
        return {"u": u, "z": z, "delta": delta, "B": B, "C": C}

    def forward(self, x: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """x (batch, T, d_model) -> (batch, T, d_model). If trace is a dict, the block's
        signals (delta, z gate, B, C) are stored in it."""
        if cuda_kernels_available() and x.is_cuda and trace is None:
            return self._forward_cuda(x)
        s = self.signals(x)
        if trace is not None:
            trace.update({k: v.detach() for k, v in s.items()})
        A = -torch.exp(self.A_log.float())
        y = selective_scan(s["u"], s["delta"], A, s["B"], s["C"], self.D.float(), s["z"])
        return self.out_proj(y.transpose(1, 2))

    def _forward_cuda(self, x):
        _, u, z, dt, B, C = self._project(x)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # the kernel adds the bias and applies softplus
        A = -torch.exp(self.A_log.float())
        y = _cuda_scan(u, dt, A, B.contiguous(), C.contiguous(), self.D.float(),
                       z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))

    # ------------------------------------------------------------------ recurrent mode

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """One time step: x (batch, d_model) -> (batch, d_model); state is updated in place."""
        u, z = self.in_proj(x).chunk(2, dim=-1)
        conv = state["conv"]
        conv.copy_(torch.roll(conv, -1, dims=-1))
        conv[:, :, -1] = u
        u = (conv * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            u = u + self.conv1d.bias
        u = F.silu(u)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        A = -torch.exp(self.A_log.float())
        h = state["ssm"]
        h.mul_(torch.exp(delta[..., None] * A)).add_(delta[..., None] * B[:, None, :] * u[..., None])
        y = (h * C[:, None, :]).sum(-1) + self.D * u
        return self.out_proj(y * F.silu(z))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Run a whole prompt (batch, T, d_model) and return the output and the carried state."""
        T = x.shape[1]
        u_in, u, z, dt, B, C = self._project(x)
        delta = F.softplus(self.dt_proj(dt)).transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        y, last = selective_scan(u, delta, A, B, C, self.D.float(), z, return_last_state=True)
        conv = F.pad(u_in, (max(0, self.d_conv - T), 0))[..., -self.d_conv:]
        return self.out_proj(y.transpose(1, 2)), {"conv": conv.contiguous(), "ssm": last.contiguous()}
