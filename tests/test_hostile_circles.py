"""Hostile and careless inputs to the circles commands, one table per class of failure: each input
exits non-zero with exactly one stderr line and no traceback (or does the right thing), nothing
outside the command's declared outputs changes (listing and bytes compared before and after), and
no NaN reaches a JSON file unnamed. Then a kill at every write of each writing command, and a rerun.

Classes (the reliability issue's numbering): 1 output paths, 2 claims and --force, 3 files read from
disk, 4 sizes that cannot be allocated, 5 series and text input, 8 writes a kill can tear."""
import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

MASKED_TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-heads", "2",
               "--n-layers", "1", "--d-ff", "32", "--no-train-eval", "--epochs", "1"]
MAMBA_TINY = ["--seq-len", "64", "--stride", "32", "--batch-size", "16", "--d-model", "16", "--n-layers", "1",
              "--d-state", "4", "--d-ff", "32", "--no-train-eval", "--epochs", "1"]


def snapshot(root) -> dict:
    """Every file below root (hidden ones too) with its bytes."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def one_line_failure(rc, err: str, fragment: str | None = None):
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if fragment:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])


def no_unnamed_nan(root):
    """Every JSON below root parses as strict JSON (no NaN / Infinity tokens)."""
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".json"):
                text = open(os.path.join(d, f)).read()
                json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {f}"))


# ----------------------------------------------------------------------------- the world

def write_npz(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def data_variant(base, dst, config=None, drop=(), **arrays):
    """A copy of the data folder `base` with some arrays or config fields replaced (the write token dropped,
    as a hand-edited folder would have it)."""
    with np.load(os.path.join(base, "data.npz")) as f:
        a = {k: f[k] for k in f.files if k != "generation" and k not in drop}
    a.update(arrays)
    cfg = json.load(open(os.path.join(base, "config.json")))
    cfg.pop("generation", None)
    os.makedirs(dst, exist_ok=True)
    np.savez(os.path.join(dst, "data.npz"), **a)
    if config is not None:
        cfg = config(cfg) if callable(config) else config
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(dst)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mamba_next import main as mamba
    from markov_circles_timeseries import main as gen
    from masked_model_gpu import main as masked
    root = tmp_path_factory.mktemp("hostile")
    data = str(root / "data")
    assert gen(["--n-steps", "4000", "--out-dir", data, "--no-plot", "--seed", "1"]) == 0
    assert masked(["--data-dir", data, "--out-dir", str(root / "m"), *MASKED_TINY, "--no-plot"]) == 0
    assert mamba(["train", "--data-dir", data, "--out-dir", str(root / "b"), *MAMBA_TINY, "--no-plot"]) == 0
    (root / "afile").write_text("a user's file")
    return {"root": root, "data": data, "masked": str(root / "m" / "best.pt"), "mamba": str(root / "b" / "best.pt"),
            "file": str(root / "afile")}


def bad_data(w, name, **kw):
    return data_variant(w["data"], w["root"] / "bad" / name, **kw)


def commands():
    from dataset import main as convert
    from estimate_dimension import main as lb
    from evaluate_representations import main as rep
    from mamba_next import main as mamba
    from markov_circles_timeseries import main as gen
    from masked_model_gpu import main as masked
    from oracle import main as orc
    return dict(gen=gen, convert=convert, lb=lb, rep=rep, mamba=mamba, masked=masked, oracle=orc)


def run_case(w, tmp_path, capsys, cmd, argv, fragment=None, watch=()):
    """Run one command expected to refuse; nothing under tmp_path, the data or the watched folders changes."""
    folders = [tmp_path, w["data"], *watch]
    before = [snapshot(f) for f in folders]
    capsys.readouterr()
    try:
        rc = commands()[cmd](argv)
    except SystemExit as e:  # argparse refusing a flag
        rc = e.code
    err = capsys.readouterr().err
    one_line_failure(rc, err, fragment)
    assert [snapshot(f) for f in folders] == before


# ----------------------------------------------------------------------------- 1. output paths

OUTPUT_PATH_CASES = {
    "generator --out-dir is a file": ("gen", lambda w, t: ["--n-steps", "3000", "--out-dir", w["file"], "--no-plot"],
                                      "is a file"),
    "generator --plots-dir is a file": ("gen", lambda w, t: ["--n-steps", "3000", "--out-dir", str(t / "d"),
                                                             "--plots-dir", w["file"], "--no-umap"], "is a file"),
    "generator --out-dir below a file": ("gen", lambda w, t: ["--n-steps", "3000", "--out-dir", w["file"] + "/sub",
                                                              "--no-plot"], "is a file"),
    "convert --out-dir is a file": ("convert", lambda w, t: [str(t / "s.npy"), "--out-dir", w["file"]], "is a file"),
    "train --out-dir is a file": ("masked", lambda w, t: ["--data-dir", w["data"], "--out-dir", w["file"],
                                                          *MASKED_TINY], "is a file"),
    "train --plots-dir is a file": ("masked", lambda w, t: ["--data-dir", w["data"], "--out-dir", str(t / "r"),
                                                            "--plots-dir", w["file"], *MASKED_TINY], "is a file"),
    "train --export is a file": ("masked", lambda w, t: ["--data-dir", w["data"], "--out-dir", str(t / "r"),
                                                         "--export", w["file"], *MASKED_TINY], "is a file"),
    "train --checkpoint is a folder": ("masked", lambda w, t: ["--data-dir", w["data"], "--out-dir", str(t / "r"),
                                                               "--checkpoint", str(t), *MASKED_TINY], "folder"),
    "mamba train --out-dir below a file": ("mamba", lambda w, t: ["train", "--data-dir", w["data"], "--out-dir",
                                                                  w["file"] + "/x/y", *MAMBA_TINY], "is a file"),
    "eval --out-dir is a file": ("masked", lambda w, t: ["eval", w["masked"], "--out-dir", w["file"]], "is a file"),
    "eval --export is a file": ("masked", lambda w, t: ["eval", w["masked"], "--out-dir", str(t / "e"),
                                                        "--export", w["file"]], "is a file"),
    "generate --out-dir is a file": ("mamba", lambda w, t: ["generate", "--checkpoint", w["mamba"], "--gen-len", "8",
                                                            "--out-dir", w["file"]], "is a file"),
    "generate --plots-dir is a file": ("mamba", lambda w, t: ["generate", "--checkpoint", w["mamba"], "--gen-len", "8",
                                                              "--out-dir", str(t / "g"), "--plots-dir", w["file"]],
                                       "is a file"),
    "gates --out-dir is a file": ("mamba", lambda w, t: ["gates", "--checkpoint", w["mamba"], "--samples", "1",
                                                         "--out-dir", w["file"]], "is a file"),
    "estimate_dimension --out-dir is a file": ("lb", lambda w, t: ["--data-dir", w["data"], "--out-dir", w["file"],
                                                                   "--points", "500"], "is a file"),
    "estimate_dimension --plots-dir is a file": ("lb", lambda w, t: ["--demo", "--out-dir", str(t / "o"),
                                                                     "--plots-dir", w["file"]], "is a file"),
    "oracle --out-dir is a file": ("oracle", lambda w, t: ["--checkpoint", w["masked"], "--out-dir", w["file"]],
                                   "is a file"),
    "representations --out-dir is a file": ("rep", lambda w, t: ["--checkpoint", w["masked"], "--out-dir", w["file"],
                                                                  "--no-umap"], "is a file"),
    "representations --plots-dir is a file": ("rep", lambda w, t: ["--checkpoint", w["masked"], "--out-dir",
                                                                    str(t / "o"), "--plots-dir", w["file"]],
                                              "is a file"),
}


@pytest.mark.parametrize("name", sorted(OUTPUT_PATH_CASES))
def test_output_paths_that_cannot_be_folders(world, tmp_path, capsys, name):
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(100, 3)))
    cmd, argv, frag = OUTPUT_PATH_CASES[name]
    run_case(world, tmp_path, capsys, cmd, argv(world, tmp_path), frag, watch=[world["root"] / "m", world["root"] / "b"])
    assert open(world["file"]).read() == "a user's file"


# ----------------------------------------------------------------------------- 2. claims

CLAIM_CASES = {  # a user's own file where the command writes one: refused without --force, left as it was
    "train, user's args.json": ("masked", "args.json", lambda w, o: ["--data-dir", w["data"], "--out-dir", o,
                                                                     *MASKED_TINY]),
    "train, user's metrics.json": ("masked", "metrics.json", lambda w, o: ["--data-dir", w["data"], "--out-dir", o,
                                                                           *MASKED_TINY]),
    "mamba train, user's training_log.csv": ("mamba", "training_log.csv", lambda w, o: [
        "train", "--data-dir", w["data"], "--out-dir", o, *MAMBA_TINY]),
    "generator, user's config.json": ("gen", "config.json", lambda w, o: ["--n-steps", "3000", "--out-dir", o,
                                                                          "--no-plot"]),
    "generator, user's circles_summary.json": ("gen", "circles_summary.json", lambda w, o: [
        "--n-steps", "3000", "--out-dir", o, "--no-plot"]),
    "convert, user's config.json": ("convert", "config.json", lambda w, o: [os.path.join(o, "..", "s.npy"),
                                                                            "--out-dir", o]),
    "estimate_dimension, user's csv": ("lb", "dimension_vs_k.csv", lambda w, o: ["--data-dir", w["data"], "--out-dir",
                                                                                 o, "--points", "500", "--no-plot"]),
    "oracle, user's oracle.json": ("oracle", "oracle.json", lambda w, o: ["--checkpoint", w["masked"], "--out-dir", o]),
    "eval, user's eval_metrics.json": ("masked", "eval_metrics.json", lambda w, o: ["eval", w["masked"], "--out-dir",
                                                                                    o, "--no-plot"]),
    "generate, user's gen.json": ("mamba", "gen.json", lambda w, o: ["generate", "--checkpoint", w["mamba"],
                                                                     "--gen-len", "8", "--out-dir", o, "--no-plot"]),
    "gates, user's summary": ("mamba", "gates_summary.json", lambda w, o: ["gates", "--checkpoint", w["mamba"],
                                                                           "--samples", "1", "--out-dir", o,
                                                                           "--no-plot"]),
    "representations, user's md": ("rep", "representation_metrics.md", lambda w, o: [
        "--checkpoint", w["masked"], "--out-dir", o, "--no-umap", "--no-plot"]),
}


@pytest.mark.parametrize("name", sorted(CLAIM_CASES))
def test_a_users_file_where_a_command_writes_stops_it(world, tmp_path, capsys, name):
    cmd, fname, argv = CLAIM_CASES[name]
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(100, 3)))
    o = tmp_path / "o"
    o.mkdir()
    (o / fname).write_text("mine")
    run_case(world, tmp_path, capsys, cmd, argv(world, str(o)), "--force")
    assert (o / fname).read_text() == "mine"


def test_force_leaves_no_stale_output_and_no_user_file_goes(world, tmp_path, capsys):
    """--force over an earlier run removes what that run wrote (its figures even when the new run draws
    none, the evaluation of the old model), and nothing the user put there."""
    from dataset import main as convert
    from markov_circles_timeseries import main as gen
    from masked_model_gpu import main as masked
    run, figs = tmp_path / "run", tmp_path / "figs"
    assert masked(["--data-dir", world["data"], "--out-dir", str(run), "--plots-dir", str(figs), *MASKED_TINY]) == 0
    assert masked(["eval", str(run / "best.pt"), "--no-plot"]) == 0
    (run / "my_notes.txt").write_text("keep")
    (figs / "bert_prediction_mine.png").write_text("keep")
    (run / "eval" / "my_eval_notes.txt").write_text("keep")
    assert (figs / "training_loss.png").exists() and (run / "eval" / "eval_metrics.json").exists()
    assert masked(["--data-dir", world["data"], "--out-dir", str(run), "--plots-dir", str(figs), *MASKED_TINY,
                   "--no-plot", "--force"]) == 0
    assert not (figs / "training_loss.png").exists() and not (figs / "bert_prediction_0.png").exists()
    assert not (run / "eval" / "eval_metrics.json").exists()
    for p in (run / "my_notes.txt", figs / "bert_prediction_mine.png", run / "eval" / "my_eval_notes.txt"):
        assert p.read_text() == "keep"
    # a converted series over a generated folder: nothing of the generated series stays beside it
    d = tmp_path / "d"
    assert gen(["--n-steps", "3000", "--out-dir", str(d), "--no-plot"]) == 0
    (d / "readme.txt").write_text("keep")
    np.save(tmp_path / "s.npy", np.random.default_rng(0).normal(size=(100, 3)))
    capsys.readouterr()
    one_line_failure(convert([str(tmp_path / "s.npy"), "--out-dir", str(d)]), capsys.readouterr().err, "--force")
    assert convert([str(tmp_path / "s.npy"), "--out-dir", str(d), "--force"]) == 0
    assert sorted(f for f in os.listdir(d) if not f.startswith(".")) == ["config.json", "data.npz", "readme.txt"]
    # a generator rerun with another subspace removes the old UMAP numbers with --force
    assert gen(["--n-steps", "3000", "--out-dir", str(d), "--no-plot", "--force"]) == 0
    assert not (d / "s.npy").exists() and (d / "circles_summary.json").exists()


# ----------------------------------------------------------------------------- 3. files read from disk

def deep(n=100_000):
    return "[" * n + "]" * n


def cfg_set(**kv):
    return lambda c: {**c, **kv}


DATA_CASES = {  # name -> (variant kwargs, fragment of the message)
    "config.json nested 100,000 deep": (dict(config=deep()), "nested too deeply"),
    "config.json a list": (dict(config="[1, 2]"), "not an object"),
    "config.json binary": (dict(config="\udcff"), None),
    "noise_var negative": (dict(config=cfg_set(noise_var=-5.0, noise_std=None)), "noise"),
    "noise_var NaN": (dict(config='{"noise_var": NaN}'), "noise_var"),
    "noise_std a string": (dict(config=cfg_set(noise_std="2.8")), "noise_std"),
    "noise_var and noise_std disagree": (dict(config=cfg_set(noise_var=1.0)), "noise_var"),
    "n_circles 1e8": (dict(config=cfg_set(n_circles=100_000_000)), "n_circles"),
    "n_circles a float": (dict(config=cfg_set(n_circles=10.5)), "n_circles"),
    "n_steps disagrees with X": (dict(config=cfg_set(n_steps=5)), "n_steps"),
    "dwell_mean zero": (dict(config=cfg_set(dwell_mean=0)), "dwell_mean"),
    "dwell_std a list": (dict(config=cfg_set(dwell_std=[1])), "dwell_std"),
    "transition matrix of the wrong shape": (dict(transition_matrix=np.eye(3)), "transition_matrix"),
    "transition matrix not stochastic": (dict(transition_matrix=np.full((10, 10), 0.5)), "transition_matrix"),
    "transition matrix with NaN": (dict(transition_matrix=np.full((10, 10), np.nan)), "transition_matrix"),
    "signal of the wrong shape": (dict(signal=np.zeros((10, 20), np.float32)), "signal"),
    "periods zero": (dict(periods=np.zeros(10, np.int64)), "periods"),
    "periods floats": (dict(periods=np.full(10, 40.5)), "periods"),
    "periods huge": (dict(periods=np.full(10, 10 ** 9)), "periods"),
    "planes with NaN": (dict(planes=np.full((10, 2, 20), np.nan)), "planes"),
    "radii missing": (dict(drop=("radii",)), "radii"),
    "states negative": (dict(states=-np.ones(4000, np.int64)), "states"),
    "states floats": (dict(states=np.zeros(4000)), "states"),
    "states of the wrong length": (dict(states=np.zeros(7, np.int64)), "states"),
    "X complex": (dict(X=np.ones((4000, 20), np.complex64)), "real"),
    "X (4000, 0)": (dict(X=np.ones((4000, 0), np.float32)), "X"),
    "X 3-D": (dict(X=np.ones((4000, 20, 1), np.float32)), "X"),
    "X with inf": (dict(X=np.full((4000, 20), np.inf, np.float32)), "infinite"),
    "X structured": (dict(X=np.zeros(4000, dtype=[("a", "f4"), ("b", "f4")])), "X"),
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
@pytest.mark.parametrize("cmd", ["masked", "oracle", "lb"])
def test_hostile_data_folders(world, tmp_path, capsys, name, cmd):
    kw, frag = DATA_CASES[name]
    if kw.get("config") == "\udcff":
        d = bad_data(world, "binary", config="{}")
        open(os.path.join(d, "config.json"), "wb").write(b"\xff\xfe\x00\x01binary")
        frag = "UTF-8"
    else:
        d = bad_data(world, name.replace(" ", "_").replace(",", ""), **kw)
    argv = {"masked": ["--data-dir", d, "--out-dir", str(tmp_path / "r"), *MASKED_TINY],
            "oracle": ["--data-dir", d, "--seq-len", "64"],
            "lb": ["--data-dir", d, "--out-dir", str(tmp_path / "o"), "--points", "300", "--no-plot"]}[cmd]
    run_case(world, tmp_path, capsys, cmd, argv, frag, watch=[d])


def torn_folder(w, tmp_path):
    """A data folder whose config.json comes from another write than its data.npz (a kill between them)."""
    from markov_circles_timeseries import main as gen
    d = tmp_path / "torn"
    assert gen(["--n-steps", "3000", "--out-dir", str(d), "--no-plot"]) == 0
    cfg = json.loads((d / "config.json").read_text())
    cfg["generation"] = "0" * 16
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_a_torn_data_folder_is_refused_with_the_fix(world, tmp_path, capsys):
    d = torn_folder(world, tmp_path)
    from masked_model_gpu import main as masked
    one_line_failure(masked(["--data-dir", d, "--out-dir", str(tmp_path / "r"), *MASKED_TINY]),
                     capsys.readouterr().err, "rerun the command that wrote it with --force")


def npz_with_lying_header(path):
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("X.npy", head.getvalue() + np.zeros(8, np.float32).tobytes())


def checkpoint_variant(src, dst, edit):
    ck = torch.load(src, weights_only=True)
    edit(ck)
    torch.save(ck, dst)
    return str(dst)


def ck_set(part, **kv):
    def edit(ck):
        ck[part] = {**ck[part], **kv}
    return edit


CHECKPOINT_CASES = {
    "model_config.d_model a string": (ck_set("model_config", d_model="16"), "d_model"),
    "model_config.n_heads a float": (ck_set("model_config", n_heads=2.0), "n_heads"),
    "model_config.dropout a list": (ck_set("model_config", dropout=[0.1]), "dropout"),
    "model_config an unknown field": (ck_set("model_config", evil=1), "evil"),
    "data.seq_len a string": (ck_set("data", seq_len="64"), "seq_len"),
    "data.data_dir an integer": (ck_set("data", data_dir=3), "data_dir"),
    "data.val_frac 2": (ck_set("data", val_frac=2.0), "val_frac"),
    "data.stride 0": (ck_set("data", stride=0), "stride"),
    "data.mask_ratio NaN": (ck_set("data", mask_ratio=float("nan")), "mask_ratio"),
    "data a list": (lambda ck: ck.__setitem__("data", [1]), "data"),
    "model_type a number": (lambda ck: ck.__setitem__("model_type", 3), None),
    "model not a dict": (lambda ck: ck.__setitem__("model", [1, 2]), "model"),
    "model values not tensors": (lambda ck: ck.__setitem__("model", {"a": 1}), "model"),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
@pytest.mark.parametrize("how", ["eval", "resume", "oracle", "representations"])
def test_hostile_checkpoints(world, tmp_path, capsys, name, how):
    edit, frag = CHECKPOINT_CASES[name]
    if how == "oracle" and not name.startswith(("data", "model_type")):
        pytest.skip("the oracle reads a checkpoint's data entry only")
    run = tmp_path / "run"
    run.mkdir()
    ck = checkpoint_variant(world["masked"], run / "last.pt", edit)
    cmd, argv = {"eval": ("masked", ["eval", ck, "--out-dir", str(tmp_path / "e")]),
                 "resume": ("masked", ["--resume", ck]),
                 "oracle": ("oracle", ["--checkpoint", ck]),
                 "representations": ("rep", ["--checkpoint", ck, "--out-dir", str(tmp_path / "o")])}[how]
    run_case(world, tmp_path, capsys, cmd, argv, frag)


def test_a_resumable_checkpoint_with_a_hostile_fit_state_is_refused(world, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for i, edit in enumerate([ck_set("fit_state", epoch="1"), ck_set("fit_state", history=3),
                              lambda ck: ck.pop("optimizer"), ck_set("fit_state", evil=1),
                              lambda ck: ck.__setitem__("loader_rng", [1])]):
        ck = checkpoint_variant(world["root"] / "m" / "last.pt", run / "last.pt", edit)
        run_case(world, tmp_path, capsys, "masked", ["--resume", ck], "resumed" if i == 2 else None)


def test_hostile_exports(world, tmp_path, capsys):
    from masked_model_gpu import MaskedTransformer, main as masked
    from training import TrainingError
    exp = tmp_path / "exp"
    assert masked(["eval", world["masked"], "--out-dir", str(tmp_path / "e"), "--no-plot", "--export",
                   str(exp)]) == 0
    MaskedTransformer.from_pretrained(str(exp))
    good = (exp / "config.json").read_text()
    for text, frag in ((deep(), "nested too deeply"), ('{"model_type": "masked_transformer", "model_config": '
                                                      '{"d_model": "x"}}', "d_model"),
                       ('{"model_type": "masked_transformer"}', "model_config")):
        (exp / "config.json").write_text(text)
        with pytest.raises(TrainingError, match=frag):
            MaskedTransformer.from_pretrained(str(exp))
    cfg = json.loads(good)
    cfg["export_id"] = "another export"
    (exp / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainingError, match="different exports"):
        MaskedTransformer.from_pretrained(str(exp))


# ----------------------------------------------------------------------------- 4. sizes

SIZE_CASES = {
    "masked --d-model 1e9": ("masked", lambda w, t: ["--data-dir", w["data"], "--out-dir", str(t / "r"),
                                                    *MASKED_TINY, "--d-model", "1000000000", "--n-heads", "1"],
                             "memory"),
    "masked --d-ff 1e10": ("masked", lambda w, t: ["--data-dir", w["data"], "--out-dir", str(t / "r"), *MASKED_TINY,
                                                   "--d-ff", "10000000000"], "memory"),
    "masked huge batch of long windows": ("masked", lambda w, t: ["--data-dir", w["data"], "--out-dir", str(t / "r"),
                                                                  *MASKED_TINY, "--seq-len", "200",
                                                                  "--batch-size", "100000000"], "memory"),
    "mamba --d-state 1e8": ("mamba", lambda w, t: ["train", "--data-dir", w["data"], "--out-dir", str(t / "r"),
                                                   *MAMBA_TINY, "--d-state", "100000000"], "memory"),
    "generate --gen-len 1e12": ("mamba", lambda w, t: ["generate", "--checkpoint", w["mamba"], "--gen-len",
                                                       "1000000000000", "--out-dir", str(t / "g")], "memory"),
    "generator --n-steps 1e12": ("gen", lambda w, t: ["--n-steps", "1000000000000", "--out-dir", str(t / "d"),
                                                      "--no-plot"], "memory"),
    "generator --ambient-dim 1e9": ("gen", lambda w, t: ["--out-dir", str(t / "d"), "--ambient-dim", "1000000000",
                                                         "--no-plot"], "memory"),
    "generator --n-circles 1e8": ("gen", lambda w, t: ["--out-dir", str(t / "d"), "--n-circles", "100000000",
                                                       "--no-plot"], "--n-circles"),
    "generator --dwell-mean 1e300": ("gen", lambda w, t: ["--out-dir", str(t / "d"), "--dwell-mean", "1e300",
                                                          "--no-plot"], "--dwell-mean"),
    "estimate_dimension --k 1e9": ("lb", lambda w, t: ["--data-dir", w["data"], "--out-dir", str(t / "o"),
                                                       "--k", "1000000000", "--no-plot"], "--k"),
    "convert an npy claiming 1e6 x 1e6": ("convert", lambda w, t: [str(t / "lie.npy"), "--out-dir", str(t / "c")],
                                          "claims"),
    "convert an npz claiming 1e6 x 1e6": ("convert", lambda w, t: [str(t / "lie.npz"), "--out-dir", str(t / "c")],
                                          "claims"),
    "a data folder whose X claims 1e6 x 1e6": ("masked", lambda w, t: ["--data-dir", str(t / "liedata"),
                                                                       "--out-dir", str(t / "r"), *MASKED_TINY],
                                               "claims"),
}


@pytest.mark.parametrize("name", sorted(SIZE_CASES))
def test_sizes_that_cannot_be_allocated(world, tmp_path, capsys, name):
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)})
    (tmp_path / "lie.npy").write_bytes(head.getvalue() + b"\0" * 64)
    npz_with_lying_header(tmp_path / "lie.npz")
    (tmp_path / "liedata").mkdir()
    npz_with_lying_header(tmp_path / "liedata" / "data.npz")
    cmd, argv, frag = SIZE_CASES[name]
    run_case(world, tmp_path, capsys, cmd, argv(world, tmp_path), frag)


# ----------------------------------------------------------------------------- 5. series and text input

def test_a_byte_order_mark_or_a_text_label_column_keeps_the_first_row(tmp_path):
    from dataset import read_series_file
    rows = [[0.5, 1.0, "a"], [1.5, 2.0, "b"], [2.5, 3.0, "a"]]
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.replace(",a", "").replace(",b", "").encode())
    X, lab, _ = read_series_file(str(tmp_path / "bom.csv"))
    assert X.shape == (3, 2) and X[0, 0] == 0.5
    (tmp_path / "lab.csv").write_text(text)
    X, lab, info = read_series_file(str(tmp_path / "lab.csv"), labels="2")
    assert X.shape == (3, 2) and list(lab) == [0, 1, 0] and info["label_names"] == ["a", "b"]
    (tmp_path / "head.csv").write_text("x,y,label\n" + text)
    X, lab, _ = read_series_file(str(tmp_path / "head.csv"), labels="label")
    assert X.shape == (3, 2) and X[0, 1] == 1.0
    (tmp_path / "bomhead.csv").write_bytes(b"\xef\xbb\xbf" + ("x,y,label\n" + text).encode())
    X, lab, _ = read_series_file(str(tmp_path / "bomhead.csv"), labels="label")
    assert X.shape == (3, 2)
    (tmp_path / "numhead.csv").write_text("1,2\n3,4\n5,6\n")
    assert read_series_file(str(tmp_path / "numhead.csv"), header="yes")[0].shape == (2, 2)
    assert read_series_file(str(tmp_path / "numhead.csv"))[0].shape == (3, 2)


def series_files(t):
    rng = np.random.default_rng(0)
    np.save(t / "zero_cols.npy", np.zeros((100, 0)))
    np.save(t / "one_row.npy", np.zeros((1, 3)))
    np.save(t / "three_d.npy", np.zeros((10, 2, 2)))
    np.save(t / "complex.npy", np.ones((10, 2), np.complex128))
    np.save(t / "structured.npy", np.zeros(10, dtype=[("a", "f4"), ("b", "i4")]))
    np.save(t / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(t / "huge.npy", np.full((10, 2), 1e300))
    np.save(t / "nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]]))
    np.save(t / "object.npy", np.array([[1, {}]], dtype=object), allow_pickle=True)
    np.savez(t / "nanlabels.npz", X=rng.normal(size=(10, 2)), labels=np.array([1.0, np.nan] * 5))
    np.savez(t / "shortlabels.npz", X=rng.normal(size=(10, 2)), labels=np.zeros(3))
    np.savez(t / "complexlabels.npz", X=rng.normal(size=(10, 2)), labels=np.ones(10, np.complex64))
    np.savez(t / "manylabels.npz", X=rng.normal(size=(20000, 2)), labels=np.arange(20000))
    np.savez(t / "two.npz", A=np.zeros((5, 2)), B=np.zeros((5, 2)))
    (t / "empty.csv").write_text("")
    (t / "blank.csv").write_text("\n\n  \n")
    (t / "header_only.csv").write_text("x,y\n")
    (t / "ragged.csv").write_text("1,2\n3\n4,5\n")
    (t / "text.csv").write_text("a,b\nc,d\ne,f\n")
    (t / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (t / "nan.csv").write_text("1,2\nnan,3\n4,5\n")
    (t / "inf.csv").write_text("1,2\n1e400,3\n4,5\n")
    (t / "big.csv").write_text("1,2\n1e39,3\n4,5\n")
    (t / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    (t / "notes.txt").write_text("1,2\n3,4\n")
    (t / "folder.csv").mkdir()
    (t / "bad_label.csv").write_text("1,2,a\n3,4,b\n")


SERIES_CASES = {
    "zero_cols.npy": (None, "D >= 1"), "one_row.npy": (None, "T >= 2"), "three_d.npy": (None, "T x D"),
    "complex.npy": (None, "real numbers"), "structured.npy": (None, "real numbers"),
    "strings.npy": (None, "real numbers"), "huge.npy": (None, "float32"), "nan.npy": (None, "NaN"),
    "object.npy": (None, "Python objects"), "nanlabels.npz": (None, "NaN"), "shortlabels.npz": (None, "labels"),
    "complexlabels.npz": (None, "labels"), "manylabels.npz": (None, "distinct values"),
    "two.npz": (None, "name the features X"), "empty.csv": (None, "no rows"), "blank.csv": (None, "no rows"),
    "header_only.csv": (None, "no data rows"), "ragged.csv": (None, "columns"), "text.csv": (None, "not a number"),
    "binary.csv": (None, "UTF-8"), "nan.csv": (None, "NaN"), "inf.csv": (None, "infinite"),
    "big.csv": (None, "float32"), "bad.npz": (None, "npz"), "notes.txt": (None, ".npy, .npz or .csv"),
    "folder.csv": (None, "folder"), "missing.csv": (None, "not found"), "bad_label.csv": ("7", "not a column"),
}


@pytest.mark.parametrize("name", sorted(SERIES_CASES))
def test_hostile_series_files(world, tmp_path, capsys, name):
    series_files(tmp_path)
    labels, frag = SERIES_CASES[name]
    argv = [str(tmp_path / name), "--out-dir", str(tmp_path / "out")] + (["--labels", labels] if labels else [])
    run_case(world, tmp_path, capsys, "convert", argv, frag)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("labels", ["one class", "all distinct"])
def test_degenerate_labels_skip_the_label_metrics_with_a_note(world, tmp_path, capsys, labels):
    from dataset import main as convert
    from evaluate_representations import main as rep
    from masked_model_gpu import main as masked
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4)).astype(np.float32)
    lab = np.zeros(3000, np.int64) if labels == "one class" else np.arange(3000) % 2000
    np.savez(tmp_path / "s.npz", X=X, labels=lab)
    assert convert([str(tmp_path / "s.npz"), "--out-dir", str(tmp_path / "d")]) == 0
    assert masked(["--data-dir", str(tmp_path / "d"), "--out-dir", str(tmp_path / "r"), *MASKED_TINY,
                   "--no-plot"]) == 0
    capsys.readouterr()
    assert rep(["--checkpoint", str(tmp_path / "r" / "best.pt"), "--no-umap", "--no-plot", "--lb-points", "200"]) == 0
    assert "skipped" in capsys.readouterr().out
    res = json.loads((tmp_path / "r" / "representations" / "representation_metrics.json").read_text())
    assert all("label_metrics_skipped" in r and "kmeans_ari" not in r for r in res["layers"].values())
    no_unnamed_nan(tmp_path)


# ----------------------------------------------------------------------------- 8. writes a kill can tear

class Killed(BaseException):
    """Stands for SIGKILL: nothing in the program catches it."""


def kill_at(monkeypatch, n):
    """os.replace raises Killed at its n-th call: the temporary file is whole but never renamed, as
    when a process dies between writing and renaming (a torn write leaves the same on disk)."""
    real = os.replace
    count = [0]

    def dying(a, b, *args, **kw):
        count[0] += 1
        if count[0] == n:
            raise Killed()
        return real(a, b, *args, **kw)
    monkeypatch.setattr(os, "replace", dying)
    return count


def count_writes(monkeypatch, fn):
    c = kill_at(monkeypatch, 10 ** 9)
    assert fn() == 0
    monkeypatch.undo()
    return c[0]


WRITERS = {
    "generator": lambda w, t: ("gen", ["--n-steps", "3000", "--out-dir", str(t / "out"), "--no-plot"]),
    "convert": lambda w, t: ("convert", [str(t / "s.csv"), "--out-dir", str(t / "out")]),
    "estimate_dimension": lambda w, t: ("lb", ["--data-dir", w["data"], "--out-dir", str(t / "out"), "--plots-dir",
                                               str(t / "figs"), "--points", "400", "--n-boot", "10"]),
    "generate": lambda w, t: ("mamba", ["generate", "--checkpoint", w["mamba"], "--gen-len", "16", "--out-dir",
                                        str(t / "out"), "--plots-dir", str(t / "figs")]),
    "gates": lambda w, t: ("mamba", ["gates", "--checkpoint", w["mamba"], "--samples", "2", "--out-dir",
                                     str(t / "out"), "--plots-dir", str(t / "figs"), "--plot-samples", "0"]),
    "oracle": lambda w, t: ("oracle", ["--checkpoint", w["masked"], "--out-dir", str(t / "out")]),
    "eval": lambda w, t: ("masked", ["eval", w["masked"], "--out-dir", str(t / "out"), "--no-plot",
                                     "--export", str(t / "out" / "export")]),
}


def json_numbers(folder):
    """The JSON files of a folder, without the entries that differ between two identical runs."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".json") and not f.startswith("."):
            d = json.load(open(os.path.join(folder, f)))
            for k in ("seconds", "steps_per_second", "generation", "seconds_extract", "seconds_to_metrics"):
                d.pop(k, None) if isinstance(d, dict) else None
            for v in d.values() if isinstance(d, dict) else []:
                if isinstance(v, dict):
                    v.pop("seconds", None)
            out[f] = d
    return out


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_a_kill_at_every_write_then_a_rerun(world, tmp_path, capsys, monkeypatch, name):
    """Killed at each of its writes, then run again: the rerun finishes (or says exactly what to do,
    and with that done finishes) and ends with the files of an uninterrupted run."""
    (tmp_path / "s.csv").write_text("".join(f"{i},{i % 7},{(i * 3) % 5}\n" for i in range(200)))
    cmd, argv = WRITERS[name](world, tmp_path)
    main = commands()[cmd]
    n = count_writes(monkeypatch, lambda: main(argv))
    assert n >= 2
    ref = json_numbers(tmp_path / "out")
    ref_files = sorted(f for f in snapshot(tmp_path / "out") if not f.startswith("."))
    for k in range(1, n + 1):
        for d in ("out", "figs"):
            shutil.rmtree(tmp_path / d, ignore_errors=True)
        kill_at(monkeypatch, k)
        with pytest.raises(Killed):
            main(argv)
        monkeypatch.undo()
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        if rc != 0:   # it says what to do, in one line, and doing it finishes the run
            one_line_failure(rc, err, "--force")
            assert main(argv + ["--force"]) == 0, k
        assert json_numbers(tmp_path / "out") == ref, k
        assert sorted(f for f in snapshot(tmp_path / "out") if not f.startswith(".")) == ref_files, k
        no_unnamed_nan(tmp_path / "out")


def test_a_real_sigkill_of_the_generator_leaves_a_folder_that_reruns(tmp_path):
    """A subprocess killed with SIGKILL at random instants of writing a large folder: every rerun
    either finishes or refuses with one line naming the fix; no reader ever sees a mix."""
    import signal
    import subprocess
    import sys
    import time
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "markov_circles_timeseries.py", "--n-steps", "400000", "--out-dir", str(tmp_path / "d"),
           "--no-plot"]
    for delay in (0.3, 0.6, 0.9, 1.2):
        p = subprocess.Popen(cmd + ["--seed", str(int(delay * 10)), "--force"], cwd=root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if (tmp_path / "d" / "data.npz").exists():
            from dataset import load_series
            from safeio import InputError
            try:
                s = load_series(str(tmp_path / "d"))
                assert s.config["seed"] in (0, 3, 6, 9, 12) and len(s.X) == 400000
            except InputError as e:
                assert "--force" in str(e)
    r = subprocess.run(cmd + ["--seed", "5", "--force"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
