"""Tiny random models of every family of the notebook, saved as Hugging Face folders (with
MiniLM's tokenizer), through the terrain stages: weights, embeddings, layers, and for the
encoder-decoder and the hybrid-attention family also project and wordnet."""
import json
import os
import shutil

import pytest
import torch

from terrain import embeddings, layers, project, weights
from terrain.models import minilm_path

VOCAB = 30522  # MiniLM's tokenizer


def tiny_config(family):
    import transformers as tf
    common = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB)
    return {
        "t5v11": lambda: tf.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                     vocab_size=VOCAB, feed_forward_proj="gated-gelu", decoder_start_token_id=0),
        "bert": lambda: tf.BertConfig(hidden_size=32, **common),
        "llama": lambda: tf.LlamaConfig(hidden_size=32, num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=32, num_key_value_heads=2, **common),
        "qwen3": lambda: tf.Qwen3Config(hidden_size=32, num_key_value_heads=2, head_dim=8, **common),
        "qwen3_5": lambda: tf.Qwen3_5TextConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                                num_key_value_heads=2, head_dim=8, intermediate_size=64,
                                                vocab_size=VOCAB, linear_num_key_heads=2, linear_num_value_heads=4,
                                                linear_key_head_dim=8, linear_value_head_dim=8),
        "clip": lambda: tf.CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       intermediate_size=64, vocab_size=VOCAB),
                                      vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                                         intermediate_size=96, image_size=16, patch_size=8),
                                      projection_dim=16),
        "dinov2": lambda: tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                          image_size=16, patch_size=8),
    }[family]()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import transformers as tf
    made = {}

    def make(family):
        if family not in made:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(family)
            tf.AutoModel.from_config(tiny_config(family)).save_pretrained(folder)
            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
                shutil.copy(os.path.join(minilm_path(), f), folder / f)
            made[family] = str(folder)
        return made[family]
    return make


TEXT = ["t5v11", "bert", "llama", "qwen2", "qwen3", "qwen3_5"]


@pytest.mark.parametrize("family", TEXT + ["clip", "dinov2"])
def test_weight_battery(family, folders, tmp_path):
    assert weights.main(["--model", folders(family), "--n-null", "1", "--out-dir", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("weights_*.json")).read_text())
    assert res["source"] == "safetensors" and not res["unclassified"] and res["heads_by_layer"]
    for key, h in res["heads_by_layer"].items():
        assert all(0 <= p <= 1 for p in h["positive_share"]), key
    # the census counts every stored tensor once: transformers' own parameter count (tied weights once)
    import transformers as tf
    model = tf.AutoModel.from_pretrained(folders(family))
    c = res["census"]
    assert c["total"] == model.num_parameters() + sum(b.numel() for n, b in model.named_buffers()
                                                      if n in model.state_dict())
    assert sum(c["by_stack"].values()) == c["total"] and c["by_role"].get("unclassified", 0) == 0


@pytest.mark.parametrize("family", TEXT + ["clip"])
def test_embedding_probes(family, folders, tmp_path):
    assert embeddings.main(["--model", folders(family), "--n-simplices", "200", "--out-dir", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("embeddings_*.json")).read_text())
    assert res["shape"] == [VOCAB, 32]


@pytest.mark.parametrize("family", TEXT)
def test_layer_evolution_in_bfloat16(family, folders, tmp_path):
    assert layers.main(["--model", folders(family), "--dtype", "bfloat16", "--device", "cpu",
                        "--out-dir", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("layers_*.json")).read_text())
    n_layers = 4 if family == "qwen3_5" else 2
    assert len(res["states"]) == n_layers + 1  # embeddings + every block (T5: the encoder's)


HYBRID_SLOW = pytest.param("qwen3_5", marks=pytest.mark.slow)  # the linear-attention fallback over 30k tokens


@pytest.mark.parametrize("family", ["t5v11", HYBRID_SLOW])
def test_projection_between_embedding_and_a_layer(family, folders, tmp_path):
    f = folders(family)
    assert project.main(["--source", f"{f}@embed", "--target", f"{f}@1", "--anchors", "2000", "--test", "500",
                         "--rsa-tokens", "200", "--out-dir", str(tmp_path)]) == 0
    assert list(tmp_path.glob("project_*.json"))


@pytest.mark.parametrize("family", ["t5v11", HYBRID_SLOW])
def test_wordnet_alignment(family, folders, tmp_path):
    from terrain import wordnet
    from terrain.models import TerrainError
    try:
        wordnet.load_wordnet()
    except TerrainError:
        pytest.skip("WordNet is not installed")
    assert wordnet.main(["--model", folders(family), "--seeds", "1", "--n-items", "60", "--n-pairs", "500",
                         "--n-simplices", "50", "--n-perm", "10", "--max-items", "120", "--dtype", "bfloat16",
                         "--out-dir", str(tmp_path)]) == 0


def test_t5_decoder_states_against_the_encoder(folders, tmp_path):
    """The decoder reads the same text teacher-forced; its CKA with the encoder, recomputed here
    from transformers' own hidden states through centred n x n Gram matrices (HSIC), matches."""
    import numpy as np
    import transformers as tf

    from terrain.layers import SENTENCES
    folder = folders("t5v11")
    assert layers.main(["--model", folder, "--out-dir", str(tmp_path)]) == 0
    res = json.loads(next(tmp_path.glob("layers_*.json")).read_text())
    assert len(res["states"]) == 3 and len(res["decoder_states"]) == 3 and len(res["encoder_vs_decoder"]) == 3
    model = tf.T5Model.from_pretrained(folder)
    tok = tf.AutoTokenizer.from_pretrained(folder)
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    dec_in = torch.cat([torch.zeros_like(enc["input_ids"][:, :1]), enc["input_ids"][:, :-1]], 1)
    with torch.no_grad():
        out = model(**enc, decoder_input_ids=dec_in, decoder_attention_mask=enc["attention_mask"],
                    output_hidden_states=True)
    keep = enc["attention_mask"].bool().numpy().ravel()
    flat = lambda h: h.numpy().reshape(-1, h.shape[-1])[keep].astype(np.float64)  # noqa: E731
    X, Y = flat(out.encoder_hidden_states[2]), flat(out.decoder_hidden_states[2])
    H = np.eye(len(X)) - 1 / len(X)
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    cka = np.sum(K * L) / (np.linalg.norm(K) * np.linalg.norm(L))
    assert res["encoder_vs_decoder"][2]["same_depth"]["cka"] == pytest.approx(cka, rel=1e-4)
    assert layers.main(["--model", folder, "--encoder-only", "--out-dir", str(tmp_path / "e")]) == 0
    assert "decoder_states" not in json.loads(next((tmp_path / "e").glob("layers_*.json")).read_text())
