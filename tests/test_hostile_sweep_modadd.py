"""Hostile and careless input for sweep.py, scripts/compare_runs.py, scripts/terrain_train_metrics.py
and the modadd/ commands (issue 27), as tables of tiny cases run in-process.

Every refused input: exit status non-zero, exactly one stderr line starting with "error:", no
traceback, and the folder tree byte-identical before and after (nothing created, nothing changed).
Every accepted one does the right thing, writes only its declared outputs (and safeio's record of
them), and every JSON it writes is strict (a NaN is null and named in "nonfinite").
"""
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import safeio
import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = 10 ** 15
DEEP = "[" * 100_000 + "]" * 100_000
TINY = ["--steps", "12", "--d-model", "8", "--n-heads", "2", "--n-layers", "2", "--snapshot-every", "4",
        "--eval-size", "16", "--batch-size", "8", "--T", "8", "--C", "3", "--m-max", "2", "--n-noise", "2",
        "--commutator-every", "4"]
MANIFESTS = (".outputs.json", ".outputs.lock")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


compare_runs = _script("compare_runs")
terrain_train_metrics = _script("terrain_train_metrics")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tree(folder) -> dict:
    """Every file and folder below folder: relative path -> bytes (None for a folder)."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), folder)] = None
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read() if not os.path.islink(p) else b"->link"
    return out


def call(main, argv, capsys):
    """(exit status, stdout, stderr lines) of main(argv), argparse's SystemExit included."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "█" not in line]


def refused(main, argv, capsys, folder, words=()):
    """main(argv) stops with one 'error:' line (naming words) and changes nothing below folder."""
    before = tree(folder)
    rc, _, err = call(main, argv, capsys)
    assert rc not in (0, None), (argv, err)
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])
    assert tree(folder) == before, set(tree(folder)) ^ set(before)
    return err[0]


def strict_json(path):
    """A JSON file with no NaN / Infinity literal, whose nulls for numbers are named in "nonfinite"."""
    def no_constant(c):
        raise AssertionError(f"{path} holds {c}")
    return json.loads(open(path).read(), parse_constant=no_constant)


def written_jsons(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".json")]


# ------------------------------------------------------------------------------------------- sweep specs

def commands_spec(**over):
    spec = {"line": "commands", "seeds": [0],
            "steps": [{"name": "work", "cmd": "{python} -c pass", "outputs": []}]}
    spec.update(over)
    return spec


BAD_SPECS = [
    ("deep", DEEP, "nested too deeply"),
    ("not json", "{line: commands", "not valid JSON"),
    ("binary", b"\xff\xfe\x00\x01", "UTF-8"),
    ("empty file", "", "not valid JSON"),
    ("a list", [1, 2], "JSON object"),
    ("null", None, "JSON object"),
    ("no line", {"seeds": [0]}, "line"),
    ("unknown line", {"line": "bert"}, "choose one of"),
    ("line a list", {"line": ["commands"]}, "line"),
    ("seeds huge range", commands_spec(seeds="0-999999999"), "10,000"),
    ("seeds huge list", commands_spec(seeds=list(range(10_001))), "10,000"),
    ("seeds empty range", commands_spec(seeds="5-2"), "empty"),
    ("seeds negative string", commands_spec(seeds="-1"), "seeds"),
    ("seeds negative list", commands_spec(seeds=[-1]), "seeds"),
    ("seeds bool", commands_spec(seeds=[True]), "seeds"),
    ("seeds float", commands_spec(seeds=1.5), "seeds"),
    ("seeds empty list", commands_spec(seeds=[]), "seeds"),
    ("seeds object", commands_spec(seeds={"a": 1}), "seeds"),
    ("seeds words", commands_spec(seeds="0-3,x"), "seeds"),
    ("seeds unicode digits", commands_spec(seeds="\u0663"), "seeds"),
    ("seed too large", commands_spec(seeds=[2 ** 40]), "seeds"),
    ("seed range too large", commands_spec(seeds="0-99999999999999999999"), "seeds"),
    ("jobs: configs x seeds", commands_spec(seeds="0-9999", configs=[{"name": "a"}, {"name": "b"}]), "10,000"),
    ("grid too large", commands_spec(grid={f"work.f{i}": list(range(10)) for i in range(6)}), "10,000"),
    ("grid value not a list", commands_spec(grid={"work.lr": "0.1"}), "non-empty list"),
    ("grid empty list", commands_spec(grid={"work.lr": []}), "non-empty list"),
    ("grid a list", commands_spec(grid=[1]), "grid"),
    ("grid key without step", commands_spec(grid={"lr": [1]}), "<step>.<flag>"),
    ("grid key unknown step", commands_spec(grid={"fit.lr": [1]}), "<step>.<flag>"),
    ("grid key empty flag", commands_spec(grid={"work.": [1]}), "flag"),
    ("grid flag with space", commands_spec(grid={"work.a b": [1]}), "flag"),
    ("grid flag with =", commands_spec(grid={"work.lr=1": [1]}), "flag"),
    ("grid value an object", commands_spec(grid={"work.lr": [{"a": 1}]}), "value"),
    ("grid value nested list", commands_spec(grid={"work.lr": [[[1]]]}), "list"),
    ("grid value looks like a flag", commands_spec(grid={"work.lr": ["--out-dir"]}), "flag"),
    ("grid value NUL", commands_spec(grid={"work.lr": ["a\u0000b"]}), "NUL"),
    ("grid value NaN", '{"line": "commands", "seeds": [0], "steps": [{"name": "w", "cmd": "x"}], '
                       '"grid": {"w.lr": [NaN]}}', "finite"),
    ("grid and configs", commands_spec(grid={"work.a": [1]}, configs=[{"name": "x"}]), "not both"),
    ("configs empty", commands_spec(configs=[]), "non-empty"),
    ("configs a string", commands_spec(configs="abc"), "configs"),
    ("config not an object", commands_spec(configs=[1]), "object"),
    ("config named ..", commands_spec(configs=[{"name": ".."}]), "file name"),
    ("config named .", commands_spec(configs=[{"name": "."}]), "file name"),
    ("config name with /", commands_spec(configs=[{"name": "../../x"}]), "file name"),
    ("config name absolute", commands_spec(configs=[{"name": "/tmp/x"}]), "file name"),
    ("config name empty", commands_spec(configs=[{"name": ""}]), "file name"),
    ("config name too long", commands_spec(configs=[{"name": "a" * 300}]), "file name"),
    ("config name a number", commands_spec(configs=[{"name": 5}]), "string"),
    ("config name reserved", commands_spec(configs=[{"name": "status"}]), "own folders"),
    ("config names twice", commands_spec(configs=[{"name": "a"}, {"name": "a", "work.x": 1}]), "both called"),
    ("config key unknown step", commands_spec(configs=[{"name": "a", "train.lr": 1}]), "<step>.<flag>"),
    ("unknown top-level key", commands_spec(grd={"work.a": [1]}), "unknown key"),
    ("step flags not an object", commands_spec(work=[1]), "object"),
    ("commands without steps", {"line": "commands"}, "steps"),
    ("commands steps empty", {"line": "commands", "steps": []}, "steps"),
    ("commands step not an object", {"line": "commands", "steps": ["x"]}, "object"),
    ("commands step without cmd", {"line": "commands", "steps": [{"name": "x"}]}, "cmd"),
    ("commands cmd not a string", {"line": "commands", "steps": [{"name": "x", "cmd": ["a"]}]}, "cmd"),
    ("commands cmd unbalanced quote", {"line": "commands", "steps": [{"name": "x", "cmd": "echo 'a"}]}, "split"),
    ("commands unknown placeholder", {"line": "commands", "steps": [{"name": "x", "cmd": "echo {jobdir}"}]},
     "{jobdir}"),
    ("commands placeholder in outputs", {"line": "commands", "steps": [{"name": "x", "cmd": "echo",
                                                                      "outputs": ["{out}/m.json"]}]}, "{out}"),
    ("commands step name a path", {"line": "commands", "steps": [{"name": "../x", "cmd": "echo"}]}, "name"),
    ("commands step name reserved", {"line": "commands", "steps": [{"name": "seeds", "cmd": "echo"}]}, "name"),
    ("commands step names twice", {"line": "commands", "steps": [{"name": "x", "cmd": "a"},
                                                                 {"name": "x", "cmd": "b"}]}, "both called"),
    ("commands outputs not a list", {"line": "commands", "steps": [{"name": "x", "cmd": "a", "outputs": "m"}]},
     "outputs"),
    ("commands step unknown key", {"line": "commands", "steps": [{"name": "x", "cmd": "a", "out": []}]}, "unknown"),
    ("circles model", {"line": "circles", "model": "gpt"}, "masked or mamba"),
    ("circles train sets seed", {"line": "circles", "train": {"seed": 3}}, "sets --seed"),
    ("circles grid train.out-dir", {"line": "circles", "grid": {"train.out-dir": ["/tmp/x"]}}, "--out-dir"),
    ("circles grid train.data-dir", {"line": "circles", "grid": {"train.data-dir": ["/tmp/x"]}}, "--data-dir"),
    ("circles grid a prefix of out-dir", {"line": "circles", "grid": {"train.out": ["/tmp/x"]}}, "--out-dir"),
    ("circles grid --out-dir spelled", {"line": "circles", "grid": {"train.--out-dir": ["/tmp/x"]}}, "--out-dir"),
    ("circles grid out_dir", {"line": "circles", "grid": {"train.out_dir": ["/tmp/x"]}}, "--out-dir"),
    ("circles data out-dir", {"line": "circles", "data": {"out-dir": "/tmp/x"}}, "--out-dir"),
    ("circles evaluate checkpoint", {"line": "circles", "evaluate": {"checkpoint": "x.pt"}}, "--checkpoint"),
    ("circles evaluate not run", {"line": "circles", "grid": {"evaluate.no-umap": [True]}}, "evaluate"),
    ("circles thresholds", {"line": "circles", "thresholds": ["a"]}, "thresholds"),
    ("modadd stage unknown", {"line": "modadd", "stages": ["nope"]}, "stages"),
    ("modadd stages a string", {"line": "modadd", "stages": "trajectory"}, "stages"),
    ("modadd stage twice", {"line": "modadd", "stages": ["sae", "sae"]}, "twice"),
    ("modadd train out-dir", {"line": "modadd", "train": {"out-dir": "/tmp/x"}}, "--out-dir"),
    ("modadd train export", {"line": "modadd", "grid": {"train.export": ["/tmp/x"]}}, "--export"),
    ("modadd stage out-dir", {"line": "modadd", "stages": ["bubbling"], "bubbling": {"out-dir": "/tmp/x"}},
     "--out-dir"),
    ("modadd stage not run", {"line": "modadd", "grid": {"sae.k": [4]}}, "stages"),
]


@pytest.mark.parametrize("name,spec,words", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
@pytest.mark.parametrize("dry", [True, False], ids=["dry-run", "run"])
def test_bad_specs_stop_with_one_line_before_anything(tmp_path, capsys, name, spec, words, dry):
    path = tmp_path / "spec.json"
    if isinstance(spec, bytes):
        path.write_bytes(spec)
    else:
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    refused(sweep.main, ["run", str(path), "--out-dir", str(tmp_path / "root")] + (["--dry-run"] if dry else []),
            capsys, tmp_path, [words])


def test_placeholders_and_literal_braces():
    """Only the four placeholders are replaced, in one pass; {{name}} is a literal {name}; every other brace
    (a dict in a python -c) is kept; a flag value is taken as written, whatever braces it holds."""
    spec = commands_spec(steps=[{"name": "w", "cmd": "{python} -c \"d = {'a': {'b': 1}}; print(d, '{{seed}}')\" "
                                                       "{seed} {job_dir} {root}/x {{x}} {} {1}",
                                 "outputs": ["{job_dir}/m.json"]}],
                         grid={"w.note": ["{root}", "{{seed}}"]})
    jobs = sweep.plan(spec)
    got = [sweep.expand(j.steps[0].cmd, "/R") for j in jobs]
    assert got[0][:3] == [sys.executable, "-c", "d = {'a': {'b': 1}}; print(d, '{seed}')"]
    assert got[0][3:9] == ["0", f"/R/{jobs[0].dir}", "/R/x", "{x}", "{}", "{1}"]
    assert got[0][-2:] == ["--note", "{root}"] and got[1][-2:] == ["--note", "{{seed}}"]
    assert sweep.expand(jobs[0].steps[0].outputs, "/R") == [f"/R/{jobs[0].dir}/m.json"]
    rng = np.random.default_rng(0)
    for _ in range(3000):                    # literal() protects any text from the expansion
        text = "".join(rng.choice(list("{}ab_1 r")) for _ in range(rng.integers(0, 12)))
        assert sweep.expand([sweep.literal(text)], "/R")[0] == text


def test_generated_config_names_are_plain_and_jobs_stay_inside_the_root():
    spec = commands_spec(grid={"work.x": ["..", "../../etc", "/abs", "a" * 400, "."]})
    jobs = sweep.plan(spec)
    names = [j.config for j in jobs]
    assert len(set(names)) == 5
    for n in names:
        assert safeio.plain_name(n, "x") == n and len(n) <= 200 and n not in (".", "..")
        assert os.path.commonpath(["/R", os.path.normpath(os.path.join("/R", n, "s0"))]) == "/R"


# ------------------------------------------------------------------------------------------- sweep runs

def write_spec(tmp_path, spec, name="spec.json"):
    p = tmp_path / name
    p.write_text(json.dumps(spec))
    return str(p)


METRICS_STEP = ("{python} -c \"import json, os, sys; os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True); "
                "json.dump({'score': {seed} + 0.5, 'nan': float('nan'), "
                "'flag': True, 'huge': 10 ** 400, 'curve': {'1': {seed}, '2': 2.0}, "
                "'../../evil': {'1': 1.0}}, open(sys.argv[1], 'w'))\" {job_dir}/metrics.json")


def metrics_spec(**over):
    spec = dict(seeds=[0, 1, 2], steps=[{"name": "m", "cmd": METRICS_STEP, "outputs": ["{job_dir}/metrics.json"]}])
    spec.update(over)
    return commands_spec(**spec)


@pytest.fixture
def done_sweep(tmp_path, capsys):
    """A commands sweep of three seeds whose step (a python -c with dict braces) ran: its root."""
    path = write_spec(tmp_path, metrics_spec())
    root = tmp_path / "root"
    rc, out, err = call(sweep.main, ["run", path, "--out-dir", str(root), "--no-plot", "--jobs", "2"], capsys)
    assert rc == 0, err
    return root


def test_a_command_with_braces_runs_and_the_summary_is_strict_json(done_sweep):
    m = json.load(open(done_sweep / "default" / "s2" / "metrics.json"))
    assert m["score"] == 2.5 and m["curve"] == {"1": 2, "2": 2.0}
    agg = strict_json(done_sweep / "aggregate" / "summary.json")
    score = agg["configs"]["default"]["metrics"]["score"]
    assert score["mean"] == pytest.approx(1.5) and score["n"] == 3
    assert "flag" not in agg["configs"]["default"]["metrics"]                 # a bool is no number
    assert agg["configs"]["default"]["metrics"]["nan"]["mean"] is None
    assert "configs.default.metrics.nan.mean" in agg["nonfinite"]
    assert agg["jobs"]["complete"] and agg["jobs"]["n_missing"] == 0
    import csv
    cells = [c.lower() for row in csv.reader(open(done_sweep / "aggregate" / "summary.csv")) for c in row[2:]]
    assert not {"nan", "inf", "-inf"} & set(cells)                               # NaN cells are empty


@pytest.mark.parametrize("case", ["out-dir a file", "out-dir below a file", "plots-dir a file", "same again",
                                  "baseline unknown", "root not a sweep", "root missing", "manifest deep",
                                  "manifest job outside", "manifest job not an object", "status deep",
                                  "status a list", "metrics deep", "metrics a list"])
def test_aggregate_refuses_with_one_line(done_sweep, tmp_path, capsys, case):
    f = tmp_path / "file"
    f.write_text("mine")
    argv = ["aggregate", str(done_sweep), "--no-plot"]
    words = []
    if case == "out-dir a file":
        argv += ["--out-dir", str(f), "--force"]
        words = ["is a file"]
    elif case == "out-dir below a file":
        argv += ["--out-dir", str(f / "sub"), "--force"]
    elif case == "plots-dir a file":
        argv = ["aggregate", str(done_sweep), "--plots-dir", str(f), "--force"]
        words = ["--plots-dir"]
    elif case == "same again":
        words = ["--force"]
    elif case == "baseline unknown":
        argv += ["--baseline", "nope", "--force"]
    elif case == "root not a sweep":
        argv = ["aggregate", str(tmp_path), "--force"]
    elif case == "root missing":
        argv = ["aggregate", str(tmp_path / "nothing"), "--force"]
    elif case.startswith("manifest"):
        m = json.load(open(done_sweep / "sweep.json"))
        if case == "manifest deep":
            (done_sweep / "sweep.json").write_text(DEEP)
        elif case == "manifest job outside":
            m["jobs"][0]["dir"] = "../../outside/s0"
            (done_sweep / "sweep.json").write_text(json.dumps(m))
        else:
            m["jobs"][0] = [1]
            (done_sweep / "sweep.json").write_text(json.dumps(m))
        argv += ["--force"]
    elif case.startswith("status"):
        (done_sweep / "status" / "default_s0.json").write_text(DEEP if case == "status deep" else "[1]")
        argv += ["--force"]
    else:
        (done_sweep / "default" / "s1" / "metrics.json").write_text(DEEP if case == "metrics deep" else "[1]")
        argv += ["--force"]
    refused(sweep.main, argv, capsys, tmp_path, words)


def test_aggregate_force_replaces_only_what_it_wrote(done_sweep, tmp_path, capsys):
    """Figure names come from the jobs' metric files: plain names inside --plots-dir. --force with --no-plot
    removes the figures the earlier aggregation drew, and nothing else of the folder."""
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "mine.png").write_bytes(b"the user's own figure")
    rc, _, err = call(sweep.main, ["aggregate", str(done_sweep), "--out-dir", str(tmp_path / "agg"), "--plots-dir",
                                   str(figs)], capsys)
    assert rc == 0, err
    drawn = sorted(n for n in os.listdir(figs) if n.endswith(".png") and n != "mine.png")
    assert drawn and all(safeio.plain_name(n, "x") for n in drawn) and not (tmp_path / "evil").exists()
    assert not list(tmp_path.parent.glob("evil*"))
    for p in written_jsons(tmp_path / "agg"):
        strict_json(p)
    before = tree(tmp_path / "agg")
    refused(sweep.main, ["aggregate", str(done_sweep), "--out-dir", str(tmp_path / "agg"), "--plots-dir", str(figs)],
            capsys, tmp_path, ["--force"])
    assert tree(tmp_path / "agg") == before
    rc, _, err = call(sweep.main, ["aggregate", str(done_sweep), "--out-dir", str(tmp_path / "agg"), "--plots-dir",
                                   str(figs), "--no-plot", "--force"], capsys)
    assert rc == 0, err
    assert sorted(n for n in os.listdir(figs) if not n.startswith(".")) == ["mine.png"]
    assert (figs / "mine.png").read_bytes() == b"the user's own figure"


@pytest.mark.parametrize("case", ["out-dir a file", "out-dir below a file", "out-dir empty", "plots-dir a file",
                                  "spec a folder", "spec missing", "gpus a word", "root holds other files",
                                  "another launcher", "manifest deep", "status nested"])
def test_run_refuses_with_one_line(tmp_path, capsys, case):
    path = write_spec(tmp_path, commands_spec())
    root = tmp_path / "root"
    f = tmp_path / "file"
    f.write_text("mine")
    argv = ["run", path, "--out-dir", str(root), "--no-plot"]
    lock = contextlib.nullcontext()
    if case == "out-dir a file":
        argv[3] = str(f)
    elif case == "out-dir below a file":
        argv[3] = str(f / "root")
    elif case == "out-dir empty":
        argv[3] = ""
    elif case == "spec a folder":
        argv[1] = str(tmp_path)
    elif case == "spec missing":
        argv[1] = str(tmp_path / "nothing.json")
    elif case == "gpus a word":
        argv += ["--gpus", "two"]
    elif case == "plots-dir a file":
        argv = ["run", path, "--out-dir", str(root), "--plots-dir", str(f)]
    elif case == "root holds other files":
        root.mkdir()
        (root / "notes.txt").write_text("mine")
    else:
        assert sweep.main(argv) == 0
        if case == "another launcher":
            lock = sweep.FileLock(os.path.join(root, *sweep.ROOT_LOCK), wait=False)
        elif case == "manifest deep":
            (root / "sweep.json").write_text(DEEP)
        else:
            (root / "status" / "default_s0.json").write_text(json.dumps({"steps": {"work": [1]}}))
    with lock as held:
        assert held is not False
        refused(sweep.main, argv, capsys, tmp_path)


def test_two_launchers_never_leave_a_partial_summary(tmp_path, capsys):
    """While one launcher holds the root, a second stops with one line; a summary written while jobs are
    missing says which ones it does not cover."""
    path = write_spec(tmp_path, commands_spec(seeds=[0, 1]))
    root = tmp_path / "root"
    assert sweep.main(["run", path, "--out-dir", str(root), "--no-plot"]) == 0
    os.remove(root / "status" / "default_s1.json")           # as if seed 1 were still running elsewhere
    rc, _, err = call(sweep.main, ["aggregate", str(root), "--no-plot", "--force"], capsys)
    assert rc == 0
    agg = strict_json(root / "aggregate" / "summary.json")
    assert agg["jobs"]["complete"] is False and agg["jobs"]["missing"] == ["default/s1"]
    assert "default/s1" in (root / "aggregate" / "summary.md").read_text()


def test_a_rerun_of_the_same_spec_continues(tmp_path, capsys):
    path = write_spec(tmp_path, metrics_spec(seeds=[0]))
    root = tmp_path / "root"
    assert sweep.main(["run", path, "--out-dir", str(root), "--no-plot"]) == 0
    first = (root / "default" / "s0" / "metrics.json").read_bytes()
    rc, out, err = call(sweep.main, ["run", path, "--out-dir", str(root), "--no-plot"], capsys)
    assert rc == 0 and "1 finished, 0 to run" in out and not err
    assert (root / "default" / "s0" / "metrics.json").read_bytes() == first


def test_status_refuses_hostile_records(tmp_path, capsys):
    path = write_spec(tmp_path, commands_spec())
    root = tmp_path / "root"
    assert sweep.main(["run", path, "--out-dir", str(root), "--no-plot"]) == 0
    for content in (DEEP, "[1]", json.dumps({"array": 5, "aggregate": []})):
        (root / "submitted.json").write_text(content)
        refused(sweep.main, ["status", str(root)], capsys, tmp_path)


# ------------------------------------------------------------------------------------------- compare_runs

def fake_run(folder, vals=(20, 9.0, 8.5), test=8.4, log=None, **metrics):
    os.makedirs(folder)
    (folder / "training_log.csv").write_text(log if log is not None else "epoch,val_mse\n" + "".join(
        f"{i},{v}\n" for i, v in enumerate(vals, 1)))
    m = {"epochs_run": len(vals), "best_epoch": 3, "val_mse": min(vals), "test_mse": test, "noise_floor": 8.0,
         "train_seconds": 1.0}
    m.update(metrics)
    (folder / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if v != "DROP"}))
    return folder


COMPARE_CASES = [
    ("name with ..", {"name": "../../x"}, None, "--name"),
    ("name absolute", {"name": "/tmp/x"}, None, "--name"),
    ("name empty", {"name": ""}, None, "--name"),
    ("name with slash", {"name": "a/b"}, None, "--name"),
    ("out-dir a file", {"out": "file"}, None, "is a file"),
    ("plots-dir a file", {"plots": "file"}, None, "--plots-dir"),
    ("run missing", {"run": "nothing"}, None, "not a finished run"),
    ("run a file", {"run": "file"}, None, "not a finished run"),
    ("log text", {}, dict(log="epoch,val_mse\n1,abc\n"), "training log"),
    ("log binary", {}, dict(log="\udcff"), "training log"),
    ("log no columns", {}, dict(log="a,b\n1,2\n"), "training log"),
    ("metrics deep", {}, dict(metrics=DEEP), "nested too deeply"),
    ("metrics a list", {}, dict(metrics="[1]"), "not an object"),
    ("test_mse a string", {}, dict(test="x"), "test_mse"),
    ("noise_floor a string", {}, dict(noise_floor="8"), "noise_floor"),
    ("noise_floor negative", {}, dict(noise_floor=-1.0), "noise_floor"),
    ("epochs_run missing", {}, dict(epochs_run="DROP"), "epochs_run"),
]


@pytest.mark.parametrize("name,flags,run,words", COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_compare_runs_refuses_with_one_line(tmp_path, capsys, name, flags, run, words):
    f = tmp_path / "file"
    f.write_text("mine")
    run = dict(run or {})
    metrics_text = run.pop("metrics", None)
    log = run.pop("log", None)
    if log == "\udcff":
        folder = fake_run(tmp_path / "a", **run)
        (folder / "training_log.csv").write_bytes(b"epoch,val_mse\n\xff\xfe\n")
    else:
        folder = fake_run(tmp_path / "a", log=log, **run)
    if metrics_text is not None:
        (folder / "metrics.json").write_text(metrics_text)
    target = {"file": str(f), "nothing": str(tmp_path / "nothing")}.get(flags.get("run"), str(folder))
    argv = [target, "--out-dir", {"file": str(f)}.get(flags.get("out"), str(tmp_path / "out")),
            "--plots-dir", {"file": str(f)}.get(flags.get("plots"), str(tmp_path / "figs")),
            "--name", flags.get("name", "cmp")]
    refused(compare_runs.main, argv, capsys, tmp_path, [words])


def test_compare_runs_claims_exactly_its_files(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", test=float("nan"))
    out, figs = tmp_path / "out", tmp_path / "figs"
    figs.mkdir()
    (figs / "other.png").write_bytes(b"mine")
    argv = [str(a), "--out-dir", str(out), "--plots-dir", str(figs), "--name", "cmp"]
    assert compare_runs.main(argv) == 0
    refused(compare_runs.main, argv + ["--no-plot"], capsys, tmp_path, ["--force"])   # its figure is there
    assert compare_runs.main(argv + ["--name", "other"]) == 2        # a user's file of that name
    assert compare_runs.main(argv + ["--no-plot", "--force"]) == 0
    assert sorted(n for n in os.listdir(figs) if not n.startswith(".")) == ["other.png"]   # stale figure gone
    assert (figs / "other.png").read_bytes() == b"mine"
    assert compare_runs.main([str(b), "--out-dir", str(out), "--no-plot", "--name", "nan"]) == 2  # NaN test MSE


# ------------------------------------------------------------------------------------------- terrain_train_metrics

RESULT = {"epochs": [{"epoch": 1, "wup_pearson": 0.25, "loss": 2.0, "near_minus_far": 0.1, "preservation": 0.99}],
          "unmodulated": {"wup_pearson": 0.2}, "control": {"wup_pearson": 0.22}, "steps": 40}


@pytest.mark.parametrize("case,content", [
    ("deep", DEEP), ("a list", "[]"), ("binary", "\udcff"), ("no epochs", {"steps": 1}),
    ("epochs empty", dict(RESULT, epochs=[])), ("epoch a string", dict(RESULT, epochs=["x"])),
    ("pearson a string", dict(RESULT, epochs=[dict(RESULT["epochs"][0], wup_pearson="0.3")])),
    ("control missing", {k: v for k, v in RESULT.items() if k != "control"}),
    ("steps a float", dict(RESULT, steps=1.5)), ("early stop a list", dict(RESULT, early_stop=[1])),
    ("user metrics.json", "USER"), ("job dir a file", "FILE")])
def test_terrain_train_metrics_refuses_with_one_line(tmp_path, capsys, case, content):
    job = tmp_path / "job"
    job.mkdir()
    p = job / "modulate_train_field_x.json"
    if content == "\udcff":
        p.write_bytes(b"\xff\xfe")
    elif content in ("USER", "FILE"):
        p.write_text(json.dumps(RESULT))
        (job / "metrics.json").write_text("the user's")
    else:
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    arg = str(p) if content == "FILE" else str(job)
    refused(terrain_train_metrics.main, [arg], capsys, tmp_path)


def test_terrain_train_metrics_writes_strict_json_and_replaces_only_its_own(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "modulate_train_field_x.json").write_text(json.dumps(dict(RESULT, control={"wup_pearson": None})))
    assert terrain_train_metrics.main([str(job)]) == 0
    m = strict_json(job / "metrics.json")
    assert m["control_pearson"] is None and "gain_over_control" in m["nonfinite"] and m["heldout_gain"] == \
        pytest.approx(0.05)
    assert terrain_train_metrics.main([str(job)]) == 0        # its own earlier output: replaced
    other = tmp_path / "other"
    shutil.copytree(job, other, ignore=shutil.ignore_patterns(".outputs*"))
    assert terrain_train_metrics.main([str(other)]) == 2       # a metrics.json it did not write
    assert terrain_train_metrics.main([str(other), "--force"]) == 0


# ------------------------------------------------------------------------------------------- modadd

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from modadd.train import main
    d = tmp_path_factory.mktemp("hostile_modadd") / "run"
    assert main([*TINY, "--out-dir", str(d)]) == 0
    return d


@pytest.fixture
def run(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def edit_config(run, **changes):
    c = json.load(open(run / "config.json"))
    c.update(changes)
    (run / "config.json").write_text(json.dumps({k: v for k, v in c.items() if v != "DROP"}))


def edit_checkpoint(run, **changes):
    ck = torch.load(run / "model.pt", weights_only=True)
    if "state" in changes:
        ck["model"] = changes.pop("state")
    ck["config"].update(changes)
    torch.save(ck, run / "model.pt")


def edit_snapshots(run, mode):
    z = dict(np.load(run / "snapshots.npz"))
    if mode == "nan":
        z["L0_W_Q"][1, 0, 0] = np.nan
    elif mode == "short":
        z = {k: v[:2] for k, v in z.items()}
    elif mode == "ragged":
        z["L1_W_K"] = z["L1_W_K"][:2]
    elif mode == "complex":
        z["L0_W_Q"] = z["L0_W_Q"].astype(np.complex64)
    elif mode == "wrong shape":
        z["rest.tok.weight"] = z["rest.tok.weight"][:, :2]
    elif mode == "no steps":
        del z["steps"]
    elif mode == "object":
        z["L0_W_Q"] = np.array([{"a": 1}] * 4, dtype=object)
    elif mode == "not a zip":
        (run / "snapshots.npz").write_bytes(b"PK\x03\x04 not a zip")
        return
    elif mode == "lying header":          # an .npy header claiming 99999 x 99999 floats, 16 bytes of data
        import io
        import zipfile
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (99999, 99999)})
        with zipfile.ZipFile(run / "snapshots.npz", "w") as zf:
            zf.writestr("L0_W_Q.npy", buf.getvalue() + b"\0" * 16)
        return
    np.savez(run / "snapshots.npz", **z)


CONFIG_CASES = [("deep", DEEP), ("a list", [1]), ("null", None), ("d_model a string", {"d_model": "8"}),
                ("T a float", {"T": 8.5}), ("mlp a string", {"mlp": "no"}), ("n_heads zero", {"n_heads": 0}),
                ("heads do not divide", {"n_heads": 3}), ("T missing", {"T": "DROP"}),
                ("d_model huge", {"d_model": HUGE, "n_heads": 1}), ("C huge", {"C": 2 ** 40}),
                ("m_max above T", {"m_max": 50}), ("m_min above m_max", {"m_min": 2, "m_max": 1}),
                ("schedule unknown", {"schedule": "random"}), ("n_layers bool", {"n_layers": True})]


@pytest.mark.parametrize("stage", ["sae", "forgetting"])
@pytest.mark.parametrize("case,change", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_run_config_fields_are_checked_at_the_boundary(run, tmp_path, capsys, stage, case, change):
    """config.json of a run: wrong type, range or a size that cannot be allocated is one line naming
    the file (and the field), before any model is built."""
    import importlib
    if stage == "forgetting" and case in ("d_model a string", "mlp a string", "n_heads zero", "heads do not divide",
                                          "T missing", "d_model huge", "C huge", "T a float", "n_layers bool",
                                          "m_max above T"):
        change = {"schedule": 7}             # fields forgetting does not read: one it does instead
    if stage == "sae" and case == "schedule unknown":
        change = {"d_ff": [512]}             # nor does sae read the schedule
    if isinstance(change, dict):
        edit_config(run, **change)
    else:
        (run / "config.json").write_text(change if isinstance(change, str) else json.dumps(change))
    argv = [str(run), "--no-plot"] + (["--sae-steps", "2", "--n-train", "8", "--n-eval", "8", "--n-latents", "16",
                                       "--n-select", "2", "--k", "2", "--at", "1", "--kinds", "topk"]
                                      if stage == "sae" else [])
    line = refused(importlib.import_module(f"modadd.{stage}").main, argv, capsys, tmp_path)
    assert "config.json" in line


CKPT_CASES = [("d_model a string", {"d_model": "8"}), ("vocabulary huge", {"C": HUGE}),
              ("d_model huge", {"d_model": 2 ** 30, "n_heads": 1}), ("readout a number", {"readout_token": 1}),
              ("weights not a dict", {"state": [1, 2]}), ("weights of another model", {"state": {"x": torch.ones(2)}}),
              ("weights of other sizes", {"d_model": 16})]


@pytest.mark.parametrize("case,change", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_checkpoint_fields_are_checked_at_the_boundary(run, tmp_path, capsys, case, change):
    from modadd.bubbling import main as bubbling
    from modadd.train import main as train
    edit_checkpoint(run, **change)
    line = refused(bubbling, [str(run), "--no-plot", "--n", "8"], capsys, tmp_path)
    assert "model.pt" in line
    refused(train, ["--from-run", str(run), "--export", str(tmp_path / "exp")], capsys, tmp_path)


SNAPSHOT_CASES = ["nan", "short", "ragged", "complex", "wrong shape", "no steps", "object", "not a zip", "lying header"]


@pytest.mark.parametrize("mode", SNAPSHOT_CASES)
def test_snapshot_files_are_checked(run, tmp_path, capsys, mode):
    from modadd.alignment import main as alignment
    from modadd.sae import main as sae
    from modadd.trajectory import main as trajectory
    edit_snapshots(run, mode)
    stage, argv = (sae, [str(run), "--no-plot", "--sae-steps", "2", "--n-train", "8", "--n-eval", "8", "--n-latents",
                         "16", "--n-select", "2", "--k", "2", "--at", "1", "--kinds", "topk"]) \
        if mode in ("wrong shape", "no steps") else (trajectory, [str(run), "--no-plot", "--n-null", "1"])
    refused(stage, argv, capsys, tmp_path, ["snapshots"] if mode not in ("short",) else [])
    if stage is trajectory:
        refused(alignment, [str(run), "--no-plot", "--n-null", "1"], capsys, tmp_path)


@pytest.mark.parametrize("content", ["step,acc_m1,acc_m2\n0,x,0.5\n", "step,acc_m1\n0,0.5\n", "", "\udcff",
                                     "step,acc_m1,acc_m2\n0,0.5\n", "step,acc_m1,acc_m2\n5,0.5,0.5\n1,0.5,0.5\n",
                                     "step,step,acc_m1,acc_m2\n0,0,1,1\n"],
                         ids=["text cell", "missing column", "empty", "binary", "short row", "steps decrease",
                              "column twice"])
def test_metrics_csv_is_checked(run, tmp_path, capsys, content):
    from modadd.bubbling import main as bubbling
    from modadd.forgetting import main as forgetting
    if content == "\udcff":
        (run / "metrics.csv").write_bytes(b"\xff\xfe\x00")
    else:
        (run / "metrics.csv").write_text(content)
    edit_config(run, schedule="curriculum")
    refused(forgetting, [str(run), "--no-plot"], capsys, tmp_path, ["metrics"])
    if content != "step,acc_m1\n0,0.5\n":
        refused(bubbling, [str(run), "--no-plot", "--n", "8"], capsys, tmp_path, ["metrics"])


SIZE_CASES = [
    ("train", ["--d-model", "1000000000", "--n-heads", "1"]), ("train", ["--C", str(HUGE)]),
    ("train", ["--n-noise", str(HUGE)]), ("train", ["--T", "1000000", "--m-max", "2"]),
    ("train", ["--eval-size", str(HUGE)]), ("train", ["--batch-size", str(HUGE)]),
    ("train", ["--steps", str(HUGE), "--snapshot-every", "1"]), ("train", ["--d-model", "100000000", "--n-heads", "1",
                                                                          "--mlp", "--d-ff", "100000000"]),
    ("bubbling", ["--n", str(HUGE)]), ("sae", ["--n-latents", str(HUGE)]), ("sae", ["--n-train", str(HUGE)]),
    ("alignment", ["--n-null", str(HUGE)]),
]


@pytest.mark.parametrize("stage,flags", SIZE_CASES, ids=[" ".join([s, *f]) for s, f in SIZE_CASES])
def test_sizes_that_cannot_be_allocated_stop_with_one_line(run, tmp_path, capsys, stage, flags):
    import importlib
    argv = ([*TINY, *flags, "--out-dir", str(tmp_path / "new")] if stage == "train"
            else [str(run), "--no-plot", *flags])
    line = refused(importlib.import_module(f"modadd.{stage}").main, argv, capsys, tmp_path)
    assert "memory" in line or "needs about" in line


@pytest.mark.parametrize("case", ["--seeds 0-999999999", "--seeds 5-2", "--seeds x", "-- --out-dir=x",
                                  "-- --out x", "-- --seed=1", "-- --export x", "-- --d-model 1000000000 --n-heads 1",
                                  "--root file", "--root ''", "--plots-dir file", "--stages nope", "--gpus two",
                                  "--sae-args=--out-dir=x", "--sae-args=--n-latents=1000000000000000"])
def test_modadd_sweep_refuses_with_one_line(tmp_path, capsys, case):
    from modadd.sweep import main
    f = tmp_path / "file"
    f.write_text("mine")
    own, _, train = case.partition("-- ")
    argv = ["--root", str(tmp_path / "root"), "--seeds", "0"] + [
        "" if a == "''" else a for a in own.replace("file", str(f)).split()]
    if "--root" in own:
        argv = argv[2:]
    if train:
        argv += ["--", *TINY[:2], *train.split()]
    refused(main, argv, capsys, tmp_path)


@pytest.mark.parametrize("stage", ["bubbling", "trajectory", "alignment", "sae", "forgetting", "report", "train",
                                   "export"])
@pytest.mark.parametrize("flag", ["--out-dir", "--plots-dir", "empty --out-dir"])
def test_output_paths_that_name_a_file_are_one_line(run, tmp_path, capsys, stage, flag):
    import importlib
    f = tmp_path / "file"
    f.write_text("mine")
    if stage == "export":
        flag = {"--plots-dir": "--export", "--out-dir": "--export-below-a-file"}.get(flag, flag)
    if stage == "train" and flag == "--plots-dir":
        flag = "--out-dir-below-a-file"
    if stage == "report" and flag == "--out-dir":
        flag = "--out-dir-below-a-file"
    base = {"bubbling": [str(run), "--n", "8"], "trajectory": [str(run)], "alignment": [str(run)],
            "sae": [str(run), "--n-latents", "16", "--n-select", "2", "--k", "2"], "forgetting": [str(run)],
            "report": [str(tmp_path)], "train": [*TINY], "export": ["--from-run", str(run)]}[stage]
    if flag == "--out-dir-below-a-file":
        argv = base + ["--out-dir", str(f / "sub")]
    elif flag == "--export-below-a-file":
        argv = base + ["--export", str(f / "sub")]
    elif flag == "empty --out-dir":
        argv = base + (["--export", ""] if stage == "export" else ["--out-dir", ""])
    else:
        argv = base + [flag, str(f)]
    main = importlib.import_module(f"modadd.{'train' if stage == 'export' else stage}").main
    refused(main, argv, capsys, tmp_path)


@pytest.mark.parametrize("stage,argv", [
    ("train", [*TINY, "--device", "tpu9"]),
    ("sae", ["RUN", "--device", "tpu9", "--n-latents", "16", "--n-select", "2"]),
    ("train", [*TINY, "--out-dir", "SAME", "--export", "SAME"]), ("train", ["--from-run", "RUN"]),
    ("sae", ["RUN", "--layer", "5"]), ("sae", ["RUN", "--at", "nan"]), ("sae", ["RUN", "--kinds", ""]),
    ("train", [*TINY, "--lr", "1e30", "--optimizer", "sgd", "--out-dir", "SAME"]),
    ("bubbling", ["nothing"]), ("trajectory", ["nothing"]), ("report", ["RUN"]), ("forgetting", ["RUN"])])
def test_modadd_flags_refused_with_one_line(run, tmp_path, capsys, stage, argv):
    import importlib
    argv = [str(run) if a == "RUN" else str(tmp_path / "same") if a == "SAME" else
            str(tmp_path / a) if a == "nothing" else a for a in argv]
    refused(importlib.import_module(f"modadd.{stage}").main, argv, capsys, tmp_path)


def test_stage_force_removes_only_what_the_stage_wrote(run, tmp_path, capsys):
    from modadd.bubbling import main as bubbling
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "bubbling_mine.png").write_bytes(b"user")
    (run / "notes.json").write_text("{}")
    argv = [str(run), "--n", "8", "--plots-dir", str(figs)]
    assert bubbling(argv) == 0
    strict_json(run / "bubbling.json")
    refused(bubbling, argv + ["--no-plot"], capsys, tmp_path, ["--force"])
    assert bubbling(argv + ["--no-plot", "--force"]) == 0
    assert sorted(n for n in os.listdir(figs) if not n.startswith(".")) == ["bubbling_mine.png"]
    assert (run / "notes.json").read_text() == "{}" and (run / "bubbling.json").exists()


def test_train_claims_every_file_it_writes(run, tmp_path, capsys):
    """A folder holding any file modadd.train writes (a user's own config.json, an unfinished run) is
    refused without --force; with --force only the run's and its stages' files are replaced."""
    from modadd.train import main as train
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": 1}')
    (folder / "notes.txt").write_text("keep")
    refused(train, [*TINY, "--out-dir", str(folder)], capsys, tmp_path, ["--force"])
    (folder / "config.json").unlink()
    (folder / "bubbling.json").write_text("{}")            # a stage's output describes another model
    refused(train, [*TINY, "--out-dir", str(folder)], capsys, tmp_path, ["--force"])
    assert train([*TINY, "--out-dir", str(folder), "--force"]) == 0
    assert (folder / "notes.txt").read_text() == "keep" and not (folder / "bubbling.json").exists()
    strict_json(folder / "config.json")
    refused(train, [*TINY, "--out-dir", str(run)], capsys, tmp_path, ["--force"])


def test_report_refuses_stage_files_of_another_layout(run, tmp_path, capsys):
    from modadd.report import main as report
    root = tmp_path / "root"
    root.mkdir()
    shutil.move(str(run), root / "s0")
    out = ["--out-dir", str(tmp_path / "out"), "--no-plot"]
    assert report([str(root), *out]) == 0
    strict_json(tmp_path / "out" / "report.json")
    for name, content in (("bubbling.json", {"per_m": {"1": {"topk_accuracy": {"1": "x"}}}}),
                          ("bubbling.json", DEEP), ("sae.json", {"snapshots": []}),
                          ("trajectory_pca.json", {"summary": {"../x": {}}}), ("alignment.json", [1])):
        p = root / ("s0" if name in ("bubbling.json", "sae.json") else "") / name
        p.write_text(content if isinstance(content, str) else json.dumps(content))
        line = refused(report, [str(root), *out, "--force"], capsys, tmp_path)
        assert name in line
        p.unlink()
    shutil.copytree(root / "s0", root / "s1")
    edit_config(root / "s1", d_model=16, n_heads=2)
    refused(report, [str(root), *out, "--force"], capsys, tmp_path, ["d_model"])


# ------------------------------------------------------------------------------------------- a kill while writing

KILLER = r'''
import contextlib, os, signal, sys
import safeio
target = sys.argv[1]
real = safeio.atomic_path

@contextlib.contextmanager
def killing(path):
    with real(path) as tmp:
        yield tmp
        if os.path.basename(path) == target:       # the new file is written, not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)

safeio.atomic_path = killing
from modadd.train import main
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.parametrize("target", ["config.json", "snapshots.npz", "model.pt"])
def test_a_run_killed_while_writing_is_whole_or_says_what_to_do(tmp_path, capsys, target):
    """modadd.train killed at a write: every file there is whole, the folder is an unfinished run
    (no model.pt) that a plain rerun refuses naming --force, and the rerun with --force completes it
    and leaves none of the killed writer's temporary files."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", KILLER, target, *TINY, "--out-dir", str(out)], cwd=REPO, env=env,
                       capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    assert not (out / "model.pt").exists()
    for name in os.listdir(out):
        if name.endswith(".json") and not safeio.is_temporary(name):
            strict_json(out / name)
        if name.endswith(".csv"):
            assert open(out / name).read().endswith("\n")
        if name.endswith(".npz"):
            np.load(out / name)["steps"]
    from modadd.train import main as train
    if target == "config.json":          # nothing of the run was in place yet: a plain rerun continues
        assert train([*TINY, "--out-dir", str(out)]) == 0
    else:
        line = refused(train, [*TINY, "--out-dir", str(out)], capsys, tmp_path, ["--force"])
        assert "unfinished" in line
        assert train([*TINY, "--out-dir", str(out), "--force"]) == 0
    left = sorted(os.listdir(out))
    assert not [n for n in left if safeio.is_temporary(n)], left
    assert {"config.json", "metrics.csv", "commutators.csv", "snapshots.npz", "model.pt"} <= set(left)
    from modadd.runs import load_run
    load_run(str(out))


@pytest.mark.parametrize("change,words", [({"d_model": "8"}, "d_model"), ({"T": 0}, "T"), ({"mlp": 1}, "mlp"),
                                          ({"vocab_size": HUGE}, "vocab_size"), ({"x": 1}, "unknown"),
                                          ({"d_model": 2 ** 30, "n_heads": 1}, "needs about"),
                                          ({"n_heads": 3}, "divisible")])
def test_an_export_folder_is_checked_before_the_model_is_built(run, tmp_path, capsys, change, words):
    from modadd.model import ModAddTransformer
    from modadd.train import main as train
    exp = tmp_path / "exp"
    assert train(["--from-run", str(run), "--export", str(exp)]) == 0
    assert isinstance(ModAddTransformer.from_pretrained(str(exp)), ModAddTransformer)
    c = json.load(open(exp / "config.json"))
    c["model_config"].update(change)
    (exp / "config.json").write_text(json.dumps(c))
    with pytest.raises(safeio.InputError, match=words) as e:
        ModAddTransformer.from_pretrained(str(exp))
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("command", ["sweep aggregate", "sweep run", "bubbling", "train", "compare_runs"])
def test_a_folder_that_cannot_be_written_is_one_line(run, done_sweep, tmp_path, capsys, monkeypatch, command):
    """A folder the user may not write (simulated: os.access says so, as it does for a user without the
    permission; the tests may run as root, who may write anywhere)."""
    from modadd.bubbling import main as bubbling
    from modadd.train import main as train
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(str(p)).startswith(
        str(locked)) and mode & os.W_OK else real(p, mode, **kw))
    main, argv = {"sweep aggregate": (sweep.main, ["aggregate", str(done_sweep), "--out-dir", str(locked / "a")]),
                  "sweep run": (sweep.main, ["run", write_spec(tmp_path, commands_spec(), "s2.json"), "--out-dir",
                                             str(locked / "r")]),
                  "bubbling": (bubbling, [str(run), "--out-dir", str(locked / "b")]),
                  "train": (train, [*TINY, "--out-dir", str(locked / "t")]),
                  "compare_runs": (compare_runs.main, [str(run), "--out-dir", str(locked / "c")])}[command]
    line = refused(main, argv, capsys, tmp_path)
    assert "not writable" in line
