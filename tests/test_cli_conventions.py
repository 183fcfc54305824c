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


def test_no_plot_writes_numbers_and_no_figure(tmp_path, small_data_dir):
    """--no-plot on a terrain stage, the dimension demo and a training run: the numbers are
    written, no PNG anywhere under the output folders."""
    from terrain.cli import run_for_models
    code, _, written = run_for_models(["x"], str(tmp_path / "t"), "stage", lambda n: {"model": n, "v": 1},
                                      lambda r: "", lambda r, p: open(p, "w").write("png") and p, no_plot=True)
    assert code == 0 and [os.path.basename(w) for w in written] == ["stage_x.json"]
    from estimate_dimension import main as dim
    assert dim(["--demo", "--demo-points", "400", "--n-boot", "10", "--out-dir", str(tmp_path / "d"),
                "--no-plot"]) == 0
    from masked_model_gpu import main as masked
    assert masked(["--data-dir", small_data_dir, "--epochs", "1", "--seq-len", "64", "--stride", "64",
                   "--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--n-layers", "1",
                   "--out-dir", str(tmp_path / "run"), "--no-plot"]) == 0
    assert os.path.exists(tmp_path / "run" / "metrics.json") and os.listdir(tmp_path / "d")
    assert [p for p in tmp_path.rglob("*.png")] == []


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
        assert script.main(first + ["--eval", ckpt, "--plots-dir", str(tmp_path / "a"), "--no-plot"]) == 0
        assert script.main(["eval", ckpt, "--plots-dir", str(tmp_path / "b"), "--no-plot"]) == 0
        a, b = (json.loads((tmp_path / d / "eval_metrics.json").read_text()) for d in "ab")
        assert a == b and a["checkpoint"] == ckpt
        for d in "ab":
            (tmp_path / d / "eval_metrics.json").unlink()
        assert script.main(["eval", "--plots-dir", str(tmp_path)]) == 2
        assert "eval CKPT" in capsys.readouterr().err
    assert masked_model_gpu.main(["train", *tiny, "--n-heads", "2", "--d-ff", "32", "--out-dir",
                                  str(tmp_path / "worded")]) == 0
