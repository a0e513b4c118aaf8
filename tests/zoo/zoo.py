"""Builds transformers models from tiny random-init configs and measures attnopt on each.

Nothing is downloaded: every model comes from its config class's defaults, shrunk (`tiny_config`),
with random weights. For one entry (a model type and an attention implementation, "eager" or
"sdpa") `measure` runs:

- the original, under `AttentionCounter` (a TorchDispatchMode): the attention calls it really
  makes — every fused SDPA kernel call, every `nn.MultiheadAttention` fast-path call, and every
  softmax over the last dim of a rank >= 3 tensor whose result (through views, copies and a few
  more ops) reaches a matmul;
- `attnopt.inspect`: the sites found, rewritable or refused with a reason;
- `attnopt.rewrite(model, "exact", inner="eager")`, once to warm it up (dynamo captures and plans on the first
  call) and once under the counter: the calls that go through `attnopt::exact_attention`, and the
  original attention calls still left;
- the outputs of both, compared (relative error: max |a - e| / max |e| per output tensor).

The result is an `Outcome`: "all" (every attention call goes through attnopt's op), "partial",
"none", "no-attention" (the original makes no attention call), "error" (inspect, rewrite or the
rewritten forward raised), "WRONG" (the exact rewrite differs from the original by more than
RTOL) or "skipped" (the model could not be built or run from a tiny config).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect as pyinspect
import json
import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnopt

RTOL = 1e-4
"""Largest relative output difference of the exact rewrite accepted in float32."""

IMPLEMENTATIONS = ("eager", "sdpa")
INNER = "eager"
"""What runs the rewritten graphs. Under Inductor (rewrite's default) attnopt's op is traced into
its body, so the op's calls could not be counted at run time; the graphs attnopt rewrote run as
they are instead (and no Inductor compile per graph slows the zoo down)."""
MAX_PARAMETERS = 100_000_000
"""A model whose tiny config still has more parameters than this is skipped (too slow to build)."""

BATCH, SEQ, DECODER_SEQ = 2, 8, 5


# ── Counting the attention calls that really run ──────────────────────────────────────────────

SDPA_PREFIX = "aten::_scaled_dot_product"
FUSED_MHA = {"aten::_native_multi_head_attention", "aten::_transformer_encoder_layer_fwd"}
SOFTMAXES = {"aten::_softmax", "aten::_safe_softmax"}
MATMULS = {"aten::bmm", "aten::mm", "aten::baddbmm", "aten::addmm", "aten::addbmm", "aten::matmul", "aten::dot"}
EXACT_OP = "attnopt::exact_attention"
TAINT_HOPS = 6
"""How many ops a softmax's result may pass through (views are free) and still count as reaching a matmul."""


def _storage_key(t: torch.Tensor) -> int | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - tensor subclasses without storage
        return None


class AttentionCounter(TorchDispatchMode):
    """Counts the attention calls one forward makes, at the dispatcher (below any Python wrapper).

    `ignore_compile_internals` keeps dynamo compiling under the mode (a plain mode makes dynamo skip
    every frame, so a rewritten module would run its original code); the mode is then off while
    dynamo compiles and on while the compiled code runs. Ops run inside a counted op (the softmax
    inside the exact op's reference, the kernels inside an SDPA call) are not seen: the mode is
    popped while it handles a call.
    """

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self) -> None:
        super().__init__()
        self.sdpa = 0
        self.fused_mha = 0
        self.exact = 0
        self.softmax_shapes: list[tuple[int, ...]] = []
        self.softmax_to_matmul: set[int] = set()
        self._taint: dict[int, tuple[int, int]] = {}  # storage -> (softmax index, hops)
        self._alive: list[torch.Tensor] = []  # keeps tainted storages from being reused

    @property
    def attention_softmax(self) -> int:
        return len(self.softmax_to_matmul)

    @property
    def other_softmax(self) -> int:
        return len(self.softmax_shapes) - len(self.softmax_to_matmul)

    @property
    def original_attention(self) -> int:
        """Attention calls made by the model's own code (not through attnopt's op)."""
        return self.sdpa + self.fused_mha + self.attention_softmax

    def counts(self) -> dict[str, int]:
        return {"sdpa": self.sdpa, "fused_mha": self.fused_mha, "softmax_attention": self.attention_softmax,
                "other_softmax": self.other_softmax, "exact": self.exact}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if name == EXACT_OP:
            self.exact += 1
        elif name.startswith(SDPA_PREFIX) and "backward" not in name:
            self.sdpa += 1
        elif name in FUSED_MHA:
            self.fused_mha += 1
        elif name in SOFTMAXES:
            dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            if isinstance(out, torch.Tensor) and out.dim() >= 3 and dim % out.dim() == out.dim() - 1:
                self._mark(out, len(self.softmax_shapes), 0)
                self.softmax_shapes.append(tuple(out.shape))
        elif self._taint:
            sources = [self._taint.get(_storage_key(t)) for t in tree_leaves((args, kwargs))
                       if isinstance(t, torch.Tensor)]
            sources = [s for s in sources if s is not None]
            if sources:
                if name in MATMULS:
                    self.softmax_to_matmul.update(index for index, _ in sources)
                else:
                    index, hops = min(sources, key=lambda s: s[1])
                    if hops < TAINT_HOPS:
                        for t in tree_leaves(out):
                            if isinstance(t, torch.Tensor):
                                self._mark(t, index, hops + 1)
        return out

    def _mark(self, t: torch.Tensor, index: int, hops: int) -> None:
        key = _storage_key(t)
        if key is not None and key not in self._taint:
            self._taint[key] = (index, hops)
            self._alive.append(t)


# ── Tiny configs ───────────────────────────────────────────────────────────────────────────────

WIDTH, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB, LAYERS = 32, 4, 2, 8, 64, 128, 2
_WIDTH_KEYS = {"hidden_size", "d_model", "n_embd", "embed_dim", "dim", "word_embed_proj_dim", "projection_dim",
               "text_embed_dim", "vision_embed_dim", "d_embed", "embedding_size", "hidden_dim_size",
               "hidden_size_per_layer_input"}
_HEAD_KEYS = {"num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
              "num_heads", "attention_heads"}
_KV_KEYS = {"num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv"}
_HEAD_DIM_KEYS = {"head_dim", "attention_head_dim", "kv_channels", "d_kv", "attention_head_size", "qk_rope_head_dim",
                  "qk_nope_head_dim", "v_head_dim"}
_LAYER_KEYS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers", "text_layers", "vision_layers"}
_FFN_KEYS = {"intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff",
             "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_intermediate_size", "d_inner"}
_EXPERT_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_TOPK_KEYS = {"num_experts_per_tok", "moe_topk", "num_experts_per_token", "top_k"}
_POSITION_KEYS = {"max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length",
                  "max_target_positions", "n_ctx", "seq_length"}
_LORA_KEYS = {"kv_lora_rank", "q_lora_rank"}
_SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                   "cls_token_id", "unk_token_id", "mask_token_id")
_IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index",
                     "audio_token_id", "audio_token_index", "boi_token_id", "eoi_token_id", "boi_token_index",
                     "eoi_token_index", "vision_start_token_id", "vision_end_token_id", "image_start_token_id",
                     "image_end_token_id")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def shrink(d: dict[str, Any], widths: bool = True, head_dims: bool = True, mrope: bool = False) -> dict[str, Any]:
    """A config dict made tiny: 2 layers, width 32 with 4 heads (2 kv heads) of dim 8, FFN 64,
    vocabulary 128, 32-pixel images in 8-pixel patches; nested sub-config dicts shrunk alike.
    With head_dims=False the head dims (and rotary dims) stay and kv heads equal heads; with
    widths=False only depth, vocabulary, tokens, positions and experts shrink. mrope: give rotary
    parameters without `mrope_section` one (models that default it in their code, e.g. glm4v)."""
    d = dict(d)
    old_layers = next((d[k] for k in _LAYER_KEYS if _is_int(d.get(k))), None)
    for key, value in list(d.items()):
        if isinstance(value, dict) and key not in ("id2label", "label2id"):
            if "model_type" in value or key.endswith("config") or any(k in value for k in _WIDTH_KEYS | _LAYER_KEYS):
                d[key] = shrink(value, widths, head_dims, mrope)
            continue
        if key in _LAYER_KEYS and _is_int(value) and value > LAYERS:
            d[key] = LAYERS
        elif key.startswith("vocab_size") and _is_int(value) and value > VOCAB:
            d[key] = VOCAB
        elif key in _EXPERT_KEYS and _is_int(value) and value > 4:
            d[key] = 4
        elif key in _TOPK_KEYS and _is_int(value) and value > 2:
            d[key] = 2
        elif key in ("n_group", "topk_group", "num_expert_group", "topk_groups") and _is_int(value) and value > 1:
            d[key] = 1
        elif key in _POSITION_KEYS and _is_int(value) and value > 128:
            d[key] = 128
        elif key in _SPECIAL_TOKENS and (_is_int(value) and value >= VOCAB or isinstance(value, list)):
            d[key] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(key, 0)
        elif key in _IMAGE_TOKEN_KEYS and _is_int(value) and value >= VOCAB:
            d[key] = VOCAB - 1 - _IMAGE_TOKEN_KEYS.index(key)
        elif not widths:
            continue
        elif key in _WIDTH_KEYS and _is_int(value) and value > WIDTH:
            d[key] = WIDTH
        elif key in _HEAD_KEYS and _is_int(value) and value > HEADS:
            d[key] = HEADS
        elif key in _KV_KEYS and _is_int(value) and value > KV_HEADS:
            d[key] = KV_HEADS if head_dims else min(value, HEADS)
        elif (key in _HEAD_DIM_KEYS or key == "rotary_dim") and _is_int(value) and value > HEAD_DIM and head_dims:
            d[key] = HEAD_DIM
        elif key in _FFN_KEYS | {"hidden_dim"} and _is_int(value) and value > FFN:  # hidden_dim: distilbert's FFN
            d[key] = FFN
        elif key in _LORA_KEYS and _is_int(value) and value > 16:
            d[key] = 16
        elif key == "image_size" and (_is_int(value) and value > 32 or isinstance(value, list)):
            d[key] = 32 if _is_int(value) else [32] * len(value)
        elif key == "patch_size" and _is_int(value) and value > 8:
            d[key] = 8
        elif key in ("num_mel_bins", "max_source_positions") and _is_int(value) and value > 16:
            d[key] = 16
    if "kv_lora_rank" in d:  # multi-head latent attention: as many key heads as query heads
        heads = next((d[k] for k in _HEAD_KEYS if _is_int(d.get(k))), None)
        for key in _KV_KEYS & d.keys():
            if _is_int(d[key]) and heads:
                d[key] = heads
    if _is_int(d.get("qk_nope_head_dim")) and _is_int(d.get("qk_rope_head_dim")) and "qk_head_dim" in d:
        d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    if widths and head_dims:
        _fit_rope_sections(d, mrope)
    # Per-layer lists follow the new depth, keeping one of each kind of layer where there are two.
    new_layers = next((d[k] for k in _LAYER_KEYS if _is_int(d.get(k))), None)
    if old_layers and new_layers and new_layers < old_layers:
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == old_layers:
                kinds = list(dict.fromkeys(map(repr, value)))
                picked = [value[0]] + [v for v in value if repr(v) != repr(value[0])][: new_layers - 1]
                d[key] = (picked + value[len(picked):])[:new_layers] if len(kinds) > 1 else value[:new_layers]
        if d.get("out_features") is not None or d.get("out_indices") is not None:  # backbones: the last stage
            d["out_features"] = d["out_indices"] = None
        if isinstance(d.get("per_layer_config"), dict):
            d["per_layer_config"] = {k: v for k, v in d["per_layer_config"].items() if int(k) < new_layers}
    return d


def _fit_rope_sections(d: dict[str, Any], insert: bool) -> None:
    """Multimodal rotary sections (`mrope_section`) made to sum to half the tiny rotary dim."""
    heads = next((d[k] for k in _HEAD_KEYS if _is_int(d.get(k))), None)
    width = next((d[k] for k in _WIDTH_KEYS if _is_int(d.get(k))), None)
    head_dim = d.get("head_dim") if _is_int(d.get("head_dim")) else (width // heads if width and heads else None)
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.get(key)
        if isinstance(rope, dict) and insert and "mrope_section" not in rope:
            rope = {**rope, "mrope_section": [8, 12, 12]}
        if not isinstance(rope, dict) or not isinstance(rope.get("mrope_section"), list) or not head_dim:
            continue
        factor = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0
        half = int(head_dim * factor) // 2
        sections = rope["mrope_section"]
        quarter = half // 4
        fitted = [half - (len(sections) - 1) * quarter] + [quarter] * (len(sections) - 1)
        d[key] = {**rope, "mrope_section": fitted}


def model_types() -> list[str]:
    """Every model type transformers maps to a base model class, in its mapping's order."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return list(MODEL_MAPPING_NAMES)


def model_class(model_type: str) -> type:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    name = MODEL_MAPPING_NAMES[model_type]
    if isinstance(name, (tuple, list)):
        name = name[0]
    return getattr(transformers, name)


def config_class(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def tiny_configs(model_type: str) -> list[tuple[str, Any]]:
    """(tier, config) to try in order: everything shrunk; widths shrunk but head dims kept (and no
    grouped kv heads); depth, vocabulary and experts only."""
    cls = config_class(model_type)
    base = cls().to_dict()
    configs, errors = [], []
    tiers = (("tiny", True, True, False), ("tiny-mrope", True, True, True), ("tiny-mha", True, False, False),
             ("shallow", False, False, False))
    for tier, widths, head_dims, mrope in tiers:
        if mrope and "rope_parameters" not in json.dumps(base, default=str):
            continue
        try:
            config = cls.from_dict(shrink(base, widths, head_dims, mrope))
            config.use_cache = False
            configs.append((tier, config))
        except Exception as e:  # noqa: BLE001
            errors.append(f"{tier}: {first_line(e)}")
    if not configs:
        raise RuntimeError("no tiny config: " + "; ".join(errors))
    return configs


def supports(cls: type, implementation: str) -> bool:
    return implementation == "eager" or bool(getattr(cls, "_supports_sdpa", False))


def build(model_type: str, implementation: str, config: Any) -> nn.Module:
    cls = model_class(model_type)
    with torch.device("meta"):
        meta = cls._from_config(config, attn_implementation=implementation)
    count = sum(p.numel() for p in meta.parameters())
    del meta
    if count > MAX_PARAMETERS:
        raise RuntimeError(f"{count / 1e6:.0f}M parameters even from the shrunk config")
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation=implementation)
    return model.float().eval()


# ── Inputs ─────────────────────────────────────────────────────────────────────────────────────


def _sub(config: Any, *names: str) -> Any:
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, (int, float, str, bool, list, dict)):
            return sub
    return config


def _image_size(config: Any) -> tuple[int, int, int]:
    vision = _sub(config, "vision_config", "backbone_config")
    size = getattr(vision, "image_size", None) or getattr(config, "image_size", None) or 32
    if isinstance(size, (list, tuple)):
        h, w = size[-2], size[-1]
    elif isinstance(size, dict):
        h, w = size.get("height", 32), size.get("width", 32)
    else:
        h = w = size
    channels = getattr(vision, "num_channels", None) or getattr(config, "num_channels", None) or 3
    return int(channels), int(h), int(w)


def input_candidates(model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
    """(kind, kwargs) to try in order; the first the original runs with is the entry's input."""
    config = model.config
    params = pyinspect.signature(model.forward).parameters
    generator = torch.Generator().manual_seed(0)
    text = getattr(_sub(config, "text_config", "decoder"), "vocab_size", None) or getattr(config, "vocab_size", None) or 99
    high = max(4, min(int(text), 99))
    ids = torch.randint(3, high, (BATCH, SEQ), generator=generator)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0
    decoder = {}
    if "decoder_input_ids" in params:
        decoder = {"decoder_input_ids": torch.randint(3, high, (BATCH, DECODER_SEQ), generator=generator)}
    channels, h, w = _image_size(config)
    pixels = torch.randn(BATCH, channels, h, w, generator=generator)
    main = getattr(model, "main_input_name", "input_ids")
    candidates: list[tuple[str, dict[str, Any]]] = []
    if main == "pixel_values" or ("pixel_values" in params and "input_ids" not in params):
        candidates.append(("vision", {"pixel_values": pixels}))
    if main == "input_features" or "input_features" in params:
        bins = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", None) or 80
        frames = 2 * (getattr(config, "max_source_positions", None) or 16)
        features = torch.randn(BATCH, int(bins), int(frames), generator=generator)
        candidates.append(("audio", {"input_features": features, **decoder}))
    if main == "input_values" or "input_values" in params:
        candidates.append(("audio", {"input_values": torch.randn(BATCH, 3200, generator=generator)}))
    if "input_ids" in params:
        has_image_tokens = any(getattr(config, k, None) is not None for k in _IMAGE_TOKEN_KEYS)
        both = ("text+vision", {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, **decoder})
        if "pixel_values" in params and not has_image_tokens:
            candidates.append(both)
        if "attention_mask" in params:
            candidates.append(("text", {"input_ids": ids, "attention_mask": mask, **decoder}))
        candidates.append(("text (no mask)", {"input_ids": ids, **decoder}))
        if "pixel_values" in params and has_image_tokens:
            candidates.append(both)
    if not candidates:
        candidates.append((main, {main: pixels if "pixel" in main else ids}))
    return candidates


# ── Outputs ────────────────────────────────────────────────────────────────────────────────────


def output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


def difference(actual: Any, expected: Any) -> tuple[float, float]:
    """(max abs, max rel) difference over all output tensors; inf where shapes or NaNs differ."""
    a_list, e_list = output_tensors(actual), output_tensors(expected)
    if len(a_list) != len(e_list):
        return float("inf"), float("inf")
    worst_abs = worst_rel = 0.0
    for a, e in zip(a_list, e_list):
        if a.shape != e.shape:
            return float("inf"), float("inf")
        if e.numel() == 0:
            continue
        a, e = a.detach().double(), e.detach().double()
        if not torch.equal(torch.isnan(a), torch.isnan(e)):
            return float("inf"), float("inf")
        a, e = torch.nan_to_num(a), torch.nan_to_num(e)
        diff = (a - e).abs().max().item()
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / max(e.abs().max().item(), 1e-30))
    return worst_abs, worst_rel


# ── One entry ──────────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass
class Outcome:
    model_type: str
    implementation: str
    outcome: str = "skipped"
    tier: str = ""
    inputs: str = ""
    original: dict[str, int] = dataclasses.field(default_factory=dict)
    rewritten: dict[str, int] = dataclasses.field(default_factory=dict)
    original_attention: int = 0
    through_attnopt: int = 0
    left_original: int = 0
    """Original attention calls the rewritten module still makes itself."""
    sites: int = 0
    rewritable: int = 0
    rewritten_sites: int = 0
    refused: list[str] = dataclasses.field(default_factory=list)
    """One '<form>: <reason>' per refused site."""
    graph_breaks: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    skip_reason: str = ""
    attempts: list[str] = dataclasses.field(default_factory=list)
    """Every (config tier, input) tried before one ran, and why each failed."""
    max_abs: float | None = None
    max_rel: float | None = None
    nondeterministic: bool = False
    seconds: float = 0.0

    @property
    def silently_missed(self) -> int:
        """Original attention calls left in the rewritten module beyond the sites reported refused."""
        return max(0, self.left_original - len(self.refused))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _call(model: Any, kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**kwargs)


def measure(model_type: str, implementation: str) -> Outcome:
    """Builds one entry and measures it; never raises (failures are recorded in the Outcome)."""
    start = time.perf_counter()
    result = Outcome(model_type, implementation)
    try:
        _measure(result)
    except Exception as e:  # noqa: BLE001
        result.errors.append("measure: " + first_line(e))
        result.outcome = "error"
    finally:
        torch._dynamo.reset()
        result.seconds = round(time.perf_counter() - start, 2)
    return result


def _build_and_run(result: Outcome) -> tuple[nn.Module, dict[str, Any], Any, AttentionCounter] | None:
    """The first tiny config and input that the original builds and runs with."""
    attempts = []
    try:
        configs = tiny_configs(result.model_type)
    except Exception as e:  # noqa: BLE001
        result.skip_reason = "config: " + first_line(e)
        return None
    try:
        cls = model_class(result.model_type)
    except Exception as e:  # noqa: BLE001
        result.skip_reason = "model class: " + first_line(e)
        return None
    if not supports(cls, result.implementation):
        result.skip_reason = f"no {result.implementation} support"
        return None
    for tier, config in configs:
        try:
            model = build(result.model_type, result.implementation, config)
        except Exception as e:  # noqa: BLE001
            attempts.append(f"{tier} build: {first_line(e)}")
            continue
        for kind, kwargs in input_candidates(model):
            torch.manual_seed(0)
            try:
                with AttentionCounter() as counter:
                    output = _call(model, kwargs)
            except Exception as e:  # noqa: BLE001
                attempts.append(f"{tier} {kind} forward: {first_line(e)}")
                continue
            result.attempts = attempts
            result.tier, result.inputs = tier, f"{kind}: " + ", ".join(
                f"{k}{tuple(v.shape)}" for k, v in kwargs.items())
            return model, kwargs, output, counter
    result.attempts = attempts
    result.skip_reason = attempts[0] if attempts else "nothing to try"
    return None


def _measure(result: Outcome) -> None:
    built = _build_and_run(result)
    if built is None:
        result.outcome = "skipped"
        return
    model, kwargs, expected, counter = built
    result.original = counter.counts()
    result.original_attention = counter.original_attention
    torch.manual_seed(0)
    again = _call(model, kwargs)
    result.nondeterministic = difference(again, expected)[1] > RTOL

    try:
        with torch.no_grad():
            report = attnopt.inspect(model, (), kwargs)
        result.sites = len(report.sites)
        result.rewritable = len(report.rewritable)
        result.refused = [f"{s.form}: {s.reason}" for s in report.sites if not s.rewritable]
        result.graph_breaks = list(report.graph_breaks)
    except Exception as e:  # noqa: BLE001
        result.errors.append("inspect: " + first_line(e))

    actual = None
    try:
        with torch.no_grad():
            rewritten = attnopt.rewrite(model, "exact", (), kwargs, inner=INNER)
        torch.manual_seed(0)
        _call(rewritten, kwargs)  # captures and plans
        torch.manual_seed(0)
        with AttentionCounter() as after:
            actual = _call(rewritten, kwargs)
        result.rewritten = after.counts()
        result.through_attnopt = after.exact
        result.left_original = after.original_attention
        with contextlib.suppress(Exception):
            result.rewritten_sites = len(attnopt.report_of(rewritten).rewritten)
    except Exception as e:  # noqa: BLE001
        result.errors.append("rewrite: " + first_line(e))

    if actual is not None:
        result.max_abs, result.max_rel = difference(actual, expected)
    result.outcome = classify(result)


def classify(r: Outcome) -> str:
    if r.skip_reason:
        return "skipped"
    if r.max_rel is not None and r.max_rel > RTOL and not r.nondeterministic:
        return "WRONG"
    if r.errors:
        return "error"
    if r.original_attention == 0 and r.through_attnopt == 0:
        return "no-attention"
    if r.left_original == 0 and r.through_attnopt >= r.original_attention:
        return "all"
    if r.through_attnopt > 0:
        return "partial"
    return "none"


def tally(outcomes: list[Outcome]) -> collections.Counter[str]:
    return collections.Counter(o.outcome for o in outcomes)
