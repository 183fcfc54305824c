"""One convention for every command: help text on every argument, --seed 0 by default, the plot
switch spelled --no-plot, one-line errors (cliargs.Parser)."""
import argparse
import importlib

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
