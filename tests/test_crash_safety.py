"""A run folder survives a kill at any instant: killed at every checkpoint write (leaving a
half-written temporary file), then resumed, it ends with the log, best.pt, last.pt and metrics.json
of the uninterrupted run. A second run into a folder that a live run holds refuses."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import training
from masked_model_gpu import main

TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
        "--n-layers", "1", "--d-ff", "32", "--warmup-epochs", "0.5", "--lr", "3e-3", "--no-train-eval",
        "--epochs", "3"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the program catches it."""


def val_column(run):
    rows = (run / "training_log.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[5]) for r in rows]


def test_kill_at_every_checkpoint_write_then_resume(small_data_dir, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    real = training.save_checkpoint
    calls = []
    monkeypatch.setattr(training, "save_checkpoint", lambda p, d: (calls.append(p), real(p, d)))
    assert main(["--data-dir", small_data_dir, "--out-dir", str(ref), *TINY]) == 0
    monkeypatch.setattr(training, "save_checkpoint", real)
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    assert len(calls) >= 4
    for k in range(1, len(calls) + 1):
        run = tmp_path / f"k{k}"
        seen = []

        def dying(path, payload, k=k, seen=seen):
            seen.append(path)
            if len(seen) == k:  # killed while writing: a half file beside the real one
                with open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp"), "wb") as f:
                    f.write(b"half")
                raise Killed()
            real(path, payload)
        monkeypatch.setattr(training, "save_checkpoint", dying)
        with pytest.raises(Killed):
            main(["--data-dir", small_data_dir, "--out-dir", str(run), *TINY])
        monkeypatch.setattr(training, "save_checkpoint", real)
        training.release_run_lock(str(run))  # the killed process's lock goes with it
        if (run / "last.pt").exists():
            assert main(["--resume", str(run / "last.pt")]) == 0
        else:  # killed before the first last.pt: the run starts again
            assert main(["--data-dir", small_data_dir, "--out-dir", str(run), *TINY]) == 0
        assert val_column(run) == pytest.approx(val_column(ref), rel=1e-6), k
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["best_epoch"] == ref_metrics["best_epoch"], k
        assert torch.load(run / "best.pt", weights_only=True)["epoch"] == metrics["best_epoch"], k
        assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3, k
        assert not [f for f in os.listdir(run) if f.endswith(".tmp")], k


def test_second_run_into_a_held_folder_refuses(small_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(run / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.perf_counter()
        assert main(["--data-dir", small_data_dir, "--out-dir", str(run), *TINY]) == 2
        assert time.perf_counter() - t < 30
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another run is writing" in err[0]
        assert not (run / "training_log.csv").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_forced_run_that_fails_in_its_first_epoch_leaves_the_old_run_whole(small_data_dir, tmp_path,
                                                                              monkeypatch, capsys):
    import masked_model_gpu
    run = tmp_path / "run"
    assert main(["--data-dir", small_data_dir, "--out-dir", str(run), *TINY, "--epochs", "1"]) == 0
    before = {f: (run / f).read_bytes() for f in ("training_log.csv", "args.json", "metrics.json", "last.pt",
                                                  "best.pt")}
    monkeypatch.setattr(masked_model_gpu, "batch_loss", lambda *a: torch.tensor(float("nan")))
    assert main(["--data-dir", small_data_dir, "--out-dir", str(run), *TINY, "--epochs", "2", "--force"]) == 2
    assert "became nan" in capsys.readouterr().err
    after = {f: (run / f).read_bytes() for f in before}
    assert after == before  # the old run's log, arguments, metrics and checkpoints are untouched
    monkeypatch.undo()
    # a forced run that gets through its first epoch replaces the old run's files
    assert main(["--data-dir", small_data_dir, "--out-dir", str(run), *TINY, "--epochs", "2", "--force"]) == 0
    assert json.loads((run / "args.json").read_text())["epochs"] == 2
    assert len((run / "training_log.csv").read_text().splitlines()) == 3
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
