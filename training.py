"""Training infrastructure shared by the sequence models (masked_model_gpu.py, mamba_next.py).

Device and precision (BF16 autocast and torch.compile on CUDA, plain fp32 on CPU), a
linear-warmup + cosine schedule, atomic checkpoints that hold everything needed to resume,
the CSV log, the noise-floor report, the loss-curve and prediction figures, and `fit`, the
epoch loop itself: the scripts provide the model, the batch loss and the evaluation.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch

import cliargs
import oracle
import safeio
from checkpoints import (DATA_FIELDS, TrainingError, check_checkpoint_fields, load_checkpoint, plain,  # noqa: F401
                         safe_load, save_checkpoint)
from cliargs import SEED, at_least, between, non_negative, positive
from dataset import load_series
from plotting import draw_state_strip, save_figure

LOSS_LABELS = ("train loss", "train MSE (eval mode)", "validation MSE")  # a model spec gives its own words


# ----------------------------------------------------------------------------- device

def resolve_device(name: str) -> torch.device:
    """cliargs.resolve_device as a torch.device; a missing CUDA device is a TrainingError."""
    try:
        return torch.device(cliargs.resolve_device(name))
    except ValueError as e:
        raise TrainingError(str(e)) from None


def autocast(device: torch.device, amp: bool):
    """BF16 autocast on the device when amp is on (CUDA by default, the CPU with --cpu-bf16); a no-op otherwise."""
    if amp and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def use_amp(device: torch.device, args) -> bool:
    """BF16 autocast: on CUDA unless --no-amp, on the CPU only with --cpu-bf16."""
    if device.type == "cuda":
        return not args.no_amp
    return device.type == "cpu" and bool(getattr(args, "cpu_bf16", False))


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    if not enabled:
        return model
    return torch.compile(model)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state as tensors and plain numbers, so that a checkpoint holding it
    loads with torch.load(weights_only=True)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
          "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py, nps = st["python"], st["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np.random.set_state((nps["kind"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                         nps["cached_gaussian"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------- schedule

def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to each group's lr, then cosine decay to min_ratio x lr.

    The schedule multiplies each group's own base lr, so a group with lr 0 stays at 0.
    """
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- checkpoints

def claim_outputs(paths: list[str], force: bool, key: str | None = None) -> list[str]:
    """cliargs.claim_outputs; earlier outputs without force are a TrainingError."""
    try:
        return cliargs.claim_outputs(paths, force, key)
    except cliargs.OutputsExist as e:
        raise TrainingError(str(e)) from None


_LOCKS: dict[str, Any] = {}


def run_lock(out_dir: str):
    """An exclusive lock on a run folder (flock on <out_dir>/.lock), held by this process until
    it exits; a second run into the same folder gets one clear error."""
    key = os.path.abspath(out_dir)
    if key in _LOCKS:
        return _LOCKS[key]
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no flock (Windows): no lock
        pass
    except OSError:
        f.close()
        raise TrainingError(f"another run is writing {out_dir}; wait for it to finish, or choose another --out-dir")
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _LOCKS[key] = f
    return f


def release_run_lock(out_dir: str) -> None:
    f = _LOCKS.pop(os.path.abspath(out_dir), None)
    if f is not None:
        f.close()


replacing = safeio.atomic_path  # the one atomic writer: a temporary file renamed onto the target


def check_resumable(ckpt: dict, path: str) -> None:
    """What a resumed run restores (fit state, optimiser, schedule, random states), checked first."""
    try:
        for k in ("fit_state", "optimizer", "scheduler", "rng", "args"):
            safeio.check_field(ckpt, k, dict, path)
        st, where = ckpt["fit_state"], f"{path} (fit_state)"
        unknown = set(st) - {f.name for f in fields(FitState)}
        if unknown:
            raise safeio.InputError(f"{where}: unknown field(s) {sorted(unknown)[:3]}")
        for k in ("epoch", "step"):
            safeio.check_field(st, k, int, where, lo=0)
        safeio.check_field(st, "best_epoch", int, where, lo=-1)
        safeio.check_field(st, "stopped_early", str, where)
        safeio.check_field(st, "history", list, where)
        if not isinstance(st.get("best_val"), (int, float)) or isinstance(st.get("best_val"), bool):
            raise safeio.InputError(f"{where}: the field 'best_val' must be a number")
        if not isinstance(ckpt.get("loader_rng"), torch.Tensor):
            raise safeio.InputError(f"{path}: the field 'loader_rng' must be a tensor")
    except safeio.InputError as e:
        raise TrainingError(f"{e}; this file cannot be resumed (only a last.pt written by this project's "
                            f"training can)") from None


# ----------------------------------------------------------------------------- reporting

def floor_note(mse: float, floor: float | None, oracle: float | None = None) -> str:
    """An MSE beside the noise floor and, when known, the Bayes-optimal predictor's MSE on the same steps."""
    if floor is None or not floor > 0:
        return f"{mse:.4f}"
    ref = f"; oracle {oracle:.3f}" if oracle is not None else ""
    return f"{mse:.4f} (noise floor {floor:.3f}, {100 * (mse / floor - 1):+.1f}%{ref})"


def ratio_known(value: float, oracle: float | None) -> bool:
    """Whether value / oracle means something: an oracle error of (almost) zero, as on a window
    of a single circle whose phase the oracle has pinned, gives a ratio of no use."""
    return bool(oracle) and oracle > 1e-4 * abs(value)


def signal_note(signal_mse: float | None, oracle_signal: float | None) -> str:
    """'signal MSE 0.41 = 6.2x the oracle's 0.066' (empty without a noise-free signal)."""
    if signal_mse is None:
        return ""
    if oracle_signal is None:
        return f"signal MSE {signal_mse:.4f}"
    if not ratio_known(signal_mse, oracle_signal):
        return f"signal MSE {signal_mse:.4f} (the oracle's is {oracle_signal:.1e}: no ratio)"
    return f"signal MSE {signal_mse:.4f} = {signal_mse / oracle_signal:.2f}x the oracle's {oracle_signal:.4f}"


def as_scores(result) -> dict:
    """An evaluate() result as {'mse': ..., 'signal_mse': ... or None} (a bare float is the MSE)."""
    if isinstance(result, dict):
        return {"mse": float(result["mse"]), "signal_mse": result.get("signal_mse")}
    return {"mse": float(result), "signal_mse": None}


class Reference(dict):
    """The oracle's scores per split (what metrics.json holds), with `steps`: per split the per-step
    arrays (scored, certain, the oracle's squared signal error) that split a model's error alike."""
    steps: dict = {}


def oracle_reference(series, datasets: dict, task: str) -> Reference:
    """The oracle's scores on the validation and test windows (empty, with a one-line note, when the
    data folder has no generator parameters)."""
    steps: dict = {}
    ref, note = oracle.reference(series, datasets, task, steps=steps)
    if note:
        print(note)
        return Reference()
    for split, r in ref.items():
        print(f"oracle on the {split} windows: MSE {r['oracle_mse']:.4f}"
              + (f", signal MSE {r['oracle_signal_mse']:.4f}" if "oracle_signal_mse" in r else "")
              + (f"; the oracle is certain of the circle on {100 * r['oracle_by_certainty']['certain_share']:.1f}% "
                 f"of the scored steps" if r.get("oracle_by_certainty", {}).get("certain_share") is not None else ""))
    out = Reference(ref)
    out.steps = steps
    return out


def certainty_split(spec: "ModelSpec", model, loader, device, amp, steps: dict | None) -> dict | None:
    """The model's signal MSE split like the oracle's (oracle.split_by_certainty): on the scored
    steps where the oracle is certain of the circle and on the others; None without the signal,
    the oracle or a spec that gives per-step predictions."""
    if not steps or spec.step_predictions is None or loader is None or loader.dataset.signal is None:
        return None
    ds = loader.dataset
    pred = spec.step_predictions(model, loader, device, amp)
    sig = ds.signal_windows(0, len(ds))
    scored = steps["scored"]
    err = np.where(scored, np.nan_to_num(((pred - sig) ** 2).sum(-1), nan=0.0), 0.0)
    return oracle.split_by_certainty(err, scored, steps["certain"], steps["dim"])


def reference_metrics(prefix: str, scores: dict, ref: dict | None) -> dict:
    """metrics.json entries for one split: the model's signal MSE, the oracle's MSEs, their ratio."""
    out = {f"{prefix}_signal_mse": scores["signal_mse"]}
    if ref:
        out[f"{prefix}_oracle_mse"] = ref["oracle_mse"]
        osig = ref.get("oracle_signal_mse")
        out[f"{prefix}_oracle_signal_mse"] = osig
        out[f"{prefix}_signal_over_oracle"] = (scores["signal_mse"] / osig if scores["signal_mse"] is not None
                                               and ratio_known(scores["signal_mse"], osig) else None)
    return out


class CSVLog:
    """Append-only CSV with a fixed header. A resumed run rewrites it (atomically) from the rows
    its checkpoint holds, so rows of epochs the checkpoint never saw do not survive a kill."""

    def __init__(self, path: str, fields: list[str], rows: list[dict] | None = None):
        self.path, self.fields = path, fields
        with replacing(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(fields)
            for row in rows or []:
                w.writerow([row.get(k, "") for k in fields])

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])

    def commit(self, path: str) -> None:
        """Move a staged log to its final name (atomic) and keep appending there."""
        os.replace(self.path, path)
        self.path = path

    def read(self) -> list[dict]:
        with open(self.path) as f:
            return list(csv.DictReader(f))


def plot_loss_curve(rows: list[dict], floor: float | None, path: str, title: str,
                    oracle: dict | None = None, labels: tuple = LOSS_LABELS) -> str:
    """Loss and validation MSE per epoch beside the noise floor and the oracle's validation MSE;
    a second panel with the validation signal MSE against the oracle's when the signal is known.
    labels: the model's words for its training loss, its training-window score and its validation score."""
    import matplotlib.pyplot as plt

    def col(name):
        return np.array([float(r[name]) if r.get(name) not in (None, "") else np.nan for r in rows])

    ep = col("epoch")
    sig = col("val_signal_mse") if rows and "val_signal_mse" in rows[0] else np.array([np.nan])
    two = bool(np.isfinite(sig).any())
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=(14 if two else 8, 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot(ep, col("train_loss"), label=labels[0], lw=1)
    if np.isfinite(col("train_eval_mse")).any():
        ax.plot(ep, col("train_eval_mse"), label=labels[1], lw=1)
    ax.plot(ep, col("val_mse"), label=labels[2], lw=2)
    if floor:
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"noise floor {floor:.2f}")
    if oracle and oracle.get("oracle_mse") is not None:
        ax.axhline(oracle["oracle_mse"], color="tab:red", ls=":", lw=1.5,
                   label=f"oracle (Bayes-optimal) on validation {oracle['oracle_mse']:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE per dimension")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    if two:
        ax = axes[0, 1]
        ax.plot(ep, sig, lw=2, color="tab:green", label="validation signal MSE (vs noise-free series)")
        if oracle and oracle.get("oracle_signal_mse"):
            ax.axhline(oracle["oracle_signal_mse"], color="tab:red", ls=":", lw=1.5,
                       label=f"oracle signal MSE {oracle['oracle_signal_mse']:.3f}")
            ax.axhline(2 * oracle["oracle_signal_mse"], color="tab:red", ls=":", lw=0.8, alpha=0.5,
                       label="2x oracle")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("signal MSE per dimension")
        ax.set_title("Distance to the Bayes-optimal predictor")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path, dpi=110)


def plot_prediction_window(path: str, x: np.ndarray, states: np.ndarray, pred: np.ndarray, err: np.ndarray,
                           n_states: int, title: str, pred_label: str, err_label: str,
                           mask: np.ndarray | None = None) -> str:
    """Four rows: state strip (masked steps grey), truth, prediction, squared error (NaN = not scored)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(4, 1, figsize=(12, 8), sharex=True,
                             gridspec_kw={"height_ratios": [1, 5, 5, 5], "hspace": 0.08})
    draw_state_strip(axes[0], states, n_states, mask=mask)
    axes[0].set_title(title)
    lim = np.percentile(np.abs(x), 99)
    for ax, arr, name in ((axes[1], x, "truth"), (axes[2], pred, pred_label)):
        ax.imshow(arr.T, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_ylabel(name)
    im = axes[3].imshow(err.T, aspect="auto", cmap="magma", vmin=0, vmax=np.nanpercentile(err, 99),
                        interpolation="nearest")
    axes[3].set_ylabel(err_label)
    axes[3].set_xlabel("step in window")
    fig.colorbar(im, ax=axes[3], fraction=0.02, pad=0.01)
    return save_figure(fig, path, dpi=100, tight=False, bbox_inches="tight")


# ----------------------------------------------------------------------------- the loop

@dataclass
class FitState:
    epoch: int = 0            # epochs completed
    step: int = 0             # optimizer steps taken
    best_val: float = float("inf")
    best_epoch: int = -1
    stopped_early: str = ""
    history: list = field(default_factory=list)


def fit(*, model: torch.nn.Module, train_model: torch.nn.Module, optimizer, scheduler,
        train_set, train_loader, batch_loss: Callable, evaluate: Callable, epochs: int,
        out_dir: str, checkpoint_payload: Callable[[FitState], dict], state: FitState,
        noise_floor: float | None, clip: float = 1.0, time_budget_min: float | None = None,
        train_eval: Callable | None = None, log: CSVLog,
        extra_checkpoint: str | None = None, stop_after: int | None = None,
        oracle: dict | None = None, on_first_checkpoint: Callable | None = None) -> FitState:
    """Run epochs state.epoch .. epochs-1: train, evaluate, log, checkpoint (last + best).

    batch_loss(train_model, batch) -> scalar loss; evaluate(model) -> validation MSE, or a dict
    with "mse" and "signal_mse"; train_eval(model) -> the same on training windows with fixed
    masks (optional). oracle: the oracle's scores on the validation windows, for the printout.
    on_first_checkpoint(): called once, right after this call's first last.pt is written.
    A NaN or infinite loss stops with TrainingError before anything is overwritten.
    stop_after: leave (resumably) after this many epochs of this call.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    deadline = t_start + 60 * time_budget_min if time_budget_min else None
    first_epoch = state.epoch
    state.stopped_early = ""   # a resumed run that had stopped early starts this process's budget afresh
    for epoch in range(state.epoch, epochs):
        train_set.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None)
        for batch in bar:
            loss = batch_loss(train_model, batch)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the training loss became {loss.item()} at epoch {epoch + 1}, step {state.step}; "
                    f"lower --lr or keep --warmup-epochs > 0 (the last good checkpoint is in {out_dir})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            total += loss.item()
            count += 1
            bar.set_postfix(loss=f"{total / count:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if deadline and time.perf_counter() > deadline:
                state.stopped_early = f"time budget of {time_budget_min} min reached in epoch {epoch + 1}"
                break
        train_time = time.perf_counter() - t0
        scores = as_scores(evaluate(model))
        val = scores["mse"]
        tr = as_scores(train_eval(model))["mse"] if train_eval else float("nan")
        row = {"epoch": epoch + 1, "step": state.step, "lr": scheduler.get_last_lr()[0],
               "train_loss": total / max(count, 1), "train_eval_mse": tr, "val_mse": val,
               "val_signal_mse": "" if scores["signal_mse"] is None else scores["signal_mse"],
               "noise_floor": noise_floor if noise_floor else "", "epoch_seconds": round(train_time, 3),
               "elapsed_seconds": round(time.perf_counter() - t_start, 3)}
        log.write(row)
        state.history.append(row)
        state.epoch = epoch + 1
        improved = val < state.best_val
        if improved:
            state.best_val, state.best_epoch = val, epoch + 1
        payload = checkpoint_payload(state)
        # last before best: when an improving epoch is killed between the two, the resumed run
        # finds best_epoch == its own epoch in last.pt and restores best.pt from it
        save_checkpoint(os.path.join(out_dir, "last.pt"), payload)
        if on_first_checkpoint is not None:
            on_first_checkpoint()
            on_first_checkpoint = None
        if improved:
            save_checkpoint(os.path.join(out_dir, "best.pt"), payload)
            if extra_checkpoint:
                save_checkpoint(extra_checkpoint, payload)
        osig = (oracle or {}).get("oracle_signal_mse")
        sig = (f"  signal {scores['signal_mse']:.3f}"
               + (f" ({scores['signal_mse'] / osig:.1f}x oracle)" if ratio_known(scores["signal_mse"], osig) else "")
               if scores["signal_mse"] is not None else "")
        tqdm.write(f"epoch {epoch + 1:4d}  train {total / max(count, 1):.4f}  "
                   f"val {floor_note(val, noise_floor)}{sig}{'  *' if improved else ''}  "
                   f"({train_time:.1f} s)", file=sys.stdout)
        if state.stopped_early:
            tqdm.write(f"stopping: {state.stopped_early}; continue with --resume {out_dir}/last.pt")
            break
        if deadline and time.perf_counter() > deadline:
            state.stopped_early = f"time budget of {time_budget_min} min reached after epoch {epoch + 1}"
        elif stop_after and epoch + 1 - first_epoch >= stop_after and epoch + 1 < epochs:
            state.stopped_early = f"--stop-after {stop_after} reached after epoch {epoch + 1}"
        if state.stopped_early:
            tqdm.write(f"stopping: {state.stopped_early}; continue with --resume {out_dir}/last.pt")
            break
    return state


# ----------------------------------------------------------------------------- drivers

@dataclass
class ModelSpec:
    """What a sequence-model script tells the shared driver about its model."""
    model_type: str                    # stored in checkpoints; checked on load
    run_prefix: str                    # default run folder runs/<prefix>_...
    config_from_args: Callable         # (args, in_dim) -> config dataclass with validate()
    build: Callable                    # config -> nn.Module
    datasets: Callable                 # (series, data_args) -> build_datasets(...) dict
    data_keys: tuple                   # argument names that define the data pipeline
    param_groups: Callable             # (model, args) -> optimizer param groups
    batch_loss: Callable               # (model, batch, device, amp) -> scalar loss
    evaluate: Callable                 # (model, loader, device, amp) -> MSE
    plot_predictions: Callable         # (model, dataset, device, plots_dir, n_states, amp) -> [paths]
    describe: Callable                 # (model, cfg) -> one line
    run_name: Callable = lambda args: ""  # suffix of the default run folder
    final_metrics: Callable | None = None  # (model, loaders, device, amp) -> dict of extra numbers
    plot_title: Callable = lambda cfg: ""
    task: str = "masked"               # what the oracle predicts: masked steps, or the next step
    loss_labels: tuple = LOSS_LABELS   # the loss curve's words for this model
    train_eval_windows: Callable | None = None  # datasets -> fixed training windows scored every epoch
    figures: tuple = ()                # the names of the prediction figures plot_predictions draws
    step_predictions: Callable | None = None  # (model, loader, device, amp) -> (N, L, D) prediction of each step
    memory: Callable | None = None     # (cfg, batch_size, seq_len) -> bytes of activations in one training step


def make_loaders(ds: dict, batch_size: int, workers: int, device: torch.device, seed: int):
    from torch.utils.data import DataLoader
    g = torch.Generator().manual_seed(seed)
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda")
    # the training workers are not persistent: a persistent worker keeps the copy of the dataset it
    # got in the first epoch, so set_epoch (new masks, a fresh draw) would never reach it
    train = DataLoader(ds["train"], batch_size=batch_size, shuffle=True, drop_last=len(ds["train"]) > batch_size,
                       generator=g, **kw)
    val = DataLoader(ds["val"], batch_size=batch_size, shuffle=False, persistent_workers=workers > 0, **kw)
    test = (DataLoader(ds["test"], batch_size=batch_size, shuffle=False, persistent_workers=workers > 0, **kw)
            if ds["test"] is not None else None)
    return train, val, test


def check_same_data(ckpt: dict, series, given: bool = False) -> None:
    """The data folder a checkpoint is read against is the one it was trained on: the folder's write
    token (dataset.GENERATION) is the one the checkpoint recorded. A folder written again since (a new
    seed, a converted series) is one line, unless the user named the data folder (given), who then
    asks to score the model on other data on purpose."""
    was, now = ckpt.get("data_generation"), series.config.get("generation")
    if was and now != was and not given:
        raise TrainingError(f"{series.data_dir} was written again since {ckpt.get('path', 'the checkpoint')} was "
                            f"trained on it (another data.npz); pass --data-dir to use it anyway, or regenerate the "
                            f"original data")


def check_data_matches(model_cfg: dict, series, where: str) -> None:
    if series.dim != model_cfg["in_dim"]:
        raise TrainingError(f"{where} takes {model_cfg['in_dim']}-D inputs but {series.data_dir} holds "
                            f"{series.dim}-D data; pass the --data-dir it was trained on")


def load_model(ckpt: dict, spec: ModelSpec, config_cls) -> torch.nn.Module:
    """The checkpoint's model; a checkpoint with missing or mismatched parts is one clear error."""
    where = ckpt.get("path", "the checkpoint")  # load_checkpoint has checked that its parts are there
    try:
        safeio.check_dataclass_fields(config_cls, ckpt["model_config"], f"{where} (model_config)")
    except safeio.InputError as e:
        raise TrainingError(str(e)) from None
    try:
        model = spec.build(config_cls(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, KeyError, ValueError) as e:
        raise TrainingError(f"{where} does not match the {spec.model_type} model "
                            f"({' '.join(str(e).split())[:300]}); the file is incomplete or from another version") from None
    return model


EXPORT_FILES = ("model.safetensors", "config.json")


def export_model(model: torch.nn.Module, model_type: str, model_config: dict, out_dir: str, force: bool,
                 data: dict | None = None) -> list[str]:
    """Write the weights as model.safetensors and what rebuilds the model as config.json (no
    pickles: both load without running code). The Mamba blocks keep mamba_ssm's parameter
    names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj)."""
    from safetensors.torch import save_file
    import secrets
    paths = [os.path.join(out_dir, f) for f in EXPORT_FILES]
    check_export_target(out_dir, force)
    out = safeio.Outputs("export", force)
    try:
        out.claim(paths)
    except safeio.OutputsExist as e:
        raise TrainingError(str(e)) from None
    state = {k: v.detach().to("cpu").contiguous() for k, v in getattr(model, "_orig_mod", model).state_dict().items()}
    token = secrets.token_hex(8)   # both files carry it: a kill between the two writes is detected on load
    text = safeio.json_text({"model_type": model_type, "model_config": plain_json(model_config),
                             "data": plain_json(data or {}), "format": "safetensors", "export_id": token,
                             "exported_by": "this project's --export"})
    with safeio.atomic_path(out.target(paths[0])) as tmp:
        save_file(state, tmp, metadata={"model_type": model_type, "export_id": token})
    safeio.write_text(out.target(paths[1]), text)
    return paths


def plain_json(obj):
    """Checkpoint data (tensors included) as JSON-ready lists and numbers."""
    if isinstance(obj, dict):
        return {k: plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return plain(obj)


def check_export_target(out_dir: str | None, force: bool) -> None:
    """Before any work: --export must be a folder that can be written, and one that already holds
    an export needs --force."""
    if not out_dir:
        return
    try:
        safeio.output_dir(out_dir, "--export", create=False)
    except safeio.InputError as e:
        raise TrainingError(str(e)) from None
    if not force:
        taken = [f for f in EXPORT_FILES if os.path.exists(os.path.join(out_dir, f))]
        if taken:
            raise TrainingError(f"{os.path.join(out_dir, taken[0])} exists; pass --force to replace the export "
                                f"or choose another --export folder")


def load_exported(path: str, model_type: str, build: Callable, config_cls) -> torch.nn.Module:
    """The model of an --export folder (model.safetensors + config.json), checked against its type."""
    from safetensors.torch import load_file
    cfg_path, weights = (os.path.join(path, f) for f in ("config.json", "model.safetensors"))
    for f in (cfg_path, weights):
        if not os.path.exists(f):
            raise TrainingError(f"{f} not found; export a checkpoint with --eval CKPT --export {path}")
    try:
        safeio.regular_file(weights, "exported weights")
        cfg = safeio.read_json(cfg_path, "exported model configuration", kind=dict)
        safeio.check_field(cfg, "model_config", dict, cfg_path)
        if cfg.get("model_type") != model_type:
            raise TrainingError(f"{path} holds a {cfg.get('model_type')!r:.60} model, not a {model_type!r} model")
        safeio.check_dataclass_fields(config_cls, cfg["model_config"], f"{cfg_path} (model_config)")
    except safeio.InputError as e:
        raise TrainingError(str(e)) from None
    try:
        from safetensors import safe_open
        with safe_open(weights, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a corrupt header
        raise TrainingError(f"{weights} is not a readable safetensors file ({safeio.first_line(e)})") from None
    if "export_id" in cfg and meta.get("export_id") != cfg["export_id"]:
        raise TrainingError(f"{path} is incomplete: config.json and model.safetensors come from different exports "
                            f"(one was killed while writing); export again with --force")
    try:
        model = build(config_cls(**cfg["model_config"]))
        model.load_state_dict(load_file(weights))
    except (TypeError, RuntimeError, KeyError, ValueError, OSError) as e:
        raise TrainingError(f"{path} does not match the {model_type} model ({' '.join(str(e).split())[:300]})") from None
    return model


# flags a resumed run takes from the command line; every other flag it was given must equal the checkpoint's
RESUME_MAY_CHANGE = ("epochs", "time_budget", "stop_after", "device", "num_workers", "no_compile", "compile",
                     "no_amp", "cpu_bf16", "plots_dir", "no_plot", "force", "export")


def command_argv(argv, subcommands: bool) -> list[str]:
    """Both model scripts take `train [flags]` and `eval CKPT [flags]` (= `--eval CKPT`) as their
    first words. Without subcommands (masked_model_gpu.py) the word `train` may be left out, so
    the original code's invocations keep working; with them (mamba_next.py, whose other
    commands are generate and gates) `eval CKPT` becomes `train --eval CKPT`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        if len(argv) < 2 or argv[1].startswith("-"):
            raise TrainingError("eval needs the checkpoint first: eval CKPT [flags]")
        argv = (["train"] if subcommands else []) + ["--eval", argv[1]] + argv[2:]
    elif argv[:1] == ["train"] and not subcommands:
        argv = argv[1:]
    return argv


def given_flags(build_parser: Callable[[], argparse.ArgumentParser], argv) -> set[str]:
    """The destinations of the flags actually written on the command line (not defaulted):
    the same parser with every default suppressed."""
    p = build_parser()

    def suppress(parser):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    suppress(sub)
            elif a.dest != "help":
                a.default = argparse.SUPPRESS
    suppress(p)
    return set(vars(p.parse_args(argv)))


def _merge_resume(args, resume: dict, given: set[str]):
    """A resumed run keeps its data, model and optimisation settings; a flag written on the
    command line is either one it may change (RESUME_MAY_CHANGE) or must equal the checkpoint's."""
    saved = resume["args"]
    run_dir = os.path.abspath(os.path.dirname(resume["path"]))
    for k in sorted(given - set(RESUME_MAY_CHANGE) - {"resume", "command"}):
        if k == "out_dir" and os.path.abspath(args.out_dir) == run_dir:
            continue
        if k in saved and getattr(args, k) != saved[k]:
            raise TrainingError(f"--{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                                f"{saved[k]}; a resumed run keeps its settings (it may change only "
                                + ", ".join("--" + f.replace("_", "-") for f in RESUME_MAY_CHANGE) + ")")
    keep = {k: getattr(args, k) if k in given else saved.get(k, getattr(args, k)) for k in RESUME_MAY_CHANGE}
    # flags newer than the checkpoint (absent from its args) take their defaults
    return argparse.Namespace(**{**vars(args), **saved, **keep, "resume": args.resume, "eval": None})


def _check_extra_checkpoint(path: str, spec: ModelSpec, overwrite: bool) -> None:
    """--checkpoint PATH replaces only a checkpoint of this project's model, and only with --force
    (or when a resumed run wrote it)."""
    if os.path.isdir(path):
        raise TrainingError(f"--checkpoint {path} is a folder; give the path of a .pt file")
    try:
        load_checkpoint(path, spec.model_type)
    except TrainingError as e:
        raise TrainingError(f"--checkpoint {path} exists and is not a {spec.model_type} checkpoint of this "
                            f"project; it is left alone: choose another path") from e
    if not overwrite:
        raise TrainingError(f"--checkpoint {path} already exists; pass --force to replace it or choose another path")


def _restore_best(out_dir: str, resume: dict) -> None:
    """If the run was killed after last.pt of an improving epoch but before best.pt, best.pt
    still holds an older epoch: last.pt is that best checkpoint, so copy it."""
    st = resume["fit_state"]
    best = os.path.join(out_dir, "best.pt")
    if st["best_epoch"] == st["epoch"] and (not os.path.exists(best) or safe_load(best).get("epoch") != st["epoch"]):
        import shutil
        with replacing(best) as tmp:
            shutil.copyfile(resume["path"], tmp)


def train_main(args, spec: ModelSpec, given: set[str]) -> int:
    """Train a sequence model end to end: data, model, fit, best-checkpoint test, figures."""
    if getattr(args, "eval_mask_seed", None) is not None:
        raise TrainingError("--eval-mask-seed goes with --eval CKPT (a run's own masks come from its --seed)")
    device = resolve_device(args.device)
    args, resume, out_dir = _resolve_run(args, spec, given)
    data = _load_data(args, spec, resume)
    plots_dir = cliargs.plots_dir(args, out_dir)
    run = _build_training(args, spec, data, device, resume)
    _describe(run, data, args, device)
    ref = oracle_reference(data.series, data.ds, spec.task)
    log, on_first_checkpoint = _open_run_folder(out_dir, plots_dir, args, resume, run)
    train_eval = _train_eval(run, data, args, device)
    t0 = time.perf_counter()
    state = fit(model=run.model, train_model=run.train_model, optimizer=run.optimizer, scheduler=run.scheduler,
                train_set=data.ds["train"], train_loader=run.loaders[0],
                batch_loss=lambda m, b: spec.batch_loss(m, b, device, run.amp),
                evaluate=lambda m: spec.evaluate(m, run.loaders[1], device, run.amp), epochs=args.epochs,
                out_dir=out_dir, checkpoint_payload=lambda st: _checkpoint_payload(run, data, args, st),
                state=run.state, noise_floor=data.series.noise_var, clip=args.grad_clip,
                time_budget_min=args.time_budget, train_eval=train_eval, log=log,
                extra_checkpoint=args.checkpoint, stop_after=args.stop_after, oracle=ref.get("val"),
                on_first_checkpoint=on_first_checkpoint)
    return _finish(run, data, args, state, ref, out_dir, plots_dir, log, device, time.perf_counter() - t0)


@dataclass
class RunData:
    """The data a training run reads: the series, the model config, the data pipeline's arguments
    and its datasets (train / val / test windows and the splits)."""
    series: Any
    cfg: Any
    data_args: dict
    ds: dict


@dataclass
class TrainingSetup:
    """The model and its optimisation, ready to fit (restored from the checkpoint on resume)."""
    spec: ModelSpec
    model: torch.nn.Module
    train_model: torch.nn.Module       # the compiled model where torch.compile is on
    optimizer: Any
    scheduler: Any
    loaders: tuple                     # train, val, test
    state: FitState
    amp: bool
    compiled: bool
    n_params: int


def _resolve_run(args, spec: ModelSpec, given: set[str]):
    """The run's arguments (merged with the checkpoint's on --resume), the checkpoint and the run
    folder; refuses a folder that holds a run unless --resume or --force."""
    resume = load_checkpoint(args.resume, spec.model_type) if args.resume else None
    if resume:
        args = _merge_resume(args, resume, given)
    if args.epochs < 1:
        raise TrainingError(f"--epochs {args.epochs}: train at least one epoch")
    check_export_target(args.export, args.force)
    if args.checkpoint and os.path.exists(args.checkpoint):
        _check_extra_checkpoint(args.checkpoint, spec, overwrite=bool(resume or args.force))
    out_dir = args.out_dir or os.path.join("runs", f"{spec.run_prefix}_{spec.run_name(args)}".rstrip("_"))
    if resume:
        check_resumable(resume, resume["path"])
        out_dir = os.path.dirname(resume["path"])
    _check_output_folders(args, out_dir)
    if not resume:
        earlier_run(out_dir, cliargs.plots_dir(args, out_dir), spec, args.force)
    return args, resume, out_dir


def earlier_run(out_dir: str, plots_dir: str, spec: ModelSpec, force: bool) -> list[str]:
    """The files of an earlier run a new run would replace. Without force, a run with a last.pt,
    or any such file this project did not write (a user's own args.json), stops the new run with
    the fix; the files of a run killed before its first checkpoint are replaced without a word."""
    earlier = safeio.Outputs(RUN_KEY, force).earlier(run_files(out_dir, plots_dir, spec))
    if earlier and not force:
        if os.path.exists(os.path.join(out_dir, "last.pt")):
            raise TrainingError(f"{out_dir} already holds a run; pass --resume {out_dir}/last.pt to continue it, "
                                f"--force to overwrite it, or another --out-dir")
        # only the run folder's own files can be the leftovers of this run's killed start: a figure in the
        # plots folder may be another run's (runs can share a --plots-dir), so it needs --force
        ours = {os.path.abspath(p) for p in safeio.recorded(RUN_KEY, out_dir)}
        foreign = [p for p in earlier if os.path.abspath(p) not in ours]
        if foreign:
            raise TrainingError(f"{foreign[0]} exists and was not written by a training run here; pass --force to "
                                f"replace it or choose another --out-dir / --plots-dir")
    return earlier


RUN_KEY = "training run"   # the safeio.Outputs key of a run folder's own files
RUN_FILES = ("last.pt", "best.pt", "training_log.csv", "args.json", "metrics.json")
DERIVED = ("eval", "eval_mask0", "representations", "generate", "gates")  # where other commands write about a run (eval_mask0: an --eval-mask-seed 0 rescoring)


def run_files(out_dir: str, plots_dir: str, spec: ModelSpec) -> list[str]:
    """Every file a training run writes (its figures too, drawn or not)."""
    return ([os.path.join(out_dir, f) for f in RUN_FILES]
            + [os.path.join(plots_dir, f) for f in ("training_loss.png", *spec.figures)])


def _check_output_folders(args, out_dir: str) -> None:
    """--out-dir, --plots-dir and --checkpoint can be written: one line before any work otherwise."""
    try:
        safeio.output_dir(out_dir, "--out-dir", create=False)
        if not args.no_plot:
            safeio.output_dir(cliargs.plots_dir(args, out_dir), "--plots-dir", create=False)
        if args.checkpoint:
            safeio.check_writable_file(args.checkpoint, "--checkpoint")
    except safeio.InputError as e:
        raise TrainingError(str(e)) from None


def remove_derived(out_dir: str, plots_dir: str) -> list[str]:
    """What other commands recorded about a run in its default subfolders (evaluation, representations,
    generations, gates) and in their default figure folders: stale once the run is replaced. Only
    recorded files go, nothing else."""
    gone = []
    for sub in DERIVED:
        for folder in dict.fromkeys((os.path.join(out_dir, sub), cliargs.default_plots_dir(os.path.join(out_dir, sub)))):
            for key in safeio.recorded_keys(folder):
                gone += safeio.remove_recorded(key, folder)
    return gone


def _load_data(args, spec: ModelSpec, resume: dict | None) -> RunData:
    series = load_series(args.data_dir)
    cfg = spec.config_from_args(args, series.dim)
    try:
        cfg.validate()
    except ValueError as e:
        raise TrainingError(str(e)) from e
    if resume:
        check_same_data(resume, series)
        try:
            safeio.check_dataclass_fields(type(cfg), resume["model_config"], f"{resume['path']} (model_config)")
        except safeio.InputError as e:
            raise TrainingError(str(e)) from None
        if asdict(cfg) != resume["model_config"]:
            diff = sorted(k for k in set(asdict(cfg)) | set(resume["model_config"])
                          if asdict(cfg).get(k, object()) != resume["model_config"].get(k, object()))
            raise TrainingError(f"{resume['path']}: its model_config disagrees with its arguments ({', '.join(diff[:3])}); "
                                f"the file was changed after training wrote it, so it cannot be resumed")
        check_data_matches(resume["model_config"], series, resume["path"])
    data_args = {k: getattr(args, k) for k in spec.data_keys}
    try:
        ds = spec.datasets(series, data_args)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    return RunData(series, cfg, data_args, ds)


def check_memory(spec: ModelSpec, cfg, batch_size: int, seq_len: int, device: torch.device) -> int:
    """Refuse sizes that cannot be allocated before allocating them: the parameters (counted on
    torch's meta device) with their gradients and AdamW state, and the spec's estimate of one
    step's activations, against the memory the device has free. Returns the parameter count."""
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in spec.build(cfg).parameters())
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: its own checks speak
        return 0
    need = 16 * n + (spec.memory(cfg, batch_size, seq_len) if spec.memory else 0)
    have = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    what = f"training a model of {n:,} parameters on batches of {batch_size} x {seq_len} steps"
    fix = "use a smaller --d-model, --n-layers, --d-ff, --batch-size or --seq-len"
    try:
        if have is not None and need > have:
            raise safeio.InputError(f"{what} needs about {safeio.human_bytes(need)} but the GPU has "
                                    f"{safeio.human_bytes(have)} free; {fix}")
        safeio.check_fits(need if have is None else 16 * n, what, fix)
    except safeio.InputError as e:
        raise TrainingError(str(e)) from None
    return n


def _build_training(args, spec: ModelSpec, data: RunData, device: torch.device, resume: dict | None) -> TrainingSetup:
    check_memory(spec, data.cfg, args.batch_size, args.seq_len, device)
    seed_everything(args.seed)
    model = spec.build(data.cfg).to(device)
    cuda = device.type == "cuda"
    compiled = (cuda and not args.no_compile) or getattr(args, "compile", False)
    workers = args.num_workers if args.num_workers >= 0 else (4 if cuda else 0)
    loaders = make_loaders(data.ds, args.batch_size, workers, device, args.seed)
    steps_per_epoch = len(loaders[0])
    optimizer = torch.optim.AdamW(spec.param_groups(model, args), lr=args.lr, betas=(0.9, 0.98))
    scheduler = warmup_cosine(optimizer, args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch)
    state = FitState()
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state = FitState(**resume["fit_state"])
        set_rng_state(resume["rng"])
        loaders[0].generator.set_state(resume["loader_rng"])
    return TrainingSetup(spec, model, maybe_compile(model, compiled), optimizer, scheduler, loaders, state,
                         amp=use_amp(device, args), compiled=compiled,
                         n_params=sum(p.numel() for p in model.parameters()))


def _describe(run: TrainingSetup, data: RunData, args, device: torch.device) -> None:
    sp, series = data.ds["splits"], data.series
    print(f"model: {run.n_params:,} parameters ({run.spec.describe(run.model, data.cfg)}); device {device}, "
          f"{'BF16 autocast' if run.amp else 'fp32'}{', torch.compile' if run.compiled else ''}")
    print(f"data: {series.n_steps} steps of {series.dim}-D; train {sp.train}, val {sp.val}, test {sp.test} "
          f"(gaps {sp.gap}); {len(data.ds['train'])} training windows of {args.seq_len} (stride {args.stride}), "
          f"{len(run.loaders[0])} steps/epoch; noise floor {series.noise_var}")
    if data.data_args.get("train_data") == "fresh":
        print("training data: a fresh draw of the folder's process every epoch (same circles and transition matrix, "
              "new trajectory and noise); validation and test: the folder's held-out blocks")


def _open_run_folder(out_dir: str, plots_dir: str, args, resume: dict | None, run: "TrainingSetup"):
    """Lock the run folder, clean what a killed run left, and open the log. Returns the log and,
    when --force replaces an earlier run, what to call once the new run's first last.pt exists."""
    state = run.state
    safeio.output_dir(out_dir)
    run_lock(out_dir)  # held until the process ends; a second run into this folder refuses
    if resume:
        _restore_best(out_dir, resume)
    safeio.remove_temporaries(out_dir)  # temporary files of a run killed while writing
    declared = run_files(out_dir, plots_dir, run.spec)
    earlier = [] if resume else earlier_run(out_dir, plots_dir, run.spec, args.force)
    safeio.record(RUN_KEY, [p for p in declared if not args.no_plot or os.path.dirname(p) != plots_dir])
    # --force over an earlier run: the new log and args are staged beside the old run's files and
    # replace them only once the new run has written its first last.pt, so a run that fails in
    # its first epoch leaves the old run whole; then the rest of the old run goes (metrics, best.pt,
    # figures, and what other commands recorded in its eval/representations/generate/gates folders)
    replacing_run = bool(earlier)
    final = {k: os.path.join(out_dir, k) for k in ("training_log.csv", "args.json")}
    staged = {k: os.path.join(out_dir, f".{k}.staged.tmp") if replacing_run else v for k, v in final.items()}
    log = CSVLog(staged["training_log.csv"],
                 ["epoch", "step", "lr", "train_loss", "train_eval_mse", "val_mse", "val_signal_mse",
                  "noise_floor", "epoch_seconds", "elapsed_seconds"], rows=state.history if resume else None)
    safeio.write_json(staged["args.json"], vars(args))

    def commit_staged() -> None:
        os.replace(staged["args.json"], final["args.json"])
        log.commit(final["training_log.csv"])
        keep = {os.path.abspath(os.path.join(out_dir, f)) for f in ("last.pt", "training_log.csv", "args.json")}
        for p in earlier:
            if os.path.abspath(p) not in keep and (os.path.isfile(p) or os.path.islink(p)):
                os.remove(p)
        remove_derived(out_dir, plots_dir)
    return log, commit_staged if replacing_run else None


def _train_eval(run: TrainingSetup, data: RunData, args, device: torch.device) -> Callable | None:
    """The score of the model's own training windows each epoch (the spec's windows), or None."""
    if not run.spec.train_eval_windows or args.no_train_eval:
        return None
    from torch.utils.data import DataLoader
    loader = DataLoader(run.spec.train_eval_windows(data.ds), batch_size=args.batch_size)
    return lambda m: run.spec.evaluate(m, loader, device, run.amp)


def _checkpoint_payload(run: TrainingSetup, data: RunData, args, st: FitState) -> dict:
    return {"model_type": run.spec.model_type, "model_config": asdict(data.cfg), "model": run.model.state_dict(),
            "data": data.data_args, "data_config": data.series.config, "splits": data.ds["splits"].as_dict(),
            "data_generation": data.series.config.get("generation"),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "fit_state": asdict(st), "epoch": st.epoch, "rng": rng_state(),
            "loader_rng": run.loaders[0].generator.get_state(), "args": vars(args), "n_parameters": run.n_params}


def _finish(run: TrainingSetup, data: RunData, args, state: FitState, ref: dict, out_dir: str, plots_dir: str,
            log: CSVLog, device: torch.device, train_seconds: float) -> int:
    """Score the best checkpoint on validation and test, draw, write metrics.json, export."""
    spec, model, floor = run.spec, run.model, data.series.noise_var
    best = load_checkpoint(os.path.join(out_dir, "best.pt"), spec.model_type)
    model.load_state_dict(best["model"])
    scored = run.loaders[1:]
    scores = score_splits(spec, model, scored, device, run.amp, floor, ref, f"best epoch {state.best_epoch}: ")
    written = []
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        safeio.output_dir(plots_dir, "--plots-dir")
        written = [plot_loss_curve(log.read(), floor, os.path.join(plots_dir, "training_loss.png"),
                                   spec.plot_title(data.cfg), ref.get("val"), spec.loss_labels)]
        written += spec.plot_predictions(model, data.ds["val"], device, plots_dir, data.series.n_states, run.amp)
    test = scores["test_mse"]
    metrics = {"best_epoch": state.best_epoch, "epochs_run": state.epoch, **scores,
               "noise_floor": floor, "test_over_floor": test / floor if floor else None, "n_parameters": run.n_params,
               "train_seconds": train_seconds, "steps": state.step, "stopped_early": state.stopped_early,
               "model_config": asdict(data.cfg)}
    if spec.final_metrics:
        metrics.update(spec.final_metrics(model, scored, device, run.amp))
    safeio.write_json(os.path.join(out_dir, "metrics.json"), metrics)
    if args.export:
        written += export_model(model, spec.model_type, asdict(data.cfg), args.export, args.force, data.data_args)
    release_run_lock(out_dir)
    print(f"wrote {out_dir}/best.pt, last.pt, training_log.csv, metrics.json"
          + ("; " + ", ".join(written) if written else ""))
    return 0


def score_splits(spec: ModelSpec, model, loaders, device, amp, floor, ref: dict, lead: str = "") -> dict:
    """Validation and test MSE, signal MSE and the oracle's, printed and returned for metrics.json."""
    out: dict[str, Any] = {}
    pad = " " * len(lead)
    for (name, label), loader in zip((("val", "validation"), ("test", "test")), loaders):
        sc = as_scores(spec.evaluate(model, loader, device, amp)) if loader is not None \
            else {"mse": float("nan"), "signal_mse": None}
        r = ref.get(name) or {}
        out[f"{name}_mse"] = sc["mse"]
        out.update(reference_metrics(name, sc, r))
        note = signal_note(sc["signal_mse"], r.get("oracle_signal_mse"))
        print(f"{lead if name == 'val' else pad}{label + ' MSE':15s}{floor_note(sc['mse'], floor, r.get('oracle_mse'))}"
              + (f"; {note}" if note else ""))
        split = certainty_split(spec, model, loader, device, amp, getattr(ref, "steps", {}).get(name))
        if split:
            out[f"{name}_signal_by_certainty"] = split
            o = r["oracle_by_certainty"]

            def part(k, d=None):
                v = (d or split)[f"signal_mse_{k}"]
                return "n/a" if v is None else f"{v:.4f}"
            print(f"{pad}{'':15s}signal MSE where the oracle is certain of the circle "
                  f"({100 * split['certain_share']:.1f}% of steps): {part('certain')} (oracle {part('certain', o)}); "
                  f"elsewhere: {part('uncertain')} (oracle {part('uncertain', o)})")
    if ref:
        out["oracle"] = ref
    return out


def eval_main(args, spec: ModelSpec, config_cls, given: set[str] = frozenset()) -> int:
    """Reload a checkpoint, report validation and test MSE against the noise floor, redraw."""
    ckpt = load_checkpoint(args.eval, spec.model_type)
    check_export_target(args.export, args.force)
    out_dir = args.out_dir or os.path.join(os.path.dirname(ckpt["path"]), "eval")
    plots_dir = cliargs.plots_dir(args, out_dir)
    _check_output_folders(argparse.Namespace(no_plot=args.no_plot, plots_dir=plots_dir, checkpoint=None), out_dir)
    declared = [os.path.join(out_dir, "eval_metrics.json")] + [os.path.join(plots_dir, f) for f in spec.figures]
    out = safeio.Outputs("eval", args.force)
    try:  # refuse before any work; with --force the files go only once the checks pass
        earlier = out.claim(declared, remove=False)
    except safeio.OutputsExist as e:
        raise TrainingError(str(e)) from None
    device = resolve_device(args.device)
    data_args = dict(ckpt["data"])
    if args.eval_mask_seed is not None and spec.task != "masked":
        raise TrainingError(f"--eval-mask-seed: a {spec.model_type} model is scored without masks")
    if "data_dir" in given:
        data_args["data_dir"] = args.data_dir
    elif not os.path.exists(data_args["data_dir"]):
        raise TrainingError(f"the data folder {data_args['data_dir']!r} this checkpoint was trained on is gone; "
                            f"pass --data-dir with the same data")
    series = load_series(data_args["data_dir"])
    check_same_data(ckpt, series, "data_dir" in given)
    check_data_matches(ckpt["model_config"], series, ckpt["path"])
    model = load_model(ckpt, spec, config_cls).to(device)
    # --eval-mask-seed: the same windows with the held-out masks (and so the oracle) of that seed; the
    # checkpoint's own data arguments stay what an export records
    scoring = data_args if args.eval_mask_seed is None else {**data_args, "seed": args.eval_mask_seed}
    ds = spec.datasets(series, scoring)
    _, val_loader, test_loader = make_loaders(ds, args.batch_size, 0, device, 0)
    amp = use_amp(device, args)
    floor = series.noise_var
    print(f"checkpoint {ckpt['path']} (epoch {ckpt['epoch']}; {spec.describe(model, model.cfg)})")
    ref = oracle_reference(series, ds, spec.task)
    scores = score_splits(spec, model, (val_loader, test_loader), device, amp, floor, ref)
    out.remove_earlier(earlier)  # the checks passed: replace them
    safeio.output_dir(out_dir)
    safeio.record("eval", declared if not args.no_plot else declared[:1])
    paths = []
    if not args.no_plot:
        import matplotlib
        matplotlib.use("Agg")
        safeio.output_dir(plots_dir, "--plots-dir")
        paths = spec.plot_predictions(model, ds["val"], device, plots_dir, series.n_states, amp)
    if args.export:
        paths += export_model(model, spec.model_type, ckpt["model_config"], args.export, args.force, data_args)
    res: dict[str, Any] = {"checkpoint": ckpt["path"], **scores, "noise_floor": floor,
                           **({"mask_seed": scoring["seed"]} if spec.task == "masked" else {})}
    if spec.final_metrics:
        res.update(spec.final_metrics(model, (val_loader, test_loader), device, amp))
    jp = safeio.write_json(os.path.join(out_dir, "eval_metrics.json"), res)
    print("wrote " + ", ".join(paths + [jp]))
    return 0


def add_training_arguments(p: argparse.ArgumentParser, *, seq_len: int, stride: int, batch_size: int, lr: float,
                           warmup_epochs: float, epochs: int) -> None:
    """The flags every sequence-model script shares (data split, optimisation, outputs)."""
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data", help="folder with data.npz + config.json")
    g.add_argument("--seq-len", type=at_least(2), default=seq_len, help="window length (steps)")
    g.add_argument("--stride", type=at_least(1), default=stride, help="step between training windows")
    g.add_argument("--val-frac", type=between(0, 1, open_lo=True, open_hi=True), default=0.1,
                   help="share of the series in the validation block")
    g.add_argument("--test-frac", type=between(0, 1, open_hi=True), default=0.1,
                   help="share of the series in the test block (0: no test block)")
    g.add_argument("--train-data", choices=("fixed", "fresh"), default="fixed",
                   help="fixed: train on the folder's training block every epoch; fresh: every epoch on a new "
                        "draw of the folder's process (same circles and transition matrix, new trajectory and "
                        "noise, the training block's length), so nothing can be memorised; validation and test "
                        "are the folder's held-out blocks either way (a generated folder only)")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=at_least(1), default=batch_size, help="windows per optimizer step")
    g.add_argument("--lr", type=positive(), default=lr, help="peak learning rate")
    g.add_argument("--weight-decay", type=non_negative(), default=0.01, help="AdamW decay of the weight matrices")
    g.add_argument("--warmup-epochs", type=non_negative(), default=warmup_epochs,
                   help="epochs of linear learning-rate warm-up before the cosine decay")
    g.add_argument("--epochs", type=at_least(1), default=epochs, help="epochs to train (the schedule's length)")
    g.add_argument("--grad-clip", type=non_negative(), default=1.0, help="gradient-norm clipping (0: off)")
    g.add_argument("--num-workers", type=at_least(0, allow=(-1,)), default=-1,
                   help="DataLoader workers (-1: 0 on CPU, 4 on CUDA)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    g.add_argument("--compile", action="store_true", help="also use torch.compile on CPU")
    g.add_argument("--no-amp", action="store_true", help="fp32 on CUDA instead of BF16 autocast")
    g.add_argument("--cpu-bf16", action="store_true",
                   help="BF16 autocast on the CPU as well (a CPU with AVX512-BF16: about 1.4x faster for Mamba, "
                        "slower for the masked model; see tests/benchmarks/bench_cpu_bf16.py)")
    g.add_argument("--no-train-eval", action="store_true", help="skip the fixed-mask MSE on training windows")
    g.add_argument("--time-budget", type=positive(), default=None, help="stop cleanly after this many minutes")
    g.add_argument("--stop-after", type=at_least(1), default=None,
                   help="stop (resumably) after this many epochs of this invocation")
    g.add_argument("--seed", type=SEED, default=0, help="seed of the initialisation, masks and batch order")
    g = p.add_argument_group("outputs")
    cliargs.add_output_flags(g, None, "the run folder: checkpoints, log, metrics (default runs/<model>_<variant>); "
                                      "with --eval, where eval_metrics.json goes (default <run folder>/eval)")
    g.add_argument("--checkpoint", default=None, help="also write the best checkpoint to this path")
    g.add_argument("--resume", default=None, help="resume from a last.pt (or its run folder)")
    g.add_argument("--eval", default=None, metavar="CKPT", help="evaluate a checkpoint and redraw its figures")
    g.add_argument("--eval-mask-seed", type=SEED, default=None, metavar="SEED",
                   help="with --eval: score on the held-out masks a run of this --seed uses (default: the "
                        "checkpoint's own), so that runs of different seeds are compared on the same masks")
    g.add_argument("--force", action="store_true", help="train into an --out-dir that already holds a run")
    g.add_argument("--export", default=None, metavar="DIR",
                   help="also write the best (or --eval) model as DIR/model.safetensors + config.json; "
                        "the model class rebuilds it with from_pretrained(DIR)")


def decay_groups(model: torch.nn.Module, weight_decay: float, no_decay_names: tuple = ()) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases, norms and named exceptions."""
    decay, other = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not any(k in n for k in no_decay_names) else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
