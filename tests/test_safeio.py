"""safeio: atomic writes, strict JSON, hostile reads, claims with a manifest, one-line errors."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import safeio
from safeio import InputError, Outputs, OutputsExist


def test_atomic_write_keeps_the_old_file_on_an_error_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    safeio.write_json(str(p), {"x": 1})
    with pytest.raises(RuntimeError):
        with safeio.atomic(str(p)) as f:
            f.write('{"x": 2')
            raise RuntimeError("killed")
    assert json.loads(p.read_text()) == {"x": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = safeio.write_text(str(tmp_path / "t.txt"), "hi")
    finally:
        os.umask(old)
    assert oct(os.stat(p).st_mode & 0o777) == oct(0o644)


def test_a_kill_during_a_write_leaves_the_old_file_whole(tmp_path):
    """A writer killed with SIGKILL in the middle of a large write: the target still parses."""
    p = tmp_path / "big.json"
    safeio.write_json(str(p), {"old": True})
    code = ("import safeio, sys, os, signal\n"
            "with safeio.atomic(sys.argv[1]) as f:\n"
            "    f.write('[' + '1,' * 1000000)\n"
            "    f.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(p)], cwd=os.path.dirname(safeio.__file__))
    assert r.returncode == -signal.SIGKILL
    assert json.loads(p.read_text()) == {"old": True}
    left = [n for n in os.listdir(tmp_path) if n != "big.json"]
    assert len(left) == 1 and safeio.is_temporary(left[0])
    assert safeio.remove_temporaries(str(tmp_path)) == left and os.listdir(tmp_path) == ["big.json"]


def test_strict_json_names_every_non_finite_value(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": np.float32("nan"), "e": np.arange(2)}, "ok": 2.5}
    p = safeio.write_json(str(tmp_path / "x.json"), obj)
    text = open(p).read()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["a"] is None and back["b"] == [1.0, None] and back["c"]["d"] is None and back["c"]["e"] == [0, 1]
    assert back["nonfinite"] == ["a", "b[1]", "c.d"]
    assert "nonfinite" not in json.loads(open(safeio.write_json(str(tmp_path / "y.json"), {"a": 1.0})).read())


@pytest.mark.parametrize("content, fragment", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe\x00binary", "not UTF-8"),
    ("[1, 2]", "not an object"),
])
def test_read_json_refuses_hostile_files_with_one_line(tmp_path, content, fragment):
    p = tmp_path / "config.json"
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    with pytest.raises(InputError) as e:
        safeio.read_json(str(p), "data config", kind=dict)
    assert fragment in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_read_json_refuses_folders_missing_and_oversized_files(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        safeio.read_json(str(tmp_path))
    with pytest.raises(InputError, match="not found"):
        safeio.read_json(str(tmp_path / "nope.json"))
    (tmp_path / "big.json").write_text("[" + "0," * 100 + "0]")
    with pytest.raises(InputError, match="more than"):
        safeio.read_json(str(tmp_path / "big.json"), max_bytes=50)


def test_check_field_types_and_ranges():
    cfg = {"n": 3, "x": 2.5, "flag": True, "s": "a", "bad": float("nan"), "b": True}
    assert safeio.check_field(cfg, "n", int, "f", lo=1) == 3
    assert safeio.check_field(cfg, "x", float, "f", lo=0) == 2.5
    assert safeio.check_field(cfg, "n", float, "f") == 3          # an integer is a number
    for key, kinds, kw, frag in [("n", int, {"hi": 2}, "<= 2"), ("x", int, {}, "an integer"),
                                 ("bad", float, {}, "a number"), ("b", int, {}, "an integer"),
                                 ("s", str, {"choices": ("b",)}, "one of"), ("missing", int, {}, "missing"),
                                 ("x", float, {"lo": 2.5, "open_lo": True}, "> 2.5")]:
        with pytest.raises(InputError, match=frag):
            safeio.check_field(cfg, key, kinds, "cfg.json", **kw)
    assert safeio.check_field(cfg, "missing", int, "f", required=False) is None


def test_dataclass_fields_are_checked_against_their_annotations():
    from dataclasses import dataclass

    @dataclass
    class C:
        a: int = 1
        b: float = 1.0
        c: str | None = None
        d: bool = False
    assert safeio.check_dataclass_fields(C, {"a": 2, "b": 3, "c": None, "d": True}, "w")
    for bad in ({"a": "2"}, {"b": "x"}, {"c": 3}, {"d": 1}, {"e": 1}, {"a": 1.5}):
        with pytest.raises(InputError):
            safeio.check_dataclass_fields(C, bad, "ckpt")


def test_npy_and_npz_headers_that_lie_about_their_size_are_refused_before_allocating(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    good = tmp_path / "a.npy"
    np.save(good, a)
    assert np.array_equal(safeio.load_npy(str(good)), a)
    import io
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    lying = tmp_path / "lie.npy"
    lying.write_bytes(head.getvalue() + a.tobytes())   # claims 4 TB, holds 48 bytes
    with pytest.raises(InputError, match="claims"):
        safeio.load_npy(str(lying))
    z = tmp_path / "a.npz"
    import zipfile
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("X.npy", lying.read_bytes())
    with pytest.raises(InputError, match="claims"):
        safeio.load_npz(str(z))
    np.savez(tmp_path / "ok.npz", X=a)
    assert np.array_equal(safeio.load_npz(str(tmp_path / "ok.npz"))["X"], a)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="Python objects"):
        safeio.load_npy(str(tmp_path / "obj.npy"))


def test_output_dir_refuses_files_and_unwritable_folders(tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(InputError, match="is a file"):
        safeio.output_dir(str(f))
    with pytest.raises(InputError, match="is a file"):
        safeio.output_dir(str(f / "sub"))
    assert f.read_text() == "mine"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):   # root writes anywhere: nothing to check
            pytest.skip("running as root")
        with pytest.raises(InputError, match="not writable"):
            safeio.output_dir(str(ro / "x"))
    finally:
        ro.chmod(0o755)
    assert safeio.output_dir(str(tmp_path / "new" / "deep")) and (tmp_path / "new" / "deep").is_dir()


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "", "x" * 300, "a\0b", "/etc"])
def test_plain_names_refuse_paths(name):
    with pytest.raises(InputError):
        safeio.plain_name(name, "--name")


def test_inside_refuses_escapes(tmp_path):
    (tmp_path / "m").mkdir()
    os.symlink("/etc", tmp_path / "m" / "link")
    assert safeio.inside(str(tmp_path / "m"), "a.safetensors", "shard").endswith("a.safetensors")
    for rel in ("../other", "/etc/passwd", "link/passwd", "a/../../x"):
        with pytest.raises(InputError):
            safeio.inside(str(tmp_path / "m"), rel, "shard")


def test_check_fits_names_the_sizes():
    with pytest.raises(InputError, match="needs about"):
        safeio.check_fits(1 << 60, "the model", "use a smaller --d-model")
    safeio.check_fits(1024, "a tiny array", "")


def test_claims_refuse_then_force_removes_only_declared_and_recorded_files(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.png").write_text("user's own")
    (out / "gates_0.png").write_text("user's own, same pattern")
    o = Outputs("cmd", force=False)
    o.claim([str(out / "a.json")])
    safeio.write_json(o.target(str(out / "a.json")), {})
    open(o.target(str(out / "fig_7.png")), "w").write("old figure")
    # a rerun declaring other figure names: refused (earlier outputs of the command exist)
    with pytest.raises(OutputsExist, match="--force"):
        Outputs("cmd", force=False).claim([str(out / "a.json"), str(out / "fig_1.png")])
    with pytest.raises(OutputsExist):
        Outputs("cmd", force=False).claim([str(out / "fig_1.png")])
    found = Outputs("cmd", force=True).claim([str(out / "a.json"), str(out / "fig_1.png")])
    assert sorted(os.path.basename(p) for p in found) == ["a.json", "fig_7.png"]
    assert sorted(os.listdir(out)) == sorted(["mine.png", "gates_0.png", safeio.MANIFEST])
    # another key's records are left alone
    o2 = Outputs("other", force=False)
    open(o2.target(str(out / "b.txt")), "w").write("b")
    Outputs("cmd", force=True).claim([str(out / "a.json")])
    assert (out / "b.txt").exists()


def test_another_commands_file_is_never_replaced_unless_declared_derived(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    analysis = Outputs("analysis", force=False)
    analysis.claim([str(out / "report.json")])
    safeio.write_json(analysis.target(str(out / "report.json")), {"x": 1})
    # a command that would write the same file: refused, --force or not
    for force in (False, True):
        with pytest.raises(OutputsExist, match="another command"):
            Outputs("train", force=force).claim([str(out / "report.json")])
    assert (out / "report.json").exists()
    # a command that replaces what the analysis describes: the file is its to remove with --force only
    with pytest.raises(OutputsExist, match="--force"):
        Outputs("train", force=False).claim([str(out / "model.bin")], derived=[str(out / "report.json")])
    found = Outputs("train", force=True).claim([str(out / "model.bin")], derived=[str(out / "report.json")])
    assert [os.path.basename(p) for p in found] == ["report.json"] and not (out / "report.json").exists()
    assert safeio.recorded("analysis", str(out)) == []      # forgotten by the key that wrote it
    # a file deleted by hand and written again by another command belongs to that command only
    first = Outputs("first", force=False)
    first.claim([str(out / "x.json")])
    safeio.write_json(first.target(str(out / "x.json")), {})
    os.remove(out / "x.json")
    second = Outputs("second", force=False)
    second.claim([str(out / "x.json")])
    safeio.write_json(second.target(str(out / "x.json")), {"mine": 2})
    assert safeio.recorded_by(str(out / "x.json")) == {"second"}
    with pytest.raises(OutputsExist, match="another command"):
        Outputs("first", force=True).claim([str(out / "x.json")])
    assert json.loads((out / "x.json").read_text()) == {"mine": 2}


def test_a_hostile_manifest_never_removes_files_outside_its_folder(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (out / safeio.MANIFEST).write_text(json.dumps({"cmd": ["../victim.txt", str(victim), "ok.txt"]}))
    (out / "ok.txt").write_text("mine to remove")
    Outputs("cmd", force=True).claim([], folders=[str(out)])
    assert victim.read_text() == "keep" and not (out / "ok.txt").exists()
    (out / safeio.MANIFEST).write_text("[" * 50000)
    Outputs("cmd", force=True).claim([str(out / "x")])


def test_one_line_errors_turn_user_errors_into_one_line_and_keep_bugs(capsys):
    @safeio.one_line_errors()
    def bad_input(argv=None):
        raise InputError("the field 'x' is wrong\nsecond line")

    @safeio.one_line_errors()
    def no_space(argv=None):
        raise MemoryError()

    @safeio.one_line_errors()
    def unwritable(argv=None):
        raise PermissionError(13, "Permission denied", "/root/x")

    @safeio.one_line_errors()
    def bug(argv=None):
        raise KeyError("bug")

    for f, frag in ((bad_input, "the field 'x' is wrong"), (no_space, "not enough memory"),
                    (unwritable, "Permission denied")):
        assert f() == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and frag in err and err.startswith("error: ")
    with pytest.raises(KeyError):
        bug()
