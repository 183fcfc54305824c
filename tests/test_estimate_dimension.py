"""Levina-Bickel against analytic dimensions and against scikit-dimension."""
import os

import numpy as np
import pytest
from scipy.spatial import cKDTree

from estimate_dimension import knn_distances, lb_summary, levina_bickel, main


def sphere(rng, n, d):
    """Uniform sample of the unit d-sphere in R^(d+1)."""
    X = rng.standard_normal((n, d + 1))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.mark.parametrize("d", range(1, 8))
def test_uniform_spheres(d):
    """Up to d = 7 at n = 5000; curvature biases higher d low until n is much larger."""
    r = levina_bickel(sphere(np.random.default_rng(d), 5000, d), [10, 20], n_boot=0)
    for k in (10, 20):
        assert r.mg[k] == pytest.approx(d, rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("d", [8, 9, 10])
def test_uniform_spheres_high_dimension(d):
    r = levina_bickel(sphere(np.random.default_rng(d), 100_000, d), [10], n_boot=0)
    assert r.mg[10] == pytest.approx(d, rel=0.05)


@pytest.mark.parametrize("d", range(1, 11))
def test_uniform_cubes_with_periodic_boundary(d):
    """Unit cubes with a periodic (torus) metric have no boundary to bias the estimate."""
    C = np.random.default_rng(100 + d).random((5000, d))
    dist = cKDTree(C, boxsize=1.0).query(C, k=21)[0][:, 1:]
    r = lb_summary(dist, [10, 20], n_boot=0, unbiased=True)
    for k in (10, 20):
        assert r.mg[k] == pytest.approx(d, rel=0.05)
        assert r.mle[k] == pytest.approx(d, rel=0.05)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_uniform_cubes_euclidean(d):
    """The plain cube, boundary included, through the full sklearn path."""
    r = levina_bickel(np.random.default_rng(d).random((8000, d)), [10], n_boot=0)
    assert r.mg[10] == pytest.approx(d, rel=0.05)


def test_biased_mean_is_the_known_multiple():
    """The mean of k-1 estimates exceeds the unbiased mean by exactly (k-1)/(k-2)."""
    X = sphere(np.random.default_rng(0), 3000, 3)
    a = levina_bickel(X, [5, 12], n_boot=0)
    b = levina_bickel(X, [5, 12], n_boot=0, unbiased=True)
    for k in (5, 12):
        assert a.mle[k] == pytest.approx(b.mle[k] * (k - 1) / (k - 2), rel=1e-12)
        assert a.mg[k] == pytest.approx(b.mg[k], rel=1e-12)


@pytest.mark.parametrize("k", [5, 20, 50])
def test_agrees_with_scikit_dimension(k):
    skdim = pytest.importorskip("skdim")
    rng = np.random.default_rng(k)
    X = np.concatenate([sphere(rng, 1500, 2) @ rng.standard_normal((3, 6)),
                        rng.standard_normal((500, 6))])
    r = levina_bickel(X, [k], n_boot=0)
    est = skdim.id.MLE()
    assert est.fit(X, n_neighbors=k, comb="mean").dimension_ == pytest.approx(r.mle[k], rel=1e-8)
    assert est.fit(X, n_neighbors=k, comb="mle").dimension_ == pytest.approx(r.mg[k], rel=1e-8)
    np.testing.assert_allclose(est.dimension_pw_, r.estimates[:, 0], rtol=1e-8)


def test_many_k_from_one_query_equal_separate_queries():
    X = sphere(np.random.default_rng(1), 2000, 4)
    together = levina_bickel(X, [5, 17, 40], n_boot=0)
    for k in (5, 17, 40):
        assert levina_bickel(X, [k], n_boot=0).mle[k] == pytest.approx(together.mle[k], rel=1e-12)


def test_duplicates_are_removed_and_counted():
    X = sphere(np.random.default_rng(2), 2000, 2)
    dup = np.concatenate([X, X[:300]])
    r = levina_bickel(dup, [10], n_boot=0)
    assert r.n_duplicates == 300 and r.n_points == 2000
    assert np.isfinite(r.mle[10])
    assert r.mle[10] == pytest.approx(levina_bickel(X, [10], n_boot=0).mle[10], rel=1e-12)
    with pytest.raises(ValueError, match="duplicate"):
        levina_bickel(dup, [10], n_boot=0, dedupe=False)


def test_torch_knn_matches_sklearn():
    X = np.random.default_rng(3).standard_normal((1500, 12)).astype(np.float32)
    np.testing.assert_allclose(knn_distances(X, 30, backend="torch", chunk=256),
                               knn_distances(X, 30, backend="sklearn"), rtol=1e-5)


def test_bootstrap_interval_brackets_the_estimate_and_shrinks():
    rng = np.random.default_rng(4)
    small = levina_bickel(sphere(rng, 500, 3), [10], n_boot=300)
    big = levina_bickel(sphere(rng, 8000, 3), [10], n_boot=300)
    for r in (small, big):
        lo, hi = r.mle_ci[10]
        assert lo < r.mle[10] < hi
    assert np.diff(big.mle_ci[10])[0] < np.diff(small.mle_ci[10])[0] / 2


def test_bad_input():
    with pytest.raises(ValueError, match="more than"):
        levina_bickel(np.zeros((5, 2)) + np.arange(5)[:, None], [10])
    with pytest.raises(ValueError, match="2-D"):
        knn_distances(np.zeros(10), 3)


def test_cli_on_data_and_demo(small_data_dir, tmp_path, plots_below_tmp, capsys):
    assert main(["--data-dir", small_data_dir, "--points", "3000", "--n-boot", "20",
                 "--k", "10", "30", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| all |" in out and "circle 0" in out
    # numbers in --out-dir, the figure in the default --plots-dir plots/<out-dir's name>
    assert (tmp_path / "dimension_vs_k.json").exists() and not (tmp_path / "dimension_vs_k.png").exists()
    assert [f for f in os.listdir(plots_below_tmp / tmp_path.parent.name / tmp_path.name)
            if not f.startswith(".")] == ["dimension_vs_k.png"]
    assert main(["--demo", "--demo-points", "800", "--n-boot", "10", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "levina_bickel_demo.csv").exists()
    assert main(["--data-dir", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "m")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an earlier run's outputs are not overwritten silently
    before = (tmp_path / "dimension_vs_k.json").read_text()
    assert main(["--data-dir", small_data_dir, "--points", "3000", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0] and (tmp_path / "dimension_vs_k.json").read_text() == before
    assert main(["--data-dir", small_data_dir, "--points", "3000", "--n-boot", "20", "--k", "10",
                 "--out-dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "dimension_vs_k.json").read_text() != before
