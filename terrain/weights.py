"""Weight battery: the geometry of a pretrained transformer's matrices, each beside its null.

    python -m terrain.weights                                  # offline MiniLM
    python -m terrain.weights --model t5-small google/t5-v1_1-xxl --out-dir runs/terrain

Per matrix (q, k, v, o, mlp_in, mlp_gate, mlp_out, cross-attention): spectra (stable rank,
participation ratio of sigma^2, entropy effective rank, components for 90% of the sigma^2
variance, condition number) and sparsity (absolute thresholds, fractions of the matrix's
own RMS, Hoyer), beside the same statistic on Gaussian matrices of the same shape and RMS.
Per head: the attention form F_h = W_q^h^T W_k^h, its asymmetry ||F - F^T|| / ||F|| and
the positive share of its symmetric part's eigenvalue mass, beside random q, k of the same
shapes (which give about 0.5). MLP neurons: importance = ||input row|| x ||output column||
(x ||gate row||), dead (< 1e-3 of the median) and weak (< 0.1 of the median) fractions.
Across layers, per role: overlap of the top-r singular subspaces on the residual-stream
side (input side of q, k, v, mlp_in; output side of o, mlp_out), invariant to permutations
of heads and neurons, chance = r/d; and the raw cosine of the flattened matrices.
LayerNorm scales: mean, spread, extremes. A parameter census per stack and role (every
tensor of the checkpoint counted once). T5 relative bias: per-head profiles against
signed distance (buckets decoded), classified local / global / mixed.
Writes weights_<model>.json and weights_<model>.png per model, and with several models a
comparison figure and table.

Streaming: the checkpoint's safetensors shards are read one matrix at a time (no model is
built; memory is a few matrices at any size), with exact Gram-matrix spectra, head forms
from head_dim-sized products, and analytic nulls for large matrices (terrain/linalg.py).

Degenerate matrices: a matrix holding NaN or inf is reported as such ({"nonfinite": true,
"n_nonfinite": k}) and not analysed, nor are the heads, neurons and cross-layer overlaps it takes
part in (each named in "notes"); heads whose form is zero have no asymmetry or sign balance and
are counted in "heads_left_out"; a zero matrix has no singular subspace and stays out of the overlaps.
"""
from __future__ import annotations

import math
import sys
import time
from collections import defaultdict

import numpy as np

import safeio
from cliargs import SEED, Parser, at_least, int_between
from terrain import linalg as LA
from terrain import metrics as M
from terrain import quant as Q
from plotting import save_figure
from terrain.cli import add_device_flag, add_output_flags, model_tag, progress, resolve_device, run_for_models
from terrain.checkpoint import open_source
from terrain.models import DEFAULT_MODEL, by_role, classify, head_layouts, plan, TerrainError, Weight
from positions import t5_relative_bucket

MATRIX_ROLES = ("q", "k", "v", "o", "attn_gate", "mlp_in", "mlp_gate", "mlp_out", "cross_q", "cross_k", "cross_v",
                "cross_o", "lin_q", "lin_k", "lin_v", "lin_gate", "lin_o", "lin_ab")
# (query role, key role, head-layout key or None for the stack's own layout, prefix of the result key)
HEAD_PAIRS = (("q", "k", None, "self_"), ("cross_q", "cross_k", None, "cross_"), ("lin_q", "lin_k", "linear", "linear_"))
USED_ROLES = MATRIX_ROLES + ("norm", "final_norm", "rel_bias")
MC_MAX_ENTRIES = 1 << 20  # --null auto: Monte Carlo up to this many entries, the analytic laws above


# ----------------------------------------------------------------------------- per matrix

def null_summary(nulls: list[np.ndarray], side: str, device: str, method: str) -> dict:
    """The matrix statistics averaged over null matrices (spectra, Hoyer and the small-value shares)."""
    ns = [LA.spectrum_and_subspace(R, 0, side, device)[0] for R in nulls]
    sp = [M.sparsity(R) for R in nulls]  # one pass per null matrix gives Hoyer and the small-value shares
    out = {"stable_rank": float(np.mean([M.stable_rank(x) for x in ns])),
           "participation_ratio_sigma2": float(np.mean([M.participation_ratio(x ** 2) for x in ns])),
           "entropy_effective_rank": float(np.mean([M.entropy_effective_rank(x) for x in ns]))}
    for k in sp[0]:
        out[k] = float(np.mean([x[k] for x in sp]))
    out["method"] = method
    return out


def matrix_stats(W: np.ndarray, rng: np.random.Generator, n_null: int, null: str = "auto", r: int = 0,
                 side: str = "in", device: str = "cpu", quant: str | None = None) -> tuple[dict, np.ndarray | None]:
    """Spectral and sparsity statistics of W beside its Gaussian null, and the top-r singular
    subspace on `side` (for the cross-layer overlaps). quant: W's quantisation type (a GGUF file,
    or --quantize): then also beside Gaussian matrices passed through the same quantisation."""
    s, U, method = LA.spectrum_and_subspace(W, min(r, *W.shape), side, device)
    out = M.spectral_summary_of(s)
    out.update(M.sparsity(W))
    if null == "monte-carlo" or (null == "auto" and W.size <= MC_MAX_ENTRIES and n_null > 0):
        out["null"] = null_summary([M.random_like(W, rng) for _ in range(n_null)], side, device,
                                   f"monte-carlo ({n_null})")
    else:
        out["null"] = LA.analytic_matrix_null(W.shape)
    if quant and quant not in Q.FLOAT_TYPES:
        out["quantization"] = quant
        qn, gs = Q.quantized_nulls(W, quant, rng, max(1, min(n_null, 3)), with_gaussians=True)
        out["quant_null"] = (null_summary(qn, side, device, f"Gaussian through {quant}, monte-carlo ({len(qn)})")
                             if qn is not None else {"method": f"none: the gguf package cannot quantise to {quant} "
                                                                f"rows of {W.shape[-1]}"})
        if gs is not None:   # the same Gaussians before quantisation: what the storage does to a null, paired
            out["quant_null_float"] = null_summary(gs, side, device, f"the quant_null's Gaussians before {quant}")
    out["shape"] = list(W.shape)
    out["sigma_top"] = s[:8].tolist()
    out["spectrum_method"] = method
    return out, U


# ----------------------------------------------------------------------------- heads

def form_stats(F: np.ndarray) -> dict:
    """Asymmetry and eigenvalue sign balance of each head's dense form (heads, d, d); the
    battery computes the same from head_dim-sized Gram matrices (terrain.linalg)."""
    asym, pos = [], []
    for f in F:
        n = np.linalg.norm(f)
        asym.append(float(np.linalg.norm(f - f.T) / n) if n > 0 else float("nan"))
        lam = np.linalg.eigvalsh((f + f.T) / 2)
        pos.append(float(lam[lam > 0].sum() / np.abs(lam).sum()) if np.abs(lam).sum() > 0 else float("nan"))
    return {"asymmetry": asym, "positive_share": pos}


def head_stats(q: np.ndarray, k: np.ndarray, layout, rng: np.random.Generator, n_null: int,
               device: str = "cpu") -> dict:
    """Per-head form statistics, exact from the (2 head_dim)^2 Gram matrices of [Q_h; K_h], beside
    random Gaussian q, k (their Gram matrices drawn directly as Wishart, any model width)."""
    H, dh, Hkv = layout.n_heads, layout.head_dim, layout.n_kv_heads
    if q.shape[0] != H * dh or k.shape[0] != Hkv * dh or H % Hkv:
        raise ValueError(f"q {q.shape} / k {k.shape} do not split into {H} heads of {dh} ({Hkv} key heads)")
    out = LA.form_stats_from_grams(LA.head_grams(q, k, H, dh, Hkv, device))
    zero = int(np.sum(~np.isfinite(out["positive_share"])))
    if zero:
        out["heads_left_out"] = {"zero_form": zero}  # a zero form has no asymmetry or sign balance (NaN, named)
    if n_null > 0:
        safeio.check_fits(8 * n_null * H * (2 * dh) ** 2 * 4, f"the head null ({n_null} x {H} heads of {dh})",
                          "lower --n-null")
        null = LA.form_stats_from_grams(LA.gram_of_gaussian_rows(2 * dh, q.shape[1], n_null * H, rng))
        out["null_asymmetry"] = float(np.mean(null["asymmetry"]))
        out["null_positive_share"] = float(np.mean(null["positive_share"]))
        out["null_positive_share_std"] = float(np.std(null["positive_share"]))
    return out


# ----------------------------------------------------------------------------- neurons

def neuron_importance(w_in: np.ndarray, w_out: np.ndarray, w_gate: np.ndarray | None = None) -> np.ndarray:
    """||row i of W_in|| x ||column i of W_out|| (x ||row i of W_gate||) for each hidden unit i."""
    return importance_from_norms(np.linalg.norm(w_in, axis=1), np.linalg.norm(w_out, axis=0),
                                 None if w_gate is None else np.linalg.norm(w_gate, axis=1))


def importance_from_norms(n_in: np.ndarray, n_out: np.ndarray, n_gate: np.ndarray | None = None) -> np.ndarray:
    imp = n_in * n_out
    return imp if n_gate is None else imp * n_gate


def null_importance(dims: list[int], n: int, rng: np.random.Generator) -> np.ndarray:
    """Importance of n hidden units of Gaussian matrices: each norm of a Gaussian row or
    column of length d is sqrt(chi^2_d) (up to a scale the fractions do not see)."""
    return np.prod([np.sqrt(rng.chisquare(d, size=n)) for d in dims], axis=0)


def neuron_stats(imp: np.ndarray) -> dict:
    med = np.median(imp)
    return {"dead_frac": float(np.mean(imp < 1e-3 * med)), "weak_frac": float(np.mean(imp < 0.1 * med)),
            "cv": float(imp.std() / imp.mean()), "n": int(imp.size)}


# ----------------------------------------------------------------------------- across layers

WRITES_RESIDUAL = ("o", "mlp_out", "cross_o", "lin_o")


def residual_side(role: str) -> str:
    """The side of a matrix that lives in the residual stream: the input side for readers
    (q, k, v, mlp_in, ...), the output side for writers (o, mlp_out)."""
    return "out" if role in WRITES_RESIDUAL else "in"


def cross_layer_result(layers: list, U: list[np.ndarray], side: str, d: int, cos: np.ndarray | None) -> dict:
    """Overlap ||U_a^T U_b||_F^2 / r of the top-r residual-side subspaces of each layer's matrix
    (invariant to permutations of heads and neurons; chance r/d), beside the raw cosines of the
    flattened matrices (not invariant; for comparison with the original notebook)."""
    r = U[0].shape[1]
    n = len(U)
    overlap = np.array([[float(np.sum((U[a].T @ U[b]) ** 2) / r) for b in range(n)] for a in range(n)])
    return {"layers": layers, "side": side, "r": r, "chance_overlap": r / d, "subspace_overlap": overlap.tolist(),
            "raw_cosine": cos.tolist() if cos is not None else None}


def cross_layer(ws: list[Weight], r: int, device: str = "cpu") -> dict:
    """cross_layer_result for weights held in memory."""
    if len(ws) < 2:
        return {}
    side = residual_side(ws[0].role)
    d = ws[0].W.shape[0 if side == "out" else 1]
    r = min(r, *(min(w.W.shape) for w in ws))
    U = [LA.spectrum_and_subspace(w.W, r, side, device)[1] for w in ws]
    cos = None
    if all(w.W.shape == ws[0].W.shape for w in ws):
        flat = np.stack([w.W.ravel() / np.linalg.norm(w.W) for w in ws]).astype(np.float64)
        cos = flat @ flat.T
    return cross_layer_result([w.layer for w in ws], U, side, d, cos)


def raw_cosines(source, refs: list, max_bytes: int = 256 << 20) -> np.ndarray:
    """Cosines between the flattened matrices of refs (same shape), reading them in blocks of
    rows so that at most ~max_bytes of them sit in memory at once."""
    rows, cols = refs[0].shape
    step = max(1, int(max_bytes // (4 * cols * len(refs))))
    G = np.zeros((len(refs), len(refs)))
    for a in range(0, rows, step):
        X = np.stack([r.load_rows(source, a, min(rows, a + step)).ravel() for r in refs]).astype(np.float64)
        G += X @ X.T
    nrm = np.sqrt(np.diag(G))
    return G / np.outer(nrm, nrm)


# ----------------------------------------------------------------------------- T5 bias

def t5_bias_profiles(table: np.ndarray, num_buckets: int, max_distance: int, bidirectional: bool,
                     span: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Bias of each head against signed distance (key - query) in [-span, span]."""
    import torch

    span = span or 2 * max_distance
    dist = np.arange(-span, span + 1)
    buckets = t5_relative_bucket(torch.as_tensor(dist), num_buckets, max_distance, bidirectional).numpy()
    return dist, table[buckets].T  # (heads, distances)


def classify_profile(dist: np.ndarray, prof: np.ndarray) -> str:
    """local: a peak within |d| <= 4 standing out by half the profile's range over the far
    (|d| >= 32) level; global: a flat profile (range < 0.5 logit); mixed otherwise."""
    rng_ = prof.max() - prof.min()
    if rng_ < 0.5:
        return "global"
    near = prof[np.abs(dist) <= 4].max()
    far = np.median(prof[np.abs(dist) >= 32]) if np.any(np.abs(dist) >= 32) else prof.min()
    return "local" if near - far > 0.5 * rng_ else "mixed"


# ----------------------------------------------------------------------------- battery

def _groups(refs: list) -> list[tuple[tuple, list]]:
    """The matrices of one (stack, layer) together, in checkpoint order of stacks and layers."""
    g = defaultdict(list)
    for r in refs:
        g[(r.stack, -1 if r.layer is None else r.layer)].append(r)
    return [(k, sorted(v, key=lambda r: r.name)) for k, v in sorted(g.items(), key=lambda kv: kv[0])]


def _rng(seed: int, key: str) -> np.random.Generator:
    """The null draws of one matrix / layer: seeded by its name, so that they do not depend on
    the order in which a checkpoint lists its tensors."""
    import zlib
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def census(entries: dict[str, tuple], config=None, skip=()) -> dict:
    """Parameter counts of a checkpoint per stack and role, from tensor names and shapes alone:
    every tensor is counted once (tied weights are stored once), packed q/k/v as "qkv", known
    parameters the battery skips (biases, norms, positions) as "other", and names no rule knows
    as "unclassified". `skip`: tensors that are not parameters (integer buffers such as
    position ids, which some checkpoints store), left out."""
    table: dict = defaultdict(lambda: defaultdict(int))
    skip = set(skip)
    for name, shape in entries.items():
        if name in skip:
            continue
        role, stack, _ = classify(name)
        table[stack][{None: "unclassified", "aux": "other"}.get(role, role)] += math.prod(shape)
    by_role: dict = defaultdict(int)
    for roles in table.values():
        for r, n in roles.items():
            by_role[r] += n
    total = sum(by_role.values())
    return {"total": total, "by_stack": {s: sum(r.values()) for s, r in table.items()},
            "by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
            "by_stack_role": {s: dict(r) for s, r in table.items()},
            "share_by_role": {r: n / total for r, n in by_role.items()} if total else {}}


def battery(name: str | None, n_null: int = 3, seed: int = 0, overlap_rank: int = 32, device: str = "cpu",
            null: str = "auto", source=None, config=None, show_progress: bool = True,
            quantize: str | None = None) -> dict:
    """The weight battery of one model, streamed: matrices are read one at a time from the
    checkpoint (or from `source`, a reader such as terrain.checkpoint.ModuleWeights), reduced to
    their statistics and dropped, so memory is a few matrices whatever the model's size.
    quantize: pass every matrix through this GGUF quantisation type on reading (terrain.quant)."""
    kind = "given"
    if source is None:
        source, config, kind = open_source(name)
    if quantize:
        source, kind = Q.QuantizedSource(source, quantize), "quantized"
    lays = head_layouts(config)
    pl = plan(source.entries, config)
    used = [r for r in pl.refs if r.role in USED_ROLES]  # embeddings are terrain.embeddings' business
    for note in pl.notes:
        print(f"note: {note}", file=sys.stderr)
    res: dict = {"model": name or DEFAULT_MODEL, "model_type": getattr(config, "model_type", "?"),
                 "heads": lays["*"].__dict__, "layouts": {k: v.__dict__ for k, v in lays.items()},
                 "source": kind, "null_method": null, "matrices": {}, "heads_by_layer": {}, "neurons": {},
                 "cross_layer": {}, "norms": {}, "t5_bias": {}, "unclassified": pl.unclassified, "notes": pl.notes,
                 "nonfinite_matrices": [], "quantize": quantize,
                 "quantization_types": (dict(sorted(collections_counter(getattr(source, "dtypes", {})).items()))
                                        if kind in ("gguf", "quantized") else {}),
                 "n_params_analysed": sum(math.prod(r.shape) for r in used),
                 "census": census(source.entries, config, getattr(source, "integer_names", set)())}
    subspaces = defaultdict(list)  # (stack, role) -> [(layer, U)]
    bar = progress(None, desc=f"weights {res['model'][-40:]}", total=len(used)) if show_progress else None

    def note(text):
        res["notes"].append(text)
        print(f"note: {text}", file=sys.stderr)

    for (stack, _), refs in _groups(used):
        held: dict[str, np.ndarray] = {}   # q/k until their partner is read
        norms: dict[str, np.ndarray] = {}  # MLP row / column norms of this layer
        bad_roles: set[str] = set()        # roles of this layer holding NaN / inf: not analysed
        zero_roles: set[str] = set()       # ... and zero matrices (no subspace; neurons all of importance 0)
        for ref in refs:
            W = ref.load(source)
            bad = M.nonfinite_report(W)
            if bad is not None:
                bad_roles.add(ref.role)
                res["nonfinite_matrices"].append(ref.name)
                entry = {"role": ref.role, "stack": ref.stack, "layer": ref.layer, **bad}
                if ref.role in MATRIX_ROLES:
                    res["matrices"][ref.name] = entry
                elif ref.role in ("norm", "final_norm"):
                    res["norms"][ref.name] = entry
                elif ref.role == "rel_bias":
                    res["t5_bias"][ref.stack] = entry
                note(f"{ref.name} holds {bad['n_nonfinite']} non-finite values (NaN or inf): not analysed")
                del W
                if bar is not None:
                    bar.update(1)
                continue
            if ref.role in MATRIX_ROLES:
                side = residual_side(ref.role)
                quant = getattr(source, "dtypes", {}).get(ref.tensor) if kind in ("gguf", "quantized") else None
                st, U = matrix_stats(W, _rng(seed, ref.name), n_null, null, overlap_rank, side, device, quant)
                res["matrices"][ref.name] = {"role": ref.role, "stack": ref.stack, "layer": ref.layer, **st}
                if U is not None and st["sigma_top"] and st["sigma_top"][0] > 0:  # a zero matrix has no subspace
                    subspaces[(stack, ref.role)].append((ref.layer, U, W.shape))
                elif U is not None:
                    zero_roles.add(ref.role)
            if ref.role in ("mlp_in", "mlp_gate"):
                norms[ref.role] = np.linalg.norm(W, axis=1)
            elif ref.role == "mlp_out":
                norms[ref.role] = np.linalg.norm(W, axis=0)
            elif ref.role in ("norm", "final_norm"):
                g = W.ravel().astype(np.float64)
                res["norms"][ref.name] = {"layer": ref.layer, "mean": float(g.mean()), "std": float(g.std()),
                                          "min": float(g.min()), "max": float(g.max()),
                                          "frac_abs_below_0.1": float(np.mean(np.abs(g) < 0.1))}
            elif ref.role == "rel_bias":
                nb = getattr(config, "relative_attention_num_buckets", 32)
                md = getattr(config, "relative_attention_max_distance", 128)
                if W.ndim != 2 or W.shape[0] != nb or not isinstance(md, int) or not 1 <= md <= 1 << 16:
                    note(f"{ref.name} of shape {list(W.shape)} does not match the config's "
                         f"relative_attention_num_buckets {nb} / max_distance {md}: not analysed")
                else:
                    dist, prof = t5_bias_profiles(W, nb, md, bidirectional=ref.stack != "decoder")
                    res["t5_bias"][ref.stack] = {"distance": dist.tolist(), "profiles": prof.tolist(),
                                                 "classes": [classify_profile(dist, p) for p in prof]}
            for qr, kr, lay_key, prefix in HEAD_PAIRS:
                if ref.role in (qr, kr):
                    held[ref.role] = W
                    if qr in held and kr in held:
                        lay = lays.get(lay_key or stack, lays["*"])
                        key = f"{stack}/{prefix}{ref.layer}"
                        try:
                            res["heads_by_layer"][key] = head_stats(held.pop(qr), held.pop(kr), lay,
                                                                    _rng(seed, key), n_null, device)
                        except ValueError as e:
                            note(f"heads of {key} skipped: {e}")
            del W
            if bar is not None:
                bar.update(1)
        for qr, kr, _, prefix in HEAD_PAIRS:
            if bad_roles & {qr, kr} and any(r.role in (qr, kr) for r in refs):
                note(f"heads of {stack}/{prefix}{refs[0].layer} not analysed: {'/'.join(sorted(bad_roles & {qr, kr}))} "
                     f"holds non-finite values")
        mlp = {"mlp_in", "mlp_gate", "mlp_out"}
        if (bad_roles | zero_roles) & mlp:
            why = "holds non-finite values" if bad_roles & mlp else "is a zero matrix (no importance to compare)"
            note(f"neurons of {stack}/{refs[0].layer} not analysed: "
                 f"{'/'.join(sorted((bad_roles | zero_roles) & mlp))} {why}")
        elif "mlp_in" in norms and "mlp_out" in norms:
            dims = [r.shape[1] for r in refs if r.role in ("mlp_in", "mlp_gate")] + \
                [r.shape[0] for r in refs if r.role == "mlp_out"]
            imp = importance_from_norms(norms["mlp_in"], norms["mlp_out"], norms.get("mlp_gate"))
            key = f"{stack}/{refs[0].layer}"
            res["neurons"][key] = {**neuron_stats(imp),
                                   "null": neuron_stats(null_importance(dims, imp.size, _rng(seed, key)))}
    if bar is not None:
        bar.close()
    for (stack, role), items in sorted(subspaces.items()):
        if len(items) < 2:
            continue
        items.sort(key=lambda t: -1 if t[0] is None else t[0])
        refs = by_role(pl.refs, role, stack)
        same = len({r.shape for r in refs}) == 1 and len(refs) == len(items)
        cos = raw_cosines(source, refs) if same else None
        side = residual_side(role)
        d = items[0][2][0 if side == "out" else 1]
        res["cross_layer"][f"{stack}/{role}"] = cross_layer_result([t[0] for t in items], [t[1] for t in items],
                                                                   side, d, cos)
    return res


def _mean(values) -> float:
    """Mean of the finite values (a statistic undefined for some matrices, e.g. Hoyer of a zero
    matrix, is left out); NaN when there is none."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def analysed(res: dict) -> list[dict]:
    """The matrices with statistics (those holding NaN or inf are reported, not analysed)."""
    return [m for m in res["matrices"].values() if not m.get("nonfinite")]


QNULL_KEYS = (("stable_rank", "stable_rank"), ("pr_sigma2", "participation_ratio_sigma2"), ("hoyer", "hoyer"),
              ("frac_below_0.1_rms", "frac_below_0.1_rms"), ("frac_below_0.01_rms", "frac_below_0.01_rms"))


def summary_rows(res: dict) -> list[dict]:
    """Per role: mean statistic over layers beside the mean null."""
    rows = []
    mats = analysed(res)
    roles = sorted({m["role"] for m in mats}, key=MATRIX_ROLES.index)
    for role in roles:
        ms = [m for m in mats if m["role"] == role]
        rows.append({
            "role": role, "n": len(ms),
            "stable_rank": _mean([m["stable_rank"] for m in ms]),
            "stable_rank_null": _mean([m["null"]["stable_rank"] for m in ms]),
            "pr_sigma2": _mean([m["participation_ratio_sigma2"] for m in ms]),
            "pr_sigma2_null": _mean([m["null"]["participation_ratio_sigma2"] for m in ms]),
            "hoyer": _mean([m["hoyer"] for m in ms]), "hoyer_null": _mean([m["null"]["hoyer"] for m in ms]),
            "frac_abs_below_0.1": _mean([m["frac_abs_below_0.1"] for m in ms]),
            "frac_below_0.1_rms": _mean([m["frac_below_0.1_rms"] for m in ms]),
            "frac_below_0.1_rms_null": _mean([m["null"]["frac_below_0.1_rms"] for m in ms]),
            "frac_below_0.01_rms": _mean([m.get("frac_below_0.01_rms") for m in ms]),
            "frac_below_0.01_rms_null": _mean([m["null"].get("frac_below_0.01_rms") for m in ms]),
        })
        q = [m["quant_null"] for m in ms if isinstance(m.get("quant_null"), dict) and "stable_rank" in m["quant_null"]]
        if q:  # the same statistics of Gaussians passed through the matrices' own quantisation
            rows[-1].update({"quantization": sorted({m.get("quantization") for m in ms} - {None}),
                             **{f"{k}_qnull": _mean([x.get(src) for x in q]) for k, src in QNULL_KEYS}})
        qf = [m["quant_null_float"] for m in ms if isinstance(m.get("quant_null_float"), dict)]
        if qf and len(qf) == len(q):
            rows[-1].update({f"{k}_qnull_float": _mean([x.get(src) for x in qf]) for k, src in QNULL_KEYS})
    return rows


def format_summary(res: dict) -> str:
    lines = [f"{res['model']} ({res['model_type']}; {res['heads']['n_heads']} heads): value [null]",
             "| role | n | stable rank | PR(sigma^2) | Hoyer | |w|<0.1 | |w|<0.1 RMS |", "|---|---|---|---|---|---|---|"]
    rows = summary_rows(res)
    for r in rows:
        lines.append(f"| {r['role']} | {r['n']} | {r['stable_rank']:.1f} [{r['stable_rank_null']:.1f}] | "
                     f"{r['pr_sigma2']:.1f} [{r['pr_sigma2_null']:.1f}] | {r['hoyer']:.3f} [{r['hoyer_null']:.3f}] | "
                     f"{r['frac_abs_below_0.1']:.2f} | {r['frac_below_0.1_rms']:.3f} [{r['frac_below_0.1_rms_null']:.3f}] |")
    quant = [r for r in rows if "stable_rank_qnull" in r]
    if quant:
        lines.append("the same beside Gaussians passed through each matrix's own quantisation: value [quantised null]")
        lines += [f"  {r['role']} ({', '.join(r['quantization'])}): stable rank {r['stable_rank']:.1f} "
                  f"[{r['stable_rank_qnull']:.1f}], Hoyer {r['hoyer']:.3f} [{r['hoyer_qnull']:.3f}], below 0.1 RMS "
                  f"{r['frac_below_0.1_rms']:.3f} [{r['frac_below_0.1_rms_qnull']:.3f}], below 0.01 RMS "
                  f"{r['frac_below_0.01_rms']:.4f} [{r['frac_below_0.01_rms_qnull']:.4f}]" for r in quant]
    hb = res["heads_by_layer"]
    pos = [p for h in hb.values() for p in h["positive_share"] if p is not None and np.isfinite(p)]
    if pos:
        asym = [a for h in hb.values() for a in h["asymmetry"]]
        nul = _mean([h.get("null_positive_share") for h in hb.values()])
        nul_a = _mean([h.get("null_asymmetry") for h in hb.values()])
        left = sum(h.get("heads_left_out", {}).get("zero_form", 0) for h in hb.values())
        lines.append(f"attention forms: positive eigenvalue share {np.mean(pos):.3f} (range {min(pos):.2f}-"
                     f"{max(pos):.2f}) [null {nul:.3f}]; asymmetry {_mean(asym):.3f} [null {nul_a:.3f}]"
                     + (f"; {left} heads of zero form left out" if left else ""))
    if res["neurons"]:
        dead = np.mean([n["dead_frac"] for n in res["neurons"].values()])
        weak = np.mean([n["weak_frac"] for n in res["neurons"].values()])
        weak_null = np.mean([n["null"]["weak_frac"] for n in res["neurons"].values()])
        lines.append(f"MLP neurons: dead {dead:.4f}, weak {weak:.4f} [null weak {weak_null:.4f}]")
    for key, cl in res["cross_layer"].items():
        ov = np.array(cl["subspace_overlap"])
        adj = np.mean([ov[i, i + 1] for i in range(len(ov) - 1)])
        lines.append(f"cross-layer {key}: adjacent top-{cl['r']} {cl['side']}put-subspace overlap {adj:.3f} "
                     f"[chance {cl['chance_overlap']:.3f}]")
    c = res.get("census")
    if c:
        lines.append(f"parameters: {c['total']:,} (" + ", ".join(f"{s} {n:,}" for s, n in c["by_stack"].items())
                     + "); by role " + ", ".join(f"{r} {100 * c['share_by_role'][r]:.1f}%" for r in c["by_role"]))
    for stack, b in res["t5_bias"].items():
        from collections import Counter
        if "classes" in b:
            lines.append(f"T5 relative bias ({stack}): " + ", ".join(f"{k} {v}" for k, v in Counter(b["classes"]).items()))
    if res.get("nonfinite_matrices"):
        lines.append(f"not analysed (NaN or inf): {', '.join(res['nonfinite_matrices'][:8])}"
                     + (f" and {len(res['nonfinite_matrices']) - 8} more" if len(res["nonfinite_matrices"]) > 8 else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures

def plot_model(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    mats = analysed(res)
    roles = [r for r in MATRIX_ROLES if any(m["role"] == r for m in mats)]
    ax = axes[0, 0]
    stacks = [m["stack"] for m in mats if m["stack"] != "decoder"] or [m["stack"] for m in mats] or ["main"]
    shown = max(set(stacks), key=stacks.count)  # one stack per line: the encoder / main / text tower
    for role in roles:
        ms = sorted([m for m in mats if m["role"] == role and m["stack"] == shown], key=lambda m: m["layer"] or 0)
        if ms:
            line, = ax.plot([m["layer"] for m in ms], [m["stable_rank"] for m in ms], marker="o", label=role)
            ax.plot([m["layer"] for m in ms], [m["null"]["stable_rank"] for m in ms], ls=":", color=line.get_color())
    ax.set_title(f"Stable rank per layer, {shown} (dotted: Gaussian null)")
    ax.set_xlabel("layer")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    rows = summary_rows(res)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["hoyer"] for r in rows], 0.4, label="Hoyer")
    ax.bar(x + 0.2, [r["hoyer_null"] for r in rows], 0.4, label="Hoyer, null", color="grey")
    ax.set_xticks(x)
    ax.set_xticklabels([r["role"] for r in rows], rotation=45)
    ax.set_title("Scale-free sparsity (Hoyer)")
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    hb = {k: v for k, v in res["heads_by_layer"].items() if "self_" in k}
    if hb:
        width = max(len(v["positive_share"]) for v in hb.values())  # towers may differ in heads
        A = np.array([v["positive_share"] + [np.nan] * (width - len(v["positive_share"])) for v in hb.values()])
        im = ax.imshow(A, cmap="RdBu_r", vmin=0, vmax=1, aspect="auto")
        ax.set_yticks(range(len(hb)))
        ax.set_yticklabels(list(hb), fontsize=6)
        ax.set_xlabel("head")
        nul = np.mean([v["null_positive_share"] for v in hb.values()])
        ax.set_title(f"Positive eigenvalue share of W_q^T W_k per head (null {nul:.2f})")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[1, 0]
    key = next((k for k in res["cross_layer"] if k.endswith("/q")), next(iter(res["cross_layer"]), None))
    if key:
        cl = res["cross_layer"][key]
        im = ax.imshow(np.array(cl["subspace_overlap"]), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{key}: top-{cl['r']} subspace overlap (chance {cl['chance_overlap']:.2f})")
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[1, 1]
    if res["neurons"]:
        keys = list(res["neurons"])
        ax.plot(range(len(keys)), [res["neurons"][k]["weak_frac"] for k in keys], "o-", label="weak (<0.1 median)")
        ax.plot(range(len(keys)), [res["neurons"][k]["null"]["weak_frac"] for k in keys], "k:", label="weak, null")
        ax.plot(range(len(keys)), [res["neurons"][k]["dead_frac"] for k in keys], "s-", label="dead (<1e-3 median)")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=45, fontsize=7)
        ax.set_title("MLP neurons by importance")
        ax.legend(fontsize=7)
    ax = axes[1, 2]
    bias = {k: b for k, b in res["t5_bias"].items() if "profiles" in b}
    if bias:
        b = next(iter(bias.values()))
        for p, c in zip(b["profiles"], b["classes"]):
            ax.plot(b["distance"], p, lw=1, label=c)
        ax.set_xlabel("key - query distance")
        ax.set_title("T5 relative bias per head (" + next(iter(bias)) + ")")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    else:
        norms = [n for n in res["norms"].values() if not n.get("nonfinite")]
        ax.errorbar(range(len(norms)), [n["mean"] for n in norms], yerr=[n["std"] for n in norms], fmt="o", ms=3)
        ax.set_title("LayerNorm scales (mean +- std per norm)")
        ax.set_xlabel("norm index (by layer)")
    fig.suptitle(f"Weight geometry of {res['model']}")
    return save_figure(fig, path, dpi=100)


def plot_comparison(results: list[dict], path: str) -> str:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [model_tag(r["model"]) for r in results]
    x = np.arange(len(results))
    for ax, key, title in ((axes[0], "stable_rank", "stable rank / null"), (axes[1], "hoyer", "Hoyer / null"),
                           (axes[2], "pr_sigma2", "PR(sigma^2) / null")):
        for j, role in enumerate(("q", "k", "v", "o", "mlp_in", "mlp_out")):
            vals = []
            for r in results:
                row = next((s for s in summary_rows(r) if s["role"] == role), None)
                vals.append(row[key] / row[key + "_null"] if row and row[key + "_null"] else np.nan)
            ax.bar(x + 0.13 * (j - 2.5), vals, 0.13, label=role)
        ax.axhline(1, color="k", lw=1, ls="--")
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, fontsize=7)
        ax.set_title(title + " (1 = chance)")
    axes[0].legend(fontsize=7)
    return save_figure(fig, path, dpi=100)


def collections_counter(dtypes: dict) -> dict:
    """How many tensors of each quantisation type."""
    from collections import Counter
    return dict(Counter(dtypes.values()))


def build_parser() -> Parser:
    p = Parser(prog="python -m terrain.weights",
               description="Weight geometry of pretrained transformers, beside random nulls.")
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                   help="model names, local folders or .gguf files (see terrain/models.py): minilm = the offline all-MiniLM-L6-v2 (default), smollm2 = SmolLM2-135M-Instruct after `make models`")
    p.add_argument("--n-null", type=int_between(1, 10000), default=3,
                   help="Monte Carlo draws per statistic (matrices; heads draw n-null x heads Wishart Gram matrices)")
    p.add_argument("--null", default="auto", choices=["auto", "analytic", "monte-carlo"],
                   help="nulls of the matrix statistics: Gaussian matrices sampled (monte-carlo), or the exact / "
                        "Marchenko-Pastur laws (analytic); auto samples matrices of up to 2^20 entries")
    p.add_argument("--overlap-rank", type=at_least(1), default=32, help="r of the cross-layer subspace overlap")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the null draws")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help="pass every matrix through this GGUF quantisation type (Q4_0, Q4_1, Q5_0, Q8_0, ...) before "
                        "the battery, with the quantised Gaussian null beside each statistic: what the storage alone "
                        "does to a float model's numbers (outputs weights_<type>_<model>)")
    add_device_flag(p)
    add_output_flags(p)
    return p


@safeio.one_line_errors(TerrainError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)

    def compute(name):
        t0 = time.perf_counter()
        res = battery(name, args.n_null, args.seed, args.overlap_rank, device, args.null, quantize=args.quantize)
        res["seconds"] = time.perf_counter() - t0
        res["device"] = device
        return res

    if args.quantize:
        Q.qtype(args.quantize)
    prefix = f"weights_{args.quantize.lower()}" if args.quantize else "weights"
    code, results, written = run_for_models(args, prefix, compute, format_summary, plot_model,
                                            comparison=plot_comparison)
    if written:
        print("wrote " + ", ".join(written))
    return code


if __name__ == "__main__":
    sys.exit(main())
