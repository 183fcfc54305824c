"""terrain.models: roles for every family (tiny random models), attention forms, MiniLM offline."""
import numpy as np
import pytest
import torch

from terrain.models import (TerrainError, attention_forms, by_role, canonical_weights, head_layout, load_model)


def tiny(family):
    import transformers as tf
    cfg = {
        "t5": tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=50),
        "t5v11": tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=50,
                             feed_forward_proj="gated-gelu"),
        "bert": tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              vocab_size=50),
        "vit": tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            image_size=16, patch_size=8),
        "dinov2": tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                  image_size=16, patch_size=8),
        "clip_vision": tf.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, image_size=16, patch_size=8),
        "llama": tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, vocab_size=50),
        "qwen2": tf.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, vocab_size=50),
    }[family]
    torch.manual_seed(0)
    return tf.AutoModel.from_config(cfg).eval(), cfg


GATED = {"t5v11", "llama", "qwen2"}


@pytest.mark.parametrize("family", ["t5", "t5v11", "bert", "vit", "dinov2", "clip_vision", "llama", "qwen2"])
def test_every_layer_has_its_roles(family):
    model, cfg = tiny(family)
    ws = canonical_weights(model)
    stacks = ["encoder", "decoder"] if family.startswith("t5") else [None]
    lay = head_layout(cfg)
    for stack in stacks:
        for role in ["q", "k", "v", "o", "mlp_in", "mlp_out"] + (["mlp_gate"] if family in GATED else []):
            got = by_role(ws, role, stack)
            assert [w.layer for w in got] == [0, 1], (family, stack, role)
        q, k = by_role(ws, "q", stack)[0].W, by_role(ws, "k", stack)[0].W
        assert q.shape == (lay.n_heads * lay.head_dim, 32)
        assert k.shape == (lay.n_kv_heads * lay.head_dim, 32)
        assert len(by_role(ws, "norm", stack)) >= 4
    if family.startswith("t5"):
        assert [w.layer for w in by_role(ws, "cross_q", "decoder")] == [0, 1]
        assert {w.stack for w in by_role(ws, "rel_bias")} == {"encoder", "decoder"}
    if family in ("t5", "t5v11", "bert", "llama", "qwen2"):
        assert by_role(ws, "embedding")[0].W.shape[0] == 50


def test_attention_forms_reproduce_bert_logits():
    model, cfg = tiny("bert")
    lay = head_layout(cfg)
    att = model.encoder.layer[0].attention.self
    ws = canonical_weights(model)
    F = attention_forms(by_role(ws, "q")[0].W, by_role(ws, "k")[0].W, lay)
    x, y = torch.randn(32), torch.randn(32)
    with torch.no_grad():
        q = (att.query.weight @ x).view(lay.n_heads, lay.head_dim)  # biases excluded: the bilinear part
        k = (att.key.weight @ y).view(lay.n_heads, lay.head_dim)
    np.testing.assert_allclose(x.numpy() @ F @ y.numpy(), (q * k).sum(-1).numpy(), rtol=1e-4, atol=1e-5)


def test_attention_forms_with_grouped_query_heads():
    model, cfg = tiny("llama")
    lay = head_layout(cfg)
    assert (lay.n_heads, lay.n_kv_heads) == (4, 2)
    ws = canonical_weights(model)
    Wq, Wk = by_role(ws, "q")[0].W, by_role(ws, "k")[0].W
    F = attention_forms(Wq, Wk, lay)
    x, y = np.random.default_rng(0).standard_normal((2, 32))
    q = (Wq @ x).reshape(4, -1)
    k = (Wk @ y).reshape(2, -1)
    expected = [q[h] @ k[h // 2] for h in range(4)]
    np.testing.assert_allclose(x @ F @ y, expected, rtol=1e-4, atol=1e-5)


def test_packed_in_proj_is_split():
    mha = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    ws = canonical_weights(torch.nn.ModuleDict({"layers": torch.nn.ModuleList([mha])}))
    q = [w for w in ws if w.role == "q"]
    assert len(q) == 1 and q[0].W.shape == (32, 32) and q[0].layer == 0
    np.testing.assert_array_equal(q[0].W, mha.self_attn.in_proj_weight.detach().numpy()[:32])


def test_minilm_offline():
    model, cfg = load_model()
    ws = canonical_weights(model)
    assert cfg.num_hidden_layers == 6 and head_layout(cfg).n_heads == 12
    assert [w.layer for w in by_role(ws, "q")] == list(range(6))
    assert by_role(ws, "embedding")[0].W.shape == (30522, 384)


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(TerrainError, match="not available offline"):
        load_model(str(tmp_path / "no-such-model"))


def test_open_clip_without_the_package_is_a_clear_error():
    pytest.importorskip("transformers")
    try:
        import open_clip  # noqa: F401
        pytest.skip("open_clip is installed")
    except ImportError:
        pass
    with pytest.raises(TerrainError, match="open_clip_torch"):
        load_model("open_clip:ViT-B-32/laion2b_s34b_b79k")


@pytest.mark.parametrize("name,role", [
    ("decoder.final_layer_norm.weight", "final_norm"), ("text_model.final_layer_norm.weight", "final_norm"),
    ("model.norm.weight", "final_norm"), ("vision_model.post_layernorm.weight", "final_norm"),
    ("layers.0.linear_attn.norm.weight", "aux"), ("layers.3.input_layernorm.weight", "norm"),
    ("encoder.block.0.layer.0.layer_norm.weight", "norm"), ("encoder.layer.2.layernorm_before.weight", "norm"),
    ("encoder.layer.0.output.LayerNorm.weight", "norm")])
def test_norm_roles(name, role):
    from terrain.models import classify
    assert classify(name)[0] == role
