"""Causal Mamba next-step model on the circles series: train, generate, show its gates.

Model: Linear(20 -> d_model) -> N x [x + Dropout(Mamba(LayerNorm(x)))] -> LayerNorm -> one
head per horizon (Linear(d_model -> d_ff) -> GELU -> Linear(d_ff -> 20)). The Mamba block
(selective_scan.MambaBlock) has mamba_ssm's parameters; it runs mamba_ssm's CUDA kernel
when available and a fast pure-PyTorch scan otherwise, so checkpoints move between the two.

    python mamba_next.py train --data-dir data --d-state 32 --epochs 100
    python mamba_next.py train --gate-lr-factor 0          # input-dependent gates frozen exactly
    python mamba_next.py train --freeze-A                   # fixed dynamics (A_log and D frozen)
    python mamba_next.py train --max-horizon 16             # horizons 1, 2, 4, 8, 16
    python mamba_next.py generate --checkpoint runs/mamba/best.pt --gen-len 512 --perturb-hidden
    python mamba_next.py gates --checkpoint runs/mamba/best.pt --umap

train: leak-free time-block splits, validation of the next-step MSE after a warm-up of
--eval-warmup steps in each window (so every scored step has context), the noise floor
beside it, best/last checkpoints, logs and figures: the same driver as masked_model_gpu.py.
generate: O(T) generation from a held-out prompt window (--prompt-len steps of true data;
the original code called it the seed, --seed-len) with the recurrent state carried
step by step, optional Gaussian feedback noise and perturbation bursts of the hidden
(SSM) state or of the fed-back output.
gates: per layer, the input-dependent signals delta = softplus(dt_proj(.)), the z gate
silu(z), B and C, recorded from the model's own forward pass.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cliargs
import oracle
import safeio
import training
from cliargs import SEED, Parser, add_output_flags, at_least, between, non_negative
from dataset import load_series, task_datasets, time_splits, train_eval_windows
from plotting import draw_state_strip, save_figure, state_colors
from training import (ModelSpec, TrainingError, add_training_arguments, autocast, check_data_matches,
                      command_argv, eval_main, given_flags, load_checkpoint, load_exported, plot_prediction_window,
                      resolve_device, train_main)
from selective_scan import MambaBlock

MODEL_TYPE = "mamba_next"


# ----------------------------------------------------------------------------- model

def horizons_up_to(max_h: int) -> list[int]:
    """1, 2, 4, ... up to max_h, and max_h itself."""
    if max_h < 1:
        raise ValueError(f"--max-horizon must be >= 1, got {max_h}")
    out, h = [], 1
    while h <= max_h:
        out.append(h)
        h *= 2
    if out[-1] != max_h:
        out.append(max_h)
    return out


@dataclass
class MambaConfig:
    in_dim: int = 20
    d_model: int = 128
    n_layers: int = 7
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    horizons: list = field(default_factory=lambda: [1])

    def validate(self) -> None:
        if min(self.d_model, self.n_layers, self.d_state, self.d_conv, self.expand, self.d_ff) < 1:
            raise ValueError("model sizes must be positive")
        if not self.horizons or self.horizons[0] != 1:
            raise ValueError("the first horizon must be 1 (next step)")


class Residual(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.mixer = MambaBlock(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, trace=None):
        return x + self.dropout(self.mixer(self.norm(x), trace))


class MambaNext(nn.Module):
    causal = True

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_dim, cfg.d_model)
        self.layers = nn.ModuleList(Residual(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.in_dim))
            for _ in cfg.horizons)

    @classmethod
    def from_pretrained(cls, path: str) -> "MambaNext":
        """The model of an --export folder (model.safetensors + config.json); its Mamba blocks
        carry mamba_ssm's parameter names."""
        return load_exported(path, MODEL_TYPE, cls, MambaConfig)

    @property
    def layer_names(self) -> list[str]:
        return ["input"] + [str(i + 1) for i in range(self.cfg.n_layers)] + ["output"]

    def forward(self, x: torch.Tensor, return_hidden: bool = False, all_horizons: bool = False,
                trace: list | None = None):
        """x (B, T, in_dim) -> next-step prediction (B, T, in_dim) at every position.

        all_horizons: a list with one prediction per horizon instead. return_hidden: also
        the representations named by layer_names. trace: a list that receives one dict of
        gate signals per layer.
        """
        if x.shape[-1] != self.cfg.in_dim:
            raise ValueError(f"the model takes {self.cfg.in_dim}-D inputs, got {x.shape[-1]}-D")
        hidden = [x] if return_hidden else None
        h = self.embed(x)
        for layer in self.layers:
            t = {} if trace is not None else None
            h = layer(h, t)
            if trace is not None:
                trace.append(t)
            if return_hidden:
                hidden.append(h)
        z = self.final_norm(h)
        preds = [head(z) for head in self.heads] if all_horizons else self.heads[0](z)
        if return_hidden:
            hidden.append(preds[0] if all_horizons else preds)
            return preds, hidden
        return preds

    # ------------------------------------------------------------------ recurrent mode

    @torch.no_grad()
    def prefill(self, x: torch.Tensor):
        """Run a prompt (B, T, in_dim); return the prediction after its last step and the states."""
        h = self.embed(x)
        states = []
        for layer in self.layers:
            y, st = layer.mixer.prefill(layer.norm(h))
            h = h + y
            states.append(st)
        return self.heads[0](self.final_norm(h[:, -1])), states

    @torch.no_grad()
    def step(self, x: torch.Tensor, states: list) -> torch.Tensor:
        """One step (B, in_dim) -> prediction of the next step; states are advanced in place."""
        h = self.embed(x)
        for layer, st in zip(self.layers, states):
            h = h + layer.mixer.step(layer.norm(h), st)
        return self.heads[0](self.final_norm(h))


def multi_horizon_loss(preds: list, x: torch.Tensor, horizons: list) -> torch.Tensor:
    """Mean over horizons of the MSE of x[t + h] predicted at t, for t + h inside the window."""
    losses = [F.mse_loss(p[:, :-h].float(), x[:, h:].float()) for p, h in zip(preds, horizons)]
    return torch.stack(losses).mean()


# ----------------------------------------------------------------------------- training spec

def batch_loss(model, batch, device, amp):
    x = batch[0].to(device, non_blocking=True)
    with autocast(device, amp):
        preds = model(x, all_horizons=True)
    return multi_horizon_loss(preds, x, model_cfg(model).horizons)


def model_cfg(model) -> MambaConfig:
    return getattr(model, "_orig_mod", model).cfg


@torch.no_grad()
def horizon_mse(model, loader, device, amp, warmup: int) -> tuple[dict, dict | None]:
    """Per-horizon MSE of x[t + h] for positions t >= warmup - 1 in each window, against the
    data and (when the data folder has the noise-free series; else None) against the signal."""
    model.eval()
    hs = model_cfg(model).horizons
    ds = loader.dataset
    sse, ssig, n = np.zeros(len(hs)), np.zeros(len(hs)), np.zeros(len(hs))
    i0 = 0
    for x, _, _ in loader:
        x = x.to(device)
        sig = ds.signal_windows(i0, i0 + len(x))
        sig = torch.as_tensor(sig, device=device) if sig is not None else None
        i0 += len(x)
        with autocast(device, amp):
            preds = model(x, all_horizons=True)
        for i, (p, h) in enumerate(zip(preds, hs)):
            a = max(0, warmup - h)
            if x.shape[1] - h <= a:
                continue
            err = (p[:, a:-h].float() - x[:, a + h:].float()) ** 2
            sse[i] += err.sum().item()
            n[i] += err.numel()
            if sig is not None:
                ssig[i] += ((p[:, a:-h].float() - sig[:, a + h:].float()) ** 2).sum().item()
    by_h = {h: float(s / max(c, 1)) for h, s, c in zip(hs, sse, n)}
    sig_by_h = {h: float(s / max(c, 1)) for h, s, c in zip(hs, ssig, n)} if ds.signal is not None else None
    return by_h, sig_by_h


@torch.no_grad()
def step_predictions(model, loader, device, amp) -> np.ndarray:
    """The next-step prediction of every step of every window (N, L, D), made at the step before
    (step 0 has none: NaN)."""
    model.eval()
    out = []
    for x, _, _ in loader:
        with autocast(device, amp):
            p = model(x.to(device)).float().cpu().numpy()
        out.append(np.concatenate([np.full_like(p[:, :1], np.nan), p[:, :-1]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, loader.dataset.seq_len, model_cfg(model).in_dim))


def make_spec():
    """The model spec. Evaluation takes its warm-up from the windows it scores (set by
    datasets_for from the run's own data arguments), never from the parser's defaults."""

    def evaluate(model, loader, device, amp):
        by_h, sig = horizon_mse(model, loader, device, amp, loader.dataset.eval_warmup)
        return {"mse": by_h[1], "signal_mse": sig[1] if sig else None}

    def final_metrics(model, loaders, device, amp):
        out = {}
        for name, loader in zip(("val", "test"), loaders):
            if loader is not None:
                by_h, sig = horizon_mse(model, loader, device, amp, loader.dataset.eval_warmup)
                out[f"{name}_mse_by_horizon"] = by_h
                if sig:
                    out[f"{name}_signal_mse_by_horizon"] = sig
        return out

    return ModelSpec(
        model_type=MODEL_TYPE, run_prefix="mamba", config_from_args=config_from_args, build=MambaNext,
        datasets=datasets_for, data_keys=("data_dir", "seq_len", "stride", "val_frac", "test_frac", "seed",
                                          "eval_warmup", "train_data"),
        param_groups=param_groups, batch_loss=batch_loss, evaluate=evaluate, plot_predictions=plot_predictions,
        describe=lambda m, c: (f"{c.n_layers} Mamba layers, d_model {c.d_model}, d_state {c.d_state}, "
                               f"horizons {c.horizons}"),
        run_name=lambda a: f"h{a.max_horizon}" + ("_gate0" if a.gate_lr_factor == 0 else "")
        + ("_freezeA" if a.freeze_A else ""),
        final_metrics=final_metrics, plot_title=lambda c: f"Mamba next-step model ({c.n_layers} layers)",
        task="next", train_eval_windows=train_eval_windows,
        loss_labels=("train loss (next-step MSE over the horizons, training mode)",
                     "train next-step MSE (eval mode, after the warm-up)", "validation next-step MSE (after the warm-up)"),
        figures=tuple(f"mamba_prediction_{i}.png" for i in range(3)), memory=activation_bytes,
        step_predictions=step_predictions)


def activation_bytes(cfg: MambaConfig, batch: int, seq_len: int) -> int:
    """About what one training step keeps: per layer the scan's (steps, batch, channels, states)
    tensors (decay, input, states and their gradient) and the block's other activations."""
    tokens = batch * seq_len
    d_inner = cfg.expand * cfg.d_model
    per_layer = tokens * d_inner * cfg.d_state * 4 + tokens * (10 * d_inner + 4 * cfg.d_model)
    return 4 * (cfg.n_layers * per_layer + tokens * len(cfg.horizons) * (cfg.d_ff + 2 * cfg.in_dim))


def datasets_for(series, data_args: dict):
    """Windows without masks; evaluation windows overlap by the warm-up so each scored step
    (after the warm-up) is scored once."""
    return task_datasets(series, data_args, "next")


GATE_PARAMS = ("mixer.x_proj.", "mixer.dt_proj.")
DYNAMICS_PARAMS = ("mixer.A_log", "mixer.D")


def param_groups(model, args) -> list[dict]:
    """AdamW groups. Gates (x_proj, dt_proj) at lr x gate_lr_factor, frozen exactly when it
    is 0; --freeze-A freezes A_log and D. No weight decay on biases, norms, A_log and D."""
    groups = {"decay": [], "plain": [], "gate_decay": [], "gate_plain": []}
    frozen = trainable = 0
    for n, p in model.named_parameters():
        gate = any(k in n for k in GATE_PARAMS)
        dyn = any(n.endswith(k) for k in DYNAMICS_PARAMS)
        if (gate and args.gate_lr_factor == 0) or (dyn and args.freeze_A):
            p.requires_grad_(False)
            frozen += p.numel()
            continue
        trainable += p.numel()
        decay = p.ndim >= 2 and not dyn
        groups[("gate_" if gate else "") + ("decay" if decay else "plain")].append(p)
    print(f"parameters: {trainable:,} trainable, {frozen:,} frozen"
          + (" (gates x_proj, dt_proj frozen)" if args.gate_lr_factor == 0 else "")
          + (" (A_log, D frozen)" if args.freeze_A else ""))
    out = [{"params": groups["decay"], "weight_decay": args.weight_decay},
           {"params": groups["plain"], "weight_decay": 0.0}]
    if args.gate_lr_factor != 0:
        out += [{"params": groups["gate_decay"], "weight_decay": args.weight_decay, "lr": args.lr * args.gate_lr_factor},
                {"params": groups["gate_plain"], "weight_decay": 0.0, "lr": args.lr * args.gate_lr_factor}]
    return [g for g in out if g["params"]]


def config_from_args(args, in_dim: int) -> MambaConfig:
    return MambaConfig(in_dim=in_dim, d_model=args.d_model, n_layers=args.n_layers, d_state=args.d_state,
                       d_conv=args.d_conv, expand=args.expand, d_ff=args.d_ff, dropout=args.dropout,
                       horizons=horizons_up_to(args.max_horizon))


def load_model(ckpt: dict) -> MambaNext:
    """The model of a checkpoint written by this script (used by evaluate_representations.py)."""
    return training.load_model(ckpt, make_spec(), MambaConfig)


# ----------------------------------------------------------------------------- figures

def nearest_circle(points: np.ndarray, planes: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Index of the circle closest to each point (distance to the circle, not its plane)."""
    p = np.einsum("ckd,td->tck", planes, points)          # coordinates in each plane
    inplane = np.linalg.norm(p, axis=-1)                  # (T, C)
    off = np.maximum((points ** 2).sum(-1, keepdims=True) - inplane ** 2, 0.0)
    return np.argmin(off + (inplane - radii[None]) ** 2, axis=1)


@torch.no_grad()
def plot_predictions(model, dataset, device, plots_dir, n_states, amp=False, n_windows=3) -> list[str]:
    """Per held-out window: state strip, truth, next-step prediction, squared error."""
    model.eval()
    paths = []
    for j, i in enumerate(np.linspace(0, len(dataset) - 1, n_windows).round().astype(int)):
        x, s, _ = dataset[int(i)]
        with autocast(device, amp):
            pred = model(torch.as_tensor(x, device=device)[None])[0].float().cpu().numpy()
        pred = np.concatenate([np.full((1, x.shape[1]), np.nan), pred[:-1]])  # prediction of step t made at t-1
        err = (pred - x) ** 2
        p = plot_prediction_window(
            os.path.join(plots_dir, f"mamba_prediction_{j}.png"), x, s, pred, err, n_states,
            f"Held-out window at step {int(dataset.starts[i])}: next-step MSE {np.nanmean(err):.2f}",
            "next-step\nprediction", "sq. error")
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- generate

@dataclass
class Perturbation:
    kind: str = "none"           # none | hidden | output
    layers: tuple = ()           # hidden: which layers (0-based)
    interval: int = 128          # a burst starts every `interval` generated steps
    duration: int = 8            # and lasts this many steps
    scale: float = 1.0           # std of the added Gaussian noise

    def active(self, t: int) -> bool:
        return self.kind != "none" and t % self.interval < self.duration


@torch.no_grad()
def generate(model: MambaNext, prompt: torch.Tensor, gen_len: int, temperature: float = 0.0,
             perturb: Perturbation = Perturbation(), generator: torch.Generator | None = None) -> np.ndarray:
    """Generate gen_len steps after prompt (T0, in_dim) with the recurrent state: O(T).

    Each generated output is fed back as the next input, plus N(0, temperature^2) noise.
    Hidden perturbations add noise to the SSM state of chosen layers, so it persists
    through the recurrence; output perturbations add noise to the fed-back value.
    """
    model.eval()
    dev = prompt.device
    pred, states = model.prefill(prompt[None])
    out = np.empty((gen_len, prompt.shape[-1]), dtype=np.float32)

    def noise(shape):
        return torch.randn(shape, generator=generator, device="cpu").to(dev)

    for t in range(gen_len):
        out[t] = pred[0].cpu().numpy()
        if t == gen_len - 1:
            break
        x = pred
        if temperature > 0:
            x = x + temperature * noise(x.shape)
        if perturb.active(t):
            if perturb.kind == "output":
                x = x + perturb.scale * noise(x.shape)
            else:
                for li in perturb.layers:
                    states[li]["ssm"] += perturb.scale * noise(states[li]["ssm"].shape)
        pred = model.step(x, states)
    return out


@torch.no_grad()
def generate_recompute(model: MambaNext, prompt: torch.Tensor, gen_len: int) -> np.ndarray:
    """The O(T^2) baseline: rerun the whole sequence for every new step (no noise)."""
    model.eval()
    seq = prompt[None]
    out = []
    for _ in range(gen_len):
        nxt = model(seq)[:, -1]
        out.append(nxt[0].cpu().numpy())
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return np.stack(out)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def run_generate(args) -> int:
    """generate: read the checkpoint and data, choose the prompt window, generate, score against
    the true continuation and the oracle's forecast, write the arrays, JSON and figure."""
    ckpt = load_checkpoint(args.checkpoint, MODEL_TYPE)
    device = resolve_device(args.device)
    model = load_model(ckpt).to(device)
    series = load_series(args.data_dir or ckpt["data"]["data_dir"])
    training.check_same_data(ckpt, series, args.data_dir is not None)
    check_data_matches(ckpt["model_config"], series, ckpt["path"])
    safeio.check_fits(args.gen_len * (series.dim * 64 + 64), f"a generation of {args.gen_len:,} steps",
                      "use a smaller --gen-len")
    start, end, known = prompt_window(args, series, ckpt["data"])
    pert = perturbation(args, model.cfg.n_layers)
    out_dir = args.out_dir or os.path.join(os.path.dirname(ckpt["path"]), "generate")
    plots_dir = cliargs.plots_dir(args, out_dir)
    tag = f"gen_{pert.kind}" if pert.kind != "none" else "gen"
    paths = [os.path.join(out_dir, f"{tag}.npy"), os.path.join(out_dir, f"{tag}.json"),
             os.path.join(plots_dir, f"{tag}.png")]
    out = claim_run_outputs(args, f"generate {tag}", out_dir, plots_dir, paths)
    prompt = torch.as_tensor(series.X[start:start + args.prompt_len], device=device)
    t0 = time.perf_counter()
    gen = generate(model, prompt, args.gen_len, args.temperature, pert, torch.Generator().manual_seed(args.seed))
    secs = time.perf_counter() - t0
    report, ref, decoded = score_generation(args, series, gen, start, end, known)
    report = {"checkpoint": ckpt["path"], "start": start, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
              "steps_with_truth": known, "temperature": args.temperature,
              "perturbation": pert.__dict__ | {"layers": list(pert.layers)}, "seconds": secs,
              "steps_per_second": args.gen_len / secs, "noise_floor": series.noise_var, **report}
    safeio.output_dir(out_dir)
    safeio.save_npy(out.target(paths[0]), gen)
    out.write_json(paths[1], report)
    p = None
    if not args.no_plot:
        safeio.output_dir(plots_dir, "--plots-dir")
        p = plot_generation(args, series, gen, ref, decoded, pert, start, end, known, out.target(paths[2]))
    orc = (f"; oracle forecast {report['oracle_mse_first_16']:.2f}" if "oracle_mse_first_16" in report else "")
    print(f"generated {args.gen_len} steps in {secs:.2f} s ({args.gen_len / secs:.0f} steps/s); "
          f"MSE first 16: {report.get('mse_first_16', float('nan')):.2f} (noise floor {series.noise_var}{orc})")
    for name, st in report.get("process", {}).items():
        print(f"{name:18s} decoded by the oracle: {st['n_visits']} visits, dwell KS {_fmt(st['dwell_ks'])}, "
              f"transition TV {_fmt(st['transition_tv'])}, occupancy TV {st['occupancy_tv']:.2f}, "
              f"angular speed x{_fmt(st['angular_speed_ratio_median'])} of the true")
    print(f"wrote {out_dir}/{tag}.npy, {tag}.json" + (f", {p}" if p else ""))
    return 0


def claim_run_outputs(args, key: str, out_dir: str, plots_dir: str, paths: list[str]) -> safeio.Outputs:
    """Check the output folders and claim what generate / gates write (declared paths and what the
    same command recorded there before), before any long work; one line (TrainingError) otherwise."""
    try:
        safeio.output_dir(out_dir, "--out-dir", create=False)
        if not args.no_plot:
            safeio.output_dir(plots_dir, "--plots-dir", create=False)
        out = safeio.Outputs(key, args.force)
        out.claim(paths, folders=[out_dir, plots_dir])
    except safeio.InputError as e:
        raise TrainingError(str(e)) from None
    return out


def prompt_window(args, series, data: dict) -> tuple[int, int, int]:
    """(start of the prompt, end of the generation, generated steps with a true continuation):
    --start, --from-end, or the start of the held-out block (test, else validation)."""
    sp = time_splits(series.n_steps, data["seq_len"], data["val_frac"], data["test_frac"])
    block = sp.test if sp.test[1] > sp.test[0] else sp.val
    if args.from_end and args.start is not None:
        raise TrainingError("give --start or --from-end, not both")
    start = series.n_steps - args.prompt_len if args.from_end else args.start if args.start is not None else block[0]
    if start < 0 or start + args.prompt_len > series.n_steps:
        raise TrainingError(f"the {args.prompt_len}-step prompt from step {start} does not fit in the series "
                            f"({series.n_steps} steps); lower --prompt-len or --start")
    end = start + args.prompt_len + args.gen_len
    known = min(end, series.n_steps) - (start + args.prompt_len)
    if not args.from_end and (start < block[0] or min(end, series.n_steps) > block[1]):
        print(f"note: steps {start}..{min(end, series.n_steps)} are not all inside the held-out block {block}")
    if known < args.gen_len:
        print(f"note: the series ends {known} steps into the generation; the other {args.gen_len - known} "
              f"generated steps have no true continuation to compare with")
    return start, end, known


def perturbation(args, n_layers: int) -> Perturbation:
    """The perturbation bursts the flags ask for (kind none without --perturb-*)."""
    try:
        layers = tuple(int(i) - 1 for i in args.perturb_layers.split(",")) if args.perturb_layers else \
            tuple(range(n_layers))
    except ValueError:
        raise TrainingError(f"--perturb-layers {args.perturb_layers!r:.40}: give layer numbers such as 1,3") from None
    if any(not 0 <= li < n_layers for li in layers):
        raise TrainingError(f"--perturb-layers must name layers 1..{n_layers}")
    kind = "hidden" if args.perturb_hidden else "output" if args.perturb_output else "none"
    return Perturbation(kind, layers, args.perturb_interval, args.perturb_duration, args.perturb_scale)


def score_generation(args, series, gen: np.ndarray, start: int, end: int, known: int):
    """The generation's MSE against the true continuation and the noise-free signal over its
    first 1/8/16/64/256 steps, beside the oracle's open-loop forecast from the same prompt; the
    process statistics of both as the oracle decodes them; how often the nearest circle is the
    true one. Returns (report, the oracle's forecast or None, the decoded circles or None)."""
    p0 = start + args.prompt_len
    truth = series.X[p0:end]  # only the first `known` steps exist
    clean = series.signal[p0:end] if series.signal is not None else None
    err = ((gen[:known] - truth) ** 2).mean(1)
    report: dict = {}
    try:
        chain = oracle.Chain.from_series(series)
    except oracle.OracleError as e:
        chain = None
        print(f"no oracle: {e}")
    ref = oracle.forecast(chain, series.X[start:p0], args.gen_len) if chain else None
    for n in (1, 8, 16, 64, 256):
        if n <= known:
            report[f"mse_first_{n}"] = float(err[:n].mean())
            if clean is not None:
                report[f"mse_to_signal_first_{n}"] = float(((gen[:n] - clean[:n]) ** 2).mean())
            if ref is not None:  # the Bayes-optimal open-loop forecast from the same prompt
                report[f"oracle_mse_first_{n}"] = float(((ref[:n] - truth[:n]) ** 2).mean())
                if clean is not None:
                    report[f"oracle_mse_to_signal_first_{n}"] = float(((ref[:n] - clean[:n]) ** 2).mean())
    if chain is not None:
        dm, ds_ = float(series.config["dwell_mean"]), float(series.config["dwell_std"])
        report["process"] = {"generated": oracle.process_statistics(chain, gen, dm, ds_)}
        if known >= 2:
            report["process"]["true_continuation"] = oracle.process_statistics(chain, truth, dm, ds_)
        # the sampling noise of these statistics at this length: a draw of the process itself, as long as
        # the generation (draw index 10**6 + seed: never a training epoch's draw), decoded the same way
        from circles import Process, fresh_draw
        draw = fresh_draw(Process.from_series(series), int(series.config.get("seed", 0)), 10 ** 6 + args.seed,
                          args.gen_len)
        report["process"]["process_draw"] = oracle.process_statistics(chain, draw["X"], dm, ds_)
        # the exact predictor generating the way the model does (its predictive mean fed back, plus the same
        # temperature's noise; no hidden-state bursts): what the generation scheme itself allows
        roll = oracle.rollout(chain, series.X[start:p0], args.gen_len, args.temperature,
                              rng=np.random.default_rng(args.seed))
        report["process"]["oracle_rollout"] = oracle.process_statistics(chain, roll, dm, ds_)
    decoded = None
    if series.has_labels and "planes" in series.extra and "radii" in series.extra:
        decoded = nearest_circle(gen, series.extra["planes"], series.extra["radii"])
        if known:
            report["decoded_matches_true_circle"] = float(np.mean(decoded[:known] == series.states[p0:end]))
    return report, ref, decoded


def plot_generation(args, series, gen, ref, decoded, pert: Perturbation, start: int, end: int, known: int,
                    path: str) -> str:
    """True and decoded state strips, true and generated series, and the error with the
    perturbation bursts shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    p0 = start + args.prompt_len
    truth = series.X[p0:end]
    err = ((gen[:known] - truth) ** 2).mean(1)
    fig, axes = plt.subplots(5, 1, figsize=(13, 9), sharex=True,
                             gridspec_kw={"height_ratios": [1, 1, 5, 5, 3], "hspace": 0.12})
    n_states = series.n_states
    if known:
        draw_state_strip(axes[0], series.states[p0:end], n_states, extent_x=(0, known))
    axes[0].set_xlim(0, args.gen_len)
    axes[0].set_ylabel("true", rotation=0, ha="right")
    if decoded is not None:
        draw_state_strip(axes[1], decoded, n_states)
    axes[1].set_ylabel("decoded", rotation=0, ha="right")
    lim = np.percentile(np.abs(truth if known else gen), 99)
    padded = np.full_like(gen, np.nan)
    padded[:known] = truth
    axes[2].imshow(padded.T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[2].set_ylabel("true continuation")
    axes[3].imshow(gen.T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    axes[3].set_ylabel("generated")
    axes[4].plot(err, lw=0.8, label="generated")
    if ref is not None:
        axes[4].plot(((ref[:known] - truth) ** 2).mean(1), lw=0.8, color="tab:red", alpha=0.8,
                     label="oracle forecast from the same prompt")
    if series.noise_var:
        axes[4].axhline(series.noise_var, color="k", ls="--", lw=1, label="noise floor")
    if pert.kind != "none":
        for t in range(args.gen_len):
            if pert.active(t) and not pert.active(t - 1):
                axes[4].axvspan(t, t + pert.duration, color="red", alpha=0.15)
    axes[4].set_ylabel("sq. error")
    axes[4].legend(loc="upper right", fontsize=8)
    axes[4].set_xlabel("generated step")
    axes[0].set_title(f"Generation from a {args.prompt_len}-step held-out prompt at step {start} "
                      f"(temperature {args.temperature}, perturbation: {pert.kind})")
    return save_figure(fig, path, dpi=100, tight=False, bbox_inches="tight")


# ----------------------------------------------------------------------------- gates

def plot_mean_delta(summary: dict, circles, n: int, plots_dir: str, out=None) -> list[str]:
    """Mean step size delta per layer, over all recorded steps and per circle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, n + 1), summary["mean_delta"], "ko-", label="all steps")
    for c in circles:
        ax.plot(np.arange(1, n + 1), [m[int(c)] for m in summary["mean_delta_by_circle"]], lw=0.8, alpha=0.7,
                label=f"circle {c}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean delta (softplus(dt))")
    ax.set_title("Mean step size delta per layer")
    ax.legend(fontsize=6, ncol=2)
    p = os.path.join(plots_dir, "gates_mean_delta.png")
    return [save_figure(fig, out.target(p) if out else p, dpi=110)]


def run_gates(args) -> int:
    """gates: record every layer's gate signals on held-out windows, draw the chosen windows,
    summarise the mean step size per layer (and per circle), optionally a UMAP of each signal."""
    ckpt = load_checkpoint(args.checkpoint, MODEL_TYPE)
    device = resolve_device(args.device)
    model = load_model(ckpt).to(device).eval()
    series = load_series(args.data_dir or ckpt["data"]["data_dir"])
    training.check_same_data(ckpt, series, args.data_dir is not None)
    check_data_matches(ckpt["model_config"], series, ckpt["path"])
    val = datasets_for(series, ckpt["data"])["val"]
    out_dir = args.out_dir or os.path.join(os.path.dirname(ckpt["path"]), "gates")
    plots_dir = cliargs.plots_dir(args, out_dir)
    n = model.cfg.n_layers
    idx, plotted = gate_windows(args, n, len(val))
    jp = os.path.join(out_dir, "gates_summary.json")
    # the figures are not all known before drawing: the ones this command recorded earlier count too
    out = claim_run_outputs(args, "gates", out_dir, plots_dir,
                            [jp] + [os.path.join(plots_dir, f) for f in ("gates_mean_delta.png", "gates_umap.png")])
    safeio.output_dir(out_dir)
    if not args.no_plot:
        safeio.output_dir(plots_dir, "--plots-dir")
    layers = [args.layer - 1] if args.layer is not None else list(range(n))
    written, traces = [], []
    for j, i in enumerate(idx):
        x, s, _ = val[int(i)]
        trace: list = []
        with torch.no_grad():
            model(torch.as_tensor(x, device=device)[None], trace=trace)
        traces.append((trace, s))
        if int(i) in plotted:
            name = (f"gates_sample_{int(i) if args.sample is not None else j}"
                    f"{'' if args.layer is None else f'_layer{args.layer}'}.png")
            written.append(plot_gate_window(trace, s, layers, int(val.starts[i]), series.n_states,
                                            out.target(os.path.join(plots_dir, name))))
    states_cat = np.concatenate([s for _, s in traces])
    circles = np.unique(states_cat) if series.has_labels else []  # no labels: overall means only
    summary = {"mean_delta": [], "mean_delta_by_circle": []}
    for li in range(n):
        d = np.concatenate([tr[li]["delta"][0].float().cpu().numpy().T for tr, _ in traces])  # (T, D)
        summary["mean_delta"].append(float(d.mean()))
        summary["mean_delta_by_circle"].append({int(c): float(d[states_cat == c].mean()) for c in circles})
    if not args.no_plot:
        written += plot_mean_delta(summary, circles, n, plots_dir, out)
    if args.umap and not args.no_plot:
        written.append(plot_gate_umap(args, traces, states_cat, series, n, out.target(os.path.join(plots_dir,
                                                                                                  "gates_umap.png"))))
    written.append(out.write_json(jp, summary))
    print("mean delta per layer: " + ", ".join(f"{m:.4f}" for m in summary["mean_delta"]))
    print("wrote " + ", ".join(written))
    return 0


def gate_windows(args, n_layers: int, n_windows: int) -> tuple[np.ndarray, set]:
    """The held-out windows recorded (--samples of them, evenly spread; --sample first) and the
    ones drawn (the first --plot-samples, or just --sample; none with --no-plot)."""
    if args.layer is not None and args.layer > n_layers:
        raise TrainingError(f"--layer {args.layer}: this model has layers 1..{n_layers}")
    if args.sample is not None and args.sample >= n_windows:
        raise TrainingError(f"--sample {args.sample}: the validation block has windows 0..{n_windows - 1}")
    idx = np.linspace(0, n_windows - 1, min(args.samples, n_windows)).round().astype(int)
    plotted = {int(i) for i in idx[:args.plot_samples]}
    if args.sample is not None:  # that window, recorded and drawn (first), and no other drawn
        idx = np.concatenate(([args.sample], idx[idx != args.sample]))
        plotted = {args.sample}
    return idx, set() if args.no_plot else plotted


def plot_gate_window(trace: list, states: np.ndarray, layers: list, step: int, n_states: int, path: str) -> str:
    """delta, silu(z), B and C of one window, a row per layer, over the window's state strip."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(layers), 4, figsize=(18, 2.2 * len(layers) + 1), squeeze=False)
    for row, li in enumerate(layers):
        t = trace[li]
        sig = {"delta": t["delta"][0], "silu(z)": F.silu(t["z"][0]), "B": t["B"][0], "C": t["C"][0]}
        for c, (name, arr) in enumerate(sig.items()):
            ax = axes[row, c]
            ax.imshow(arr.float().cpu().numpy(), aspect="auto", interpolation="nearest",
                      cmap="viridis" if name in ("delta", "silu(z)") else "RdBu_r")
            if row == 0:
                ax.set_title(name)
            if c == 0:
                ax.set_ylabel(f"layer {li + 1}")
            ax.set_xticks([])
    fig.suptitle(f"Gate signals for the held-out window at step {step} "
                 f"(rows: layers; delta, silu(z): channels x time; B, C: states x time)")
    draw_state_strip(fig.add_axes([0.125, 0.01, 0.775, 0.015]), states, n_states)
    return save_figure(fig, path, dpi=90, tight=False, bbox_inches="tight")


def plot_gate_umap(args, traces: list, states_cat: np.ndarray, series, n: int, path: str) -> str:
    """UMAP of each gate signal across the recorded steps, per layer, coloured by circle (or by
    recorded step for a series without labels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import umap
    rng = np.random.default_rng(args.seed)
    sel = rng.choice(len(states_cat), size=min(args.umap_points, len(states_cat)), replace=False)
    colour = np.array(state_colors(series.n_states))[states_cat[sel]] if series.has_labels else np.argsort(sel)
    fig, axes = plt.subplots(4, n, figsize=(2.6 * n, 10.5), squeeze=False)
    for c, name in enumerate(("delta", "z", "B", "C")):
        for li in range(n):
            act = F.silu if name == "z" else (lambda t: t)  # the gate acts as silu(z)
            sig = np.concatenate([act(tr[li][name][0]).float().cpu().numpy().T for tr, _ in traces])[sel]
            emb = umap.UMAP(n_neighbors=30, min_dist=0.1, n_jobs=1, random_state=args.seed).fit_transform(sig)
            ax = axes[c, li]
            ax.scatter(emb[:, 0], emb[:, 1], c=colour, s=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(f"layer {li + 1}")
            if li == 0:
                ax.set_ylabel("silu(z)" if name == "z" else name)
    fig.suptitle("UMAP of each gate signal across time steps, coloured by "
                 + ("circle" if series.has_labels else "recorded step"))
    return save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Causal Mamba next-step model: train, eval CKPT (the same as train --eval CKPT), "
                           "generate, gates.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or --eval a checkpoint; `eval CKPT [flags]` says the same)")
    add_training_arguments(t, seq_len=512, stride=128, batch_size=32, lr=1e-3, warmup_epochs=20, epochs=100)
    g = t.add_argument_group("model")
    g.add_argument("--d-model", type=at_least(1), default=128, help="width of the residual stream")
    g.add_argument("--n-layers", type=at_least(1), default=7, help="Mamba layers")
    g.add_argument("--d-state", type=at_least(1), default=16, help="SSM state size per channel")
    g.add_argument("--d-conv", type=at_least(1), default=4, help="width of the causal depthwise convolution")
    g.add_argument("--expand", type=at_least(1), default=2, help="inner width = expand x d_model")
    g.add_argument("--d-ff", type=at_least(1), default=512, help="width of the feed-forward layer after each block")
    g.add_argument("--dropout", type=between(0, 1, open_hi=True), default=0.1, help="dropout in every layer")
    g.add_argument("--max-horizon", type=at_least(1), default=1,
                   help="train heads for horizons 1, 2, 4, ... up to this")
    g.add_argument("--gate-lr-factor", type=non_negative(), default=1.0,
                   help="learning-rate factor of the gates x_proj, dt_proj (0 freezes them exactly)")
    g.add_argument("--freeze-A", action="store_true", help="freeze A_log and D (fixed dynamics)")
    g.add_argument("--eval-warmup", type=at_least(0), default=None,
                   help="steps of context before scoring in each evaluation window (default seq_len/4)")
    for name, help_ in (("generate", "generate from a held-out prompt window"), ("gates", "plot the gate signals")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--checkpoint", required=True, help="a best.pt / last.pt of mamba_next.py train")
        s.add_argument("--data-dir", default=None, help="default: the data the model was trained on")
        s.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu or cuda")
        s.add_argument("--seed", type=SEED, default=0, help="seed of the sampling noise and perturbations")
        add_output_flags(s, None, "numbers and arrays (default <run folder>/" + name + ")")
        s.add_argument("--force", action="store_true", help="replace this command's earlier outputs (removed first)")
        if name == "generate":
            s.add_argument("--prompt-len", "--seed-len", dest="prompt_len", type=at_least(1), default=64,
                           help="steps of true data the model reads before generating (--seed-len: the original "
                                "code's name)")
            s.add_argument("--gen-len", type=at_least(1), default=512, help="steps to generate")
            s.add_argument("--start", type=at_least(0), default=None,
                           help="first step of the prompt (default: test block start); generation may run past "
                                "the end of the series, and only steps with a true continuation are scored")
            s.add_argument("--from-end", action="store_true",
                           help="prompt with the series' last --prompt-len steps: continue the series itself")
            s.add_argument("--temperature", type=non_negative(), default=0.0,
                           help="std of noise added to fed-back outputs")
            s.add_argument("--perturb-hidden", action="store_true", help="bursts of noise in the SSM states")
            s.add_argument("--perturb-output", action="store_true", help="bursts of noise in the fed-back output")
            s.add_argument("--perturb-layers", default="", help="layers (1-based, comma-separated); default all")
            s.add_argument("--perturb-interval", type=at_least(1), default=128, help="steps between bursts")
            s.add_argument("--perturb-duration", type=at_least(1), default=8, help="steps per burst")
            s.add_argument("--perturb-scale", type=non_negative(), default=1.0, help="std of the burst noise")
        else:
            s.add_argument("--samples", type=at_least(1), default=16, help="held-out windows to record")
            s.add_argument("--plot-samples", type=at_least(0), default=2, help="of which this many get heatmaps")
            s.add_argument("--sample", type=at_least(0), default=None,
                           help="heatmaps of this held-out window only (index into the validation windows; "
                                "the original code's --sample)")
            s.add_argument("--layer", type=at_least(1), default=None,
                           help="heatmaps of this layer only (1-based; the original code's --layer)")
            s.add_argument("--umap", action="store_true", help="UMAP of each signal across time steps")
            s.add_argument("--umap-points", type=at_least(10), default=3000, help="time steps in each UMAP")
    return p


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    argv = command_argv(argv, subcommands=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        if args.perturb_hidden and args.perturb_output:
            raise TrainingError("choose one of --perturb-hidden and --perturb-output")
        return run_generate(args)
    if args.command == "gates":
        return run_gates(args)
    if not args.resume and not args.eval and args.max_horizon >= args.seq_len:
        raise TrainingError(f"--max-horizon {args.max_horizon} leaves nothing to predict in windows of "
                            f"--seq-len {args.seq_len}; use a horizon below the window length")
    if args.eval_warmup is None:
        args.eval_warmup = args.seq_len // 4
    spec = make_spec()
    if args.eval:
        return eval_main(args, spec, MambaConfig, given_flags(build_parser, argv))
    return train_main(args, spec, given_flags(build_parser, argv))


if __name__ == "__main__":
    sys.exit(main())
