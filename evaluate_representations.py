"""Per-layer geometry of a trained sequence model: UMAP, Levina-Bickel, clustering, probes.

Works on any checkpoint of this project whose model returns its per-layer representations
(masked_model_gpu.py; mamba_next.py): the model type is read from the checkpoint.

Representations of the whole series are extracted with overlapping windows, keeping only
positions with full context: for a bidirectional model the centre of each window (at least
--context steps on both sides), for a causal model the steps after a --context warm-up. So
no analysed position sits at a window edge.

Per chosen layer (input, 1..N, output):
  * Levina-Bickel dimension at k = 10, 30, 100 with bootstrap CIs, beside a Gaussian null
    with the layer's own covariance (what a structureless cloud of the same spectrum gives);
  * k-means (one cluster per circle) ARI and NMI against the true circle;
  * silhouette of the true circles computed on the representation itself (not on UMAP);
  * linear probes trained on an early time block and tested on a later one (with a gap):
    circle accuracy (chance = the majority share) and R^2 of the phase (cos, sin theta);
  * belief-state probes (when the data folder holds the generator's parameters): ridge maps
    from the representation to the Bayes-optimal posterior of oracle.py, computed from exactly
    the window the position was read in (smoothing for a bidirectional model, filtering for a
    causal one): circle probabilities, mean (cos, sin) of the angle and, for causal models,
    the one-step predictive mean; held-out R^2 on the same later block;
  * optionally (--control) all of the above for the same architecture at random init.
Figures: a UMAP grid coloured by circle (panel titles carry LB at k = 30) and the metrics
across depth; numbers as markdown, JSON and CSV.

Usage:
    python evaluate_representations.py --checkpoint runs/masked_rope/best.pt --data-dir data
    python evaluate_representations.py --checkpoint runs/masked_rope/best.pt --layers input,4,output --no-umap
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import cliargs
import mamba_next
import masked_model_gpu
import oracle
import safeio
from cliargs import SEED, Parser, add_output_flags, at_least, between
from dataset import load_series
from estimate_dimension import levina_bickel
from plotting import save_figure, state_colors
from statsutil import gaussian_null
from training import TrainingError, check_data_matches, check_same_data, load_checkpoint, resolve_device

# model_type in a checkpoint -> the model script's loader, returning an nn.Module with
# layer_names and forward(x, return_hidden=True) -> (output, [representations])
MODEL_LOADERS = {
    masked_model_gpu.MODEL_TYPE: masked_model_gpu.load_model,
    mamba_next.MODEL_TYPE: mamba_next.load_model,
}


OUT_FILES = ("umap_embeddings.npz", "representation_metrics.json", "representation_metrics.csv",
             "representation_metrics.md")
PLOT_FILES = ("representation_umap.png", "representation_metrics.png")


class EvalError(RuntimeError):
    pass


def load_any(path: str):
    try:
        ckpt = load_checkpoint(path)
    except TrainingError as e:
        raise EvalError(str(e)) from e
    if ckpt["model_type"] not in MODEL_LOADERS:
        raise EvalError(f"{ckpt['path']} holds a {ckpt['model_type']!r} model, which has no representation "
                        f"loader (known: {sorted(MODEL_LOADERS)})")
    return ckpt, MODEL_LOADERS[ckpt["model_type"]](ckpt)


def parse_layers(spec: str, names: list[str]) -> list[str]:
    if spec in ("all", ""):
        return list(names)
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise EvalError(f"unknown layer(s) {unknown}; this model has {', '.join(names)}")
    return chosen


# ----------------------------------------------------------------------------- extraction

def kept_slice(window: int, context: int, causal: bool) -> tuple[int, int]:
    """Positions of a window whose representation is kept: full context around them."""
    if causal:
        return context, window
    return context, window - context


@torch.inference_mode()
def extract(model, X: np.ndarray, positions: np.ndarray, layer_idx: list[int], window: int, context: int,
            causal: bool, device, batch_size: int = 32) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Representations at the requested time steps for the chosen layers.

    Windows overlap so that every position in [lo, T - hi) is kept by exactly one window;
    positions outside that range (the series' own edges) are dropped. Returns one
    (n, dim) array per layer, the positions actually covered and the start of the window
    each was read from.
    """
    from tqdm.auto import tqdm
    T = len(X)
    a, b = kept_slice(window, context, causal)
    if b <= a:
        raise EvalError(f"--context {context} leaves no position of a {window}-step window with full context")
    if window > T:
        raise EvalError(f"--window {window} is longer than the series ({T} steps)")
    keep_len = b - a
    starts = np.arange(0, T - window + 1, keep_len)
    wanted = np.zeros(T, dtype=bool)
    wanted[positions] = True
    out_pos, out_start, chunks = [], [], [[] for _ in layer_idx]
    model.eval()
    for i in tqdm(range(0, len(starts), batch_size), desc="extract", leave=False, disable=None):
        st = starts[i:i + batch_size]
        xb = torch.as_tensor(np.stack([X[s:s + window] for s in st]), device=device)
        _, hidden = model(xb, return_hidden=True)
        for j, s in enumerate(st):
            sel = np.flatnonzero(wanted[s + a:s + b])
            if len(sel) == 0:
                continue
            out_pos.append(s + a + sel)
            out_start.append(np.full(len(sel), s))
            idx = torch.as_tensor(a + sel, device=device)
            for c, li in enumerate(layer_idx):
                chunks[c].append(hidden[li][j].index_select(0, idx).float().cpu().numpy())
    pos = np.concatenate(out_pos) if out_pos else np.zeros(0, int)
    wst = np.concatenate(out_start) if out_start else np.zeros(0, int)
    return [np.concatenate(c) if c else np.zeros((0, 1)) for c in chunks], pos, wst


# ----------------------------------------------------------------------------- metrics

def layer_metrics(Z: np.ndarray, states: np.ndarray, thetas: np.ndarray | None, pos: np.ndarray,
                  lb_idx: np.ndarray, *, ks, n_clusters: int, probe_split: int, gap: int,
                  rng: np.random.Generator, pca: int | None, lb: bool, seed: int,
                  beliefs: dict | None = None) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, r2_score, silhouette_score
    from sklearn.preprocessing import StandardScaler

    res: dict = {"dim": int(Z.shape[1]), "n_points": int(len(Z))}
    if lb:
        P = Z[lb_idx]
        if pca and pca < P.shape[1]:
            P = PCA(pca, random_state=seed).fit_transform(P)
        r = levina_bickel(P, ks, n_boot=100, seed=seed)
        nr = levina_bickel(gaussian_null(P, rng), ks, n_boot=0, seed=seed)
        res["lb"] = {str(k): {"mle": r.mle[k], "ci": list(r.mle_ci[k]), "mg": r.mg[k], "null_gaussian": nr.mle[k]}
                     for k in ks}
    if n_clusters < 1:  # a series without labels: the geometry only, no label-based metrics
        return res
    skip = label_skip_reason(states, n_clusters)
    if skip:
        res["label_metrics_skipped"] = skip
        return res
    km = KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(Z)
    res["kmeans_ari"] = float(adjusted_rand_score(states, km))
    res["kmeans_nmi"] = float(normalized_mutual_info_score(states, km))
    sil = rng.choice(len(Z), size=min(4000, len(Z)), replace=False)
    res["silhouette"] = float(silhouette_score(Z[sil], states[sil])) if len(np.unique(states[sil])) > 1 else float("nan")
    train = pos < probe_split
    test = pos >= probe_split + gap
    if train.sum() > 10 and test.sum() > 10 and len(np.unique(states[train])) < 2:
        res["probes_skipped"] = "the probes' training block holds one label only"
    elif train.sum() > 10 and test.sum() > 10:
        sc = StandardScaler().fit(Z[train])
        Ztr, Zte = sc.transform(Z[train]), sc.transform(Z[test])
        clf = LogisticRegression(max_iter=300, C=1.0).fit(Ztr, states[train])
        res["probe_state_acc"] = float(clf.score(Zte, states[test]))
        res["probe_state_chance"] = float(np.bincount(states[test]).max() / test.sum())
        if thetas is not None:
            y = np.stack([np.cos(thetas), np.sin(thetas)], 1)
            reg = Ridge(alpha=1.0).fit(Ztr, y[train])
            res["probe_phase_r2"] = float(r2_score(y[test], reg.predict(Zte)))
        for key, y in belief_targets(beliefs).items():
            reg = Ridge(alpha=1.0).fit(Ztr, y[train])
            res[key] = float(r2_score(y[test], reg.predict(Zte), multioutput="variance_weighted"))
        res["probe_n_train"], res["probe_n_test"] = int(train.sum()), int(test.sum())
    return res


def label_skip_reason(states: np.ndarray, n_clusters: int) -> str | None:
    """Why k-means, silhouette and the label probes mean nothing on these positions, or None:
    one label only, or (nearly) as many labels as positions."""
    k = len(np.unique(states))
    if k < 2:
        return "the analysed positions carry one label only"
    if k > len(states) // 2 or n_clusters >= len(states):
        return f"{k} distinct labels for {len(states)} positions: labels this fine-grained define no clusters"
    return None


BELIEF_PROBES = {"belief_circle_r2": "posterior circle probabilities",
                 "belief_phase_r2": "posterior mean (cos, sin) of the angle",
                 "belief_next_r2": "one-step predictive mean (causal models)"}


def belief_targets(beliefs: dict | None) -> dict:
    """Regression targets of the belief-state probes from the oracle's posteriors (see oracle.beliefs)."""
    if not beliefs:
        return {}
    out = {"belief_circle_r2": beliefs["circle"],
           "belief_phase_r2": np.stack([beliefs["cos"], beliefs["sin"]], 1)}
    if "next_mean" in beliefs:
        out["belief_next_r2"] = beliefs["next_mean"]
    return out


# ----------------------------------------------------------------------------- figures

def plot_umap_grid(embs: dict, states_by_layer: dict, lb30: dict, n_states: int, path: str, title: str) -> str:
    import matplotlib.pyplot as plt
    cols = np.array(state_colors(n_states))
    n = len(embs)

    def colour(name, E):  # by circle, or by position along the series without labels
        return cols[states_by_layer[name]] if n_states else np.arange(len(E))
    nc = min(n, 3)
    nr = int(np.ceil(n / nc))
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 4.2 * nr), squeeze=False)
    for ax, (name, E) in zip(axes.ravel(), embs.items()):
        ax.scatter(E[:, 0], E[:, 1], c=colour(name, E), s=1.5, rasterized=True, cmap="viridis")
        lb = lb30.get(name)
        ax.set_title(f"layer {name}" + (f"   LB(k=30) = {lb:.2f}" if lb is not None else ""))
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def plot_depth(results: dict, control: dict | None, ks, path: str, title: str) -> str:
    import matplotlib.pyplot as plt
    names = list(results)
    x = np.arange(len(names))
    has_beliefs = any(k in results[names[0]] for k in BELIEF_PROBES)
    fig, axes = plt.subplots(1, 4 if has_beliefs else 3, figsize=(21 if has_beliefs else 16, 4.5))
    ax = axes[0]
    if "lb" in results[names[0]]:
        for k in ks:
            m = np.array([results[n]["lb"][str(k)]["mle"] for n in names])
            lo = np.array([results[n]["lb"][str(k)]["ci"][0] for n in names])
            hi = np.array([results[n]["lb"][str(k)]["ci"][1] for n in names])
            line, = ax.plot(x, m, marker="o", label=f"k={k}")
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
            ax.plot(x, [results[n]["lb"][str(k)]["null_gaussian"] for n in names], ls=":",
                    color=line.get_color(), lw=1)
        if control:
            ax.plot(x, [control[n]["lb"]["30"]["mle"] for n in names], "k--", lw=1, label="random init, k=30")
        ax.set_ylabel("Levina-Bickel dimension")
        ax.set_title("Intrinsic dimension (dotted: Gaussian null)")
        ax.legend(fontsize=7, loc="best")
    ax = axes[1]
    labelled = "kmeans_ari" in results[names[0]]
    for key, lab in (("kmeans_ari", "k-means ARI"), ("kmeans_nmi", "k-means NMI"), ("silhouette", "silhouette (true circles)")):
        if not labelled:
            break
        line, = ax.plot(x, [results[n][key] for n in names], marker="o", label=lab)
        if control:
            ax.plot(x, [control[n][key] for n in names], ls="--", color=line.get_color(), lw=1)
    ax.set_title("Circle separation" + (" (dashed: random init)" if control else "") if labelled
                 else "Circle separation: the series has no labels")
    if labelled:
        ax.legend(fontsize=8)
    ax = axes[2]
    if "probe_state_acc" in results[names[0]]:
        for key, lab in (("probe_state_acc", "circle accuracy"), ("probe_phase_r2", "phase R^2 (cos, sin)")):
            if key in results[names[0]]:
                line, = ax.plot(x, [results[n][key] for n in names], marker="o", label=lab)
                if control:
                    ax.plot(x, [control[n][key] for n in names], ls="--", color=line.get_color(), lw=1)
        ax.plot(x, [results[n]["probe_state_chance"] for n in names], "k:", lw=1, label="chance (majority)")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Linear probes, held-out later block")
        ax.legend(fontsize=8)
    if has_beliefs:
        ax = axes[3]
        for key, lab in BELIEF_PROBES.items():
            if key in results[names[0]]:
                line, = ax.plot(x, [results[n][key] for n in names], marker="o", label=lab)
                if control:
                    ax.plot(x, [control[n][key] for n in names], ls="--", color=line.get_color(), lw=1)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("Oracle belief probes, held-out R^2" + (" (dashed: random init)" if control else ""))
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path, dpi=110)


def markdown_table(results: dict, ks) -> str:
    has_lb = "lb" in next(iter(results.values()))
    beliefs = [k for k in BELIEF_PROBES if k in next(iter(results.values()))]
    head = ["layer"] + ([f"LB k={k}" for k in ks] + ["null k=30"] if has_lb else []) + \
        ["ARI", "NMI", "silhouette", "probe acc", "phase R^2"] + \
        [{"belief_circle_r2": "belief circle R^2", "belief_phase_r2": "belief phase R^2",
          "belief_next_r2": "predictive mean R^2"}[k] for k in beliefs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name]
        if has_lb:
            cells += [f"{r['lb'][str(k)]['mle']:.2f} [{r['lb'][str(k)]['ci'][0]:.2f}, {r['lb'][str(k)]['ci'][1]:.2f}]"
                      for k in ks]
            cells.append(f"{r['lb'].get('30', r['lb'][str(ks[0])])['null_gaussian']:.2f}")
        cells += [f"{r.get('kmeans_ari', float('nan')):.3f}", f"{r.get('kmeans_nmi', float('nan')):.3f}",
                  f"{r.get('silhouette', float('nan')):.3f}",
                  f"{r.get('probe_state_acc', float('nan')):.3f}", f"{r.get('probe_phase_r2', float('nan')):.3f}"]
        cells += [f"{r.get(k, float('nan')):.3f}" for k in beliefs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CSV_FIELDS = ("model", "layer", "dim", "n_points", "kmeans_ari", "kmeans_nmi", "silhouette", "probe_state_acc",
              "probe_state_chance", "probe_phase_r2", *BELIEF_PROBES)


def csv_rows(results: dict, ks, tag: str = "trained") -> tuple[list[str], list[dict]]:
    """(header, rows) of the per-layer table: one row per layer and model (trained / random init)."""
    fields = list(CSV_FIELDS[:4]) + [f"lb_k{k}" for k in ks] + [f"lb_k{k}_lo" for k in ks] + \
        [f"lb_k{k}_hi" for k in ks] + [f"lb_null_k{k}" for k in ks] + list(CSV_FIELDS[4:])
    rows = []
    for name, r in results.items():
        row = {"model": tag, "layer": name, **r}
        for k in ks:
            if "lb" in r:
                row[f"lb_k{k}"] = r["lb"][str(k)]["mle"]
                row[f"lb_k{k}_lo"], row[f"lb_k{k}_hi"] = r["lb"][str(k)]["ci"]
                row[f"lb_null_k{k}"] = r["lb"][str(k)]["null_gaussian"]
        rows.append(row)
    return fields, rows


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Per-layer representation geometry of a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a best.pt / last.pt (or its run folder)")
    p.add_argument("--data-dir", default=None, help="data folder (default: the one the model was trained on)")
    p.add_argument("--layers", default="all", help="comma-separated layer names (input, 1..N, output) or 'all'")
    p.add_argument("--n-steps", type=at_least(1), default=None, help="use only the first N steps of the series")
    p.add_argument("--window", type=at_least(2), default=None, help="window length (default: the training length)")
    p.add_argument("--context", type=at_least(0), default=None,
                   help="steps of context kept on each side (causal: warm-up); default window/4")
    p.add_argument("--lb-points", type=at_least(3), default=5000, help="points per layer for Levina-Bickel")
    p.add_argument("--k", type=at_least(2), nargs="+", default=[10, 30, 100], help="Levina-Bickel neighbourhood sizes")
    p.add_argument("--metric-points", type=at_least(10), default=20000,
                   help="points per layer for clustering and probes")
    p.add_argument("--umap-points", type=at_least(10), default=5000, help="points per layer in the UMAP grid")
    p.add_argument("--umap-neighbors", type=at_least(2), default=30, help="UMAP's n_neighbors")
    p.add_argument("--pca", type=at_least(1), default=None, help="PCA to N dimensions before UMAP and kNN")
    p.add_argument("--no-lb", action="store_true", help="skip Levina-Bickel (the slowest metric)")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP grid")
    p.add_argument("--control", action="store_true", help="also analyse the same architecture at random init")
    p.add_argument("--control-seed", type=SEED, default=None,
                   help="seed of the random-init control (default: the checkpoint's training seed, so that runs "
                        "with different seeds get different controls)")
    p.add_argument("--probe-train-frac", type=between(0, 1, open_lo=True, open_hi=True), default=0.7,
                   help="probes train on this early share of the series")
    p.add_argument("--batch-size", type=at_least(1), default=32, help="windows per forward pass")
    p.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu or cuda")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the sampled positions, nulls and UMAP")
    add_output_flags(p, None, "JSON/CSV and the UMAP coordinates (default <run folder>/representations)")
    p.add_argument("--force", action="store_true",
                   help="replace the outputs of an earlier analysis in --out-dir / --plots-dir (removed first)")
    return p


def analyse(model, series, layers, args, device, *, window, context, causal, rng_seed, desc, chain=None,
            known: tuple | None = None):
    """Extract the chosen layers at sampled positions and compute every metric; with the oracle's
    chain, also the belief-state probes (targets from the window each position was read in).
    known: (positions, beliefs) of an earlier call, reused when the positions are the same."""
    names = model.layer_names
    T = series.n_steps if args.n_steps is None else min(args.n_steps, series.n_steps)
    rng = np.random.default_rng(rng_seed)
    a, b = kept_slice(window, context, causal)
    lo, hi = a, T - (window - b)
    n_metric = min(args.metric_points, hi - lo)
    positions = np.sort(rng.choice(np.arange(lo, hi), size=n_metric, replace=False))
    t0 = time.perf_counter()
    reps, pos, wst = extract(model, series.X[:T], positions, [names.index(l) for l in layers], window, context,
                             causal, device, args.batch_size)
    t_extract = time.perf_counter() - t0
    order = np.argsort(pos)
    pos, wst = pos[order], wst[order]
    reps = [r[order] for r in reps]
    beliefs = None
    if known is not None and np.array_equal(known[0], pos):
        beliefs = known[1]
    elif chain is not None:
        beliefs = oracle.beliefs_at(chain, series.X[:T], wst, pos - wst, window, causal, progress=True)
    states = series.states[pos]
    thetas = series.thetas[pos] if series.thetas is not None else None
    lb_idx = np.sort(rng.choice(len(pos), size=min(args.lb_points, len(pos)), replace=False))
    split = int(lo + args.probe_train_frac * (hi - lo))
    from tqdm.auto import tqdm
    results = {}
    for name, Z in tqdm(list(zip(layers, reps)), desc=f"metrics ({desc})", leave=False, disable=None):
        results[name] = layer_metrics(Z, states, thetas, pos, lb_idx, ks=args.k, n_clusters=series.n_states,
                                      probe_split=split, gap=window, rng=np.random.default_rng(rng_seed + 1),
                                      pca=args.pca, lb=not args.no_lb, seed=args.seed, beliefs=beliefs)
    return results, reps, states, t_extract, (pos, beliefs)


@safeio.one_line_errors(EvalError, TrainingError)
def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


def run(args) -> int:
    t_start = time.perf_counter()
    ckpt, model = load_any(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    data_dir = args.data_dir or ckpt["data"]["data_dir"]
    series = load_series(data_dir)
    try:
        check_same_data(ckpt, series, args.data_dir is not None)
    except TrainingError as err:
        raise EvalError(str(err)) from None
    try:
        check_data_matches(ckpt["model_config"], series, ckpt["path"])
    except TrainingError as err:
        raise EvalError(str(err)) from err
    layers = parse_layers(args.layers, model.layer_names)
    causal = bool(getattr(model, "causal", False))
    window = args.window or ckpt["data"]["seq_len"]
    context = args.context if args.context is not None else window // 4
    run_name = os.path.basename(os.path.dirname(os.path.abspath(ckpt["path"])))
    out_dir = args.out_dir or os.path.join(os.path.dirname(ckpt["path"]), "representations")
    plots_dir = cliargs.plots_dir(args, out_dir)
    safeio.output_dir(out_dir, create=False)
    if not args.no_plot:
        safeio.output_dir(plots_dir, "--plots-dir", create=False)
    out = safeio.Outputs("representations", args.force)
    out.claim([os.path.join(out_dir, f) for f in OUT_FILES] + [os.path.join(plots_dir, f) for f in PLOT_FILES])
    safeio.output_dir(out_dir)
    if not args.no_plot:
        safeio.output_dir(plots_dir, "--plots-dir")
    print(f"{ckpt['model_type']} from {ckpt['path']}; layers {', '.join(layers)}; windows of {window} keeping "
          f"{'steps after a ' + str(context) + '-step warm-up' if causal else str(context) + ' steps of context on each side'}")

    if not series.has_labels:
        print("note: the series has no labels: k-means, silhouette and the circle and phase probes are skipped")
    try:
        chain = oracle.Chain.from_series(series)
    except oracle.OracleError as e:
        chain = None
        print(f"no belief-state probes: {e}")
    geometry = {"window": window, "context": context, "causal": causal, "rng_seed": args.seed, "chain": chain}
    results, reps, states, t_extract, known = analyse(model, series, layers, args, device, desc="trained",
                                                      **geometry)
    control = None
    if args.control:
        # the control of each run is its own random init: seeded by the training seed of the checkpoint (so
        # the controls of runs with different seeds are different draws), or by --control-seed
        cseed = args.control_seed if args.control_seed is not None else int(ckpt.get("args", {}).get("seed", 0))
        torch.manual_seed(cseed)
        fresh = type(model)(model.cfg).to(device)
        control = analyse(fresh, series, layers, args, device, desc="random init", known=known, **geometry)[0]
    t_metrics = time.perf_counter() - t_start
    print(f"Per-layer geometry ({len(states)} positions; LB on {min(args.lb_points, len(states))} points, "
          f"95% bootstrap CI; probes trained on the first {int(100 * args.probe_train_frac)}% of the series):")
    print(markdown_table(results, args.k))
    if control:
        print("Same architecture at random init (control):")
        print(markdown_table(control, args.k))

    import matplotlib
    matplotlib.use("Agg")
    written = []
    lb30 = {n: r["lb"]["30"]["mle"] for n, r in results.items() if "lb" in r and "30" in r["lb"]}
    if not args.no_umap:
        import umap
        from sklearn.decomposition import PCA
        rng = np.random.default_rng(args.seed + 2)
        sel = np.sort(rng.choice(len(states), size=min(args.umap_points, len(states)), replace=False))
        embs = {}
        from tqdm.auto import tqdm
        for name, Z in tqdm(list(zip(layers, reps)), desc="UMAP", leave=False, disable=None):
            P = Z[sel]
            if args.pca and args.pca < P.shape[1]:
                P = PCA(args.pca, random_state=args.seed).fit_transform(P)
            embs[name] = umap.UMAP(n_neighbors=args.umap_neighbors, min_dist=0.1, n_jobs=1,
                                   random_state=args.seed).fit_transform(P)
        if not args.no_plot:
            written.append(plot_umap_grid(embs, {n: states[sel] for n in embs}, lb30, series.n_states,
                                          out.target(os.path.join(plots_dir, "representation_umap.png")),
                                          f"{ckpt['model_type']} {run_name}: representations coloured by "
                                          + ("circle" if series.has_labels else "position in the series")))
        safeio.save_npz(out.target(os.path.join(out_dir, "umap_embeddings.npz")), states=states[sel],
                        **{f"layer_{n}": e for n, e in embs.items()})
    if not args.no_plot:
        written.append(plot_depth(results, control, args.k,
                                  out.target(os.path.join(plots_dir, "representation_metrics.png")),
                                  f"{ckpt['model_type']} {run_name}: geometry across depth"))
    skipped = {r.get("label_metrics_skipped") for r in results.values()} - {None}
    if skipped:
        print(f"note: k-means, silhouette and the label probes are skipped: {skipped.pop()}")
    js = out.write_json(os.path.join(out_dir, "representation_metrics.json"),
                        {"checkpoint": ckpt["path"], "data_dir": data_dir, "window": window, "context": context,
                         "causal": causal, "ks": args.k, "layers": results, "random_init_control": control,
                         "seconds_extract": t_extract, "seconds_to_metrics": t_metrics})
    fields, rows = csv_rows(results, args.k)
    rows += csv_rows(control, args.k, "random_init")[1] if control else []
    cs = safeio.write_csv(out.target(os.path.join(out_dir, "representation_metrics.csv")), fields, rows)
    safeio.write_text(out.target(os.path.join(out_dir, "representation_metrics.md")),
                      markdown_table(results, args.k) + "\n")
    written += [js, cs]
    print(f"done in {time.perf_counter() - t_start:.1f} s; wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
