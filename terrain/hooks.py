"""The hook machinery of the residual modulators: find a model's block list, and a base class
whose transform rewrites the residual stream entering chosen blocks through forward pre-hooks,
attached and detached with context managers (`with mod.attached(model, layers):`,
`with mod.suspended():`). terrain.modulate (LERP) and terrain.field (simplex experts) build on it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from terrain.models import TerrainError


def encoder_blocks(model) -> nn.ModuleList:
    """The list of blocks of a BERT-style or T5-style encoder, or of a causal LM (Llama/Qwen-style
    `model.layers`, GPT-2-style `transformer.h`)."""
    for path in ("encoder.layer", "encoder.block", "block", "encoder.layers", "layers", "model.layers",
                 "model.language_model.layers", "transformer.h"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise TerrainError(f"{type(model).__name__}: no encoder block list found (BERT-style encoder.layer or "
                       f"T5-style block)")


class HookedModulator(nn.Module):
    """Base of the modulators: `transform(h, k)` rewrites the residual stream entering the
    k-th chosen block; forward pre-hooks on the model's own blocks apply it."""

    def __init__(self):
        super().__init__()
        self._ids = None
        self._handles = []
        self._where = None

    def transform(self, h: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def n_slots(self) -> int:
        raise NotImplementedError

    @contextmanager
    def attached(self, model, layers: list[int]):
        """The modulator inside `model` for the block's duration, removed after (also on errors)."""
        self.attach(model, layers)
        try:
            yield self
        finally:
            self.detach()

    @contextmanager
    def suspended(self):
        """The model as it is without the modulator for the block's duration (e.g. to generate the
        unmodulated reference), then the modulator back where it was."""
        where = self._where
        self.detach()
        try:
            yield
        finally:
            if where is not None:
                self.attach(*where)

    def attach(self, model, layers: list[int]):
        """Register the hooks on `model` (an encoder) before each block in `layers` (see also
        attached() and suspended(), which undo it when their block ends)."""
        self.detach()
        blocks = encoder_blocks(model)
        if len(layers) != self.n_slots() or any(not 0 <= i < len(blocks) for i in layers):
            raise TerrainError(f"layers {layers} do not fit a model with {len(blocks)} blocks and a modulator "
                               f"for {self.n_slots()} layers")

        def grab_ids(_module, args):
            self._ids = args[0] if args else None

        self._handles.append(model.get_input_embeddings().register_forward_pre_hook(grab_ids))
        for k, i in enumerate(layers):
            def hook(_module, args, kwargs, k=k):
                if args:
                    return (self.transform(args[0], k), *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = self.transform(kwargs["hidden_states"], k)
                return args, kwargs
            self._handles.append(blocks[i].register_forward_pre_hook(hook, with_kwargs=True))
        self._where = (model, list(layers))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._ids = None
        self._where = None
