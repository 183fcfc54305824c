"""terrain.metrics against analytic values and Monte Carlo."""
import math

import numpy as np
import pytest

from terrain.metrics import (cayley_menger_volume, coefficient_of_variation, components_for_variance,
                             condition_number, cosine_stats, entropy_effective_rank, gaussian_volume_cv,
                             gram_volume, hoyer, participation_ratio, random_like, sample_simplex_volumes,
                             sparsity, stable_rank, with_null)


def regular_simplex(k):
    """k+1 vertices of a regular k-simplex with unit edges (standard basis of R^(k+1) / sqrt 2)."""
    return np.eye(k + 1) / math.sqrt(2)


@pytest.mark.parametrize("k", range(1, 8))
def test_regular_simplex_volume(k):
    expected = math.sqrt(k + 1) / (math.factorial(k) * 2 ** (k / 2))
    P = regular_simplex(k)
    assert cayley_menger_volume(P) == pytest.approx(expected, rel=1e-10)
    assert gram_volume(P) == pytest.approx(expected, rel=1e-10)


def test_volume_methods_agree_batched_and_degenerate():
    rng = np.random.default_rng(0)
    P = rng.standard_normal((500, 5, 12))
    np.testing.assert_allclose(cayley_menger_volume(P), gram_volume(P), rtol=1e-8)
    # unit right triangle and unit cube corner tetrahedron
    assert gram_volume(np.array([[0, 0], [1, 0], [0, 1.0]])) == pytest.approx(0.5)
    assert cayley_menger_volume(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])) == pytest.approx(1 / 6)
    line = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2.0]])
    assert gram_volume(line) == pytest.approx(0, abs=1e-12)
    assert cayley_menger_volume(line) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("k,d", [(1, 1), (2, 3), (4, 5), (4, 20), (4, 128)])
def test_gaussian_volume_cv_exact_vs_monte_carlo(k, d):
    rng = np.random.default_rng(k * 1000 + d)
    v = gram_volume(rng.standard_normal((60000, k + 1, d)))
    assert coefficient_of_variation(v) == pytest.approx(gaussian_volume_cv(k, d), rel=0.03)


def test_gaussian_volume_cv_limits():
    # k = 1, d = 1: |x - y| is half-normal, CV = sqrt(pi/2 - 1)
    assert gaussian_volume_cv(1, 1) == pytest.approx(math.sqrt(math.pi / 2 - 1), rel=1e-12)
    # in high dimension chi_nu / sqrt(nu) concentrates with variance 1 / (2 nu): CV ~ sqrt(k / 2d)
    assert gaussian_volume_cv(4, 4096) == pytest.approx(math.sqrt(4 / (2 * 4096)), rel=0.01)
    with pytest.raises(ValueError):
        gaussian_volume_cv(5, 4)


def test_sampled_volumes_of_a_cloud():
    X = np.random.default_rng(1).standard_normal((400, 10))
    v = sample_simplex_volumes(X, k=4, n_samples=20000)
    assert coefficient_of_variation(v) == pytest.approx(gaussian_volume_cv(4, 10), rel=0.05)
    with pytest.raises(ValueError, match="needs 5 points"):
        sample_simplex_volumes(X[:3], k=4)


def test_spectral_measures_on_known_spectra():
    flat = np.ones(10)
    assert participation_ratio(flat) == pytest.approx(10)
    assert participation_ratio(np.r_[1.0, np.zeros(9)]) == pytest.approx(1)
    assert entropy_effective_rank(flat) == pytest.approx(10)
    assert stable_rank(flat) == pytest.approx(10)
    u, v = np.random.default_rng(2).standard_normal((2, 30))
    rank1 = np.outer(u, v)
    assert stable_rank(np.linalg.svd(rank1, compute_uv=False)) == pytest.approx(1)
    Q = np.linalg.qr(np.random.default_rng(3).standard_normal((16, 16)))[0]
    s = np.linalg.svd(Q, compute_uv=False)
    assert stable_rank(s) == pytest.approx(16) and condition_number(s) == pytest.approx(1)
    assert condition_number(np.array([2.0, 0.0])) == math.inf
    # variance shares by sigma^2: spectrum sigma^2 = 50, 30, 15, 4, 1 (%)
    sigma = np.sqrt([50, 30, 15, 4, 1.0])
    assert components_for_variance(sigma) == {0.8: 2, 0.9: 3, 0.95: 3, 0.99: 4}


def test_hoyer_and_sparsity():
    assert hoyer(np.r_[1.0, np.zeros(99)]) == pytest.approx(1)
    assert hoyer(np.ones(100)) == pytest.approx(0)
    W = np.random.default_rng(4).standard_normal((64, 64)) * 0.02
    a, b = sparsity(W), sparsity(100 * W)
    # relative measures are scale-free; absolute ones only track the scale
    assert a["frac_below_0.1_rms"] == b["frac_below_0.1_rms"] and a["hoyer"] == pytest.approx(b["hoyer"])
    assert a["frac_abs_below_0.1"] == 1.0 and b["frac_abs_below_0.1"] < 0.05
    # for a Gaussian, P(|w| < 0.1 sigma) = erf(0.1 / sqrt 2)
    assert a["frac_below_0.1_rms"] == pytest.approx(math.erf(0.1 / math.sqrt(2)), abs=0.01)


def test_cosine_stats():
    rng = np.random.default_rng(5)
    iso = cosine_stats(rng.standard_normal((5000, 64)))
    assert abs(iso["mean"]) < 0.01 and iso["anisotropy"] < 0.01
    assert iso["std"] == pytest.approx(1 / math.sqrt(64), rel=0.05)  # cosine of random directions
    shifted = cosine_stats(rng.standard_normal((5000, 64)) + 3.0)
    assert shifted["mean"] > 0.85 and shifted["anisotropy"] > 0.85


def test_null_separates_structure_from_chance():
    rng = np.random.default_rng(6)
    G = rng.standard_normal((128, 128))
    sr = lambda M: stable_rank(np.linalg.svd(M, compute_uv=False))  # noqa: E731
    chance = with_null(sr, G, n_null=20, rng=rng)
    assert abs(chance["z"]) < 4
    low = rng.standard_normal((128, 4)) @ rng.standard_normal((4, 128))
    structured = with_null(sr, low, n_null=20, rng=rng)
    assert structured["value"] < 4 < structured["null_mean"] and structured["z"] < -10
    R = random_like(low, rng)
    assert R.shape == low.shape and np.sqrt(np.mean(R ** 2)) == pytest.approx(np.sqrt(np.mean(low ** 2)), rel=0.02)


def test_distances_and_cosines_of_unit_rows_agree_pair_by_pair():
    from terrain.metrics import distance_stats
    X = np.random.default_rng(1).standard_normal((400, 16)) + 0.5
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    c = cosine_stats(X, n_pairs=5000, rng=np.random.default_rng(7))
    d = distance_stats(X, n_pairs=5000, rng=np.random.default_rng(7))      # the same pairs
    assert d["mean_squared"] == pytest.approx(2 - 2 * c["mean"], rel=1e-12)
    assert sum(d["histogram"]["counts"]) == 5000 and d["q05"] <= d["median"] <= d["q95"]
    # isotropic Gaussian in D dimensions: squared distance has mean 2D
    G = np.random.default_rng(2).standard_normal((3000, 50))
    assert distance_stats(G, 20000)["mean_squared"] == pytest.approx(100, rel=0.02)


def test_centroid_similarity_recovers_planted_centre_angles():
    from terrain.metrics import centroid_similarity
    rng = np.random.default_rng(0)
    d = 40
    e = np.eye(d)
    centres = np.stack([e[0], 0.5 * e[0] + math.sqrt(0.75) * e[1], e[2]])    # cosines 0.5, 0, 0
    pool = rng.standard_normal((2000, d))
    X = np.concatenate([pool] + [c + 1e-4 * rng.standard_normal((12, d)) for c in centres])
    groups = {f"g{k}": 2000 + 12 * k + np.arange(12) for k in range(3)}
    res = centroid_similarity(X, groups, np.arange(2000), n_null=100, rng=rng)
    M = np.array(res["matrix"])
    np.testing.assert_allclose(M, centres @ centres.T, atol=1e-3)
    assert res["null_mean_off_diagonal"] == pytest.approx(0, abs=0.05)
    assert np.array(res["z"])[0, 1] > 2          # null sd ~ 1/sqrt(d) = 0.16


def test_space_alignment_tied_rotated_and_shuffled():
    from terrain.metrics import space_alignment
    rng = np.random.default_rng(0)
    A = rng.standard_normal((600, 12)) @ np.diag(np.linspace(3, 0.2, 12))
    tied = space_alignment(A, A.copy(), rng=rng)
    assert tied["identical"] and tied["row_cosine"]["mean"] == pytest.approx(1)
    assert tied["procrustes_r2"] == pytest.approx(1) and tied["cka"] == pytest.approx(1)
    Q = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    rot = space_alignment(A, A @ Q, rng=rng)        # a rotation: different rows, the same space
    assert not rot["identical"] and rot["row_cosine"]["mean"] < 0.9
    assert rot["procrustes_r2"] == pytest.approx(1) and rot["cka"] == pytest.approx(1)
    assert rot["null_procrustes_r2"] < 0.3 and rot["null_cka"] < 0.3
    pr = participation_ratio(np.linspace(3, 0.2, 12) ** 2)
    assert rot["participation_ratio"][1] == pytest.approx(pr, rel=0.15)
    with pytest.raises(ValueError):
        space_alignment(A, A[:, :5])
