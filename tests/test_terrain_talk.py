"""Talking to the modulated model (terrain/talk.py): distinct-n and edit distance against nltk,
the log-likelihood of a generation against a step-by-step loop, alpha 0 answering exactly as the
unmodulated model (greedy and sampled, thanks to the shared seed), the resampled null, the
causal-LM path and the command line, on tiny random T5 and Llama-style causal LM with MiniLM's tokenizer."""
import json

import numpy as np
import pytest
import torch

from terrain import modulate as MD
from terrain import talk as T
from terrain.models import TerrainError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of a tiny random T5 and a tiny random Llama-style causal LM, both with MiniLM's tokenizer."""
    import transformers as tf
    from transformers import AutoTokenizer

    from terrain.models import resolve_model_name
    tok = AutoTokenizer.from_pretrained(resolve_model_name(None), local_files_only=True)
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    t5 = tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                     vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                     decoder_start_token_id=tok.pad_token_id)
    tf.T5ForConditionalGeneration(t5).save_pretrained(root / "t5")
    # Llama: the decoder-only layout of Qwen (model.layers); a Qwen2 config would make AutoTokenizer
    # swap MiniLM's tokenizer for Qwen's own class
    ll = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    tf.LlamaForCausalLM(ll).save_pretrained(root / "llama")
    for d in ("t5", "llama"):
        tok.save_pretrained(root / d)
    return {"t5": str(root / "t5"), "llama": str(root / "llama"), "tok": tok}


def test_distinct_n_and_edit_distance_match_nltk():
    from nltk.metrics.distance import edit_distance
    from nltk.util import ngrams
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 4, rng.integers(0, 12)).tolist()
        b = rng.integers(0, 4, rng.integers(0, 12)).tolist()
        assert T.edit_distance(a, b) == edit_distance(a, b)
        for n in (1, 2, 3):
            grams = list(ngrams(a, n))
            want = len(set(grams)) / len(grams) if grams else float("nan")
            assert T.distinct_n(a, n) == pytest.approx(want, nan_ok=True)
    assert T.distinct_n([5, 5, 5, 5], 1) == 0.25 and T.distinct_n([1, 2, 1, 2], 2) == pytest.approx(2 / 3)


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_token_logliks_match_a_step_by_step_loop(tiny, family):
    from terrain.models import load_model
    model, _ = load_model(tiny[family], part="lm")
    enc = T.encode_prompt(model, tiny["tok"], "summarize: a small dog that barks")
    new = T.generate(model, tiny["tok"], enc, 6, 1.5, 1.0, seed=3)
    assert len(new) > 0
    got = T.token_logliks(model, enc, new)
    want = []
    with torch.no_grad():
        for t in range(len(new)):
            if T.is_seq2seq(model):
                dec = torch.tensor([[model.config.decoder_start_token_id] + new[:t]])
                logits = model(**enc, decoder_input_ids=dec).logits[0, -1]
            else:
                ids = torch.cat([enc["input_ids"], torch.tensor([new[:t]], dtype=torch.long)], 1)
                logits = model(input_ids=ids).logits[0, -1]
            want.append(float(torch.log_softmax(logits, -1)[new[t]]))
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_alpha_zero_answers_as_the_unmodulated_model(tiny, temperature):
    res = MD.talk(tiny["t5"], prompts=["summarize: a small dog", "summarize: a large cat"], geo_dim=4,
                 alphas=(0.0, 0.5), n_anchors=100, n_eval=40, max_new_tokens=6, temperature=temperature,
                 progress=False)
    rows = {(r["condition"], r["alpha"]): r for r in res["summary"]}
    for cond in ("wordnet", "shuffled_rows"):
        assert rows[(cond, 0.0)]["identical"] == 1.0 and rows[(cond, 0.0)]["edit_fraction"]["mean"] == 0.0
    assert (("unmodulated, another seed", None) in rows) == (temperature > 0)
    for conv in res["conversations"]:
        ref = conv["answers"][0]
        assert ref["condition"] == "unmodulated" and ref["edit_fraction"] == 0.0
        zero = [a for a in conv["answers"] if a["alpha"] == 0.0]
        assert all(a["text"] == ref["text"] and a["loglik_unmodulated"] == ref["loglik_unmodulated"] for a in zero)
    # the same seeds give the same sampled answers
    if temperature > 0:
        again = MD.talk(tiny["t5"], prompts=["summarize: a small dog", "summarize: a large cat"], geo_dim=4,
                       alphas=(0.0, 0.5), n_anchors=100, n_eval=40, max_new_tokens=6, temperature=temperature,
                       progress=False)
        assert again["conversations"] == res["conversations"]


def test_modulation_reaches_a_causal_lm(tiny):
    """The LERP hooks sit on a causal LM's `model.layers`: alpha 0.5 changes the next-token
    distribution of a prompt whose tokens have WordNet rows, alpha 0 does not."""
    from terrain.modulate import load_geometry, prepare
    c = prepare(tiny["llama"], None, 4, 100, 40, 0, generate=True)
    load_geometry(c, c.inits["wordnet"])
    word = int(c.tid[c.anchors[0]])
    ids = torch.tensor([[c.tok.cls_token_id, word, word]])
    with torch.no_grad():
        ref = c.model(input_ids=ids).logits
        with c.mod.attached(c.encoder, c.layers):
            c.mod.set_alpha(0.0)
            assert torch.equal(c.model(input_ids=ids).logits, ref)
            c.mod.set_alpha(0.5)
            assert not torch.allclose(c.model(input_ids=ids).logits, ref)
        assert torch.equal(c.model(input_ids=ids).logits, ref)
    res = MD.talk(tiny["llama"], n_prompts=2, geo_dim=4, alphas=(0.0,), n_anchors=100, n_eval=40,
                 max_new_tokens=4, progress=False)
    assert res["prompts_from"] == "held-out definitions" and len(res["conversations"]) == 2
    assert all(r["identical"] == 1.0 for r in res["summary"])


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_modulated_generation_with_a_cache_equals_a_full_recompute(tiny, family):
    """During model.generate (KV cache, only the new token fed at each step) the hooks modulate
    exactly as a greedy loop that reruns the whole sequence; at alpha 0.9 the answers to prompts
    made of WordNet-row tokens differ from the unmodulated ones, so the alpha-0 identity is not
    a hook that never fires."""
    from terrain.modulate import load_geometry, prepare
    c = prepare(tiny[family], None, 4, 100, 40, 0, generate=True)
    load_geometry(c, c.inits["wordnet"])
    prompts = [" ".join(c.items[i]["lemma"] for i in c.anchors[k:k + 8]) for k in (0, 8, 16)]
    changed = 0
    with c.mod.attached(c.encoder, c.layers):
        c.mod.set_alpha(0.9)
        for prompt in prompts:
            enc = T.encode_prompt(c.model, c.tok, prompt)
            cached = T.generate(c.model, c.tok, enc, 5, 0.0, 1.0, seed=0)
            ids = [c.model.config.decoder_start_token_id] if T.is_seq2seq(c.model) else enc["input_ids"][0].tolist()
            with torch.no_grad():
                for _ in range(len(cached)):
                    x = torch.tensor([ids])
                    out = c.model(**enc, decoder_input_ids=x, use_cache=False) if T.is_seq2seq(c.model) else \
                        c.model(input_ids=x, use_cache=False)
                    ids.append(int(out.logits[0, -1].argmax()))
            assert ids[-len(cached):] == cached if cached else True
            with c.mod.suspended():
                bare = T.generate(c.model, c.tok, enc, 5, 0.0, 1.0, seed=0)
            changed += bare != cached
    assert changed >= 1


def test_command_line(tiny, tmp_path, plots_below_tmp, capsys):
    from terrain.modulate import main
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("summarize: a river\n\nsummarize: a mountain\n")
    out = tmp_path / "out"
    argv = ["--model", tiny["t5"], "--talk", "--prompt", "summarize: a bird", "--prompts-file", str(prompts),
            "--alphas", "0.1", "--geo-dim", "4", "--anchors", "100", "--eval-items", "40", "--max-new-tokens", "4",
            "--temperature", "0.8", "--out-dir", str(out)]
    assert main(argv) == 0
    visible = lambda d: sorted(p.name for p in d.iterdir() if not p.name.startswith("."))  # noqa: E731 (not the claims' manifest)
    files = visible(out)                                   # the numbers; the figure in plots/out
    assert len(files) == 1 and files[0].startswith("modulate_talk_") and files[0].endswith(".json")
    assert visible(plots_below_tmp / tmp_path.name / "out") == [files[0][:-5] + ".png"]
    res = json.loads((out / files[0]).read_text())
    assert [c["prompt"] for c in res["conversations"]] == ["summarize: a bird", "summarize: a river",
                                                          "summarize: a mountain"]
    assert "| wordnet | 0.1 |" in capsys.readouterr().out
    assert main(argv) == 2 and "--force" in capsys.readouterr().err          # nothing overwritten
    assert main(["--model", tiny["t5"], "--talk", "--prompts-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--prompt", "hello"])                                        # --prompt without --talk
    assert "--talk" in capsys.readouterr().err


def test_encoder_only_model_cannot_talk(tiny):
    with pytest.raises(TerrainError, match="generates text"):
        MD.talk(None, geo_dim=4, alphas=(0.1,), n_anchors=100, n_eval=40, progress=False)
    from terrain.modulate import train
    with pytest.raises(TerrainError, match="encoder-decoder"):      # refused before any training step
        train(None, geo_dim=4, epochs=1, n_train=16, batch_size=16, n_anchors=100, n_eval=40, progress=False,
              talk={"prompts": ["a dog"]})
    T.require_generative(tiny["t5"])
    T.require_generative(tiny["llama"])


def test_gpt2_blocks_are_found_and_modulated():
    """GPT-2-style causal LMs keep their blocks in transformer.h: the LERP hooks land there, alpha 0
    leaves the logits bit for bit, alpha 0.5 changes them, and cached generation equals a loop
    that reruns the whole sequence."""
    import transformers as tf

    from terrain.modulate import LerpModulator, encoder_blocks
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32,
                                             bos_token_id=0, eos_token_id=0)).eval()
    assert encoder_blocks(model) is model.transformer.h
    mod = LerpModulator(50, 16, 2, geo_dim=4)
    mod.set_vectors(np.arange(5, 30), np.random.default_rng(0).standard_normal((25, 4)))
    ids = torch.tensor([[5, 6, 7, 40, 8]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with mod.attached(model, [0, 1]):
            mod.set_alpha(0.0)
            assert torch.equal(model(input_ids=ids).logits, ref)
            mod.set_alpha(0.5)
            assert not torch.allclose(model(input_ids=ids).logits, ref)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)[0].tolist()
            seq = ids[0].tolist()
            for _ in range(6):
                seq.append(int(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    assert out == seq
