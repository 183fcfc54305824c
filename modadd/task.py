"""Marker-based modular addition.

A sequence of T tokens holds m marker tokens at distinct positions, each followed by a
value token in [0, C); the label is the sum of the marked values mod C. Every other
position holds an i.i.d. distractor. With `value_distractors` (the default) distractors
are drawn from the value tokens and the noise tokens alike, so a value only counts when a
marker precedes it and the markers are needed; without it they come from the noise tokens
only (the original code, where values never appear as distractors). Marker positions are
drawn per example; pairs never overlap. With `readout_token` the last position holds a
dedicated read-out token and never a pair.

Token ids: values 0..C-1, marker C, noise C+1..C+n_noise, read-out C+n_noise+1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TaskConfig:
    T: int = 16
    C: int = 8
    n_noise: int = 8
    value_distractors: bool = True
    readout_token: bool = False

    @classmethod
    def from_dict(cls, c: dict) -> "TaskConfig":
        """The task of a run's configuration (config.json or a resolved preset)."""
        return cls(c["T"], c["C"], c["n_noise"], c["value_distractors"], c["readout_token"])

    @property
    def marker(self) -> int:
        return self.C

    @property
    def readout(self) -> int:
        return self.C + self.n_noise + 1

    @property
    def vocab_size(self) -> int:
        return self.C + self.n_noise + 1 + int(self.readout_token)

    def max_markers(self) -> int:
        slots = self.T - 1 - int(self.readout_token)     # positions a marker may take (value follows)
        return (slots + 1) // 2


def sample(cfg: TaskConfig, m: torch.Tensor | int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """n examples; m is an int or a (n,) tensor of marker counts. Returns (tokens (n, T) long,
    labels (n,), marker positions (n, max m) with -1 padding, m (n,))."""
    m = torch.full((n,), m, dtype=torch.long) if isinstance(m, int) else m.long()
    if int(m.min()) < 1 or int(m.max()) > cfg.max_markers():
        raise ValueError(f"m must lie in 1..{cfg.max_markers()} for T = {cfg.T}")
    slots = cfg.T - 1 - int(cfg.readout_token)
    M = int(m.max())
    # distinct start slots s_1 < ... < s_m from range(slots - m + 1); p_i = s_i + i keeps pairs apart
    width = slots - m + 1                                  # per example
    keys = torch.rand(n, slots, generator=gen)
    keys[torch.arange(slots)[None, :] >= width[:, None]] = 2.0      # outside the range: never chosen
    s = keys.argsort(1)[:, :M].sort(1).values
    use = torch.arange(M)[None, :] < m[:, None]
    pos = torch.where(use, s + torch.arange(M)[None, :], torch.full_like(s, -1))
    if cfg.value_distractors:
        pool = torch.cat([torch.arange(cfg.C), torch.arange(cfg.C + 1, cfg.C + 1 + cfg.n_noise)])
    else:
        pool = torch.arange(cfg.C + 1, cfg.C + 1 + cfg.n_noise)
    tokens = pool[torch.randint(len(pool), (n, cfg.T), generator=gen)]
    values = torch.randint(cfg.C, (n, M), generator=gen)
    rows = torch.arange(n)[:, None].expand(n, M)
    tokens[rows[use], pos[use]] = cfg.marker
    tokens[rows[use], pos[use] + 1] = values[use]
    if cfg.readout_token:
        tokens[:, -1] = cfg.readout
    labels = (values * use).sum(1) % cfg.C
    return tokens, labels, pos, m


def label_of(cfg: TaskConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Independent reading of a sequence: the sum mod C of the token after each marker."""
    out = []
    for row in tokens.tolist():
        out.append(sum(row[i + 1] for i in range(len(row) - 1) if row[i] == cfg.marker) % cfg.C)
    return torch.tensor(out)


def m_schedule(kind: str, m_min: int, m_max: int, steps: int):
    """step -> ('example', (lo, hi)) for mixed-per-example, ('batch', (lo, hi)) for mixed-per-batch,
    or ('fixed', m) for the curriculum (equal stages m_min..m_max)."""
    if kind == "mixed":
        return lambda step: ("example", (m_min, m_max))
    if kind == "mixed-batch":
        return lambda step: ("batch", (m_min, m_max))
    if kind == "curriculum":
        n_stages = m_max - m_min + 1
        return lambda step: ("fixed", min(m_min + step * n_stages // steps, m_max))
    raise ValueError(f"unknown schedule {kind!r} (mixed, mixed-batch, curriculum)")


def batch_for(cfg: TaskConfig, rule, n: int, gen: torch.Generator):
    kind, arg = rule
    if kind == "example":
        m = torch.randint(arg[0], arg[1] + 1, (n,), generator=gen)
    elif kind == "batch":
        m = int(torch.randint(arg[0], arg[1] + 1, (1,), generator=gen))
    else:
        m = arg
    return sample(cfg, m, n, gen)
