"""Layer evolution: hidden states of a set of sentences through every layer of a text model.

    python -m terrain.layers                            # offline MiniLM, built-in sentences
    python -m terrain.layers --model t5-small --sentences-file my_sentences.txt

Per hidden state (the embedding output, then each layer): mean token norm, spread of the
norms, and the mean pairwise cosine of all (non-padding) tokens of all sentences, with the
same cosine for a shuffled control (each hidden dimension permuted across tokens
independently: every dimension keeps its marginal, hence the common offset, while the
token-specific structure is destroyed; a cosine equal to the shuffled one is explained by
the common offset alone).
An encoder-decoder (T5) also feeds the same text to its decoder, teacher-forced (position t
has seen tokens < t), and compares each decoder state with the encoder state of the same
depth and with the encoder output: linear CKA, Procrustes R^2 and per-token cosine, each
beside the same with the token correspondence shuffled.
States taken after a LayerNorm are flagged: all of them in post-LN models (BERT family),
the last one in pre-LN models whose final norm is applied to the output (T5, Llama, ...):
their norms say more about the norm's scale than about the layer.
Degenerate states: tokens whose state has zero norm have no direction and are left out of the
cosines (counted in "rows_left_out"); a state holding NaN or inf is reported as such
({"nonfinite": true, "n_nonfinite": k}) and not analysed.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

import safeio
from cliargs import SEED, Parser

from terrain import metrics as M
from plotting import save_figure
from terrain.models import DEFAULT_MODEL, TerrainError, check_token_ids, load_model, load_tokenizer, model_device
from terrain.cli import add_model_flags, add_output_flags, read_lines, resolve_device, run_for_models

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose sharply after the announcement.",
    "She played the violin at the village wedding.",
    "Photosynthesis turns light into chemical energy.",
    "The committee postponed its decision until spring.",
    "A small boat drifted slowly across the lake.",
    "He forgot his keys and had to climb through the window.",
    "The algorithm sorts the list in logarithmic passes.",
    "Heavy snow closed the mountain roads for a week.",
    "Children laughed as the clown juggled oranges.",
    "The museum displays tools from the bronze age.",
    "Our train was delayed by a signal failure.",
    "Seven ravens circled above the old stone tower.",
    "The recipe needs two eggs and a cup of flour.",
    "Voters waited in long lines outside the school.",
    "The telescope revealed rings around the distant planet.",
]
MAX_TOKENS = 512  # tokens kept of each sentence
POST_LN = {"bert", "roberta", "distilbert", "electra", "xlm-roberta", "camembert", "mpnet", "albert"}


def pairwise_cos_mean(H: np.ndarray) -> float:
    """Mean cosine over distinct pairs of the rows (NaN for fewer than two rows)."""
    U = M.unit(H)
    n = len(U)
    if n < 2:
        return float("nan")
    s = U.sum(0)
    return float((s @ s - n) / (n * (n - 1)))  # mean over distinct pairs, without forming n x n


def shuffled(H: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.permutation(H[:, j]) for j in range(H.shape[1])], axis=1)


@torch.no_grad()
def evolution(name: str | None, sentences: list[str], seed: int = 0, dtype: str = "float32",
              device: str = "cpu", encoder_only: bool = False) -> dict:
    model, config = load_model(name, dtype, device, part="encoder" if encoder_only else "model")
    tok = load_tokenizer(name)
    if tok.pad_token is None:  # decoder-only tokenizers often have none; the mask excludes padding anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    try:
        enc = tok(sentences, return_tensors="pt", padding=True, truncation=True, max_length=token_limit(config, tok))
    except (ValueError, TypeError) as e:
        raise TerrainError(f"the tokenizer of {name or DEFAULT_MODEL} cannot encode the sentences ({e})") from None
    check_token_ids(enc["input_ids"], model, name)
    n_states = (getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None) or 1) + 1
    safeio.check_fits(4 * enc["input_ids"].numel() * n_states * (2 if dec_hidden_wanted(config, encoder_only) else 1)
                      * (getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 1) * 3,
                      f"the hidden states of {len(sentences)} sentences", "pass fewer or shorter sentences")
    dev = model_device(model)
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False)) and not encoder_only
    try:
        if seq2seq:   # the decoder reads the same text, teacher-forced: position t has seen tokens < t
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=shift_right(ids, config),
                        decoder_attention_mask=mask, output_hidden_states=True)
            hidden, dec_hidden = out.encoder_hidden_states, out.decoder_hidden_states
        else:
            hidden, dec_hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, None
    except TypeError as e:
        raise TerrainError(f"layer evolution needs a text model taking input_ids ({e})") from e
    keep = enc["attention_mask"].bool().cpu().numpy().ravel()
    rng = np.random.default_rng(seed)
    post_ln = config.model_type in POST_LN
    flat = lambda h: h.float().cpu().numpy().reshape(-1, h.shape[-1])[keep]  # noqa: E731
    res = {"model": name or DEFAULT_MODEL, "model_type": config.model_type, "n_sentences": len(sentences),
           "n_tokens": int(keep.sum()), "post_ln": post_ln, "states": state_stats(hidden, flat, post_ln, config, rng)}
    if seq2seq:
        res["decoder_states"] = state_stats(dec_hidden, flat, post_ln, config, rng)
        enc_last = flat(hidden[-1])
        res["encoder_vs_decoder"] = [
            {"decoder_state": i, "same_depth": alignment(flat(hidden[min(i, len(hidden) - 1)]), flat(h), rng),
             "encoder_output": alignment(enc_last, flat(h), rng)} for i, h in enumerate(dec_hidden)]
    return res


def token_limit(config, tok) -> int:
    """Tokens kept of each sentence: MAX_TOKENS, or fewer when the model has fewer positions."""
    limits = [MAX_TOKENS, getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None),
              getattr(tok, "model_max_length", None)]
    return min(int(v) for v in limits if isinstance(v, (int, float)) and 1 <= v < 1e9)


def dec_hidden_wanted(config, encoder_only: bool) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False)) and not encoder_only


def alignment(A: np.ndarray, B: np.ndarray, rng: np.random.Generator) -> dict:
    """metrics.space_alignment of two states, or what keeps it from being defined (non-finite
    values, too few tokens of nonzero norm)."""
    for what, X in (("first", A), ("second", B)):
        bad = M.nonfinite_report(X)
        if bad is not None:
            return {"skipped": f"the {what} state holds {bad['n_nonfinite']} non-finite values", **bad}
    try:
        return M.space_alignment(A, B, rng=rng)
    except ValueError as e:
        return {"skipped": str(e)}


def shift_right(ids: torch.Tensor, config) -> torch.Tensor:
    """Decoder inputs for teacher forcing on the same text: the start token, then ids[:-1]."""
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    rows = getattr(config, "vocab_size", None)
    if not isinstance(start, int) or start < 0 or (isinstance(rows, int) and start >= rows):
        raise TerrainError(f"the model config's decoder_start_token_id / pad_token_id {start!r} is not a token id; "
                           f"the decoder cannot be fed (pass --encoder-only)")
    return torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)


def state_stats(hidden, flat, post_ln: bool, config, rng: np.random.Generator) -> list[dict]:
    """Norms and mean pairwise cosine (beside the shuffled control) of each hidden state."""
    states = []
    n = len(hidden)
    for i, h in enumerate(hidden):
        H = flat(h)
        st = {"index": i, "name": "embeddings" if i == 0 else f"layer {i}",
              "after_layer_norm": bool(post_ln or i == n - 1 and not post_ln and _final_norm(config))}
        bad = M.nonfinite_report(H)
        if bad is not None:          # not analysed: the non-finite values are reported instead
            states.append({**st, **bad})
            continue
        norms = np.linalg.norm(H, axis=1)
        ok, left = M.nonzero_rows(H)  # cosines of the tokens with a direction
        S = shuffled(H, rng)
        states.append({**st, "mean_norm": float(norms.mean()), "norm_std": float(norms.std()),
                       "mean_pair_cos": pairwise_cos_mean(H[ok]),
                       "shuffled_pair_cos": pairwise_cos_mean(S[np.linalg.norm(S, axis=1) > 0]),
                       **({"rows_left_out": left} if left else {})})
    return states


def _final_norm(config) -> bool:
    """Pre-LN families whose returned last hidden state has the final norm applied."""
    return config.model_type in {"t5", "mt5", "umt5", "llama", "qwen2", "qwen3", "qwen3_5", "qwen3_5_text", "mistral",
                                 "gemma", "phi3"}


def format_summary(res: dict) -> str:
    lines = [f"{res['model']} ({res['model_type']}): {res['n_sentences']} sentences, {res['n_tokens']} tokens",
             "| state | mean norm | norm std | mean pair cos | shuffled | after LayerNorm |", "|---|---|---|---|---|---|"]
    for s in res["states"]:
        if s.get("nonfinite"):
            lines.append(f"| {s['name']} | not analysed: {s['n_nonfinite']} non-finite values | | | | |")
            continue
        lines.append(f"| {s['name']} | {s['mean_norm']:.2f} | {s['norm_std']:.2f} | {s['mean_pair_cos']:.3f} | "
                     f"{s['shuffled_pair_cos']:.3f} | {'yes' if s['after_layer_norm'] else ''} |")
    if "decoder_states" in res:
        lines += ["decoder (the same text, teacher-forced) against the encoder: value [tokens shuffled]",
                  "| decoder state | mean norm | mean pair cos | shuffled | CKA same depth | CKA encoder output | "
                  "per-token cos same depth |", "|---|---|---|---|---|---|---|"]
        for s, a in zip(res["decoder_states"], res["encoder_vs_decoder"]):
            sd, eo = a["same_depth"], a["encoder_output"]
            if s.get("nonfinite") or "cka" not in sd or "cka" not in eo:
                lines.append(f"| {s['name']} | not analysed: {s.get('n_nonfinite', 0)} non-finite values, "
                             f"{sd.get('skipped', eo.get('skipped', ''))} | | | | | |")
                continue
            lines.append(f"| {s['name']} | {s['mean_norm']:.2f} | {s['mean_pair_cos']:.3f} | {s['shuffled_pair_cos']:.3f}"
                         f" | {sd['cka']:.3f} [{sd['null_cka']:.3f}] | {eo['cka']:.3f} [{eo['null_cka']:.3f}] | "
                         f"{sd['row_cosine']['mean']:.3f} [{sd['row_cosine']['null_shuffled_mean']:.3f}] |")
    return "\n".join(lines)


def _v(s: dict, key: str) -> float:
    """A state's statistic for a figure (NaN where the state was not analysed)."""
    v = s.get(key)
    return float("nan") if v is None else v


def plot(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    st = res["states"]
    x = np.arange(len(st))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].errorbar(x, [_v(s, "mean_norm") for s in st], yerr=[_v(s, "norm_std") for s in st], fmt="o-")
    axes[0].set_title("Token norm (mean +- std)")
    axes[1].plot(x, [_v(s, "mean_pair_cos") for s in st], "o-", label="tokens")
    axes[1].plot(x, [_v(s, "shuffled_pair_cos") for s in st], "k:", label="shuffled control")
    if "decoder_states" in res:
        ds = res["decoder_states"]
        xd = np.arange(len(ds))
        axes[0].errorbar(xd, [_v(s, "mean_norm") for s in ds], yerr=[_v(s, "norm_std") for s in ds], fmt="s--", color="C1",
                         label="decoder (same text)")
        axes[0].legend()
        axes[1].plot(xd, [_v(s, "mean_pair_cos") for s in ds], "s--", color="C1", label="decoder tokens")
        axes[1].plot(xd, [_v(a["same_depth"], "cka") for a in res["encoder_vs_decoder"]], "^-", color="C2",
                     label="CKA decoder vs encoder, same depth")
        axes[1].plot(xd, [_v(a["same_depth"], "null_cka") for a in res["encoder_vs_decoder"]], "^:", color="C2",
                     label="CKA, tokens shuffled")
    axes[1].set_title("Mean pairwise cosine")
    axes[1].legend()
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels([("*" if s["after_layer_norm"] else "") + s["name"].replace("layer ", "") for s in st])
        ax.set_xlabel("hidden state (* = after a LayerNorm)")
    fig.suptitle(f"Layer evolution of {res['model']}")
    return save_figure(fig, path, dpi=100)


def build_parser() -> Parser:
    p = Parser(prog="python -m terrain.layers",
               description="Hidden-state norms and cosines through the layers of a text model.")
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL],
                   help="model names, local folders or .gguf files (see terrain/models.py): minilm = the offline all-MiniLM-L6-v2 (default), smollm2 = SmolLM2-135M-Instruct after `make models`")
    p.add_argument("--sentences-file", default=None,
                   help=f"one sentence per line, UTF-8 (default: 16 built-in); each cut to {MAX_TOKENS} tokens, or to "
                        f"the model's positions when fewer")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the shuffled control")
    p.add_argument("--encoder-only", action="store_true",
                   help="an encoder-decoder's decoder is neither read nor run (half the memory; no decoder "
                        "states, no encoder-decoder comparison)")
    add_output_flags(p)
    add_model_flags(p)
    return p


@safeio.one_line_errors(TerrainError)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sentences = read_lines(args.sentences_file, "--sentences-file") if args.sentences_file else SENTENCES
    code, _, written = run_for_models(args, "layers",
                                      lambda n: evolution(n, sentences, args.seed, args.dtype, resolve_device(args.device),
                                                                         args.encoder_only),
                                      format_summary, plot)
    if written:
        print("wrote " + ", ".join(written))
    return code


if __name__ == "__main__":
    sys.exit(main())
