"""Fresh draws of the circles process (--train-data fresh): the same process, a new trajectory every
epoch, the same held-out windows as a fixed run, resumable; and the split of a signal MSE into the
steps where the oracle is certain of the circle and the others."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from circles import Process, fresh_draw
from dataset import load_series, task_datasets

TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
        "--n-layers", "1", "--d-ff", "32", "--no-train-eval", "--no-plot", "--warmup-epochs", "0.5"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def series(small_data_dir):
    return load_series(small_data_dir)


def test_a_fresh_draw_is_the_folders_process_with_a_new_trajectory_and_new_noise(series):
    proc = Process.from_series(series)
    d = fresh_draw(proc, series.config["seed"], 3, 60_000)
    X, sig, st, th = d["X"], d["signal"], d["states"], d["thetas"]
    # every noise-free point lies on its circle of the folder's geometry, at the angle the draw reports
    planes, radii = series.extra["planes"], series.extra["radii"]
    expect = radii[st][:, None] * (np.cos(th)[:, None] * planes[st, 0] + np.sin(th)[:, None] * planes[st, 1])
    assert np.allclose(sig, expect, atol=1e-4)
    # within a visit the angle turns by 2 pi / period per step; every visit enters at the circle's entry angle
    starts = d["visit_starts"]
    assert np.allclose(th[starts], series.extra["entry_angles"][d["visit_states"]])
    same = st[1:] == st[:-1]
    step = np.mod(th[1:] - th[:-1], 2 * np.pi)[same]
    assert np.allclose(step, 2 * np.pi / series.extra["periods"][st[1:][same]])
    # noise of the folder's std, independent of the signal
    noise = X - sig
    assert noise.std() == pytest.approx(series.config["noise_std"], rel=0.01)
    # the visits follow the folder's transition matrix (empirical rows within sampling error)
    P = series.extra["transition_matrix"]
    vs = d["visit_states"]
    counts = np.zeros_like(P)
    np.add.at(counts, (vs[:-1], vs[1:]), 1)
    rows = counts.sum(1) >= 10
    assert np.all(counts[np.eye(len(P), dtype=bool)] == 0)        # no self-transitions, as the process
    assert np.all((counts > 0) <= (P > 0))                          # only the process's edges
    tv = 0.5 * np.abs(counts[rows] / counts[rows].sum(1, keepdims=True) - P[rows]).sum(1)
    assert tv.mean() < 0.2
    # a different trajectory and different noise from the folder's own series and from other draws
    n = len(series.X)
    assert not np.array_equal(st[:n], series.states[:n])
    other = fresh_draw(proc, series.config["seed"], 4, 60_000)
    assert not np.array_equal(other["X"], X) and not np.array_equal(other["states"], st)


def test_draw_k_is_the_same_on_every_run(series, small_data_dir):
    proc = Process.from_series(series)
    a = fresh_draw(proc, series.config["seed"], 7, 5000)["X"]
    assert np.array_equal(a, fresh_draw(proc, series.config["seed"], 7, 5000)["X"])
    code = ("import hashlib, sys; sys.path.insert(0, sys.argv[2]); from circles import Process, fresh_draw; "
            "from dataset import load_series; s = load_series(sys.argv[1]); "
            "print(hashlib.sha256(fresh_draw(Process.from_series(s), s.config['seed'], 7, 5000)['X'].tobytes())"
            ".hexdigest())")
    r = subprocess.run([sys.executable, "-c", code, small_data_dir, ROOT], capture_output=True, text=True)
    assert r.stdout.strip() == hashlib.sha256(a.tobytes()).hexdigest()


def test_fresh_windows_move_to_draw_epoch_and_keep_the_held_out_windows(series):
    args = dict(data_dir=series.data_dir, seq_len=64, stride=32, mask_ratio=0.15, mask_patch_size=8,
                mask_patch_min=None, mask_patch_max=None, val_frac=0.1, test_frac=0.1, seed=0)
    fixed = task_datasets(series, {**args, "train_data": "fixed"}, "masked")
    fresh = task_datasets(series, {**args, "train_data": "fresh"}, "masked")
    for part in ("val", "test"):
        assert np.array_equal(fixed[part].starts, fresh[part].starts) and fixed[part].X is fresh[part].X
        assert all(np.array_equal(fixed[part].mask(i), fresh[part].mask(i)) for i in range(len(fixed[part])))
    tr = fresh["train"]
    assert np.array_equal(tr.starts, fixed["train"].starts)
    n = tr.n_steps
    assert n == fixed["splits"].train[1]          # a draw of the training block's length
    proc = Process.from_series(series)
    for epoch in (0, 1, 5):
        tr.set_epoch(epoch)
        want = fresh_draw(proc, series.config["seed"], epoch, n)
        x, s, m = tr[3]
        s0 = int(tr.starts[3])
        assert np.array_equal(x, want["X"][s0:s0 + 64]) and np.array_equal(s, want["states"][s0:s0 + 64])
        assert np.array_equal(m, fixed["train"].__class__.mask(tr, 3))   # the masks of a fixed run's epoch
    # the validation block never appears in a draw: every draw is a new trajectory
    assert not np.array_equal(tr.X[: 64], series.X[: 64])


def test_fixed_and_fresh_runs_score_the_same_windows_and_a_fresh_run_resumes_to_the_same_numbers(
        small_data_dir, tmp_path):
    from masked_model_gpu import main
    a, b, c = tmp_path / "fixed", tmp_path / "fresh", tmp_path / "fresh_resumed"
    assert main(["--data-dir", small_data_dir, "--out-dir", str(a), *TINY, "--epochs", "3"]) == 0
    assert main(["--data-dir", small_data_dir, "--out-dir", str(b), *TINY, "--epochs", "3",
                 "--train-data", "fresh"]) == 0
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["oracle"] == mb["oracle"]                   # the same windows, masks and oracle
    assert ma["val_mse"] != mb["val_mse"]                 # but another training
    assert main(["--data-dir", small_data_dir, "--out-dir", str(c), *TINY, "--epochs", "3",
                 "--train-data", "fresh", "--stop-after", "1"]) == 0
    assert main(["--resume", str(c / "last.pt"), "--stop-after", "5"]) == 0
    col = [[float(r.split(",")[5]) for r in (p / "training_log.csv").read_text().splitlines()[1:]] for p in (b, c)]
    assert col[0] == pytest.approx(col[1], rel=1e-6)
    assert torch.load(c / "best.pt", weights_only=True)["data"]["train_data"] == "fresh"


def test_a_recorded_series_refuses_fresh_data_with_one_line(tmp_path, capsys):
    from dataset import main as convert
    from masked_model_gpu import main
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(3000, 4)))
    assert convert([str(tmp_path / "s.npy"), "--out-dir", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    assert main(["--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path / "r"), *TINY,
                 "--train-data", "fresh"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no process to draw from" in err[0] and "--train-data fixed" in err[0]
    assert not (tmp_path / "r").exists()


def test_training_masks_change_every_epoch_with_dataloader_workers(series):
    """A persistent worker would keep the dataset copy of the first epoch: the masks (and a fresh
    draw) must reach the workers every epoch."""
    from training import make_loaders
    args = dict(data_dir=series.data_dir, seq_len=64, stride=32, mask_ratio=0.15, mask_patch_size=8,
                mask_patch_min=None, mask_patch_max=None, val_frac=0.1, test_frac=0.1, seed=0, train_data="fresh")
    ds = task_datasets(series, args, "masked")
    train = make_loaders(ds, 8, 2, torch.device("cpu"), 0)[0]
    seen = []
    for epoch in range(2):
        ds["train"].set_epoch(epoch)
        x, _, m = next(iter(train))
        seen.append((x.numpy().copy(), m.numpy().copy()))
    assert not np.array_equal(seen[0][1], seen[1][1]) and not np.array_equal(seen[0][0], seen[1][0])


def test_the_certainty_split_adds_up_to_the_total_and_follows_a_planted_split():
    import oracle
    rng = np.random.default_rng(0)
    err = rng.exponential(size=(5, 40)) * 3
    scored = rng.random((5, 40)) < 0.5
    certain = rng.random((5, 40)) < 0.8
    s = oracle.split_by_certainty(err, scored, certain, dim=3)
    total = err[scored].sum() / (scored.sum() * 3)
    assert s["certain_share"] * s["signal_mse_certain"] + (1 - s["certain_share"]) * s["signal_mse_uncertain"] == \
        pytest.approx(total)
    assert s["signal_mse_certain"] == pytest.approx(err[scored & certain].mean() / 3)
    s = oracle.split_by_certainty(err, scored, np.ones_like(certain), dim=3)
    assert s["certain_share"] == 1 and s["signal_mse_uncertain"] is None and s["n_uncertain"] == 0


def test_a_run_reports_its_signal_error_split_by_the_oracles_certainty(small_data_dir, tmp_path):
    from mamba_next import main as mamba
    from masked_model_gpu import main as masked
    assert masked(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "m"), *TINY, "--epochs", "1"]) == 0
    assert mamba(["train", "--data-dir", small_data_dir, "--out-dir", str(tmp_path / "b"), "--seq-len", "64",
                  "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-layers", "1", "--d-state", "4",
                  "--d-ff", "32", "--epochs", "1", "--no-plot", "--no-train-eval"]) == 0
    for run in ("m", "b"):
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        for split in ("val", "test"):
            s = m[f"{split}_signal_by_certainty"]
            o = m["oracle"][split]["oracle_by_certainty"]
            n = s["n_certain"] + s["n_uncertain"]
            assert n == m["oracle"][split]["n_scored_steps"] and (s["n_certain"], s["n_uncertain"]) == \
                (o["n_certain"], o["n_uncertain"])
            total = sum(s[f"n_{k}"] * (s[f"signal_mse_{k}"] or 0) for k in ("certain", "uncertain")) / n
            assert total == pytest.approx(m[f"{split}_signal_mse"], rel=1e-5)
            ototal = sum(o[f"n_{k}"] * (o[f"signal_mse_{k}"] or 0) for k in ("certain", "uncertain")) / n
            assert ototal == pytest.approx(m["oracle"][split]["oracle_signal_mse"], rel=1e-6)


def test_the_fresh_vs_fixed_report_reads_planted_runs(tmp_path):
    """scripts/fresh_vs_fixed.py on planted sweep folders: each curve point is the log's validation signal
    MSE over the run's oracle, and each target's verdict follows the planted values seed by seed."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import fresh_vs_fixed
    root = tmp_path / "sweep"
    # (val signal MSE, belief R^2, dwell KS, the true continuation's KS); a KS of None: a generation that
    # stays on two circles (no dwell law to compare), which misses the target
    planted = {("fresh", 0): (0.12, 0.97, 0.05, 0.04), ("fresh", 1): (0.20, 0.90, None, 0.04),
               ("fixed", 0): (0.60, 0.80, 0.90, 0.05)}
    for (config, seed), (ratio_mse, belief, ks, ks_true) in planted.items():
        job = root / config / f"s{seed}"
        (job / "representations").mkdir(parents=True)
        (job / "generate").mkdir()
        (job / "metrics.json").write_text(json.dumps({"val_oracle_signal_mse": 0.1,
                                                      "val_signal_over_oracle": ratio_mse / 0.1}))
        (job / "training_log.csv").write_text("epoch,step,val_signal_mse\n1,10,0.5\n2,20,%s\n" % ratio_mse)
        (job / "args.json").write_text(json.dumps({"seed": seed}))
        (job / "representations" / "representation_metrics.json").write_text(json.dumps(
            {"layers": {"1": {"belief_circle_r2": belief - 0.1}, "2": {"belief_circle_r2": belief}},
             "random_init_control": {"1": {"belief_circle_r2": 0.3}}}))
        (job / "generate" / "gen.json").write_text(json.dumps({"process": {
            "generated": {"dwell_ks": ks, "angular_speed_ratio_median": 1.05, "n_visits": 9 if ks else 2},
            "true_continuation": {"dwell_ks": ks_true}, "process_draw": {"dwell_ks": 0.06}}}))
    out = tmp_path / "out"
    figs = tmp_path / "figs"
    assert fresh_vs_fixed.main(["--sweep", f"mamba={root}", "--out-dir", str(out), "--plots-dir", str(figs)]) == 0
    rows = (out / "curves.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 and any(r.endswith(",0.5,0.1,0.4,5.0") for r in rows)   # 0.5 against 0.1
    t = json.loads((out / "targets.json").read_text())["targets"]["mamba"]
    assert t["fresh"]["val_signal_over_oracle"]["values"] == pytest.approx([1.2, 2.0])
    assert t["fresh"]["val_signal_over_oracle"]["met"] == "yes" and t["fixed"]["val_signal_over_oracle"]["met"] == "no"
    assert t["fresh"]["belief_circle_r2_best_layer"]["values"] == pytest.approx([0.97, 0.90])
    assert t["fresh"]["belief_circle_r2_best_layer"]["met"] == "1 of 2 seeds"
    assert t["fresh"]["belief_circle_r2_best_layer_random_init"]["mean"] == pytest.approx(0.3)
    assert t["fresh"]["generation_dwell_ks"]["met"] == "1 of 2 seeds"            # 0.05/0.04 <= 2; stuck: no
    assert t["fresh"]["generation_dwell_ks"]["values"] == [0.05, None]
    assert t["fresh"]["generation_visits"]["values"] == [9, 2] and "generation_hidden_visits" not in t["fresh"]
    assert t["fresh"]["generation_angular_speed_ratio"]["met"] == "yes"
    assert (figs / "curves.png").stat().st_size > 1000 and not (out / "curves.png").exists()
    md = (out / "targets.md").read_text()
    assert "| validation signal MSE / oracle's (seed 0's masks) | 1.600 [1.200, 2.000] (n=2); met: yes | " \
        "6.000 [6.000, 6.000] (n=1); met: no | <= 2.0 |" in md
    # another sweep of the same model adds its configurations as columns (its best step read from its log);
    # a configuration name in two sweeps is refused
    other = tmp_path / "other"
    job = other / "long" / "s0"
    job.mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({"val_oracle_signal_mse": 0.1, "val_signal_over_oracle": 1.5,
                                                  "best_epoch": 2, "steps": 30}))
    (job / "training_log.csv").write_text("epoch,step,val_signal_mse\n1,10,0.5\n2,20,0.15\n3,30,0.2\n")
    (job / "args.json").write_text(json.dumps({"seed": 0}))
    (job / "generate").mkdir()
    (job / "generate" / "gen.json").write_text(json.dumps({"gen_len": 5000, "process": {
        "generated": {"dwell_ks": 0.3, "n_visits": 40}, "true_continuation": {"dwell_ks": 0.1},
        "process_draw": {"dwell_ks": 0.2, "n_visits": 50},
        "oracle_rollout": {"dwell_ks": 0.07, "n_visits": 45, "angular_speed_ratio_median": 1.0}}}))
    assert fresh_vs_fixed.main(["--sweep", f"mamba={root}", "--sweep", f"mamba={other}", "--out-dir", str(out),
                                "--plots-dir", str(figs), "--force"]) == 0
    t = json.loads((out / "targets.json").read_text())["targets"]["mamba"]
    assert list(t) == ["fresh", "fixed", "long"] and t["long"]["best_step"]["values"] == [20]
    assert t["long"]["training_steps"]["values"] == [30] and t["long"]["val_signal_over_oracle"]["met"] == "yes"
    ks = t["long"]["generation_dwell_ks"]
    assert ks["met"] == "no" and ks["met_against_a_process_draw"] == "yes"    # 0.3 / 0.1 > 2; 0.3 / 0.2 <= 2
    assert t["long"]["generation_visits"]["process_draw"]["values"] == [50]
    assert t["long"]["generation_visits"]["length"]["values"] == [5000]
    assert ks["oracle_rollout"]["values"] == [0.07] and t["long"]["generation_visits"]["oracle_rollout"]["mean"] == 45
    assert t["long"]["generation_angular_speed_ratio"]["oracle_rollout"]["values"] == [1.0]
    assert "| quantity | fresh data | fixed data | long | target |" in (out / "targets.md").read_text()
    assert len((out / "curves.csv").read_text().splitlines()) == 1 + 3 * 3
    assert fresh_vs_fixed.main(["--sweep", f"mamba={root}", "--sweep", f"mamba={root}", "--out-dir", str(out),
                                "--no-plot", "--force"]) == 2
    (other / "fresh" / "s5").mkdir(parents=True)
    for f in ("metrics.json", "training_log.csv", "args.json"):
        (other / "fresh" / "s5" / f).write_text((job / f).read_text())
    assert fresh_vs_fixed.main(["--sweep", f"mamba={root}", "--sweep", f"mamba={other}", "--out-dir", str(out),
                                "--no-plot", "--force"]) == 2
    assert len((out / "curves.csv").read_text().splitlines()) == 1 + 3 * 3       # a refused input removes nothing
    import shutil
    shutil.rmtree(other)
    # a masked model's masks follow its seed: seed 0 scores on its own, any other seed only through a
    # rescoring on seed 0's masks (of its own best.pt), else it is left out of the target
    assert fresh_vs_fixed.main(["--sweep", f"masked={root}", "--out-dir", str(tmp_path / "m"), "--no-plot"]) == 0
    t = json.loads((tmp_path / "m" / "targets.json").read_text())["targets"]["masked"]
    assert t["fresh"]["val_signal_over_oracle"]["values"] == [pytest.approx(1.2), None]
    assert t["fresh"]["val_signal_over_oracle_own_masks"]["values"] == pytest.approx([1.2, 2.0])
    s1 = root / "fresh" / "s1"
    (s1 / "eval_mask0").mkdir()
    rescored = {"val_signal_over_oracle": 3.0, "val_signal_mse": 0.3, "val_oracle_signal_mse": 0.1,
                "val_signal_by_certainty": {"signal_mse_certain": 0.02}, "checkpoint": str(s1 / "best.pt")}
    (s1 / "eval_mask0" / "eval_metrics.json").write_text(json.dumps({**rescored, "mask_seed": 1}))
    assert fresh_vs_fixed.main(["--sweep", f"masked={root}", "--out-dir", str(tmp_path / "m"), "--no-plot", "--force"]) == 2
    assert (tmp_path / "m" / "targets.json").exists()              # a refused input removes nothing
    (s1 / "eval_mask0" / "eval_metrics.json").write_text(json.dumps({**rescored, "mask_seed": 0}))
    assert fresh_vs_fixed.main(["--sweep", f"masked={root}", "--out-dir", str(tmp_path / "m"), "--no-plot", "--force"]) == 0
    t = json.loads((tmp_path / "m" / "targets.json").read_text())["targets"]["masked"]
    assert t["fresh"]["val_signal_over_oracle"]["values"] == pytest.approx([1.2, 3.0])
    assert t["fresh"]["val_signal_excess_over_oracle"]["values"] == [None, pytest.approx(0.2)]
    assert t["fresh"]["val_signal_mse_where_oracle_certain"]["values"] == [None, 0.02]
    assert fresh_vs_fixed.main(["--sweep", f"mamba={root}", "--out-dir", str(out), "--plots-dir", str(figs)]) == 2
    assert not list((tmp_path / "m").glob("*.png"))                   # --no-plot draws nothing
    # the seed is the run's own (args.json), not its folder's name: a folder s0 of seed 4 needs its rescoring
    (root / "fresh" / "s0" / "args.json").write_text(json.dumps({"seed": 4}))
    assert fresh_vs_fixed.main(["--sweep", f"masked={root}", "--out-dir", str(tmp_path / "m"), "--no-plot", "--force"]) == 0
    t = json.loads((tmp_path / "m" / "targets.json").read_text())["targets"]["masked"]
    assert t["fresh"]["val_signal_over_oracle"]["values"] == [None, pytest.approx(3.0)]


def test_pooling_evaluations_sums_squared_errors_over_every_scored_step(tmp_path):
    """scripts/pool_evals.py on planted evaluations: the pooled signal MSE is the step-weighted mean, the
    ratio is of the pooled sums (not a mean of ratios), the certain and uncertain parts add up to the
    total, and an evaluation whose model and oracle were scored on different steps is refused."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import pool_evals

    def plant(name, nc, nu, mc, mu, oc, ou):
        d = tmp_path / name
        d.mkdir()
        split = {"n_certain": nc, "n_uncertain": nu, "signal_mse_certain": mc, "signal_mse_uncertain": mu}
        orc = {"n_certain": nc, "n_uncertain": nu, "signal_mse_certain": oc, "signal_mse_uncertain": ou}
        tot = (nc * mc + nu * (mu or 0)) / (nc + nu)
        otot = (nc * oc + nu * (ou or 0)) / (nc + nu)
        m = {"oracle": {}}
        for s in ("val", "test"):
            m[f"{s}_signal_mse"] = tot
            m[f"{s}_signal_by_certainty"] = split
            m["oracle"][s] = {"oracle_signal_mse": otot, "oracle_by_certainty": orc}
        (d / "eval_metrics.json").write_text(json.dumps(m))
    plant("e_m0", 90, 10, 0.1, 5.0, 0.0, 10.0)      # lucky masks: below the oracle where it is unsure
    plant("e_m1", 100, 0, 0.1, None, 0.0, None)     # no uncertain patch: the oracle's error is 0
    out = tmp_path / "out"
    assert pool_evals.main(["--group", f"x={tmp_path}/e_m*", "--out-dir", str(out)]) == 0
    g = json.loads((out / "pooled.json").read_text())["groups"]["x"]["val"]
    model = (90 * 0.1 + 10 * 5.0 + 100 * 0.1) / 200
    assert g["signal_mse"] == pytest.approx(model) and g["oracle_signal_mse"] == pytest.approx(100 / 200)
    assert g["signal_over_oracle"] == pytest.approx(model / 0.5)
    assert g["ratio_per_evaluation"] == [pytest.approx((9 + 50) / 100 / 1.0), None]
    assert g["n_uncertain_steps"] == 10 and g["signal_mse_certain"] == pytest.approx(0.1)
    assert (190 * g["signal_mse_certain"] + 10 * g["signal_mse_uncertain"]) / 200 == pytest.approx(g["signal_mse"])
    assert "| x | val | 2 | 200 (10) |" in (out / "pooled.md").read_text()
    assert pool_evals.main(["--group", f"x={tmp_path}/e_m*", "--out-dir", str(out)]) == 2      # no --force
    m = json.loads((tmp_path / "e_m1" / "eval_metrics.json").read_text())
    m["oracle"]["val"]["oracle_by_certainty"]["n_certain"] = 99
    (tmp_path / "e_m1" / "eval_metrics.json").write_text(json.dumps(m))
    assert pool_evals.main(["--group", f"x={tmp_path}/e_m*", "--out-dir", str(out), "--force"]) == 2
    assert (out / "pooled.json").exists()                          # a refused input removes nothing
    assert pool_evals.main(["--group", f"x={tmp_path}/none*", "--out-dir", str(out), "--force"]) == 2
    # two recipes paired on seeds: B - A of each seed's pooled signal MSE, against scipy's paired t-test
    (tmp_path / "e_m1").rename(tmp_path / "bad")
    from scipy import stats
    diffs = []
    for seed, (mb, mbu) in enumerate(((0.05, 3.0), (0.08, 4.0), (0.02, 9.0))):
        plant(f"a_s{seed}", 90, 10, 0.1, 5.0, 0.0, 10.0)
        plant(f"b_s{seed}", 90, 10, mb, mbu, 0.0, 10.0)
        diffs.append((90 * mb + 10 * mbu - 90 * 0.1 - 10 * 5.0) / 100)
    groups = [f"--group=r{r}-s{seed}={tmp_path}/{r}_s{seed}" for r in "ab" for seed in range(3)]
    assert pool_evals.main([*groups, "--paired", "ra,rb", "--out-dir", str(out), "--force"]) == 0
    pr = json.loads((out / "pooled.json").read_text())["paired"][0]
    assert pr["seeds"] == [0, 1, 2] and pr["val"]["differences"] == pytest.approx(diffs)
    assert pr["val"]["p"] == pytest.approx(stats.ttest_rel([d + 1 for d in diffs], [1, 1, 1]).pvalue)
    assert pr["val"]["b_lower_in"] == sum(d < 0 for d in diffs) and "Paired on seeds 0, 1, 2" in (out / "pooled.md").read_text()
    assert pool_evals.main([*groups[:4], "--paired", "ra,rb", "--out-dir", str(out), "--force"]) == 2   # 1 shared seed
