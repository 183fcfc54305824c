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
            {python}), "outputs"}; metrics are read from {job_dir}/metrics.json. Only these
            four placeholders are replaced; every other brace is kept as written (a
            `python -c` with a dict works), and {{name}} gives a literal {name}.
Grid keys are "<step>.<flag>" (e.g. "train.pos-encoding": ["rope", "t5", "sinusoidal"]) for a
step the line runs; "grid" is a cartesian product, "configs" an explicit list of {"name": ...,
"<step>.<flag>": value} (names are plain file names). A flag value true writes the bare flag,
false or null leaves it out, a list gives several values; values are taken as written. The
flags the sweep sets itself (--seed, --out-dir, --data-dir, ...) cannot be set or overridden.
The spec is checked whole before anything runs; a sweep has at most 10,000 jobs.

ROOT (--out-dir, default runs/sweeps/<spec name>) holds sweep.json (the manifest: spec and
every job's commands), ROOT/<config>/s<seed> (one folder per job), logs/ and status/ (the
steps each job finished, written atomically). Run again, a sweep skips the steps a job
finished with the same command, resumes an interrupted training from its last.pt, and
reruns the rest. A job whose finished steps were made by another command (the spec changed)
stops the sweep before anything runs, unless --force (those steps then run again). One
`run` at a time per ROOT (a lock): a second one stops with one line. Each job also holds a
lock while it runs, so SLURM array tasks and a launcher never run the same job.

Aggregation (at the end of a local sweep, after the jobs on SLURM, or `aggregate`): per
configuration, the mean over seeds with a 95% Student-t interval of every headline number
(test MSE, signal MSE and its ratio to the oracle, epochs to validation thresholds; final
accuracies, forgetting and commutator statistics for modadd), per-layer curves (LB, probes)
with bands, and paired differences between configurations on the seeds they share.
Writes ROOT/aggregate/{summary.csv,summary.json,summary.md,paired.csv} and figures in
plots/sweeps/<root name>; the summary says which jobs it covers. `aggregate` replaces an
earlier aggregation only with --force, which also removes the figures the earlier one drew.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
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
from dataclasses import fields as dataclasses_fields

import safeio
from jobs import MAX_JOBS, MAX_SEED, SeedsError, parse_seeds, slot_env, visible_gpus  # noqa: F401 (re-exported)
from cliargs import NO_PLOT_HELP, Parser, add_output_flags, at_least, default_plots_dir
from modadd import forgetting, report
from statsutil import seed_ci
from modadd.figures import remove_temporaries, save, subplots

REPO = os.path.dirname(os.path.abspath(__file__))
MANIFEST = "sweep.json"
LINES = ("circles", "modadd", "commands")
MODADD_STAGES = {"bubbling": "bubbling", "sae": "sae", "trajectory": "trajectory_pca"}   # stage -> its JSON
GENERATE_STEPS = ("generate", "generate_perturbed")   # the circles line's Mamba generations (optional steps)
STEPS = {"circles": ("data", "train", "evaluate", *GENERATE_STEPS), "modadd": ("train", *MODADD_STAGES)}


class SweepError(ValueError):
    """A spec, a folder or a flag the sweep cannot use; the message names it and the fix."""


# ---------------------------------------------------------------------------- the spec

PLACEHOLDERS = ("seed", "job_dir", "root", "python")
RESERVED = ("data", "logs", "status", "aggregate", "submitit", MANIFEST, "submitted.json")  # the sweep's own names in ROOT
SPEC_KEYS = ("line", "model", "seeds", "grid", "configs", "steps", "stages", "thresholds",
             "name", "description", "comment")
# flags the sweep sets itself for a step (a spec may not set or override them)
OWN_FLAGS = {("circles", "data"): ("out-dir", "plots-dir", "no-plot", "force"),
             ("circles", "train"): ("data-dir", "seed", "out-dir", "plots-dir", "force", "resume"),
             ("circles", "evaluate"): ("checkpoint", "out-dir", "plots-dir", "force"),
             ("circles", "generate"): ("checkpoint", "out-dir", "plots-dir", "force"),
             ("circles", "generate_perturbed"): ("checkpoint", "out-dir", "plots-dir", "force"),
             ("modadd", "train"): ("seed", "out-dir", "force", "export", "from-run")}
STAGE_FLAGS = ("out-dir", "force")                                 # modadd stages: the run folder is theirs
_FLAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")
_PLACE = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


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


def literal(text: str) -> str:
    """text protected from placeholder expansion: every {name} written {{name}} (expand() turns it back)."""
    return re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", r"{{\1}}", text)


def fill(text: str, values: dict) -> str:
    """One pass over text: {name} with a name in values replaced; {{name}} (a literal {name}) and other
    braces left for expand()."""
    return _PLACE.sub(lambda m: m.group(0) if m.group(1) else str(values.get(m.group(2), m.group(0))), text)


def placeholders(text: str) -> list[str]:
    """The {name} placeholders text uses (not the {{name}} escapes, not other braces)."""
    return [m.group(2) for m in _PLACE.finditer(text) if m.group(2)]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "default"


def config_name(overrides: dict) -> str:
    """pos-encoding=rope,train.lr=... : the flag names alone where they are unambiguous; a plain
    file name (long ones shortened with a hash of the whole)."""
    if not overrides:
        return "default"
    flags = [k.split(".", 1)[1] for k in overrides]
    keys = flags if len(set(flags)) == len(flags) else list(overrides)
    name = slug(",".join(f"{k}={v}" for k, v in zip(keys, overrides.values()))).strip(".") or "config"
    if len(name) > 120:
        name = name[:100].rstrip("._") + "-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    return name


def _values(v, where: str, in_list: bool = False) -> None:
    """A flag value: a string, a finite number, true/false/null, or (not nested) a list of strings or
    numbers. Strings may not look like flags (they would be read as one)."""
    if isinstance(v, list) and not in_list:
        if not v:
            raise SweepError(f"{where}: an empty list gives no value; leave the flag out instead")
        for x in v:
            _values(x, where, True)
        return
    if isinstance(v, bool) or v is None:
        if in_list:
            raise SweepError(f"{where}: a list of values holds strings and numbers only, got {v!r}")
        return
    if isinstance(v, float) and not math.isfinite(v):
        raise SweepError(f"{where}: {v!r} is not a finite number")
    if isinstance(v, (int, float)):
        return
    if not isinstance(v, str):
        raise SweepError(f"{where}: a value is a string, a number, true/false/null or a list, got "
                         f"{type(v).__name__} {v!r:.60}")
    if "\0" in v or len(v) > 10_000:
        raise SweepError(f"{where}: the value holds a NUL character or is longer than 10,000 characters")
    if v.startswith("-"):
        try:
            float(v)
        except ValueError:
            raise SweepError(f"{where}: the value {v!r:.60} starts with '-' and would be read as a flag") from None


def _flag_name(k, where: str) -> str:
    name = k[2:] if isinstance(k, str) and k.startswith("--") else k
    if not isinstance(name, str) or not _FLAG.match(name):
        raise SweepError(f"{where}: {k!r:.60} is not a flag name (letters, digits, '-' and '_', e.g. \"lr\" for --lr)")
    return name


def _own_flag(line: str, step: str, name: str) -> tuple[str, ...]:
    """The flags among the sweep's own for this step that `name` sets (argparse also takes a prefix)."""
    own = OWN_FLAGS.get((line, step), STAGE_FLAGS if line == "modadd" and step in MODADD_STAGES else ())
    norm = name.replace("_", "-")
    return tuple(f for f in own if f == norm or f.startswith(norm))


def line_steps(spec: dict) -> tuple[str, ...]:
    """The steps a job of the spec runs (those its grid keys may name)."""
    line = spec["line"]
    if line == "circles":
        return ("data", "train") + tuple(s for s in ("evaluate", *GENERATE_STEPS) if spec.get(s) is not None)
    if line == "modadd":
        return ("train", *spec.get("stages", []))
    return tuple(s["name"] for s in spec["steps"])


def _check_flags(spec: dict, step: str, flags: dict, where: str) -> None:
    for k, v in flags.items():
        name = _flag_name(k, where)
        own = _own_flag(spec["line"], step, name)
        if own:
            raise SweepError(f"{where}: the sweep sets --{own[0]} itself for the {step} step (--{name} would "
                             f"override it); leave it out")
        _values(v, f"{where} {k}")


def _check_commands(spec: dict) -> None:
    steps = spec.get("steps")
    if not isinstance(steps, list) or not steps:
        raise SweepError("a commands sweep needs \"steps\": [{\"name\": ..., \"cmd\": ..., \"outputs\": [...]}, ...]")
    names = []
    for i, s in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(s, dict):
            raise SweepError(f"{where}: each step is an object {{\"name\", \"cmd\", \"outputs\"}}, got {s!r:.60}")
        unknown = [k for k in s if k not in ("name", "cmd", "outputs")]
        if unknown:
            raise SweepError(f"{where}: unknown key {unknown[0]!r:.40} (a step has name, cmd, outputs)")
        name = s.get("name")
        if not isinstance(name, str) or not _FLAG.match(name) or name in SPEC_KEYS:
            raise SweepError(f"{where}: \"name\" {name!r:.60} must be a word of letters, digits, '-' and '_' "
                             f"(not one of the spec's own keys)")
        if name in names:
            raise SweepError(f"{where}: two steps are both called {name!r}")
        names.append(name)
        cmd = s.get("cmd")
        if not isinstance(cmd, str) or not cmd.strip() or "\0" in cmd:
            raise SweepError(f"{where} ({name}): \"cmd\" must be a non-empty command line (a string)")
        try:
            tokens = shlex.split(cmd)
        except ValueError as e:
            raise SweepError(f"{where} ({name}): \"cmd\" cannot be split into words ({e})") from None
        outputs = s.get("outputs", [])
        if not isinstance(outputs, list) or not all(isinstance(o, str) and o and "\0" not in o for o in outputs):
            raise SweepError(f"{where} ({name}): \"outputs\" must be a list of paths (strings)")
        relative = [o for o in outputs if not o.startswith(("{job_dir}", "{root}")) and not os.path.isabs(o)]
        if relative:   # a relative path would be looked up wherever the launcher happens to run
            raise SweepError(f"{where} ({name}): output {relative[0]!r:.60} must start with {{job_dir}} or {{root}} "
                             f"(or be an absolute path)")
        for text in tokens + outputs:
            bad = [p for p in placeholders(text) if p not in PLACEHOLDERS]
            if bad:
                raise SweepError(f"{where} ({name}): unknown placeholder {{{bad[0]}}}; the placeholders are "
                                 f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} (write {{{{{bad[0]}}}}} for a "
                                 f"literal {{{bad[0]}}}; other braces are kept as they are)")


def check_spec(spec) -> None:
    """The spec's shape, before anything runs: one line (SweepError) naming what is wrong."""
    if not isinstance(spec, dict):
        raise SweepError(f"a spec is a JSON object, got a {type(spec).__name__}")
    line = spec.get("line")
    if line not in LINES:
        raise SweepError(f"\"line\": {line!r:.60}; choose one of {', '.join(LINES)}")
    if line == "commands":
        _check_commands(spec)
    if line == "circles" and spec.get("model", "masked") not in ("masked", "mamba"):
        raise SweepError(f"\"model\": {spec.get('model')!r:.60}; choose masked or mamba")
    if line == "circles" and spec.get("model", "masked") != "mamba" and any(spec.get(g) is not None
                                                                           for g in GENERATE_STEPS):
        raise SweepError("\"generate\" steps generate with a Mamba model: add \"model\": \"mamba\"")
    if line == "modadd":
        stages = spec.get("stages", [])
        if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
            raise SweepError(f"\"stages\": give a list of {', '.join(MODADD_STAGES)}")
        bad = [s for s in stages if s not in MODADD_STAGES]
        if bad or len(set(stages)) != len(stages):
            raise SweepError(f"stages: {(bad or stages)[0]!r:.60}" + (" twice" if not bad else "") +
                             f"; the per-run stages are {', '.join(MODADD_STAGES)} (alignment and the report run "
                             f"over a configuration's seeds: python -m modadd.report ROOT/<config>)")
    for key, kind in (("model", str), ("stages", list), ("steps", list), ("thresholds", list), ("grid", dict),
                      ("configs", list)):
        if key in spec and not isinstance(spec[key], kind):
            raise SweepError(f"\"{key}\" must be a {'JSON object' if kind is dict else kind.__name__}, got "
                             f"{spec[key]!r:.60}")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
               for t in spec.get("thresholds", [])):
        raise SweepError("\"thresholds\": a list of finite numbers")
    steps = line_steps(spec)
    possible = STEPS.get(line, steps)
    unknown = [k for k in spec if k not in SPEC_KEYS and k not in possible]
    if unknown:
        raise SweepError(f"unknown key {unknown[0]!r:.60} in the spec; it takes {', '.join(SPEC_KEYS)} and the "
                         f"steps' flags ({', '.join(possible)})")
    for step in possible:
        flags = spec.get(step)
        if flags is not None and not isinstance(flags, dict):
            raise SweepError(f"\"{step}\": give the step's flags as an object, got {flags!r:.60}")
        _check_flags(spec, step, flags or {}, f"\"{step}\"")
    seeds = parse_seeds(spec.get("seeds", [0]))
    if line == "circles":
        for c in configurations(spec):
            _check_circles_flags(spec, c["overrides"], c["name"])
    n = len(configurations(spec))
    if n * len(seeds) > MAX_JOBS:
        raise SweepError(f"{n:,} configurations x {len(seeds):,} seeds = {n * len(seeds):,} jobs; a sweep runs at "
                         f"most {MAX_JOBS:,} (split it into several sweeps)")


def _check_circles_flags(spec: dict, over: dict, config: str) -> None:
    """Every step of a circles job parsed by its own script's parser now (the sweep's own flags filled
    with stand-ins), so a bad value such as "d-model": "abc" stops the sweep before any data is made."""
    import contextlib
    import io
    import evaluate_representations
    import mamba_next
    import markov_circles_timeseries
    import masked_model_gpu
    mamba = spec.get("model", "masked") == "mamba"
    parsers = {"data": (markov_circles_timeseries.build_parser, ["--out-dir", "x"]),
               "train": ((mamba_next.build_parser, ["train"]) if mamba else (masked_model_gpu.build_parser, [])),
               "evaluate": (evaluate_representations.build_parser, ["--checkpoint", "x"]),
               "generate": (mamba_next.build_parser, ["generate", "--checkpoint", "x"]),
               "generate_perturbed": (mamba_next.build_parser, ["generate", "--checkpoint", "x"])}
    for step in line_steps(spec):
        build, lead = parsers[step]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                build().parse_args(lead + to_flags(step_flags(spec, over, step)))
            except SystemExit:
                why = (err.getvalue().strip().splitlines() or ["a flag it does not take"])[-1].removeprefix("error: ")
                why = re.sub(r"; see \S+ --help$", "", why)
                raise SweepError(f"configuration {config!r:.60}, step {step}: {why}") from None


def _overrides(spec: dict, over: dict, where: str) -> None:
    steps = line_steps(spec)
    for k, v in over.items():
        if not isinstance(k, str) or "." not in k or k.split(".", 1)[0] not in steps:
            hint = ""
            if isinstance(k, str) and k.split(".", 1)[0] in STEPS.get(spec["line"], ()):
                hint = (" (that step does not run: add \"evaluate\": {} to the spec)" if spec["line"] == "circles"
                        else " (that stage does not run: add it to \"stages\")")
            raise SweepError(f"{where} key {k!r:.60}: write it as <step>.<flag> with a step of "
                             f"{', '.join(steps)}{hint}")
        step, flag = k.split(".", 1)
        _check_flags(spec, step, {flag: v}, f"{where} {k!r}")


def configurations(spec: dict) -> list[dict]:
    """[{"name", "overrides": {"<step>.<flag>": value}}] from the spec's grid or configs, checked:
    keys of the form <step>.<flag> for a step that runs, values the flags can take, plain distinct names."""
    if "grid" in spec and "configs" in spec:
        raise SweepError("give either \"grid\" (a cartesian product) or \"configs\" (a list), not both")
    if "configs" in spec:
        if not isinstance(spec["configs"], list) or not spec["configs"]:
            raise SweepError("configs: give a non-empty list of objects {\"name\": ..., \"<step>.<flag>\": value}")
        if len(spec["configs"]) > MAX_JOBS:
            raise SweepError(f"configs: {len(spec['configs']):,} configurations; a sweep runs at most "
                             f"{MAX_JOBS:,} jobs")
        out = []
        for i, c in enumerate(spec["configs"]):
            if not isinstance(c, dict):
                raise SweepError(f"configs[{i}]: each entry is an object of \"<step>.<flag>\": value, got {c!r:.60}")
            over = {k: v for k, v in c.items() if k != "name"}
            _overrides(spec, over, f"configs[{i}]")
            name = c.get("name")
            if name is not None and not isinstance(name, str):
                raise SweepError(f"configs[{i}]: \"name\" must be a string, got {name!r:.60}")
            out.append({"name": config_name(over) if name is None else name, "overrides": over,
                        "generated": name is None})
    else:
        grid = spec.get("grid") or {}
        if not isinstance(grid, dict):
            raise SweepError("grid: give an object {\"<step>.<flag>\": [values], ...}")
        if not all(isinstance(v, list) and v for v in grid.values()):
            raise SweepError("grid: every key needs a non-empty list of values")
        size = math.prod(len(v) for v in grid.values())
        if size > MAX_JOBS:
            raise SweepError(f"grid: {size:,} configurations; a sweep runs at most {MAX_JOBS:,} jobs")
        for k, vals in grid.items():
            for v in vals:
                _overrides(spec, {k: v}, "grid")
        out = [{"name": config_name(dict(zip(grid, values))), "overrides": dict(zip(grid, values)), "generated": True}
               for values in itertools.product(*grid.values())]
    names = [c["name"] for c in out]
    for c in out:          # generated names that became equal as file names ("a/b" and "a_b"): told apart by a hash
        if c.pop("generated", False) and names.count(c["name"]) > 1:
            digest = hashlib.sha256(json.dumps(c["overrides"], sort_keys=True).encode()).hexdigest()[:8]
            c["name"] = f"{c['name'][:150]}-{digest}"
    for i, c in enumerate(out):
        try:
            safeio.plain_name(c["name"], "a configuration name")
        except safeio.InputError as e:
            raise SweepError(f"configs[{i}]: {e}") from None
        if c["name"] in RESERVED:
            raise SweepError(f"configs[{i}]: the name {c['name']!r} is one of the sweep's own folders "
                             f"({', '.join(RESERVED)}); choose another")
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


def flag_argv(flags: dict) -> list[str]:
    """to_flags, with every value protected from the placeholder expansion (a value is taken as written)."""
    return [literal(t) for t in to_flags(flags)]


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
    steps = [Step("data", ["{python}", "markov_circles_timeseries.py", *flag_argv(data), "--out-dir", ddir,
                           "--plots-dir", f"{ddir}/plots", "--no-plot", "--force"],
                  [f"{ddir}/data.npz", f"{ddir}/config.json"], shared=f"data/{data_key(data)}")]
    script = ["masked_model_gpu.py"] if spec.get("model", "masked") == "masked" else ["mamba_next.py", "train"]
    steps.append(Step("train", ["{python}", *script, "--data-dir", ddir, *flag_argv(step_flags(spec, over, "train")),
                                "--seed", str(seed), "--out-dir", job, "--plots-dir", f"{job}/plots", "--force"],
                      [f"{job}/metrics.json", f"{job}/best.pt"],
                      resume=["{python}", *script, "--resume", f"{job}/last.pt"], resume_marker=f"{job}/last.pt"))
    if spec.get("evaluate") is not None:
        steps.append(Step("evaluate", ["{python}", "evaluate_representations.py", "--checkpoint", f"{job}/best.pt",
                                       *flag_argv(step_flags(spec, over, "evaluate")),
                                       "--out-dir", f"{job}/representations", "--plots-dir", f"{job}/plots",
                                       "--force"],
                          [f"{job}/representations/representation_metrics.json"]))
    for name in GENERATE_STEPS:
        if spec.get(name) is not None:
            flags = step_flags(spec, over, name)
            tag = generation_tag(flags)
            steps.append(Step(name, ["{python}", "mamba_next.py", "generate", "--checkpoint", f"{job}/best.pt",
                                     *flag_argv(flags), "--out-dir", f"{job}/generate", "--plots-dir", f"{job}/plots",
                                     "--force"], [f"{job}/generate/{tag}.json"]))
    return steps


def generation_tag(flags: dict) -> str:
    """The name mamba_next.py generate gives its outputs for these flags (gen, gen_hidden, gen_output)."""
    if flags.get("perturb-hidden") or flags.get("perturb_hidden"):
        return "gen_hidden"
    if flags.get("perturb-output") or flags.get("perturb_output"):
        return "gen_output"
    return "gen"


def modadd_steps(spec: dict, over: dict, seed: int, job: str) -> list[Step]:
    steps = [Step("train", ["{python}", "-m", "modadd.train", *flag_argv(step_flags(spec, over, "train")),
                            "--seed", str(seed), "--out-dir", job, "--force"],
                  [f"{job}/model.pt", f"{job}/metrics.csv"])]
    for stage in spec.get("stages", []):
        steps.append(Step(stage, ["{python}", "-m", f"modadd.{stage}", job, *flag_argv(step_flags(spec, over, stage)),
                                  "--force"], [f"{job}/{MODADD_STAGES[stage]}.json"]))
    return steps


def command_steps(spec: dict, over: dict, seed: int, job: str) -> list[Step]:
    """The spec's own commands: {seed} and {job_dir} filled in now, {root} and {python} when the
    job runs (expand), {{name}} a literal {name}; any other brace is kept as written."""
    steps = []
    values = {"seed": seed, "job_dir": job}
    for s in spec["steps"]:
        cmd = [fill(t, values) for t in shlex.split(s["cmd"])] + flag_argv(step_flags(spec, over, s["name"]))
        steps.append(Step(s["name"], cmd, [fill(o, values) for o in s.get("outputs", [])]))
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
    """The command as it runs: {root} and {python} replaced, {{name}} -> {name}, other braces kept."""
    values = {"root": root, "python": sys.executable}
    return [_PLACE.sub(lambda m: "{" + m.group(1) + "}" if m.group(1) else values.get(m.group(2), m.group(0)), t)
            for t in tokens]


# ---------------------------------------------------------------------------- state on disk

def write_json(path: str, obj) -> None:
    """Atomically and strictly (safeio): readers, and a rerun after a kill, see the old file or the whole new one."""
    safeio.write_json(path, obj, indent=1)


def read_state(path: str, what: str):
    """A JSON object the sweep wrote (manifest, status), or None when the file is not there; one line
    naming the file when it is not one the sweep could have written."""
    if not os.path.lexists(path):
        return None
    return safeio.read_json(path, what, kind=dict)


def _broken(path: str, what: str) -> SweepError:
    return SweepError(f"{what} {path} does not have the layout sweep.py writes; remove it (the steps it records "
                      f"then run again)")


def status_path(root: str, job: Job | None = None, shared: str | None = None) -> str:
    return os.path.join(root, "status", "shared", slug(shared) + ".json") if shared else \
        os.path.join(root, "status", f"{slug(job.config)}_s{job.seed}.json")


def job_record(root: str, job: Job) -> dict:
    """{step name: {"cmd", ...}} of the steps this job finished (its status file), checked."""
    path = status_path(root, job)
    rec = read_state(path, "status file")
    if rec is None:
        return {}
    steps = rec.get("steps", {})
    if not isinstance(steps, dict) or not all(isinstance(v, dict) for v in steps.values()):
        raise _broken(path, "status file")
    return steps


def step_record(root: str, job: Job, step: Step) -> dict | None:
    if step.shared:
        path = status_path(root, shared=step.shared)
        rec = read_state(path, "status file")
        done = None if rec is None else rec.get(step.shared)
        if done is not None and not isinstance(done, dict):
            raise _broken(path, "status file")
        return done
    return job_record(root, job).get(step.name)


def step_done(root: str, job: Job, step: Step) -> bool:
    """Finished with this very command and every output still there."""
    done = step_record(root, job, step)
    return (isinstance(done, dict) and done.get("cmd") == step.cmd
            and all(os.path.exists(p) for p in expand(step.outputs, root)))


def stale_steps(root: str, job: Job) -> list[str]:
    """Steps this job finished earlier with another command than the spec now gives."""
    rec = job_record(root, job)
    return [s.name for s in job.steps if not s.shared and s.name in rec and rec[s.name].get("cmd") != s.cmd]


def mark_done(root: str, job: Job, step: Step, seconds: float) -> None:
    entry = {"cmd": step.cmd, "seconds": round(seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    if step.shared:
        write_json(status_path(root, shared=step.shared), {step.shared: entry})
        return
    steps = job_record(root, job)
    steps[step.name] = entry
    write_json(status_path(root, job), {"config": job.config, "seed": job.seed, "steps": steps})


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


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)


def load_manifest(root: str) -> tuple[dict, list[Job]]:
    """ROOT/sweep.json, checked: its spec, and jobs whose folders lie inside ROOT."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise SweepError(f"{root} is not a sweep folder; start a sweep with python sweep.py run SPEC --out-dir {root}")
    m = read_state(path, "sweep manifest")
    if m is None or "jobs" not in m:
        raise SweepError(f"{root}: no sweep here ({MANIFEST} missing); start one with python sweep.py run SPEC")
    spec = m.get("spec")     # what the aggregation reads of it (an earlier version's spec is not checked whole)
    if not isinstance(spec, dict) or spec.get("line") not in LINES or not isinstance(spec.get("thresholds", []), list) \
            or not all(_is_number(t) and math.isfinite(t) for t in spec.get("thresholds", [])):
        raise _broken(path, "sweep manifest")
    if not isinstance(m["jobs"], list) or not m["jobs"] or len(m["jobs"]) > MAX_JOBS:
        raise _broken(path, "sweep manifest")
    jobs = []
    for i, j in enumerate(m["jobs"]):
        try:
            safeio.check_dataclass_fields(Job, j, f"{path} jobs[{i}]")
            if set(j) != {f.name for f in dataclasses_fields(Job)} or not isinstance(j["steps"], list):
                raise _broken(path, "sweep manifest")
            steps = []
            for s in j["steps"]:
                safeio.check_dataclass_fields(Step, s, f"{path} jobs[{i}] step")
                if not {"name", "cmd", "outputs"} <= set(s) or not _strings(s["cmd"]) or not _strings(s["outputs"]) \
                        or not (s.get("resume") is None or _strings(s["resume"])) or not _FLAG.match(s["name"]):
                    raise _broken(path, "sweep manifest")
                steps.append(Step(**s))
            job = Job(**{**j, "steps": steps})
        except safeio.InputError:
            raise _broken(path, "sweep manifest") from None
        safeio.plain_name(job.config, f"{path}: the configuration name")
        if job.index != i or job.dir != f"{job.config}/s{job.seed}":
            raise _broken(path, "sweep manifest")
        safeio.inside(root, job.dir, f"{path}: the job folder")
        jobs.append(job)
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
            # a step made after one that runs again reads its new outputs: it runs again too
            if not out["ran"] and step_done(root, job, step):
                out["skipped"].append(step.name)
                continue
            lock = FileLock(os.path.join(root, "status", "locks", slug(step.shared) + ".lock"), wait=True) \
                if step.shared else None
            with lock or nullcontext():
                if step.shared and not out["ran"] and step_done(root, job, step):   # made by another job meanwhile
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
                    rc = subprocess.call(expand(cmd, root), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT)
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
        with tqdm(total=len(futures), desc="jobs", unit="job", disable=not sys.stderr.isatty()) as bar:
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
    try:
        import submitit
    except ImportError:
        raise SweepError(f"--executor {args.executor} needs submitit: pip install submitit") from None
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
        agg_job = agg.submit(me.aggregate_root, root, None, figures, args.force, not args.no_plot, None, True)
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
    """The rows of a CSV file a job wrote; one line naming the file when it is not one."""
    raw = safeio.read_bytes(path, "CSV file")
    try:
        return list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    except (csv.Error, UnicodeDecodeError) as e:
        raise SweepError(f"CSV file {path} cannot be read ({safeio.first_line(e, 120)}); remove it or run its job "
                         f"again") from None


def _num(x) -> float:
    if isinstance(x, bool):
        return float("nan")
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return float("nan")


def _dig(obj, *keys):
    """obj[k1][k2]... or None where a level is missing or not an object (files a job wrote are not trusted)."""
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return obj


def _job_json(path: str) -> dict:
    """A JSON object a job wrote ({} when absent); one line naming the file when it cannot be one."""
    return read_state(path, "metrics file") or {}


CIRCLES_SCALARS = ("val_mse", "test_mse", "test_over_floor", "val_signal_mse", "test_signal_mse",
                   "val_oracle_signal_mse", "test_oracle_signal_mse", "val_signal_over_oracle",
                   "test_signal_over_oracle", "best_epoch", "epochs_run", "train_seconds")
CIRCLES_CURVES = (("lb_k30", lambda m: _dig(m, "lb", "30", "mle")),
                  ("lb_k30_null_gaussian", lambda m: _dig(m, "lb", "30", "null_gaussian")),
                  ("probe_state_acc", lambda m: _dig(m, "probe_state_acc")),
                  ("probe_phase_r2", lambda m: _dig(m, "probe_phase_r2")),
                  ("belief_circle_r2", lambda m: _dig(m, "belief_circle_r2")),
                  ("belief_phase_r2", lambda m: _dig(m, "belief_phase_r2")),
                  ("belief_next_r2", lambda m: _dig(m, "belief_next_r2")))
CERTAINTY = ("certain_share", "signal_mse_certain", "signal_mse_uncertain")   # of metrics.json's *_by_certainty
PROCESS = ("dwell_ks", "transition_tv", "occupancy_tv", "angular_speed_ratio_median", "n_visits")
GENERATED = ("generated", "true_continuation", "process_draw", "oracle_rollout")   # the series generate decodes


def circles_metrics(job_dir: str, spec: dict) -> tuple[dict, dict]:
    """Scalars from metrics.json and training_log.csv, per-layer curves from the evaluation."""
    m = _job_json(os.path.join(job_dir, "metrics.json"))
    scalars = {k: _num(m[k]) for k in CIRCLES_SCALARS if k in m}
    log = os.path.join(job_dir, "training_log.csv")
    if os.path.exists(log):
        rows = [(_num(r.get("epoch")), _num(r.get("val_mse"))) for r in _csv_rows(log)]
        for thr in spec.get("thresholds", []):
            hit = [e for e, v in rows if math.isfinite(e) and v <= thr]
            scalars[f"epochs_to_val_le_{thr:g}"] = float(hit[0]) if hit else float("nan")
    for split in ("val", "test"):
        model, orc = m.get(f"{split}_signal_by_certainty"), _dig(m, "oracle", split, "oracle_by_certainty")
        for who, d in (("", model), ("oracle_", orc)):
            if isinstance(d, dict):
                for k in CERTAINTY:
                    if k in d and not (who and k == "certain_share"):
                        scalars[f"{split}_{who}{k}"] = _num(d[k])
    for tag in ("gen", "gen_hidden", "gen_output"):
        path = os.path.join(job_dir, "generate", f"{tag}.json")
        if os.path.exists(path):
            g = _job_json(path)
            for series in GENERATED:
                for k in PROCESS:
                    v = _dig(g, "process", series, k)
                    if v is not None:
                        scalars[f"{tag}_{series}_{k}"] = _num(v)
            for k in ("mse_to_signal_first_16", "oracle_mse_to_signal_first_16", "decoded_matches_true_circle"):
                if k in g:
                    scalars[f"{tag}_{k}"] = _num(g[k])
    curves = {}
    rep = _job_json(os.path.join(job_dir, "representations", "representation_metrics.json"))
    for prefix, part in (("", "layers"), ("control_", "random_init_control")):
        layers = rep.get(part) if isinstance(rep.get(part), dict) else {}
        for name, get in CIRCLES_CURVES:
            pts = {str(layer): _num(get(v)) for layer, v in layers.items()}
            pts = {k: v for k, v in pts.items() if math.isfinite(v)}
            if pts:
                curves[prefix + name] = pts
    return scalars, curves


def modadd_metrics(job_dir: str, spec: dict) -> tuple[dict, dict]:
    """Final held-out accuracy per m (and its mean), forgetting per m for a curriculum run,
    the per-run commutator statistics of modadd.report, and the run's trajectory r90 (mean
    over attention matrices) beside its random-walk null when the trajectory stage ran."""
    cfg, M = forgetting.load_metrics(job_dir)
    ms = list(range(cfg["m_min"], cfg["m_max"] + 1))
    missing = [m for m in ms if f"acc_m{m}" not in M]
    if missing:
        raise SweepError(f"{os.path.join(job_dir, 'metrics.csv')} has no acc_m{missing[0]} column; run the job again")
    scalars = {f"final_acc_m{m}": float(M[f"acc_m{m}"][-1]) for m in ms}
    scalars["final_acc_mean"] = sum(scalars.values()) / len(ms)
    if cfg["schedule"] == "curriculum":
        for m, r in forgetting.per_run(job_dir)["per_m"].items():
            scalars[f"forgetting_m{m}"] = r["forgetting"]
    comm = os.path.join(job_dir, "commutators.csv")
    if os.path.exists(comm):
        s = report.commutator_stats([{"dir": job_dir, "comm": report.read_commutators(comm), "metrics": M}])[
            "per_seed"][0]
        scalars.update({f"commutator_{k}": v for k, v in s.items() if k != "ci_over_pairs"})
    tp = _job_json(os.path.join(job_dir, "trajectory_pca.json"))
    per_run = tp.get("per_run")
    blocks = list(per_run[0].values()) if isinstance(per_run, list) and per_run and isinstance(per_run[0], dict) \
        else []
    if blocks:
        for key, name in (("r90", "trajectory_r90"), ("null_r90_mean", "trajectory_r90_random_walk"),
                          ("effective_rank", "trajectory_effective_rank")):
            scalars[name] = float(sum(_num(_dig(b, key)) for b in blocks) / len(blocks))
    curves = {"final_accuracy_per_m": {str(m): scalars[f"final_acc_m{m}"] for m in ms}}
    ent = sorted(k for k in M if k.startswith("entropy_L"))
    if ent:
        curves["final_readout_entropy_per_layer"] = {k[len("entropy_L"):]: float(M[k][-1]) for k in ent}
    return scalars, curves


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def commands_metrics(job_dir: str, spec: dict) -> tuple[dict, dict]:
    """{job_dir}/metrics.json: numbers are scalars, objects of numbers are curves."""
    m = _job_json(os.path.join(job_dir, "metrics.json"))
    scalars = {k: _num(v) for k, v in m.items() if _is_number(v)}
    curves = {k: {str(x): _num(y) for x, y in v.items()} for k, v in m.items()
              if isinstance(v, dict) and v and all(_is_number(y) for y in v.values())}
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
    missing = [j.dir for j in jobs if j.index not in per_job]
    out = {"root": root, "line": spec["line"], "baseline": base,
           # which jobs the summary covers: another launcher (or a SLURM array) may still be running the rest
           "jobs": {"total": len(jobs), "done": len(per_job), "complete": not missing,
                    "missing": missing[:100], "n_missing": len(missing)},
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
    jobs = agg["jobs"]
    lines = [f"{jobs['done']} of {jobs['total']} jobs finished; mean over seeds [95% t interval] (n seeds)", ""]
    if jobs.get("n_missing"):
        lines += [f"not covered (not finished when this summary was written): {', '.join(jobs['missing'][:20])}"
                  + (f" and {jobs['n_missing'] - 20} more" if jobs["n_missing"] > 20 else ""), ""]
    lines += ["| metric | " + " | ".join(configs) + " |",
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


MAX_FIGURES = 100
def aggregate_key(out_dir: str) -> str:
    """The key an aggregation records its files under (safeio.Outputs): the command and its summary folder,
    so that two sweeps drawing into one figures folder never take each other's figures for their own."""
    return f"sweep.py aggregate {os.path.abspath(out_dir)}"


def figure_files(agg: dict, plots_dir: str) -> dict[str, str]:
    """{curve name: its figure's path}: one plain, distinct file name per curve (curve names come
    from the jobs' metric files, so they are never used as paths as they are); at most MAX_FIGURES."""
    names = list(dict.fromkeys(n for c in agg["configs"].values() for n in c["curves"]))[:MAX_FIGURES]
    out, taken = {}, set()
    for name in names:
        stem = slug(str(name))[:80].strip(".") or "curve"
        if stem in taken or stem in ("summary", "paired"):
            stem = f"{stem[:60]}-{hashlib.sha256(str(name).encode()).hexdigest()[:8]}"
        taken.add(stem)
        out[name] = os.path.join(plots_dir, safeio.plain_name(stem + ".png", "a figure name"))
    return out


def plot_curves(agg: dict, files: dict[str, str], outputs: safeio.Outputs | None = None) -> list[str]:
    """One figure per curve: one line per configuration with its 95% band."""
    paths = []
    for name, path in files.items():
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
        os.makedirs(os.path.dirname(path), exist_ok=True)
        paths.append(save(fig, outputs.target(path) if outputs else path))
    return paths


def aggregate_outputs(out_dir: str) -> list[str]:
    return [os.path.join(out_dir, f) for f in ("summary.json", "summary.csv", "summary.md", "paired.csv")]


def _claim_aggregation(root: str, outputs: safeio.Outputs, paths: list[str], plots_dir: str,
                       replace_own: bool) -> None:
    """Nothing overwritten without --force. replace_own (the aggregation at the end of `run`): the files
    this aggregation wrote before (recorded, or in ROOT, which is the sweep's) are replaced; any other
    file in the way needs --force."""
    if not replace_own:
        outputs.claim(paths, [plots_dir])
        return
    found = outputs.earlier(paths, [plots_dir])
    mine = {os.path.abspath(p) for folder in dict.fromkeys(os.path.dirname(os.path.abspath(q)) for q in paths)
            for p in safeio.recorded(outputs.key, folder)}
    foreign = [p for p in found if os.path.abspath(p) not in mine
               and os.path.commonpath([root, os.path.abspath(p)]) != root]
    if foreign and not outputs.force:
        raise safeio.OutputsExist(f"{foreign[0]} exists and was not written by this sweep's aggregation; pass "
                                  f"--force to replace it, or aggregate with python sweep.py aggregate {root} "
                                  f"--plots-dir DIR")
    outputs.remove_earlier(found)


def aggregate_root(root: str, out_dir: str | None = None, plots_dir: str | None = None, force: bool = True,
                   plot: bool = True, baseline: str | None = None, replace_own: bool = False) -> dict:
    """Read ROOT's manifest and finished jobs, write the summary files (and figures). It claims
    exactly what it writes (safeio.Outputs): earlier summaries and figures stop it unless force,
    which removes them and the figures an earlier aggregation drew that this one does not."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise SweepError(f"{root} is not a sweep folder; start a sweep with python sweep.py run SPEC --out-dir {root}")
    if out_dir is not None:
        safeio.output_dir(out_dir, "--out-dir", create=False)
    out_dir = out_dir or os.path.join(root, "aggregate")
    plots_dir = plots_dir or default_plots_dir(out_dir)
    safeio.output_dir(out_dir, "--out-dir", create=False)
    if plot:
        safeio.output_dir(plots_dir, "--plots-dir", create=False)
    m, jobs = load_manifest(root)
    paths = aggregate_outputs(out_dir)
    outputs = safeio.Outputs(aggregate_key(out_dir), force)
    if not replace_own and not force:
        outputs.claim(paths, [plots_dir])              # refused before every job's files are read
    agg = aggregate(root, m["spec"], jobs, baseline)
    files = figure_files(agg, plots_dir) if plot else {}
    _claim_aggregation(root, outputs, paths + list(files.values()), plots_dir, replace_own)
    remove_temporaries(paths + list(files.values()))
    os.makedirs(out_dir, exist_ok=True)
    outputs.write_json(paths[0], agg)
    rows = []
    for c, res in agg["configs"].items():
        for k, s in res["metrics"].items():
            rows.append([c, k, s["n"], s["mean"], s["std"], s["lo"], s["hi"]])
        for name, pts in res["curves"].items():
            for x, s in pts.items():
                rows.append([c, f"{name}[{x}]", s["n"], s["mean"], s["std"], s["lo"], s["hi"]])
    safeio.write_csv(outputs.target(paths[1]), ["config", "metric", "n", "mean", "std", "lo", "hi"], rows)
    safeio.write_text(outputs.target(paths[2]), markdown(agg))
    safeio.write_csv(outputs.target(paths[3]), ["config", "baseline", "metric", "n", "mean_difference", "lo", "hi",
                                                "config_larger", "p"],
                     [[c, agg["baseline"], k, d["n"], d["mean"], d["lo"], d["hi"], d["b_larger"], d["p"]]
                      for c, diffs in agg["paired"].items() for k, d in diffs.items()])
    agg["figures"] = plot_curves(agg, files, outputs)
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
                   help="rerun the steps a job finished with another command than the spec now gives, and let the "
                        "aggregation replace files in its way that it did not write")
    a = sub.add_parser("aggregate", help="summaries over seeds and paired comparisons of a sweep's finished jobs")
    a.add_argument("root", help="the sweep's folder")
    a.add_argument("--baseline", default=None, help="configuration the others are compared with (default the first)")
    add_output_flags(a, None, "summary files (default ROOT/aggregate)")
    a.add_argument("--force", action="store_true", help="replace an earlier aggregation in --out-dir")
    s = sub.add_parser("status", help="which jobs and steps of a sweep have finished")
    s.add_argument("root", help="the sweep's folder")
    return p


def load_spec(path: str) -> dict:
    spec = safeio.read_json(path, "sweep spec")
    check_spec(spec)
    return spec


ROOT_LOCK = ("status", "locks", "sweep.lock")   # held by `run` while it plans, runs and aggregates


def default_root(spec_path: str) -> str:
    name = slug(os.path.splitext(os.path.basename(os.path.normpath(spec_path)))[0]).strip(".") or "sweep"
    return os.path.join("runs", "sweeps", name)


def foreign(root: str) -> bool:
    """ROOT holds files but no sweep (the lock folder an earlier refused run left aside)."""
    if not os.path.isdir(root) or os.path.lexists(os.path.join(root, MANIFEST)):
        return False
    names = set(os.listdir(root))
    status = os.path.join(root, "status")
    return bool(names - {"status"}) or (bool(names) and not (os.path.isdir(status) and set(os.listdir(status)) <=
                                                            {"locks"}))


def cmd_run(args) -> int:
    if args.out_dir is not None:
        safeio.output_dir(args.out_dir, "--out-dir", create=False)       # an empty or NUL-holding one, too
    if args.executor == "local":
        visible_gpus(args.gpus)                                          # --gpus checked before anything runs
    spec = load_spec(args.spec)
    jobs = plan(spec)
    root = os.path.abspath(args.out_dir or default_root(args.spec))
    safeio.output_dir(root, "--out-dir", create=False)
    figures = args.plots_dir or default_plots_dir(os.path.join(root, "aggregate"))
    if not args.no_plot:
        safeio.output_dir(figures, "--plots-dir", create=False)
    if foreign(root):
        raise SweepError(f"{root} holds files but no sweep; choose another --out-dir")
    os.makedirs(root, exist_ok=True)
    for j in jobs:
        safeio.inside(root, j.dir, "the job folder")
    # one launcher per root: a second one would aggregate while the first still runs jobs (a summary of
    # some of them); per-job locks keep SLURM array tasks and a launcher from running one job twice
    with FileLock(os.path.join(root, *ROOT_LOCK), wait=False) as mine:
        if not mine:
            raise SweepError(f"another `python sweep.py run` is working on {root}; wait for it to finish (it "
                             f"aggregates every job), and follow it with python sweep.py status {root}")
        return run_sweep(args, spec, jobs, root, figures)


def run_sweep(args, spec: dict, jobs: list[Job], root: str, figures: str) -> int:
    """cmd_run once ROOT is locked: the manifest, the jobs not finished, the aggregation."""
    old = read_state(os.path.join(root, MANIFEST), "sweep manifest")
    stale = {j.dir: stale_steps(root, j) for j in jobs}
    stale = {k: v for k, v in stale.items() if v}
    if stale and not args.force:
        k = next(iter(stale))
        raise SweepError(f"{len(stale)} job(s) finished steps with other commands than this spec gives (first: "
                         f"{k}: {', '.join(stale[k])}); pass --force to rerun them, or use another --out-dir")
    created = (old or {}).get("created")
    manifest = {"spec": spec, "spec_path": os.path.abspath(args.spec),
                "created": created if isinstance(created, str) else time.strftime("%Y-%m-%d %H:%M:%S"),
                "jobs": [asdict(j) for j in jobs]}
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
    agg = aggregate_root(root, plots_dir=figures, force=args.force, plot=not args.no_plot, replace_own=True)
    print(f"aggregated {agg['jobs']['done']} finished job(s): {', '.join(agg['files'] + agg['figures'])}")
    if not agg["jobs"]["complete"]:
        print(f"the summary covers {agg['jobs']['done']} of {agg['jobs']['total']} jobs (not: "
              f"{', '.join(agg['jobs']['missing'][:5])}{' ...' if agg['jobs']['n_missing'] > 5 else ''}); run "
              f"again to finish them")
    return 1 if failed or not agg["jobs"]["complete"] else 0


def cmd_status(args) -> int:
    root = os.path.abspath(args.root)
    _, jobs = load_manifest(root)
    done = 0
    for j in jobs:
        steps = [s.name + ("" if step_done(root, j, s) else " (todo)") for s in j.steps]
        done += job_done(root, j)
        print(f"  {j.dir}: {', '.join(steps)}")
    print(f"{done} of {len(jobs)} jobs finished")
    path = os.path.join(root, "submitted.json")
    sub = read_state(path, "submission record")
    if sub:
        if not (_strings(sub.get("array")) and sub["array"] and isinstance(sub.get("aggregate"), str)):
            raise _broken(path, "submission record")
        print(f"submitted to SLURM: array {sub['array'][0].split('_')[0]}, aggregation {sub['aggregate']}")
    return 0


@safeio.one_line_errors(SweepError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "status":
        return cmd_status(args)
    agg = aggregate_root(args.root, args.out_dir, args.plots_dir, args.force, not args.no_plot, args.baseline)
    print(markdown(agg))
    print("wrote " + ", ".join(agg["files"] + agg["figures"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
