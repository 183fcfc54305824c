"""Cross-model projection: align one model's token space to another's over a shared vocabulary.

    python -m terrain.project                                   # MiniLM embeddings -> MiniLM layer 3
    python -m terrain.project --source minilm@2 --target minilm@4
    python -m terrain.project --source /path/model_a --target /path/model_b@embed

A space is MODEL[@WHERE]: `embed` (default) is the input-embedding matrix; an integer L
is the hidden state at index L (0 = embedding output) of each token fed alone between the
tokenizer's special tokens. Tokens shared by both tokenizers (same token string, special
tokens excluded) are split once, by --seed, into anchors (--anchors) that fit the map and
held-out tokens (--test) that score it; the single-token digits are always held out.
Both sides are centred on the anchors' means and the wider side is reduced by PCA (fit on
the anchors) to the narrower width. Maps: orthogonal Procrustes (with one global scale),
least squares (ridge --ridge), and the same Procrustes fit on shuffled correspondences
(the control every number needs). Scores on held-out tokens: per-token cosine to the true
target, the rank of the true target among all held-out targets (top-1, top-10, median),
relational (RSA) correlation of pairwise cosines, the digit structure, the spectrum of
the residual beside that of the target, the best- and worst-aligned held-out tokens with
their cosines, and the CV of 4-simplex volumes of the same held-out simplices, native and
projected (with the Spearman correlation of their volumes), beside a Gaussian of the
native covariance and the exact isotropic CV.
Tokens whose row has zero norm in either space have no direction and are left out of the
shared vocabulary ("rows_left_out"); a space holding NaN or inf is not analysed (one line).
"""
from __future__ import annotations

import sys

import numpy as np

import safeio
from cliargs import SEED, Parser, at_least, non_negative
from plotting import save_figure
from statsutil import pearson, spearman
from terrain.metrics import bootstrap_ci, coefficient_of_variation, gaussian_volume_cv, gram_volume, unit
from terrain.checkpoint import embedding_matrix
from terrain.models import DEFAULT_MODEL, TerrainError, check_finite, load_model, load_tokenizer, model_device
from terrain.cli import add_model_flags, add_output_flags, claim_outputs, model_tag, resolve_device

METHODS = ("procrustes", "least_squares", "shuffled_control")


# ----------------------------------------------------------------------------- spaces

def parse_space(spec: str) -> tuple[str, str]:
    name, _, where = spec.rpartition("@") if "@" in spec else (spec, "", "embed")
    if where != "embed":
        try:
            int(where)
        except ValueError:
            raise TerrainError(f"space {spec!r}: after '@' give 'embed' or a layer index") from None
    return name or DEFAULT_MODEL, where


def token_space(spec: str, batch_size: int = 512, progress: bool = True, dtype: str = "float32",
                device: str = "cpu") -> tuple[dict[str, int], np.ndarray]:
    """(token string -> row, matrix) for a space spec. '@embed' reads the embedding matrix alone
    from the checkpoint; a layer runs the model (an encoder-decoder's encoder only)."""
    name, where = parse_space(spec)
    tok = load_tokenizer(name)
    special = set(tok.all_special_tokens)
    vocab = {t: i for t, i in tok.get_vocab().items() if t not in special}
    if where == "embed":
        emb, _ = embedding_matrix(name)
        vocab = {t: i for t, i in vocab.items() if i < emb.shape[0]}
        strings = sorted(vocab, key=vocab.get)
        check_finite(emb, f"space {spec}: the embedding matrix")
        return {t: k for k, t in enumerate(strings)}, emb[np.array([vocab[t] for t in strings], dtype=int)]
    model, _ = load_model(name, dtype, device, part="encoder")
    n_rows = model.get_input_embeddings().weight.shape[0]
    vocab = {t: i for t, i in vocab.items() if i < n_rows}
    strings = sorted(vocab, key=vocab.get)
    ids = np.array([vocab[t] for t in strings], dtype=int)
    safeio.check_fits(4 * len(ids) * model.get_input_embeddings().weight.shape[1] * 3, f"the token states of {spec}",
                      "use a smaller model or a machine with more memory")
    X = token_states(model, tok, ids, int(where), batch_size, progress, desc=f"token states {spec}")
    return {t: k for k, t in enumerate(strings)}, check_finite(X, f"space {spec}: the token states")


def token_states(model, tok, token_ids: np.ndarray, layer: int, batch_size: int = 512, progress: bool = False,
                 desc: str = "token states") -> np.ndarray:
    """Hidden state at index `layer` (0 = embedding output) of each token fed alone between the
    tokenizer's special tokens."""
    import torch
    from tqdm import tqdm
    template, pos = special_template(tok)
    rows = model.get_input_embeddings().weight.shape[0]
    if max(template, default=0) >= rows or (len(token_ids) and int(np.max(token_ids)) >= rows):
        raise TerrainError(f"the tokenizer gives ids beyond the {rows} rows of the model's embedding; the tokenizer "
                           f"files belong to another model")
    out = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(token_ids), batch_size), desc=desc, disable=not progress, leave=False):
            inp = torch.tensor([template[:pos] + [int(t)] + template[pos + 1:] for t in token_ids[s:s + batch_size]])
            inp = inp.to(model_device(model))
            hs = model(input_ids=inp, attention_mask=torch.ones_like(inp), output_hidden_states=True).hidden_states
            if not -len(hs) <= layer < len(hs):
                raise TerrainError(f"layer {layer} out of range (0..{len(hs) - 1})")
            out.append(hs[layer][:, pos].float().cpu().numpy())
    X = np.concatenate(out)
    return check_finite(X, "the token states")


def special_template(tok) -> tuple[list[int], int]:
    """Input ids of one token between the tokenizer's special tokens, and that token's position."""
    for probe in ("a", "the", "x", "1"):
        bare = tok(probe, add_special_tokens=False)["input_ids"]
        full = tok(probe)["input_ids"]
        if len(bare) == 1 and bare[0] in full:
            return full, full.index(bare[0])
    raise TerrainError("could not find where this tokenizer puts a single token between its special tokens")


# ----------------------------------------------------------------------------- maps

def pca_basis(X: np.ndarray, k: int) -> np.ndarray:
    """Top-k principal directions (d, k) of centred rows X."""
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    return vt[:k].T


def procrustes(A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, float]:
    """Orthogonal R and scale s minimising ||s A R - B||_F (rows centred)."""
    U, S, Vt = np.linalg.svd(A.T @ B)
    R = U @ Vt
    return R, float(S.sum() / np.sum(A * A))


def least_squares(A: np.ndarray, B: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    d = A.shape[1]
    lam = ridge * np.trace(A.T @ A) / d
    try:
        return np.linalg.solve(A.T @ A + lam * np.eye(d), A.T @ B)
    except np.linalg.LinAlgError:
        raise TerrainError(f"least squares over {len(A)} anchors in {d} dimensions is singular with --ridge "
                           f"{ridge:g}; give a positive --ridge or more --anchors") from None


def fit_maps(Xa: np.ndarray, Ya: np.ndarray, rng: np.random.Generator, ridge: float = 1e-3) -> dict:
    R, s = procrustes(Xa, Ya)
    Rs, ss = procrustes(Xa, Ya[rng.permutation(len(Ya))])
    return {"procrustes": s * R, "least_squares": least_squares(Xa, Ya, ridge), "shuffled_control": ss * Rs}


# ----------------------------------------------------------------------------- scores

def retrieval(P: np.ndarray, Y: np.ndarray, block: int = 2048) -> np.ndarray:
    """Rank (1 = best) of each row's true target among all rows of Y, by cosine."""
    Pu, Yu = unit(P), unit(Y)
    ranks = np.empty(len(P), np.int64)
    for s in range(0, len(P), block):
        C = Pu[s:s + block] @ Yu.T
        true = C[np.arange(len(C)), np.arange(s, s + len(C))]
        ranks[s:s + block] = 1 + np.sum(C > true[:, None], axis=1)
    return ranks


def rsa(P: np.ndarray, Y: np.ndarray) -> dict:
    i, j = np.triu_indices(len(P), 1)
    a, b = (unit(P) @ unit(P).T)[i, j], (unit(Y) @ unit(Y).T)[i, j]
    return {"pearson": pearson(a, b), "spearman": spearman(a, b),
            "mean_abs_diff": float(np.mean(np.abs(a - b)))}


def score(P: np.ndarray, Y: np.ndarray, n_rsa: int, rng: np.random.Generator) -> dict:
    cos = np.sum(unit(P) * unit(Y), 1)
    ranks = retrieval(P, Y)
    sub = rng.choice(len(P), size=min(n_rsa, len(P)), replace=False)
    resid = Y - P
    lam_r = np.linalg.eigvalsh(np.cov(resid, rowvar=False))[::-1]
    return {"cosine_mean": float(cos.mean()), "cosine_median": float(np.median(cos)),
            "cosine_percentiles": {str(q): float(np.percentile(cos, q)) for q in (5, 25, 75, 95)},
            "top1": float(np.mean(ranks == 1)), "top10": float(np.mean(ranks <= 10)),
            "median_rank": float(np.median(ranks)), "n_candidates": int(len(Y)),
            "rsa": rsa(P[sub], Y[sub]),
            "relative_residual": float(np.linalg.norm(resid) / np.linalg.norm(Y)),
            "residual_eigenvalues": lam_r.tolist(), "cosines": cos.tolist()}


def digit_comparison(Pd: np.ndarray, Yd: np.ndarray) -> dict:
    """Correlation of the digits' cosine matrices (projected against native) and the
    per-digit cosine; both from held-out tokens."""
    i, j = np.triu_indices(len(Pd), 1)
    a, b = (unit(Pd) @ unit(Pd).T)[i, j], (unit(Yd) @ unit(Yd).T)[i, j]
    return {"structure_pearson": float(np.corrcoef(a, b)[0, 1]),
            "per_digit_cosine": np.sum(unit(Pd) * unit(Yd), 1).tolist()}


# ----------------------------------------------------------------------------- driver

def extreme_tokens(cos: np.ndarray, tokens: list[str], n: int) -> dict:
    """The n held-out tokens the map aligns best and worst, with their cosines."""
    order = np.argsort(cos)
    return {"best_tokens": [[tokens[i], float(cos[i])] for i in order[::-1][:n]],
            "worst_tokens": [[tokens[i], float(cos[i])] for i in order[:n]]}


def simplex_cv(X: np.ndarray, simplices: np.ndarray, rng: np.random.Generator) -> dict:
    """CV of the volumes of the given 4-simplices (rows of X, 5 indices each), its 95% bootstrap
    interval, and the exact CV of isotropic Gaussian simplices in X's dimension."""
    vol = gram_volume(X[simplices])
    return {"cv": coefficient_of_variation(vol), "ci": list(bootstrap_ci(vol, n_boot=300, rng=rng)),
            "null_isotropic_exact": gaussian_volume_cv(4, X.shape[1])}


def align(X: np.ndarray, Y: np.ndarray, tokens: list[str], n_anchors: int = 10000, n_test: int = 5000,
          n_rsa: int = 1000, ridge: float = 1e-3, seed: int = 0, n_simplices: int = 2000,
          n_extreme: int = 15) -> dict:
    """Fit and score the maps from rows of X to rows of Y (row k of both is tokens[k])."""
    rng = np.random.default_rng(seed)
    digits = [tokens.index(str(d)) for d in range(10) if str(d) in tokens]
    rest = np.setdiff1d(np.arange(len(tokens)), digits)
    order = rng.permutation(rest)
    if len(order) < 50:
        raise TerrainError(f"only {len(tokens)} shared tokens: too few to fit and test a map")
    n_anchors = min(n_anchors, len(order) // 2)
    anchors, test = order[:n_anchors], order[n_anchors:n_anchors + n_test]
    mx, my = X[anchors].mean(0), Y[anchors].mean(0)
    Xc, Yc = X - mx, Y - my
    k = min(X.shape[1], Y.shape[1])
    pca = {}
    if X.shape[1] > k:
        V = pca_basis(Xc[anchors], k)
        pca["source_variance_kept"] = float(np.sum((Xc[anchors] @ V) ** 2) / np.sum(Xc[anchors] ** 2))
        Xc = Xc @ V
    if Y.shape[1] > k:
        V = pca_basis(Yc[anchors], k)
        pca["target_variance_kept"] = float(np.sum((Yc[anchors] @ V) ** 2) / np.sum(Yc[anchors] ** 2))
        Yc = Yc @ V
    maps = fit_maps(Xc[anchors], Yc[anchors], rng, ridge)
    res = {"n_shared": len(tokens), "n_anchors": int(len(anchors)), "n_test": int(len(test)), "width": k,
           "pca": pca, "methods": {}}
    vol_rng = np.random.default_rng([seed, 1])     # the same simplices for the native and every projected space
    simplices = np.stack([vol_rng.choice(len(test), 5, replace=False) for _ in range(n_simplices)])
    res["native_simplex_cv"] = simplex_cv(Yc[test], simplices, vol_rng)
    gauss = vol_rng.multivariate_normal(np.zeros(k), np.cov(Yc[test], rowvar=False), size=len(test), method="eigh")
    res["native_simplex_cv"]["null_same_covariance"] = simplex_cv(gauss, simplices, vol_rng)["cv"]
    native_volumes = gram_volume(Yc[test][simplices])
    for m, W in maps.items():
        P = Xc @ W
        r = score(P[test], Yc[test], n_rsa, rng)
        r["anchor_cosine_mean"] = float(np.mean(np.sum(unit(P[anchors]) * unit(Yc[anchors]), 1)))
        if len(digits) == 10:
            r["digits"] = digit_comparison(P[digits], Yc[digits])
        r.update(extreme_tokens(np.array(r["cosines"]), [tokens[t] for t in test], n_extreme))
        r["simplex_cv"] = simplex_cv(P[test], simplices, vol_rng)
        r["simplex_cv"]["spearman_with_native"] = spearman(gram_volume(P[test][simplices]), native_volumes)
        res["methods"][m] = r
    lam_t = np.linalg.eigvalsh(np.cov(Yc[test], rowvar=False))[::-1]
    res["target_eigenvalues"] = lam_t.tolist()
    return res


def project(source: str, target: str, n_anchors: int = 10000, n_test: int = 5000, n_rsa: int = 1000,
            ridge: float = 1e-3, seed: int = 0, progress: bool = True, dtype: str = "float32",
            device: str = "cpu") -> dict:
    vs, X = token_space(source, progress=progress, dtype=dtype, device=device)
    vt, Y = token_space(target, progress=progress, dtype=dtype, device=device)
    shared = sorted(set(vs) & set(vt))
    Xs, Ys = X[[vs[t] for t in shared]], Y[[vt[t] for t in shared]]
    ok = (np.linalg.norm(Xs, axis=1) > 0) & (np.linalg.norm(Ys, axis=1) > 0)  # tokens with a direction in both
    res = align(Xs[ok], Ys[ok], [t for t, k in zip(shared, ok) if k], n_anchors, n_test, n_rsa, ridge, seed)
    left = {"rows_left_out": {"zero_norm": int((~ok).sum())}} if not ok.all() else {}
    return {"source": source, "target": target, **left, **res}


def format_summary(res: dict) -> str:
    lines = [f"{res['source']} -> {res['target']}: {res['n_shared']} shared tokens, {res['n_anchors']} anchors, "
             f"{res['n_test']} held out, width {res['width']}"
             + (f", PCA {res['pca']}" if res["pca"] else ""),
             f"  {'method':17s} {'cos mean':>8s} {'median':>7s} {'top-1':>6s} {'top-10':>6s} {'med rank':>8s} "
             f"{'RSA r':>6s} {'digits r':>8s} {'anchor cos':>10s}"]
    for m, r in res["methods"].items():
        d = r.get("digits", {}).get("structure_pearson", float("nan"))
        lines.append(f"  {m:17s} {r['cosine_mean']:8.3f} {r['cosine_median']:7.3f} {r['top1']:6.3f} {r['top10']:6.3f} "
                     f"{r['median_rank']:8.0f} {r['rsa']['pearson']:6.3f} {d:8.3f} {r['anchor_cosine_mean']:10.3f}")
    nat = res["native_simplex_cv"]
    lines.append(f"  4-simplex volume CV of held-out points: native {nat['cv']:.3f} [{nat['ci'][0]:.3f}, "
                 f"{nat['ci'][1]:.3f}] (Gaussian, same covariance {nat['null_same_covariance']:.3f}; isotropic "
                 f"{nat['null_isotropic_exact']:.3f}); projected " + ", ".join(
                     f"{m} {r['simplex_cv']['cv']:.3f} (Spearman with native volumes "
                     f"{r['simplex_cv']['spearman_with_native']:.2f})" for m, r in res["methods"].items()))
    r = res["methods"]["procrustes"]
    lines.append("  procrustes, best aligned: " + ", ".join(f"{t} {c:.2f}" for t, c in r["best_tokens"][:8]))
    lines.append("  procrustes, worst aligned: " + ", ".join(f"{t} {c:.2f}" for t, c in r["worst_tokens"][:8]))
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"procrustes": "tab:green", "least_squares": "tab:orange", "shuffled_control": "tab:grey"}
    for m, r in res["methods"].items():
        ax[0].hist(r["cosines"], bins=80, alpha=0.55, color=colors[m], label=f"{m} ({r['cosine_mean']:.3f})")
        ax[2].semilogy(r["residual_eigenvalues"], color=colors[m], label=f"residual, {m}")
    ax[0].set_xlabel("cosine(projected, native), held-out tokens")
    ax[0].legend()
    ax[0].set_title("per-token alignment")
    names = list(res["methods"])
    x = np.arange(len(names))
    for k, (key, label) in enumerate((("top1", "top-1"), ("top10", "top-10"))):
        ax[1].bar(x + (k - 0.5) * 0.38, [res["methods"][m][key] for m in names], 0.38, label=label)
    ax[1].plot(x, [res["methods"][m]["rsa"]["pearson"] for m in names], "kD", label="RSA Pearson")
    ax[1].set_xticks(x)
    ax[1].set_xticklabels(names)
    ax[1].set_ylim(-0.05, 1.05)
    ax[1].legend()
    ax[1].set_title(f"retrieval among {res['n_test']} held-out tokens")
    ax[2].semilogy(res["target_eigenvalues"], "k--", label="target (held-out)")
    top = max(res["target_eigenvalues"][0], *(r["residual_eigenvalues"][0] for r in res["methods"].values()))
    ax[2].set_ylim(top * 1e-5, top * 2)
    ax[2].set_xlabel("component")
    ax[2].set_title("spectrum of the residual")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"{res['source']} -> {res['target']}")
    return save_figure(fig, path)


def build_parser() -> Parser:
    p = Parser(prog="python -m terrain.project",
               description="Align one model's token space to another's (Procrustes, least squares, shuffled "
                           "control) and score it on held-out tokens.")
    p.add_argument("--source", default=f"{DEFAULT_MODEL}@embed", help="MODEL[@embed|@LAYER]")
    p.add_argument("--target", default=f"{DEFAULT_MODEL}@3", help="MODEL[@embed|@LAYER]")
    p.add_argument("--anchors", type=at_least(10), default=10000, help="shared tokens that fit the maps")
    p.add_argument("--test", type=at_least(10), default=5000, help="held-out shared tokens that score them")
    p.add_argument("--rsa-tokens", type=at_least(3), default=1000,
                   help="held-out tokens of the RSA (a correlation of pairwise cosines needs 3)")
    p.add_argument("--ridge", type=non_negative(), default=1e-3,
                   help="least-squares ridge, relative to the mean variance (0: plain least squares)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the sampled items and the nulls")
    add_output_flags(p)
    add_model_flags(p)
    return p


@safeio.one_line_errors(TerrainError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = claim_outputs(args, "project", [f"{model_tag(args.source)}_to_{model_tag(args.target)}"])[0]
    res = project(args.source, args.target, args.anchors, args.test, args.rsa_tokens, args.ridge, args.seed,
                  dtype=args.dtype, device=resolve_device(args.device))
    print(format_summary(res))
    out.replace_earlier()
    written = [out.write_json(res)]
    if not args.no_plot:
        written.append(out.draw(plot, res))
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
