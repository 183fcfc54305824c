"""sweep.py against a real SLURM cluster (scripts/local_slurm.sh: one node on this machine). Marked
`slurm`: run by .ci/run after it has started the cluster (SLURM_CONF set), skipped elsewhere.

A 2 x 2 sweep (two configurations, two seeds) goes through `--executor slurm`: one array of four jobs
and the aggregation job that depends on it (afterany); `sweep.py status` follows them; the summary
covers the four jobs with the numbers the jobs planted. Then one job is cancelled with scancel while
it runs, and a rerun of `sweep.py run` submits exactly that job again."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import sweep

pytestmark = pytest.mark.slurm

STEP = r'''
import argparse, json, os, time
p = argparse.ArgumentParser()
p.add_argument("--seed", type=int); p.add_argument("--job"); p.add_argument("--offset", type=float, default=0.0)
p.add_argument("--hold", default="")
a = p.parse_args()
os.makedirs(a.job, exist_ok=True)
with open(os.path.join(a.job, "count"), "a") as f:
    f.write("1\n")
while a.hold and a.seed == 1 and a.offset == 2.0 and os.path.exists(a.hold):   # the job to be cancelled waits
    time.sleep(0.2)
json.dump({"score": 10 * a.seed + a.offset}, open(os.path.join(a.job, "metrics.json"), "w"))
'''


@pytest.fixture(scope="module")
def cluster():
    if not os.environ.get("SLURM_CONF") or not shutil.which("sbatch"):
        pytest.skip("no SLURM cluster (start one with: eval \"$(bash scripts/local_slurm.sh start)\")")
    r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        pytest.skip(f"sinfo does not answer: {r.stderr.strip()[:200]}")
    pytest.importorskip("submitit")


def wait(pred, timeout=180, what=""):
    t = time.time()
    while time.time() - t < timeout:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def queued(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
    return bool(out.strip())


def spec_file(tmp_path, hold: str = "") -> str:
    step = tmp_path / "step.py"
    step.write_text(STEP)
    cmd = f"{{python}} {step} --seed {{seed}} --job {{job_dir}}" + (f" --hold {hold}" if hold else "")
    spec = {"line": "commands", "seeds": [0, 1],
            "steps": [{"name": "work", "cmd": cmd, "outputs": ["{job_dir}/metrics.json"]}],
            "grid": {"work.offset": [0.5, 2.0]}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def run_sweep(args) -> int:
    return subprocess.run([sys.executable, "sweep.py", *args], cwd=os.path.dirname(sweep.__file__),
                          capture_output=True, text=True, timeout=120).returncode


def test_a_2x2_sweep_runs_as_an_array_with_a_dependent_aggregation(cluster, tmp_path, cleanup):
    root = tmp_path / "r"
    cleanup.append(root)
    assert run_sweep(["run", spec_file(tmp_path), "--out-dir", str(root), "--executor", "slurm", "--time", "5",
                      "--cpus-per-job", "1", "--mem-gb", "1", "--no-plot"]) == 0
    sub = json.loads((root / "submitted.json").read_text())
    assert len(sub["array"]) == 4 and sub["aggregate"]
    wait(lambda: (root / "aggregate" / "summary.json").exists() and not queued(sub["aggregate"]), what="aggregation")
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    assert summary["jobs"]["done"] == 4 and summary["jobs"]["complete"] is True
    for name, offset in (("offset=0.5", 0.5), ("offset=2.0", 2.0)):
        m = summary["configs"][name]["metrics"]["score"]
        assert m["per_seed"] == {"0": offset, "1": 10 + offset}
    r = subprocess.run([sys.executable, "sweep.py", "status", str(root)], cwd=os.path.dirname(sweep.__file__),
                       capture_output=True, text=True)
    assert r.returncode == 0 and "4 of 4 jobs finished" in r.stdout and "submitted to SLURM" in r.stdout


@pytest.fixture
def cleanup():
    """Cancel whatever a test submitted, even when it fails (a held job would occupy the node)."""
    roots = []
    yield roots
    for root in roots:
        try:
            sub = json.loads((root / "submitted.json").read_text())
        except (OSError, ValueError):
            continue
        subprocess.run(["scancel", *{j.split("_")[0] for j in sub["array"]}, sub["aggregate"]], capture_output=True)


def test_a_cancelled_job_is_the_only_one_a_rerun_submits(cluster, tmp_path, cleanup):
    hold = tmp_path / "hold"
    hold.write_text("")
    spec = spec_file(tmp_path, hold=str(hold))
    root = tmp_path / "r"
    cleanup.append(root)
    # seed 1 of offset=2.0 is job 3: it waits on `hold` until cancelled; the others finish
    assert run_sweep(["run", spec, "--out-dir", str(root), "--executor", "slurm", "--time", "5",
                      "--cpus-per-job", "1", "--mem-gb", "1", "--no-plot"]) == 0
    sub = json.loads((root / "submitted.json").read_text())
    victim = sub["array"][3]
    wait(lambda: (root / "offset=2.0" / "s1" / "count").exists(), what="job 3 to start")
    for j in sub["array"][:3]:
        wait(lambda j=j: not queued(j), what=f"job {j}")
    subprocess.run(["scancel", victim], check=True)
    wait(lambda: not queued(victim), what="the cancelled job to leave the queue")
    wait(lambda: not queued(sub["aggregate"]), what="the aggregation")
    counts = {d: len((root / d / "count").read_text().split()) for d in
              ("offset=0.5/s0", "offset=0.5/s1", "offset=2.0/s0", "offset=2.0/s1")}
    assert not (root / "offset=2.0" / "s1" / "metrics.json").exists()
    hold.unlink()
    assert run_sweep(["run", spec, "--out-dir", str(root), "--executor", "slurm", "--time", "5",
                      "--cpus-per-job", "1", "--mem-gb", "1", "--no-plot"]) == 0
    sub2 = json.loads((root / "submitted.json").read_text())
    assert len(sub2["array"]) == 1
    wait(lambda: not queued(sub2["aggregate"]) and (root / "offset=2.0" / "s1" / "metrics.json").exists(),
         what="the rerun")
    after = {d: len((root / d / "count").read_text().split()) for d in counts}
    assert after["offset=2.0/s1"] == counts["offset=2.0/s1"] + 1
    assert all(after[d] == counts[d] for d in counts if d != "offset=2.0/s1")
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    assert summary["jobs"]["done"] == 4
