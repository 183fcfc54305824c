"""Streaming the weight battery from safetensors shards: the reader against the safetensors
library, the streamed battery against the in-memory one, clear errors on broken folders, no code
from pickles, and the head layouts of every family (CLIP towers, Qwen3.5's gated and linear attention)."""
import json
import os

import numpy as np
import pytest
import torch

from terrain.checkpoint import ModuleWeights, SafetensorsWeights, open_weights
from terrain.models import TerrainError, by_role, canonical_weights, load_model, plan
from terrain.weights import battery, main


def assert_same(a, b, path="", tol=1e-6):
    """Every number of two battery results equal to tol (relative, absolute near zero)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("source", "seconds"):
                assert_same(a[k], b[k], f"{path}/{k}", tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", tol)
    elif isinstance(a, float):
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=tol, abs=tol), (path, a, b)
    else:
        assert a == b, path


def test_reader_equals_the_safetensors_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
               "b.f16": torch.randn(3, 4, 2, generator=g).to(torch.float16),
               "c.f32": torch.randn(11, generator=g), "d.f64": torch.randn(2, 3, generator=g).double()}
    save_file(tensors, tmp_path / "x.safetensors")
    src = SafetensorsWeights(str(tmp_path))
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        for name in tensors:
            ref = f.get_tensor(name).float().numpy()
            got = src.read(name)
            assert got.dtype == np.float32 and got.shape == ref.shape
            np.testing.assert_array_equal(got, ref)  # bf16 / f16 convert exactly
    np.testing.assert_array_equal(src.read_rows("a.bf16", 2, 5), tensors["a.bf16"][2:5].float().numpy())


@pytest.fixture(scope="module")
def tiny_llama_shards(tmp_path_factory):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=50)
    model = tf.LlamaModel(cfg).to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size="20KB")
    return str(folder), model, cfg


def test_streamed_battery_equals_in_memory_on_a_sharded_bf16_model(tiny_llama_shards):
    folder, model, cfg = tiny_llama_shards
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 3
    streamed = battery(folder, n_null=2, show_progress=False)
    memory = battery(folder, n_null=2, source=ModuleWeights(model), config=cfg, show_progress=False)
    assert streamed["source"] == "safetensors"
    assert_same(streamed, memory)
    assert set(streamed["heads_by_layer"]) == {"main/self_0", "main/self_1", "main/self_2"}


def test_streamed_battery_equals_in_memory_on_minilm():
    model, cfg = load_model(None)
    streamed = battery(None, n_null=1, show_progress=False)
    memory = battery(None, n_null=1, source=ModuleWeights(model), config=cfg, show_progress=False)
    assert_same(streamed, memory)
    assert len(streamed["matrices"]) == 36 and not streamed["unclassified"]


def _copy(folder, dst):
    import shutil
    shutil.copytree(folder, dst)
    return dst


def test_truncated_shard_is_one_clear_error(tiny_llama_shards, tmp_path, capsys):
    folder = _copy(tiny_llama_shards[0], tmp_path / "m")
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1]
    with open(folder / shard, "r+b") as f:
        f.truncate(os.path.getsize(folder / shard) - 100)
    assert main(["--model", str(folder), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0] and shard in err[0] and "re-download" in err[0]


def test_missing_shard_and_missing_weights(tiny_llama_shards, tmp_path, capsys):
    folder = _copy(tiny_llama_shards[0], tmp_path / "m")
    shard = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[0]
    os.remove(folder / shard)
    assert main(["--model", str(folder), "--out-dir", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    for f in os.listdir(folder):
        if f.endswith(".safetensors") or f.endswith(".json") and f != "config.json":
            os.remove(folder / f)
    with pytest.raises(TerrainError, match="holds no weights"):
        open_weights(str(folder))


def test_unknown_family_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    assert main(["--model", str(tmp_path), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "family" in err[0]


class _Marker:
    """Unpickling this writes a file: a hostile checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_never_run_code(tmp_path):
    import pickle
    marker = tmp_path / "pwned"
    (tmp_path / "m").mkdir()
    with open(tmp_path / "m" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": _Marker(str(marker))}, f)
    with pytest.raises(TerrainError, match="plain weights"):
        open_weights(str(tmp_path / "m"))
    assert not marker.exists()


@pytest.mark.parametrize("zipfile", [True, False])  # False: the pre-zip format, which cannot be memory-mapped
def test_pickled_plain_weights_are_read(tmp_path, capsys, zipfile):
    torch.save({"layers.0.self_attn.q_proj.weight": torch.ones(4, 3)}, tmp_path / "pytorch_model.bin",
               _use_new_zipfile_serialization=zipfile)
    src = open_weights(str(tmp_path))
    np.testing.assert_array_equal(src.read("layers.0.self_attn.q_proj.weight"), np.ones((4, 3), np.float32))
    assert "memory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- families

def test_clip_towers_get_their_own_heads(tmp_path):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, vocab_size=50),
                        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                           intermediate_size=96, image_size=16, patch_size=8), projection_dim=16)
    model = tf.CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path)
    res = battery(str(tmp_path), n_null=1, show_progress=False)
    assert len(res["heads_by_layer"]["text/self_0"]["positive_share"]) == 4
    assert len(res["heads_by_layer"]["vision/self_1"]["positive_share"]) == 3
    # the vision heads are the tower's own 3 heads of 16 (the text layout would cut 4 heads of 12)
    from terrain.models import HeadLayout, attention_forms
    from terrain.weights import form_stats
    att = model.vision_model.encoder.layers[0].self_attn
    dense = form_stats(attention_forms(att.q_proj.weight.detach().numpy(), att.k_proj.weight.detach().numpy(),
                                       HeadLayout(3, 16, 3)))
    np.testing.assert_allclose(res["heads_by_layer"]["vision/self_0"]["asymmetry"], dense["asymmetry"], atol=1e-6)
    assert res["layouts"]["vision"] == {"n_heads": 3, "head_dim": 16, "n_kv_heads": 3}
    assert res["layouts"]["text"] == {"n_heads": 4, "head_dim": 8, "n_kv_heads": 4}


@pytest.fixture(scope="module")
def tiny_qwen35():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.Qwen3_5TextConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, intermediate_size=96, vocab_size=100, linear_num_key_heads=2,
                               linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
    return tf.AutoModel.from_config(cfg).eval(), cfg


def test_qwen35_gated_query_is_split_per_head(tiny_qwen35):
    model, cfg = tiny_qwen35
    ws = canonical_weights(model, cfg)
    layer = cfg.layer_types.index("full_attention")
    attn = model.layers[layer].self_attn
    x = torch.randn(3, 64)
    with torch.no_grad():
        query, gate = torch.chunk(attn.q_proj(x).view(3, 4, 32), 2, dim=-1)  # as the model splits it
    Wq = next(w.W for w in by_role(ws, "q") if w.layer == layer)
    Wg = next(w.W for w in by_role(ws, "attn_gate") if w.layer == layer)
    np.testing.assert_allclose(x.numpy() @ Wq.T, query.reshape(3, -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.numpy() @ Wg.T, gate.reshape(3, -1).numpy(), rtol=1e-5, atol=1e-6)


def test_qwen35_linear_attention_has_roles_of_its_own(tiny_qwen35):
    model, cfg = tiny_qwen35
    res = battery("qwen3.5", n_null=1, source=ModuleWeights(model), config=cfg, show_progress=False)
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    lin = [i for i, t in enumerate(cfg.layer_types) if t == "linear_attention"]
    qs = sorted(m["layer"] for m in res["matrices"].values() if m["role"] == "q")
    lqs = sorted(m["layer"] for m in res["matrices"].values() if m["role"] == "lin_q")
    assert qs == full and lqs == lin  # never mixed
    assert {f"main/self_{i}" for i in full} | {f"main/linear_{i}" for i in lin} == set(res["heads_by_layer"])
    assert len(res["heads_by_layer"][f"main/linear_{lin[0]}"]["positive_share"]) == 2
    assert {"lin_v", "lin_gate", "lin_o", "lin_ab", "attn_gate"} <= {m["role"] for m in res["matrices"].values()}
    assert not res["unclassified"]


def test_unclassified_parameters_are_named_not_fatal(tiny_llama_shards, capsys):
    _, model, cfg = tiny_llama_shards
    src = ModuleWeights(model)
    src.entries = dict(src.entries, **{"layers.0.mystery.weight": (4, 4), "layers.1.mystery.weight": (4, 4)})
    p = plan(src.entries, cfg)
    assert p.unclassified == ["layers.0.mystery.weight", "layers.1.mystery.weight"]
    assert any("layers.*.mystery.weight" in n for n in p.notes)


def test_output_names_never_collide():
    from terrain.cli import model_tag
    names = ["org/model", "org_model", "org model", "/data/" + "x" * 80 + "/a", "/other/" + "x" * 80 + "/a",
             "minilm", None]
    tags = [model_tag(n) for n in names]
    assert len(set(tags[:-1])) == len(tags) - 1 and tags[-1] == "minilm" == model_tag("minilm")
    assert all(len(t) <= 60 and "/" not in t for t in tags)
    assert model_tag("org/model") == model_tag("org/model")  # stable


def test_stage_outputs_are_not_overwritten_without_force(tiny_llama_shards, tmp_path, plots_below_tmp, capsys):
    folder = tiny_llama_shards[0]
    assert main(["--model", folder, "--n-null", "1", "--out-dir", str(tmp_path)]) == 0
    js = next(tmp_path.glob("weights_*.json"))
    js.write_text("{\"mine\": 1}")
    capsys.readouterr()
    assert main(["--model", folder, "--n-null", "1", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert js.read_text() == "{\"mine\": 1}"  # untouched
    png = plots_below_tmp / tmp_path.parent.name / tmp_path.name / (js.stem + ".png")  # the default figures folder
    png.unlink()
    csv = tmp_path / (js.stem + "_stability.csv")  # a stale file of the same stage and model
    csv.write_text("stale")
    assert main(["--model", folder, "--n-null", "1", "--out-dir", str(tmp_path), "--force"]) == 0
    assert "mine" not in js.read_text() and png.exists() and not csv.exists()
