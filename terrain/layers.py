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
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from cliargs import SEED, Parser

from terrain import metrics as M
from plotting import save_figure
from terrain.models import DEFAULT_MODEL, TerrainError, load_model, model_device, resolve_model_name
from terrain.cli import add_model_flags, add_output_flags, resolve_device, run_for_models

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
POST_LN = {"bert", "roberta", "distilbert", "electra", "xlm-roberta", "camembert", "mpnet", "albert"}


def pairwise_cos_mean(H: np.ndarray) -> float:
    U = M.unit(H)
    n = len(U)
    s = U.sum(0)
    return float((s @ s - n) / (n * (n - 1)))  # mean over distinct pairs, without forming n x n


def shuffled(H: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.permutation(H[:, j]) for j in range(H.shape[1])], axis=1)


@torch.no_grad()
def evolution(name: str | None, sentences: list[str], seed: int = 0, dtype: str = "float32",
              device: str = "cpu", encoder_only: bool = False) -> dict:
    from transformers import AutoTokenizer
    model, config = load_model(name, dtype, device, part="encoder" if encoder_only else "model")
    tok = AutoTokenizer.from_pretrained(resolve_model_name(name), local_files_only=True)
    enc = tok(sentences, return_tensors="pt", padding=True)
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
    keep = enc["attention_mask"].bool().numpy().ravel()
    rng = np.random.default_rng(seed)
    post_ln = config.model_type in POST_LN
    flat = lambda h: h.float().cpu().numpy().reshape(-1, h.shape[-1])[keep]  # noqa: E731
    res = {"model": name or DEFAULT_MODEL, "model_type": config.model_type, "n_sentences": len(sentences),
           "n_tokens": int(keep.sum()), "post_ln": post_ln, "states": state_stats(hidden, flat, post_ln, config, rng)}
    if seq2seq:
        res["decoder_states"] = state_stats(dec_hidden, flat, post_ln, config, rng)
        enc_last = flat(hidden[-1])
        res["encoder_vs_decoder"] = [
            {"decoder_state": i, "same_depth": M.space_alignment(flat(hidden[min(i, len(hidden) - 1)]), flat(h),
                                                                 rng=rng),
             "encoder_output": M.space_alignment(enc_last, flat(h), rng=rng)} for i, h in enumerate(dec_hidden)]
    return res


def shift_right(ids: torch.Tensor, config) -> torch.Tensor:
    """Decoder inputs for teacher forcing on the same text: the start token, then ids[:-1]."""
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    return torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)


def state_stats(hidden, flat, post_ln: bool, config, rng: np.random.Generator) -> list[dict]:
    """Norms and mean pairwise cosine (beside the shuffled control) of each hidden state."""
    states = []
    n = len(hidden)
    for i, h in enumerate(hidden):
        H = flat(h)
        norms = np.linalg.norm(H, axis=1)
        states.append({"index": i, "name": "embeddings" if i == 0 else f"layer {i}",
                       "after_layer_norm": bool(post_ln or i == n - 1 and not post_ln and _final_norm(config)),
                       "mean_norm": float(norms.mean()), "norm_std": float(norms.std()),
                       "mean_pair_cos": pairwise_cos_mean(H), "shuffled_pair_cos": pairwise_cos_mean(shuffled(H, rng))})
    return states


def _final_norm(config) -> bool:
    """Pre-LN families whose returned last hidden state has the final norm applied."""
    return config.model_type in {"t5", "mt5", "umt5", "llama", "qwen2", "qwen3", "qwen3_5", "qwen3_5_text", "mistral",
                                 "gemma", "phi3"}


def format_summary(res: dict) -> str:
    lines = [f"{res['model']} ({res['model_type']}): {res['n_sentences']} sentences, {res['n_tokens']} tokens",
             "| state | mean norm | norm std | mean pair cos | shuffled | after LayerNorm |", "|---|---|---|---|---|---|"]
    for s in res["states"]:
        lines.append(f"| {s['name']} | {s['mean_norm']:.2f} | {s['norm_std']:.2f} | {s['mean_pair_cos']:.3f} | "
                     f"{s['shuffled_pair_cos']:.3f} | {'yes' if s['after_layer_norm'] else ''} |")
    if "decoder_states" in res:
        lines += ["decoder (the same text, teacher-forced) against the encoder: value [tokens shuffled]",
                  "| decoder state | mean norm | mean pair cos | shuffled | CKA same depth | CKA encoder output | "
                  "per-token cos same depth |", "|---|---|---|---|---|---|---|"]
        for s, a in zip(res["decoder_states"], res["encoder_vs_decoder"]):
            sd, eo = a["same_depth"], a["encoder_output"]
            lines.append(f"| {s['name']} | {s['mean_norm']:.2f} | {s['mean_pair_cos']:.3f} | {s['shuffled_pair_cos']:.3f}"
                         f" | {sd['cka']:.3f} [{sd['null_cka']:.3f}] | {eo['cka']:.3f} [{eo['null_cka']:.3f}] | "
                         f"{sd['row_cosine']['mean']:.3f} [{sd['row_cosine']['null_shuffled_mean']:.3f}] |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt
    st = res["states"]
    x = np.arange(len(st))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].errorbar(x, [s["mean_norm"] for s in st], yerr=[s["norm_std"] for s in st], fmt="o-")
    axes[0].set_title("Token norm (mean +- std)")
    axes[1].plot(x, [s["mean_pair_cos"] for s in st], "o-", label="tokens")
    axes[1].plot(x, [s["shuffled_pair_cos"] for s in st], "k:", label="shuffled control")
    if "decoder_states" in res:
        ds = res["decoder_states"]
        xd = np.arange(len(ds))
        axes[0].errorbar(xd, [s["mean_norm"] for s in ds], yerr=[s["norm_std"] for s in ds], fmt="s--", color="C1",
                         label="decoder (same text)")
        axes[0].legend()
        axes[1].plot(xd, [s["mean_pair_cos"] for s in ds], "s--", color="C1", label="decoder tokens")
        axes[1].plot(xd, [a["same_depth"]["cka"] for a in res["encoder_vs_decoder"]], "^-", color="C2",
                     label="CKA decoder vs encoder, same depth")
        axes[1].plot(xd, [a["same_depth"]["null_cka"] for a in res["encoder_vs_decoder"]], "^:", color="C2",
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
                   help="model names or local folders (see terrain/models.py; default: the offline MiniLM)")
    p.add_argument("--sentences-file", default=None, help="one sentence per line (default: 16 built-in)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the shuffled control")
    p.add_argument("--encoder-only", action="store_true",
                   help="an encoder-decoder's decoder is neither read nor run (half the memory; no decoder "
                        "states, no encoder-decoder comparison)")
    add_output_flags(p)
    add_model_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sentences = SENTENCES
    if args.sentences_file:
        if not os.path.exists(args.sentences_file):
            print(f"error: {args.sentences_file} not found", file=sys.stderr)
            return 2
        sentences = [s.strip() for s in open(args.sentences_file) if s.strip()]
    code, _, written = run_for_models(args, "layers",
                                      lambda n: evolution(n, sentences, args.seed, args.dtype, resolve_device(args.device),
                                                                         args.encoder_only),
                                      format_summary, plot)
    if written:
        print("wrote " + ", ".join(written))
    return code


if __name__ == "__main__":
    sys.exit(main())
