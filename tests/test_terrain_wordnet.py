"""WordNet alignment: similarities equal to nltk's, hand-checked taxonomy logic, bands and
hypernym decay, the Mantel test, sense policies, and the pipeline on MiniLM."""
import json
import math

import numpy as np
import pytest

from terrain import wordnet as W
from terrain.taxonomy import Taxonomy

wn = pytest.importorskip("nltk.corpus").wordnet


@pytest.fixture(scope="module")
def wordnet():
    return W.load_wordnet()


@pytest.mark.parametrize("simulate_root", [False, True])
def test_similarities_equal_nltk(wordnet, simulate_root):
    rng = np.random.default_rng(5)
    pool = [wordnet.synsets(w) for w in ("dog", "run", "good", "quickly", "bank", "light", "chef", "fireman",
                                         "paris", "walk", "red", "fast", "tree", "idea", "swim")]
    picks = [s for ss in pool for s in ss[:4]]
    allsyn = list(wordnet.all_synsets("n"))[:20000] + list(wordnet.all_synsets("v"))[:3000]
    picks += [allsyn[i] for i in rng.choice(len(allsyn), 40, replace=False)]
    tax = Taxonomy.from_synsets(picks)
    S = tax.similarities(None, simulate_root)
    n_none = 0
    for i, a in enumerate(picks):
        for j, b in enumerate(picks):
            if i == j:
                continue
            for key, f in (("path", a.path_similarity), ("wup", a.wup_similarity)):
                ref = f(b, simulate_root=simulate_root)
                got = S[key][i, j]
                if ref is None:
                    n_none += 1
                    assert np.isnan(got), (key, a, b)
                else:
                    assert got == pytest.approx(ref, abs=1e-12), (key, a, b, ref, got)
    assert (n_none > 0) != simulate_root      # without the root, adjectives and verb trees stay apart


def test_subset_equals_full_block(wordnet):
    picks = [s for w in ("cat", "car", "run", "happy", "house", "dog") for s in wordnet.synsets(w)[:3]]
    tax = Taxonomy.from_synsets(picks)
    full = tax.similarities(None, True)
    sub = np.array([1, 4, 7, 8, 12, 15])
    part = tax.similarities(sub, True)
    for k in ("distance", "path", "wup"):
        np.testing.assert_array_equal(part[k], full[k][np.ix_(sub, sub)])


def hand_taxonomy():
    """top -> animal -> mammal -> dog; animal -> pet; puppy has parents [dog, pet];
    a lone verb tree walk -> move; an adjective with no parents."""
    parents = {"animal": ["top"], "mammal": ["animal"], "dog": ["mammal"], "pet": ["animal"],
               "puppy": ["dog", "pet"], "walk": ["move"]}
    items = ["dog", "pet", "puppy", "mammal", "walk", "move", "red", "blue"]
    needs_root = [False, False, False, False, True, True, True, True]
    return Taxonomy.from_parents(items, parents, needs_root), items


def test_hand_taxonomy_values():
    tax, items = hand_taxonomy()
    ix = {n: i for i, n in enumerate(items)}
    S = tax.similarities(None, simulate_root=False)
    D = S["distance"]
    assert D[ix["dog"], ix["pet"]] == 3          # dog-mammal-animal-pet
    assert D[ix["puppy"], ix["pet"]] == 1        # the second parent is a shortcut
    assert D[ix["puppy"], ix["mammal"]] == 2
    assert D[ix["walk"], ix["move"]] == 1
    assert np.isnan(D[ix["dog"], ix["walk"]]) and np.isnan(D[ix["red"], ix["blue"]])
    assert S["path"][ix["dog"], ix["pet"]] == pytest.approx(1 / 4)
    # depths: top 0, animal 1, mammal 2, pet 2, dog 3, puppy min 3 / max 4
    # wup(dog, pet): lcs animal (min_depth 1), depth 2; lengths 2 and 1 -> 4 / (4 + 3)
    assert S["wup"][ix["dog"], ix["pet"]] == pytest.approx(4 / 7)
    # wup(puppy, mammal): lcs mammal (the second synset; its min_depth 2 beats animal's 1);
    # depth 3, lengths 2 and 0 -> 6 / (5 + 3)
    assert S["wup"][ix["puppy"], ix["mammal"]] == pytest.approx(6 / 8)
    # wup(mammal, puppy): the first synset is itself the lcs -> the same value here
    assert S["wup"][ix["mammal"], ix["puppy"]] == pytest.approx(6 / 8)
    R = tax.similarities(None, simulate_root=True)
    # the fake root sits one above each synset's farthest ancestor: dog 3 + 1, walk 1 + 1
    assert R["distance"][ix["dog"], ix["walk"]] == 4 + 2
    assert R["path"][ix["red"], ix["blue"]] == pytest.approx(1 / 3)   # any two roots-only synsets
    assert R["wup"][ix["red"], ix["blue"]] == pytest.approx(2 / (1 + 1 + 2))
    assert R["distance"][ix["dog"], ix["pet"]] == 3                  # nouns keep their real path


def test_hypernym_pairs_and_bands():
    tax, items = hand_taxonomy()
    ix = {n: i for i, n in enumerate(items)}
    t = {(items[i], items[j], d) for i, j, d in W.hypernym_pairs(tax)}
    assert ("puppy", "dog", 1) in t and ("puppy", "pet", 1) in t and ("puppy", "mammal", 2) in t
    assert ("dog", "mammal", 1) in t and ("walk", "move", 1) in t
    assert not any(a == b for a, b, _ in t)
    assert len(t) == 5
    # planted cosines: cosine = 1 / distance, two joined pairs per distance
    dist = np.array([1, 1, 2, 2, 3, 3, np.nan])
    cos = {"x": np.array([1.0, 1.0, 0.5, 0.5, 1 / 3, 1 / 3, 9.0])}
    bands = W.distance_bands(dist, cos, min_pairs=2)
    assert [b["distance"] for b in bands] == [1, 2, 3]
    assert [b["x_cos"] for b in bands] == pytest.approx([1, 0.5, 1 / 3])
    assert W.distance_bands(dist, cos, min_pairs=3) == []
    U = {"x": np.eye(len(items))}
    U["x"][ix["puppy"]] = U["x"][ix["dog"]]          # puppy identical to dog, orthogonal to the rest
    decay = W.hypernym_decay(W.hypernym_pairs(tax), U, min_pairs=1)
    assert decay[0]["depth"] == 1 and decay[0]["n"] == 4
    assert decay[0]["x_cos"] == pytest.approx(1 / 4)   # of dog-mammal, puppy-dog, puppy-pet, walk-move


def test_mantel_planted_and_null():
    rng = np.random.default_rng(0)
    n = 120
    X = rng.standard_normal((n, 8))
    C = W.unit(X) @ W.unit(X).T
    pi, pj = np.triu_indices(n, 1)
    planted = C[pi, pj] + 0.5 * rng.standard_normal(len(pi))
    m = W.mantel(planted, C, pi, pj, 200, rng)
    assert m["pearson"]["p_value"] < 0.01 and m["pearson"]["z"] > 5
    assert m["spearman"]["p_value"] < 0.01
    unrelated = W.unit(rng.standard_normal((n, 8)))
    m0 = W.mantel((unrelated @ unrelated.T)[pi, pj], C, pi, pj, 200, rng)
    assert m0["pearson"]["p_value"] > 0.01 and abs(m0["pearson"]["z"]) < 3


class TinyWordNet:
    """A few real synsets in a chosen all_synsets() order, to check the sense policies."""
    def __init__(self, real, names):
        self.real = real
        self.order = [real.synset(n) for n in names]

    def all_lemma_names(self):
        return sorted({lem.name() for s in self.order for lem in s.lemmas()})

    def all_synsets(self):
        return iter(self.order)

    def synsets(self, name, pos=None):
        return [s for s in self.real.synsets(name, pos=pos) if s in self.order]


def test_sense_policies(wordnet):
    from transformers import AutoTokenizer

    from terrain.models import resolve_model_name
    tok = AutoTokenizer.from_pretrained(resolve_model_name(None), local_files_only=True)
    fake = TinyWordNet(wordnet, ["run.v.01", "run.n.01", "bank.n.02", "bank.n.01", "dog.n.01",
                                 "frump.n.01", "chase.v.01"])
    name = {k: wordnet.synset(k).name() for k in ("run.v.01", "bank.n.01", "bank.n.02", "dog.n.01")}
    got = {it["lemma"]: it["synset"] for it in W.match_items(fake, tok, "first-seen")}
    assert got["run"] == name["run.v.01"] and got["bank"] == name["bank.n.02"] and got["dog"] == name["dog.n.01"]
    most = {it["lemma"]: it for it in W.match_items(fake, tok, "most-frequent")}
    counts = {name[s]: sum(lem.count() for lem in wordnet.synset(s).lemmas() if lem.name() == "bank")
              for s in ("bank.n.01", "bank.n.02")}
    assert counts[name["bank.n.01"]] != counts[name["bank.n.02"]]
    assert most["bank"]["synset"] == max(counts, key=counts.get)
    assert {it["lemma"]: it["synset"] for it in W.match_items(fake, tok, "noun")}["run"] == "run.n.01"
    assert all(len(it["definition"]) > 10 for it in most.values())
    assert len({it["token_id"] for it in most.values()}) == len(most)
    with pytest.raises(W.TerrainError):
        W.match_items(fake, tok, "random")


def test_matched_items_are_remembered_per_tokenizer(wordnet):
    """A second call with the same reader, tokenizer and policy reads WordNet no more and gives
    equal (copied) items; a tokenizer that splits differently is matched afresh."""
    from transformers import AutoTokenizer

    from terrain.models import resolve_model_name
    tok = AutoTokenizer.from_pretrained(resolve_model_name(None), local_files_only=True)
    fake = TinyWordNet(wordnet, ["run.n.01", "bank.n.01", "dog.n.01", "chase.v.01"])
    calls = []
    real_synsets = fake.synsets
    fake.synsets = lambda name, pos=None: calls.append(name) or real_synsets(name, pos)
    first = W.match_items(fake, tok, "noun")
    n_calls = len(calls)
    assert n_calls > 0 and [it["lemma"] for it in first] and "dog" in [it["lemma"] for it in first]
    first[0]["lemma"] = "changed by the caller"
    again = W.match_items(fake, tok, "noun")
    assert len(calls) == n_calls and again[0]["lemma"] != "changed by the caller"
    cased = AutoTokenizer.from_pretrained(resolve_model_name(None), local_files_only=True, do_lower_case=False)
    assert W.tokenizer_fingerprint(cased) != W.tokenizer_fingerprint(tok)
    W.match_items(fake, cased, "noun")
    assert len(calls) > n_calls


def test_encoder_decoder_gets_prefix_and_encoder_only():
    import torch
    import transformers as tf
    from transformers import AutoTokenizer

    from terrain.models import resolve_model_name
    tok = AutoTokenizer.from_pretrained(resolve_model_name(None), local_files_only=True)
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                      vocab_size=tok.vocab_size)
    model = tf.T5Model(cfg).eval()
    texts = ["a domesticated canine", "to move fast on foot"]
    got = W.encode_texts(model, tok, cfg, texts, layer=-1, progress=False)
    enc = tok(["summarize: " + t for t in texts], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = model.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    np.testing.assert_allclose(got, ((h * m).sum(1) / m.sum(1)).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(W.TerrainError):
        W.encode_texts(model, tok, cfg, texts, layer=7, progress=False)


@pytest.fixture(scope="module")
def minilm_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("wordnet")
    code = W.main(["--max-items", "400", "--seeds", "3", "--n-items", "300", "--n-pairs", "20000",
                   "--n-simplices", "200", "--n-perm", "50", "--out-dir", str(out), "--plots-dir", str(out)])
    assert code == 0
    return json.load(open(out / "wordnet_minilm.json")), out


def test_minilm_pipeline(minilm_result):
    res, out = minilm_result
    assert res["n_matched"] == 400 and sum(res["pos_counts"].values()) == 400
    assert (out / "wordnet_minilm.png").exists() and (out / "wordnet_minilm_stability.csv").exists()
    s0 = res["seed0"]
    # definitions carry WordNet's relations: a positive correlation that no label shuffle reaches
    assert s0["path_contextual_pearson"] > 0.1
    assert s0["path_contextual_mantel"]["pearson"]["p_value"] < 0.05
    st = res["stability"]["wup_contextual_pearson"]
    assert st["n_seeds"] == 3 and st["min"] <= st["mean"] <= st["max"]
    for b in s0["bands"]:
        assert b["n"] >= 10 and math.isfinite(b["static_cos"])
    assert s0["simplex_cv_null_exact"]["static"] == pytest.approx(W.M.gaussian_volume_cv(4, 384))
