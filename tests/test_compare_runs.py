"""scripts/compare_runs.py on two planted runs."""
import csv
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("compare_runs", os.path.join(ROOT, "scripts", "compare_runs.py"))
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def fake_run(folder, vals, test, **extra):
    os.makedirs(folder)
    with open(os.path.join(folder, "training_log.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "val_mse"])
        for i, v in enumerate(vals, 1):
            w.writerow([i, v])
    best = min(range(len(vals)), key=vals.__getitem__)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"epochs_run": len(vals), "best_epoch": best + 1, "val_mse": vals[best], "test_mse": test,
                   "noise_floor": 8.0, "train_seconds": 1.0, **extra}, f)


def test_table_and_first_epoch_within_ten_percent(tmp_path, capsys):
    fake_run(tmp_path / "fast", [20, 9.0, 8.5, 8.7], 8.4, test_signal_mse=0.5, test_oracle_mse=8.1,
             test_signal_over_oracle=5.0)
    fake_run(tmp_path / "slow", [20, 15, 10, 9.5], 9.6)
    out, figs = tmp_path / "out", tmp_path / "figs"
    argv = [str(tmp_path / "fast"), str(tmp_path / "slow"), "--out-dir", str(out), "--plots-dir", str(figs),
            "--name", "cmp"]
    assert compare_runs.main(argv) == 0
    rows = list(csv.DictReader(open(out / "cmp.csv")))
    assert rows[0]["first_epoch_val_within_10pct"] == "3"  # 8.5 <= 8.8 first at epoch 3
    assert rows[1]["first_epoch_val_within_10pct"] == ""  # never within 10%
    assert abs(float(rows[0]["test_over_floor_pct"]) - 5.0) < 1e-9
    assert rows[0]["test_signal_over_oracle"] == "5.0" and rows[1]["test_signal_over_oracle"] == ""
    visible = lambda d: sorted(n for n in os.listdir(d) if not n.startswith("."))  # noqa: E731 - not safeio's manifest
    assert visible(figs) == ["cmp.png"] and visible(out) == ["cmp.csv", "cmp.md"]
    before = (out / "cmp.csv").read_text()
    assert compare_runs.main(argv) == 2 and (out / "cmp.csv").read_text() == before   # nothing overwritten
    assert compare_runs.main(argv + ["--force"]) == 0
    assert compare_runs.main([str(tmp_path / "missing"), "--out-dir", str(out)]) == 2
