"""LERP modulator: exact identity at alpha 0, the LERP itself at the block input, masking of
tokens without WordNet vectors, clean detach, T5-style blocks, MDS and landmark MDS on
planted configurations, and the alpha sweep on MiniLM."""
import json

import numpy as np
import pytest
import torch

from terrain import modulate as MD
from terrain.models import load_model


@pytest.fixture(scope="module")
def minilm():
    model, config = load_model(None)
    return model, config


def run(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states


def modulator_for(model, layers, rng_seed=0):
    torch.manual_seed(rng_seed)
    vocab, d = model.get_input_embeddings().weight.shape
    mod = MD.LerpModulator(vocab, d, len(layers), geo_dim=8)
    with_geo = np.array([2000, 2001, 2002, 3000])
    mod.set_vectors(with_geo, np.random.default_rng(rng_seed).standard_normal((4, 8)))
    return mod.attach(model, layers), with_geo


def test_alpha_zero_is_exactly_the_model_and_detach_restores(minilm):
    model, _ = minilm
    ids = torch.tensor([[101, 2000, 2001, 5000, 3000, 102]])
    ref = run(model, ids)
    mod, _ = modulator_for(model, list(range(6)))
    try:
        mod.set_alpha(0.0)
        assert torch.equal(mod.alpha, torch.zeros(6))
        for a, b in zip(run(model, ids), ref):
            assert torch.equal(a, b)
        mod.set_alpha(0.3)
        assert not torch.allclose(run(model, ids)[-1], ref[-1])
    finally:
        mod.detach()
    for a, b in zip(run(model, ids), ref):
        assert torch.equal(a, b)


def block_input(model, ids, block):
    """The hidden states entering `block` (hooks registered earlier, e.g. the modulator's, apply first)."""
    seen = {}

    def grab(_m, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(model, ids)
    finally:
        handle.remove()
    return seen["h"]


def test_lerp_at_the_block_input_and_masking(minilm):
    model, _ = minilm
    ids = torch.tensor([[101, 2000, 5000, 3000, 102]])
    block = MD.encoder_blocks(model)[2]
    h0 = block_input(model, ids, block)
    mod, _ = modulator_for(model, [2])
    try:
        mod.set_alpha(0.25)
        h1 = block_input(model, ids, block)
        g = mod.proj(mod.geo(ids)).detach()
    finally:
        mod.detach()
    has = torch.tensor([False, True, False, True, False])
    torch.testing.assert_close(h1[0, has], (0.75 * h0 + 0.25 * g)[0, has], rtol=1e-5, atol=1e-6)
    assert torch.equal(h1[0, ~has], h0[0, ~has])          # no WordNet vector: untouched


def test_t5_style_blocks():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=3, num_decoder_layers=1, num_heads=4,
                      vocab_size=4000)
    enc = tf.T5Model(cfg).eval().get_encoder()
    assert len(MD.encoder_blocks(enc)) == 3
    ids = torch.tensor([[2000, 17, 3000, 1]])
    ref = run(enc, ids)[-1]
    mod, _ = modulator_for(enc, [0, 2])
    try:
        mod.set_alpha(0.0)
        assert torch.equal(run(enc, ids)[-1], ref)
        mod.set_alpha([0.2, 0.4])
        assert not torch.allclose(run(enc, ids)[-1], ref)
    finally:
        mod.detach()
    with pytest.raises(MD.TerrainError):
        MD.LerpModulator(4000, 16, 1).attach(enc, [5])


def test_classical_and_landmark_mds_on_planted_points():
    rng = np.random.default_rng(0)
    P = rng.standard_normal((60, 5))
    D = np.linalg.norm(P[:, None] - P[None], axis=-1)
    Y, fit = MD.classical_mds(D[:40, :40], 5)
    DY = np.linalg.norm(Y[:, None] - Y[None], axis=-1)
    np.testing.assert_allclose(DY, D[:40, :40], atol=1e-8)
    Z = MD.landmark_mds(D[40:, :40], fit)                  # out-of-sample points
    np.testing.assert_allclose(np.linalg.norm(Z[:, None] - Y[None], axis=-1), D[40:, :40], atol=1e-6)
    np.testing.assert_allclose(MD.landmark_mds(D[:40, :40], fit), Y, atol=1e-8)   # landmarks map to themselves


def test_split_is_disjoint():
    a, e, t = MD.split_items(100, 30, 20, seed=1)
    assert len(set(a) | set(e) | set(t)) == 100 and not set(a) & set(e)
    with pytest.raises(MD.TerrainError):
        MD.split_items(40, 30, 20, seed=1)


def test_sweep_on_minilm(tmp_path):
    assert MD.main(["--layers", "0,3", "--geo-dim", "16", "--alphas", "0", "0.3", "--anchors", "300",
                    "--eval-items", "150", "--out-dir", str(tmp_path), "--plots-dir", str(tmp_path)]) == 0
    res = json.load(open(tmp_path / "modulate_minilm.json"))
    zero = [r for r in res["rows"] if r["alpha"] == 0]
    assert len(zero) == 3
    for r in zero:                                         # alpha 0: the unmodulated numbers exactly
        assert r["preservation"] == pytest.approx(1.0, abs=1e-6)
        assert r["wup_pearson"] == pytest.approx(res["unmodulated"]["wup_pearson"], abs=1e-6)
    assert all(r["preservation"] < 0.999 for r in res["rows"] if r["alpha"] == 0.3)
    assert (tmp_path / "modulate_minilm.png").exists()
    assert res["n_anchors"] == 300 and res["n_eval"] == 150


def test_training_encoder_only(tmp_path):
    """Contrastive training on MiniLM: the encoder stays frozen, held-out rows keep their
    WordNet placement, alphas and loss are tracked."""
    res = MD.train(None, layers=[0, 5], geo_dim=8, alpha=0.05, epochs=2, n_train=64, batch_size=16, lr=5e-2,
                   n_anchors=200, n_eval=80, progress=False)
    assert res["objective"] == "contrastive" and res["eval_rows_unchanged"]
    assert len(res["epochs"]) == 2 and len(res["epochs"][0]["alpha"]) == 2
    assert res["epochs"][-1]["alpha"] != [0.05, 0.05]                 # alphas are trained
    assert all(np.isfinite(e["loss"]) for e in res["epochs"])
    assert res["model_unchanged"]                                     # the encoder is frozen
    assert res["before_training"]["preservation"] < 1.0


def test_training_seq2seq_uses_shifted_labels(tmp_path):
    """A tiny random T5 with MiniLM's tokenizer: the loss is the model's own (labels shifted
    right into decoder inputs), generations of the original and modulated model are compared."""
    import transformers as tf
    from transformers import AutoTokenizer

    from terrain.models import resolve_model_name
    tok = AutoTokenizer.from_pretrained(resolve_model_name(None), local_files_only=True)
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                      vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    tf.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    res = MD.train(str(tmp_path / "t5"), geo_dim=4, alpha=0.1, epochs=1, n_train=32, batch_size=16, lr=1e-2,
                   n_anchors=100, n_eval=40, progress=False)
    assert res["objective"] == "seq2seq" and res["eval_rows_unchanged"] and res["model_unchanged"]
    assert len(res["generations"]) == 4
    assert all([a["condition"] for a in g["answers"]] == ["unmodulated", "trained"] for g in res["generations"])
    assert {r["condition"] for r in res["generation_summary"]} == {"unmodulated", "trained"}
    # talk options reach the trained model's answers: how many held-out prompts, sampling (with its null)
    sampled = MD.train(str(tmp_path / "t5"), geo_dim=4, alpha=0.1, epochs=1, n_train=16, batch_size=16, lr=1e-2,
                       n_anchors=100, n_eval=40, progress=False,
                       talk={"n_prompts": 2, "temperature": 1.0, "top_p": 0.5, "max_new_tokens": 3, "seed": 1})
    assert len(sampled["generations"]) == 2
    assert {r["condition"] for r in sampled["generation_summary"]} == {"unmodulated", "unmodulated, another seed",
                                                                       "trained"}
    # the loss equals a hand-shifted teacher-forced cross-entropy
    model = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5").eval()
    enc = {k: v for k, v in tok(["summarize: a small dog"], return_tensors="pt").items() if k != "token_type_ids"}
    lab = tok(["puppy"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(**enc, labels=lab).loss
        dec_in = torch.cat([torch.full((1, 1), cfg.decoder_start_token_id), lab[:, :-1]], 1)
        logits = model(**enc, decoder_input_ids=dec_in).logits
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits[0], lab[0])), rel=1e-5)


def test_attached_and_suspended_restore_the_model(minilm):
    """attached() removes the hooks when its block ends, even on an error; suspended() gives the
    bare model's exact states inside and the modulated ones again after."""
    model, _ = minilm
    ids = torch.tensor([[101, 2000, 2001, 5000, 3000, 102]])
    ref = run(model, ids)
    mod, _ = modulator_for(model, [1, 3])
    mod.detach()
    mod.set_alpha(0.4)
    with pytest.raises(RuntimeError):
        with mod.attached(model, [1, 3]):
            modulated = run(model, ids)[-1]
            assert not torch.allclose(modulated, ref[-1])
            with mod.suspended():
                assert all(torch.equal(a, b) for a, b in zip(run(model, ids), ref))
            assert torch.equal(run(model, ids)[-1], modulated)
            raise RuntimeError("leave the block early")
    assert all(torch.equal(a, b) for a, b in zip(run(model, ids), ref))
