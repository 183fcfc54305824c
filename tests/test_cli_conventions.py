"""One convention for every command: help text on every argument, --seed 0 by default, the plot
switch spelled --no-plot, one-line errors (cliargs.Parser)."""
import argparse
import importlib
import os

import pytest

import cliargs

COMMANDS = ["markov_circles_timeseries", "dataset", "masked_model_gpu", "mamba_next", "estimate_dimension",
            "evaluate_representations", "oracle", "sweep",
            "terrain.embeddings", "terrain.layers", "terrain.modulate", "terrain.project", "terrain.weights",
            "terrain.wordnet",
            "modadd.alignment", "modadd.bubbling", "modadd.forgetting", "modadd.report", "modadd.sae", "modadd.sweep",
            "modadd.train", "modadd.trajectory"]


def options(parser, name):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                yield from options(sp, f"{name} {sub}")
        elif a.option_strings and a.dest != "help":
            yield name, a


def all_options():
    return [o for m in COMMANDS for o in options(importlib.import_module(m).build_parser(), m)]


def test_every_command_uses_the_shared_parser():
    assert [m for m in COMMANDS if not isinstance(importlib.import_module(m).build_parser(), cliargs.Parser)] == []


def test_every_argument_has_help_text():
    missing = [f"{name} {a.option_strings[0]}" for name, a in all_options() if not (a.help or "").strip()]
    assert missing == []


def test_seeds_default_to_zero_and_plot_switches_are_spelled_alike():
    seeds = {name: a.default for name, a in all_options() if a.dest == "seed"}
    assert len(seeds) >= 10 and {k: v for k, v in seeds.items() if v != 0} == {}
    plots = [(name, a.option_strings) for name, a in all_options() if any(o.startswith("--no-plot") for o in a.option_strings)]
    assert plots and [p for p in plots if "--no-plot" not in p[1]] == []


@pytest.mark.parametrize("module", ["markov_circles_timeseries", "oracle", "estimate_dimension"])
def test_help_prints_and_exits_zero(module, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "(default:" in out and "(default: None)" not in out


def test_device_flags_default_to_auto():
    devices = {name: a.default for name, a in all_options() if a.dest == "device"}
    assert len(devices) >= 8 and {k: v for k, v in devices.items() if v != "auto"} == {}


@pytest.mark.parametrize("module", ["terrain.field", "modadd.ensemble"])
def test_library_modules_say_what_to_run(module):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "python -m" in r.stdout
    r = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True)
    assert r.returncode == 2 and "python -m" in r.stderr and "Traceback" not in r.stderr


def test_shared_modules_import_no_script():
    """training, dataset, oracle (as a module), plotting, positions and cliargs never import a script
    at import time, and terrain.weights gets T5's buckets from the shared module."""
    import subprocess
    import sys
    code = ("import sys, training, dataset, oracle, plotting, positions, cliargs, sweep, terrain.weights; "
            "bad = [m for m in ('masked_model_gpu', 'mamba_next', 'markov_circles_timeseries', "
            "'evaluate_representations', 'estimate_dimension') if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# commands that draw no figure at all, so they need no --no-plot
NO_FIGURES = {"dataset", "oracle", "sweep status", "modadd.train"}


def leaf_parsers(parser, name):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield name, parser
    for a in subs:
        for sub, sp in a.choices.items():
            yield from leaf_parsers(sp, f"{name} {sub}")


def test_every_command_that_draws_takes_no_plot():
    lacking = [name for m in COMMANDS for name, p in leaf_parsers(importlib.import_module(m).build_parser(), m)
               if name not in NO_FIGURES and "--no-plot" not in [o for a in p._actions for o in a.option_strings]]
    assert lacking == []


def test_output_flags_are_worded_alike_everywhere():
    """Every command that draws takes --out-dir (numbers), --plots-dir (figures, one default rule)
    and --no-plot, with the shared wording; none shows a computed default as None."""
    odd = []
    for m in COMMANDS:
        for name, p in leaf_parsers(importlib.import_module(m).build_parser(), m):
            if name in NO_FIGURES:
                continue
            acts = {o: a for a in p._actions for o in a.option_strings}
            if "--out-dir" not in acts or "--plots-dir" not in acts:
                odd.append((name, "lacks --out-dir or --plots-dir"))
            elif "default plots/<name>, <name> being the --out-dir's path below runs/" not in acts["--plots-dir"].help \
                    or acts["--plots-dir"].default is not None:
                odd.append((name, "--plots-dir worded differently"))
            elif not acts["--no-plot"].help.startswith(cliargs.NO_PLOT_HELP):
                odd.append((name, "--no-plot worded differently"))
    assert odd == []


def test_default_plots_dir_follows_one_rule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PLOTS_ROOT")
    j = os.path.join
    assert cliargs.default_plots_dir("runs/bert_rope") == j("plots", "bert_rope")
    assert cliargs.default_plots_dir(j("runs", "a", "gates")) == j("plots", "a", "gates")
    assert cliargs.default_plots_dir(str(tmp_path / "runs" / "a")) == j("plots", "a")  # absolute, below runs/
    assert cliargs.default_plots_dir("data") == j("plots", "data")                     # below the current folder
    assert cliargs.default_plots_dir(j("plots", "terrain")) == j("plots", "terrain")   # already in plots/
    assert cliargs.default_plots_dir("/elsewhere/x/run1") == j("plots", "x", "run1")   # outside: its last two names
    assert cliargs.default_plots_dir("/a/run1/gates") != cliargs.default_plots_dir("/a/run2/gates")
    monkeypatch.setenv("PLOTS_ROOT", "/figs")
    assert cliargs.default_plots_dir("runs/a") == j("/figs", "a")


def test_numbers_go_to_out_dir_and_figures_to_plots_dir(tmp_path, small_data_dir, plots_below_tmp):
    """A terrain stage, the dimension demo and a training run: with --plots-dir P the numbers are
    in --out-dir and no figure is; P holds figures only; with --no-plot there is no PNG anywhere."""
    from types import SimpleNamespace

    from estimate_dimension import main as dim
    from masked_model_gpu import main as masked
    from terrain.cli import run_for_models
    tiny = ["--data-dir", small_data_dir, "--epochs", "1", "--seq-len", "64", "--stride", "64", "--d-model", "16",
            "--n-heads", "2", "--d-ff", "32", "--n-layers", "1"]

    def stage(out, plots, no_plot):
        args = SimpleNamespace(model=["x"], out_dir=str(out), plots_dir=plots and str(plots), no_plot=no_plot,
                               force=False)
        return run_for_models(args, "stage", lambda n: {"model": n, "v": 1}, lambda r: "",
                              lambda r, p: open(p, "w").write("png") and p)[0]

    for kind, figures in (("drawn", ["--plots-dir"]), ("bare", ["--no-plot"])):
        out, plots = tmp_path / kind / "out", tmp_path / kind / "plots"
        flags = figures + ([str(plots)] if kind == "drawn" else [])
        assert stage(out / "t", plots / "t" if kind == "drawn" else None, kind == "bare") == 0
        assert dim(["--demo", "--demo-points", "400", "--n-boot", "10", "--out-dir", str(out / "d"),
                    *[f.replace(str(plots), str(plots / "d")) for f in flags]]) == 0
        assert masked([*tiny, "--out-dir", str(out / "run"), *[f.replace(str(plots), str(plots / "run"))
                                                                 for f in flags]]) == 0
        visible = lambda d: [p for p in d.iterdir() if not p.name.startswith(".")]  # noqa: E731 (not the claims' manifest)
        assert {p.name for p in visible(out / "t")} == {"stage_x.json"}
        assert {p.suffix for p in visible(out / "d")} == {".json", ".csv"}
        assert (out / "run" / "metrics.json").exists() and not list(out.rglob("*.png"))
        if kind == "drawn":
            for sub in ("t", "d", "run"):
                assert {p.suffix for p in visible(plots / sub)} == {".png"}, sub
        else:  # nothing drawn, neither here nor in the default figures folder
            assert not list((tmp_path / kind).rglob("*.png")) and not plots_below_tmp.exists()


def test_both_model_scripts_take_train_and_eval_words(tmp_path, small_data_dir, capsys):
    """masked_model_gpu.py and mamba_next.py: `train [flags]` and `eval CKPT [flags]`; eval CKPT
    scores exactly as --eval CKPT; the masked script still runs without the word (the original
    code's invocations)."""
    import json

    import mamba_next
    import masked_model_gpu
    tiny = ["--data-dir", small_data_dir, "--epochs", "1", "--seq-len", "64", "--stride", "64", "--d-model", "16",
            "--n-layers", "1", "--no-plot"]
    for script, words, extra in ((masked_model_gpu, [], ["--n-heads", "2", "--d-ff", "32"]),
                                 (mamba_next, ["train"], ["--d-state", "4"])):
        run = tmp_path / script.__name__
        assert script.main(words + tiny + extra + ["--out-dir", str(run)]) == 0
        ckpt = str(run / "best.pt")
        first = ["train"] if script is mamba_next else []
        assert script.main(first + ["--eval", ckpt, "--out-dir", str(tmp_path / "a"), "--no-plot"]) == 0
        assert script.main(["eval", ckpt, "--out-dir", str(tmp_path / "b"), "--no-plot"]) == 0
        a, b = (json.loads((tmp_path / d / "eval_metrics.json").read_text()) for d in "ab")
        assert a == b and a["checkpoint"] == ckpt
        for d in "ab":
            (tmp_path / d / "eval_metrics.json").unlink()
        assert script.main(["eval", "--out-dir", str(tmp_path)]) == 2
        assert "eval CKPT" in capsys.readouterr().err
    assert masked_model_gpu.main(["train", *tiny, "--n-heads", "2", "--d-ff", "32", "--out-dir",
                                  str(tmp_path / "worded")]) == 0


def test_no_function_takes_a_long_positional_list():
    """Calls with many arguments name them: no function of a command or shared module takes more
    than 10 positional parameters (dataclass constructors aside)."""
    import dataclasses
    import inspect
    shared = ["training", "dataset", "plotting", "statsutil", "cliargs", "positions", "selective_scan", "terrain.cli",
              "terrain.metrics", "terrain.models", "terrain.talk", "terrain.field", "terrain.linalg", "terrain.taxonomy",
              "modadd.task", "modadd.model", "modadd.geometry", "modadd.ensemble", "modadd.runs", "modadd.figures"]

    def positional(fn):
        return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
                   for p in inspect.signature(fn).parameters.values())
    long = []
    for m in COMMANDS + shared:
        mod = importlib.import_module(m)
        for name, obj in vars(mod).items():
            if inspect.isfunction(obj) and obj.__module__ == mod.__name__ and positional(obj) > 10:
                long.append(f"{m}.{name}")
            if inspect.isclass(obj) and obj.__module__ == mod.__name__ and not dataclasses.is_dataclass(obj):
                long += [f"{m}.{name}.{f}" for f, fn in vars(obj).items() if inspect.isfunction(fn) and positional(fn) > 10]
    assert long == []


def test_the_prompt_window_keeps_the_original_flag_name():
    import mamba_next
    p = mamba_next.build_parser()
    base = ["generate", "--checkpoint", "x.pt"]
    assert p.parse_args(base + ["--prompt-len", "32"]).prompt_len == 32 == p.parse_args(base + ["--seed-len", "32"]).prompt_len
    assert p.parse_args(base).prompt_len == 64


@pytest.mark.parametrize("cuda", [False, True])
def test_every_command_reads_device_the_same_way(cuda, monkeypatch, capsys):
    """--device auto|cpu|cuda means one thing everywhere: cliargs.resolve_device, wrapped in each
    line's error type (torch's CUDA check planted both ways)."""
    import torch

    import training
    from estimate_dimension import main as dim
    from modadd.train import pick_device
    from terrain.cli import resolve_device as terrain_device
    from terrain.models import TerrainError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    want = "cuda" if cuda else "cpu"
    assert cliargs.resolve_device("auto") == terrain_device("auto") == want
    assert training.resolve_device("auto") == pick_device("auto") == torch.device(want)
    assert cliargs.resolve_device("cpu") == "cpu"
    if cuda:
        assert cliargs.resolve_device("cuda:1") == "cuda:1"
        return
    for call, error in ((cliargs.resolve_device, ValueError), (training.resolve_device, training.TrainingError),
                        (pick_device, ValueError), (terrain_device, TerrainError)):
        with pytest.raises(error, match="--device cpu"):
            call("cuda")
    assert dim(["--demo", "--demo-points", "50", "--n-boot", "0", "--device", "cuda", "--no-plot"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_no_import_cycle_among_the_projects_modules():
    """The imports a module makes, at its top level or inside its functions, form no cycle, e.g.
    terrain.field and terrain.modulate both build on terrain.hooks instead of on each other, oracle
    reads checkpoints through the checkpoints module rather than the training driver, and
    terrain.talk does not reach back into terrain.modulate."""
    import ast
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    names = {}
    for folder in ("", "terrain", "modadd"):
        for f in os.listdir(os.path.join(root, folder)):
            if f.endswith(".py"):
                mod = f[:-3] if not folder else f"{folder}.{f[:-3]}"
                names[mod.removesuffix(".__init__")] = os.path.join(root, folder, f)
    graph = {}
    for mod, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[mod] = {d for d in deps if d in names and d != mod}
    assert "terrain.modulate" not in graph["terrain.field"]
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            assert state.get(d) != "open", " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
