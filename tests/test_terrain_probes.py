"""terrain.embeddings and terrain.layers: planted structure, then the real MiniLM."""
import json
import os

import numpy as np
import pytest

from terrain.embeddings import category_lift, digit_structure
from terrain.embeddings import main as embeddings_main
from terrain.layers import main as layers_main
from terrain.layers import pairwise_cos_mean, shuffled


def test_digit_structure_planted_and_random():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1.2, 10)  # digits along an arc: cosine falls with |i - j|
    arc = np.stack([np.cos(t), np.sin(t)], 1) @ rng.standard_normal((2, 16)) + 0.01 * rng.standard_normal((10, 16))
    d = digit_structure(arc, n_perm=500, rng=rng)
    assert d["spearman_gap_cos"] < -0.9 and d["p_value"] < 0.01 and d["adjacent_cos"] > d["nonadjacent_cos"]
    # for structureless vectors the permutation p-value is uniform: calibrated at 5%
    ps = np.array([digit_structure(rng.standard_normal((10, 16)), n_perm=200, rng=rng)["p_value"]
                   for _ in range(100)])
    assert np.mean(ps < 0.05) < 0.13 and 0.35 < ps.mean() < 0.65


def test_category_lift_planted_and_random():
    rng = np.random.default_rng(1)
    E = rng.standard_normal((2000, 32))
    E[:10] += 3 * rng.standard_normal(32)  # a planted category: rows 0..9 share a direction
    hit = category_lift(E, list(range(10)), np.arange(10, 2000), n_random=300, rng=rng)
    miss = category_lift(E, list(range(100, 110)), np.arange(10, 2000), n_random=300, rng=rng)
    assert hit["z"] > 10 and hit["lift"] > 0.5
    assert abs(miss["z"]) < 3


def test_pairwise_cosine_and_shuffle():
    rng = np.random.default_rng(2)
    H = rng.standard_normal((300, 8))
    U = H / np.linalg.norm(H, axis=1, keepdims=True)
    C = U @ U.T
    assert pairwise_cos_mean(H) == pytest.approx(C[np.triu_indices(300, 1)].mean(), abs=1e-12)
    offset = H + 5.0  # a common offset survives the shuffle; token structure does not
    assert pairwise_cos_mean(shuffled(offset, rng)) == pytest.approx(pairwise_cos_mean(offset), abs=0.02)


def test_minilm_probes(tmp_path, capsys):
    assert embeddings_main(["--out-dir", str(tmp_path), "--n-simplices", "800", "--plots-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "embeddings_minilm.json").read_text())
    assert res["shape"] == [30522, 384]
    assert res["digits"]["spearman_gap_cos"] < -0.5  # MiniLM orders its digits
    assert res["categories"]["colours"]["z"] > 5
    assert res["simplex_cv"]["null_isotropic_exact"] == pytest.approx(0.0722, abs=0.001)
    assert res["head"]["tied"] and res["head"]["identical"] and res["head"]["procrustes_r2"] == pytest.approx(1)
    assert layers_main(["--out-dir", str(tmp_path), "--plots-dir", str(tmp_path)]) == 0
    lay = json.loads((tmp_path / "layers_minilm.json").read_text())
    assert len(lay["states"]) == 7 and all(s["after_layer_norm"] for s in lay["states"])  # BERT is post-LN
    assert (tmp_path / "layers_minilm.png").exists() and (tmp_path / "embeddings_minilm.png").exists()
    assert layers_main(["--sentences-file", str(tmp_path / "none.txt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_untied_output_head_and_special_tokens(tmp_path):
    """A tiny Qwen2 with an untied head: the probe reads lm_head from the checkpoint and its
    per-token cosine with the embedding matches one computed from the model; MiniLM's own
    special tokens form their group; a tied model reads as identical."""
    import shutil

    import torch
    import transformers as tf

    from terrain.models import minilm_path
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=30522, tie_word_embeddings=False)
    model = tf.Qwen2ForCausalLM(cfg)
    folder = tmp_path / "qwen2"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_path(), f), folder / f)
    assert embeddings_main(["--model", str(folder), "--n-simplices", "200", "--out-dir", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("embeddings_*.json")).read_text())
    E = model.get_input_embeddings().weight.detach().double()
    H = model.lm_head.weight.detach().double()
    cos = torch.nn.functional.cosine_similarity(E, H, dim=1).mean().item()
    assert not res["head"]["tied"] and not res["head"]["identical"]
    assert res["head"]["row_cosine"]["mean"] == pytest.approx(cos, abs=1e-6)
    assert set(res["special_tokens"]["tokens"]) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert "special" in res["centroids"]["names"] and len(res["centroids"]["matrix"]) == len(res["centroids"]["names"])
    assert res["distances"]["mean"] > 0 and res["cosines"]["null_same_covariance"]["anisotropy"] >= 0

