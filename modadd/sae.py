"""Sparse autoencoders on an intermediate residual stream, and what ablating their latents
does to the task, at several points of training.

    python -m modadd.sae runs/modadd_code_s0 [--layer 2] [--at 0.1,0.25,0.5,1] [--variable m]

For each chosen snapshot the network is rebuilt as it was then (every parameter is
snapshotted by modadd.train). Residual vectors after `--layer` blocks, at every position
of fresh training-distribution sequences, train two SAEs: TopK (exactly k latents active)
and ReLU + L1 (penalty on activation times decoder norm). Latents are chosen by their
absolute Pearson correlation, over (sequence, position) vectors of a selection set, with
a task variable: m (markers in the sequence), marker (a marker token here), marked_value
(a value that follows a marker), value_token, position.

Ablation runs the remaining layers on a substituted residual stream at every position,
on held-out sequences per m that neither the SAEs nor the selection saw:
  reconstruction   the SAE's reconstruction (what the SAE alone costs)
  ablated          the reconstruction with the chosen latents set to zero
  random           the same with as many random live latents (--n-random draws)
  ablated (error kept) / random (error kept): only the latents' contribution removed,
                   x - (z - z_ablated) W_dec, so the SAE's error does not mask the effect
The effect of the chosen latents is the accuracy drop from the reconstruction beside the
drop for random latents. Writes sae.json in the run folder (or --out-dir) and sae.png in
--plots-dir (default plots/<run name>); earlier ones stop it unless --force (which replaces them).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import safeio
from cliargs import SEED, Parser, add_output_flags, at_least, non_negative
from modadd.figures import claim, emit, save, stage_files, stage_key, subplots
from modadd.runs import check_model_fits, load_config, model_at, snapshot_steps
from modadd.task import sample
from modadd.train import pick_device
from statsutil import pearson
from training import TrainingError

VARIABLES = ("m", "marker", "marked_value", "value_token", "position")
NAME = "sae"
KEY = stage_key(NAME)


def outputs(out_dir: str, plots: bool = True, plots_dir: str | None = None) -> list[str]:
    """Every file this stage writes for out_dir (plots False: those of a --no-plot run)."""
    return stage_files(out_dir, NAME, plots, plots_dir)


class SAE(nn.Module):
    """x -> z (n latents) -> x_hat. kind 'topk' keeps the k largest pre-activations (ReLU'd);
    kind 'relu' is a ReLU SAE trained with an L1 penalty. Inputs are centred and scaled by
    buffers fitted to the training data, so the penalty does not depend on their scale."""

    def __init__(self, d: int, n: int, kind: str = "topk", k: int = 8, l1: float = 1e-2, seed: int = 0):
        super().__init__()
        if kind not in ("topk", "relu"):
            raise ValueError(f"unknown SAE kind {kind!r} (topk, relu)")
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, d, generator=g)
        W = W / W.norm(dim=1, keepdim=True)
        self.kind, self.k, self.l1 = kind, k, l1
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.T.clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("mu", torch.zeros(d))
        self.register_buffer("scale", torch.ones(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = ((x - self.mu) / self.scale - self.b_dec) @ self.W_enc + self.b_enc
        if self.kind == "relu":
            return F.relu(pre)
        v, i = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, F.relu(v))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.W_dec + self.b_dec) * self.scale + self.mu

    def forward(self, x):
        z = self.encode(x)
        return self.decode(z), z

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        x_hat, z = self(x)
        mse = (((x_hat - x) / self.scale) ** 2).sum(-1).mean()
        if self.kind == "relu":
            mse = mse + self.l1 * (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        return mse


def train_sae(X: torch.Tensor, kind: str, n_latents: int, k: int, l1: float, steps: int = 3000,
              batch: int = 1024, lr: float = 1e-3, seed: int = 0) -> SAE:
    sae = SAE(X.shape[1], n_latents, kind, k, l1, seed).to(X.device)
    sae.mu.copy_(X.mean(0))
    sae.scale.copy_((X - X.mean(0)).norm(dim=1).mean().clamp_min(1e-8))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        loss = sae.loss(X[torch.randint(len(X), (batch,), generator=g).to(X.device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            if kind == "topk":                      # unit decoder rows (the L1 penalty already weighs norms)
                sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return sae.eval()


def quality(sae: SAE, X: torch.Tensor) -> dict:
    with torch.no_grad():
        x_hat, z = sae(X)
    fvu = float(((x_hat - X) ** 2).sum() / ((X - X.mean(0)) ** 2).sum())
    return {"fvu": fvu, "l0": float((z > 0).float().sum(1).mean()), "dead": int(((z > 0).sum(0) == 0).sum())}


def task_variables(tokens: torch.Tensor, m: torch.Tensor, task) -> dict[str, np.ndarray]:
    """Per (sequence, position) values of the task variables, flattened row-major."""
    n, T = tokens.shape
    after = torch.zeros_like(tokens, dtype=torch.bool)
    after[:, 1:] = tokens[:, :-1] == task.marker
    return {"m": m[:, None].expand(n, T).float(), "marker": (tokens == task.marker).float(),
            "marked_value": after.float(), "value_token": (tokens < task.C).float(),
            "position": torch.arange(T)[None, :].expand(n, T).float()}


def correlations(Z: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Pearson r of every column of Z with v (0 where either is constant)."""
    return np.nan_to_num(pearson(Z, v), nan=0.0)


def substituted_logits(model, sae: SAE, layer: int, x: torch.Tensor, drop: list[int] | None,
                       keep_error: bool) -> torch.Tensor:
    """Logits when the residual after `layer` blocks is replaced, at every position, by the
    SAE reconstruction with the `drop` latents zeroed (drop None: the plain reconstruction).
    keep_error: remove only the dropped latents' contribution instead."""
    return Substitution(model, sae, layer, x).logits(drop, keep_error)


class Substitution:
    """One batch's residual after `layer` blocks and its SAE code, computed once and
    reused for every set of latents ablated on that batch."""

    def __init__(self, model, sae: SAE, layer: int, x: torch.Tensor):
        self.model, self.sae, self.layer = model, sae, layer
        with torch.no_grad():
            self.h = model.residual(x, layer)
            self.z = sae.encode(self.h)

    def logits(self, drop: list[int] | None, keep_error: bool) -> torch.Tensor:
        with torch.no_grad():
            za = self.z.clone()
            if drop:
                za[..., drop] = 0
            sae = self.sae
            h_new = self.h - (self.z - za) @ sae.W_dec * sae.scale if keep_error else sae.decode(za)
            return self.model.finish(h_new, self.layer)

    def accuracy(self, y: torch.Tensor, drop: list[int] | None, keep_error: bool) -> float:
        return float((self.logits(drop, keep_error).argmax(-1) == y).float().mean())


def analyse_snapshot(model, task, c, layer, *, kinds, variable, n_select, n_random, n_latents, k, l1, sae_steps,
                     n_train, n_eval, seed) -> dict:
    m_lo, m_hi = c["m_min"], c["m_max"]
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(4141 + seed)             # SAE training + selection data
    tok, _, _, m = sample(task, torch.randint(m_lo, m_hi + 1, (n_train,), generator=g), n_train, g)
    with torch.no_grad():
        H = model.residual(tok.to(dev), layer)
    X = H.reshape(-1, H.shape[-1])
    var = {k_: v.reshape(-1).numpy() for k_, v in task_variables(tok, m, task).items()}
    ge = torch.Generator().manual_seed(4242 + seed)            # held-out ablation sets per m
    evals = {mm: tuple(t.to(dev) for t in sample(task, mm, n_eval, ge)[:2]) for mm in range(m_lo, m_hi + 1)}
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        base = {mm: float((model(x).argmax(-1) == y).float().mean()) for mm, (x, y) in evals.items()}
    out = {"accuracy": base, "kinds": {}}
    for kind in kinds:
        sae = train_sae(X, kind, n_latents, k, l1, sae_steps, seed=seed)
        with torch.no_grad():
            Z = sae.encode(X).cpu().numpy()
        corr = {name: correlations(Z, v) for name, v in var.items()}
        chosen = [int(i) for i in np.argsort(-np.abs(corr[variable]))[:n_select]]
        live = np.flatnonzero((Z > 0).mean(0) > 1e-3)
        pool = np.setdiff1d(live, chosen)
        draws = [rng.choice(pool, size=min(n_select, len(pool)), replace=False).tolist() for _ in range(n_random)]
        row = {"quality": quality(sae, X), "chosen": chosen, "live_latents": int(len(live)),
               "chosen_r": [float(corr[variable][i]) for i in chosen],
               "best_abs_r": {name: float(np.abs(r).max()) for name, r in corr.items()}, "per_m": {}}
        for mm, (x, y) in evals.items():
            sub = Substitution(model, sae, layer, x)
            r = {"reconstruction": sub.accuracy(y, None, False)}
            for tag, ke in (("", False), ("_error_kept", True)):
                r["ablated" + tag] = sub.accuracy(y, chosen, ke)
                rand = [sub.accuracy(y, d, ke) for d in draws]
                r["random" + tag + "_mean"], r["random" + tag + "_std"] = float(np.mean(rand)), float(np.std(rand))
            row["per_m"][str(mm)] = r
        row["drop"] = summarise_drops(row["per_m"], base)
        out["kinds"][kind] = row
    return out


def summarise_drops(per_m: dict, base: dict) -> dict:
    """Accuracy drops averaged over m: the SAE's own cost and what the chosen / random
    latents cost on top of it (and with the error kept, relative to the model itself)."""
    ms = list(per_m)

    def mean(f):
        return float(np.mean([f(per_m[m], base[int(m)]) for m in ms]))
    return {"reconstruction": mean(lambda r, b: b - r["reconstruction"]),
            "chosen": mean(lambda r, b: r["reconstruction"] - r["ablated"]),
            "random": mean(lambda r, b: r["reconstruction"] - r["random_mean"]),
            "random_std": mean(lambda r, b: r["random_std"]),
            "chosen_error_kept": mean(lambda r, b: b - r["ablated_error_kept"]),
            "random_error_kept": mean(lambda r, b: b - r["random_error_kept_mean"]),
            "random_error_kept_std": mean(lambda r, b: r["random_error_kept_std"])}


def analyse(run_dir: str, *, layer: int | None = None, at=(0.1, 0.25, 0.5, 1.0), kinds=("topk", "relu"),
            variable: str = "m", n_select: int = 8, n_random: int = 20, n_latents: int = 512, k: int = 8,
            l1: float = 1e-2, sae_steps: int = 3000, n_train: int = 3000, n_eval: int = 1000, seed: int = 0,
            progress: bool = True, device: str = "cpu") -> dict:
    from tqdm import tqdm
    if variable not in VARIABLES:
        raise ValueError(f"unknown variable {variable!r} ({', '.join(VARIABLES)})")
    c = load_config(run_dir)
    check_model_fits(c, f"{run_dir}/config.json")
    check_sizes(c, n_latents, n_train, n_eval)
    layer = c["n_layers"] // 2 if layer is None else layer
    if not 1 <= layer < c["n_layers"]:
        raise ValueError(f"--layer must lie in 1..{c['n_layers'] - 1} (residual after that many blocks; "
                         f"later blocks must remain to be run)")
    steps = snapshot_steps(run_dir)
    idx = sorted({int(round(f * (len(steps) - 1))) for f in at})
    out = {"run": run_dir, "layer": layer, "variable": variable, "n_select": n_select, "n_random": n_random,
           "n_latents": n_latents, "k": k, "l1": l1, "snapshots": []}
    for i in tqdm(idx, desc="SAE per snapshot", disable=not (progress and sys.stderr.isatty())):
        model, step, task, c = model_at(run_dir, i)
        model.to(pick_device(device))
        r = analyse_snapshot(model, task, c, layer, kinds=kinds, variable=variable, n_select=n_select,
                             n_random=n_random, n_latents=n_latents, k=k, l1=l1, sae_steps=sae_steps,
                             n_train=n_train, n_eval=n_eval, seed=seed)
        out["snapshots"].append({"step": step, **r})
    return out


def check_sizes(c: dict, n_latents: int, n_train: int, n_eval: int, batch: int = 1024) -> None:
    """One line, before anything is allocated, when the SAEs and their data do not fit in memory:
    the residuals and codes of every (sequence, position) of the training set (codes also in float64
    for the correlations), the SAE with its Adam state, and the codes of an evaluation batch."""
    rows, d = n_train * c["T"], c["d_model"]
    need = (rows * d * 4 * 2 + rows * n_latents * (4 + 8 * 3) + n_latents * d * 4 * 8
            + n_eval * c["T"] * (n_latents + d) * 4 * 3 + batch * n_latents * 4 * 4)
    safeio.check_fits(need, f"SAEs of {n_latents:,} latents on {n_train:,} sequences of {c['T']} tokens",
                      "use smaller --n-latents / --n-train / --n-eval")


def format_table(res: dict) -> str:
    lines = [f"{res['run']}: SAEs on the residual after {res['layer']} blocks; {res['n_select']} latents chosen by "
             f"|r| with {res['variable']}; accuracy drops averaged over m (random: {res['n_random']} draws)",
             "| step | SAE | FVU | L0 | max abs r | model acc | drop: reconstruction | chosen | random "
             "| chosen, error kept | random, error kept |", "|---" * 11 + "|"]
    for s in res["snapshots"]:
        acc = np.mean(list(s["accuracy"].values()))
        for kind, r in s["kinds"].items():
            d, q = r["drop"], r["quality"]
            lines.append(f"| {s['step']} | {kind} | {q['fvu']:.3f} | {q['l0']:.1f} | "
                         f"{np.abs(r['chosen_r']).max():.2f} | {acc:.3f} | {d['reconstruction']:+.3f} | "
                         f"{d['chosen']:+.3f} | {d['random']:+.3f} +- {d['random_std']:.3f} | "
                         f"{d['chosen_error_kept']:+.3f} | {d['random_error_kept']:+.3f} +- "
                         f"{d['random_error_kept_std']:.3f} |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    kinds = list(res["snapshots"][0]["kinds"])
    fig, ax = subplots(len(kinds), figsize=(6 * len(kinds), 4))
    ax = np.atleast_1d(ax)
    steps = [s["step"] for s in res["snapshots"]]
    for a, kind in zip(ax, kinds):
        d = [s["kinds"][kind]["drop"] for s in res["snapshots"]]
        a.plot(steps, [x["chosen_error_kept"] for x in d], "o-", label=f"chosen latents (|r| with {res['variable']})")
        mu = np.array([x["random_error_kept"] for x in d])
        sd = np.array([x["random_error_kept_std"] for x in d])
        a.plot(steps, mu, "s--", color="0.4", label="random live latents")
        a.fill_between(steps, mu - sd, mu + sd, color="0.8")
        a.plot(steps, [x["reconstruction"] for x in d], "^:", label="reconstruction alone")
        a.axhline(0, color="k", lw=0.5)
        a.set_xlabel("training step of the snapshot")
        a.set_ylabel("accuracy drop (mean over m)")
        a.set_title(f"{kind} SAE, residual after {res['layer']} blocks", fontsize=10)
        a.legend(fontsize=8)
    return save(fig, path)


def build_parser() -> Parser:
    p = Parser(prog="python -m modadd.sae", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("run", help="a run folder written by python -m modadd.train")
    p.add_argument("--layer", type=at_least(1), default=None,
                   help="residual after this many blocks, 1 .. n_layers - 1 (default: n_layers // 2)")
    p.add_argument("--at", default="0.1,0.25,0.5,1", help="snapshots as fractions of training")
    p.add_argument("--kinds", default="topk,relu", help="SAE kinds to train, comma-separated (topk, relu)")
    p.add_argument("--variable", default="m", choices=VARIABLES,
                   help="the task variable latents are selected for and ablated against")
    p.add_argument("--n-select", type=at_least(1), default=8, help="latents chosen and ablated (below --n-latents)")
    p.add_argument("--n-random", type=at_least(1), default=20, help="random-latent draws")
    p.add_argument("--n-latents", type=at_least(1), default=512, help="dictionary size of each SAE")
    p.add_argument("--k", type=at_least(1), default=8, help="active latents of the TopK SAE (at most --n-latents)")
    p.add_argument("--l1", type=non_negative(), default=1e-2, help="L1 penalty of the ReLU SAE")
    p.add_argument("--sae-steps", type=at_least(1), default=3000, help="training steps of each SAE")
    p.add_argument("--n-train", type=at_least(1), default=3000, help="sequences for SAE training and latent selection")
    p.add_argument("--n-eval", type=at_least(1), default=1000, help="held-out sequences per m for the ablations")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the SAE initialisation and data")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu or cuda")
    add_output_flags(p, None, "where sae.json goes (default: the run folder)")
    p.add_argument("--force", action="store_true",
                   help="replace this stage's earlier outputs (removed when the new ones are written)")
    return p


def parse_fractions(text: str) -> list[float]:
    """--at: comma-separated fractions of training in [0, 1]."""
    try:
        at = [float(x) for x in text.split(",")]
    except ValueError:
        at = []
    if not at or any(not 0 <= f <= 1 for f in at):
        raise ValueError(f"--at {text!r}: give comma-separated fractions of training in [0, 1]")
    return at


def check(args) -> str | None:
    """What the flags' types cannot say: --at, --kinds and the latent counts against each other."""
    try:
        parse_fractions(args.at)
    except ValueError as e:
        return str(e)
    kinds = args.kinds.split(",")
    if any(k not in ("topk", "relu") for k in kinds):
        return f"--kinds {args.kinds!r}: give a comma list of topk, relu"
    if "topk" in kinds and args.k > args.n_latents:
        return f"--k {args.k} exceeds --n-latents {args.n_latents}: a TopK SAE keeps k of its latents"
    if args.n_select >= args.n_latents:
        return (f"--n-select {args.n_select} must be below --n-latents {args.n_latents} (random latents are "
                f"drawn from the others)")
    return None


@safeio.one_line_errors(TrainingError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problem = check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = args.run if args.out_dir is None else args.out_dir
    claimed = claim(out, NAME, KEY, args.plots_dir, args.no_plot, args.force)
    res = analyse(args.run, layer=args.layer, at=parse_fractions(args.at), kinds=tuple(args.kinds.split(",")),
                  variable=args.variable, n_select=args.n_select, n_random=args.n_random,
                  n_latents=args.n_latents, k=args.k, l1=args.l1, sae_steps=args.sae_steps,
                  n_train=args.n_train, n_eval=args.n_eval, seed=args.seed, device=args.device)
    return emit(res, out, NAME, format_table, plot, args.no_plot, args.plots_dir, claimed)


if __name__ == "__main__":
    sys.exit(main())
