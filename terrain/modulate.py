"""LERP residual modulator: inject WordNet geometry into a frozen encoder's residual stream.

    python -m terrain.modulate                      # MiniLM, all layers, alpha sweep with controls
    python -m terrain.modulate --layers 0,1,2 --geo-dim 32 --alphas 0.05 0.29154

Before each chosen encoder block the residual stream h of a token that has a WordNet
vector becomes (1 - alpha_l) h + alpha_l g, with g = proj(geo[token]) and alpha_l =
sigmoid(logit_l). The modulator attaches to the model's own blocks with forward pre-hooks
(BERT-style `encoder.layer`, T5-style `block`), so the model's code runs unchanged, and
alpha = 0 gives the unmodulated model exactly. Tokens without a WordNet item have a zero
vector and are left untouched (masked), not nudged towards the origin.

Initialisation from WordNet alone, fit on anchor items only:
  1. Wu-Palmer similarity among the anchors -> distance 1 - wup -> classical MDS to --geo-dim;
  2. every other item is placed by landmark MDS from its Wu-Palmer similarity to the anchors;
  3. orthogonal Procrustes rotates the anchors' MDS coordinates onto the top --geo-dim
     principal components of the anchors' residual states at the first modulated layer
     (each token alone between special tokens); proj maps those components back into the
     residual stream, scaled to the states' RMS norm.
`--train` trains a modulator with the model frozen (`--modulator lerp` or `field`, the
simplex-expert gates of terrain/field.py); see `train`.
Evaluation uses items disjoint from the anchors: their definitions' pooled last-layer
states, unmodulated and modulated, compared with WordNet (Pearson / Spearman of cosine with
Wu-Palmer, near-minus-far cosine, 4-simplex CV) and with the unmodulated states
(preservation: mean per-item cosine). Two controls per alpha: the geometric rows shuffled
among items, and the Procrustes rotation replaced by a random one.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn as nn

import safeio
from cliargs import SEED, Parser, at_least, between, non_negative, positive
from plotting import save_figure
from statsutil import pearson, spearman
from terrain import metrics as M
from terrain import talk as T
from terrain.cli import add_model_flags, add_output_flags, resolve_device, run_for_models
from terrain.field import FieldModulator, cv_health
from terrain.hooks import HookedModulator, encoder_blocks  # noqa: F401 (encoder_blocks: also used as MD.encoder_blocks)
from terrain.models import DEFAULT_MODEL, TerrainError, load_model, load_tokenizer, model_device
from terrain.project import procrustes, special_template, token_states
from terrain.taxonomy import Taxonomy
from terrain.talk import (converse, format_answers, read_prompts, require_generative, summarise,
                          summary_table)
from terrain.wordnet import distance_bands, encode_texts, load_wordnet, match_items

NAMED_ALPHA = 0.29154
DEFAULT_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.2, NAMED_ALPHA, 0.5)


class LerpModulator(HookedModulator):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, geo_dim: int = 64, alpha: float = 0.01):
        super().__init__()
        self.geo = nn.Embedding(vocab_size, geo_dim)
        nn.init.zeros_(self.geo.weight)
        self.proj = nn.Linear(geo_dim, d_model, bias=False)
        nn.init.normal_(self.proj.weight, std=0.01)
        self.alpha_logit = nn.Parameter(torch.full((n_layers,), math.log(alpha / (1 - alpha))))
        self.register_buffer("has_geo", torch.zeros(vocab_size, dtype=torch.bool))

    def n_slots(self) -> int:
        return len(self.alpha_logit)

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha_logit)

    def set_alpha(self, value: float | list[float]) -> None:
        v = torch.as_tensor(value, dtype=self.alpha_logit.dtype).expand_as(self.alpha_logit)
        with torch.no_grad():
            self.alpha_logit.copy_(torch.logit(v))          # alpha 0 -> logit -inf -> sigmoid exactly 0

    def set_vectors(self, token_ids: np.ndarray, vectors: np.ndarray) -> None:
        with torch.no_grad():
            self.geo.weight.zero_()
            self.has_geo.zero_()
            dev = self.geo.weight.device
            ids = torch.as_tensor(token_ids, dtype=torch.long, device=dev)
            self.geo.weight[ids] = torch.as_tensor(vectors, dtype=self.geo.weight.dtype, device=dev)
            self.has_geo[ids] = True

    def transform(self, h: torch.Tensor, k: int) -> torch.Tensor:
        ids = self._ids
        if ids is None or ids.shape != h.shape[:2]:
            return h
        a = self.alpha[k].to(h.dtype)
        g = self.proj(self.geo(ids)).to(h.dtype)
        mixed = (1 - a) * h + a * g
        return torch.where(self.has_geo[ids].unsqueeze(-1), mixed, h)


# ----------------------------------------------------------------------------- WordNet geometry

def classical_mds(D: np.ndarray, k: int) -> tuple[np.ndarray, dict]:
    """Coordinates (n, k) whose distances approximate D, and what landmark MDS needs."""
    n = len(D)
    D2 = D ** 2
    J = np.eye(n) - 1.0 / n
    lam, V = np.linalg.eigh(-0.5 * J @ D2 @ J)
    o = np.argsort(lam)[::-1][:k]
    lam, V = np.maximum(lam[o], 1e-12), V[:, o]
    return V * np.sqrt(lam), {"pinv": V / np.sqrt(lam), "mean_sq": D2.mean(0), "eigenvalues": lam}


def landmark_mds(D_new: np.ndarray, fit: dict) -> np.ndarray:
    """Place new points from their distances to the landmarks (de Silva & Tenenbaum)."""
    return -0.5 * (D_new ** 2 - fit["mean_sq"]) @ fit["pinv"]


def wup_distance(S: np.ndarray) -> np.ndarray:
    """1 - Wu-Palmer; pairs WordNet does not join count as maximally distant."""
    return 1.0 - np.nan_to_num(S, nan=0.0)


def wordnet_coordinates(anchors: np.ndarray, others: np.ndarray, H_anchor: np.ndarray, geo_dim: int,
                        tax: Taxonomy) -> dict:
    """Everything of the initialisation that does not depend on the rotation: MDS coordinates of
    the anchors and landmark-MDS coordinates of the other items from Wu-Palmer, and the top
    principal directions of the anchors' residual states."""
    S = tax.similarities(np.concatenate([anchors, others]), simulate_root=False)["wup"]
    na = len(anchors)
    Da = wup_distance(S[:na, :na])
    np.fill_diagonal(Da, 0.0)
    Ya, fit = classical_mds(Da, geo_dim)
    Yo = landmark_mds(wup_distance(S[na:, :na]), fit)
    Hc = H_anchor - H_anchor.mean(0)
    basis = np.linalg.svd(Hc, full_matrices=False)[2][:geo_dim]          # (geo, d_model)
    return {"Ya": Ya, "Yo": Yo, "basis": basis, "Pa": Hc @ basis.T, "eigenvalues": fit["eigenvalues"],
            "rms": np.sqrt(np.mean(np.sum(H_anchor ** 2, 1)))}


def rotated_geometry(co: dict, R: np.ndarray) -> dict:
    """Geometric vectors (anchors, then others) rotated by R, and the projection into the residual
    stream scaled to the anchors' RMS norm."""
    Ya = co["Ya"] @ R
    scale = co["rms"] / np.sqrt(np.mean(np.sum(Ya ** 2, 1)))
    return {"vectors": np.concatenate([Ya, co["Yo"] @ R]), "proj": (scale * co["basis"]).T,  # (d_model, geo)
            "mds_eigenvalues": co["eigenvalues"].tolist(), "scale": float(scale),
            "anchor_fit_cosine": float(np.mean(np.sum(M.unit(Ya) * M.unit(co["Pa"]), 1)))}


# ----------------------------------------------------------------------------- evaluation

def relational_scores(C: np.ndarray, S: dict, base: np.ndarray | None) -> dict:
    """C: (n, d) pooled states of the evaluation items; S: their WordNet matrices."""
    U = M.unit(C)
    i, j = np.triu_indices(len(C), 1)
    cos = (U @ U.T)[i, j]
    w = S["wup"][i, j]
    ok = np.isfinite(w)
    dist = S["distance"][i, j]
    out = {"wup_pearson": pearson(w[ok], cos[ok]),
           "wup_spearman": spearman(w[ok], cos[ok]),
           "near_minus_far": float(cos[dist <= 3].mean() - cos[dist >= 10].mean()),
           "simplex_cv": M.coefficient_of_variation(M.sample_simplex_volumes(C.astype(np.float64), 4, 2000,
                                                                             np.random.default_rng(0)))}
    if base is not None:
        out["preservation"] = float(np.mean(np.sum(U * M.unit(base), 1)))
    out["bands"] = distance_bands(dist, {"state": cos})
    return out


def split_items(n: int, n_anchors: int, n_eval: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint anchor, evaluation and training item indices."""
    order = np.random.default_rng(seed).permutation(n)
    if n_anchors + n_eval >= n:
        raise TerrainError(f"{n} items cannot hold {n_anchors} anchors and {n_eval} evaluation items")
    return order[:n_anchors], order[n_anchors:n_anchors + n_eval], order[n_anchors + n_eval:]


def prepare(name: str | None, layers: list[int] | None, geo_dim: int, n_anchors: int, n_eval: int, seed: int,
            *, n_train: int = 0, lm_head: bool = False, geometry: bool = True, dtype: str = "float32",
            device: str = "cpu", generate: bool = False):
    """Model (frozen), items split into anchors / evaluation / training and, with `geometry`,
    the WordNet geometry of anchors, evaluation and (n_train) training items (Procrustes and
    random rotation) with an unattached LERP modulator. lm_head: an encoder-decoder with its
    head (the encoder alone otherwise); generate: also a causal LM with its head."""
    from types import SimpleNamespace

    wn = load_wordnet()
    # loaded once: with the language-model head when it is trained through, else the encoder alone
    model, config = load_model(name, dtype, device, part="lm" if generate else "seq2seq" if lm_head else "encoder")
    dev = model_device(model)
    encoder = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
    for p in model.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(name)
    items = match_items(wn, tok, "noun")
    anchors, evals, train = split_items(len(items), n_anchors, n_eval, seed)
    n_reserved, train = len(train), train[:n_train]
    tax = Taxonomy.from_synsets([wn.synset(it["synset"]) for it in items])
    blocks = encoder_blocks(encoder)
    layers = list(range(len(blocks))) if layers is None else layers
    tid = np.array([it["token_id"] for it in items])
    rng = np.random.default_rng(seed)
    others = np.concatenate([evals, train])
    vocab_size, d_model = model.get_input_embeddings().weight.shape
    inits, mod = None, None
    if geometry and geo_dim > d_model:
        raise TerrainError(f"--geo-dim {geo_dim} exceeds the width {d_model} of {name or DEFAULT_MODEL}")
    if geometry:
        co = wordnet_coordinates(anchors, others, token_states(encoder, tok, tid[anchors], layers[0]), geo_dim, tax)
        inits = {"wordnet": rotated_geometry(co, procrustes(co["Ya"] - co["Ya"].mean(0), co["Pa"])[0]),
                 "random_rotation": rotated_geometry(co, np.linalg.qr(rng.standard_normal((geo_dim, geo_dim)))[0])}
        mod = LerpModulator(vocab_size, co["basis"].shape[1], len(layers), geo_dim).to(dev)
    defs = [items[i]["definition"] for i in evals]

    def encode(texts=defs):
        return encode_texts(encoder, tok, config, texts, -1, "mean", 64, device=str(dev), progress=False)

    return SimpleNamespace(n_reserved=n_reserved, d_model=d_model, model=model, config=config, encoder=encoder,
                           device=dev, tok=tok, items=items, anchors=anchors,
                           evals=evals, train=train, tax=tax, layers=layers, tid=tid, inits=inits, mod=mod, rng=rng,
                           ids=np.concatenate([tid[anchors], tid[others]]), encode=encode,
                           S_eval=tax.similarities(evals, simulate_root=False),
                           seq2seq=bool(getattr(config, "is_encoder_decoder", False)))


def load_geometry(c, init: dict, shuffle: bool = False) -> None:
    vec = init["vectors"][c.rng.permutation(len(c.ids))] if shuffle else init["vectors"]
    c.mod.set_vectors(c.ids, vec)
    with torch.no_grad():
        c.mod.proj.weight.copy_(torch.as_tensor(init["proj"], dtype=c.mod.proj.weight.dtype))


def talk(name: str | None = None, *, prompts: list[str] | None = None, n_prompts: int = 6, layers=None,
         geo_dim: int = 64, alphas=(0.01, 0.05, 0.1, 0.2, 0.5), n_anchors: int = 2000, n_eval: int = 800,
         seed: int = 0, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 0.9,
         sample_seed: int = 0, progress: bool = True, dtype: str = "float32", device: str = "cpu") -> dict:
    """The WordNet LERP modulator (as in the alpha sweep) talking at each alpha, beside the
    unmodulated model and the shuffled-rows control. Without prompts: the first n_prompts held-out
    definitions (with "summarize: " for encoder-decoders)."""
    require_generative(name)
    c = prepare(name, layers, geo_dim, n_anchors, n_eval, seed, generate=True, dtype=dtype, device=device)
    user = bool(prompts)
    if not user:
        prompts = [("summarize: " if c.seq2seq else "") + c.items[i]["definition"] for i in c.evals[:n_prompts]]
    conditions = []
    for a in alphas:
        conditions.append(("wordnet", a, lambda: load_geometry(c, c.inits["wordnet"])))
        conditions.append(("shuffled_rows", a, lambda: load_geometry(c, c.inits["wordnet"], shuffle=True)))
    res = {"model": name or DEFAULT_MODEL, "layers": c.layers, "geo_dim": geo_dim, "alphas": list(alphas),
           "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p if temperature > 0 else None,
           "sample_seed": sample_seed, "prompts_from": "the user" if user else "held-out definitions"}
    with c.mod.attached(c.encoder, c.layers):
        res["conversations"] = converse(c.model, c.tok, c.mod, prompts, conditions, max_new_tokens, temperature,
                                        top_p, sample_seed, progress)
    res["summary"] = summarise(res["conversations"])
    return res


def sweep(name: str | None = None, *, layers: list[int] | None = None, geo_dim: int = 64,
          alphas=DEFAULT_ALPHAS, n_anchors: int = 2000, n_eval: int = 800, seed: int = 0,
          progress: bool = True, dtype: str = "float32", device: str = "cpu") -> dict:
    c = prepare(name, layers, geo_dim, n_anchors, n_eval, seed, dtype=dtype, device=device)
    items, anchors, evals, inits, mod, S_eval = c.items, c.anchors, c.evals, c.inits, c.mod, c.S_eval
    layers, encode, encoder = c.layers, c.encode, c.encoder
    base = encode()
    res = {"model": name or DEFAULT_MODEL, "layers": layers, "geo_dim": geo_dim, "n_items": len(items),
           "n_anchors": len(anchors), "n_eval": len(evals), "n_train_reserved": c.n_reserved,
           "anchor_fit_cosine": inits["wordnet"]["anchor_fit_cosine"], "scale": inits["wordnet"]["scale"],
           "unmodulated": relational_scores(base, S_eval, None), "rows": []}
    conditions = {"wordnet": (inits["wordnet"], False), "shuffled_rows": (inits["wordnet"], True),
                  "random_rotation": (inits["random_rotation"], False)}
    from tqdm import tqdm
    bar = tqdm([(a, k) for a in alphas for k in conditions], desc="alpha sweep", disable=not progress, leave=False)
    mod.attach(encoder, layers)
    try:
        for a, cond in bar:
            load_geometry(c, *conditions[cond])
            mod.set_alpha(a)
            res["rows"].append({"alpha": a, "condition": cond, **relational_scores(encode(), S_eval, base)})
    finally:
        mod.detach()
    return res


def contrastive_loss(c, batch: np.ndarray, tau: float):
    """Encoder-only objective: each pooled (modulated) definition picks its own lemma's
    (modulated) token state among the batch's lemmas."""
    import torch.nn.functional as F
    enc = c.tok([c.items[i]["definition"] for i in batch], return_tensors="pt", padding=True, truncation=True,
                max_length=128).to(c.device)
    kw = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    h = c.encoder(**kw).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    q = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    template, pos = special_template(c.tok)
    lem = torch.tensor([template[:pos] + [int(c.tid[i])] + template[pos + 1:] for i in batch], device=c.device)
    k = F.normalize(c.encoder(input_ids=lem, attention_mask=torch.ones_like(lem)).last_hidden_state[:, pos], dim=-1)
    return F.cross_entropy((q @ k.T / tau).float(), torch.arange(len(batch), device=c.device))


def seq2seq_loss(c, batch: np.ndarray):
    """Encoder-decoder objective: "summarize: definition" -> lemma; the model shifts the labels
    right to make the decoder inputs (teacher forcing as in transformers)."""
    enc = c.tok(["summarize: " + c.items[i]["definition"] for i in batch], return_tensors="pt", padding=True,
                truncation=True, max_length=128).to(c.device)
    lab = c.tok([c.items[i]["lemma"] for i in batch], return_tensors="pt", padding=True)["input_ids"].to(c.device)
    lab = lab.masked_fill(lab == c.tok.pad_token_id, -100)
    return c.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=lab).loss


def train(name: str | None = None, *, layers: list[int] | None = None, geo_dim: int = 64, alpha: float = 0.01,
          epochs: int = 3, n_train: int = 2000, batch_size: int = 32, lr: float = 1e-3, tau: float = 0.05,
          n_anchors: int = 2000, n_eval: int = 800, seed: int = 0, progress: bool = True,
          kind: str = "lerp", dtype: str = "float32", device: str = "cpu", talk: dict | None = None,
          grad_scale: float | None = None, early_stop: dict | None = None) -> dict:
    """Train a modulator with the model frozen. lerp: geometric rows (anchors and training
    items), projection and alphas; evaluation items keep their WordNet placement (their rows
    get no gradient). field: the simplex experts' deformation, gate and validity heads and
    the per-layer, per-expert alphas (terrain/field.py). Encoder-decoders then answer held-out
    definitions (talk["n_prompts"], default 4, or talk["prompts"]) with and without the trained
    modulator (terrain/talk.py; talk's other keys: max_new_tokens, temperature, top_p, seed).

    The field modulator's two optional safeguards from the notebook:
    - grad_scale S: the deformation and validity heads learn at S x lr, the alphas at 0.5 x lr,
      the gates at lr, and the gradient norm is clipped to 1;
    - early_stop {"band": (lo, hi) or None, "drift": d, "patience": p, "every": k, "n_monitor": m}:
      every k steps the 4-simplex CV (full dimension) of the modulated states of m anchor
      definitions (items neither trained on nor evaluated) is measured; training stops when it
      has been outside the band for p checks in a row. The band is (lo, hi), or the unmodulated
      monitor CV +- d."""
    from tqdm import tqdm
    c = prepare(name, layers, geo_dim, n_anchors, n_eval, seed, n_train=n_train, lm_head=True,
                geometry=kind != "field", dtype=dtype, device=device)
    if len(c.train) < batch_size:
        raise TerrainError(f"only {len(c.train)} training items for batches of {batch_size}")
    if kind != "field" and (grad_scale is not None or early_stop is not None):
        raise TerrainError("the gradient scaling and the CV early stopping are the field modulator's safeguards "
                           "(the LERP modulator trains the anchors' rows the monitor would read)")
    if talk is not None and not c.seq2seq:
        raise TerrainError(f"{name or DEFAULT_MODEL}: --train with --talk needs an encoder-decoder (T5 family); "
                           f"talk to other models with --talk alone")
    torch.manual_seed(seed)
    base = c.encode()
    if kind == "field":
        c.mod = FieldModulator(c.d_model, len(c.layers), alpha=alpha, seed=seed).to(c.device)
        params = list(c.mod.parameters())
    else:
        load_geometry(c, c.inits["wordnet"])
        c.mod.set_alpha(alpha)
        frozen = torch.zeros(c.mod.has_geo.shape[0], 1, device=c.device)
        frozen[torch.as_tensor(c.tid[c.evals], device=c.device)] = 1.0
        c.mod.geo.weight.register_hook(lambda g: g * (1 - frozen))
        params = [c.mod.geo.weight, c.mod.proj.weight, c.mod.alpha_logit]
        eval_rows_before = c.mod.geo.weight[torch.as_tensor(c.tid[c.evals], device=c.device)].detach().clone()
    groups = field_param_groups(c.mod, lr, grad_scale) if grad_scale is not None else params  # field only
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    monitor = None
    if early_stop is not None:
        es = {"patience": 5, "every": 10, "n_monitor": 200, "band": None, "drift": 0.05, **early_stop}
        cv0 = monitor_cv(c, es["n_monitor"], seed=0)
        band = tuple(es["band"]) if es["band"] is not None else (cv0 - es["drift"], cv0 + es["drift"])
        monitor = {**es, "band": list(band), "unmodulated_cv": cv0, "checks": [], "stopped_at_step": None}
    checksum = sum(float(p.double().sum()) for p in c.model.parameters())
    res = {"model": name or DEFAULT_MODEL, "modulator": kind, "objective": "seq2seq" if c.seq2seq else "contrastive",
           "n_parameters": sum(p.numel() for p in params), "layers": c.layers, "geo_dim": geo_dim, "n_train": len(c.train), "n_eval": len(c.evals),
           "n_anchors": len(c.anchors), "unmodulated": relational_scores(base, c.S_eval, None), "epochs": [],
           "grad_scale": grad_scale, "steps": 0}
    c.mod.attach(c.encoder, c.layers)
    try:
        res["before_training"] = relational_scores(c.encode(), c.S_eval, base)
        rng = np.random.default_rng(seed)
        for ep in range(epochs):
            order = rng.permutation(c.train)
            losses = []
            bar = tqdm(range(0, len(order) - batch_size + 1, batch_size), desc=f"epoch {ep + 1}",
                       disable=not progress, leave=False)
            for s in bar:
                batch = order[s:s + batch_size]
                loss = seq2seq_loss(c, batch) if c.seq2seq else contrastive_loss(c, batch, tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_scale is not None:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
                res["steps"] += 1
                if monitor is not None and res["steps"] % monitor["every"] == 0 and cv_drifted(c, monitor, res["steps"]):
                    break
            with torch.no_grad():
                scores = relational_scores(c.encode(), c.S_eval, base)
            res["epochs"].append({"epoch": ep + 1, "loss": float(np.mean(losses)), "loss_first_batch": losses[0],
                                  "steps": res["steps"], "alpha": c.mod.alpha.detach().tolist(), **scores})
            if monitor is not None and monitor["stopped_at_step"] is not None:
                break
        if monitor is not None:
            res["early_stop"] = monitor
        if kind == "field":
            res.update(field_controls(c, base))
            res["control_name"], res["control"] = ("fresh experts at the trained alphas",
                                                   res["after_training_fresh_experts"])
        else:
            trained_vectors = c.mod.geo.weight.detach().clone()
            ids = torch.as_tensor(c.ids, device=c.device)
            with torch.no_grad():
                perm = torch.as_tensor(rng.permutation(len(ids)), device=c.device)
                c.mod.geo.weight[ids] = trained_vectors[ids][perm]
            res["after_training_shuffled_rows"] = relational_scores(c.encode(), c.S_eval, base)
            with torch.no_grad():
                c.mod.geo.weight.copy_(trained_vectors)
            res["eval_rows_unchanged"] = bool(torch.equal(trained_vectors[torch.as_tensor(c.tid[c.evals],
                                                                                          device=c.device)],
                                                          eval_rows_before))
            res["control_name"], res["control"] = "trained rows shuffled", res["after_training_shuffled_rows"]
        res["model_unchanged"] = sum(float(p.double().sum()) for p in c.model.parameters()) == checksum
        if c.seq2seq:
            talk = dict(talk or {})
            n_prompts = talk.pop("n_prompts", 4)
            prompts = talk.pop("prompts", None) or ["summarize: " + c.items[i]["definition"]
                                                    for i in c.evals[:n_prompts]]
            res["generations"] = converse(c.model, c.tok, c.mod, prompts, [("trained", None, None)],
                                          progress=False, **{"max_new_tokens": 8, **talk})
            res["generation_summary"] = summarise(res["generations"])
    finally:
        c.mod.detach()
    return res


def field_param_groups(mod, lr: float, grad_scale: float) -> list[dict]:
    """The notebook's learning rates for the field modulator: deformation and validity heads
    (the geometric parameters) at grad_scale x lr, the alphas at 0.5 x lr, the gates at lr."""
    geometric = [p for e in mod.experts for p in (*e.to_deform.parameters(), *e.validity.parameters())]
    gates = [p for e in mod.experts for p in e.gate.parameters()]
    return [{"params": geometric, "lr": lr * grad_scale, "name": "geometric"},
            {"params": [mod.alpha_logit], "lr": lr * 0.5, "name": "alpha"},
            {"params": gates, "lr": lr, "name": "gates"}]


def monitor_cv(c, n_monitor: int, seed: int) -> float:
    """Full-dimensional 4-simplex CV of the (modulated, if attached) states of the first n_monitor
    anchor definitions: the early-stopping monitor's measurement."""
    with torch.no_grad():
        return cv_health(c.encode([c.items[i]["definition"] for i in c.anchors[:n_monitor]]), seed=seed)["cv"]


def cv_drifted(c, monitor: dict, step: int) -> bool:
    """One CV check of the early-stopping monitor (see train); True when training should stop."""
    cv = monitor_cv(c, monitor["n_monitor"], seed=step)
    lo, hi = monitor["band"]
    monitor["checks"].append({"step": step, "cv": cv, "in_band": bool(lo <= cv <= hi)})
    recent = monitor["checks"][-monitor["patience"]:]
    if len(recent) == monitor["patience"] and not any(r["in_band"] for r in recent):
        monitor["stopped_at_step"] = step
        return True
    return False


def field_controls(c, base: np.ndarray) -> dict:
    """After training a field modulator: the full-dimensional simplex CV of the modulated
    states, mean validity per expert, and a control with freshly initialised experts at the
    trained alphas (gates of the same strength that learned nothing)."""
    states = c.encode()
    out = {"cv_health": cv_health(states), "cv_health_unmodulated": cv_health(base)}
    trained = {k: v.clone() for k, v in c.mod.state_dict().items()}
    torch.manual_seed(12345)
    for e in c.mod.experts:
        for m in (e.to_deform, e.gate, e.validity):
            m.reset_parameters()
    out["after_training_fresh_experts"] = relational_scores(c.encode(), c.S_eval, base)
    c.mod.load_state_dict(trained)
    return out


def layer_alphas(alpha) -> list[float]:
    """Per-layer alpha (the mean over experts for the field modulator)."""
    a = np.asarray(alpha, dtype=float)
    return (a.mean(1) if a.ndim == 2 else a).tolist()


def format_training(res: dict) -> str:
    lines = [f"{res['model']}: {res['objective']} training of the modulator (model frozen) on {res['n_train']} "
             f"items ({res['modulator']}, {res['n_parameters']:,} trainable parameters); {res['n_eval']} held-out items"
             + (f" (rows frozen: {res['eval_rows_unchanged']})" if "eval_rows_unchanged" in res else ""),
             "| stage | loss | wup Pearson | near - far | preservation | alpha per layer |", "|---|---|---|---|---|---|",
             f"| unmodulated | | {res['unmodulated']['wup_pearson']:.4f} | {res['unmodulated']['near_minus_far']:.4f} "
             f"| 1 | |",
             f"| initialised | | {res['before_training']['wup_pearson']:.4f} | "
             f"{res['before_training']['near_minus_far']:.4f} | {res['before_training']['preservation']:.4f} | |"]
    for e in res["epochs"]:
        lines.append(f"| epoch {e['epoch']} | {e['loss']:.4f} | {e['wup_pearson']:.4f} | {e['near_minus_far']:.4f} | "
                     f"{e['preservation']:.4f} | {' '.join(f'{a:.3f}' for a in layer_alphas(e['alpha']))} |")
    sh = res["control"]
    lines.append(f"| {res['control_name']} | | {sh['wup_pearson']:.4f} | {sh['near_minus_far']:.4f} | "
                 f"{sh['preservation']:.4f} | |")
    if "cv_health" in res:
        lines.append(f"  simplex CV (full dimension): modulated {res['cv_health']['cv']:.3f}, unmodulated "
                     f"{res['cv_health_unmodulated']['cv']:.3f}, Gaussian {res['cv_health']['gaussian_cv']:.3f}")
    if res.get("grad_scale") is not None:
        lines.append(f"  safeguards: geometric heads at {res['grad_scale']:g} x lr, alphas at 0.5 x lr, gradient norm "
                     f"clipped to 1")
    if "early_stop" in res:
        es = res["early_stop"]
        where = (f"stopped at step {es['stopped_at_step']} of the run" if es["stopped_at_step"] is not None
                 else f"never stopped ({res['steps']} steps)")
        lines.append(f"  early stopping: CV band [{es['band'][0]:.3f}, {es['band'][1]:.3f}] (unmodulated "
                     f"{es['unmodulated_cv']:.3f}), {len(es['checks'])} checks every {es['every']} steps, patience "
                     f"{es['patience']}: {where}")
    if "generations" in res:
        lines += format_answers(res["generations"]) + summary_table(res["generation_summary"])
    return "\n".join(lines)


def plot_training(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    es = res.get("early_stop")
    fig, ax = plt.subplots(1, 4 if es else 3, figsize=(20 if es else 15, 4.2))
    ep = [e["epoch"] for e in res["epochs"]]
    ax[0].plot(ep, [e["loss"] for e in res["epochs"]], "o-")
    ax[0].set_title(f"{res['objective']} loss")
    A = np.array([layer_alphas(e["alpha"]) for e in res["epochs"]])
    for k, layer in enumerate(res["layers"]):
        ax[1].plot(ep, A[:, k], "o-", label=f"block {layer}")
    ax[1].axhline(NAMED_ALPHA, color="tab:red", lw=0.8, ls=":")
    ax[1].set_title("alpha per layer")
    ax[1].legend(fontsize=7)
    ax[2].plot(ep, [e["wup_pearson"] for e in res["epochs"]], "o-", label="trained")
    ax[2].axhline(res["unmodulated"]["wup_pearson"], color="k", ls=":", label="unmodulated")
    ax[2].axhline(res["control"]["wup_pearson"], color="grey", ls="--", label=res["control_name"])
    ax[2].set_title("held-out Pearson(Wu-Palmer, cosine)")
    ax[2].legend(fontsize=8)
    for a in ax[:3]:
        a.set_xlabel("epoch")
    if es:
        ax[3].plot([k["step"] for k in es["checks"]], [k["cv"] for k in es["checks"]], "o-", ms=3, label="modulated")
        ax[3].axhspan(*es["band"], color="tab:green", alpha=0.15, label="band")
        ax[3].axhline(es["unmodulated_cv"], color="k", ls=":", label="unmodulated")
        if es["stopped_at_step"] is not None:
            ax[3].axvline(es["stopped_at_step"], color="tab:red", label="stopped")
        ax[3].set_xlabel("optimizer step")
        ax[3].set_title(f"4-simplex CV of {es['n_monitor']} monitor definitions")
        ax[3].legend(fontsize=8)
    fig.suptitle(f"{res['model']}: modulator training")
    return save_figure(fig, path)


def format_summary(res: dict) -> str:
    u = res["unmodulated"]
    lines = [f"{res['model']}: LERP before blocks {res['layers']}, geo-dim {res['geo_dim']}; {res['n_items']} noun "
             f"items: {res['n_anchors']} anchors, {res['n_eval']} evaluation items (disjoint), "
             f"{res['n_train_reserved']} reserved for training; anchor Procrustes fit cosine "
             f"{res['anchor_fit_cosine']:.3f}",
             f"unmodulated: wup Pearson {u['wup_pearson']:.4f}, Spearman {u['wup_spearman']:.4f}, near-far "
             f"{u['near_minus_far']:.4f}, simplex CV {u['simplex_cv']:.3f}",
             "| alpha | condition | wup Pearson | wup Spearman | near - far | simplex CV | preservation |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['alpha']:g} | {r['condition']} | {r['wup_pearson']:.4f} | {r['wup_spearman']:.4f} | "
                     f"{r['near_minus_far']:.4f} | {r['simplex_cv']:.3f} | {r['preservation']:.4f} |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = {"wordnet": "tab:green", "shuffled_rows": "tab:grey", "random_rotation": "tab:purple"}
    for cond, c in colors.items():
        rows = [r for r in res["rows"] if r["condition"] == cond]
        a = [r["alpha"] for r in rows]
        for k, key in enumerate(("wup_pearson", "near_minus_far", "preservation")):
            ax[k].plot(a, [r[key] for r in rows], "o-", color=c, label=cond)
    for k, key in enumerate(("wup_pearson", "near_minus_far")):
        ax[k].axhline(res["unmodulated"][key], color="k", ls=":", label="unmodulated")
    for k, title in enumerate(("Pearson(Wu-Palmer, cosine), held-out items", "near (<= 3) minus far (>= 10) cosine",
                               "preservation: cos(modulated, unmodulated)")):
        ax[k].set_xscale("log")
        ax[k].axvline(NAMED_ALPHA, color="tab:red", lw=0.8, alpha=0.5)
        ax[k].set_xlabel("alpha (red line: 0.29154)")
        ax[k].set_title(title)
        ax[k].legend(fontsize=8)
    fig.suptitle(f"{res['model']}: LERP modulator alpha sweep with controls")
    return save_figure(fig, path)


def build_parser() -> Parser:
    p = Parser(prog="python -m terrain.modulate",
               description="LERP residual modulator initialised from WordNet: alpha sweep on held-out items with "
                           "shuffled and random-rotation controls.")
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                   help="model names, local folders or .gguf files (see terrain/models.py): minilm = the offline all-MiniLM-L6-v2 (default), smollm2 = SmolLM2-135M-Instruct after `make models`")
    p.add_argument("--layers", default="all", help="comma-separated block indices before which to inject")
    p.add_argument("--geo-dim", type=at_least(1), default=64, help="WordNet MDS dimension (below --anchors)")
    p.add_argument("--alphas", type=between(0, 1, open_hi=True), nargs="+", default=list(DEFAULT_ALPHAS),
                   help="LERP weights of the sweep (0 = the unmodulated model)")
    p.add_argument("--anchors", type=at_least(2), default=2000, help="items the WordNet geometry is fit on")
    p.add_argument("--eval-items", type=at_least(5), default=800,
                   help="held-out items scored (a 4-simplex needs 5)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the sampled items and the nulls")
    add_output_flags(p)
    add_model_flags(p)
    t = p.add_argument_group("training (--train): the model frozen; geometric rows, projection and alphas learn")
    t.add_argument("--train", action="store_true", help="train instead of the alpha sweep")
    t.add_argument("--modulator", choices=("lerp", "field"), default="lerp",
                   help="lerp: WordNet geometry injected by LERP; field: simplex-expert gates (terrain/field.py)")
    t.add_argument("--alpha", type=between(0, 1, open_lo=True, open_hi=True), default=0.01,
                   help="starting alpha of every layer (a sigmoid of a learned logit)")
    t.add_argument("--epochs", type=at_least(1), default=3, help="passes over the training items")
    t.add_argument("--train-items", type=at_least(1), default=2000, help="at least --batch-size")
    t.add_argument("--batch-size", type=at_least(1), default=32, help="items per optimizer step")
    t.add_argument("--lr", type=positive(), default=1e-3, help="AdamW learning rate")
    t.add_argument("--tau", type=positive(), default=0.05, help="contrastive temperature (encoder-only models)")
    t.add_argument("--grad-scale", type=positive(), default=None, metavar="S",
                   help="field only, the notebook's safeguards: deformation and validity heads at S x --lr (it used "
                        "0.1), alphas at 0.5 x --lr, gradient norm clipped to 1 (default: off)")
    t.add_argument("--early-stop-band", type=non_negative(), nargs=2, metavar=("LO", "HI"), default=None,
                   help="stop when the 4-simplex CV of the monitor definitions leaves [LO, HI] for --patience checks "
                        "(the notebook's band: 0.16 0.26)")
    t.add_argument("--early-stop-drift", type=positive(), default=None, metavar="D",
                   help="as --early-stop-band, with the band the unmodulated monitor CV +- D")
    t.add_argument("--patience", type=at_least(1), default=5, help="CV checks out of band in a row before stopping")
    t.add_argument("--cv-every", type=at_least(1), default=10, help="optimizer steps between CV checks")
    t.add_argument("--cv-monitor", type=at_least(5), default=200,
                   help="anchor definitions the CV is measured on (never training or held-out items)")
    g = p.add_argument_group(
        "talking (--talk): answers of the unmodulated and the modulated model side by side, scored by their "
        "log-likelihood under the unmodulated model, distinct-1/2 and the edit distance to the unmodulated answer; "
        "needs a T5-style or causal language model (terrain/talk.py). With --train: the trained modulator talks")
    g.add_argument("--talk", action="store_true",
                   help="talk at each --alphas with the WordNet rows and with the rows shuffled (the control)")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt, verbatim (repeatable; T5 wants a task prefix such as 'summarize: ')")
    g.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, after any --prompt")
    g.add_argument("--n-prompts", type=at_least(1), default=6,
                   help="without prompts: this many held-out definitions (never anchors)")
    g.add_argument("--max-new-tokens", type=at_least(1), default=32, help="tokens generated per answer")
    g.add_argument("--temperature", type=between(0, 10), default=0.0,
                   help="0 = greedy; above 0 samples, and the unmodulated model answers twice (the null)")
    g.add_argument("--top-p", type=between(0, 1, open_lo=True), default=0.9, help="nucleus sampling mass")
    g.add_argument("--sample-seed", type=SEED, default=0,
                   help="sampling seed; the modulated and unmodulated answers to a prompt share it")
    return p


@safeio.one_line_errors(TerrainError)
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.geo_dim >= args.anchors and not (args.train and args.modulator == "field"):
        p.error(f"--geo-dim {args.geo_dim} must be below --anchors {args.anchors} (MDS of n anchors has at most "
                f"n - 1 dimensions); lower --geo-dim or raise --anchors")
    if args.train and args.train_items < args.batch_size:
        p.error(f"--train-items {args.train_items} is fewer than one batch of --batch-size {args.batch_size}")
    try:
        layers = None if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers {args.layers!r}: give 'all' or comma-separated integers")
    if layers is not None and any(i < 0 for i in layers):
        p.error(f"--layers {args.layers!r}: block indices count from 0")
    if layers is not None and len(set(layers)) != len(layers):
        p.error(f"--layers {args.layers!r}: a block is named twice")
    if args.early_stop_band and args.early_stop_drift:
        p.error("give --early-stop-band or --early-stop-drift, not both")
    if args.early_stop_band and not args.early_stop_band[0] < args.early_stop_band[1]:
        p.error(f"--early-stop-band {args.early_stop_band[0]:g} {args.early_stop_band[1]:g}: LO must be below HI")
    early = args.early_stop_band or args.early_stop_drift
    if (early or args.grad_scale) and not args.train:
        p.error("--grad-scale and --early-stop-* go with --train")
    if (args.grad_scale or early) and args.modulator != "field":
        p.error("--grad-scale and --early-stop-* are the field modulator's safeguards: add --modulator field")
    if early and args.cv_monitor > args.anchors:
        p.error(f"--cv-monitor {args.cv_monitor} exceeds --anchors {args.anchors}")
    early_stop = {"band": args.early_stop_band, "drift": args.early_stop_drift, "patience": args.patience,
                  "every": args.cv_every, "n_monitor": args.cv_monitor} if early else None
    talking = (args.prompt or args.prompts_file or args.temperature or args.max_new_tokens != 32
               or args.top_p != 0.9 or args.sample_seed or args.n_prompts != 6)
    if talking and not (args.talk or args.train):
        p.error("--prompt, --prompts-file, --n-prompts, --max-new-tokens, --temperature, --top-p and --sample-seed "
                "go with --talk (or --train)")
    device = resolve_device(args.device)
    prompts = read_prompts(args.prompt, args.prompts_file)
    talk_opts = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                 "seed": args.sample_seed, "prompts": prompts, "n_prompts": args.n_prompts}
    if args.talk and not args.train:
        prefix, present, draw = "modulate_talk", T.format_summary, T.plot

        def compute(n):
            return talk(n, prompts=prompts, n_prompts=args.n_prompts, layers=layers, geo_dim=args.geo_dim,
                          alphas=args.alphas, n_anchors=args.anchors, n_eval=args.eval_items, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          sample_seed=args.sample_seed, dtype=args.dtype, device=device)
    elif args.train:
        prefix, present, draw = f"modulate_train_{args.modulator}", format_training, plot_training

        def compute(n):
            return train(n, layers=layers, geo_dim=args.geo_dim, alpha=args.alpha, epochs=args.epochs,
                         n_train=args.train_items, batch_size=args.batch_size, lr=args.lr, tau=args.tau,
                         n_anchors=args.anchors, n_eval=args.eval_items, seed=args.seed, kind=args.modulator,
                         dtype=args.dtype, device=device, talk=talk_opts if talking or args.talk else None,
                         grad_scale=args.grad_scale, early_stop=early_stop)
    else:
        prefix, present, draw = "modulate", format_summary, plot

        def compute(n):
            return sweep(n, layers=layers, geo_dim=args.geo_dim, alphas=args.alphas, n_anchors=args.anchors,
                         n_eval=args.eval_items, seed=args.seed,
                         dtype=args.dtype, device=device)
    code, _, written = run_for_models(args, prefix, compute, present, draw)
    if written:
        print("wrote " + ", ".join(written))
    return code


if __name__ == "__main__":
    sys.exit(main())
