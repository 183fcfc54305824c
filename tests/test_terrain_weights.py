"""terrain.weights: planted structure, T5 bias decoding, the battery on tiny local models."""
import json

import numpy as np
import pytest
import torch

from terrain.models import Weight
from terrain.weights import (battery, classify_profile, cross_layer, form_stats, main, neuron_importance,
                             neuron_stats, t5_bias_profiles)


def test_bias_profiles_decode_the_buckets():
    from transformers.models.t5.modeling_t5 import T5Attention
    table = np.arange(32, dtype=float)[:, None] * np.array([[1.0, -1.0]])  # bias = +-bucket index
    dist, prof = t5_bias_profiles(table, 32, 128, bidirectional=True, span=300)
    buckets = T5Attention._relative_position_bucket(torch.as_tensor(dist), True, 32, 128).numpy()
    np.testing.assert_array_equal(prof[0], buckets)
    np.testing.assert_array_equal(prof[1], -buckets)


def test_profile_classes():
    d = np.arange(-200, 201)
    assert classify_profile(d, 5 * np.exp(-np.abs(d) / 2.0)) == "local"
    assert classify_profile(d, 0.1 * np.sin(d / 50.0)) == "global"
    assert classify_profile(d, np.abs(d) / 100.0) == "mixed"


def test_neuron_importance_finds_a_planted_dead_unit():
    rng = np.random.default_rng(0)
    w_in, w_out = rng.standard_normal((100, 16)), rng.standard_normal((16, 100))
    w_in[7] = 0.0
    w_out[:, 11] *= 0.05
    st = neuron_stats(neuron_importance(w_in, w_out))
    assert st["dead_frac"] == pytest.approx(0.01) and st["weak_frac"] == pytest.approx(0.02)


def test_cross_layer_overlap_identical_vs_random():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((64, 256))
    same = cross_layer([Weight("a", "q", "encoder", 0, A), Weight("b", "q", "encoder", 1, A.copy())], r=16)
    assert same["subspace_overlap"][0][1] == pytest.approx(1.0) and same["raw_cosine"][0][1] == pytest.approx(1.0)
    many = cross_layer([Weight(str(i), "q", "encoder", i, rng.standard_normal((64, 256))) for i in range(6)], r=16)
    ov = np.array(many["subspace_overlap"])
    off = ov[~np.eye(6, dtype=bool)]
    assert many["chance_overlap"] == pytest.approx(16 / 256)
    assert abs(off.mean() - 16 / 256) < 0.03  # random subspaces overlap at chance
    # writers are compared on their output (residual) side
    W = rng.standard_normal((64, 256))
    out = cross_layer([Weight("a", "mlp_out", "encoder", 0, W), Weight("b", "mlp_out", "encoder", 1, W)], r=8)
    assert out["side"] == "out" and out["chance_overlap"] == pytest.approx(8 / 64)


def test_form_stats_symmetric_and_random():
    rng = np.random.default_rng(2)
    Q = rng.standard_normal((3, 8, 8))
    sym = form_stats(np.stack([q.T @ q for q in Q]))  # PSD forms: symmetric, all mass positive
    assert max(sym["asymmetry"]) < 1e-12 and min(sym["positive_share"]) == pytest.approx(1.0)
    rand = form_stats(rng.standard_normal((200, 16, 16)))
    assert np.mean(rand["positive_share"]) == pytest.approx(0.5, abs=0.03)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=50,
                      feed_forward_proj="gated-gelu")
    folder = tmp_path_factory.mktemp("t5")
    tf.T5Model(cfg).save_pretrained(folder)
    return str(folder)


def test_battery_on_a_tiny_gated_t5(tiny_t5):
    res = battery(tiny_t5, n_null=2)
    roles = {m["role"] for m in res["matrices"].values()}
    assert {"q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out", "cross_q", "cross_o"} <= roles
    assert {"encoder/self_0", "encoder/self_1", "decoder/cross_0"} <= set(res["heads_by_layer"])
    assert len(res["heads_by_layer"]["encoder/self_0"]["positive_share"]) == 4
    assert set(res["t5_bias"]) == {"encoder", "decoder"} and len(res["t5_bias"]["encoder"]["classes"]) == 4
    assert set(res["neurons"]) == {"encoder/0", "encoder/1", "decoder/0", "decoder/1"}
    # an untrained model is its own null: stable rank within 30% of the Gaussian null
    q = next(m for m in res["matrices"].values() if m["role"] == "q")
    assert q["stable_rank"] == pytest.approx(q["null"]["stable_rank"], rel=0.3)


def test_cli_two_models_and_missing(tiny_t5, tmp_path, capsys):
    assert main(["--model", tiny_t5, tiny_t5, "--n-null", "1", "--out-dir", str(tmp_path), "--plots-dir",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stable rank" in out and "T5 relative bias (encoder)" in out
    assert (tmp_path / "weights_comparison.png").exists()
    js = list(tmp_path.glob("weights_*.json"))
    assert js and json.loads(js[0].read_text())["model_type"] == "t5"
    assert main(["--model", str(tmp_path / "absent"), "--out-dir", str(tmp_path)]) == 2
    assert "not available offline" in capsys.readouterr().err
