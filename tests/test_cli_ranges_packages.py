"""Every numeric flag of the terrain/ and modadd/ commands declares its valid range, and an
impossible value stops the command at parse time with one line on stderr and exit status 2
(before any model, run folder or data is touched)."""
import importlib
import os
import pathlib

import pytest

import cliargs

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = ["terrain.embeddings", "terrain.layers", "terrain.modulate", "terrain.project", "terrain.weights",
           "terrain.wordnet", "modadd.alignment", "modadd.bubbling", "modadd.forgetting", "modadd.report",
           "modadd.sae", "modadd.sweep", "modadd.train", "modadd.trajectory"]


def test_every_command_of_the_packages_is_listed():
    """A module of terrain/ or modadd/ with a main() that adds flags must expose build_parser and be listed here."""
    found = set()
    for pkg in ("terrain", "modadd"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            src = path.read_text()
            if "def main(" in src and "add_argument(" in src:
                found.add(f"{pkg}.{path.stem}")
    assert found == set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_numeric_flag_declares_its_range(name):
    parser = importlib.import_module(name).build_parser()
    assert isinstance(parser, cliargs.Parser)
    for _, action in cliargs.numeric_actions(parser):
        assert isinstance(action.type, cliargs.Bounded), f"{name} {action.option_strings}: bare type={action.type}"
        if action.default is not None:                     # a default must lie inside its own range
            for value in (action.default if isinstance(action.default, list) else [action.default]):
                assert action.type(str(value)) == value, (name, action.option_strings, value)
    parser.format_help()                                   # help renders (no stray % in a help text)


def test_the_packages_have_numeric_flags():
    n = sum(len(list(cliargs.numeric_actions(importlib.import_module(m).build_parser()))) for m in MODULES)
    assert n >= 60


# (module, argv, flag the one line must name); "RUN" stands for a run folder that does not exist:
# the value is refused before it would be read.
CASES = [
    ("terrain.embeddings", ["--n-simplices", "1"], "--n-simplices"),
    ("terrain.embeddings", ["--seed", "-1"], "--seed"),
    ("terrain.layers", ["--seed", "x"], "--seed"),
    ("terrain.modulate", ["--alphas", "0.1", "1.5"], "--alphas"),
    ("terrain.modulate", ["--train", "--alpha", "0"], "--alpha"),
    ("terrain.modulate", ["--train", "--lr", "-1"], "--lr"),
    ("terrain.modulate", ["--tau", "0"], "--tau"),
    ("terrain.modulate", ["--eval-items", "4"], "--eval-items"),
    ("terrain.modulate", ["--geo-dim", "64", "--anchors", "10"], "--geo-dim"),
    ("terrain.modulate", ["--train", "--train-items", "8", "--batch-size", "32"], "--train-items"),
    ("terrain.modulate", ["--layers", "0,-1"], "--layers"),
    ("terrain.project", ["--anchors", "5"], "--anchors"),
    ("terrain.project", ["--ridge", "-0.1"], "--ridge"),
    ("terrain.project", ["--rsa-tokens", "2"], "--rsa-tokens"),
    ("terrain.weights", ["--n-null", "0"], "--n-null"),
    ("terrain.weights", ["--overlap-rank", "0"], "--overlap-rank"),
    ("terrain.wordnet", ["--n-items", "0"], "--n-items"),
    ("terrain.wordnet", ["--n-perm", "-1"], "--n-perm"),
    ("terrain.wordnet", ["--layer", "1.5"], "--layer"),
    ("terrain.wordnet", ["--max-items", "3"], "--max-items"),
    ("modadd.alignment", ["RUN", "--windows", "1"], "--windows"),
    ("modadd.alignment", ["RUN", "--k", "0"], "--k"),
    ("modadd.bubbling", ["RUN", "--n", "0"], "--n"),
    ("modadd.trajectory", ["RUN", "--seed", "-3"], "--seed"),
    ("modadd.trajectory", ["RUN", "--n-null", "0"], "--n-null"),
    ("modadd.sae", ["RUN", "--l1", "-0.1"], "--l1"),
    ("modadd.sae", ["RUN", "--sae-steps", "0"], "--sae-steps"),
    ("modadd.sae", ["RUN", "--k", "600", "--n-latents", "512"], "--k"),
    ("modadd.sae", ["RUN", "--at", "0.5,1.5"], "--at"),
    ("modadd.sweep", ["--root", "OUT", "--jobs", "0"], "--jobs"),
    ("modadd.sweep", ["--root", "OUT", "--together", "-1"], "--together"),
    ("modadd.sweep", ["--root", "OUT", "--", "--steps", "0"], "--steps"),
    ("modadd.sweep", ["--root", "OUT", "--sae-args", "--n-eval 0"], "--n-eval"),
    ("modadd.train", ["--steps", "0", "--out-dir", "OUT"], "--steps"),
    ("modadd.train", ["--lr", "-1", "--out-dir", "OUT"], "--lr"),
    ("modadd.train", ["--lr", "nan", "--out-dir", "OUT"], "--lr"),
    ("modadd.train", ["--C", "1", "--out-dir", "OUT"], "--C"),
    ("modadd.train", ["--seed", "-1", "--out-dir", "OUT"], "--seed"),
    ("modadd.train", ["--commutator-every", "-1", "--out-dir", "OUT"], "--commutator-every"),
    ("modadd.train", ["--m-min", "3", "--m-max", "2", "--out-dir", "OUT"], "--m-min"),
    ("modadd.train", ["--T", "8", "--m-max", "5", "--out-dir", "OUT"], "--m-max"),
    ("modadd.train", ["--no-value-distractors", "--n-noise", "0", "--out-dir", "OUT"], "--n-noise"),
    ("modadd.train", ["--d-model", "30", "--n-heads", "4", "--out-dir", "OUT"], "--n-heads"),
]


@pytest.mark.parametrize("name,argv,flag", CASES, ids=[f"{m} {' '.join(a)}" for m, a, _ in CASES])
def test_impossible_value_is_one_line(name, argv, flag, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                            # nothing may be written, not even a default folder
    out = str(tmp_path / "never")
    argv = [out if a == "OUT" else str(tmp_path / "no_run") if a == "RUN" else a for a in argv]
    if name.startswith("terrain."):
        argv += ["--out-dir", out]
    main = importlib.import_module(name).main
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("error: ") and flag in err[0], err[0]
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)
