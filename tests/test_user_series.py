"""A recorded series of one's own: read from .csv/.npz/.npy, written as a data folder, and used end to
end by both models, --eval, generate and evaluate_representations, with and without labels."""
import json

import numpy as np
import pytest

import dataset
import evaluate_representations
import mamba_next
import masked_model_gpu

MASKED = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
          "--n-layers", "1", "--d-ff", "32", "--mask-patch-size", "4", "--no-train-eval", "--epochs", "1"]
MAMBA = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-layers", "1",
         "--d-state", "4", "--d-ff", "32", "--no-train-eval", "--epochs", "1"]


def oscillator(T=4000, D=6, seed=0):
    """A noisy oscillator that switches between three frequencies, with its regime as the label."""
    rng = np.random.default_rng(seed)
    regime = np.repeat(rng.integers(0, 3, T // 200 + 1), 200)[:T]
    phase = np.cumsum(np.array([0.05, 0.11, 0.23])[regime])
    mix = rng.standard_normal((2, D))
    X = np.stack([np.cos(phase), np.sin(phase)], 1) @ mix * 3 + 0.3 * rng.standard_normal((T, D)) + 5
    return X, np.array(["slow", "mid", "fast"])[regime]


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory):
    X, lab = oscillator()
    path = tmp_path_factory.mktemp("rec") / "recording.csv"
    with open(path, "w") as f:
        f.write(",".join([f"f{i}" for i in range(X.shape[1])] + ["regime"]) + "\n")
        for row, l in zip(X, lab):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{l}\n")
    return path, X, lab


def test_reading_csv_npz_npy_agrees(csv_file, tmp_path):
    path, X, lab = csv_file
    Xc, lc, info = dataset.read_series_file(str(path), labels="regime", standardize=True)
    np.testing.assert_allclose(Xc, (X - X.mean(0)) / X.std(0), atol=1e-4)
    assert info["label_names"] == ["fast", "mid", "slow"]
    np.testing.assert_array_equal(np.array(info["label_names"])[lc], lab)
    np.savez(tmp_path / "r.npz", X=X, labels=lab)
    Xn, ln, _ = dataset.read_series_file(str(tmp_path / "r.npz"))
    np.testing.assert_allclose(Xn, X.astype(np.float32))
    np.testing.assert_array_equal(ln, lc)
    np.save(tmp_path / "r.npy", X)
    Xy, ly, _ = dataset.read_series_file(str(tmp_path / "r.npy"))
    assert ly is None and Xy.shape == X.shape
    with pytest.raises(ValueError, match="not a column"):
        dataset.read_series_file(str(path), labels="nope")
    with pytest.raises(ValueError, match="not a number"):
        dataset.read_series_file(str(path))  # the label column is text: name it


def test_labelled_series_end_to_end(csv_file, tmp_path, capsys):
    path, X, _ = csv_file
    data = tmp_path / "data"
    assert dataset.main([str(path), "--out-dir", str(data), "--labels", "regime", "--standardize"]) == 0
    cfg = json.loads((data / "config.json").read_text())
    assert cfg["generator"] is None and cfg["n_labels"] == 3 and cfg["source"].endswith("recording.csv")
    assert dataset.main([str(path), "--out-dir", str(data), "--labels", "regime"]) == 2  # exists: --force
    run = tmp_path / "m"
    assert masked_model_gpu.main(["--data-dir", str(data), "--out-dir", str(run), *MASKED]) == 0
    out = capsys.readouterr().out
    assert "no oracle" in out and "no generator parameters" in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["noise_floor"] is None and np.isfinite(m["test_mse"]) and "test_oracle_mse" not in m
    assert masked_model_gpu.main(["--eval", str(run / "best.pt"), "--plots-dir", str(tmp_path / "p")]) == 0
    assert evaluate_representations.main(["--checkpoint", str(run / "best.pt"), "--no-umap", "--lb-points", "300",
                                          "--metric-points", "800", "--out-dir", str(tmp_path / "r"),
                                          "--plots-dir", str(tmp_path / "rp")]) == 0
    res = json.loads((tmp_path / "r" / "representation_metrics.json").read_text())
    assert "probe_state_acc" in res["layers"]["1"] and "belief_circle_r2" not in res["layers"]["1"]
    b = tmp_path / "b"
    assert mamba_next.main(["train", "--data-dir", str(data), "--out-dir", str(b), *MAMBA]) == 0
    assert mamba_next.main(["generate", "--checkpoint", str(b / "best.pt"), "--seed-len", "16", "--gen-len", "20",
                            "--from-end"]) == 0
    assert np.load(b / "generate" / "gen.npy").shape == (20, 6)


def test_series_without_labels_end_to_end(csv_file, tmp_path, plots_below_tmp, capsys):
    path, X, _ = csv_file
    np.save(tmp_path / "x.npy", X)
    data = tmp_path / "data"
    assert dataset.main([str(tmp_path / "x.npy"), "--out-dir", str(data)]) == 0
    series = dataset.load_series(str(data))
    assert not series.has_labels and series.n_states == 0
    run = tmp_path / "m"
    assert masked_model_gpu.main(["--data-dir", str(data), "--out-dir", str(run), *MASKED]) == 0
    assert (plots_below_tmp / tmp_path.name / "m" / "bert_prediction_0.png").exists()
    capsys.readouterr()
    assert evaluate_representations.main(["--checkpoint", str(run / "best.pt"), "--lb-points", "300",
                                          "--metric-points", "800", "--umap-points", "200",
                                          "--out-dir", str(tmp_path / "r"), "--plots-dir", str(tmp_path / "rp")]) == 0
    assert "no labels" in capsys.readouterr().out
    res = json.loads((tmp_path / "r" / "representation_metrics.json").read_text())
    assert "lb" in res["layers"]["1"] and "kmeans_ari" not in res["layers"]["1"]
    assert (tmp_path / "rp" / "representation_umap.png").exists()
