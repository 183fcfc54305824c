"""terrain.linalg: Gram-route spectra and subspaces against the SVD, low-rank head forms against
the dense forms, and the analytic Gaussian nulls against Monte Carlo."""
import numpy as np
import pytest

from terrain import linalg as LA
from terrain import metrics as M
from terrain.models import HeadLayout, attention_forms
from terrain.weights import form_stats, head_stats, neuron_importance, neuron_stats, null_importance


@pytest.mark.parametrize("shape", [(120, 300), (300, 120), (200, 200)])
@pytest.mark.parametrize("dense_max", [LA.DENSE_EIGH_MAX, 10])  # 10: the BLAS syrk route of large matrices
def test_gram_spectrum_equals_svdvals(shape, dense_max, monkeypatch):
    monkeypatch.setattr(LA, "DENSE_EIGH_MAX", dense_max)
    rng = np.random.default_rng(0)
    W = rng.standard_normal(shape) * np.linspace(0.1, 3, shape[1])  # uneven spectrum
    s, _, _ = LA.spectrum_and_subspace(W.astype(np.float32))
    ref = np.linalg.svd(W.astype(np.float32).astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s, ref, rtol=1e-9, atol=1e-9 * ref[0])


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("shape", [(150, 400), (400, 150)])
@pytest.mark.parametrize("dense_max", [LA.DENSE_EIGH_MAX, 10])  # 10: forces the Chebyshev route
def test_top_subspace_equals_svd(side, shape, dense_max, monkeypatch):
    monkeypatch.setattr(LA, "DENSE_EIGH_MAX", dense_max)
    rng = np.random.default_rng(1)
    W = rng.standard_normal(shape)
    _, V, method = LA.spectrum_and_subspace(W, 12, side)
    U, _, Vt = np.linalg.svd(W, full_matrices=False)
    ref = U[:, :12] if side == "out" else Vt[:12].T
    assert V.shape == ref.shape
    assert np.sum((ref.T @ V) ** 2) / 12 == pytest.approx(1.0, abs=1e-8)  # same subspace
    assert ("chebyshev" in method) == (dense_max == 10)


def test_chebyshev_reports_failure_and_falls_back(monkeypatch):
    """With no rounds allowed the filter cannot converge; the result must still be exact."""
    monkeypatch.setattr(LA, "DENSE_EIGH_MAX", 10)
    real = LA.chebyshev_top_eigvecs
    monkeypatch.setattr(LA, "chebyshev_top_eigvecs", lambda G, lam, r: real(G, lam, r, degree=1, rounds=1))
    W = np.random.default_rng(2).standard_normal((300, 300))
    _, V, method = LA.spectrum_and_subspace(W, 8, "in")
    assert "did not converge" in method
    Vt = np.linalg.svd(W)[2]
    assert np.sum((Vt[:8] @ V) ** 2) / 8 == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("heads", [(4, 8, 4), (6, 5, 2)])
def test_low_rank_head_forms_equal_the_dense_forms(heads):
    H, dh, Hkv = heads
    rng = np.random.default_rng(3)
    Wq, Wk = rng.standard_normal((H * dh, 24)), rng.standard_normal((Hkv * dh, 24))
    Wk[:dh] = Wq[:dh]  # one symmetric PSD head: asymmetry 0, positive share 1
    dense = form_stats(attention_forms(Wq, Wk, HeadLayout(H, dh, Hkv)))
    low = LA.form_stats_from_grams(LA.head_grams(Wq, Wk, H, dh, Hkv))
    np.testing.assert_allclose(low["asymmetry"], dense["asymmetry"], atol=1e-10)
    np.testing.assert_allclose(low["positive_share"], dense["positive_share"], atol=1e-10)
    assert low["asymmetry"][0] == pytest.approx(0, abs=1e-7) and low["positive_share"][0] == pytest.approx(1.0)


def test_head_stats_refuse_a_layout_that_does_not_fit():
    with pytest.raises(ValueError, match="do not split"):
        head_stats(np.ones((24, 8)), np.ones((24, 8)), HeadLayout(4, 8, 4), np.random.default_rng(0), 1)


def test_wishart_null_matches_full_gaussian_heads():
    """The head null from Bartlett-sampled Gram matrices has the distribution of the head
    statistics of full Gaussian q, k: compare means and spreads with the dense Monte Carlo."""
    rng = np.random.default_rng(4)
    dh, d, n = 4, 40, 600
    bart = LA.form_stats_from_grams(LA.wishart_identity(2 * dh, d, n, rng))
    full = form_stats(attention_forms(rng.standard_normal((n * dh, d)), rng.standard_normal((n * dh, d)),
                                      HeadLayout(n, dh, n)))
    for key in ("asymmetry", "positive_share"):
        a, b = np.array(bart[key]), np.array(full[key])
        se = np.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 4 * se, key
        assert a.std() == pytest.approx(b.std(), rel=0.15), key


@pytest.mark.parametrize("shape", [(64, 64), (100, 300), (400, 150)])
def test_analytic_matrix_nulls_agree_with_monte_carlo(shape):
    rng = np.random.default_rng(5)
    draws = [rng.standard_normal(shape) * 0.02 for _ in range(40)]
    sv = [np.linalg.svd(R, compute_uv=False) for R in draws]
    mc = {"stable_rank": [M.stable_rank(s) for s in sv],
          "participation_ratio_sigma2": [M.participation_ratio(s ** 2) for s in sv],
          "entropy_effective_rank": [M.entropy_effective_rank(s) for s in sv],
          "hoyer": [M.hoyer(R) for R in draws],
          "frac_below_0.1_rms": [M.sparsity(R)["frac_below_0.1_rms"] for R in draws]}
    an = LA.analytic_matrix_null(shape)
    for key, vals in mc.items():
        vals = np.array(vals)
        se = vals.std(ddof=1) / np.sqrt(len(vals))
        # within 4 standard errors of the Monte Carlo mean, or 0.5% where the spread is tiny
        assert abs(an[key] - vals.mean()) < max(4 * se, 5e-3 * abs(vals.mean())), (key, an[key], vals.mean())


def test_marchenko_pastur_entropy_rank_at_the_square_limit():
    """At ratio 1 the MP law has a 1/sqrt(x) pole; E[sqrt x] = 8 / (3 pi) there exactly."""
    m1, _ = LA._mp_moments(1.0)
    assert m1 == pytest.approx(8 / (3 * np.pi), rel=1e-6)


def test_neuron_null_from_chi_equals_gaussian_matrices():
    rng = np.random.default_rng(6)
    full = [neuron_stats(neuron_importance(rng.standard_normal((500, 8)), rng.standard_normal((8, 500)),
                                           rng.standard_normal((500, 8))))["cv"] for _ in range(30)]
    chi = [neuron_stats(null_importance([8, 8, 8], 500, rng))["cv"] for _ in range(30)]
    se = np.sqrt(np.var(full) / 30 + np.var(chi) / 30)
    assert abs(np.mean(full) - np.mean(chi)) < 4 * se
