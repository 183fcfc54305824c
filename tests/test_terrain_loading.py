"""Loading for the activation stages: only the part a stage uses (T5's encoder, the embedding
matrix alone), --dtype, one load in terrain.modulate, open_clip towers with their own heads."""
import numpy as np
import pytest
import torch

from terrain.checkpoint import embedding_matrix
from terrain.models import TerrainError, head_layouts, load_model, open_clip_config, plan


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4, vocab_size=60,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = tf.T5ForConditionalGeneration(cfg).eval()
    folder = tmp_path_factory.mktemp("t5")
    model.save_pretrained(folder)
    return str(folder), model


def test_encoder_only_load_never_builds_the_decoder(tiny_t5):
    folder, full = tiny_t5
    enc, cfg = load_model(folder, part="encoder")
    assert type(enc).__name__ == "T5EncoderModel"
    assert not any("decoder" in n for n, _ in enc.named_parameters())
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():  # the same encoder states as the full model's encoder
        ref = full.get_encoder()(input_ids=ids).last_hidden_state
        np.testing.assert_allclose(enc(input_ids=ids).last_hidden_state.numpy(), ref.numpy(), atol=1e-6)


def test_dtype_and_seq2seq(tiny_t5):
    folder, _ = tiny_t5
    m, _ = load_model(folder, dtype="bfloat16", part="seq2seq")
    assert type(m).__name__ == "T5ForConditionalGeneration" and next(m.parameters()).dtype == torch.bfloat16
    with pytest.raises(TerrainError, match="--dtype"):
        load_model(folder, dtype="int8")


def test_embedding_matrix_is_read_alone(tiny_t5, monkeypatch):
    import transformers as tf
    folder, full = tiny_t5

    def refuse(*a, **k):
        raise AssertionError("no model may be instantiated to read the embedding matrix")
    monkeypatch.setattr(tf.PreTrainedModel, "from_pretrained", classmethod(refuse))
    E, cfg = embedding_matrix(folder)
    np.testing.assert_array_equal(E, full.get_input_embeddings().weight.detach().numpy())


def test_minilm_embedding_matrix_equals_the_model():
    E, _ = embedding_matrix(None)
    model, _ = load_model(None)
    np.testing.assert_array_equal(E, model.get_input_embeddings().weight.detach().numpy())


def test_modulate_loads_the_model_once(monkeypatch):
    pytest.importorskip("nltk")
    from terrain import modulate as MD
    from terrain.wordnet import load_wordnet
    try:
        load_wordnet()
    except TerrainError:
        pytest.skip("WordNet is not installed")
    calls = []
    real = MD.load_model

    def counted(*a, **k):
        calls.append((a, k))
        return real(*a, **k)
    monkeypatch.setattr(MD, "load_model", counted)
    MD.prepare(None, [0], 8, 40, 20, 0, n_train=0, lm_head=True, geometry=False)
    assert len(calls) == 1 and calls[0][1]["part"] == "seq2seq"


def _fake_open_clip(width_v=48, heads_v=3, width_t=32, heads_t=4):
    """A module with open_clip's parameter names: visual.transformer.resblocks.* and
    transformer.resblocks.*, packed in_proj_weight, mlp.c_fc / c_proj, ln_1 / ln_2."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, h)
            self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 2 * d), "c_proj": nn.Linear(2 * d, d)})

    class Tower(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.resblocks = nn.ModuleList([Block(d, h), Block(d, h)])

    m = nn.Module()
    m.visual = nn.Module()
    m.visual.transformer = Tower(width_v, heads_v)
    m.transformer = Tower(width_t, heads_t)
    m.token_embedding = nn.Embedding(50, width_t)
    return m


def test_open_clip_towers_have_their_own_heads():
    from terrain.checkpoint import ModuleWeights
    from terrain.weights import battery
    m = _fake_open_clip()
    cfg = open_clip_config(m)
    lays = head_layouts(cfg)
    assert (lays["vision"].n_heads, lays["vision"].head_dim) == (3, 16)
    assert (lays["text"].n_heads, lays["text"].head_dim) == (4, 8)
    p = plan(ModuleWeights(m).entries, cfg)
    q = {(r.stack, r.layer): r.shape for r in p.refs if r.role == "q"}
    assert q == {("vision", 0): (48, 48), ("vision", 1): (48, 48), ("text", 0): (32, 32), ("text", 1): (32, 32)}
    res = battery("fake-open-clip", n_null=1, source=ModuleWeights(m), config=cfg, show_progress=False)
    assert len(res["heads_by_layer"]["vision/self_0"]["positive_share"]) == 3
    assert len(res["heads_by_layer"]["text/self_1"]["positive_share"]) == 4
