"""Every example command of the original work's documentation, translated by the README's table, runs here.

Each row is (the original command, the command here). The command here is the README table's
right-hand column; only sizes shrink (the TINY values replace the original numbers, and
per-script width/point flags are added) so the whole list runs in minutes on a CPU (marked
slow: `python -m pytest -m slow tests/test_seed_commands.py`; the checks that the list covers
the README's table and keeps the seeds' flags run by default). The seeds' structural flags (layers, positional encodings, gate factors, horizons,
perturbations, layer picks) are kept as written. The original scripts overwrote their outputs;
here nothing is overwritten without --force, so every command runs in its own folder with
the data (and checkpoint) it needs linked in. The notebook (seed 002) has no commands; its
stages have their own tests.
"""
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# seed document -> (the original command, the command here)
SEED_COMMANDS = [
    ("000", "python markov_circles_timeseries.py", "python markov_circles_timeseries.py"),
    ("000", "python markov_circles_timeseries.py --no-umap", "python markov_circles_timeseries.py --no-umap"),
    ("000", "python markov_circles_timeseries.py --no-umap --n-steps 200000 --subspace-dim 4",
     "python markov_circles_timeseries.py --no-umap --n-steps 200000 --subspace-dim 4"),
    ("000", "python markov_circles_timeseries.py --subspace-dim 4",
     "python markov_circles_timeseries.py --subspace-dim 4"),
    ("000", "python levina_bickel_demo.py", "python estimate_dimension.py --demo"),
    ("000", "python estimate_dimension.py", "python estimate_dimension.py"),
    ("000", "python masked_model.py --epochs 500", "python masked_model_gpu.py --epochs 500"),
    ("000", "python masked_model_gpu.py --epochs 500 --n-layers 7 --seq-len 1024 --stride 64 --mask-patch-min 8 "
            "--mask-patch-max 128",
     "python masked_model_gpu.py --epochs 500 --n-layers 7 --seq-len 1024 --stride 64 --mask-patch-min 8 "
     "--mask-patch-max 128"),
    ("000", "python masked_model_gpu.py --epochs 500 --n-layers 7 --seq-len 1024 --stride 64 --mask-patch-min 8 "
            "--mask-patch-max 128 --pos-encoding t5 --t5-num-buckets 64 --t5-max-distance 1024",
     "python masked_model_gpu.py --epochs 500 --n-layers 7 --seq-len 1024 --stride 64 --mask-patch-min 8 "
     "--mask-patch-max 128 --pos-encoding t5 --t5-num-buckets 64 --t5-max-distance 1024"),
    ("000", "python masked_model_gpu.py --epochs 500 --n-layers 7 --stride 64 --mask-patch-min 8 --mask-patch-max 128 "
            "--seq-len 1024 --no-train-eval --pos-encoding rope",
     "python masked_model_gpu.py --epochs 500 --n-layers 7 --stride 64 --mask-patch-min 8 --mask-patch-max 128 "
     "--seq-len 1024 --no-train-eval --pos-encoding rope"),
    ("000", "python evaluate_representations.py --checkpoint bert_model.pt",
     "python evaluate_representations.py --checkpoint runs/masked_sinusoidal/best.pt"),
    ("000", "python evaluate_representations.py --checkpoint bert_model.pt --layers 7",
     "python evaluate_representations.py --checkpoint runs/masked_sinusoidal/best.pt --layers 7"),
    ("000", "python evaluate_representations.py --checkpoint bert_model.pt --layers input,4,output",
     "python evaluate_representations.py --checkpoint runs/masked_sinusoidal/best.pt --layers input,4,output"),
    ("001", "python masked_model_gpu_mamba_next.py --d-state 32 --seq-len 1024 --stride 256 --no-compile "
            "--no-train-eval",
     "python mamba_next.py train --d-state 32 --seq-len 1024 --stride 256 --no-compile --no-train-eval"),
    ("001", "python masked_model_gpu_mamba_next.py --gate-lr-factor 0 --d-state 32 --seq-len 1024 --stride 256 "
            "--no-compile --no-train-eval --checkpoint model_next_frozen.pt",
     "python mamba_next.py train --gate-lr-factor 0 --d-state 32 --seq-len 1024 --stride 256 --no-compile "
     "--no-train-eval --checkpoint model_next_frozen.pt"),
    ("001", "python masked_model_gpu_mamba_next.py --gate-lr-factor 0.01 --d-state 32 --seq-len 1024 --stride 256 "
            "--no-compile --no-train-eval --checkpoint model_next_slow_gates.pt",
     "python mamba_next.py train --gate-lr-factor 0.01 --d-state 32 --seq-len 1024 --stride 256 --no-compile "
     "--no-train-eval --checkpoint model_next_slow_gates.pt"),
    ("001", "python masked_model_gpu_mamba_next.py --d-state 32 --seq-len 1024 --stride 256 --no-compile "
            "--no-train-eval --max-horizon 64",
     "python mamba_next.py train --d-state 32 --seq-len 1024 --stride 256 --no-compile --no-train-eval "
     "--max-horizon 64"),
    ("001", "python evaluate_representations.py --checkpoint model_next.pt",
     "python evaluate_representations.py --checkpoint model_next.pt"),
    ("001", "python evaluate_representations.py --checkpoint model_next.pt --pca 20",
     "python evaluate_representations.py --checkpoint model_next.pt --pca 20"),
    ("001", "python generate.py --checkpoint model_next.pt --seed-len 64 --gen-len 512",
     "python mamba_next.py generate --checkpoint model_next.pt --seed-len 64 --gen-len 512"),
    ("001", "python generate.py --checkpoint model_next.pt --gen-len 2048 --temperature 0.5",
     "python mamba_next.py generate --checkpoint model_next.pt --gen-len 2048 --temperature 0.5"),
    ("001", "python generate.py --checkpoint model_next.pt --gen-len 2048 --perturb-hidden --perturb-interval 200 "
            "--perturb-scale 50 --perturb-duration 10",
     "python mamba_next.py generate --checkpoint model_next.pt --gen-len 2048 --perturb-hidden --perturb-interval 200 "
     "--perturb-scale 50 --perturb-duration 10"),
    ("001", "python visualize_gates.py --checkpoint model_next.pt --layer 7 --sample 0",
     "python mamba_next.py gates --checkpoint model_next.pt --layer 7 --sample 0"),
    ("001", "python visualize_gates.py --checkpoint model_next.pt --umap",
     "python mamba_next.py gates --checkpoint model_next.pt --umap"),
    ("003", "python train.py", "python -m modadd.train --preset code"),
    ("003", "python experiment_full.py",
     "python -m modadd.sweep --seeds 0-19 --out-dir runs/code -- --preset code && python -m modadd.report runs/code"),
    ("003", "python analysis_subspace.py", "python -m modadd.trajectory runs/code/s0"),
    ("003", "python analysis_alignment.py", "python -m modadd.alignment runs/code/s0 runs/code/s1"),
]

# the original number -> the tiny one (sizes only)
TINY = {"--epochs": "1", "--n-steps": "5000", "--seq-len": "128", "--t5-max-distance": "128",
        "--mask-patch-max": "64", "--gen-len": "96", "--seed-len": "32", "--perturb-interval": "30",
        "--perturb-duration": "5", "--seeds": "0-1", "--pca": "8", "--d-state": "4"}
# flags added per command when the original command does not give them (widths, points, lengths;
# never a structural choice)
EXTRA = {
    "markov_circles_timeseries.py": ["--n-steps", "5000", "--umap-points", "300"],
    "estimate_dimension.py": ["--points", "800", "--demo-points", "800", "--n-boot", "20"],
    "masked_model_gpu.py": ["--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--batch-size", "16",
                            "--seq-len", "128", "--stride", "64"],
    "mamba_next.py train": ["--d-model", "16", "--batch-size", "16", "--epochs", "1"],
    "mamba_next.py gates": ["--umap-points", "200", "--samples", "2"],
    "evaluate_representations.py": ["--lb-points", "400", "--metric-points", "600", "--umap-points", "200"],
    "modadd.train": ["--steps", "40", "--d-model", "32", "--snapshot-every", "10", "--eval-size", "64"],
    "modadd.sweep": ["--steps", "40", "--d-model", "32", "--snapshot-every", "10", "--eval-size", "64"],
    "modadd.sweep before --": ["--sae-args=--sae-steps 50 --n-train 256 --n-eval 128"],
    "modadd.alignment": ["--windows", "2", "--n-null", "2"],
    "modadd.trajectory": ["--n-null", "2"],
}


def pairs(tokens: list[str]) -> list[list[str]]:
    """['--a', '1', '--b', '--c', 'x', 'y'] -> [['--a', '1'], ['--b'], ['--c', 'x', 'y']]."""
    out = []
    for t in tokens:
        if t.startswith("--") or not out:
            out.append([t])
        else:
            out[-1].append(t)
    return out


def shrink(argv: list[str]) -> list[str]:
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a in TINY:
            out[i + 1] = TINY[a]
    return out


def tiny_argv(cmd: str) -> tuple[object, list[str]]:
    """'python X.py [sub] ...' or 'python -m pkg.mod ...' -> (its main, the argv at tiny size)."""
    import importlib
    tok = shlex.split(cmd)
    assert tok[0] == "python"
    if tok[1] == "-m":
        mod, argv = tok[2], tok[3:]
        key = mod
    else:
        mod, argv = tok[1][:-3], tok[2:]
        key = tok[1] + (f" {argv[0]}" if mod == "mamba_next" and argv else "")
    given = set(argv)
    extra = [t for pr in pairs(EXTRA.get(key, [])) if pr[0] not in given for t in pr]
    if "--" in argv:       # the sweep's own flags before "--", the model's after it
        cut = argv.index("--")
        argv = argv[:cut] + EXTRA.get(key + " before --", []) + argv[cut:]
    return importlib.import_module(mod).main, shrink(argv + extra)


def run(cmd: str) -> None:
    for part in cmd.split(" && "):
        main, argv = tiny_argv(part)
        code = main(argv)
        assert code in (0, None), f"{part} -> {argv} exited {code}"


@pytest.fixture(scope="module")
def repo_on_path():
    """modadd.sweep starts `python -m modadd.train` processes, which find the package through
    PYTHONPATH when they run outside the repository."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + old if old else "")
    yield
    if old is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, repo_on_path):
    """A folder with tiny circles data, a masked run (runs/masked_sinusoidal), a Mamba checkpoint
    (model_next.pt) and two modadd runs (runs/code/s0, s1) for the commands that read them."""
    base = tmp_path_factory.mktemp("seed_commands")
    cwd = os.getcwd()
    os.chdir(base)
    try:
        run("python markov_circles_timeseries.py --no-umap --no-plot")
        run("python masked_model_gpu.py --epochs 500 --n-layers 7 --no-plot")
        run("python mamba_next.py train --d-state 32 --seq-len 1024 --stride 256 --no-compile --no-train-eval "
            "--checkpoint model_next.pt --no-plot")
        run("python -m modadd.sweep --seeds 0-1 --out-dir runs/code --stages none --no-plot -- --preset code")
    finally:
        os.chdir(cwd)
    return base


def test_every_seed_script_of_the_readme_table_is_covered():
    """The README's table of the seeds' commands and this list name the same seed scripts."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text.split("| the original command | here |", 1)[1].split("\n\n", 1)[0]
    first_cells = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `python")]
    in_readme = {re.match(r" `python ([a-z_]+\.py)", c).group(1) for c in first_cells}
    here = {shlex.split(orig)[1] for _, orig, _ in SEED_COMMANDS}
    assert in_readme == here


def test_tiny_keeps_the_structure():
    """Only sizes change: the original flags stay, in order, with the tiny numbers."""
    _, argv = tiny_argv(SEED_COMMANDS[8][2])
    assert argv[:18] == ["--epochs", "1", "--n-layers", "7", "--seq-len", "128", "--stride", "64", "--mask-patch-min",
                         "8", "--mask-patch-max", "64", "--pos-encoding", "t5", "--t5-num-buckets", "64",
                         "--t5-max-distance", "128"]
    assert "--d-model" in argv and argv.count("--seq-len") == 1


@pytest.mark.slow   # about 3 min on 2 cores: python -m pytest -m slow tests/test_seed_commands.py
@pytest.mark.parametrize("seed_doc, original, here", SEED_COMMANDS, ids=[c[1][7:60] for c in SEED_COMMANDS])
def test_seed_command_runs(seed_doc, original, here, workspace, tmp_path, monkeypatch):
    import shutil
    reads = ("evaluate_representations", "mamba_next.py generate", "mamba_next.py gates", "modadd.trajectory",
             "modadd.alignment")
    if not here.startswith(("python markov", "python -m modadd")):
        os.symlink(workspace / "data", tmp_path / "data")          # read only
    if any(r in here for r in reads):                              # these write beside the runs they read
        shutil.copytree(workspace / "runs", tmp_path / "runs")
        shutil.copy(workspace / "model_next.pt", tmp_path / "model_next.pt")
    monkeypatch.chdir(tmp_path)
    run(here)
