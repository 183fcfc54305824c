"""Reading what python -m modadd.train wrote: the configuration, the final model, the
attention-matrix snapshots and the full model at any snapshot (every parameter is
snapshotted, so analyses can run on the network as it was mid-training)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import torch

from modadd.model import ModAddTransformer, ModelConfig
from modadd.task import TaskConfig

MATS = ("W_Q", "W_K", "W_V", "W_O")


def _need(run_dir: str, name: str) -> str:
    path = os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: give a folder written by python -m modadd.train")
    return path


def task_and_model(c: dict) -> tuple[TaskConfig, ModAddTransformer]:
    task = TaskConfig.from_dict(c)
    model = ModAddTransformer(ModelConfig.from_dict(c, task))
    return task, model


def load_config(run_dir: str) -> dict:
    with open(_need(run_dir, "config.json")) as f:
        return json.load(f)


def load_run(run_dir: str):
    """(final model in eval mode, task, config)."""
    path = _need(run_dir, "model.pt")
    try:  # tensors and plain data only: a pickle that would run code is refused before it runs
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"{path} is not a model file this project can load safely "
                         f"({str(e).splitlines()[0][:200]}); re-run modadd.train for this folder") from e
    if not isinstance(ck, dict) or "config" not in ck or "model" not in ck:
        raise ValueError(f"{path} was not written by modadd.train (no config / model)")
    task, model = task_and_model(ck["config"])
    model.load_state_dict(ck["model"])
    return model.eval(), task, ck["config"]


def load_snapshots(run_dir: str) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, 'W_Q'|...): (n_snapshots, d*d)} of the attention matrices."""
    path = _need(run_dir, "snapshots.npz")
    z = np.load(path)
    out = {}
    for k in z.files:
        m = re.fullmatch(r"L(\d+)_(W_[QKVO])", k)
        if m:
            out[(int(m.group(1)), m.group(2))] = z[k].reshape(z[k].shape[0], -1)
    if not out or next(iter(out.values())).shape[0] < 3:
        raise ValueError(f"{path}: need at least 3 snapshots of the attention matrices")
    return out


def snapshot_steps(run_dir: str) -> np.ndarray:
    return np.load(_need(run_dir, "snapshots.npz"))["steps"]


def model_at(run_dir: str, index: int):
    """(model with its weights at snapshot `index`, step of that snapshot, task, config)."""
    c = load_config(run_dir)
    task, model = task_and_model(c)
    z = np.load(_need(run_dir, "snapshots.npz"))
    if "rest.tok.weight" not in z.files:
        raise ValueError(f"{run_dir}: snapshots hold the attention matrices only (train again to keep them all)")
    state = {}
    for name, p in model.state_dict().items():
        m = re.fullmatch(r"blocks\.(\d+)\.attn\.(W_[QKVO])\.weight", name)
        arr = z[f"L{m.group(1)}_{m.group(2)}"] if m else z["rest." + name]
        state[name] = torch.from_numpy(np.ascontiguousarray(arr[index])).reshape(p.shape).to(p.dtype)
    model.load_state_dict(state)
    return model.eval(), int(z["steps"][index]), task, c
