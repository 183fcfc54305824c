"""The sweep launcher: planning a grid, running it with the local pool, submitit's local executor and
(a fake) SLURM, skipping finished jobs after a kill, GPU slots, and the aggregation recomputed
independently from planted metric files."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a step of the commands line: writes planted metrics (score = 10 * seed + offset; a curve over
# three layers), counts its own runs, records its GPU and the time it ran, and (seed 1) waits
# while the file given as --block exists
STEP = r'''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--seed", type=int); p.add_argument("--job"); p.add_argument("--block")
p.add_argument("--offset", type=float, default=0.0); p.add_argument("--sleep", type=float, default=0.0)
a = p.parse_args()
os.makedirs(a.job, exist_ok=True)
with open(os.path.join(a.job, "count"), "a") as f:
    f.write("1\n")
t0 = time.time()
while a.block and os.path.exists(a.block) and a.seed == 1:
    time.sleep(0.05)
time.sleep(a.sleep)
json.dump({"score": 10 * a.seed + a.offset, "flag": 1.0,
           "curve": {"input": a.seed + a.offset, "1": 2 * a.seed, "output": 3.0},
           "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "t0": t0, "t1": time.time()},
          open(os.path.join(a.job, "metrics.json"), "w"))
'''


def commands_spec(tmp_path, **extra):
    step = tmp_path / "step.py"
    step.write_text(STEP)
    spec = {"line": "commands", "seeds": [0, 1],
            "steps": [{"name": "work", "cmd": f"{{python}} {step} --seed {{seed}} --job {{job_dir}} --block {tmp_path / 'block'}",
                       "outputs": ["{job_dir}/metrics.json"]}],
            "grid": {"work.offset": [0.5, 2.0]}}
    spec.update(extra)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path), spec


def test_flags_names_and_plan():
    assert sweep.to_flags({"a": 1, "no-umap": True, "off": False, "none": None, "layers": [1, 2]}) == \
        ["--a", "1", "--no-umap", "--layers", "1", "2"]
    assert sweep.parse_seeds("0-2,5") == [0, 1, 2, 5] and sweep.parse_seeds([3, 1]) == [1, 3]
    spec = {"line": "circles", "seeds": "0-1", "data": {"n-steps": 3000}, "train": {"epochs": 1},
            "grid": {"train.pos-encoding": ["rope", "t5"], "data.seed": [0, 1]}}
    jobs = sweep.plan(spec)
    assert len(jobs) == 8 and len({j.config for j in jobs}) == 4
    assert jobs[0].config == "pos-encoding=rope_seed=0"
    data_dirs = {j.config: j.steps[0].cmd[j.steps[0].cmd.index("--out-dir") + 1] for j in jobs}
    # the data step is keyed by its own flags: same data seed, same folder, whatever the training flags
    assert data_dirs["pos-encoding=rope_seed=0"] == data_dirs["pos-encoding=t5_seed=0"]
    assert data_dirs["pos-encoding=rope_seed=0"] != data_dirs["pos-encoding=rope_seed=1"]
    train = jobs[1].steps[1].cmd
    assert train[train.index("--seed") + 1] == "1" and train[train.index("--pos-encoding") + 1] == "rope"
    assert jobs[1].steps[1].resume[-1] == "{root}/pos-encoding=rope_seed=0/s1/last.pt"
    configs = sweep.configurations({"line": "modadd", "configs": [{"name": "mixed"},
                                                                   {"name": "cur", "train.schedule": "curriculum"}]})
    assert [c["name"] for c in configs] == ["mixed", "cur"] and configs[1]["overrides"] == {
        "train.schedule": "curriculum"}


@pytest.mark.parametrize("spec,words", [
    ({"line": "bert"}, "choose one of"),
    ({"line": "circles", "grid": {"fit.lr": [1]}}, "<step>.<flag>"),
    ({"line": "circles", "grid": {"train.lr": []}}, "non-empty list"),
    ({"line": "circles", "train": {"seed": 3}}, "sets --seed"),
    ({"line": "modadd", "configs": [{"name": "a"}, {"name": "a", "train.mlp": True}]}, "both called"),
    ({"line": "circles", "seeds": "x-2"}, "seeds"),
])
def test_bad_specs_stop_with_one_line(tmp_path, capsys, spec, words):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(spec))
    assert sweep.main(["run", str(path), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err
    assert not (tmp_path / "r").exists()


def test_seed_ci_and_paired_agree_with_scipy():
    x = [1.0, 2.5, 2.0, 4.0]
    s = sweep.seed_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert s["mean"] == pytest.approx(np.mean(x)) and (s["lo"], s["hi"]) == pytest.approx((lo, hi))
    assert sweep.seed_ci([float("nan"), 2.0])["n"] == 1
    a = {0: 1.0, 1: 2.0, 2: 3.5, 3: 9.0}
    b = {0: 1.5, 1: 2.1, 2: 4.5, 4: 100.0}               # seed 4 has no partner, seed 3 neither
    d = sweep.paired(a, b)
    assert d["seeds"] == [0, 1, 2] and d["b_larger"] == 3
    assert d["p"] == pytest.approx(stats.ttest_rel([1.5, 2.1, 4.5], [1.0, 2.0, 3.5]).pvalue)
    assert d["mean"] == pytest.approx(np.mean([0.5, 0.1, 1.0]))


def test_commands_sweep_aggregates_planted_metrics(tmp_path):
    path, spec = commands_spec(tmp_path, seeds=[0, 1, 2])
    root = tmp_path / "r"
    assert sweep.main(["run", path, "--out-dir", str(root), "--no-plot"]) == 0
    agg = json.loads((root / "aggregate" / "summary.json").read_text())
    assert list(agg["configs"]) == ["offset=0.5", "offset=2.0"]
    for off in (0.5, 2.0):
        vals = [10 * s + off for s in (0, 1, 2)]
        got = agg["configs"][f"offset={off}"]["metrics"]["score"]
        lo, hi = stats.t.interval(0.95, 2, loc=np.mean(vals), scale=stats.sem(vals))
        assert (got["mean"], got["lo"], got["hi"], got["n"]) == pytest.approx((np.mean(vals), lo, hi, 3))
        curve = agg["configs"][f"offset={off}"]["curves"]["curve"]
        assert curve["input"]["mean"] == pytest.approx(1 + off) and curve["1"]["mean"] == pytest.approx(2.0)
    # paired on the same seeds: every difference is 1.5, so the interval collapses onto it
    d = agg["paired"]["offset=2.0"]["score"]
    assert d["mean"] == pytest.approx(1.5) and d["lo"] == pytest.approx(1.5) and d["b_larger"] == 3
    rows = (root / "aggregate" / "summary.csv").read_text().splitlines()
    assert "offset=2.0,score,3," in "\n".join(rows) and any(r.startswith("offset=0.5,curve[1],3,") for r in rows)
    assert "| score |" in (root / "aggregate" / "summary.md").read_text()
    # a standalone aggregation never replaces those files without --force
    assert sweep.main(["aggregate", str(root), "--no-plot"]) == 2
    assert sweep.main(["aggregate", str(root), "--no-plot", "--force", "--baseline", "offset=2.0"]) == 0
    assert json.loads((root / "aggregate" / "summary.json").read_text())["paired"]["offset=0.5"]["score"][
        "mean"] == pytest.approx(-1.5)


def test_a_killed_sweep_skips_finished_jobs_when_run_again(tmp_path):
    path, _ = commands_spec(tmp_path)
    root = tmp_path / "r"
    (tmp_path / "block").write_text("")      # seed 1's jobs wait on this file
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "sweep.py"), "run", path, "--out-dir", str(root),
                             "--jobs", "2", "--no-plot"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = [root / "status" / f"offset={o}_s0.json" for o in (0.5, 2.0)]
    deadline = time.time() + 60
    while not all(p.exists() for p in done) and time.time() < deadline:
        time.sleep(0.1)
    while not (root / "offset=2.0" / "s1" / "count").exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)                 # the launcher and its running jobs, at once
    proc.wait()
    assert all(p.exists() for p in done)
    assert not (root / "offset=0.5" / "s1" / "metrics.json").exists()
    (tmp_path / "block").unlink()
    assert sweep.main(["run", path, "--out-dir", str(root), "--no-plot"]) == 0
    counts = {f"{o}/s{s}": len((root / f"offset={o}" / f"s{s}" / "count").read_text().split())
              for o in (0.5, 2.0) for s in (0, 1)}
    assert counts["0.5/s0"] == 1 and counts["2.0/s0"] == 1          # finished: not run again
    assert counts["0.5/s1"] == 2 and counts["2.0/s1"] == 2          # interrupted: run again
    agg = json.loads((root / "aggregate" / "summary.json").read_text())
    assert {k: agg["jobs"][k] for k in ("total", "done", "complete")} == {"total": 4, "done": 4, "complete": True}


def test_a_changed_spec_is_refused_unless_forced(tmp_path, capsys):
    path, spec = commands_spec(tmp_path)
    root = str(tmp_path / "r")
    assert sweep.main(["run", path, "--out-dir", root, "--no-plot"]) == 0
    spec["steps"][0]["cmd"] += " --sleep 0"
    with open(path, "w") as f:
        json.dump(spec, f)
    capsys.readouterr()
    assert sweep.main(["run", path, "--out-dir", root, "--no-plot"]) == 2
    assert "--force" in capsys.readouterr().err
    assert sweep.main(["run", path, "--out-dir", root, "--no-plot", "--force"]) == 0
    assert len((tmp_path / "r" / "offset=0.5" / "s0" / "count").read_text().split()) == 2


def test_gpus_round_robin_over_running_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert sweep.visible_gpus("auto") == ["3", "5", "6"] and sweep.visible_gpus("2") == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sweep.visible_gpus("3") == ["0", "1", "2"] and sweep.visible_gpus("0") == []
    assert [sweep.slot_env(k, ["0", "1", "2"], 1)["CUDA_VISIBLE_DEVICES"] for k in range(5)] == list("01201")
    assert "CUDA_VISIBLE_DEVICES" not in sweep.slot_env(0, [], 2)
    # three fake GPUs, three slots, six jobs: jobs that run at the same time never share a GPU
    path, spec = commands_spec(tmp_path, seeds=[0, 2, 3])
    spec["steps"][0]["cmd"] += " --sleep 0.3"
    with open(path, "w") as f:
        json.dump(spec, f)
    root = tmp_path / "r"
    assert sweep.main(["run", path, "--out-dir", str(root), "--jobs", "3", "--gpus", "3", "--no-plot"]) == 0
    runs = [json.loads(p.read_text()) for p in root.glob("offset=*/s*/metrics.json")]
    assert len(runs) == 6 and {r["gpu"] for r in runs} == {"0", "1", "2"}
    for a in runs:
        for b in runs:
            if a is not b and a["t0"] < b["t1"] and b["t0"] < a["t1"]:
                assert a["gpu"] != b["gpu"]


def test_circles_grid_end_to_end_with_the_local_pool(tmp_path):
    spec = {"line": "circles", "seeds": [0, 1], "data": {"n-steps": 3000, "ambient-dim": 8, "no-umap": True},
            "train": {"seq-len": 64, "stride": 32, "batch-size": 16, "d-model": 16, "n-heads": 2, "n-layers": 1,
                      "d-ff": 32, "mask-patch-size": 4, "no-train-eval": True, "epochs": 2},
            "grid": {"train.pos-encoding": ["rope", "sinusoidal"]}, "thresholds": [1000.0, 0.001]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    root = tmp_path / "r"
    assert sweep.main(["run", str(path), "--out-dir", str(root), "--no-plot"]) == 0
    assert len(list((root / "data").glob("*/data.npz"))) == 1          # shared by all four jobs
    agg = json.loads((root / "aggregate" / "summary.json").read_text())
    for c in ("pos-encoding=rope", "pos-encoding=sinusoidal"):
        per_seed = [json.loads((root / c / f"s{s}" / "metrics.json").read_text()) for s in (0, 1)]
        m = agg["configs"][c]["metrics"]
        assert m["test_mse"]["mean"] == pytest.approx(np.mean([p["test_mse"] for p in per_seed]))
        assert m["test_signal_over_oracle"]["n"] == 2
        assert m["epochs_to_val_le_1000"]["mean"] == 1.0 and m["epochs_to_val_le_0.001"]["n"] == 0
    a = [json.loads((root / "pos-encoding=rope" / f"s{s}" / "metrics.json").read_text())["val_mse"] for s in (0, 1)]
    b = [json.loads((root / "pos-encoding=sinusoidal" / f"s{s}" / "metrics.json").read_text())["val_mse"]
         for s in (0, 1)]
    assert agg["paired"]["pos-encoding=sinusoidal"]["val_mse"]["mean"] == pytest.approx(np.mean(np.subtract(b, a)))
    # the same seed sees the same validation masks whatever the scheme: the oracle's error is shared
    o = agg["configs"]["pos-encoding=rope"]["metrics"]["val_oracle_signal_mse"]["per_seed"]
    assert o == agg["configs"]["pos-encoding=sinusoidal"]["metrics"]["val_oracle_signal_mse"]["per_seed"]


def test_modadd_grid_through_submitits_local_executor(tmp_path):
    pytest.importorskip("submitit")
    spec = {"line": "modadd", "seeds": [0, 1],
            "train": {"T": 8, "C": 3, "m-max": 2, "n-layers": 1, "d-model": 16, "n-heads": 2, "steps": 40,
                      "snapshot-every": 20, "eval-every": 20, "eval-size": 64, "commutator-every": 20,
                      "batch-size": 16},
            "stages": ["trajectory"], "trajectory": {"no-plot": True, "n-null": 2},
            "configs": [{"name": "mixed"}, {"name": "curriculum", "train.schedule": "curriculum"}]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    root = tmp_path / "r"
    assert sweep.main(["run", str(path), "--out-dir", str(root), "--executor", "submitit-local", "--time", "5",
                       "--no-plot"]) == 0
    assert len(list((root / "submitit").glob("*"))) >= 1
    agg = json.loads((root / "aggregate" / "summary.json").read_text())
    assert {k: agg["jobs"][k] for k in ("total", "done", "complete")} == {"total": 4, "done": 4, "complete": True}
    import csv
    for c in ("mixed", "curriculum"):
        finals = []
        for s in (0, 1):
            with open(root / c / f"s{s}" / "metrics.csv") as f:
                rows = list(csv.DictReader(f))
            finals.append(float(rows[-1]["acc_m2"]))
        assert agg["configs"][c]["metrics"]["final_acc_m2"]["mean"] == pytest.approx(np.mean(finals))
    assert "forgetting_m1" in agg["configs"]["curriculum"]["metrics"]
    assert "forgetting_m1" not in agg["configs"]["mixed"]["metrics"]
    assert math.isfinite(agg["configs"]["mixed"]["metrics"]["commutator_D"]["mean"])
    tp = json.loads((root / "mixed" / "s1" / "trajectory_pca.json").read_text())["per_run"][0]
    r90 = agg["configs"]["mixed"]["metrics"]["trajectory_r90"]["per_seed"]["1"]
    assert r90 == pytest.approx(np.mean([b["r90"] for b in tp.values()]))


def test_slurm_array_and_dependent_aggregation_with_a_fake_sbatch(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\ncat \"$(eval echo \\${{$#}})\" >> "
                                    f"{calls}\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")      # submitit looks for srun to know it is on SLURM
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path, _ = commands_spec(tmp_path)
    root = tmp_path / "r"
    assert sweep.main(["run", path, "--out-dir", str(root), "--executor", "slurm", "--partition", "gpu",
                       "--time", "30", "--gpus-per-job", "1", "--cpus-per-job", "4", "--jobs", "2"]) == 0
    text = calls.read_text()
    assert "#SBATCH --array=0-3%2" in text and "#SBATCH --partition=gpu" in text
    assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --cpus-per-task=4" in text
    assert "#SBATCH --time=30" in text
    assert "#SBATCH --dependency=afterany:4242" in text          # aggregation after the whole array
    sub = json.loads((root / "submitted.json").read_text())
    assert sub["aggregate"] == "4242" and len(sub["array"]) == 4
    assert not (root / "offset=0.5").exists()                    # nothing ran here


def test_modadd_sweep_spreads_its_processes_over_gpus(tmp_path):
    from modadd.sweep import run_parallel
    code = "import os, time; time.sleep(0.3); print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['OMP_NUM_THREADS'])"
    jobs = [(f"j{i}", [sys.executable, "-c", code], str(tmp_path / f"j{i}.log")) for i in range(4)]
    assert set(run_parallel(jobs, 2, ["4", "7"]).values()) == {0}
    seen = sorted((tmp_path / f"j{i}.log").read_text().split()[0] for i in range(4))
    assert seen == ["4", "4", "7", "7"] and (tmp_path / "j0.log").read_text().split()[1] == "1"


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "scripts", "sweeps"))))
def test_shipped_specs_plan(name):
    spec = sweep.load_spec(os.path.join(REPO, "scripts", "sweeps", name))
    jobs = sweep.plan(spec)
    assert len(jobs) == len(sweep.configurations(spec)) * len(sweep.parse_seeds(spec["seeds"]))


def test_terrain_train_metrics_script(tmp_path):
    """scripts/terrain_train_metrics.py: the last epoch's held-out numbers against the unmodulated
    model and the control, as the commands line reads them."""
    res = {"epochs": [{"epoch": 1, "wup_pearson": 0.25, "loss": 2.0, "near_minus_far": 0.1, "preservation": 0.99},
                      {"epoch": 2, "wup_pearson": 0.30, "loss": 1.5, "near_minus_far": 0.2, "preservation": 0.98}],
           "unmodulated": {"wup_pearson": 0.2}, "control": {"wup_pearson": 0.22}, "steps": 40,
           "cv_health": {"cv": 0.33}, "early_stop": {"stopped_at_step": 40}}
    (tmp_path / "modulate_train_field_x.json").write_text(json.dumps(res))
    script = os.path.join(REPO, "scripts", "terrain_train_metrics.py")
    assert subprocess.run([sys.executable, script, str(tmp_path)]).returncode == 0
    scalars, curves = sweep.commands_metrics(str(tmp_path), {})
    assert scalars["heldout_gain"] == pytest.approx(0.1) and scalars["gain_over_control"] == pytest.approx(0.08)
    assert scalars["steps"] == 40 and scalars["stopped_early"] == 1.0 and scalars["cv_modulated"] == 0.33
    assert curves["pearson_per_epoch"] == {"1": 0.25, "2": 0.30}
    (tmp_path / "modulate_train_lerp_x.json").write_text(json.dumps(res))
    assert subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True).returncode == 2


def test_circles_metrics_read_the_certainty_split_the_generations_and_the_random_init_control(tmp_path):
    """Planted job files: the scalars and curves the aggregation reads are exactly the planted numbers."""
    job = tmp_path / "job"
    (job / "generate").mkdir(parents=True)
    (job / "representations").mkdir()
    (job / "metrics.json").write_text(json.dumps({
        "val_mse": 8.5, "val_signal_by_certainty": {"certain_share": 0.9, "signal_mse_certain": 0.1,
                                                    "signal_mse_uncertain": 2.0},
        "oracle": {"val": {"oracle_by_certainty": {"certain_share": 0.9, "signal_mse_certain": 0.01,
                                                   "signal_mse_uncertain": 1.5}}}}))
    proc = {"dwell_ks": 0.3, "transition_tv": 0.4, "occupancy_tv": 0.2, "angular_speed_ratio_median": 0.97,
            "n_visits": 12}
    (job / "generate" / "gen_hidden.json").write_text(json.dumps({
        "process": {"generated": proc, "process_draw": {**proc, "dwell_ks": 0.1}}, "mse_to_signal_first_16": 0.5}))
    (job / "representations" / "representation_metrics.json").write_text(json.dumps({
        "layers": {"1": {"lb": {"30": {"mle": 4.0, "null_gaussian": 9.0}}, "belief_circle_r2": 0.97}},
        "random_init_control": {"1": {"lb": {"30": {"mle": 7.0}}, "belief_circle_r2": 0.4}}}))
    scalars, curves = sweep.circles_metrics(str(job), {})
    assert scalars["val_signal_mse_uncertain"] == 2.0 and scalars["val_oracle_signal_mse_uncertain"] == 1.5
    assert scalars["val_certain_share"] == 0.9 and "val_oracle_certain_share" not in scalars
    assert scalars["gen_hidden_generated_dwell_ks"] == 0.3 and scalars["gen_hidden_process_draw_dwell_ks"] == 0.1
    assert scalars["gen_hidden_mse_to_signal_first_16"] == 0.5 and "gen_generated_dwell_ks" not in scalars
    assert curves["lb_k30"] == {"1": 4.0} and curves["control_lb_k30"] == {"1": 7.0}
    assert curves["belief_circle_r2"] == {"1": 0.97} and curves["control_belief_circle_r2"] == {"1": 0.4}
    assert sweep.generation_tag({"perturb-hidden": True}) == "gen_hidden" and sweep.generation_tag({}) == "gen"
