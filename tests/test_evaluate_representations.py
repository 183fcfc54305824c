"""Representation extraction and per-layer metrics: stitching, planted structure, CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from evaluate_representations import EvalError, extract, layer_metrics, main, parse_layers


class PositionProbe(nn.Module):
    """Layer 'input' returns x; layer 'where' returns each step's offset inside its window."""
    layer_names = ["input", "where"]

    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, x, return_hidden=False):
        where = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None].expand(x.shape[0], -1, 1)
        return x, [x, where]


@pytest.mark.parametrize("causal", [False, True])
def test_extraction_keeps_full_context_positions_once(causal):
    T, W, C = 3000, 128, 32
    X = np.random.default_rng(0).standard_normal((T, 3)).astype(np.float32)
    positions = np.arange(T)
    (rep, where), pos, wst = extract(PositionProbe(causal), X, positions, [0, 1], W, C, causal, "cpu", batch_size=7)
    assert len(np.unique(pos)) == len(pos)  # each position once
    np.testing.assert_array_equal(where[:, 0], pos - wst)  # the window each position was read in
    np.testing.assert_array_equal(rep, X[pos])  # stitched back to the right time steps
    w = where[:, 0]
    assert w.min() >= C
    if causal:
        assert w.max() <= W - 1
    else:
        assert w.max() < W - C
    # every position with full context in the series is covered up to the last whole window
    lo = C
    assert pos.min() == lo and len(pos) > T - 2 * W


def test_extraction_of_a_subset():
    X = np.random.default_rng(1).standard_normal((2000, 2)).astype(np.float32)
    want = np.array([100, 101, 500, 1500])
    (rep,), pos, wst = extract(PositionProbe(), X, want, [0], 64, 16, False, "cpu")
    np.testing.assert_array_equal(np.sort(pos), want)


def test_unknown_layer_is_a_clear_error():
    assert parse_layers("input,2,output", ["input", "1", "2", "output"]) == ["input", "2", "output"]
    with pytest.raises(EvalError, match="unknown layer"):
        parse_layers("input,9", ["input", "1", "output"])


def planted(n_per=400, n_states=5, dim=16, noise=0.001, seed=0):
    """Separated noisy circles (one per state, each in its own plane, offset centres)."""
    rng = np.random.default_rng(seed)
    Z, s, th = [], [], []
    for c in range(n_states):
        t = rng.uniform(0, 2 * np.pi, n_per)
        basis = np.linalg.qr(rng.standard_normal((dim, 2)))[0]
        centre = 10 * rng.standard_normal(dim)
        Z.append(centre + (np.stack([np.cos(t), np.sin(t)], 1) @ basis.T) + noise * rng.standard_normal((n_per, dim)))
        s.append(np.full(n_per, c))
        th.append(t)
    order = np.random.default_rng(seed + 1).permutation(n_per * n_states)
    return np.concatenate(Z)[order], np.concatenate(s)[order], np.concatenate(th)[order]


def test_metrics_on_planted_clusters_and_on_noise():
    Z, s, th = planted()
    n = len(Z)
    pos = np.arange(n)
    res = layer_metrics(Z, s, th, pos, np.arange(n), ks=[10, 30], n_clusters=5, probe_split=int(0.6 * n), gap=10,
                        rng=np.random.default_rng(0), pca=None, lb=True, seed=0)
    assert res["kmeans_ari"] > 0.99 and res["kmeans_nmi"] > 0.99
    assert res["silhouette"] > 0.8
    assert res["probe_state_acc"] > 0.99
    assert res["lb"]["10"]["mle"] == pytest.approx(1.0, abs=0.25)  # 1-D curves
    # the same mean and covariance without the curves is far from 1-D
    assert res["lb"]["10"]["null_gaussian"] > 3 * res["lb"]["10"]["mle"]
    noise = np.random.default_rng(5).standard_normal(Z.shape)
    r0 = layer_metrics(noise, s, th, pos, np.arange(n), ks=[10], n_clusters=5, probe_split=int(0.6 * n), gap=10,
                       rng=np.random.default_rng(0), pca=None, lb=False, seed=0)
    assert abs(r0["kmeans_ari"]) < 0.02
    assert r0["probe_state_acc"] < r0["probe_state_chance"] + 0.08
    assert r0["probe_phase_r2"] < 0.05


def test_belief_probes_find_a_planted_linear_belief_and_not_noise():
    rng = np.random.default_rng(0)
    n, C = 3000, 4
    logits = rng.standard_normal((n, C)) * 3
    circle = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ang = rng.uniform(0, 2 * np.pi, n)
    beliefs = {"circle": circle, "cos": np.cos(ang), "sin": np.sin(ang), "next_mean": rng.standard_normal((n, 5))}
    # a representation that holds the beliefs linearly (mixed by a random map) plus small noise
    Y = np.concatenate([circle, np.cos(ang)[:, None], np.sin(ang)[:, None], beliefs["next_mean"]], 1)
    Z = Y @ rng.standard_normal((Y.shape[1], 24)) + 0.01 * rng.standard_normal((n, 24))
    s = circle.argmax(1)
    kw = {"ks": [10], "n_clusters": C, "probe_split": 2000, "gap": 10, "rng": rng, "pca": None, "lb": False, "seed": 0,
          "beliefs": beliefs}
    res = layer_metrics(Z, s, ang, np.arange(n), np.arange(n), **kw)
    for k in ("belief_circle_r2", "belief_phase_r2", "belief_next_r2"):
        assert res[k] > 0.99, k
    r0 = layer_metrics(rng.standard_normal((n, 24)), s, ang, np.arange(n), np.arange(n), **kw)
    for k in ("belief_circle_r2", "belief_phase_r2", "belief_next_r2"):
        assert r0[k] < 0.03, k


def test_beliefs_at_read_each_position_from_its_own_window(small_data_dir):
    import oracle
    from dataset import load_series
    series = load_series(small_data_dir)
    chain = oracle.Chain.from_series(series)
    starts = np.array([1000, 5000, 1000, 7000])
    offs = np.array([10, 63, 40, 0])
    for causal in (False, True):
        got = oracle.beliefs_at(chain, series.X, starts, offs, 64, causal, memory_mb=1)  # one window per batch
        for i, (s0, o) in enumerate(zip(starts, offs)):
            one = oracle.beliefs(chain, series.X[None, s0:s0 + 64], causal)
            for k in got:
                np.testing.assert_allclose(got[k][i], one[k][0, o], atol=1e-12)


@pytest.fixture(scope="module")
def tiny_checkpoint(small_data_dir, tmp_path_factory):
    from masked_model_gpu import main as train
    out = tmp_path_factory.mktemp("run")
    assert train(["--data-dir", small_data_dir, "--out-dir", str(out), "--epochs", "1", "--seq-len", "64",
                  "--stride", "64", "--batch-size", "16", "--d-model", "16", "--n-heads", "2", "--n-layers", "2",
                  "--d-ff", "32", "--mask-patch-size", "4", "--no-train-eval"]) == 0
    return str(out / "best.pt")


def test_cli_end_to_end(tiny_checkpoint, small_data_dir, tmp_path, capsys):
    assert main(["--checkpoint", tiny_checkpoint, "--data-dir", small_data_dir, "--lb-points", "600",
                 "--metric-points", "1500", "--umap-points", "300", "--out-dir", str(tmp_path / "o"),
                 "--plots-dir", str(tmp_path / "p"), "--layers", "input,2,output", "--control"]) == 0
    out = capsys.readouterr().out
    assert "| input |" in out and "| output |" in out and "random init" in out
    res = json.loads((tmp_path / "o" / "representation_metrics.json").read_text())
    assert list(res["layers"]) == ["input", "2", "output"]
    assert set(res["layers"]["2"]["lb"]) == {"10", "30", "100"}
    # the input layer does not depend on the weights: trained and control agree exactly
    assert res["layers"]["input"]["kmeans_ari"] == res["random_init_control"]["input"]["kmeans_ari"]
    assert res["layers"]["input"]["belief_circle_r2"] == res["random_init_control"]["input"]["belief_circle_r2"]
    assert "belief circle R^2" in out and "belief_next_r2" not in res["layers"]["2"]  # bidirectional model
    for f in ("representation_umap.png", "representation_metrics.png"):
        assert (tmp_path / "p" / f).exists()
    assert (tmp_path / "o" / "representation_metrics.csv").read_text().count("\n") == 7


def test_cli_bad_input(tiny_checkpoint, tmp_path, capsys):
    from markov_circles_timeseries import main as gen
    gen(["--n-steps", "5000", "--ambient-dim", "8", "--out-dir", str(tmp_path / "d8"), "--no-plot"])
    assert main(["--checkpoint", tiny_checkpoint, "--data-dir", str(tmp_path / "d8"), "--no-umap"]) == 2
    assert "8-D" in capsys.readouterr().err
    assert main(["--checkpoint", tiny_checkpoint, "--layers", "input,7", "--no-umap"]) == 2
    assert "unknown layer" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_earlier_outputs_need_force_and_are_replaced_whole(tiny_checkpoint, small_data_dir, tmp_path, capsys):
    args = ["--checkpoint", tiny_checkpoint, "--data-dir", small_data_dir, "--lb-points", "300",
            "--metric-points", "600", "--umap-points", "200", "--out-dir", str(tmp_path / "o"),
            "--plots-dir", str(tmp_path / "p"), "--layers", "input,output"]
    assert main(args) == 0
    assert (tmp_path / "o" / "umap_embeddings.npz").exists()
    before = (tmp_path / "o" / "representation_metrics.json").read_text()
    capsys.readouterr()
    assert main(args + ["--no-umap"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert (tmp_path / "o" / "representation_metrics.json").read_text() == before
    assert main(args + ["--no-umap", "--force"]) == 0
    # the UMAP outputs of the earlier run do not survive beside the new metrics
    assert not (tmp_path / "o" / "umap_embeddings.npz").exists()
    assert not (tmp_path / "p" / "representation_umap.png").exists()
    assert (tmp_path / "p" / "representation_metrics.png").exists()
