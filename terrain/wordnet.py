"""WordNet relational alignment of a model's representations, and its stability over seeds.

    python -m terrain.wordnet                                  # offline MiniLM, 50 seeds
    python -m terrain.wordnet --model t5-small --layer -1 --sense-policy first-seen --simulate-root

Items: WordNet 3.0 lemmas that are one token of the model's vocabulary, one item per token,
with the sense chosen by --sense-policy and a definition longer than 10 characters:
  most-frequent  the sense with the largest tagged-corpus count of that lemma (cntlist),
                 ties to WordNet's own sense order (default);
  noun           the same among noun senses only (the noun taxonomy has one root);
  first-seen     the first synset met in wn.all_synsets() order, as the original code did.
Representations: static (the token's row of the input embedding) and contextual (the
definition through the model, mean-pooled over its tokens at --layer; T5-style
encoder-decoders get the "summarize: " prefix and only their encoder runs).

Per seed (--seeds, default 50), on --n-items items and --n-pairs random pairs among them:
Pearson and Spearman of WordNet similarity (path and Wu-Palmer, computed exactly as nltk
does, terrain/taxonomy.py) with cosine, static and contextual; mean cosine by discrete
path distance (bands that hold pairs); hypernym decay: cosine between an item and each
item that is its WordNet ancestor, by true hypernym distance, beside the random-pair mean;
lexicographer-file clustering (within-file cosine against random sets); 4-simplex volume
CV beside the exact Gaussian value. Seed 0 also gets Mantel permutation p-values (item
labels of the cosine matrix shuffled) and the figures. Without --simulate-root only pairs
joined in the taxonomy count (nouns with nouns, verbs of one tree); with it (nltk's default
and the original code's) every adjective or adverb pair scores path 1/3, whatever the words.
Items whose static or contextual vector has zero norm (no direction, no cosine) are left out
and counted ("rows_left_out"); representations holding NaN or inf are not analysed (one line).
"""
from __future__ import annotations

import sys
import time

import numpy as np
from scipy.stats import rankdata

import safeio
from cliargs import Parser, any_number, at_least
from terrain import metrics as M
from terrain.embeddings import category_lift
from terrain.metrics import unit
from plotting import save_figure
from statsutil import gaussian_null, pearson, spearman
from terrain.models import (DEFAULT_MODEL, TerrainError, check_finite, check_token_ids, load_model, load_tokenizer,
                            model_device)
from terrain.taxonomy import Taxonomy
from terrain.cli import add_model_flags, add_output_flags, resolve_device, run_for_models

POLICIES = ("most-frequent", "noun", "first-seen")
SIMS = ("path", "wup")
REPS = ("static", "contextual")


def load_wordnet():
    """nltk's WordNet reader, or one clear error naming the fix."""
    try:
        from nltk.corpus import wordnet as wn
        wn.ensure_loaded()
        if not wn.get_version().startswith("3.0"):
            raise TerrainError(f"WordNet {wn.get_version()} found; this stage expects 3.0")
        return wn
    except LookupError as e:
        raise TerrainError("WordNet 3.0 is not readable by nltk: run `make setup` (it installs Debian's "
                           "wordnet-base + wordnet-sense-index and builds .venv/nltk_data via "
                           "scripts/setup_wordnet.py), or install nltk's wordnet corpus") from e


# ----------------------------------------------------------------------------- items

_ITEMS: dict = {}


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's class, vocabulary and behaviour on a probe (case, accents, spaces)."""
    import hashlib
    h = hashlib.sha1(type(tokenizer).__name__.encode())
    h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(tokenizer(["Dog CAT", " naïve  x-ray"], add_special_tokens=False)["input_ids"]).encode())
    return h.hexdigest()


def match_items(wn, tokenizer, policy: str = "most-frequent", min_definition: int = 10) -> list[dict]:
    """WordNet items whose lemma is a single token, one per token id (see the module doc).
    Remembered per WordNet reader, tokenizer (by its fingerprint) and policy within a process."""
    if policy not in POLICIES:
        raise TerrainError(f"unknown sense policy {policy!r}; choose from {', '.join(POLICIES)}")
    key = (id(wn), tokenizer_fingerprint(tokenizer), policy, min_definition)
    if key not in _ITEMS:
        _ITEMS[key] = (wn, _match_items(wn, tokenizer, policy, min_definition))  # wn kept: its id stays unique
    return [dict(it) for it in _ITEMS[key][1]]


def _match_items(wn, tokenizer, policy: str, min_definition: int) -> list[dict]:
    names = sorted(n for n in wn.all_lemma_names() if "_" not in n)
    ids = tokenizer([n for n in names], add_special_tokens=False)["input_ids"]
    single = {n: t[0] for n, t in zip(names, ids) if len(t) == 1}
    items: dict[int, dict] = {}
    if policy == "first-seen":
        for syn in wn.all_synsets():
            if len(syn.definition()) <= min_definition:
                continue
            for lem in syn.lemmas():
                tid = single.get(lem.name())
                if tid is not None and tid not in items:
                    items[tid] = _item(lem.name(), tid, syn, lem.count())
        return sorted(items.values(), key=lambda x: x["token_id"])
    for name, tid in single.items():
        best = None
        for rank, syn in enumerate(wn.synsets(name, pos="n" if policy == "noun" else None)):
            if len(syn.definition()) <= min_definition:
                continue
            count = sum(lem.count() for lem in syn.lemmas() if lem.name().lower() == name)
            if best is None or count > best[0]:
                best = (count, syn)
        if best is None:
            continue
        prev = items.get(tid)
        if prev is None or best[0] > prev["count"]:
            items[tid] = _item(name, tid, best[1], best[0])
    return sorted(items.values(), key=lambda x: x["token_id"])


def _item(lemma, tid, syn, count):
    return {"lemma": lemma, "token_id": int(tid), "synset": syn.name(), "pos": syn.pos(),
            "lexname": syn.lexname(), "definition": syn.definition(), "count": int(count)}


# ----------------------------------------------------------------------------- representations

def encode_texts(model, tokenizer, config, texts: list[str], layer: int = -1, pooling: str = "mean",
                 batch_size: int = 64, max_length: int = 128, device: str = "cpu",
                 progress: bool = True) -> np.ndarray:
    """Pooled hidden state of each text at `layer` (hidden_states index: 0 = embeddings,
    -1 = last). Encoder-decoders: only the encoder, inputs prefixed with "summarize: "."""
    import torch
    from tqdm import tqdm
    if pooling not in ("mean", "first"):
        raise TerrainError(f"unknown pooling {pooling!r} (mean or first)")
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    net = model.get_encoder() if encoder_decoder else model
    if encoder_decoder:
        texts = ["summarize: " + t for t in texts]
    n_states = getattr(config, "num_layers", None) or getattr(config, "num_hidden_layers", None)
    if n_states is not None and not -(n_states + 1) <= layer <= n_states:
        raise TerrainError(f"--layer {layer} out of range for a model with {n_states} layers "
                           f"(0 = embeddings .. {n_states}, or negative from the end)")
    if getattr(model, "hf_device_map", None) is None:  # a device_map has placed the weights already
        net = net.to(device)
    device = model_device(net)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = None
    bar = tqdm(range(0, len(texts), batch_size), desc="encoding definitions", disable=not progress,
               leave=False)
    with torch.inference_mode():
        for start in bar:
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
            check_token_ids(enc["input_ids"], model, getattr(config, "name_or_path", None))
            kw = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            hs = net(**kw, output_hidden_states=True).hidden_states[layer].float()
            if pooling == "mean":
                m = enc["attention_mask"].unsqueeze(-1).to(hs.dtype)
                pooled = (hs * m).sum(1) / m.sum(1)
            else:
                pooled = hs[:, 0]
            if out is None:
                out = np.zeros((len(texts), pooled.shape[1]), np.float32)
            out[idx] = pooled.cpu().numpy()
    return check_finite(out, "the pooled hidden states")


# ----------------------------------------------------------------------------- statistics

def mantel(sim: np.ndarray, C: np.ndarray, pi: np.ndarray, pj: np.ndarray, n_perm: int,
           rng: np.random.Generator) -> dict:
    """Permutation test of corr(sim, C[pi, pj]) with the item labels of C shuffled.
    Pearson on values and on ranks (C ranked over the whole upper triangle)."""
    n = len(C)
    iu = np.triu_indices(n, 1)
    R = np.zeros_like(C)
    R[iu] = rankdata(C[iu])
    R = R + R.T
    rs = rankdata(sim)
    obs = {"pearson": pearson(sim, C[pi, pj]), "spearman": pearson(rs, R[pi, pj])}
    null = {k: np.empty(n_perm) for k in obs}
    for b in range(n_perm):
        p = rng.permutation(n)
        null["pearson"][b] = pearson(sim, C[p[pi], p[pj]])
        null["spearman"][b] = pearson(rs, R[p[pi], p[pj]])
    return {k: {"p_value": float((1 + np.sum(np.abs(null[k]) >= abs(obs[k]))) / (1 + n_perm)),
                "null_mean": float(null[k].mean()), "null_std": float(null[k].std()),
                "z": float((obs[k] - null[k].mean()) / max(null[k].std(), 1e-12))} for k in obs}


def distance_bands(dist: np.ndarray, cos: dict[str, np.ndarray], min_pairs: int = 10) -> list[dict]:
    """Mean cosine per discrete path distance, keeping distances with at least min_pairs pairs."""
    ok = np.isfinite(dist)
    d = dist[ok].astype(int)
    rows = []
    for k in np.unique(d):
        sel = d == k
        if sel.sum() >= min_pairs:
            rows.append({"distance": int(k), "path_similarity": 1.0 / (k + 1), "n": int(sel.sum()),
                         **{f"{r}_cos": float(c[ok][sel].mean()) for r, c in cos.items()}})
    return rows


def hypernym_pairs(tax: Taxonomy) -> np.ndarray:
    """(item, ancestor item, true hypernym distance >= 1) for every item whose ancestor is
    itself an item's synset."""
    by_node: dict[int, list[int]] = {}
    for j, a in enumerate(tax.item_node):
        by_node.setdefault(int(a), []).append(j)
    rows = [(i, j, d) for i, m in enumerate(tax.maps) for a, d in m.items() if d >= 1
            for j in by_node.get(a, [])]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def hypernym_decay(triples: np.ndarray, U: dict[str, np.ndarray], max_depth: int = 8,
                   min_pairs: int = 5) -> list[dict]:
    rows = []
    for k in range(1, max_depth + 1):
        t = triples[triples[:, 2] == k]
        if len(t) >= min_pairs:
            rows.append({"depth": k, "n": int(len(t)),
                         **{f"{r}_cos": float(np.mean(np.sum(u[t[:, 0]] * u[t[:, 1]], 1))) for r, u in U.items()}})
    return rows


def lexname_clustering(lexnames: np.ndarray, X: dict[str, np.ndarray], pool: np.ndarray, rng,
                       min_items: int = 10, n_random: int = 100) -> list[dict]:
    rows = []
    for lex in sorted(set(lexnames[pool])):
        members = pool[lexnames[pool] == lex]
        if len(members) < min_items:
            continue
        row = {"lexname": str(lex), "n": int(len(members))}
        for r, E in X.items():
            c = category_lift(E, list(members), pool, n_random, rng)
            row[f"{r}_lift"], row[f"{r}_z"] = c["lift"], c["z"]
        rows.append(row)
    return rows


def seed_battery(seed: int, tax: Taxonomy, X: dict[str, np.ndarray], lexnames: np.ndarray,
                 triples: np.ndarray, *, n_items: int, n_pairs: int, n_simplices: int, simulate_root: bool,
                 n_perm: int = 0, detail: bool = False, U: dict[str, np.ndarray] | None = None) -> dict:
    """One seed: sample items and pairs, compare WordNet similarity with cosine. U: the rows of X
    normalised, when the caller has them (computed here otherwise)."""
    rng = np.random.default_rng(seed)
    N = len(tax.maps)
    sample = np.sort(rng.choice(N, size=min(n_items, N), replace=False))
    S = tax.similarities(sample, simulate_root)
    n = len(sample)
    pi, pj = rng.integers(0, n, n_pairs), rng.integers(0, n, n_pairs)
    keep = pi != pj
    pi, pj = pi[keep], pj[keep]
    U = {r: unit(x) for r, x in X.items()} if U is None else U
    C = {r: u[sample] @ u[sample].T for r, u in U.items()}
    cos = {r: c[pi, pj] for r, c in C.items()}
    res: dict = {"seed": seed, "n_items": int(n), "n_pairs": int(len(pi))}
    for s in SIMS:
        v = S[s][pi, pj]
        ok = np.isfinite(v)
        res[f"{s}_defined_pairs"] = int(ok.sum())
        for r in REPS:
            res[f"{s}_{r}_pearson"] = pearson(v[ok], cos[r][ok])
            res[f"{s}_{r}_spearman"] = spearman(v[ok], cos[r][ok])
            if n_perm:
                res[f"{s}_{r}_mantel"] = mantel(v[ok], C[r], pi[ok], pj[ok], n_perm, rng)
    dist = S["distance"][pi, pj]
    near, far = dist <= 3, dist >= 10
    for r in REPS:
        res[f"random_pair_{r}_cos"] = float(cos[r].mean())
        res[f"defined_pair_{r}_cos"] = float(cos[r][np.isfinite(dist)].mean())
        res[f"near_{r}_cos"] = float(cos[r][near].mean()) if near.any() else float("nan")
        res[f"far_{r}_cos"] = float(cos[r][far].mean()) if far.any() else float("nan")
        res[f"near_minus_far_{r}"] = res[f"near_{r}_cos"] - res[f"far_{r}_cos"]
        vol = M.sample_simplex_volumes(X[r][sample].astype(np.float64), 4, n_simplices, rng)
        res[f"simplex_cv_{r}"] = M.coefficient_of_variation(vol)
    in_sample = np.zeros(N, bool)
    in_sample[sample] = True
    decay = hypernym_decay(triples[in_sample[triples[:, 0]]], U)
    for row in decay:
        if row["depth"] in (1, 3, 5):
            for r in REPS:
                res[f"hypernym_d{row['depth']}_{r}_cos"] = row[f"{r}_cos"]
    lex = lexname_clustering(lexnames, X, sample, rng, n_random=30 if not detail else 200)
    for r in REPS:
        lifts = np.array([x[f"{r}_lift"] for x in lex])
        res[f"lexname_mean_lift_{r}"] = float(lifts.mean()) if len(lifts) else float("nan")
        res[f"lexname_share_z_over_3_{r}"] = float(np.mean([x[f"{r}_z"] > 3 for x in lex])) if lex else float("nan")
    if detail:
        res["bands"] = distance_bands(dist, cos)
        res["hypernym_decay"] = decay
        res["lexnames"] = lex
        d = X["static"].shape[1], X["contextual"].shape[1]
        res["simplex_cv_null_exact"] = {"static": M.gaussian_volume_cv(4, d[0]),
                                        "contextual": M.gaussian_volume_cv(4, d[1])}
        res["simplex_cv_null_same_covariance"] = {}
        for r in REPS:
            Y = X[r][sample].astype(np.float64)
            G = gaussian_null(Y, rng)
            res["simplex_cv_null_same_covariance"][r] = M.coefficient_of_variation(
                M.sample_simplex_volumes(G, 4, n_simplices, rng))
        sub = rng.choice(len(pi), size=min(20000, len(pi)), replace=False)
        res["scatter"] = {s: S[s][pi[sub], pj[sub]].tolist() for s in SIMS}
        res["scatter"].update({r: cos[r][sub].tolist() for r in REPS})
    return res


def stability(runs: list[dict]) -> dict:
    """mean, std, min, max over seeds of every scalar statistic."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and k not in ("seed",)]
    out = {}
    for k in keys:
        v = np.array([r[k] for r in runs if k in r], dtype=float)
        v = v[np.isfinite(v)]
        if len(v):
            out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                      "min": float(v.min()), "max": float(v.max()), "n_seeds": int(len(v))}
    return out


# ----------------------------------------------------------------------------- driver

def analyse(name: str | None, *, policy: str = "most-frequent", layer: int = -1, pooling: str = "mean",
            seeds: int = 50, n_items: int = 2000, n_pairs: int = 200_000, n_simplices: int = 500,
            n_perm: int = 200, simulate_root: bool = False, max_items: int | None = None,
            batch_size: int = 64, device: str = "cpu", progress: bool = True, dtype: str = "float32") -> dict:
    from tqdm import tqdm
    timings = {}
    t = time.perf_counter()
    wn = load_wordnet()
    model, config = load_model(name, dtype, device, part="encoder")  # an encoder-decoder's decoder is not read
    tok = load_tokenizer(name)
    items = match_items(wn, tok, policy)
    if max_items and len(items) > max_items:
        keep = np.sort(np.random.default_rng(0).choice(len(items), max_items, replace=False))
        items = [items[i] for i in keep]
    if len(items) < 20:
        raise TerrainError(f"only {len(items)} WordNet lemmas are single tokens of {name or DEFAULT_MODEL}")
    timings["match_s"] = time.perf_counter() - t
    t = time.perf_counter()
    emb = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    items = [it for it in items if it["token_id"] < len(emb)]   # a tokenizer larger than the embedding
    X = {"static": check_finite(emb[[it["token_id"] for it in items]], "the static (embedding) vectors"),
         "contextual": encode_texts(model, tok, config, [it["definition"] for it in items], layer, pooling,
                                    batch_size, device=device, progress=progress)}
    ok = np.ones(len(items), bool)
    for x in X.values():
        ok &= np.linalg.norm(x, axis=1) > 0             # a vector of zero norm has no direction: no cosine
    left = {"zero_norm": int((~ok).sum())} if not ok.all() else {}
    if left:
        items = [it for it, k in zip(items, ok) if k]
        X = {r: x[ok] for r, x in X.items()}
    if len(items) < 20:
        raise TerrainError(f"only {len(items)} WordNet items of {name or DEFAULT_MODEL} have vectors of nonzero norm")
    n_sample = min(n_items, len(items))
    safeio.check_fits(8 * n_sample ** 2 * 12 + 8 * n_pairs * 16, f"{n_sample} items and {n_pairs} pairs per seed",
                      "lower --n-items or --n-pairs")
    timings["encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tax = Taxonomy.from_synsets([wn.synset(it["synset"]) for it in items])
    triples = hypernym_pairs(tax)
    timings["taxonomy_s"] = time.perf_counter() - t
    lexnames = np.array([it["lexname"] for it in items])
    t = time.perf_counter()
    runs = []
    U = {r: unit(x) for r, x in X.items()}                    # once for all seeds
    for s in tqdm(range(seeds), desc="seeds", disable=not progress, leave=False):
        runs.append(seed_battery(s, tax, X, lexnames, triples, n_items=n_items, n_pairs=n_pairs,
                                 n_simplices=n_simplices, simulate_root=simulate_root,
                                 n_perm=n_perm if s == 0 else 0, detail=s == 0, U=U))
    timings["seeds_s"] = time.perf_counter() - t
    pos = {p: int(sum(it["pos"] == p for it in items)) for p in sorted({it["pos"] for it in items})}
    per_static = np.sum(unit(X["static"]) * unit(X["contextual"]), 1) if X["static"].shape[1] == \
        X["contextual"].shape[1] else None
    return {"model": name or DEFAULT_MODEL, "sense_policy": policy, "layer": layer, "pooling": pooling,
            "simulate_root": simulate_root, "n_matched": len(items), "pos_counts": pos,
            **({"rows_left_out": left} if left else {}),
            "n_hypernym_pairs": int(len(triples)),
            "static_contextual_cos": None if per_static is None else
            {"mean": float(per_static.mean()), "std": float(per_static.std())},
            "examples": items[:5], "seed0": runs[0], "stability": stability(runs),
            "per_seed": [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in runs],
            "settings": {"seeds": seeds, "n_items": n_items, "n_pairs": n_pairs, "n_simplices": n_simplices,
                         "n_perm": n_perm, "max_items": max_items},
            "timings": timings}


def format_summary(res: dict) -> str:
    s0, st = res["seed0"], res["stability"]
    lines = [f"{res['model']}: {res['n_matched']} single-token WordNet items ({res['sense_policy']}; "
             f"POS {res['pos_counts']}), contextual = layer {res['layer']} {res['pooling']}-pooled definition; "
             f"simulate_root {res['simulate_root']}",
             f"relational correlation over {len(res['per_seed'])} seeds, mean +- std [min, max] "
             f"(seed 0 Mantel p, {res['settings']['n_perm']} permutations):"]
    for s in SIMS:
        for r in REPS:
            for c in ("pearson", "spearman"):
                k = f"{s}_{r}_{c}"
                m = s0.get(f"{s}_{r}_mantel", {}).get(c, {})
                p = f"  p = {m['p_value']:.3g}" if m else ""
                lines.append(f"  {s:4s} {r:10s} {c:8s} {st[k]['mean']:+.4f} +- {st[k]['std']:.4f} "
                             f"[{st[k]['min']:+.4f}, {st[k]['max']:+.4f}]{p}")
    lines.append("distance bands (seed 0): distance n static_cos contextual_cos")
    for b in s0["bands"]:
        lines.append(f"  {b['distance']:3d} {b['n']:7d} {b['static_cos']:.4f} {b['contextual_cos']:.4f}")
    lines.append(f"  all joined pairs {s0['defined_pair_static_cos']:.4f} {s0['defined_pair_contextual_cos']:.4f}; "
                 f"all random pairs {s0['random_pair_static_cos']:.4f} {s0['random_pair_contextual_cos']:.4f}")
    lines.append("hypernym decay (seed 0): depth n static_cos contextual_cos")
    for b in s0["hypernym_decay"]:
        lines.append(f"  {b['depth']:3d} {b['n']:7d} {b['static_cos']:.4f} {b['contextual_cos']:.4f}")
    for r in REPS:
        k = f"simplex_cv_{r}"
        lines.append(f"simplex CV {r}: {st[k]['mean']:.3f} +- {st[k]['std']:.3f} (exact isotropic Gaussian "
                     f"{s0['simplex_cv_null_exact'][r]:.3f}, Gaussian of the same covariance "
                     f"{s0['simplex_cv_null_same_covariance'][r]:.3f})")
        k = f"lexname_mean_lift_{r}"
        lines.append(f"lexname within-file lift {r}: {st[k]['mean']:+.4f} +- {st[k]['std']:.4f}; share of files "
                     f"with z > 3: {st[f'lexname_share_z_over_3_{r}']['mean']:.2f}")
    tm = res["timings"]
    lines.append("time: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in tm.items()))
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    s0 = res["seed0"]
    colors = {"static": "tab:blue", "contextual": "tab:red"}
    fig, ax = plt.subplots(2, 3, figsize=(17, 9.5))
    for c, r in enumerate(REPS):
        a = ax[0, c]
        x, y = np.array(s0["scatter"]["wup"], float), np.array(s0["scatter"][r])
        ok = np.isfinite(x)
        a.hexbin(x[ok], y[ok], gridsize=40, bins="log", cmap="viridis")
        a.set_xlabel("Wu-Palmer similarity")
        a.set_ylabel(f"{r} cosine")
        a.set_title(f"{r}: Pearson {s0[f'wup_{r}_pearson']:+.3f}, Spearman {s0[f'wup_{r}_spearman']:+.3f}")
    for a, rows, key, base, marker, xlabel, title in (
            (ax[0, 2], s0["bands"], "distance", "defined_pair", "o", "WordNet path distance (edges)",
             "cosine by path distance (dotted: all joined pairs)"),
            (ax[1, 0], s0["hypernym_decay"], "depth", "random_pair", "s",
             "true hypernym distance to the ancestor item", "hypernym decay (dotted: random pairs)")):
        for r in REPS:
            a.plot([x[key] for x in rows], [x[f"{r}_cos"] for x in rows], marker + "-", color=colors[r], label=r)
            a.axhline(s0[f"{base}_{r}_cos"], color=colors[r], ls=":", lw=1)
        a.set_xlabel(xlabel)
        a.set_ylabel("mean cosine")
        a.set_title(title)
        a.legend()
    a = ax[1, 1]
    lex = sorted(s0["lexnames"], key=lambda x: -x["n"])[:18]
    y = np.arange(len(lex))
    for k, r in enumerate(REPS):
        a.barh(y + (k - 0.5) * 0.38, [x[f"{r}_lift"] for x in lex], 0.38, color=colors[r], label=r)
    a.set_yticks(y)
    a.set_yticklabels([f"{x['lexname']} ({x['n']})" for x in lex], fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("within-file cosine minus random sets")
    a.set_title("lexicographer-file clustering (seed 0)")
    a.legend()
    a = ax[1, 2]
    keys = [f"{s}_{r}_{c}" for s in SIMS for r in REPS for c in ("pearson", "spearman")]
    vals = [[p[k] for p in res["per_seed"]] for k in keys]
    a.boxplot(vals, orientation="horizontal")
    a.set_yticks(range(1, len(keys) + 1))
    a.set_yticklabels([k.replace("_", " ") for k in keys], fontsize=8)
    a.axvline(0, color="grey", lw=0.8)
    a.set_title(f"stability over {len(res['per_seed'])} seeds")
    fig.suptitle(f"{res['model']}: WordNet relational alignment ({res['n_matched']} items, "
                 f"{res['sense_policy']} sense, simulate_root {res['simulate_root']})")
    return save_figure(fig, path)


def write_tables(res: dict, base: str, target=lambda p: p) -> list[str]:
    """<base>_stability.csv: mean, std, min, max over seeds of every statistic (atomically; target
    records the path among the stage's outputs before it is written)."""
    path = base + "_stability.csv"
    rows = [[k, v["mean"], v["std"], v["min"], v["max"], v["n_seeds"]] for k, v in res["stability"].items()]
    return [safeio.write_csv(target(path), ["statistic", "mean", "std", "min", "max", "n_seeds"], rows)]


def build_parser() -> Parser:
    p = Parser(prog="python -m terrain.wordnet",
               description="WordNet relational alignment of static and contextual representations, with multi-seed "
                           "stability.")
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                   help="model names, local folders or .gguf files (see terrain/models.py): minilm = the offline all-MiniLM-L6-v2 (default), smollm2 = SmolLM2-135M-Instruct after `make models`")
    p.add_argument("--sense-policy", choices=POLICIES, default="most-frequent",
                   help="the sense an item stands for: most-frequent (largest corpus count), noun (the same among noun "
                        "senses), first-seen (first in wn.all_synsets() order, as the original code)")
    p.add_argument("--layer", type=any_number(int), default=-1, help="hidden state index for the contextual "
                   "representation (0 = embedding output, -1 = last layer; negative ones count from the end)")
    p.add_argument("--pooling", choices=("mean", "first"), default="mean",
                   help="contextual representation of a multi-token word: mean of its tokens or its first")
    p.add_argument("--seeds", type=at_least(1), default=50, help="independent item/pair samples (for the stability)")
    p.add_argument("--n-items", type=at_least(5), default=2000, help="items sampled per seed (a 4-simplex needs 5)")
    p.add_argument("--n-pairs", type=at_least(1), default=200_000, help="random pairs per seed")
    p.add_argument("--n-simplices", type=at_least(2), default=500,
                   help="4-simplices for the volume CV (a spread needs at least 2)")
    p.add_argument("--n-perm", type=at_least(0), default=200, help="Mantel permutations (seed 0); 0: none")
    p.add_argument("--simulate-root", action="store_true",
                   help="nltk's fake root joining all taxonomies (adjective pairs then all score path 1/3)")
    p.add_argument("--max-items", type=at_least(5), default=None,
                   help="use at most this many matched items (default: all)")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="definitions encoded per forward pass")
    add_model_flags(p)
    add_output_flags(p)
    return p


@safeio.one_line_errors(TerrainError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def compute(name):
        return analyse(name, policy=args.sense_policy, layer=args.layer, pooling=args.pooling, seeds=args.seeds,
                       n_items=args.n_items, n_pairs=args.n_pairs, n_simplices=args.n_simplices, n_perm=args.n_perm,
                       simulate_root=args.simulate_root, max_items=args.max_items, batch_size=args.batch_size,
                       device=resolve_device(args.device), dtype=args.dtype)

    code, results, written = run_for_models(args, "wordnet", compute, format_summary, plot, tables=write_tables)
    if written:
        print("wrote " + ", ".join(written))
    return code


if __name__ == "__main__":
    sys.exit(main())
