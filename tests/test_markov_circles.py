"""The circles generator: geometry, dynamics, noise, streams and the CLI."""
import json
import os

import numpy as np
import pytest

from markov_circles_timeseries import CirclesConfig, generate, main, summary


@pytest.fixture(scope="module")
def data():
    return generate(CirclesConfig(n_steps=60_000, seed=11))


def test_shapes_and_types(data):
    assert data["X"].shape == (60_000, 20) and data["X"].dtype == np.float32
    assert data["signal"].shape == (60_000, 20)
    assert data["states"].shape == (60_000,) and data["states"].min() >= 0 and data["states"].max() <= 9
    assert data["planes"].shape == (10, 2, 20)
    assert data["transition_matrix"].shape == (10, 10)


def test_planes_orthonormal_and_signal_on_circles(data):
    for B in data["planes"]:
        np.testing.assert_allclose(B @ B.T, np.eye(2), atol=1e-12)
    s, th = data["states"], data["thetas"]
    norms = np.linalg.norm(data["signal"].astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, data["radii"][s], rtol=1e-5)
    # the phase is recovered by projecting the signal onto the circle's own plane
    coords = np.einsum("td,tkd->tk", data["signal"].astype(np.float64), data["planes"][s])
    np.testing.assert_allclose(np.arctan2(coords[:, 1], coords[:, 0]) % (2 * np.pi), th, atol=1e-4)


@pytest.mark.parametrize("k", [2, 4, 7])
def test_subspace_dim_bounds_the_span(k):
    d = generate(CirclesConfig(n_steps=2000, subspace_dim=k, seed=2))
    sv = np.linalg.svd(d["planes"].reshape(-1, 20), compute_uv=False)
    assert np.sum(sv > 1e-9) == k
    full = generate(CirclesConfig(n_steps=2000, seed=2))
    assert np.sum(np.linalg.svd(full["planes"].reshape(-1, 20), compute_uv=False) > 1e-9) == 20


def test_radii_periods_and_transition_matrix(data):
    assert np.all((data["radii"] >= 10) & (data["radii"] <= 30))
    np.testing.assert_array_equal(data["periods"], np.arange(40, 401, 40))
    P = data["transition_matrix"]
    np.testing.assert_allclose(P.sum(1), 1.0)
    assert np.all(np.diag(P) == 0)
    for i in range(10):
        assert P[i, (i + 1) % 10] > 0 and P[i, (i - 1) % 10] > 0
        assert np.count_nonzero(P[i]) <= 3  # ring + one shortcut
    assert np.count_nonzero(P) > 20  # shortcuts exist


def test_visits_are_whole_laps_with_fixed_entry_angles(data):
    st, dw, start = data["visit_states"], data["visit_dwells"], data["visit_starts"]
    per = data["periods"][st]
    full = slice(0, len(st) - 1)  # the last visit is cut by the end of the series
    assert np.all(dw[full] % per[full] == 0) and np.all(dw[full] >= per[full])
    assert np.all(st[1:] != st[:-1])
    np.testing.assert_allclose(data["thetas"][start], data["entry_angles"][st], atol=1e-9)
    mean_dwell = dw[full].mean()
    assert 330 < mean_dwell < 480  # N(400, 100) rounded to laps of up to 400 steps


def test_empirical_transitions_follow_the_matrix():
    d = generate(CirclesConfig(n_steps=400_000, seed=5))
    st = d["visit_states"]
    counts = np.zeros((10, 10))
    np.add.at(counts, (st[:-1], st[1:]), 1)
    assert np.all(counts[d["transition_matrix"] == 0] == 0)
    freq = counts / counts.sum(1, keepdims=True)
    assert np.abs(freq - d["transition_matrix"]).max() < 0.2
    assert np.corrcoef(freq.ravel(), d["transition_matrix"].ravel())[0, 1] > 0.9


def test_noise_level_and_snr(data):
    resid = data["X"].astype(np.float64) - data["signal"]
    assert abs(resid.std() - 2.83) < 0.02
    assert abs(np.mean(resid)) < 0.02
    snr = summary(data, CirclesConfig(n_steps=60_000, seed=11))["snr"]
    assert 2.0 < snr < 3.0


def test_prefix_and_independent_streams():
    long = generate(CirclesConfig(n_steps=30_000, seed=4))
    short = generate(CirclesConfig(n_steps=7_000, seed=4))
    for key in ("X", "signal", "states", "thetas"):
        np.testing.assert_array_equal(short[key], long[key][:7_000])
    quiet = generate(CirclesConfig(n_steps=7_000, seed=4, noise_std=0.5))
    np.testing.assert_array_equal(quiet["signal"], short["signal"])
    np.testing.assert_array_equal(quiet["states"], short["states"])
    other = generate(CirclesConfig(n_steps=7_000, seed=5))
    assert not np.allclose(other["planes"], short["planes"])


def test_cli_writes_data_and_refuses_silent_overwrite(tmp_path, capsys):
    out, plots = tmp_path / "d", tmp_path / "p"
    assert main(["--n-steps", "3000", "--no-umap", "--out-dir", str(out), "--plots-dir", str(plots)]) == 0
    with np.load(out / "data.npz") as f:
        for key in ("X", "states", "thetas", "transition_matrix", "radii", "entry_angles", "periods",
                    "planes", "signal"):
            assert key in f.files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_steps"] == 3000 and cfg["noise_var"] == pytest.approx(2.83 ** 2)
    assert sorted(f for f in os.listdir(plots) if not f.startswith(".")) == [
        "overview.png", "sample_window_0.png", "sample_window_1.png", "sample_window_2.png"]  # figures only; their numbers beside the data
    assert json.loads((out / "circles_summary.json").read_text())["n_visits"] > 0
    before = (out / "data.npz").read_bytes()
    assert main(["--n-steps", "4000", "--no-plot", "--out-dir", str(out)]) == 2
    assert "exists and was written for a different configuration" in capsys.readouterr().err
    assert (out / "data.npz").read_bytes() == before
    assert main(["--n-steps", "4000", "--no-plot", "--out-dir", str(out), "--force"]) == 0


def test_cli_rejects_bad_subspace(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # below 2: refused while parsing
        main(["--subspace-dim", "1", "--out-dir", str(tmp_path), "--no-plot"])
    assert e.value.code == 2 and "--subspace-dim" in capsys.readouterr().err
    # above the ambient dimension: refused by the configuration check
    assert main(["--subspace-dim", "25", "--out-dir", str(tmp_path), "--no-plot"]) == 2
    assert "--subspace-dim" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "data.npz")
