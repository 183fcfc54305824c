"""Checkpoints of the sequence models: written as plain data (tensors, numbers, strings, lists and
dicts), atomically, and read with torch.load(weights_only=True), so that nothing in a checkpoint can
run code; every entry a reader uses is checked where it is read. A shared module below training.py,
so that the oracle's command can read a run's checkpoint without importing the training driver.
"""
from __future__ import annotations

import os

import numpy as np
import torch

import safeio


class TrainingError(RuntimeError):
    """A problem the user can fix (bad input, incompatible checkpoint, diverged run)."""


def plain(obj):
    """obj with numpy scalars and arrays turned into Python numbers and tensors, so that it
    loads with torch.load(weights_only=True); anything else that is not plain data is an error."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.Size, torch.dtype)):
        return obj
    raise TypeError(f"checkpoint value of type {type(obj).__name__} is not plain data")


def save_checkpoint(path: str, payload: dict) -> None:
    """torch.save, atomically. Only plain data is written (see `plain`), so the file loads with
    weights_only=True."""
    with safeio.atomic_path(path) as tmp:
        torch.save(plain(payload), tmp)


def safe_load(path: str):
    """torch.load(weights_only=True): tensors and plain containers only. A pickle that would
    build any other object (and so could run code) is refused before anything runs."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str, model_type: str | None = None) -> dict:
    """Load a checkpoint written by save_checkpoint, checking which model it holds."""
    if os.path.isdir(path):
        for name in ("best.pt", "last.pt"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    if not os.path.exists(path):
        raise TrainingError(f"checkpoint {path!r} not found")
    try:
        safeio.regular_file(path, "checkpoint")
    except safeio.InputError as e:
        raise TrainingError(str(e)) from None
    try:
        ckpt = safe_load(path)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        why = safeio.first_line(e, 200)
        if "weights only load failed" in why.lower() or "weights_only" in why:
            why = "it holds Python objects besides tensors and plain data: a pickle that could run code"
        elif os.path.getsize(path) == 0:
            why = "the file is empty"
        raise TrainingError(f"{path} is not a checkpoint this project can load safely ({why}); only files written "
                            f"by its scripts (tensors and plain data) are accepted") from None
    if not isinstance(ckpt, dict) or "model_type" not in ckpt:
        raise TrainingError(f"{path} was not written by this project (no model_type)")
    missing = [k for k in ("model_config", "model", "data") if k not in ckpt]
    if missing:
        raise TrainingError(f"{path} lacks {', '.join(missing)}; it is incomplete or was not written by "
                            f"this project's training")
    if model_type is not None and ckpt["model_type"] != model_type:
        raise TrainingError(f"{path} holds a {ckpt['model_type']!r} model, not a {model_type!r} model; "
                            f"use the script that trained it")
    check_checkpoint_fields(ckpt, path)
    ckpt["path"] = path
    return ckpt


# what a checkpoint's "data" entry may hold: (kinds, lowest value, required, open at the low end)
DATA_FIELDS = {"data_dir": (str, None, True, False), "seq_len": (int, 2, True, False), "stride": (int, 1, True, False),
               "val_frac": (float, 0, True, True), "test_frac": (float, 0, True, False), "seed": (int, 0, True, False),
               "mask_ratio": (float, 0, False, True), "mask_patch_size": (int, 1, False, False),
               "mask_patch_min": (int, 1, False, False), "mask_patch_max": (int, 1, False, False),
               "eval_warmup": (int, 0, False, False), "train_data": (str, None, False, False)}


def check_checkpoint_fields(ckpt: dict, path: str) -> None:
    """The plain entries of a checkpoint, checked at the boundary (types and ranges), so a file
    with a field of the wrong type is one line naming it rather than a TypeError later."""
    try:
        safeio.check_field(ckpt, "model_type", str, path)
        for k in ("model_config", "model", "data"):
            safeio.check_field(ckpt, k, dict, path)
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
            raise safeio.InputError(f"{path}: the field 'model' must map parameter names to tensors")
        data = ckpt["data"]
        for k, (kind, lo, required, open_lo) in DATA_FIELDS.items():
            safeio.check_field(data, k, kind, f"{path} (data)", lo=lo, open_lo=open_lo, required=required,
                               nullable=k in ("mask_patch_min", "mask_patch_max"),
                               hi=1 if kind is float else None)
        safeio.check_field(data, "train_data", str, f"{path} (data)", required=False, choices=("fixed", "fresh"))
        if data["val_frac"] + data["test_frac"] >= 1:
            raise safeio.InputError(f"{path} (data): val_frac + test_frac must be below 1")
        for k in ("data_config", "args", "fit_state", "splits"):
            safeio.check_field(ckpt, k, dict, path, required=False)
        safeio.check_field(ckpt, "data_generation", str, path, required=False, nullable=True)
        safeio.check_field(ckpt, "epoch", int, path, lo=0, required=False)
    except safeio.InputError as e:
        raise TrainingError(f"{e}; the checkpoint was not written by this project's training") from None
