"""A table of bad inputs, each run through its command's main(): exit status 2, exactly one line
on stderr naming the problem, no traceback, and nothing written where the command refused."""
import shutil

import numpy as np
import pytest
import torch

MASKED_TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
               "--n-layers", "1", "--d-ff", "32", "--no-train-eval"]
MAMBA_TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-layers", "1",
              "--d-state", "4", "--d-ff", "32", "--no-train-eval"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_data_dir):
    """Data folders (good, config.json a list, constant), a masked and a Mamba checkpoint."""
    from mamba_next import main as mamba
    from masked_model_gpu import main as masked
    root = tmp_path_factory.mktemp("bad")
    listcfg = root / "listcfg"
    shutil.copytree(small_data_dir, listcfg)
    (listcfg / "config.json").write_text("[1, 2]")
    const = root / "const"
    const.mkdir()
    np.savez(const / "data.npz", X=np.ones((3000, 5), np.float32), states=np.zeros(3000, np.int64))
    assert masked(["--data-dir", small_data_dir, "--out-dir", str(root / "m"), "--epochs", "1", *MASKED_TINY]) == 0
    assert mamba(["train", "--data-dir", small_data_dir, "--out-dir", str(root / "b"), "--epochs", "1",
                  *MAMBA_TINY]) == 0
    ck = torch.load(root / "m" / "best.pt", weights_only=True)
    del ck["model"]["head.weight" if "head.weight" in ck["model"] else next(iter(ck["model"]))]
    torch.save(ck, root / "partial.pt")
    ck = torch.load(root / "m" / "best.pt", weights_only=True)
    ck["data"] = dict(ck["data"], data_dir=str(root / "gone"))
    torch.save(ck, root / "datagone.pt")
    (root / "notes.txt").write_text("my notes")
    return {"root": root, "data": small_data_dir, "notes": str(root / "notes.txt"), "listcfg": str(listcfg), "const": str(const),
            "masked": str(root / "m" / "best.pt"), "mamba": str(root / "b" / "best.pt")}


def cases(w):
    from estimate_dimension import main as lb
    from mamba_next import main as mamba
    from markov_circles_timeseries import main as gen
    from masked_model_gpu import main as masked
    from modadd.train import main as modadd_train
    out = str(w["root"] / "never")
    return {
        "masked: config.json not an object": (masked, ["--data-dir", w["listcfg"], "--out-dir", out, *MASKED_TINY],
                                              "not an object"),
        "mamba: config.json not an object": (mamba, ["train", "--data-dir", w["listcfg"], "--out-dir", out,
                                                     *MAMBA_TINY], "not an object"),
        "generator: config.json not an object": (gen, ["--n-steps", "3000", "--out-dir", w["listcfg"], "--no-plot"],
                                                 "--force"),
        "masked: --n-heads 0": (masked, ["--data-dir", w["data"], "--out-dir", out, *MASKED_TINY, "--n-heads", "0"],
                                "--n-heads"),
        "masked: --d-model 0": (masked, ["--data-dir", w["data"], "--out-dir", out, *MASKED_TINY, "--d-model", "0"],
                                "--d-model"),
        "masked: partial state dict": (masked, ["--eval", str(w["root"] / "partial.pt")], "does not match"),
        "masked: --eval with the data gone": (masked, ["--eval", str(w["root"] / "datagone.pt")], "--data-dir"),
        "generate --gen-len 0": (mamba, ["generate", "--checkpoint", w["mamba"], "--gen-len", "0"], "--gen-len"),
        "generate --seed-len 0": (mamba, ["generate", "--checkpoint", w["mamba"], "--seed-len", "0"], "--seed-len"),
        "generate --start -1": (mamba, ["generate", "--checkpoint", w["mamba"], "--start", "-1"], "--start"),
        "generate --perturb-interval 0": (mamba, ["generate", "--checkpoint", w["mamba"], "--perturb-hidden",
                                                  "--perturb-interval", "0"], "--perturb-interval"),
        "modadd: heads do not divide d_model": (modadd_train, ["--d-model", "30", "--n-heads", "4", "--steps", "2",
                                                               "--out-dir", out], "divisible"),
        "modadd: --n-layers 0": (modadd_train, ["--n-layers", "0", "--steps", "2", "--out-dir", out], "--n-layers"),
        "masked: --epochs 0": (masked, ["--data-dir", w["data"], "--out-dir", out, *MASKED_TINY, "--epochs", "0"],
                               "--epochs"),
        "mamba: --max-horizon >= --seq-len": (mamba, ["train", "--data-dir", w["data"], "--out-dir", out, *MAMBA_TINY,
                                                      "--max-horizon", "64"], "--max-horizon"),
        "--checkpoint onto a file that is not a checkpoint": (
            masked, ["--data-dir", w["data"], "--out-dir", out, *MASKED_TINY, "--checkpoint", w["notes"]],
            "not a masked_transformer checkpoint"),
        "--checkpoint onto an earlier best without --force": (
            masked, ["--data-dir", w["data"], "--out-dir", out, *MASKED_TINY, "--checkpoint", w["masked"]],
            "--force"),
        "--checkpoint onto a folder": (
            masked, ["--data-dir", w["data"], "--out-dir", out, *MASKED_TINY, "--checkpoint", str(w["root"]),
                     "--force"], "folder"),
        "LB on a constant series": (lb, ["--data-dir", w["const"], "--out-dir", out, "--no-per-circle", "--points",
                                         "0"], "identical"),
    }


CASES = ["masked: config.json not an object", "mamba: config.json not an object",
         "generator: config.json not an object", "masked: --n-heads 0", "masked: --d-model 0",
         "masked: partial state dict", "masked: --eval with the data gone", "generate --gen-len 0",
         "generate --seed-len 0", "generate --start -1", "generate --perturb-interval 0",
         "modadd: heads do not divide d_model", "modadd: --n-layers 0", "LB on a constant series",
         "masked: --epochs 0", "mamba: --max-horizon >= --seq-len",
         "--checkpoint onto a file that is not a checkpoint", "--checkpoint onto an earlier best without --force",
         "--checkpoint onto a folder"]


def exit_status(fn, argv) -> int:
    """A command's exit status, whether it returns it or argparse exits with it."""
    try:
        return fn(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(case, world, capsys):
    fn, argv, needle = cases(world)[case]
    capsys.readouterr()
    assert exit_status(fn, argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert needle in err[0], err[0]
    assert not (world["root"] / "never").exists()
    assert (world["root"] / "notes.txt").read_text() == "my notes"


def test_the_table_is_complete(world):
    assert sorted(cases(world)) == sorted(CASES)


def test_generator_config_that_is_not_json(world, tmp_path, capsys):
    from markov_circles_timeseries import main as gen
    shutil.copytree(world["data"], tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("not json {")
    before = (tmp_path / "d" / "data.npz").read_bytes()
    assert gen(["--n-steps", "3000", "--out-dir", str(tmp_path / "d"), "--no-plot"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "d" / "data.npz").read_bytes() == before  # the folder is left as it was
