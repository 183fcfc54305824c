"""GGUF files as a model source: tiny files written with the gguf package's writer (several
quantisation types, a Llama-style and a BERT-style layout), read tensor by tensor, compared with
what transformers dequantises from the same file, mapped to the same roles as Hugging Face names;
the quantisation null against Monte Carlo; bad files give one line."""
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]

from terrain.ggufsource import GGUFWeights, find_gguf, unpermute_rows  # noqa: E402
from terrain.models import TerrainError, classify, plan  # noqa: E402

LLAMA_TYPES = {"token_embd": "Q8_0", "attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q5_0",
               "ffn_gate": "Q4_1", "ffn_up": "F16", "ffn_down": "Q4_1", "output": "Q8_0"}


def converter_permute(W: np.ndarray, n_heads: int) -> np.ndarray:
    """The llama.cpp converter's rotary permutation of q / k rows, written out as the converter
    describes it: within each head, the two halves of the rotary pairs interleaved."""
    d = W.shape[0] // n_heads
    out = np.empty_like(W)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = W[h * d + i]
            out[h * d + 2 * i + 1] = W[h * d + d // 2 + i]
    return out


def add_tensor(w, name: str, W: np.ndarray, qname: str):
    from gguf.quants import quantize
    t = gguf.GGMLQuantizationType[qname]
    W = np.ascontiguousarray(W, dtype=np.float32)
    if qname == "F32":
        w.add_tensor(name, W)
    elif qname == "F16":
        w.add_tensor(name, W.astype(np.float16))
    else:
        w.add_tensor(name, quantize(W, t), raw_shape=quantize(W, t).shape, raw_dtype=t)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random Llama-style causal LM (GQA: 4 heads, 2 key-value heads; untied head) as safetensors and as GGUF."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():   # spread the weights so that quantisation levels differ across blocks
        p.data.normal_(0, 0.05)
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(96)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    add_tensor(w, "token_embd.weight", sd["model.embed_tokens.weight"], LLAMA_TYPES["token_embd"])
    add_tensor(w, "output_norm.weight", sd["model.norm.weight"], "F32")
    add_tensor(w, "output.weight", sd["lm_head.weight"], LLAMA_TYPES["output"])
    for i in range(2):
        p = f"model.layers.{i}."
        add_tensor(w, f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], "F32")
        add_tensor(w, f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], "F32")
        add_tensor(w, f"blk.{i}.attn_q.weight", converter_permute(sd[p + "self_attn.q_proj.weight"], 4), "Q4_1")
        add_tensor(w, f"blk.{i}.attn_k.weight", converter_permute(sd[p + "self_attn.k_proj.weight"], 2), "Q4_0")
        add_tensor(w, f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], "Q8_0")
        add_tensor(w, f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], "Q5_0")
        add_tensor(w, f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], "Q4_1")
        add_tensor(w, f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], "F16")
        add_tensor(w, f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], "Q4_1")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"path": str(path), "float": sd, "config": cfg}


def test_every_matrix_equals_what_transformers_dequantises_from_the_same_file(tiny_llama):
    pytest.importorskip("accelerate")
    from transformers import LlamaForCausalLM
    d, f = os.path.split(tiny_llama["path"])
    ref = {k: v.numpy() for k, v in LlamaForCausalLM.from_pretrained(d, gguf_file=f).state_dict().items()}
    src = GGUFWeights(tiny_llama["path"])
    assert set(src.entries) == {k for k in ref if "rotary" not in k}
    for name in src.entries:
        W = src.read(name)
        assert W.shape == ref[name].shape, name
        assert np.array_equal(W, ref[name]), name
        # rows read alone are the same rows (only their stored rows are dequantised)
        n = W.shape[0]
        assert np.array_equal(src.read_rows(name, n // 3, n // 3 + 5), W[n // 3: n // 3 + 5]), name
    # and they are the float model's matrices up to the quantisation error of their type
    for name, W in ((n, src.read(n)) for n in src.entries):
        err = np.abs(W - tiny_llama["float"][name]).max()
        assert err < (0.03 if src.dtypes[name] in ("Q4_0", "Q4_1") else 0.01), name
    assert src.dtypes["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert src.dtypes["model.layers.1.mlp.up_proj.weight"] == "F16"


def test_the_rotary_permutation_is_undone_exactly():
    W = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 4, 6):
        P = converter_permute(W, heads)
        assert np.array_equal(P[unpermute_rows(48, heads)], W)
        if heads > 1:
            assert not np.array_equal(P, W)


def test_gguf_names_map_to_the_roles_of_the_hugging_face_names(tiny_llama):
    src = GGUFWeights(tiny_llama["path"])
    hf = {k: tuple(v.shape) for k, v in tiny_llama["float"].items()}
    p_gguf, p_hf = plan(src.entries, src.config), plan(hf, tiny_llama["config"])
    key = lambda p: sorted((r.name, r.role, r.stack, r.layer, r.shape) for r in p.refs)  # noqa: E731
    assert key(p_gguf) == key(p_hf)
    assert classify("model.layers.1.mlp.gate_proj.weight")[0] == "mlp_gate"
    c = src.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.num_hidden_layers, c.vocab_size) == \
        (4, 2, 64, 2, 96)
    assert c.tie_word_embeddings is False and c.architectures == ["LlamaForCausalLM"]


def test_a_bert_style_gguf_file_reads_under_bert_names(tmp_path):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    sd = {k: v.numpy() for k, v in BertModel(cfg).state_dict().items()}
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(2)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_context_length(64)
    names = {"token_embd.weight": "embeddings.word_embeddings.weight",
             "position_embd.weight": "embeddings.position_embeddings.weight",
             "token_embd_norm.weight": "embeddings.LayerNorm.weight"}
    for i in range(2):
        names.update({f"blk.{i}.attn_q.weight": f"encoder.layer.{i}.attention.self.query.weight",
                      f"blk.{i}.attn_k.weight": f"encoder.layer.{i}.attention.self.key.weight",
                      f"blk.{i}.attn_v.weight": f"encoder.layer.{i}.attention.self.value.weight",
                      f"blk.{i}.attn_output.weight": f"encoder.layer.{i}.attention.output.dense.weight",
                      f"blk.{i}.ffn_up.weight": f"encoder.layer.{i}.intermediate.dense.weight",
                      f"blk.{i}.ffn_down.weight": f"encoder.layer.{i}.output.dense.weight",
                      f"blk.{i}.layer_output_norm.weight": f"encoder.layer.{i}.output.LayerNorm.weight"})
    for g, h in names.items():
        add_tensor(w, g, sd[h], "F32" if sd[h].ndim == 1 else "Q8_0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = GGUFWeights(str(tmp_path / "bert.gguf"))
    assert set(src.entries) == set(names.values())
    from gguf.quants import dequantize, quantize
    for g, h in names.items():
        want = sd[h] if sd[h].ndim == 1 else dequantize(quantize(sd[h], gguf.GGMLQuantizationType.Q8_0),
                                                        gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(src.read(h), want.astype(np.float32)), h   # bert's q/k are not permuted
    p = plan(src.entries, src.config)
    assert {r.role for r in p.refs} >= {"q", "k", "v", "o", "mlp_in", "mlp_out", "embedding", "norm"}
    assert find_gguf(str(tmp_path)) == str(tmp_path / "bert.gguf")


def test_the_quantised_null_matches_a_monte_carlo_of_its_own(tiny_llama):
    """quantized_nulls is the same as drawing a Gaussian of the matrix's RMS and quantising it by hand."""
    from gguf.quants import dequantize, quantize

    from terrain.quant import quantized_nulls
    W = GGUFWeights(tiny_llama["path"]).read("model.layers.0.mlp.gate_proj.weight")
    got = quantized_nulls(W, "Q4_1", np.random.default_rng(5), 2)
    rng = np.random.default_rng(5)
    rms = np.sqrt(np.mean(W.astype(np.float64) ** 2))
    t = gguf.GGMLQuantizationType.Q4_1
    for g in got:
        want = dequantize(quantize((rng.standard_normal(W.shape) * rms).astype(np.float32), t), t)
        assert np.array_equal(g, want)
    # Q4_1 keeps 16 levels per block of 32: a quantised Gaussian has at most 16 distinct values per block
    assert len(np.unique(got[0][0, :32])) <= 16 and len(np.unique(W[0, :32])) <= 16


def test_the_battery_reports_each_tensors_type_and_its_quantised_null(tiny_llama):
    from terrain.weights import battery
    res = battery(tiny_llama["path"], n_null=2, show_progress=False)
    assert res["source"] == "gguf" and res["quantization_types"]["Q4_1"] >= 4
    q = res["matrices"]["model.layers.0.self_attn.q_proj.weight"]
    assert q["quantization"] == "Q4_1" and "Q4_1" in q["quant_null"]["method"]
    # Q4_0's levels are symmetric multiples of a block scale, zero among them: a Gaussian through Q4_0 has
    # about 11.6% of its entries below 0.1 RMS (exact zeros), a float Gaussian 8.0%: the null moves with the storage
    k = res["matrices"]["model.layers.0.self_attn.k_proj.weight"]
    assert k["quantization"] == "Q4_0"
    assert k["quant_null"]["frac_below_0.1_rms"] > k["null"]["frac_below_0.1_rms"] + 0.02
    assert "quantization" not in res["matrices"]["model.layers.0.mlp.up_proj.weight"] or \
        res["matrices"]["model.layers.0.mlp.up_proj.weight"]["quantization"] == "F16"


def test_quantize_passes_a_float_model_through_a_type(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    from terrain.weights import battery
    folder = tmp_path / "float"
    folder.mkdir()
    tiny_llama["config"].save_pretrained(folder)
    save_file({k: torch.from_numpy(v).contiguous() for k, v in tiny_llama["float"].items()},
              str(folder / "model.safetensors"))
    f = battery(str(folder), n_null=1, show_progress=False)
    q = battery(str(folder), n_null=1, show_progress=False, quantize="Q4_1")
    name = "model.layers.0.mlp.gate_proj.weight"
    assert q["matrices"][name]["quantization"] == "Q4_1" and "quantization" not in f["matrices"][name]
    assert q["matrices"][name]["frac_below_0.1_rms"] != f["matrices"][name]["frac_below_0.1_rms"]
    assert q["quantize"] == "Q4_1" and f["quantize"] is None
    # the summary rows carry the quantised null beside each role, and quant_shift reads them
    from terrain.weights import format_summary, summary_rows
    rows = {r["role"]: r for r in summary_rows(q)}
    assert all("hoyer_qnull" in r for r in rows.values()) and "quantised null" in format_summary(q)
    assert not any("hoyer_qnull" in r for r in summary_rows(f))
    sys.path.insert(0, str(ROOT / "scripts"))
    import quant_shift
    fp, qp = tmp_path / "f.json", tmp_path / "q.json"
    fp.write_text(json.dumps(f))
    qp.write_text(json.dumps(q))
    assert quant_shift.main([str(fp), str(qp), "--out-dir", str(tmp_path / "qs")]) == 0
    got = json.loads((tmp_path / "qs" / "quant_shift.json").read_text())["types"]["Q4_1"]["rows"]
    frows = {r["role"]: r for r in summary_rows(f)}
    for r in got:   # every shift is the quantised model's value minus the float model's, role by role
        key = {"Hoyer": "hoyer", "stable rank": "stable_rank", "PR(sigma^2)": "pr_sigma2",
               "share below 0.1 RMS": "frac_below_0.1_rms", "share below 0.01 RMS": "frac_below_0.01_rms"}[
            r["statistic"]]
        assert r["shift"] == pytest.approx(rows[r["role"]][key] - frows[r["role"]][key])
    assert quant_shift.main([str(fp), str(qp), "--out-dir", str(tmp_path / "qs")]) == 2   # no --force
    # the null's shift is paired (the same Gaussians before and after): Q4_1 (a scale and a minimum per
    # block, 16 levels) leaves a Gaussian's share below 0.01 RMS where it was, while Q4_0 (levels symmetric
    # about an exact zero) sends about 12% of its entries to zero
    q0 = battery(str(folder), n_null=1, show_progress=False, quantize="Q4_0")
    (tmp_path / "q0.json").write_text(json.dumps(q0))
    assert quant_shift.main([str(fp), str(qp), str(tmp_path / "q0.json"), "--out-dir", str(tmp_path / "qs"),
                             "--force"]) == 0
    types = json.loads((tmp_path / "qs" / "quant_shift.json").read_text())["types"]
    small = {t: [r["null_shift"] for r in types[t]["rows"] if r["statistic"] == "share below 0.01 RMS"]
             for t in ("Q4_1", "Q4_0")}
    assert small["Q4_1"] and all(abs(x) < 0.005 for x in small["Q4_1"])
    assert small["Q4_0"] and all(0.05 < x < 0.2 for x in small["Q4_0"])


def write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", ["empty", "wrong magic", "truncated header", "truncated tensors", "unknown type",
                                  "lying tensor count", "directory of two"])
def test_bad_gguf_files_give_one_line(tiny_llama, tmp_path, case, capsys):
    from terrain.weights import main
    raw = open(tiny_llama["path"], "rb").read()
    p = tmp_path / "bad.gguf"
    if case == "empty":
        write_bytes(p, b"")
    elif case == "wrong magic":
        write_bytes(p, b"GGUX" + raw[4:])
    elif case == "truncated header":
        write_bytes(p, raw[:200])
    elif case == "truncated tensors":
        write_bytes(p, raw[: len(raw) // 2])
    elif case == "unknown type":
        # the first tensor description's type field: find the name, skip its dims, overwrite the type
        i = raw.index(b"token_embd.weight") + len(b"token_embd.weight")
        n_dims = struct.unpack("<I", raw[i:i + 4])[0]
        j = i + 4 + 8 * n_dims
        write_bytes(p, raw[:j] + struct.pack("<I", 999) + raw[j + 4:])
    elif case == "lying tensor count":
        write_bytes(p, raw[:8] + struct.pack("<Q", 10 ** 6) + raw[16:])
    elif case == "directory of two":
        p = tmp_path / "two"
        p.mkdir()
        write_bytes(p / "a.gguf", raw)
        write_bytes(p / "b.gguf", raw)
    capsys.readouterr()
    rc = main(["--model", str(p), "--out-dir", str(tmp_path / "out"), "--no-plot"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not [f for f in os.listdir(tmp_path / "out") if not f.startswith(".")]
