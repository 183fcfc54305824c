"""Grids of configurations x seeds, run locally or on a SLURM cluster, with error bars.

    python sweep.py run scripts/sweeps/positional.json                     # local, 1 job at a time
    python sweep.py run SPEC --jobs 4 --gpus auto                          # 4 at once, one GPU each
    python sweep.py run SPEC --executor slurm --partition gpu --time 60 --gpus-per-job 1
    python sweep.py run SPEC --executor submitit-local                     # submitit's local executor
    python sweep.py aggregate runs/sweeps/positional --baseline pos-encoding=rope
    python sweep.py status runs/sweeps/positional

A spec (JSON) names a line of experiments, the seeds, the fixed flags of each step and the
grid; one job per (configuration, seed) runs the line's steps in order:
  circles   data -> train -> evaluate: markov_circles_timeseries.py, masked_model_gpu.py
            (or "model": "mamba": mamba_next.py train), evaluate_representations.py. The data
            step is keyed by its own flags, so configurations that share them share one data
            folder (ROOT/data/<key>, generated once, under a lock); the seed goes to training.
  modadd    train -> stages: python -m modadd.train, then each of "stages" (bubbling, sae,
            trajectory: the run's own trajectory PCA) on the run. ROOT/<config> is a sweep folder that modadd.report reads.
  commands  your own steps: {"name", "cmd" (a string with {seed}, {job_dir}, {root},
            {python}), "outputs"}; metrics are read from {job_dir}/metrics.json.
Grid keys are "<step>.<flag>" (e.g. "train.pos-encoding": ["rope", "t5", "sinusoidal"]);
"grid" is a cartesian product, "configs" an explicit list of {"name": ..., "<step>.<flag>":
value}. A flag value true writes the bare flag, false or null leaves it out, a list gives
several values.

ROOT (--out-dir, default runs/sweeps/<spec name>) holds sweep.json (the manifest: spec and
every job's commands), ROOT/<config>/s<seed> (one folder per job), logs/ and status/ (the
steps each job finished, written atomically). Run again, a sweep skips the steps a job
finished with the same command, resumes an interrupted training from its last.pt, and
reruns the rest. A job whose finished steps were made by another command (the spec changed)
stops the sweep before anything runs, unless --force (those steps then run again). Two
launchers never run the same job: each job holds a lock while it runs.

Aggregation (at the end of a local sweep, after the jobs on SLURM, or `aggregate`): per
configuration, the mean over seeds with a 95% Student-t interval of every headline number
(test MSE, signal MSE and its ratio to the oracle, epochs to validation thresholds; final
accuracies, forgetting and commutator statistics for modadd), per-layer curves (LB, probes)
with bands, and paired differences between configurations on the seeds they share.
Writes ROOT/aggregate/{summary.csv,summary.json,summary.md,paired.csv} and figures in
plots/sweeps/<root name>.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

from cliargs import NO_PLOT_HELP, Parser, add_output_flags, at_least, default_plots_dir
from modadd import forgetting, report
from statsutil import seed_ci
from modadd.figures import save, subplots

REPO = os.path.dirname(os.path.abspath(__file__))
MANIFEST = "sweep.json"
LINES = ("circles", "modadd", "commands")
MODADD_STAGES = {"bubbling": "bubbling", "sae": "sae", "trajectory": "trajectory_pca"}   # stage -> its JSON
STEPS = {"circles": ("data", "train", "evaluate"), "modadd": ("train", *MODADD_STAGES)}


class SweepError(ValueError):
    """A spec, a folder or a flag the sweep cannot use; the message names it and the fix."""


# ---------------------------------------------------------------------------- the spec

def parse_seeds(value) -> list[int]:
    """[0, 1, 2], "0-2" or "0,3,5" -> sorted distinct seeds."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return sorted(set(value))
    out = []
    for part in str(value).split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise SweepError(f"seeds {value!r}: give them as [0, 1, 2], \"0-2\" or \"0,3,5\"")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return sorted(set(out))


def to_flags(flags: dict) -> list[str]:
    """{"pos-encoding": "rope", "no-umap": True, "layers": [1, 2]} -> argv (True: bare flag,
    False/None: left out, list: several values)."""
    out = []
    for k, v in flags.items():
        flag = "--" + str(k).lstrip("-")
        if v is True:
            out.append(flag)
        elif v is False or v is None:
            continue
        elif isinstance(v, (list, tuple)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "default"


def config_name(overrides: dict) -> str:
    """pos-encoding=rope,train.lr=... : the flag names alone where they are unambiguous."""
    if not overrides:
        return "default"
    flags = [k.split(".", 1)[1] for k in overrides]
    keys = flags if len(set(flags)) == len(flags) else list(overrides)
    return slug(",".join(f"{k}={v}" for k, v in zip(keys, overrides.values())))


def configurations(spec: dict) -> list[dict]:
    """[{"name", "overrides": {"<step>.<flag>": value}}] from the spec's grid or configs."""
    if "grid" in spec and "configs" in spec:
        raise SweepError("give either \"grid\" (a cartesian product) or \"configs\" (a list), not both")
    if "configs" in spec:
        out = []
        for c in spec["configs"]:
            if not isinstance(c, dict):
                raise SweepError(f"configs: each entry is an object of \"<step>.<flag>\": value, got {c!r}")
            over = {k: v for k, v in c.items() if k != "name"}
            out.append({"name": slug(str(c.get("name") or config_name(over))), "overrides": over})
    else:
        grid = spec.get("grid") or {}
        if not all(isinstance(v, list) and v for v in grid.values()):
            raise SweepError("grid: every key needs a non-empty list of values")
        out = [{"name": config_name(dict(zip(grid, values))), "overrides": dict(zip(grid, values))}
               for values in itertools.product(*grid.values())]
    names = [c["name"] for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SweepError(f"two configurations are both called {dup[0]!r}; give each a distinct \"name\"")
    return out


def step_flags(spec: dict, overrides: dict, step: str) -> dict:
    """The fixed flags of a step with the configuration's overrides on top."""
    flags = dict(spec.get(step) or {})
    flags.update({k.split(".", 1)[1]: v for k, v in overrides.items() if k.split(".", 1)[0] == step})
    return flags


def check_spec(spec: dict) -> None:
    if not isinstance(spec, dict):
        raise SweepError("a spec is a JSON object")
    line = spec.get("line")
    if line not in LINES:
        raise SweepError(f"\"line\": {line!r}; choose one of {', '.join(LINES)}")
    parse_seeds(spec.get("seeds", [0]))
    steps = STEPS.get(line) or tuple(s.get("name") for s in spec.get("steps", []))
    if line == "commands" and (not steps or not all(isinstance(s, dict) and s.get("name") and s.get("cmd")
                                                    for s in spec.get("steps", []))):
        raise SweepError("a commands sweep needs \"steps\": [{\"name\": ..., \"cmd\": ...}, ...]")
    if line == "circles" and spec.get("model", "masked") not in ("masked", "mamba"):
        raise SweepError(f"\"model\": {spec.get('model')!r}; choose masked or mamba")
    for c in configurations(spec):
        for k in c["overrides"]:
            if "." not in k or k.split(".", 1)[0] not in steps:
                raise SweepError(f"grid key {k!r}: write it as <step>.<flag> with a step of {', '.join(steps)}")
    for step, flags in ((s, spec.get(s)) for s in steps):
        if flags is not None and not isinstance(flags, dict):
            raise SweepError(f"\"{step}\": give the step's flags as an object, got {flags!r}")
        if isinstance(flags, dict) and {"seed", "out-dir", "data-dir"} & set(flags) and step != "data":
            raise SweepError(f"\"{step}\": the sweep sets --seed, --out-dir and --data-dir itself")


# ---------------------------------------------------------------------------- jobs

@dataclass
class Step:
    """One command of a job. `outputs` exist when it finished; `resume` (with `resume_marker`
    present) continues an interrupted run; `shared` names a step several jobs share (done once,
    under a lock, recorded in ROOT/status/shared)."""
    name: str
    cmd: list[str]
    outputs: list[str]
    resume: list[str] | None = None
    resume_marker: str | None = None
    shared: str | None = None


@dataclass
class Job:
    index: int
    config: str
    seed: int
    dir: str                       # relative to ROOT
    overrides: dict
    steps: list[Step] = field(default_factory=list)


def data_key(flags: dict) -> str:
    return hashlib.sha256(json.dumps(flags, sort_keys=True).encode()).hexdigest()[:10]


def circles_steps(spec: dict, over: dict, seed: int, job: str) -> list[Step]:
    data = step_flags(spec, over, "data")
    ddir = f"{{root}}/data/{data_key(data)}"
    steps = [Step("data", ["{python}", "markov_circles_timeseries.py", *to_flags(data), "--out-dir", ddir,
                           "--plots-dir", f"{ddir}/plots", "--no-plot", "--force"],
                  [f"{ddir}/data.npz", f"{ddir}/config.json"], shared=f"data/{data_key(data)}")]
    script = ["masked_model_gpu.py"] if spec.get("model", "masked") == "masked" else ["mamba_next.py", "train"]
    steps.append(Step("train", ["{python}", *script, "--data-dir", ddir, *to_flags(step_flags(spec, over, "train")),
                                "--seed", str(seed), "--out-dir", job, "--plots-dir", f"{job}/plots", "--force"],
                      [f"{job}/metrics.json", f"{job}/best.pt"],
                      resume=["{python}", *script, "--resume", f"{job}/last.pt"], resume_marker=f"{job}/last.pt"))
    if spec.get("evaluate") is not None:
        steps.append(Step("evaluate", ["{python}", "evaluate_representations.py", "--checkpoint", f"{job}/best.pt",
                                       *to_flags(step_flags(spec, over, "evaluate")),
                                       "--out-dir", f"{job}/representations", "--plots-dir", f"{job}/plots",
                                       "--force"],
                          [f"{job}/representations/representation_metrics.json"]))
    return steps


def modadd_steps(spec: dict, over: dict, seed: int, job: str) -> list[Step]:
    steps = [Step("train", ["{python}", "-m", "modadd.train", *to_flags(step_flags(spec, over, "train")),
                            "--seed", str(seed), "--out-dir", job, "--force"],
                  [f"{job}/model.pt", f"{job}/metrics.csv"])]
    for stage in spec.get("stages", []):
        if stage not in MODADD_STAGES:
            raise SweepError(f"stages: {stage!r}; the per-run stages are {', '.join(MODADD_STAGES)} (alignment and "
                             f"the report run over a configuration's seeds: python -m modadd.report ROOT/<config>)")
        steps.append(Step(stage, ["{python}", "-m", f"modadd.{stage}", job, *to_flags(step_flags(spec, over, stage)),
                                  "--force"], [f"{job}/{MODADD_STAGES[stage]}.json"]))
    return steps


def command_steps(spec: dict, over: dict, seed: int, job: str) -> list[Step]:
    steps = []
    for s in spec["steps"]:
        fill = lambda text: str(text).format(seed=seed, job_dir=job, root="{root}", python="{python}")  # noqa: E731
        cmd = [fill(t) for t in shlex.split(s["cmd"])] + to_flags(step_flags(spec, over, s["name"]))
        steps.append(Step(s["name"], cmd, [fill(o) for o in s.get("outputs", [])]))
    return steps


def plan(spec: dict) -> list[Job]:
    check_spec(spec)
    make = {"circles": circles_steps, "modadd": modadd_steps, "commands": command_steps}[spec["line"]]
    jobs = []
    for c in configurations(spec):
        for seed in parse_seeds(spec.get("seeds", [0])):
            rel = f"{c['name']}/s{seed}"
            jobs.append(Job(len(jobs), c["name"], seed, rel, c["overrides"],
                            make(spec, c["overrides"], seed, "{root}/" + rel)))
    return jobs


def expand(tokens: list[str], root: str) -> list[str]:
    return [t.replace("{root}", root).replace("{python}", sys.executable) for t in tokens]


# ---------------------------------------------------------------------------- state on disk

def write_json(path: str, obj) -> None:
    """Atomically: readers (and a killed writer) leave the old file or the whole new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def status_path(root: str, job: Job | None = None, shared: str | None = None) -> str:
    return os.path.join(root, "status", "shared", slug(shared) + ".json") if shared else \
        os.path.join(root, "status", f"{slug(job.config)}_s{job.seed}.json")


def step_done(root: str, job: Job, step: Step) -> bool:
    """Finished with this very command and every output still there."""
    rec = read_json(status_path(root, shared=step.shared) if step.shared else status_path(root, job), {})
    done = rec.get(step.shared or step.name) if step.shared else rec.get("steps", {}).get(step.name)
    return (isinstance(done, dict) and done.get("cmd") == step.cmd
            and all(os.path.exists(p) for p in expand(step.outputs, root)))


def stale_steps(root: str, job: Job) -> list[str]:
    """Steps this job finished earlier with another command than the spec now gives."""
    rec = read_json(status_path(root, job), {}).get("steps", {})
    return [s.name for s in job.steps if not s.shared and s.name in rec and rec[s.name].get("cmd") != s.cmd]


def mark_done(root: str, job: Job, step: Step, seconds: float) -> None:
    entry = {"cmd": step.cmd, "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if step.shared:
        write_json(status_path(root, shared=step.shared), {step.shared: entry})
        return
    path = status_path(root, job)
    rec = read_json(path, {"config": job.config, "seed": job.seed, "steps": {}})
    rec["steps"][step.name] = entry
    write_json(path, rec)


class FileLock:
    """flock on a file; blocking (a shared step: wait for the job that makes it) or not (a job:
    another launcher runs it)."""

    def __init__(self, path: str, wait: bool):
        self.path, self.wait, self.f = path, wait, None

    def __enter__(self):
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError:
            self.f.close()
            self.f = None
        return self.f is not None

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()


def load_manifest(root: str) -> tuple[dict, list[Job]]:
    m = read_json(os.path.join(root, MANIFEST))
    if not isinstance(m, dict) or "jobs" not in m:
        raise SweepError(f"{root}: no sweep here ({MANIFEST} missing); start one with python sweep.py run SPEC")
    jobs = [Job(**{**j, "steps": [Step(**s) for s in j["steps"]]}) for j in m["jobs"]]
    return m, jobs


# ---------------------------------------------------------------------------- running a job

def run_job(root: str, index: int, env: dict | None = None) -> dict:
    """Run job `index` of the sweep in ROOT: each step not yet finished, in order. Returns
    {"job", "status": ok|failed|busy, "ran", "skipped", "seconds"}. This is what the local
    pool calls, and what submitit pickles for a SLURM array task."""
    root = os.path.abspath(root)
    _, jobs = load_manifest(root)
    job = jobs[index]
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = {"job": job.dir, "status": "ok", "ran": [], "skipped": [], "seconds": 0.0}
    t0 = time.perf_counter()
    with FileLock(os.path.join(root, "status", "locks", slug(job.dir) + ".lock"), wait=False) as mine:
        if not mine:
            return dict(out, status="busy")
        for step in job.steps:
            if step_done(root, job, step):
                out["skipped"].append(step.name)
                continue
            lock = FileLock(os.path.join(root, "status", "locks", slug(step.shared) + ".lock"), wait=True) \
                if step.shared else None
            with lock or nullcontext():
                if step.shared and step_done(root, job, step):   # made by another job while we waited
                    out["skipped"].append(step.name)
                    continue
                cmd = step.cmd
                if step.resume and os.path.exists(expand([step.resume_marker], root)[0]):
                    cmd = step.resume
                log = os.path.join(root, "logs", f"{slug(job.config)}_s{job.seed}.{step.name}.log")
                os.makedirs(os.path.dirname(log), exist_ok=True)
                t = time.perf_counter()
                with open(log, "a") as f:
                    f.write(f"$ {shlex.join(expand(cmd, root))}\n")
                    f.flush()
                    rc = subprocess.call(expand(cmd, root), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
                missing = [p for p in expand(step.outputs, root) if not os.path.exists(p)]
                if rc != 0 or missing:
                    why = f"exit status {rc}" if rc else f"{missing[0]} was not written"
                    return dict(out, status="failed", step=step.name, why=why, log=log,
                                seconds=time.perf_counter() - t0)
                mark_done(root, job, step, time.perf_counter() - t)
                out["ran"].append(step.name)
    out["seconds"] = time.perf_counter() - t0
    return out


def job_done(root: str, job: Job) -> bool:
    return all(step_done(root, job, s) for s in job.steps)


# ---------------------------------------------------------------------------- executors

def visible_gpus(count: str) -> list[str]:
    """GPU ids for --gpus: "auto" (the CUDA devices this process sees), "0" (none) or N (the
    first N ids, e.g. to leave some free). CUDA_VISIBLE_DEVICES, when set, lists the ids."""
    listed = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if count == "auto":
        if listed:
            return listed
        try:
            import torch
            n = torch.cuda.device_count()
        except ImportError:
            n = 0
        return [str(i) for i in range(n)]
    n = int(count)
    return (listed or [str(i) for i in range(n)])[:n]


def slot_env(slot: int, gpus: list[str], threads: int) -> dict:
    """Environment of worker slot `slot`: GPUs round-robin over slots (so jobs running at once
    get different GPUs), and `threads` CPU threads."""
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


def run_local(root: str, indices: list[int], workers: int, gpus: list[str], threads: int) -> list[dict]:
    """A pool of `workers` slots; each job borrows a slot (and its GPU) while it runs."""
    from tqdm import tqdm
    slots: queue.Queue = queue.Queue()
    for k in range(workers):
        slots.put(k)

    def one(i):
        slot = slots.get()
        try:
            return run_job(root, i, slot_env(slot, gpus, threads))
        finally:
            slots.put(slot)

    results = []
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = [ex.submit(one, i) for i in indices]
        with tqdm(total=len(futures), desc="jobs", unit="job") as bar:
            for fut in as_completed(futures):
                r = fut.result()
                results.append(r)
                bar.write(describe(r))
                bar.update()
    return results


def describe(r: dict) -> str:
    if r["status"] == "failed":
        return f"  {r['job']}: FAILED in {r['step']} ({r['why']}; see {r['log']})"
    if r["status"] == "busy":
        return f"  {r['job']}: running in another launcher, left alone"
    ran = f"ran {', '.join(r['ran'])}" if r["ran"] else "nothing to run"
    return f"  {r['job']}: ok, {ran}" + (f" (done before: {', '.join(r['skipped'])})" if r["skipped"] else "") + \
        f" in {r['seconds']:.0f} s"


def submitit_executor(root: str, cluster: str, args, name: str):
    import submitit
    ex = submitit.AutoExecutor(folder=os.path.join(root, "submitit", "%j"), cluster=cluster)
    params = {"timeout_min": args.time, "cpus_per_task": args.cpus_per_job, "gpus_per_node": args.gpus_per_job,
              "mem_gb": args.mem_gb, "name": name}
    if cluster == "slurm":
        params.update(slurm_partition=args.partition, slurm_array_parallelism=args.jobs)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def run_submitit(root: str, indices: list[int], args, cluster: str) -> list[dict] | None:
    """Submit the jobs as one array. On SLURM, also submit the aggregation with a dependency on
    the array (afterany) and return None; with submitit's local executor, wait and return the results."""
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    import importlib
    me = importlib.import_module("sweep")       # pickled by reference, not as __main__
    name = f"sweep-{os.path.basename(root)}"
    ex = submitit_executor(root, cluster, args, name)
    array = ex.map_array(me.run_job, [root] * len(indices), indices)
    print(f"submitted {len(array)} job(s) through submitit ({cluster}): {array[0].job_id.split('_')[0]}")
    if cluster == "slurm":
        agg = submitit_executor(root, cluster, args, name + "-aggregate")
        agg.update_parameters(timeout_min=30, gpus_per_node=0, cpus_per_task=1,
                              slurm_additional_parameters={"dependency": f"afterany:{array[0].job_id.split('_')[0]}"})
        figures = os.path.abspath(args.plots_dir or default_plots_dir(os.path.join(root, "aggregate")))
        agg_job = agg.submit(me.aggregate_root, root, None, figures, True, not args.no_plot)
        write_json(os.path.join(root, "submitted.json"), {"array": [j.job_id for j in array],
                                                          "aggregate": agg_job.job_id})
        print(f"aggregation job {agg_job.job_id} runs after the array (afterany); "
              f"job ids in {os.path.join(root, 'submitted.json')}; `python sweep.py status {root}` follows them")
        return None
    results = []
    for i, j in zip(indices, array):
        try:
            r = j.result()
        except Exception as e:  # noqa: BLE001 - a job that raised: report it, keep the others
            r = {"job": f"job {i}", "status": "failed", "step": "?", "why": str(e).splitlines()[-1][:200],
                 "log": j.paths.stderr}
        results.append(r)
        print(describe(r), flush=True)
    return results


# ---------------------------------------------------------------------------- aggregation

def paired(a: dict, b: dict) -> dict:
    """b - a over the seeds both have (a, b: {seed: value}): mean difference, 95% t interval,
    paired t-test p, and in how many seeds b is larger."""
    from scipy import stats
    seeds = sorted(s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s]))
    d = [b[s] - a[s] for s in seeds]
    out = seed_ci(d)
    out["seeds"] = seeds
    out["b_larger"] = sum(x > 0 for x in d)
    out["p"] = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and len(set(d)) > 1 else float("nan")
    return out


def _csv_rows(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


CIRCLES_SCALARS = ("val_mse", "test_mse", "test_over_floor", "val_signal_mse", "test_signal_mse",
                   "val_oracle_signal_mse", "test_oracle_signal_mse", "val_signal_over_oracle",
                   "test_signal_over_oracle", "best_epoch", "epochs_run", "train_seconds")
CIRCLES_CURVES = (("lb_k30", lambda m: m["lb"]["30"]["mle"] if "30" in m.get("lb", {}) else None),
                  ("lb_k30_null_gaussian", lambda m: m["lb"]["30"]["null_gaussian"] if "30" in m.get("lb", {})
                   else None),
                  ("probe_state_acc", lambda m: m.get("probe_state_acc")),
                  ("probe_phase_r2", lambda m: m.get("probe_phase_r2")),
                  ("belief_circle_r2", lambda m: m.get("belief_circle_r2")))


def circles_metrics(job_dir: str, spec: dict) -> tuple[dict, dict]:
    """Scalars from metrics.json and training_log.csv, per-layer curves from the evaluation."""
    m = read_json(os.path.join(job_dir, "metrics.json"), {})
    scalars = {k: _num(m[k]) for k in CIRCLES_SCALARS if k in m}
    log = os.path.join(job_dir, "training_log.csv")
    if os.path.exists(log):
        rows = _csv_rows(log)
        for thr in spec.get("thresholds", []):
            hit = [int(r["epoch"]) for r in rows if _num(r.get("val_mse")) <= thr]
            scalars[f"epochs_to_val_le_{thr:g}"] = float(hit[0]) if hit else float("nan")
    curves = {}
    rep = read_json(os.path.join(job_dir, "representations", "representation_metrics.json"), {})
    for name, get in CIRCLES_CURVES:
        pts = {layer: get(v) for layer, v in rep.get("layers", {}).items()}
        pts = {k: _num(v) for k, v in pts.items() if v is not None and math.isfinite(_num(v))}
        if pts:
            curves[name] = pts
    return scalars, curves


def modadd_metrics(job_dir: str, spec: dict) -> tuple[dict, dict]:
    """Final held-out accuracy per m (and its mean), forgetting per m for a curriculum run,
    the per-run commutator statistics of modadd.report, and the run's trajectory r90 (mean
    over attention matrices) beside its random-walk null when the trajectory stage ran."""
    cfg, M = forgetting.load_metrics(job_dir)
    ms = list(range(cfg["m_min"], cfg["m_max"] + 1))
    scalars = {f"final_acc_m{m}": float(M[f"acc_m{m}"][-1]) for m in ms}
    scalars["final_acc_mean"] = sum(scalars.values()) / len(ms)
    if cfg["schedule"] == "curriculum":
        for m, r in forgetting.per_run(job_dir)["per_m"].items():
            scalars[f"forgetting_m{m}"] = r["forgetting"]
    comm = os.path.join(job_dir, "commutators.csv")
    if os.path.exists(comm):
        s = report.commutator_stats([{"comm": report.read_csv(comm), "metrics": report.read_csv(
            os.path.join(job_dir, "metrics.csv"))}])["per_seed"][0]
        scalars.update({f"commutator_{k}": v for k, v in s.items() if k != "ci_over_pairs"})
    tp = read_json(os.path.join(job_dir, "trajectory_pca.json"))
    if tp and tp.get("per_run"):
        blocks = tp["per_run"][0].values()
        for key, name in (("r90", "trajectory_r90"), ("null_r90_mean", "trajectory_r90_random_walk"),
                          ("effective_rank", "trajectory_effective_rank")):
            scalars[name] = float(sum(b[key] for b in blocks) / len(blocks))
    curves = {"final_accuracy_per_m": {str(m): scalars[f"final_acc_m{m}"] for m in ms}}
    ent = sorted(k for k in M if k.startswith("entropy_L"))
    if ent:
        curves["final_readout_entropy_per_layer"] = {k[len("entropy_L"):]: float(M[k][-1]) for k in ent}
    return scalars, curves


def commands_metrics(job_dir: str, spec: dict) -> tuple[dict, dict]:
    """{job_dir}/metrics.json: numbers are scalars, objects of numbers are curves."""
    m = read_json(os.path.join(job_dir, "metrics.json"), {})
    scalars = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    curves = {k: {str(x): float(y) for x, y in v.items()} for k, v in m.items()
              if isinstance(v, dict) and v and all(isinstance(y, (int, float)) for y in v.values())}
    return scalars, curves


METRICS = {"circles": circles_metrics, "modadd": modadd_metrics, "commands": commands_metrics}


def aggregate(root: str, spec: dict, jobs: list[Job], baseline: str | None = None) -> dict:
    """Per configuration, mean and 95% CI over seeds of every scalar and of every curve point;
    paired differences of each configuration against the baseline (default the first)."""
    per_job = {}
    for j in jobs:
        if job_done(root, j):
            per_job[j.index] = METRICS[spec["line"]](os.path.join(root, j.dir), spec)
    configs = list(dict.fromkeys(j.config for j in jobs))
    if baseline is not None and baseline not in configs:
        raise SweepError(f"--baseline {baseline!r} is not a configuration of this sweep ({', '.join(configs)})")
    base = baseline or configs[0]
    values: dict = {c: {} for c in configs}      # config -> metric -> {seed: value}
    curves: dict = {c: {} for c in configs}      # config -> curve -> x -> {seed: value}
    for j in jobs:
        if j.index not in per_job:
            continue
        sc, cu = per_job[j.index]
        for k, v in sc.items():
            values[j.config].setdefault(k, {})[j.seed] = v
        for name, pts in cu.items():
            for x, v in pts.items():
                curves[j.config].setdefault(name, {}).setdefault(x, {})[j.seed] = v
    out = {"root": root, "line": spec["line"], "baseline": base,
           "jobs": {"total": len(jobs), "done": len(per_job)},
           "configs": {c: {"seeds": sorted({j.seed for j in jobs if j.config == c and j.index in per_job}),
                           "overrides": next(j.overrides for j in jobs if j.config == c),
                           "metrics": {k: {**seed_ci(v.values()), "per_seed": v} for k, v in values[c].items()},
                           "curves": {n: {x: seed_ci(v.values()) for x, v in pts.items()}
                                      for n, pts in curves[c].items()}}
                       for c in configs}}
    out["paired"] = {c: {k: paired(values[base][k], values[c][k]) for k in values[c] if k in values[base]}
                     for c in configs if c != base}
    return out


def fmt(s: dict, digits: int = 4, of: int | None = None) -> str:
    """mean [lo, hi] (n k, or n k of N when only k of N seeds have a value, e.g. reached a threshold)."""
    if s["n"] == 0:
        return "-" if of is None else f"- (n 0 of {of})"
    g = lambda x: f"{x:.{digits}g}"  # noqa: E731
    return f"{g(s['mean'])} [{g(s['lo'])}, {g(s['hi'])}] (n {s['n']}" + (f" of {of})" if of and of != s["n"] else ")")


def markdown(agg: dict) -> str:
    configs = list(agg["configs"])
    metrics = list(dict.fromkeys(k for c in configs for k in agg["configs"][c]["metrics"]))
    lines = [f"{agg['jobs']['done']} of {agg['jobs']['total']} jobs finished; mean over seeds "
             f"[95% t interval] (n seeds)", "", "| metric | " + " | ".join(configs) + " |",
             "|---|" + "---|" * len(configs)]
    for k in metrics:
        lines.append(f"| {k} | " + " | ".join(fmt(agg["configs"][c]["metrics"][k], of=len(agg["configs"][c]["seeds"]))
                                              if k in agg["configs"][c]["metrics"] else "-" for c in configs) + " |")
    for c, diffs in agg["paired"].items():
        lines += ["", f"paired on the same seeds: {c} - {agg['baseline']}", "",
                  "| metric | difference [95% CI] | seeds larger | p (paired t) |", "|---|---|---|---|"]
        lines += [f"| {k} | {fmt(d)} | {d['b_larger']} of {d['n']} | {d['p']:.3g} |" for k, d in diffs.items()]
    for name in dict.fromkeys(n for c in configs for n in agg["configs"][c]["curves"]):
        xs = list(dict.fromkeys(x for c in configs for x in agg["configs"][c]["curves"].get(name, {})))
        lines += ["", f"{name} (mean [95% CI] over seeds)", "", "| config | " + " | ".join(xs) + " |",
                  "|---|" + "---|" * len(xs)]
        for c in configs:
            pts = agg["configs"][c]["curves"].get(name, {})
            lines.append(f"| {c} | " + " | ".join(fmt(pts[x], 3).split(" (n")[0] if x in pts else "-"
                                                 for x in xs) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(agg: dict, plots_dir: str) -> list[str]:
    """One figure per curve: one line per configuration with its 95% band."""
    paths = []
    names = list(dict.fromkeys(n for c in agg["configs"].values() for n in c["curves"]))
    for name in names:
        fig, ax = subplots(1, figsize=(7, 4.2))
        for i, (c, res) in enumerate(agg["configs"].items()):
            pts = res["curves"].get(name)
            if not pts:
                continue
            xs = list(pts)
            mean = [pts[x]["mean"] for x in xs]
            ax.plot(range(len(xs)), mean, "o-", color=f"C{i}", label=f"{c} ({len(res['seeds'])} seeds)")
            lo = [pts[x]["lo"] for x in xs]
            hi = [pts[x]["hi"] for x in xs]
            ax.fill_between(range(len(xs)), lo, hi, color=f"C{i}", alpha=0.2)
            ax.set_xticks(range(len(xs)), xs)
        ax.set_title(f"{name}: mean over seeds, 95% t band", fontsize=10)
        ax.set_xlabel("layer" if "layer" in name or name.startswith(("lb", "probe", "belief")) else "")
        ax.legend(fontsize=7)
        os.makedirs(plots_dir, exist_ok=True)
        paths.append(save(fig, os.path.join(plots_dir, f"{name}.png")))
    return paths


def aggregate_outputs(out_dir: str) -> list[str]:
    return [os.path.join(out_dir, f) for f in ("summary.json", "summary.csv", "summary.md", "paired.csv")]


def aggregate_root(root: str, out_dir: str | None = None, plots_dir: str | None = None, force: bool = True,
                   plot: bool = True, baseline: str | None = None) -> dict:
    """Read ROOT's manifest and finished jobs, write the summary files (and figures)."""
    root = os.path.abspath(root)
    m, jobs = load_manifest(root)
    out_dir = out_dir or os.path.join(root, "aggregate")
    plots_dir = plots_dir or default_plots_dir(out_dir)
    paths = aggregate_outputs(out_dir)
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise SweepError(f"{existing[0]} exists; pass --force to replace the aggregation or choose another --out-dir")
    agg = aggregate(root, m["spec"], jobs, baseline)
    os.makedirs(out_dir, exist_ok=True)
    write_json(paths[0], agg)
    with open(paths[1] + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "metric", "n", "mean", "std", "lo", "hi"])
        for c, res in agg["configs"].items():
            for k, s in res["metrics"].items():
                w.writerow([c, k, s["n"], s["mean"], s["std"], s["lo"], s["hi"]])
            for name, pts in res["curves"].items():
                for x, s in pts.items():
                    w.writerow([c, f"{name}[{x}]", s["n"], s["mean"], s["std"], s["lo"], s["hi"]])
    os.replace(paths[1] + ".tmp", paths[1])
    with open(paths[2] + ".tmp", "w") as f:
        f.write(markdown(agg))
    os.replace(paths[2] + ".tmp", paths[2])
    with open(paths[3] + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "baseline", "metric", "n", "mean_difference", "lo", "hi", "config_larger", "p"])
        for c, diffs in agg["paired"].items():
            for k, d in diffs.items():
                w.writerow([c, agg["baseline"], k, d["n"], d["mean"], d["lo"], d["hi"], d["b_larger"], d["p"]])
    os.replace(paths[3] + ".tmp", paths[3])
    agg["figures"] = plot_curves(agg, plots_dir) if plot else []
    agg["files"] = paths
    return agg


# ---------------------------------------------------------------------------- the commands

def build_parser() -> Parser:
    p = Parser(prog="python sweep.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    r = sub.add_parser("run", help="plan the jobs of a spec and run (or submit) those not finished")
    r.add_argument("spec", help="the sweep's JSON spec (see python sweep.py --help)")
    r.add_argument("--out-dir", default=None, help="the sweep's folder: its jobs' runs and the aggregation's numbers "
                   "in ROOT/aggregate (default runs/sweeps/<spec file name>)")
    r.add_argument("--plots-dir", default=None, help="where the aggregation's figures go (default plots/<name>, "
                   "<name> being the --out-dir's path below runs/, else below the current folder, else its last two "
                   "folder names, for ROOT/aggregate: runs/sweeps/x -> plots/sweeps/x/aggregate); the jobs draw "
                   "where their own commands say")
    r.add_argument("--no-plot", action="store_true", help=NO_PLOT_HELP + " for the aggregation (the jobs' own "
                   "commands decide about theirs)")
    r.add_argument("--executor", choices=("local", "submitit-local", "slurm"), default="local",
                   help="local: a process pool here; slurm: a job array through submitit; submitit-local: "
                        "submitit's local executor (to try a SLURM setup on one machine)")
    r.add_argument("--jobs", type=at_least(1), default=None,
                   help="jobs at once (local: default the number of GPUs, else 1; slurm: array parallelism)")
    r.add_argument("--gpus", default="auto",
                   help="local: GPUs to spread the jobs over (auto: those visible; 0: none; N: the first N), "
                        "one per running job, round-robin")
    r.add_argument("--threads", type=at_least(1), default=None,
                   help="CPU threads per local job (default: the cores divided among --jobs)")
    r.add_argument("--partition", default=None, help="slurm: partition")
    r.add_argument("--time", type=at_least(1), default=60, help="slurm/submitit: minutes per job")
    r.add_argument("--gpus-per-job", type=at_least(0), default=None, help="slurm/submitit: GPUs per job")
    r.add_argument("--cpus-per-job", type=at_least(1), default=None, help="slurm/submitit: CPU cores per job")
    r.add_argument("--mem-gb", type=at_least(1), default=None, help="slurm/submitit: memory per job (GB)")
    r.add_argument("--dry-run", action="store_true", help="write the manifest and list the jobs; run nothing")
    r.add_argument("--force", action="store_true",
                   help="rerun the steps a job finished with another command than the spec now gives")
    a = sub.add_parser("aggregate", help="summaries over seeds and paired comparisons of a sweep's finished jobs")
    a.add_argument("root", help="the sweep's folder")
    a.add_argument("--baseline", default=None, help="configuration the others are compared with (default the first)")
    add_output_flags(a, None, "summary files (default ROOT/aggregate)")
    a.add_argument("--force", action="store_true", help="replace an earlier aggregation in --out-dir")
    s = sub.add_parser("status", help="which jobs and steps of a sweep have finished")
    s.add_argument("root", help="the sweep's folder")
    return p


def load_spec(path: str) -> dict:
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as e:
        raise SweepError(f"{path}: {e.strerror}")
    except ValueError as e:
        raise SweepError(f"{path} is not valid JSON ({e})")
    check_spec(spec)
    return spec


def cmd_run(args) -> int:
    spec = load_spec(args.spec)
    root = os.path.abspath(args.out_dir or os.path.join("runs", "sweeps", os.path.splitext(
        os.path.basename(args.spec))[0]))
    jobs = plan(spec)
    old = read_json(os.path.join(root, MANIFEST))
    if old is None and os.path.isdir(root) and os.listdir(root):
        raise SweepError(f"{root} holds files but no sweep; choose another --out-dir")
    stale = {j.dir: stale_steps(root, j) for j in jobs}
    stale = {k: v for k, v in stale.items() if v}
    if stale and not args.force:
        k = next(iter(stale))
        raise SweepError(f"{len(stale)} job(s) finished steps with other commands than this spec gives (first: "
                         f"{k}: {', '.join(stale[k])}); pass --force to rerun them, or use another --out-dir")
    manifest = {"spec": spec, "spec_path": os.path.abspath(args.spec), "created": (old or {}).get(
        "created", time.strftime("%Y-%m-%d %H:%M:%S")), "jobs": [asdict(j) for j in jobs]}
    write_json(os.path.join(root, MANIFEST), manifest)
    todo = [j.index for j in jobs if not job_done(root, j)]
    configs = list(dict.fromkeys(j.config for j in jobs))
    print(f"sweep {root}: {len(configs)} configuration(s) x {len(parse_seeds(spec.get('seeds', [0])))} seed(s) = "
          f"{len(jobs)} jobs; {len(jobs) - len(todo)} finished, {len(todo)} to run")
    if args.dry_run:
        for j in jobs:
            print(f"  [{'done' if j.index not in todo else 'todo'}] {j.dir}: " + " && ".join(
                shlex.join(s.cmd) for s in j.steps))
        return 0
    results = []
    if todo and args.executor == "local":
        gpus = visible_gpus(args.gpus)
        workers = args.jobs or max(1, len(gpus))
        threads = args.threads or max(1, (os.cpu_count() or 1) // workers)
        print(f"local: {workers} at once, {threads} thread(s) each" + (f", GPUs {','.join(gpus)} round-robin"
                                                                       if gpus else ""))
        results = run_local(root, todo, workers, gpus, threads)
    elif todo:
        results = run_submitit(root, todo, args, "slurm" if args.executor == "slurm" else "local")
        if results is None:
            return 0
    failed = [r for r in results if r["status"] == "failed"]
    agg = aggregate_root(root, plots_dir=args.plots_dir, force=True, plot=not args.no_plot)
    print(f"aggregated {agg['jobs']['done']} finished job(s): {', '.join(agg['files'] + agg['figures'])}")
    return 1 if failed else 0


def cmd_status(args) -> int:
    root = os.path.abspath(args.root)
    _, jobs = load_manifest(root)
    done = 0
    for j in jobs:
        steps = [s.name + ("" if step_done(root, j, s) else " (todo)") for s in j.steps]
        done += job_done(root, j)
        print(f"  {j.dir}: {', '.join(steps)}")
    print(f"{done} of {len(jobs)} jobs finished")
    sub = read_json(os.path.join(root, "submitted.json"))
    if sub:
        print(f"submitted to SLURM: array {sub['array'][0].split('_')[0]}, aggregation {sub['aggregate']}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "status":
            return cmd_status(args)
        agg = aggregate_root(args.root, args.out_dir, args.plots_dir, args.force, not args.no_plot, args.baseline)
        print(markdown(agg))
        print("wrote " + ", ".join(agg["files"] + agg["figures"]))
        return 0
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
