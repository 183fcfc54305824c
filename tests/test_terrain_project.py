"""Cross-model projection: planted rotations are recovered, the shuffled control fails,
least squares over-fits few anchors, retrieval ranks equal a naive count, and the
pipeline runs on two MiniLM checkpoints and two MiniLM layers."""
import json

import numpy as np
import pytest

from terrain import project as PJ


def rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def planted(n=3000, d=32, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * np.linspace(2, 0.5, d)
    R0 = rotation(d, rng)
    Y = 3.0 * X @ R0 + 1.5 + noise * rng.standard_normal((n, d))
    return X, Y, R0


def test_procrustes_recovers_a_planted_rotation_and_scale():
    X, Y, R0 = planted(noise=0.0)
    R, s = PJ.procrustes(X - X.mean(0), Y - Y.mean(0))
    np.testing.assert_allclose(R, R0, atol=1e-8)
    assert s == pytest.approx(3.0)


def test_align_scores_planted_map_and_control():
    X, Y, _ = planted()
    tokens = [f"t{i}" for i in range(len(X) - 10)] + [str(d) for d in range(10)]
    res = PJ.align(X, Y, tokens, n_anchors=1000, n_test=1000, seed=1)
    pr, ctl = res["methods"]["procrustes"], res["methods"]["shuffled_control"]
    assert pr["cosine_mean"] > 0.99 and pr["top1"] > 0.99
    assert abs(ctl["cosine_mean"]) < 0.1 and ctl["top1"] < 0.02
    # an orthogonal map keeps every cosine among the source's own rows, so RSA cannot tell
    # a right alignment from a shuffled one: both equal the source-target RSA
    assert ctl["rsa"]["pearson"] == pytest.approx(pr["rsa"]["pearson"], abs=0.02)
    assert pr["digits"]["structure_pearson"] > 0.99
    assert res["n_anchors"] == 1000 and res["n_test"] == 1000


def test_least_squares_overfits_few_anchors():
    X, Y, _ = planted(n=2000, d=64, noise=1.0, seed=2)
    tokens = [f"t{i}" for i in range(len(X))]
    res = PJ.align(X, Y, tokens, n_anchors=80, n_test=1000, ridge=1e-8, seed=0)
    ls, pr = res["methods"]["least_squares"], res["methods"]["procrustes"]
    assert ls["anchor_cosine_mean"] > pr["anchor_cosine_mean"]      # fits the anchors better
    assert ls["cosine_mean"] < pr["cosine_mean"]                      # and generalises worse


def test_pca_to_the_narrower_width():
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((2500, 12)) * np.linspace(3, 1, 12)
    B = np.linalg.qr(rng.standard_normal((40, 12)))[0]                # 12-D subspace of 40-D
    X = Z @ B.T + 0.01 * rng.standard_normal((2500, 40))
    Y = Z @ rotation(12, rng)
    res = PJ.align(X, Y, [f"t{i}" for i in range(2500)], n_anchors=1000, n_test=1000)
    assert res["width"] == 12 and res["pca"]["source_variance_kept"] > 0.999
    assert res["methods"]["procrustes"]["cosine_mean"] > 0.99


def test_retrieval_ranks_equal_naive_count():
    rng = np.random.default_rng(4)
    P, Y = rng.standard_normal((50, 6)), rng.standard_normal((50, 6))
    ranks = PJ.retrieval(P, Y, block=7)
    Pu, Yu = PJ.unit(P), PJ.unit(Y)
    naive = [1 + sum(Pu[i] @ Yu[j] > Pu[i] @ Yu[i] for j in range(50)) for i in range(50)]
    assert ranks.tolist() == naive


def test_bad_space_spec():
    with pytest.raises(PJ.TerrainError):
        PJ.parse_space("minilm@last")
    assert PJ.parse_space("minilm") == ("minilm", "embed")
    assert PJ.parse_space("/a/b@3") == ("/a/b", "3")


def test_two_minilm_checkpoints(tmp_path):
    """A copy of MiniLM whose embedding matrix is rotated: Procrustes undoes the rotation."""
    import torch
    from transformers import AutoTokenizer

    from terrain.models import load_model, resolve_model_name
    model, _ = load_model(None)
    W = model.get_input_embeddings().weight
    R0 = torch.tensor(rotation(W.shape[1], np.random.default_rng(5)), dtype=W.dtype)
    with torch.no_grad():
        W.copy_(W @ R0)
    model.save_pretrained(tmp_path / "rotated")
    AutoTokenizer.from_pretrained(resolve_model_name(None), local_files_only=True).save_pretrained(
        tmp_path / "rotated")
    out = tmp_path / "out"
    assert PJ.main(["--source", "minilm", "--target", str(tmp_path / "rotated"), "--anchors", "2000",
                    "--test", "1000", "--out-dir", str(out)]) == 0
    res = json.load(open(next(out.glob("project_*.json"))))
    assert res["methods"]["procrustes"]["cosine_mean"] > 0.999
    assert res["methods"]["procrustes"]["top1"] == 1.0
    assert res["methods"]["shuffled_control"]["cosine_mean"] < 0.2


def test_two_minilm_layers(tmp_path):
    assert PJ.main(["--source", "minilm@1", "--target", "minilm@2", "--anchors", "1500", "--test", "800",
                    "--out-dir", str(tmp_path)]) == 0
    res = json.load(open(next(tmp_path.glob("project_*.json"))))
    pr, ctl = res["methods"]["procrustes"], res["methods"]["shuffled_control"]
    assert pr["cosine_mean"] > ctl["cosine_mean"] + 0.3 and pr["top1"] > 10 * max(ctl["top1"], 1e-3)
    assert len(pr["residual_eigenvalues"]) == 384


def test_extreme_tokens_and_simplex_volumes_of_a_planted_rotation():
    """Noise-free rotation and scale: projected points are the native ones up to a scale, so every
    simplex volume scales by the same factor (CV equal, Spearman 1). The best and worst tokens are the extremes of the per-token cosines, and tokens
    planted off the map are the worst."""
    X, Y, _ = planted(n=2000, noise=0.0)
    tokens = [f"t{i}" for i in range(len(X))]
    res = PJ.align(X, Y, tokens, n_anchors=1000, n_test=1000, seed=2, n_simplices=500, n_extreme=5)
    pr, ctl = res["methods"]["procrustes"], res["methods"]["shuffled_control"]
    assert pr["simplex_cv"]["spearman_with_native"] > 0.999
    assert pr["simplex_cv"]["cv"] == pytest.approx(res["native_simplex_cv"]["cv"], rel=1e-6)
    # volumes are invariant to any rotation with a global scale: the shuffled Procrustes control
    # keeps them too, so volumes say nothing about which rotation a map found
    assert ctl["simplex_cv"]["spearman_with_native"] > 0.999
    nat = res["native_simplex_cv"]
    assert nat["ci"][0] <= nat["cv"] <= nat["ci"][1] and nat["null_isotropic_exact"] > 0
    off = Y.copy()
    off[:60] = 3 * np.random.default_rng(3).standard_normal((60, Y.shape[1])) * Y.std()   # 60 tokens off the map
    res = PJ.align(X, off, tokens, n_anchors=1000, n_test=1000, seed=2, n_simplices=50, n_extreme=5)
    pr = res["methods"]["procrustes"]
    cos = np.array(pr["cosines"])
    assert [c for _, c in pr["best_tokens"]] == pytest.approx(sorted(cos)[::-1][:5])
    assert [c for _, c in pr["worst_tokens"]] == pytest.approx(sorted(cos)[:5])
    assert all(int(t[1:]) < 60 for t, _ in pr["worst_tokens"]) and all(int(t[1:]) >= 60 for t, _ in pr["best_tokens"])
