"""Relative-position buckets shared by the masked model and the terrain battery (T5's scheme)."""
from __future__ import annotations

import math

import torch


def t5_relative_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int,
                       bidirectional: bool = True) -> torch.Tensor:
    """T5's bucket of each relative position (key - query).

    Half the buckets hold each sign when bidirectional. Within a sign, distances below
    num_buckets/4 (a quarter of the buckets) get a bucket each; larger ones share buckets
    spaced logarithmically up to max_distance, beyond which all share the last bucket.
    """
    rel = relative_position
    buckets = num_buckets
    offset = torch.zeros_like(rel)
    if bidirectional:
        buckets //= 2
        offset = (rel > 0).to(rel.dtype) * buckets
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = buckets // 2
    # log-spaced buckets for exact <= dist < max_distance; clamp avoids log(0) on the small ones
    scaled = torch.log(dist.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = exact + (scaled * (buckets - exact)).to(rel.dtype)
    far = far.clamp(max=buckets - 1)
    return offset + torch.where(dist < exact, dist, far)
