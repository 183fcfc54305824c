"""Reading what python -m modadd.train wrote: the configuration, the final model, the
attention-matrix snapshots and the full model at any snapshot (every parameter is
snapshotted, so analyses can run on the network as it was mid-training).

Nothing read from a run folder is trusted: every configuration field is checked against its
type and range (one line naming the file and the field), arrays against the shapes the
configuration gives, a model's size against the memory there is, and CSV / JSON files are read
with one-line errors naming the file (safeio).
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re

import numpy as np
import torch

import safeio
from modadd.model import ModAddTransformer, ModelConfig, n_parameters
from modadd.task import TaskConfig

MATS = ("W_Q", "W_K", "W_V", "W_O")
DIM = 2 ** 31 - 1      # largest size a tensor dimension may take
# field -> (kinds, lo, hi, choices): what python -m modadd.train writes in config.json and model.pt
FIELDS = {
    "T": (int, 2, DIM, None), "C": (int, 2, DIM, None), "n_noise": (int, 0, DIM, None),
    "value_distractors": (bool, None, None, None), "readout_token": (bool, None, None, None),
    "d_model": (int, 1, DIM, None), "n_heads": (int, 1, DIM, None), "n_layers": (int, 1, 100_000, None),
    "mlp": (bool, None, None, None), "d_ff": (int, 1, DIM, None),
    "m_min": (int, 1, DIM, None), "m_max": (int, 1, DIM, None), "steps": (int, 1, None, None),
    "schedule": (str, None, None, ("mixed", "mixed-batch", "curriculum")),
    "optimizer": (str, None, None, ("adamw", "sgd")), "lr": (float, 0, None, None), "preset": (str, None, None, None),
    "seed": (int, 0, None, None), "batch_size": (int, 1, None, None), "snapshot_every": (int, 1, None, None),
}
MODEL_FIELDS = ("T", "C", "n_noise", "value_distractors", "readout_token", "d_model", "n_heads", "n_layers", "mlp",
                "d_ff")
RUN_FIELDS = MODEL_FIELDS + ("m_min", "m_max")                       # a model and its task's marker range
REPORT_FIELDS = RUN_FIELDS + ("steps", "schedule", "optimizer", "lr", "preset")
CURRICULUM_FIELDS = ("m_min", "m_max", "steps", "schedule")          # what the forgetting analysis reads
REDO = "re-run python -m modadd.train for this folder (with --force)"


def _need(run_dir: str, name: str) -> str:
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise safeio.InputError(f"{path} not found: give a folder written by python -m modadd.train")
    return path


def check_config(c, where: str, need=RUN_FIELDS) -> dict:
    """A run's configuration, checked: the fields in `need` (type, range, choices), and the ones
    that must agree (m_min <= m_max, heads dividing d_model, markers that fit in T). One line
    (InputError) naming `where` and the field otherwise."""
    if not isinstance(c, dict):
        raise safeio.InputError(f"{where}: the configuration is a {type(c).__name__}, not an object; {REDO}")
    for name in need:
        kinds, lo, hi, choices = FIELDS[name]
        safeio.check_field(c, name, kinds, where, lo=lo, hi=hi, choices=choices, open_lo=name == "lr")
    if "m_min" in need and "m_max" in need and c["m_min"] > c["m_max"]:
        raise safeio.InputError(f"{where}: m_min {c['m_min']} exceeds m_max {c['m_max']}")
    if set(MODEL_FIELDS) <= set(need):
        if c["d_model"] % c["n_heads"]:
            raise safeio.InputError(f"{where}: d_model {c['d_model']} is not divisible by n_heads {c['n_heads']}")
        task = TaskConfig.from_dict(c)
        if "m_max" in need and c["m_max"] > task.max_markers():
            raise safeio.InputError(f"{where}: m_max {c['m_max']} is more markers than T {c['T']} holds")
    return c


def model_config(c: dict) -> ModelConfig:
    return ModelConfig.from_dict(c, TaskConfig.from_dict(c))


def check_model_fits(c: dict, where: str, copies: float = 3.0) -> int:
    """Refuse (one line) a model whose parameters (times `copies`: the model, a state dict, a snapshot)
    do not fit in memory, before anything is allocated. Returns the parameter count (exact, in
    Python integers: no tensor is built)."""
    n = n_parameters(model_config(c))
    safeio.check_fits(4 * n * copies, f"{where}: a model of {n:,} parameters",
                      "this run's sizes cannot be loaded on this machine")
    return n


def task_and_model(c: dict, where: str = "the configuration") -> tuple[TaskConfig, ModAddTransformer]:
    check_config(c, where, MODEL_FIELDS)
    check_model_fits(c, where)
    task = TaskConfig.from_dict(c)
    model = ModAddTransformer(ModelConfig.from_dict(c, task))
    return task, model


def load_config(run_dir: str, need=RUN_FIELDS) -> dict:
    """config.json of a run folder, with the fields in `need` checked."""
    path = _need(run_dir, "config.json")
    return check_config(safeio.read_json(path, "run configuration", kind=dict), path, need)


def read_csv(path: str, what: str = "CSV file") -> dict[str, np.ndarray]:
    """A numeric CSV with a header (metrics.csv, commutators.csv) as columns; empty cells are NaN.
    One line naming the file, the column and the row for anything else."""
    raw = safeio.read_bytes(path, what)
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    except (csv.Error, UnicodeDecodeError) as e:
        raise safeio.InputError(f"{what} {path} cannot be read as CSV ({safeio.first_line(e, 120)})") from None
    if len(rows) < 2 or not rows[0]:
        raise safeio.InputError(f"{what} {path} is empty (a header and at least one row are needed)")
    header = rows[0]
    if len(set(header)) != len(header):
        raise safeio.InputError(f"{what} {path}: a column name appears twice in the header")
    cols = [[] for _ in header]
    for i, r in enumerate(rows[1:], 2):
        if len(r) != len(header):
            raise safeio.InputError(f"{what} {path}: row {i} has {len(r)} cells, the header {len(header)}")
        for j, v in enumerate(r):
            try:
                cols[j].append(float(v) if v.strip() else np.nan)
            except ValueError:
                raise safeio.InputError(f"{what} {path}: column {header[j]!r:.40}, row {i}: {v!r:.40} is not a "
                                        f"number") from None
    return {k: np.array(c, dtype=np.float64) for k, c in zip(header, cols)}


def read_metrics(run_dir: str, c: dict) -> dict[str, np.ndarray]:
    """metrics.csv of a run: a step column that does not decrease and an acc_m<m> column per m."""
    path = _need(run_dir, "metrics.csv")
    M = read_csv(path, "metrics file")
    need = ["step"] + [f"acc_m{m}" for m in range(c["m_min"], c["m_max"] + 1)] if "m_min" in c else ["step"]
    missing = [k for k in need if k not in M]
    if missing:
        raise safeio.InputError(f"metrics file {path} has no {missing[0]} column; {REDO}")
    if not np.all(np.isfinite(M["step"])) or np.any(np.diff(M["step"]) < 0):
        raise safeio.InputError(f"metrics file {path}: the step column must hold increasing numbers; {REDO}")
    return M


def load_run(run_dir: str):
    """(final model in eval mode, task, config)."""
    path = _need(run_dir, "model.pt")
    try:  # tensors and plain data only: a pickle that would run code is refused before it runs
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        raise safeio.InputError(f"{path} is not a model file this project can load safely "
                                f"({safeio.first_line(e)}); {REDO}") from None
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise safeio.InputError(f"{path} was not written by modadd.train (no config / model)")
    c = check_config(ck["config"], f"{path} (its config)")
    task, model = task_and_model(c, f"{path} (its config)")
    state = ck["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise safeio.InputError(f"{path}: its weights are not a dictionary of tensors; {REDO}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise safeio.InputError(f"{path}: its weights do not fit the model its config describes "
                                f"({safeio.first_line(e, 160)}); {REDO}") from None
    return model.eval(), task, c


def _snapshot_arrays(run_dir: str) -> tuple[str, dict[str, np.ndarray]]:
    """snapshots.npz, every array checked for a plain numeric dtype and finite values."""
    path = _need(run_dir, "snapshots.npz")
    z = safeio.load_npz(path, "snapshots file")
    for k, a in z.items():
        if a.dtype.kind not in "biuf":
            raise safeio.InputError(f"snapshots file {path}: array {k!r:.60} has dtype {a.dtype}, not real numbers")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise safeio.InputError(f"snapshots file {path}: array {k!r:.60} holds NaN or infinite values; the "
                                    f"run diverged or the file is damaged")
    return path, z


def load_snapshots(run_dir: str) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, 'W_Q'|...): (n_snapshots, d*d)} of the attention matrices."""
    path, z = _snapshot_arrays(run_dir)
    out = {}
    for k, a in z.items():
        m = re.fullmatch(r"L(\d{1,6})_(W_[QKVO])", k)
        if m:
            if a.ndim < 2 or a.shape[0] == 0 or a.size == 0:
                raise safeio.InputError(f"snapshots file {path}: array {k} has shape {a.shape}, not (snapshots, ...)")
            out[(int(m.group(1)), m.group(2))] = a.reshape(a.shape[0], -1)
    if not out:
        raise safeio.InputError(f"snapshots file {path} holds no attention matrices (L<layer>_W_Q ...)")
    n = {v.shape[0] for v in out.values()}
    if len(n) > 1:
        raise safeio.InputError(f"snapshots file {path}: its matrices have different numbers of snapshots {sorted(n)}")
    if n.pop() < 3:
        raise ValueError(f"{path}: need at least 3 snapshots of the attention matrices")
    return out


def _steps(path: str, z: dict, n: int | None = None) -> np.ndarray:
    s = z.get("steps")
    if s is None or s.ndim != 1 or len(s) == 0 or (n is not None and len(s) != n):
        raise safeio.InputError(f"snapshots file {path}: no 'steps' array with one step per snapshot; {REDO}")
    return s


def snapshot_steps(run_dir: str) -> np.ndarray:
    path, z = _snapshot_arrays(run_dir)
    return _steps(path, z)


def model_at(run_dir: str, index: int):
    """(model with its weights at snapshot `index`, step of that snapshot, task, config)."""
    c = load_config(run_dir)
    task, model = task_and_model(c, os.path.join(run_dir, "config.json"))
    path, z = _snapshot_arrays(run_dir)
    if "rest.tok.weight" not in z:
        raise ValueError(f"{run_dir}: snapshots hold the attention matrices only (train again to keep them all)")
    steps = _steps(path, z)
    if not -len(steps) <= index < len(steps):
        raise safeio.InputError(f"snapshots file {path}: no snapshot {index} ({len(steps)} snapshots)")
    state = {}
    for name, p in model.state_dict().items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.(W_[QKVO])\.weight", name)
        key = f"L{m.group(1)}_{m.group(2)}" if m else "rest." + name
        arr = z.get(key)
        if arr is None or arr.ndim < 1 or arr.shape[0] != len(steps) or arr[index].size != p.numel():
            raise safeio.InputError(f"snapshots file {path}: array {key} is missing or does not fit the model of "
                                    f"{os.path.join(run_dir, 'config.json')} ({tuple(p.shape)} per snapshot); {REDO}")
        state[name] = torch.from_numpy(np.ascontiguousarray(arr[index])).reshape(p.shape).to(p.dtype)
    model.load_state_dict(state)
    return model.eval(), int(steps[index]), task, c


@contextlib.contextmanager
def layout(paths, writer: str):
    """Reading the content of JSON files a stage wrote: a missing key or a value of the wrong kind is
    one line naming the files and the stage that writes them, not a KeyError / TypeError traceback."""
    try:
        yield
    except safeio.InputError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError, ZeroDivisionError) as e:
        names = [paths] if isinstance(paths, str) else list(paths)
        what = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        detail = f"{type(e).__name__} {safeio.first_line(e, 80)}"
        raise safeio.InputError(f"{what} do(es) not have the layout {writer} writes ({detail}); run {writer} "
                                f"again with --force") from None
