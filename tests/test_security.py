"""Nothing a user loads can run code: a crafted checkpoint whose pickle would write a marker file
is refused with one line by every entry point that reads checkpoints, and the marker never
appears. The project's own checkpoints load with weights_only=True, RNG states included."""
import random

import numpy as np
import pytest
import torch

import training


class WritesMarker:
    """Unpickling this calls open(path, 'w'): code run by loading a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:  # what torch.save would write, with a payload that runs code
        torch.save({"model_type": "masked_transformer", "x": WritesMarker(str(marker))}, f)
    return path, marker


def one_line_refusal(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_torch_load_would_run_it(hostile):
    """The fixture is really hostile: the unsafe load creates the marker."""
    path, marker = hostile
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_masked_model_eval_and_resume_refuse(hostile, capsys):
    from masked_model_gpu import main
    path, marker = hostile
    for flags in (["--eval", str(path)], ["--resume", str(path)]):
        assert main(flags) == 2
        assert "safely" in one_line_refusal(capsys)
    assert not marker.exists()


def test_mamba_generate_and_gates_refuse(hostile, capsys):
    from mamba_next import main
    path, marker = hostile
    for cmd in ("generate", "gates"):
        assert main([cmd, "--checkpoint", str(path)]) == 2
        assert "safely" in one_line_refusal(capsys)
    assert main(["train", "--eval", str(path)]) == 2
    one_line_refusal(capsys)
    assert not marker.exists()


def test_evaluate_representations_refuses(hostile, capsys):
    from evaluate_representations import main
    path, marker = hostile
    assert main(["--checkpoint", str(path)]) == 2
    assert "safely" in one_line_refusal(capsys)
    assert not marker.exists()


def test_modadd_stages_refuse(hostile, tmp_path, capsys):
    import shutil

    from modadd.bubbling import main
    path, marker = hostile
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "model.pt")
    assert main([str(run), "--no-plot"]) == 2
    assert "safely" in one_line_refusal(capsys)
    assert not marker.exists()


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    training.save_checkpoint(str(tmp_path / "c.pt"), {"model_type": "x", "rng": training.rng_state(),
                                                      "np_scalar": np.float64(1.5), "arr": np.arange(3)})
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(2).tolist())
    ck = training.safe_load(str(tmp_path / "c.pt"))  # weights_only=True
    assert ck["np_scalar"] == 1.5 and torch.equal(ck["arr"], torch.arange(3))
    training.set_rng_state(ck["rng"])
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(2).tolist()) == expected


def test_save_refuses_objects_that_are_not_plain_data(tmp_path):
    with pytest.raises(TypeError, match="not plain data"):
        training.save_checkpoint(str(tmp_path / "c.pt"), {"f": WritesMarker("x")})
    assert not (tmp_path / "c.pt").exists()
