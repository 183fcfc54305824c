"""Talk to the modulated model: generations of the unmodulated and the modulated model side by side.

    python -m terrain.modulate --talk --model PATH_TO_T5 --prompt "summarize: A triangle is a polygon ..."
    python -m terrain.modulate --talk --model PATH --prompts-file prompts.txt --temperature 0.7 --top-p 0.9

The modulator is the WordNet-initialised LERP of terrain/modulate.py (fit on anchor items
only); with `--train` the trained modulator talks at its learned alphas. Every prompt is
answered by
- the unmodulated model;
- the unmodulated model again with another sampling seed (only when sampling): the null for
  how much two generations differ by chance;
- the modulated model at each alpha, with the WordNet rows and with the rows shuffled among
  items (the control), all with the same sampling seed as the unmodulated answer, so that with
  the modulator switched off the tokens would be identical (common random numbers).

Each generation is scored automatically: the mean per-token log-likelihood of its tokens
under the unmodulated model (how far the modulated model's text is from what the bare model
would say), distinct-1 and distinct-2 (unique n-grams over n-grams: repetition), and the
token edit distance to the unmodulated answer over the longer length. Generating needs a model
with a language-model head: an encoder-decoder (T5 family) or a causal LM.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from plotting import save_figure
from statsutil import seed_ci
from terrain.cli import read_lines
from terrain.models import DEFAULT_MODEL, TerrainError, is_causal_lm, load_config, resolve_model_name


def distinct_n(tokens, n: int) -> float:
    """Unique n-grams over all n-grams of one token sequence (NaN when it is shorter than n)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def edit_distance(a, b) -> int:
    """Levenshtein distance between two token sequences (insert, delete, substitute: cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def encode_prompt(model, tok, prompt: str) -> dict:
    enc = tok([prompt], return_tensors="pt", truncation=True, max_length=256)
    return {k: v.to(next(model.parameters()).device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def generate(model, tok, enc: dict, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list[int]:
    """The new tokens only (no prompt, no decoder start token), up to and without the end token."""
    sample = temperature > 0
    kw = {"do_sample": sample, "max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id
          if tok.pad_token_id is not None else tok.eos_token_id}
    if sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:  # a model's generation_config may ask for sampling: greedy means greedy here
        kw.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, **kw)[0].tolist()
    new = out[1:] if is_seq2seq(model) else out[enc["input_ids"].shape[1]:]
    eos = model.generation_config.eos_token_id
    stop = {*(eos if isinstance(eos, list) else [eos]), tok.eos_token_id, tok.pad_token_id} - {None}
    for i, t in enumerate(new):
        if t in stop:
            return new[:i]
    return new


def token_logliks(model, enc: dict, new: list[int]) -> np.ndarray:
    """log p(token_t | prompt, tokens_<t) of each generated token under `model` as it is (one
    teacher-forced pass)."""
    if not new:
        return np.zeros(0)
    dev = enc["input_ids"].device
    ids = torch.tensor([new], device=dev)
    with torch.no_grad():
        if is_seq2seq(model):
            logits = model(**enc, labels=ids).logits[0]
        else:
            full = torch.cat([enc["input_ids"], ids], 1)
            logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0,
                                                                                     enc["input_ids"].shape[1] - 1:-1]
    lp = torch.log_softmax(logits.float(), -1)
    return lp[torch.arange(len(new)), ids[0]].cpu().numpy()


def score(tokens: list[int], loglik: np.ndarray, reference: list[int] | None) -> dict:
    n = max(len(tokens), len(reference or []))
    return {"n_tokens": len(tokens),
            "loglik_unmodulated": float(loglik.mean()) if len(loglik) else float("nan"),
            "distinct_1": distinct_n(tokens, 1), "distinct_2": distinct_n(tokens, 2),
            "edit_fraction": (edit_distance(tokens, reference) / n if n else 0.0) if reference is not None
            else float("nan")}


def converse(model, tok, modulator, prompts: list[str], conditions: list[tuple[str, float | None, object]],
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 0.9, seed: int = 0,
             progress: bool = True) -> list[dict]:
    """For each prompt, the unmodulated answer, its resampled null (sampling only) and one answer per
    condition (label, alpha, setup); setup() readies the attached modulator, alpha None keeps its
    own alphas. Every answer is scored under the unmodulated model."""
    from tqdm import tqdm
    out = []
    for p_i, prompt in enumerate(tqdm(prompts, desc="talking", disable=not progress, leave=False)):
        enc = encode_prompt(model, tok, prompt)
        s = seed + 1000 * p_i
        with modulator.suspended():
            ref = generate(model, tok, enc, max_new_tokens, temperature, top_p, s)
            answers = [("unmodulated", None, ref, token_logliks(model, enc, ref))]
            if temperature > 0:
                again = generate(model, tok, enc, max_new_tokens, temperature, top_p, s + 1)
                answers.append(("unmodulated, another seed", None, again, token_logliks(model, enc, again)))
        for label, alpha, setup in conditions:
            if setup is not None:
                setup()
            if alpha is not None:
                modulator.set_alpha(alpha)
            new = generate(model, tok, enc, max_new_tokens, temperature, top_p, s)
            with modulator.suspended():
                answers.append((label, alpha, new, token_logliks(model, enc, new)))
        out.append({"prompt": prompt, "answers": [
            {"condition": label, "alpha": alpha, "text": tok.decode(new, skip_special_tokens=True),
             **score(new, ll, ref)} for label, alpha, new, ll in answers]})
    return out


def summarise(conversations: list[dict]) -> list[dict]:
    """Per (condition, alpha): mean and 95% t interval over prompts of each score, and the share of
    prompts whose answer is identical to the unmodulated one."""
    keys = []
    for c in conversations:
        for a in c["answers"]:
            if (a["condition"], a["alpha"]) not in keys:
                keys.append((a["condition"], a["alpha"]))
    rows = []
    for cond, alpha in keys:
        ans = [a for c in conversations for a in c["answers"] if (a["condition"], a["alpha"]) == (cond, alpha)]
        row = {"condition": cond, "alpha": alpha, "n_prompts": len(ans),
               "identical": float(np.mean([a["edit_fraction"] == 0 for a in ans]))}
        for k in ("loglik_unmodulated", "distinct_1", "distinct_2", "edit_fraction", "n_tokens"):
            row[k] = seed_ci([a[k] for a in ans])
        rows.append(row)
    return rows


def require_generative(name: str | None) -> None:
    """One clear error, before anything is loaded, for a model that cannot generate text."""
    import os

    path = resolve_model_name(name)
    if not os.path.exists(path):
        return                                       # load_model names what is missing
    config = load_config(path)
    if not (getattr(config, "is_encoder_decoder", False) or is_causal_lm(config)):
        raise TerrainError(f"{name or DEFAULT_MODEL}: --talk needs a model that generates text (an encoder-decoder "
                           f"such as T5, or a causal language model saved with its head); its architectures are "
                           f"{getattr(config, 'architectures', None)}")


def format_answers(conversations: list[dict], width: int = 100) -> list[str]:
    lines = []
    for conv in conversations:
        lines.append(f"PROMPT: {conv['prompt'][:width]}")
        for a in conv["answers"]:
            tag = a["condition"] + (f" a={a['alpha']:g}" if a["alpha"] is not None else "")
            lines.append(f"  {tag:>28}: {a['text'][:width]!r}  (loglik {a['loglik_unmodulated']:.2f}, "
                         f"edit {a['edit_fraction']:.2f})")
    return lines


def format_summary(res: dict) -> str:
    how = (f"sampling, temperature {res['temperature']:g}, top-p {res['top_p']:g}" if res["temperature"] > 0
           else "greedy")
    lines = [f"{res['model']}: talking to the LERP-modulated model ({how}, up to {res['max_new_tokens']} new tokens; "
             f"prompts: {res['prompts_from']})"]
    lines += format_answers(res["conversations"])
    lines += summary_table(res["summary"])
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> list[str]:
    def ci(d):
        return f"{d['mean']:.3f}" + (f" [{d['lo']:.3f}, {d['hi']:.3f}]" if math.isfinite(d["lo"]) else "")
    lines = ["| condition | alpha | loglik under unmodulated | distinct-1 | distinct-2 | edit fraction | identical |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['condition']} | {'' if r['alpha'] is None else format(r['alpha'], 'g')} | "
                     f"{ci(r['loglik_unmodulated'])} | {ci(r['distinct_1'])} | {ci(r['distinct_2'])} | "
                     f"{ci(r['edit_fraction'])} | {r['identical']:.2f} |")
    return lines


def plot(res: dict, path: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.4))
    keys = (("loglik_unmodulated", "mean log-likelihood under the unmodulated model"),
            ("edit_fraction", "token edit distance to the unmodulated answer"), ("distinct_2", "distinct-2"))
    rows = res["summary"]
    for cond, color in (("wordnet", "tab:green"), ("shuffled_rows", "tab:grey")):
        rr = [r for r in rows if r["condition"] == cond]
        a = [r["alpha"] for r in rr]
        for k, (key, _) in enumerate(keys):
            m = np.array([r[key]["mean"] for r in rr])
            lo = np.array([r[key]["lo"] for r in rr])
            hi = np.array([r[key]["hi"] for r in rr])
            ax[k].plot(a, m, "o-", color=color, label=cond)
            ax[k].fill_between(a, lo, hi, color=color, alpha=0.15)
    for k, (key, title) in enumerate(keys):
        for r, ls in ((next((r for r in rows if r["condition"] == "unmodulated"), None), ":"),
                      (next((r for r in rows if r["condition"] == "unmodulated, another seed"), None), "--")):
            if r is not None and math.isfinite(r[key]["mean"]):
                ax[k].axhline(r[key]["mean"], color="k", ls=ls, label=r["condition"])
        ax[k].set_xscale("log")
        ax[k].set_xlabel("alpha")
        ax[k].set_title(title, fontsize=10)
        ax[k].legend(fontsize=8)
    fig.suptitle(f"{res['model']}: modulated against unmodulated generations (mean and 95% t interval over "
                 f"{rows[0]['n_prompts']} prompts)")
    return save_figure(fig, path)


def read_prompts(prompts: list[str] | None, path: str | None) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts-file (UTF-8 text; one line when it is
    missing, a folder, binary or empty)."""
    out = list(prompts or [])
    if path:
        out += read_lines(path, "--prompts-file")
    return out
