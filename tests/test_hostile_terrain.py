"""Hostile and careless input to the terrain stages (issue 27), as tables of tiny cases run
in-process through each stage's main(): every input either stops with exactly one stderr line
"error: ..." (exit status 2, no traceback, nothing in the folders changed) or does the right
thing; no NaN reaches a JSON unnamed; --force removes only what the stage wrote for that model;
a run killed while writing is continued, or refused with the fix, by the rerun.

The hostile checkpoints are written by hand (8-byte header length, JSON header, raw data) so
that every field of the header can be wrong on its own; the tiny BERT has its own 280-token
WordPiece vocabulary, so a full stage run takes about a second."""
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

import safeio
from terrain import embeddings, layers, modulate, project, weights, wordnet
from terrain.cli import model_tag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q = "encoder.layer.0.attention.self.query.weight"
K = "encoder.layer.0.attention.self.key.weight"
V = "encoder.layer.0.attention.self.value.weight"
EMB = "embeddings.word_embeddings.weight"
LN = "encoder.layer.0.attention.output.LayerNorm.weight"
HAND_CONFIG = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 4, "num_attention_heads": 2,
               "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 6}


# ----------------------------------------------------------------------------- helpers

def st_file(tensors: dict, mutate=None, raw: bytes | None = None) -> bytes:
    """A safetensors file of float32 tensors; mutate(header) edits the header dict first, raw
    replaces the header bytes."""
    header, data = {}, b""
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(a)), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    if mutate is not None:
        mutate(header)
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def hand_tensors(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {EMB: rng.standard_normal((6, 4)), Q: rng.standard_normal((4, 4)), K: rng.standard_normal((4, 4))}


def hand_folder(path, content: bytes | None = None, config: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(HAND_CONFIG if config is None else config))
    (path / "model.safetensors").write_bytes(st_file(hand_tensors()) if content is None else content)
    return path


def snapshot(root) -> dict:
    """Every file below root (hidden ones included) with its bytes; links as their target."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[rel] = f.read() if os.path.getsize(p) < 1 << 20 else ("size", os.path.getsize(p))
            else:
                out[rel] = "dir"
    return out


def run(main, argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, *fragments):
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def strict_json(path) -> dict:
    """A JSON file parsed strictly: NaN / Infinity tokens fail the test."""
    def refuse(token):
        raise AssertionError(f"{path}: {token} written into JSON")
    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


def refused_and_untouched(tmp_path, main, argv, capsys, *fragments):
    before = snapshot(tmp_path)
    code, _, err = run(main, argv, capsys)
    one_line(code, err, *fragments)
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 1-layer BERT (width 16) with a 280-token WordPiece vocabulary: the digits, the
    embedding probe's category words, 150 filler words; [PAD]'s row is zero, as BERT initialises it."""
    import torch
    import transformers as tf
    words = sorted({w for ws in embeddings.CATEGORIES.values() for w in ws.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [str(i) for i in range(10)] + words + \
        [f"z{a}{b}" for a in "abcdefghij" for b in "abcdefghijklmnop"][:150] + ["the", "a", "."]
    folder = tmp_path_factory.mktemp("tinybert")
    tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    tf.BertModel(cfg).save_pretrained(folder)
    return folder


def variant(tiny, dst, change: dict):
    """A copy of the tiny model whose tensors are changed: change[name](array) -> array."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(tiny, dst)
    sd = load_file(str(dst / "model.safetensors"))
    for name, fn in change.items():
        sd[name] = np.ascontiguousarray(fn(sd[name].copy()))
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst, sd


# ----------------------------------------------------------------------------- class 3: safetensors headers

def _set(name, key, value):
    def mutate(h):
        h[name][key] = value
    return mutate


def _drop(name, key):
    def mutate(h):
        del h[name][key]
    return mutate


def _replace(name, value):
    def mutate(h):
        h[name] = value
    return mutate


def _overlap(h):
    h[K]["data_offsets"] = list(h[Q]["data_offsets"])


def _metadata(value):
    def mutate(h):
        h["__metadata__"] = value
    return mutate


DEEP = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
HEADER_CASES = {
    "list header": dict(raw=b"[]"),
    "string header": dict(raw=b'"tensors"'),
    "number header": dict(raw=b"12"),
    "null header": dict(raw=b"null"),
    "empty header": dict(raw=b"{}"),
    "deep nesting": dict(raw=DEEP),
    "deep list nesting": dict(raw=b"[" * 50_000 + b"]" * 50_000),
    "not UTF-8": dict(raw=b'{"\xff\xfe": 1}'),
    "invalid JSON": dict(raw=b'{"a": '),
    "NaN offsets": dict(raw=b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [NaN, 4]}}'),
    "entry is a string": dict(mutate=_replace(Q, "F32")),
    "entry is a list": dict(mutate=_replace(Q, [1, 2])),
    "entry is null": dict(mutate=_replace(Q, None)),
    "missing shape": dict(mutate=_drop(Q, "shape")),
    "shape is a string": dict(mutate=_set(Q, "shape", "4,4")),
    "shape of strings": dict(mutate=_set(Q, "shape", ["4", "4"])),
    "shape of floats": dict(mutate=_set(Q, "shape", [4.0, 4.0])),
    "shape of booleans": dict(mutate=_set(Q, "shape", [True, 16])),
    "negative shape": dict(mutate=_set(Q, "shape", [-4, -4])),   # product 16: the old parser took it
    "shape is an object": dict(mutate=_set(Q, "shape", {"0": 4})),
    "product overflows int64 to 0": dict(mutate=lambda h: h[EMB].update(shape=[2 ** 62, 4], data_offsets=[0, 0])),
    "huge dimension": dict(mutate=_set(Q, "shape", [10 ** 30, 4])),
    "unknown dtype": dict(mutate=_set(Q, "dtype", "F128")),
    "dtype is a number": dict(mutate=_set(Q, "dtype", 4)),
    "missing dtype": dict(mutate=_drop(Q, "dtype")),
    "missing offsets": dict(mutate=_drop(Q, "data_offsets")),
    "three offsets": dict(mutate=_set(Q, "data_offsets", [96, 160, 160])),
    "reversed offsets": dict(mutate=_set(Q, "data_offsets", [160, 96])),
    "negative offsets": dict(mutate=_set(Q, "data_offsets", [-64, 0])),
    "string offsets": dict(mutate=_set(Q, "data_offsets", ["96", "160"])),
    "float offsets": dict(mutate=_set(Q, "data_offsets", [96.0, 160.0])),
    "offsets past the end": dict(mutate=lambda h: h[Q].update(shape=[250_000], data_offsets=[0, 1_000_000])),
    "wrong byte count": dict(mutate=_set(Q, "shape", [4, 5])),
    "overlapping tensors": dict(mutate=_overlap),
    "metadata is a list": dict(mutate=_metadata([1])),
    "metadata values nested": dict(mutate=_metadata({"format": {"a": 1}})),
}
FILE_CASES = {
    "empty file": b"",
    "seven bytes": b"\x01" * 7,
    "header length past the end": struct.pack("<Q", 10 ** 6) + b"{}",
    "header length 2^63": struct.pack("<Q", 2 ** 63) + b"{}",
    "header length 0": struct.pack("<Q", 0),
}


@pytest.mark.parametrize("case", list(HEADER_CASES) + list(FILE_CASES))
def test_hostile_safetensors_headers_are_one_line(case, tmp_path, capsys):
    content = FILE_CASES[case] if case in FILE_CASES else st_file(hand_tensors(), **HEADER_CASES[case])
    model = hand_folder(tmp_path / "m", content)
    refused_and_untouched(tmp_path, weights.main, ["--model", model, "--out-dir", tmp_path / "o"], capsys,
                          "model.safetensors")


def test_the_hand_made_checkpoint_is_valid(tmp_path, capsys):
    """The baseline every header case breaks one field of: it runs, and the reader returns its numbers."""
    from terrain.checkpoint import SafetensorsWeights
    model = hand_folder(tmp_path / "m")
    code, _, err = run(weights.main, ["--model", model, "--out-dir", tmp_path / "o", "--no-plot"], capsys)
    assert code == 0, err
    src = SafetensorsWeights(str(model))
    for name, a in hand_tensors().items():
        np.testing.assert_array_equal(src.read(name), a.astype(np.float32))
    res = strict_json(next((tmp_path / "o").glob("weights_*.json")))
    q = np.linalg.svd(hand_tensors()[Q], compute_uv=False)
    assert res["matrices"][Q]["stable_rank"] == pytest.approx(np.sum(q ** 2) / q[0] ** 2, rel=1e-6)


@pytest.mark.parametrize("shape", [[], [16], [2, 4, 2], [0, 4]])
def test_a_tensor_of_the_wrong_rank_is_named_and_left_out(shape, tmp_path, capsys):
    """A query 'matrix' stored as a scalar, a vector, a 3-D or an empty array: valid safetensors,
    not a matrix of its role. The weight battery names it and analyses the rest; the embedding
    probe, given such an embedding, says there is none."""
    t = hand_tensors()
    t[Q] = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    model = hand_folder(tmp_path / "m", st_file(t))
    code, _, err = run(weights.main, ["--model", model, "--out-dir", tmp_path / "o", "--no-plot"], capsys)
    assert code == 0, err
    res = strict_json(next((tmp_path / "o").glob("weights_*.json")))
    assert Q not in res["matrices"] and K in res["matrices"]
    assert any(Q in n and "not analysed" in n for n in res["notes"]) and Q in err
    t = hand_tensors()
    t[EMB] = np.ones(shape, dtype=np.float32)
    hand_folder(tmp_path / "e", st_file(t))
    refused_and_untouched(tmp_path, embeddings.main, ["--model", tmp_path / "e", "--out-dir", tmp_path / "o2"],
                          capsys, "no token embedding")


@pytest.mark.parametrize("case", ["list header", "product overflows int64 to 0", "deep nesting",
                                  "overlapping tensors", "negative shape"])
@pytest.mark.parametrize("stage", ["embeddings", "layers"])
def test_hostile_headers_stop_every_stage_that_reads_weights(stage, case, tmp_path, capsys):
    """The embedding probe reads the header itself; layers lets transformers load the folder, after
    the same strict check of the headers (the safetensors library would accept some of these)."""
    model = hand_folder(tmp_path / "m", st_file(hand_tensors(), **HEADER_CASES[case]))
    main = {"embeddings": embeddings.main, "layers": layers.main}[stage]
    refused_and_untouched(tmp_path, main, ["--model", model, "--out-dir", tmp_path / "o"], capsys,
                          "model.safetensors")


# ----------------------------------------------------------------------------- class 3: shard index

def sharded(tmp_path):
    """config.json, a.safetensors (the embedding), b.safetensors (query and key) and their index;
    a valid shard outside the folder (the target of the hostile names)."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HAND_CONFIG))
    t = hand_tensors()
    (model / "a.safetensors").write_bytes(st_file({EMB: t[EMB]}))
    (model / "b.safetensors").write_bytes(st_file({Q: t[Q], K: t[K]}))
    index = {"metadata": {}, "weight_map": {EMB: "a.safetensors", Q: "b.safetensors", K: "b.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "outside.safetensors").write_bytes(st_file({K: t[K]}))
    return model, index


def _index(change):
    def apply(model, index):
        new = change(json.loads(json.dumps(index)), model)
        p = model / "model.safetensors.index.json"
        p.write_bytes(new) if isinstance(new, bytes) else p.write_text(json.dumps(new))
    return apply


def _map(value):
    return _index(lambda idx, m: {**idx, "weight_map": {**idx["weight_map"], K: value}})


def _link(model, index):
    os.symlink(model.parent / "outside.safetensors", model / "link.safetensors")
    _map("link.safetensors")(model, index)


def _subfolder(model, index):
    (model / "sub").mkdir()
    _map("sub")(model, index)


def _no_index_folder(model, index):
    os.remove(model / "model.safetensors.index.json")
    (model / "c.safetensors").mkdir()


def _no_index_link(model, index):
    os.remove(model / "model.safetensors.index.json")
    os.symlink(model.parent / "outside.safetensors", model / "c.safetensors")


def _twice(model, index):
    (model / "a.safetensors").write_bytes(st_file({EMB: hand_tensors()[EMB], Q: hand_tensors()[Q]}))


INDEX_CASES = {
    "parent path": (_map("../outside.safetensors"), "outside"),
    "absolute path": (lambda m, i: _map(str(m.parent / "outside.safetensors"))(m, i), "outside"),
    "/etc/passwd": (_map("/etc/passwd"), "passwd"),
    "dotdot inside a name": (_map("sub/../../outside.safetensors"), "outside"),
    "link out of the folder": (_link, "link.safetensors"),
    "shard is a folder": (_subfolder, "sub"),
    "missing shard": (_map("c.safetensors"), "missing"),
    "weight_map is a list": (_index(lambda i, m: {**i, "weight_map": ["a.safetensors"]}), "weight_map"),
    "weight_map value a number": (_map(7), "weight_map"),
    "weight_map value null": (_map(None), "weight_map"),
    "weight_map value empty": (_map(""), "index"),
    "weight_map empty": (_index(lambda i, m: {**i, "weight_map": {}}), "weight_map"),
    "no weight_map": (_index(lambda i, m: {"metadata": {}}), "weight_map"),
    "index is a list": (_index(lambda i, m: [i]), "model.safetensors.index.json"),
    "index nested deeply": (_index(lambda i, m: DEEP), "model.safetensors.index.json"),
    "index not UTF-8": (_index(lambda i, m: b"\xff\xfe\x00\x01"), "model.safetensors.index.json"),
    "index is a folder": (lambda m, i: (os.remove(m / "model.safetensors.index.json"),
                                        (m / "model.safetensors.index.json").mkdir()), "folder"),
    "no index, a folder named .safetensors": (_no_index_folder, "c.safetensors"),
    "no index, a link out of the folder": (_no_index_link, "c.safetensors"),
    "tensor in two shards": (_twice, "twice"),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_hostile_shard_index_is_one_line(case, tmp_path, capsys):
    model, index = sharded(tmp_path)
    change, fragment = INDEX_CASES[case]
    change(model, index)
    refused_and_untouched(tmp_path, weights.main, ["--model", model, "--out-dir", tmp_path / "o"], capsys, fragment)


def test_the_sharded_baseline_is_valid(tmp_path, capsys):
    model, _ = sharded(tmp_path)
    code, _, err = run(weights.main, ["--model", model, "--out-dir", tmp_path / "o", "--no-plot"], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------- class 3: config.json

def _cfg(**change):
    def apply(cfg):
        cfg.update(change)
        return cfg
    return apply


CONFIG_CASES = {
    "nested deeply": (lambda c: DEEP, "config.json"),
    "a list": (lambda c: [c], "config.json"),
    "not UTF-8": (lambda c: b"\xff\xfe\x00\x01", "config.json"),
    "empty file": (lambda c: b"", "config.json"),
    "invalid JSON": (lambda c: b'{"model_type": "bert",', "config.json"),
    "heads zero": (_cfg(num_attention_heads=0), "num_attention_heads"),
    "heads a string": (_cfg(num_attention_heads="2"), "num_attention_heads"),
    "heads true": (_cfg(num_attention_heads=True), "num_attention_heads"),
    "heads negative": (_cfg(num_attention_heads=-2), "num_attention_heads"),
    "heads a float": (_cfg(num_attention_heads=2.5), "num_attention_heads"),
    "heads a list": (_cfg(num_attention_heads=[2]), "num_attention_heads"),
    "hidden size zero": (_cfg(hidden_size=0), "hidden_size"),
    "hidden size huge": (_cfg(hidden_size=10 ** 12), "hidden_size"),
    "hidden size NaN": (lambda c: json.dumps({**c, "hidden_size": 1}).replace('"hidden_size": 1', '"hidden_size": NaN')
                        .encode(), "hidden_size"),
    "width below the heads": (_cfg(hidden_size=1), "num_attention_heads"),
    "key-value heads not a divisor": (_cfg(num_key_value_heads=3), "num_key_value_heads"),
    "head_dim zero": (_cfg(head_dim=0), "head_dim"),
    "layers negative": (_cfg(num_hidden_layers=-1), "num_hidden_layers"),
    "model_type a number": (_cfg(model_type=5), "model_type"),
    "architectures of numbers": (_cfg(architectures=[5]), "architectures"),
    "text_config a string": (_cfg(text_config="bert"), "text_config"),
    "sub-config heads zero": (_cfg(text_config={"num_attention_heads": 0, "hidden_size": 4}), "num_attention_heads"),
    "relative distance huge": (_cfg(relative_attention_max_distance=10 ** 12), "relative_attention_max_distance"),
    "unknown family": (_cfg(model_type="no-such-family"), "family"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_hostile_config_is_one_line_naming_the_field(case, tmp_path, capsys):
    model = hand_folder(tmp_path / "m")
    change, fragment = CONFIG_CASES[case]
    new = change(dict(HAND_CONFIG))
    p = model / "config.json"
    p.write_bytes(new) if isinstance(new, bytes) else p.write_text(json.dumps(new))
    refused_and_untouched(tmp_path, weights.main, ["--model", model, "--out-dir", tmp_path / "o"], capsys, fragment)


def test_config_fields_are_checked_before_transformers_builds_the_model(tiny, tmp_path, capsys):
    """layers instantiates the model: a config that transformers would build with 0 layers, or
    divide by 0 heads in, stops first with the field named."""
    for field, value in (("num_hidden_layers", -1), ("num_attention_heads", 0), ("hidden_size", "16")):
        model = tmp_path / f"m_{field}"
        shutil.copytree(tiny, model)
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, field: value}))
        refused_and_untouched(tmp_path, layers.main, ["--model", model, "--out-dir", tmp_path / "o"], capsys, field)


@pytest.mark.parametrize("file, content", [
    ("tokenizer_config.json", DEEP), ("tokenizer_config.json", b"\xff\xfe"), ("tokenizer.json", b"[1, 2"),
    ("tokenizer.json", b"[]")])
def test_hostile_tokenizer_files_are_one_line(tiny, tmp_path, capsys, file, content):
    model = tmp_path / "m"
    shutil.copytree(tiny, model)
    (model / file).write_bytes(content)
    refused_and_untouched(tmp_path, embeddings.main, ["--model", model, "--n-simplices", "20", "--out-dir",
                                                      tmp_path / "o"], capsys, "tokenizer")


@pytest.mark.parametrize("file", ["config.json", "model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("kind", ["pipe", "device", "broken link"])
def test_files_that_never_end_are_refused_not_read(file, kind, tmp_path, capsys):
    """A pipe would block the read forever and /dev/zero never ends: refused by kind, not read."""
    model = hand_folder(tmp_path / "m")
    p = model / file
    if p.exists():
        p.unlink()
    {"pipe": lambda: os.mkfifo(p), "device": lambda: os.symlink("/dev/zero", p),
     "broken link": lambda: os.symlink(tmp_path / "gone", p)}[kind]()
    refused_and_untouched(tmp_path, embeddings.main, ["--model", model, "--out-dir", tmp_path / "o"], capsys, file)


@pytest.mark.parametrize("kind", ["pipe", "device"])
def test_a_sentences_pipe_is_refused_not_read(kind, tiny, tmp_path, capsys):
    p = tmp_path / "lines.txt"
    os.mkfifo(p) if kind == "pipe" else os.symlink("/dev/zero", p)
    refused_and_untouched(tmp_path, layers.main, ["--model", tiny, "--sentences-file", p, "--out-dir",
                                                  tmp_path / "o"], capsys, "--sentences-file")


@pytest.mark.parametrize("name, fragment", [("a\0b", "NUL"), ("FILE", "is a file"), ("MISSING", "not available")])
def test_hostile_model_names(name, fragment, tmp_path, capsys):
    (tmp_path / "FILE").write_text("not a model")
    name = {"FILE": str(tmp_path / "FILE"), "MISSING": str(tmp_path / "nothing" / "here")}.get(name, name)
    refused_and_untouched(tmp_path, weights.main, ["--model", name, "--out-dir", tmp_path / "o"], capsys, fragment)


# ----------------------------------------------------------------------------- class 4: sizes

def sparse_model(tmp_path, name, shape):
    """A checkpoint whose header honestly claims a tensor far larger than memory, in a sparse file
    of that size (no disk is used): only an estimate before allocating can stop it."""
    t = hand_tensors()
    n_bytes = math.prod(shape) * 4
    header = {EMB: {"dtype": "F32", "shape": [6, 4], "data_offsets": [0, 96]},
              name: {"dtype": "F32", "shape": list(shape), "data_offsets": [96, 96 + n_bytes]}}
    if name != Q:
        header[Q] = {"dtype": "F32", "shape": [4, 4], "data_offsets": [96 + n_bytes, 160 + n_bytes]}
    h = json.dumps(header).encode()
    model = hand_folder(tmp_path / "m", b"")
    with open(model / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + t[EMB].astype("<f4").tobytes())
        f.truncate(8 + len(h) + 96 + n_bytes + 64)
    return model


TERABYTE = (2 ** 20, 2 ** 18)


@pytest.mark.parametrize("stage, tensor", [("embeddings", EMB), ("weights", Q), ("layers", Q)])
def test_sizes_beyond_memory_stop_before_allocating(stage, tensor, tmp_path, capsys):
    model = sparse_model(tmp_path, tensor, TERABYTE)
    main = {"embeddings": embeddings.main, "weights": weights.main, "layers": layers.main}[stage]
    refused_and_untouched(tmp_path, main, ["--model", model, "--out-dir", tmp_path / "o"], capsys, "needs about")


@pytest.mark.parametrize("argv, fragment", [
    (["--n-null", "100000"], "--n-null"),                              # refused by the flag's range
    (["--overlap-rank", "0"], "--overlap-rank")])
def test_size_flags_have_ranges(argv, fragment, tmp_path, capsys):
    model = hand_folder(tmp_path / "m")
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        weights.main(["--model", str(model), *argv])
    assert e.value.code == 2 and fragment in capsys.readouterr().err and snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- class 1: output folders

STAGES = {
    "weights": (weights.main, lambda m: ["--model", m, "--n-null", "1"]),
    "embeddings": (embeddings.main, lambda m: ["--model", m, "--n-simplices", "20"]),
    "layers": (layers.main, lambda m: ["--model", m]),
    "project": (project.main, lambda m: ["--source", f"{m}@embed", "--target", f"{m}@embed"]),
    "modulate": (modulate.main, lambda m: ["--model", m, "--geo-dim", "2", "--anchors", "10", "--eval-items", "5"]),
    "wordnet": (wordnet.main, lambda m: ["--model", m, "--seeds", "1"]),
}


def _paths(tmp_path):
    f = tmp_path / "afile"
    f.write_text("the user's file")
    locked = tmp_path / "locked"
    locked.mkdir()
    return f, locked


OUT_CASES = {
    "out-dir is a file": (lambda f, lk, t: ["--out-dir", f], "--out-dir"),
    "out-dir below a file": (lambda f, lk, t: ["--out-dir", f / "sub"], "--out-dir"),
    "plots-dir is a file": (lambda f, lk, t: ["--out-dir", t / "o", "--plots-dir", f], "--plots-dir"),
    "plots-dir below a file": (lambda f, lk, t: ["--out-dir", t / "o", "--plots-dir", f / "p"], "--plots-dir"),
    "out-dir empty": (lambda f, lk, t: ["--out-dir", ""], "--out-dir"),
    "out-dir unwritable": (lambda f, lk, t: ["--out-dir", lk / "o"], "writable"),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
@pytest.mark.parametrize("stage", list(STAGES))
def test_output_folders_are_checked_before_any_work(stage, case, tmp_path, capsys):
    f, locked = _paths(tmp_path)
    if case == "out-dir unwritable":
        if os.geteuid() == 0:
            pytest.skip("root writes every folder")
        os.chmod(locked, 0o500)
    main, argv = STAGES[stage]
    flags, fragment = OUT_CASES[case]
    try:
        refused_and_untouched(tmp_path, main, argv(str(tmp_path / "no-model-needed")) + flags(f, locked, tmp_path),
                              capsys, fragment)
    finally:
        os.chmod(locked, 0o700)


@pytest.mark.parametrize("stage", ["weights", "embeddings", "layers"])
def test_a_folder_where_an_output_goes_is_one_line(stage, tiny, tmp_path, capsys):
    main, argv = STAGES[stage]
    (tmp_path / "o" / f"{stage}_{model_tag(str(tiny))}.json").mkdir(parents=True)
    refused_and_untouched(tmp_path, main, argv(str(tiny)) + ["--out-dir", tmp_path / "o"], capsys, "folder")


# ----------------------------------------------------------------------------- class 5: text files

def _text(kind, path):
    if kind == "directory":
        path.mkdir()
    elif kind != "missing":
        path.write_bytes({"empty": b"", "blank lines": b"\n  \n\t\n", "binary": b"\x89PNG\r\n\x1a\n\xff\xfe\x00",
                          "NUL bytes": b"a sentence\x00\x00\x00\n", "latin-1": "caf\xe9 cr\xe8me\n".encode("latin-1"),
                          "UTF-16": "a sentence\n".encode("utf-16")}[kind])
    return path


TEXT_CASES = ["empty", "blank lines", "binary", "NUL bytes", "latin-1", "UTF-16", "directory", "missing"]


@pytest.mark.parametrize("kind", TEXT_CASES)
@pytest.mark.parametrize("stage", ["layers", "modulate"])
def test_hostile_text_files_are_one_line(stage, kind, tiny, tmp_path, capsys):
    path = _text(kind, tmp_path / "lines.txt")
    if stage == "layers":
        main, argv, flag = layers.main, ["--model", tiny, "--sentences-file", path], "--sentences-file"
    else:
        main, argv, flag = modulate.main, ["--model", tiny, "--talk", "--prompts-file", path], "--prompts-file"
    refused_and_untouched(tmp_path, main, argv + ["--out-dir", tmp_path / "o"], capsys, flag, "lines.txt")


def test_a_sentences_file_is_read_as_given(tiny, tmp_path, capsys):
    """The working case of the table: a UTF-8 file with a byte-order mark, blank lines and an
    overlong line (cut to the model's positions) runs; the token count is the tokenizer's own."""
    from transformers import AutoTokenizer
    path = tmp_path / "s.txt"
    sentences = ["the dog", "a cat and a horse", " ".join(["zaa"] * 200)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(sentences).encode() + b"\n\n")
    code, _, err = run(layers.main, ["--model", tiny, "--sentences-file", path, "--out-dir", tmp_path / "o",
                                     "--no-plot"], capsys)
    assert code == 0, err
    res = strict_json(next((tmp_path / "o").glob("layers_*.json")))
    tok = AutoTokenizer.from_pretrained(tiny)
    positions = json.loads((tiny / "config.json").read_text())["max_position_embeddings"]
    assert positions < 200 < layers.MAX_TOKENS                  # the long line is cut to the model's 64 positions
    n = sum(min(len(tok(s)["input_ids"]), positions) for s in sentences)
    assert res["n_sentences"] == 3 and res["n_tokens"] == n


# ----------------------------------------------------------------------------- class 6: NaN and degenerate geometry

def test_zero_rows_are_left_out_of_the_cosines_and_counted(tiny, tmp_path, capsys):
    """BERT's [PAD] row is zero; three category words are zeroed too. The JSON parses strictly,
    holds no NaN, counts the zero rows, and the category statistic equals one computed here over
    the members with a direction."""
    vocab = json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]
    zeroed = [vocab[w] for w in ("dog", "cat", "red")]
    model, sd = variant(tiny, tmp_path / "m", {EMB: lambda E: np.where(np.isin(np.arange(len(E)), zeroed)[:, None],
                                                                       0, E)})
    E = sd[EMB].astype(np.float64)
    code, _, err = run(embeddings.main, ["--model", model, "--n-simplices", "50", "--out-dir", tmp_path / "o"], capsys)
    assert code == 0, err
    js = next((tmp_path / "o").glob("embeddings_*.json"))
    res = strict_json(js)
    assert "nonfinite" not in res
    zero = int(np.sum(np.linalg.norm(E, axis=1) == 0))
    assert zero == 4 and res["rows_left_out"] == {"zero_norm": zero} == res["cosines"]["rows_left_out"]
    animals = [vocab[w] for w in embeddings.CATEGORIES["animals"].split() if w in vocab]
    kept = [i for i in animals if i not in zeroed]
    U = E[kept] / np.linalg.norm(E[kept], axis=1, keepdims=True)
    C = U @ U.T
    a = res["categories"]["animals"]
    assert a["n"] == len(kept) and a["rows_left_out"] == {"zero_norm": 2}
    assert a["within_cos"] == pytest.approx(C[np.triu_indices(len(kept), 1)].mean(), abs=1e-12)
    assert "[PAD]" in res["special_tokens"]["tokens_left_out"] and "[PAD]" not in res["special_tokens"]["tokens"]
    assert res["head"]["rows_left_out"] == {"zero_norm": zero}


def test_an_all_zero_embedding_is_reported_not_analysed(tiny, tmp_path, capsys):
    model, _ = variant(tiny, tmp_path / "m", {EMB: lambda E: np.zeros_like(E)})
    code, out, err = run(embeddings.main, ["--model", model, "--out-dir", tmp_path / "o"], capsys)
    assert code == 0, err
    res = strict_json(next((tmp_path / "o").glob("embeddings_*.json")))
    assert res["rows_left_out"] == {"zero_norm": 280} and "nonzero norm" in res["not_analysed"]
    assert "not analysed" in out and not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_embedding_is_reported_not_analysed(value, tiny, tmp_path, capsys):
    model, _ = variant(tiny, tmp_path / "m", {EMB: lambda E: (E.__setitem__((7, slice(0, 3)), value), E)[1]})
    code, out, err = run(embeddings.main, ["--model", model, "--out-dir", tmp_path / "o"], capsys)
    assert code == 0, err
    res = strict_json(next((tmp_path / "o").glob("embeddings_*.json")))
    assert res["embedding"] == {"nonfinite": True, "n_nonfinite": 3, "n_rows_nonfinite": 1, "shape": [280, 16]}
    assert "not analysed" in out and "cosines" not in res and not list(tmp_path.rglob("*.png"))


def test_non_finite_and_zero_weight_matrices(tiny, tmp_path, capsys):
    """One NaN in the query, an inf in a LayerNorm scale, an all-zero value matrix: the first two
    are reported and not analysed (nor the heads they take part in), the zero matrix gets the
    statistics it has and its undefined ones are named; the other matrices match numpy."""
    model, sd = variant(tiny, tmp_path / "m", {Q: lambda W: (W.__setitem__((1, 2), np.nan), W)[1],
                                               LN: lambda g: (g.__setitem__(0, np.inf), g)[1],
                                               V: lambda W: np.zeros_like(W)})
    code, _, err = run(weights.main, ["--model", model, "--n-null", "1", "--out-dir", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "Traceback" not in err and all(line.startswith("note: ") for line in err.strip().splitlines())
    res = strict_json(next((tmp_path / "o").glob("weights_*.json")))
    assert res["matrices"][Q] == {"role": "q", "stack": "encoder", "layer": 0, "nonfinite": True, "n_nonfinite": 1,
                                  "n_rows_nonfinite": 1, "shape": [16, 16]}
    assert res["norms"][LN]["nonfinite"] and res["norms"][LN]["n_nonfinite"] == 1
    assert set(res["nonfinite_matrices"]) == {Q, LN}
    assert not res["heads_by_layer"] and any("heads of encoder/self_0 not analysed" in n for n in res["notes"])
    v = res["matrices"][V]
    assert v["stable_rank"] == 0 and v["hoyer"] is None and v["condition_number"] is None
    assert f"matrices.{V}.hoyer" in res["nonfinite"] and f"matrices.{V}.condition_number" in res["nonfinite"]
    k = np.linalg.svd(sd[K].astype(np.float64), compute_uv=False)
    assert res["matrices"][K]["stable_rank"] == pytest.approx(np.sum(k ** 2) / k[0] ** 2, rel=1e-9)


def test_non_finite_hidden_states_are_reported(tiny, tmp_path, capsys):
    """[CLS] embedded as NaN: the embedding state holds NaN in every sentence's first token (16
    sentences x width 16 values) and is reported, not analysed; the stage still exits 0."""
    cls = json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]["[CLS]"]
    model, _ = variant(tiny, tmp_path / "m", {EMB: lambda E: (E.__setitem__(cls, np.nan), E)[1]})
    code, _, err = run(layers.main, ["--model", model, "--out-dir", tmp_path / "o"], capsys)
    assert code == 0, err
    res = strict_json(next((tmp_path / "o").glob("layers_*.json")))
    first = res["states"][0]
    assert first["nonfinite"] and first["n_nonfinite"] == len(layers.SENTENCES) * 16
    assert first["n_rows_nonfinite"] == len(layers.SENTENCES) and "mean_pair_cos" not in first


def test_a_projection_of_a_non_finite_space_is_one_line(tiny, tmp_path, capsys):
    model, _ = variant(tiny, tmp_path / "m", {EMB: lambda E: (E.__setitem__((40, 0), np.nan), E)[1]})
    refused_and_untouched(tmp_path, project.main, ["--source", f"{model}@embed", "--target", f"{model}@embed",
                                                   "--out-dir", tmp_path / "o"], capsys, "non-finite")


# ----------------------------------------------------------------------------- class 2: claims and --force

def test_force_removes_only_what_this_stage_wrote_for_this_model(tiny, tmp_path, capsys):
    out, plots = tmp_path / "o", tmp_path / "p"
    argv = ["--model", tiny, "--n-null", "1", "--out-dir", out, "--plots-dir", plots]
    assert run(weights.main, argv, capsys)[0] == 0
    tag = model_tag(str(tiny))
    key = f"terrain.weights:{tag}"
    mine = {out / "weights_mine.json": "user", out / f"embeddings_{tag}.json": "other stage",
            out / "weights_other_model.json": "other model", plots / "weights_notes.png": "user figure",
            tmp_path / "victim.txt": "outside"}
    for p, text in mine.items():
        p.write_text(text)
    recorded_earlier = out / f"weights_{tag}_old.json"      # an earlier run's output under the same key
    recorded_earlier.write_text("stale")
    safeio.record(key, [str(recorded_earlier), str(out / "../victim.txt")])
    before = snapshot(tmp_path)
    code, _, err = run(weights.main, argv, capsys)
    one_line(code, err, "--force")
    assert snapshot(tmp_path) == before                        # nothing overwritten without --force
    code, _, err = run(weights.main, argv + ["--force", "--no-plot"], capsys)
    assert code == 0, err
    assert not (plots / f"weights_{tag}.png").exists()        # the old figure of this stage and model: removed
    assert not recorded_earlier.exists()                       # ... and what it recorded earlier
    for p, text in mine.items():                               # everything else: untouched
        assert p.read_text() == text
    assert {n for n in os.listdir(out) if not n.startswith(".")} == \
        {"weights_mine.json", f"embeddings_{tag}.json", "weights_other_model.json", f"weights_{tag}.json"}
    assert not [n for n in os.listdir(out) if safeio.is_temporary(n)]


def test_a_failed_forced_run_keeps_the_earlier_outputs(tiny, tmp_path, capsys):
    """--force replaces the earlier outputs once the new ones are computed: a run that stops on a
    bad input (here a tokenizer broken since the first run) leaves them as they were."""
    model, out = tmp_path / "m", tmp_path / "o"
    shutil.copytree(tiny, model)
    assert run(layers.main, ["--model", model, "--out-dir", out], capsys)[0] == 0
    (model / "tokenizer.json").write_bytes(b"[")
    before = snapshot(tmp_path)
    code, _, err = run(layers.main, ["--model", model, "--out-dir", out, "--force"], capsys)
    one_line(code, err, "tokenizer.json")
    assert snapshot(tmp_path) == before and len([n for n in os.listdir(out) if n.startswith("layers_")]) == 1


# ----------------------------------------------------------------------------- class 8: a kill while writing

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
real = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith({suffix!r}):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
from terrain.embeddings import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("at", [".json", ".png"])
def test_a_kill_while_writing_then_a_rerun(at, tiny, tmp_path, capsys):
    """SIGKILL as the stage renames its JSON (then the rerun continues: nothing of the model was
    complete) or its figure (then the rerun names the JSON that exists and --force; with it, the
    run completes). Either way the result equals an uninterrupted run's and no temporary is left."""
    base = ["--model", str(tiny), "--n-simplices", "30"]
    ref = tmp_path / "ref"
    assert run(embeddings.main, base + ["--out-dir", ref, "--plots-dir", ref], capsys)[0] == 0
    out, plots = tmp_path / "o", tmp_path / "p"
    argv = base + ["--out-dir", str(out), "--plots-dir", str(plots)]
    name = f"embeddings_{model_tag(str(tiny))}"
    suffix = f"{name}{at}"
    r = subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT, suffix=suffix, argv=argv)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    left = [n for d in (out, plots) if d.exists() for n in os.listdir(d) if ".tmp" in n]
    assert left                                                  # the kill left a temporary file behind
    if at == ".json":
        assert not (out / f"{name}.json").exists()
        code, _, err = run(embeddings.main, argv, capsys)
        assert code == 0, err
    else:
        assert (out / f"{name}.json").exists() and not (plots / f"{name}.png").exists()
        before = snapshot(tmp_path)
        code, _, err = run(embeddings.main, argv, capsys)
        one_line(code, err, f"{name}.json", "--force")
        # the refusal changes nothing but the killed writer's own temporary, which it removes
        assert snapshot(tmp_path) == {k: v for k, v in before.items() if not k.endswith(".tmp")}
        code, _, err = run(embeddings.main, argv + ["--force"], capsys)
        assert code == 0, err
    assert strict_json(out / f"{name}.json") == strict_json(ref / f"{name}.json")
    assert (plots / f"{name}.png").exists()
    assert not [n for d in (out, plots) for n in os.listdir(d) if ".tmp" in n]
