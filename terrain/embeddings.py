"""Embedding-matrix probes of a pretrained model, each beside a null.

    python -m terrain.embeddings                       # offline MiniLM
    python -m terrain.embeddings --model t5-small --out-dir runs/terrain

Row norms, the cosine distribution of random token pairs, the eigenspectrum of the centred
matrix and its participation ratio, and the coefficient of variation of 4-simplex
("pentachoron") volumes with a bootstrap CI; nulls: a Gaussian matrix of the same shape
and RMS, a Gaussian with the embeddings' own covariance (same spectrum, no other
structure), and the exact CV of Gaussian simplices in d dimensions. The digit manifold:
the single-token digits "0".."9", the Spearman correlation of |i - j| with their cosine
(permutation p-value) and adjacent against non-adjacent cosine. Semantic categories:
single-token members only; mean within-category cosine against random sets of the same
size from the vocabulary (lift and z); the special tokens (padding, [CLS], end of sequence,
T5's <extra_id_N> sentinels) as a group of their own; the cosine between category centroids
beside random sets of the same sizes. Euclidean distances of random pairs beside the cosines
(nulls: same RMS, same covariance). The output head against the input embedding (the same
matrix when tied): per-token cosine, spectra, Procrustes R^2 and linear CKA, each beside a
shuffled token correspondence.

Degenerate rows: rows of zero norm (padding tokens are often exactly zero) have no direction,
so every cosine statistic (pairs, digits, categories, special tokens, centroids, head row
cosines) uses the other rows and says how many it left out ("rows_left_out"); norms, spectra,
distances and volumes use every row. A matrix holding NaN or inf is reported as such
({"nonfinite": true, "n_nonfinite": k}) and not analysed.
"""
from __future__ import annotations

import sys

import numpy as np

import safeio
from cliargs import SEED, Parser, at_least

from terrain import metrics as M
from plotting import save_figure
from statsutil import gaussian_null, spearman
from terrain.checkpoint import embedding_matrix, output_head
from terrain.models import DEFAULT_MODEL, TerrainError, load_tokenizer
from terrain.cli import add_output_flags, run_for_models

# Small hand-made categories; members that are not single tokens are dropped and counted.
CATEGORIES = {
    "animals": "dog cat horse cow sheep pig lion tiger bear wolf fox mouse rabbit deer goat eagle snake whale",
    "colours": "red blue green yellow black white brown pink purple orange grey gold silver",
    "body": "hand foot head arm leg eye ear nose mouth finger heart skin bone hair neck knee",
    "family": "mother father brother sister son daughter uncle aunt wife husband cousin grandmother",
    "emotions": "happy sad angry afraid proud lonely calm anxious jealous excited bored grateful",
    "numbers": "one two three four five six seven eight nine ten twenty hundred thousand million",
    "countries": "france germany italy spain china japan india brazil canada mexico russia egypt kenya",
    "food": "bread rice cheese apple banana meat fish soup cake butter sugar salt milk egg",
}


def single_token_ids(tokenizer, words: list[str]) -> dict[str, int]:
    """word -> id for words that are one vocabulary token (with or without a word-start marker)."""
    vocab = tokenizer.get_vocab()
    out = {}
    for w in words:
        for cand in (w, "\u2581" + w, "\u0120" + w):  # plain, SentencePiece, byte-level BPE
            if cand in vocab:
                out[w] = vocab[cand]
                break
    return out


def digit_structure(V: np.ndarray, n_perm: int = 2000, rng: np.random.Generator | None = None) -> dict:
    """V (10, d) for digits 0..9: Spearman(|i - j|, cos) over pairs with a permutation p-value
    (digit labels shuffled), and mean cosine of adjacent against non-adjacent pairs."""
    rng = rng or np.random.default_rng(0)
    U = V / np.linalg.norm(V, axis=1, keepdims=True)
    C = U @ U.T
    i, j = np.triu_indices(len(V), 1)
    gap = np.abs(i - j)
    rho = spearman(gap, C[i, j])
    null = np.empty(n_perm)
    for b in range(n_perm):
        p = rng.permutation(len(V))
        null[b] = spearman(gap, C[p][:, p][i, j])
    return {"spearman_gap_cos": float(rho), "p_value": float((1 + np.sum(null <= rho)) / (1 + n_perm)),
            "null_mean": float(null.mean()), "adjacent_cos": float(C[i, j][gap == 1].mean()),
            "nonadjacent_cos": float(C[i, j][gap > 1].mean()), "cosine_matrix": C.tolist()}


def category_lift(E: np.ndarray, members: list[int], pool: np.ndarray, n_random: int = 500,
                  rng: np.random.Generator | None = None) -> dict:
    """Mean within-set cosine of `members` against random sets of the same size from `pool`.
    Rows of zero norm (no direction) are left out of both and counted."""
    rng = rng or np.random.default_rng(0)
    members, pool = np.asarray(members), np.asarray(pool)
    norms = np.linalg.norm(E[members], axis=1)
    kept = members[norms > 0]
    pool_ok = pool[np.linalg.norm(E[pool], axis=1) > 0]
    left = {"rows_left_out": {"zero_norm": int(len(members) - len(kept))}} if len(kept) < len(members) else {}
    if len(kept) < 2 or len(pool_ok) < len(kept):
        raise ValueError(f"a set of {len(kept)} rows of nonzero norm (of {len(members)}) in a pool of "
                         f"{len(pool_ok)}: no within-set cosine")

    def within(ids):
        U = E[ids] / np.linalg.norm(E[ids], axis=1, keepdims=True)
        C = U @ U.T
        return C[np.triu_indices(len(ids), 1)].mean()

    val = within(kept)
    null = np.array([within(rng.choice(pool_ok, size=len(kept), replace=False)) for _ in range(n_random)])
    sd = null.std()
    return {"n": len(kept), "within_cos": float(val), "random_mean": float(null.mean()),
            "lift": float(val - null.mean()), "z": float((val - null.mean()) / sd) if sd > 0 else float("nan"),
            **left}


MIN_ROWS, MIN_COLS = 5, 4  # a 4-simplex needs 5 rows, its exact Gaussian null 4 dimensions


def probe(name: str | None, seed: int = 0, n_simplices: int = 4000) -> dict:
    E32 = embedding_matrix(name)[0]  # read alone from the checkpoint, no forward pass
    n, d = E32.shape
    res: dict = {"model": name or DEFAULT_MODEL, "shape": [n, d]}
    if n < MIN_ROWS or d < MIN_COLS:
        raise TerrainError(f"{res['model']}: the embedding matrix is {n} x {d}; the probes need at least {MIN_ROWS} "
                           f"rows and {MIN_COLS} columns")
    # E in float64, its Gaussian nulls (same RMS, same covariance), the centred copy and the simplices
    safeio.check_fits(8 * (5 * n * d + 2 * min(n, 20000) * d + 5 * d * n_simplices), f"the probes of {n} x {d}",
                      "lower --n-simplices or use a machine with more memory")
    tok = load_tokenizer(name)                       # a broken tokenizer stops the probe before any work
    bad = M.nonfinite_report(E32)
    if bad is not None:
        res["embedding"] = bad
        res["not_analysed"] = (f"the embedding matrix holds {bad['n_nonfinite']} non-finite values (NaN or inf) in "
                               f"{bad['n_rows_nonfinite']} rows")
        return res
    E = E32.astype(np.float64)
    del E32
    norms = np.linalg.norm(E, axis=1)
    defined = norms > 0                              # rows with a direction: the cosine statistics use these
    res["rows_left_out"] = {"zero_norm": int(n - defined.sum())}
    if defined.sum() < MIN_ROWS:
        res["not_analysed"] = f"only {int(defined.sum())} of its {n} rows have a nonzero norm"
        return res
    rng = np.random.default_rng(seed)
    R = M.random_like(E, rng)
    rnorms = np.linalg.norm(R, axis=1)
    res["norms"] = {"mean": float(norms.mean()), "std": float(norms.std()), "min": float(norms.min()),
                    "max": float(norms.max()), "null_mean": float(rnorms.mean()), "null_std": float(rnorms.std())}
    res["cosines"] = {**M.cosine_stats(E, rng=rng), "null": M.cosine_stats(R, rng=rng)}
    Ec = E - E.mean(0)
    lam = np.linalg.eigvalsh(Ec.T @ Ec / n)[::-1]
    lam_r = np.linalg.eigvalsh((R - R.mean(0)).T @ (R - R.mean(0)) / n)[::-1]
    res["spectrum"] = {"participation_ratio": M.participation_ratio(lam), "null_participation_ratio":
                       M.participation_ratio(lam_r), "eigenvalues": lam.tolist(), "null_eigenvalues": lam_r.tolist()}
    vol = M.sample_simplex_volumes(E, 4, n_simplices, rng)
    gauss_cov = gaussian_null(E, rng, size=min(n, 20000))
    res["simplex_cv"] = {"k": 4, "cv": M.coefficient_of_variation(vol),
                         "ci": list(M.bootstrap_ci(vol, n_boot=300, rng=rng)),
                         "null_same_covariance": M.coefficient_of_variation(
                             M.sample_simplex_volumes(gauss_cov, 4, n_simplices, rng)),
                         "null_isotropic_exact": M.gaussian_volume_cv(4, d)}
    extra = np.random.default_rng([seed, 1])   # the later statistics: the earlier ones keep their draws
    res["cosines"]["null_same_covariance"] = M.cosine_stats(gauss_cov, rng=extra)
    res["distances"] = {**M.distance_stats(E, rng=extra), "null": M.distance_stats(R, rng=extra),
                        "null_same_covariance": M.distance_stats(gauss_cov, rng=extra)}

    def usable(ids: dict) -> dict:  # tokens with a row in E (the tokenizer may be larger) and a direction
        return {w: i for w, i in ids.items() if i < n and defined[i]}

    def zero_left(ids: dict) -> dict:
        k = sum(1 for i in ids.values() if i < n and not defined[i])
        return {"rows_left_out": {"zero_norm": k}} if k else {}
    digit_ids = single_token_ids(tok, [str(i) for i in range(10)])
    digits = usable(digit_ids)
    if len(digits) == 10:
        res["digits"] = digit_structure(E[[digits[str(i)] for i in range(10)]], rng=rng)
    else:
        res["digits"] = {"skipped": f"only {len(digits)} of the digits 0-9 are single tokens with a row of nonzero "
                                    f"norm ({len(digit_ids) - len(digits)} left out: beyond the matrix or zero norm)"}
    vocab = tok.get_vocab()
    pool = np.array(sorted({i for t, i in vocab.items() if t.lstrip("\u2581\u0120").isalpha()
                            and t.lstrip("\u2581\u0120").islower() and len(t.lstrip("\u2581\u0120")) > 2
                            and i < n and defined[i]}), dtype=int)
    res["categories"] = {}
    groups = {}
    for cat, words in CATEGORIES.items():
        found = single_token_ids(tok, words.split())
        ids = usable(found)
        if len(ids) >= 4 and len(pool) >= len(ids):
            groups[cat] = np.array(list(ids.values()))
            res["categories"][cat] = {**category_lift(E, list(ids.values()), pool, rng=rng),
                                      "dropped": len(words.split()) - len(ids),
                                      **zero_left(found)}
    special_all = special_token_ids(tok, n)
    special = special_all[defined[special_all]]
    if len(special) >= 2:
        res["special_tokens"] = {"tokens": [tok.convert_ids_to_tokens(int(i)) for i in special],
                                 **category_lift(E, list(special), np.flatnonzero(defined), rng=extra),
                                 "norm_mean": float(norms[special_all].mean()),
                                 "vocabulary_norm_mean": float(norms.mean()),
                                 "cos_to_vocabulary_mean": float((M.unit(E[special]) @ M.unit(E[defined]).mean(0)).mean())}
        if len(special) < len(special_all):
            res["special_tokens"]["rows_left_out"] = {"zero_norm": int(len(special_all) - len(special))}
            res["special_tokens"]["tokens_left_out"] = [tok.convert_ids_to_tokens(int(i))
                                                        for i in special_all[~defined[special_all]]]
        groups["special"] = special
    if len(groups) >= 2 and len(pool) >= max(len(g) for g in groups.values()):
        res["centroids"] = M.centroid_similarity(E, groups, pool, rng=extra)
    H, tied = output_head(name)
    head_bad = M.nonfinite_report(H)
    if head_bad is not None:
        res["head"] = {"tied": tied, **head_bad}
    elif H.shape != E.shape:
        res["head"] = {"tied": tied, "skipped": f"head {list(H.shape)} and embedding {list(E.shape)} differ"}
    else:
        try:
            res["head"] = {"tied": tied, **M.space_alignment(E, H.astype(np.float64), rng=extra)}
        except ValueError as e:
            res["head"] = {"tied": tied, "skipped": str(e)}
    return res


def special_token_ids(tokenizer, vocab_size: int) -> np.ndarray:
    """The tokenizer's special tokens (padding, end of sequence, [CLS], ...) and T5's sentinels
    <extra_id_N>, as rows of an embedding with vocab_size rows."""
    import re
    ids = set(tokenizer.all_special_ids)
    ids |= {i for t, i in tokenizer.get_vocab().items() if re.fullmatch(r"<extra_id_\d+>", t)}
    return np.array(sorted(i for i in ids if 0 <= i < vocab_size), dtype=int)


def format_summary(res: dict) -> str:
    c, s, v = res["cosines"], res["spectrum"], res["simplex_cv"]
    lines = [f"{res['model']} embeddings {res['shape'][0]} x {res['shape'][1]}: value [null]",
             f"  row norm {res['norms']['mean']:.3f} +- {res['norms']['std']:.3f} "
             f"[{res['norms']['null_mean']:.3f} +- {res['norms']['null_std']:.3f}]",
             f"  pair cosine {c['mean']:.3f} +- {c['std']:.3f} [{c['null']['mean']:.3f} +- {c['null']['std']:.3f}], "
             f"anisotropy {c['anisotropy']:.3f} [{c['null']['anisotropy']:.3f}]",
             f"  participation ratio {s['participation_ratio']:.1f} [{s['null_participation_ratio']:.1f}]",
             f"  4-simplex volume CV {v['cv']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]; null with the same "
             f"covariance {v['null_same_covariance']:.3f}, isotropic Gaussian (exact) {v['null_isotropic_exact']:.3f}"]
    d = res["digits"]
    if "spearman_gap_cos" in d:
        lines.append(f"  digits: Spearman(|i-j|, cos) {d['spearman_gap_cos']:.3f} (permutation p {d['p_value']:.4f}); "
                     f"adjacent cos {d['adjacent_cos']:.3f} vs non-adjacent {d['nonadjacent_cos']:.3f}")
    else:
        lines.append(f"  digits: {d['skipped']}")
    for cat, r in res["categories"].items():
        lines.append(f"  {cat:10s} n={r['n']:2d}: within cos {r['within_cos']:.3f} vs random {r['random_mean']:.3f} "
                     f"(lift {r['lift']:+.3f}, z {r['z']:.1f})")
    dd = res["distances"]
    lines.append(f"  pair distance {dd['mean']:.3f} +- {dd['std']:.3f} (std/mean {dd['relative_std']:.3f}) "
                 f"[same RMS {dd['null']['mean']:.3f}, {dd['null']['relative_std']:.3f}; same covariance "
                 f"{dd['null_same_covariance']['mean']:.3f}, {dd['null_same_covariance']['relative_std']:.3f}]")
    if "special_tokens" in res:
        sp = res["special_tokens"]
        lines.append(f"  special tokens n={sp['n']}: within cos {sp['within_cos']:.3f} vs random {sp['random_mean']:.3f} "
                     f"(z {sp['z']:.1f}); norm {sp['norm_mean']:.3f} vs vocabulary {sp['vocabulary_norm_mean']:.3f}")
    if "centroids" in res:
        c = res["centroids"]
        lines.append(f"  category centroids: mean cosine between categories {c['mean_off_diagonal']:.3f} "
                     f"[random sets {c['null_mean_off_diagonal']:.3f}]")
    h = res["head"]
    if "procrustes_r2" in h:
        lines.append(f"  output head ({'tied' if h['tied'] else 'untied'}): per-token cos {h['row_cosine']['mean']:.3f} "
                     f"[shuffled {h['row_cosine']['null_shuffled_mean']:.3f}], Procrustes R^2 {h['procrustes_r2']:.3f} "
                     f"[{h['null_procrustes_r2']:.3f}], CKA {h['cka']:.3f} [{h['null_cka']:.3f}], PR "
                     f"{h['participation_ratio'][0]:.1f} / {h['participation_ratio'][1]:.1f}")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.4))
    axes = axes.ravel()
    s = res["spectrum"]
    ax = axes[0]
    ax.loglog(np.arange(1, len(s["eigenvalues"]) + 1), s["eigenvalues"], label="embeddings")
    ax.loglog(np.arange(1, len(s["null_eigenvalues"]) + 1), s["null_eigenvalues"], "k:", label="Gaussian, same RMS")
    ax.set_title(f"Eigenspectrum (PR {s['participation_ratio']:.0f} vs {s['null_participation_ratio']:.0f})")
    ax.set_xlabel("component")
    ax.legend(fontsize=7)
    ax = axes[1]
    d = res["digits"]
    if "cosine_matrix" in d:
        im = ax.imshow(np.array(d["cosine_matrix"]), cmap="viridis")
        ax.set_title(f"Digit cosines (Spearman |i-j| {d['spearman_gap_cos']:.2f}, p {d['p_value']:.3f})")
        ax.set_xticks(range(10))
        ax.set_yticks(range(10))
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[2]
    cats = res["categories"]
    ax.bar(range(len(cats)), [c["within_cos"] for c in cats.values()], label="within category")
    ax.plot(range(len(cats)), [c["random_mean"] for c in cats.values()], "k_", ms=20, mew=2, label="random sets")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(list(cats), rotation=45)
    ax.set_title("Semantic categories: mean cosine")
    ax.legend(fontsize=7)
    ax = axes[3]
    v = res["simplex_cv"]
    ax.bar([0, 1, 2], [v["cv"], v["null_same_covariance"], v["null_isotropic_exact"]],
           color=["C0", "grey", "lightgrey"])
    ax.errorbar([0], [v["cv"]], yerr=[[v["cv"] - v["ci"][0]], [v["ci"][1] - v["cv"]]], color="k")
    ax.set_xticks([0, 1, 2])
    ax.set_xticklabels(["embeddings", "Gaussian,\nsame cov.", "isotropic\n(exact)"])
    ax.set_title("4-simplex volume CV")
    ax = axes[4]
    for key, lab, col in (("", "embeddings", "C0"), ("null_same_covariance", "Gaussian, same cov.", "grey"),
                          ("null", "Gaussian, same RMS", "lightgrey")):
        h = res["distances"][key] if key else res["distances"]
        e = np.array(h["histogram"]["edges"])
        ax.stairs(np.array(h["histogram"]["counts"]) / np.sum(h["histogram"]["counts"]), e, label=lab, color=col)
    ax.set_title("Euclidean distance of random token pairs")
    ax.set_xlabel("distance")
    ax.legend(fontsize=7)
    ax = axes[5]
    if "centroids" in res:
        c = res["centroids"]
        im = ax.imshow(np.array(c["matrix"]), cmap="viridis")
        ax.set_xticks(range(len(c["names"])))
        ax.set_xticklabels(c["names"], rotation=45, fontsize=7)
        ax.set_yticks(range(len(c["names"])))
        ax.set_yticklabels(c["names"], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"Category centroid cosines (random sets: {c['null_mean_off_diagonal']:.2f})")
    ax = axes[6]
    h = res["head"]
    if "procrustes_r2" in h:
        vals = [h["row_cosine"]["mean"], h["procrustes_r2"], h["cka"]]
        nulls = [h["row_cosine"]["null_shuffled_mean"], h["null_procrustes_r2"], h["null_cka"]]
        ax.bar(np.arange(3) - 0.2, vals, 0.4, label="input embedding vs output head")
        ax.bar(np.arange(3) + 0.2, nulls, 0.4, color="grey", label="tokens shuffled")
        ax.set_xticks(range(3))
        ax.set_xticklabels(["per-token cos", "Procrustes R^2", "linear CKA"])
        ax.set_title(f"Output head ({'tied' if h['tied'] else 'untied'})")
        ax.legend(fontsize=7)
    axes[7].axis("off")
    fig.suptitle(f"Embedding geometry of {res['model']}")
    return save_figure(fig, path, dpi=100)


def build_parser() -> Parser:
    p = Parser(prog="python -m terrain.embeddings", description="Embedding-matrix geometry beside nulls.")
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                   help="model names, local folders or .gguf files (see terrain/models.py): minilm = the offline all-MiniLM-L6-v2 (default), smollm2 = SmolLM2-135M-Instruct after `make models`")
    p.add_argument("--n-simplices", type=at_least(2), default=4000,
                   help="4-simplices sampled for the volume CV (a spread needs at least 2)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the sampled items and the nulls")
    add_output_flags(p)
    return p


@safeio.one_line_errors(TerrainError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    code, _, written = run_for_models(args, "embeddings", lambda n: probe(n, args.seed, args.n_simplices),
                                      format_summary, plot)
    if written:
        print("wrote " + ", ".join(written))
    return code


if __name__ == "__main__":
    sys.exit(main())
