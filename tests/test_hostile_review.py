"""Hostile inputs found by an independent review after the reliability tables were written, one test per
root cause: figures shared between runs, manifests that point through links, empty and FIFO files,
a data folder killed between its two files, files another command wrote, a data folder rewritten under
a run, relative sweep outputs, and CSV cells that are not numbers."""
import json
import os
import threading

import numpy as np
import pytest

TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
        "--n-layers", "1", "--d-ff", "32", "--no-train-eval", "--epochs", "1"]


def one_line(rc, err, fragment=None):
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    if fragment:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_data_dir):
    from masked_model_gpu import main
    root = tmp_path_factory.mktemp("review")
    assert main(["--data-dir", small_data_dir, "--out-dir", str(root / "m"), *TINY, "--no-plot"]) == 0
    return root / "m"


def test_two_runs_sharing_a_plots_folder_never_remove_each_others_figures(small_data_dir, tmp_path, capsys):
    from masked_model_gpu import main
    figs = tmp_path / "figs"
    assert main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "a"), "--plots-dir", str(figs), *TINY]) == 0
    before = {f: (figs / f).read_bytes() for f in os.listdir(figs) if f.endswith(".png")}
    assert "bert_prediction_0.png" in before
    capsys.readouterr()
    one_line(main(["--data-dir", small_data_dir, "--out-dir", str(tmp_path / "b"), "--plots-dir", str(figs), *TINY]),
             capsys.readouterr().err, "--force")
    assert {f: (figs / f).read_bytes() for f in before} == before and not (tmp_path / "b" / "last.pt").exists()


def test_a_manifest_entry_through_a_link_removes_nothing_outside(tmp_path):
    import safeio
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("keep")
    os.symlink(elsewhere, out / "sub")
    (out / safeio.MANIFEST).write_text(json.dumps({"gates": ["sub/precious.txt", "gates_summary.json"]}))
    safeio.Outputs("gates", force=True).claim([str(out / "gates_summary.json")], folders=[str(out)])
    assert (elsewhere / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("kind", ["empty", "fifo"])
def test_empty_and_fifo_files_are_one_line_and_never_block(run, tmp_path, capsys, kind):
    from dataset import main as convert
    from masked_model_gpu import main as masked
    from oracle import main as oracle
    p = tmp_path / "x.pt"
    if kind == "empty":
        p.write_bytes(b"")
    else:
        os.mkfifo(p)
        opener = threading.Timer(20, lambda: open(p, "wb").close())   # unblocks a reader that would hang
        opener.start()
    try:
        for fn, argv in ((oracle, ["--checkpoint", str(p)]), (masked, ["eval", str(p)])):
            capsys.readouterr()
            one_line(fn(argv), capsys.readouterr().err)
        if kind == "fifo":
            npy = tmp_path / "s.npy"
            os.mkfifo(npy)
            capsys.readouterr()
            one_line(convert([str(npy), "--out-dir", str(tmp_path / "d")]), capsys.readouterr().err, "regular file")
    finally:
        if kind == "fifo":
            opener.cancel()


def test_a_data_folder_killed_between_its_two_files_is_written_again_without_force(tmp_path, monkeypatch, capsys):
    """Killed after config.json and before data.npz on its first write: the same command again finishes,
    never claiming a different configuration, and no temporary file is left."""
    from markov_circles_timeseries import main as gen
    argv = ["--n-steps", "3000", "--out-dir", str(tmp_path / "d"), "--no-plot"]
    real, calls = os.replace, []

    class Killed(BaseException):
        pass

    def dying(a, b, *r, **k):
        calls.append(b)
        if str(b).endswith("data.npz"):
            raise Killed()
        return real(a, b, *r, **k)
    monkeypatch.setattr(os, "replace", dying)
    with pytest.raises(Killed):
        gen(argv)
    monkeypatch.undo()
    assert (tmp_path / "d" / "config.json").exists() and not (tmp_path / "d" / "data.npz").exists()
    capsys.readouterr()
    assert gen(argv) == 0
    assert "different configuration" not in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path / "d") if f.endswith(".tmp")]
    from dataset import load_series
    assert len(load_series(str(tmp_path / "d")).X) == 3000


def test_files_another_command_wrote_are_never_replaced_even_with_force(run, small_data_dir, tmp_path, capsys):
    import shutil

    from masked_model_gpu import main as masked
    data = tmp_path / "data"
    shutil.copytree(small_data_dir, data)
    before = (data / "config.json").read_bytes()
    capsys.readouterr()
    one_line(masked(["eval", str(run / "best.pt"), "--out-dir", str(tmp_path / "e"), "--no-plot", "--export",
                     str(data), "--force"]), capsys.readouterr().err, "another command")
    assert (data / "config.json").read_bytes() == before


def test_a_data_folder_written_again_under_a_run_is_one_line(run, small_data_dir, tmp_path, capsys):
    import shutil

    from markov_circles_timeseries import main as gen
    from masked_model_gpu import main as masked
    data = tmp_path / "data"
    shutil.copytree(small_data_dir, data)
    r = tmp_path / "r"
    assert masked(["--data-dir", str(data), "--out-dir", str(r), *TINY, "--epochs", "2", "--stop-after", "1",
                   "--no-plot"]) == 0
    assert gen(["--n-steps", "20000", "--out-dir", str(data), "--no-plot", "--seed", "7", "--force"]) == 0
    capsys.readouterr()
    one_line(masked(["--resume", str(r / "last.pt")]), capsys.readouterr().err, "written again")
    one_line(masked(["eval", str(r / "last.pt"), "--no-plot"]), capsys.readouterr().err, "--data-dir")
    assert masked(["eval", str(r / "last.pt"), "--no-plot", "--data-dir", str(data)]) == 0   # on purpose


def test_relative_sweep_outputs_are_refused(tmp_path, capsys):
    import sweep
    spec = {"line": "commands", "seeds": [0], "steps": [{"name": "w", "cmd": "{python} -c pass",
                                                          "outputs": ["metrics.json"]}]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    capsys.readouterr()
    one_line(sweep.main(["run", str(tmp_path / "spec.json"), "--out-dir", str(tmp_path / "r"), "--dry-run"]),
             capsys.readouterr().err, "{job_dir}")


@pytest.mark.parametrize("text, fragment", [("1;2\n3;4\n", "not comma-separated"), ('1,2\n3,"4,5"\n6,7\n', "decimals"),
                                            ("1,2\nNA,4\n", "missing"), ("1,2\n3,\n", "missing"),
                                            ("1,2\n3,x7\n", "row 2, column 1")])
def test_csv_cells_that_are_not_numbers_name_the_row_the_column_and_the_fix(tmp_path, capsys, text, fragment):
    from dataset import main as convert
    (tmp_path / "s.csv").write_text(text)
    capsys.readouterr()
    one_line(convert([str(tmp_path / "s.csv"), "--out-dir", str(tmp_path / "d")]), capsys.readouterr().err, fragment)


def test_observations_too_large_to_square_in_float32_are_refused(tmp_path, small_data_dir, capsys):
    import shutil

    from oracle import main as oracle
    d = tmp_path / "d"
    shutil.copytree(small_data_dir, d)
    with np.load(d / "data.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["X"] = arrays["X"] * 1e36
    np.savez(d / "data.npz", **arrays)
    capsys.readouterr()
    one_line(oracle(["--data-dir", str(d), "--seq-len", "64"]), capsys.readouterr().err, "--standardize")
