"""Attention programs as data: a `Spec` says how one attention is spelled, `render` turns it into
the Python source of a small `nn.Module` named `Program`, and `InputSlot`s say what it takes.

The source *is* the program: the suite execs it to build the module, and prints it, with the
inputs that broke it, as a reproducer. Every choice of a spec is a plain string or number, so a
failing case reads as a list of spelling choices.

Shapes are tiny on purpose: B=2 batches, H=2 heads, N=4 queries, M=4 keys (6 for
cross-attention), head dim 8; nn.MultiheadAttention works on embed dim 16.
"""

from __future__ import annotations

import dataclasses
import math

import torch

B, H, N, M_CROSS, D = 2, 2, 4, 6, 8
E = H * D

# "bmm-3d": scores viewed to (B, H, N, M) for the mask, back to (B*H, N, M) for a 3-D softmax (BART).
MATMUL_FAMILIES = ("@", "torch.matmul", "bmm", "bmm-3d", "einsum", "baddbmm")
FAMILIES = MATMUL_FAMILIES + ("sdpa", "mha")
DTYPES = ("float32", "float16", "bfloat16")

# Scales of the scores. "alpha" only for baddbmm, "kwarg" only for SDPA.
SCALES = ("none", "mul", "div", "const-tensor", "input", "buffer", "head-temp", "prescale-q", "prescale-qk")
NEAR_MISS_SCALES = ("query-dependent", "key-dependent")
SCALE_INPLACE = ("no", "method", "augmented")  # s = s * c | s.mul_(c) | s *= c
# Masks on the scores. Keep-masks ("fill", "fill_", "where", "bias-built") read a bool mask; the
# additive ones ("add", "add-left", "add_", "iadd") a float mask; "causal" builds a tril mask.
FILL_MASKS = ("fill", "fill_", "where", "bias-built")
REPLACING_MASKS = ("fill", "fill_", "where", "causal")  # the masked score becomes the fill value
# "hf-extended": (1 - keep) * fill added to the scores, as Hugging Face's extended attention masks.
KEEP_MASKS = FILL_MASKS + ("hf-extended",)
ADDITIVE_MASKS = ("add", "add-left", "add_", "iadd")
MASKS = ("none",) + KEEP_MASKS + ADDITIVE_MASKS + ("causal", "baddbmm-input")
MASK_SHAPES = ("keys", "rows", "square", "full")  # (B,1,1,M) (B,1,N,M) (N,M) (B,H,N,M)
NEGATIONS = ("~", "logical_not", "eq0")
# Mask values. "input": a 0-dim input tensor; "buffer": a 0-dim registered buffer.
MASK_FILLS = ("-inf", "-1e4", "-1e9", "finfo.min", "full-min", "input", "buffer")
NON_MASK_FILLS = ("zero", "minus-one", "zeros_like", "q.mean")
FILLS = MASK_FILLS + NON_MASK_FILLS
SOFTMAXES = ("F.softmax", "torch.softmax", "Tensor.softmax", "nn.Softmax", "manual", "manual-nomax",
             "dtype-f32", "float-cast")
POSTS = ("none", "dropout", "clone")
NEAR_MISS_POSTS = ("return-weights", "clamp", "weights-elsewhere", "zero-masked")
SDPA_MASKS = ("none", "bool", "float", "causal")
SDPA_SCALES = ("none", "kwarg", "prescale-q")
MHA_MASKS = ("none", "kpm-bool", "kpm-float", "am-bool", "am-float", "kpm+am")


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one attention program is spelled, and how the case around it runs."""

    family: str = "@"
    dtype: str = "float32"
    cross: bool = False  # M = 6 keys instead of N = 4
    upcast: bool = False  # scores cast to float32 right after the QK product, weights cast back
    scale: str = "none"
    scale_value: float = 0.35
    scale_inplace: str = "no"
    mask_first: bool = False  # mask applied before the scale
    mask: str = "none"
    mask_source: str = "input"  # "input" | "buffer"
    polarity: str = "keep"  # "keep": True keeps a key; "drop": True masks it; "keep-int": int64, 1 keeps
    negation: str = "~"
    mask_shape: str = "keys"
    fill: str = "-inf"
    fill_value: float = -math.inf  # the example's value of a fill held in a tensor
    softmax: str = "F.softmax"
    softmax_dim: str = "-1"
    post: str = "none"
    mha_self: bool = False
    batch_first: bool = True
    # How the case runs.
    example_mask: str = "some"  # "all-keep" | "some" | "rows": what the example inputs mask
    example_grad: bool = True  # rewrite under grad mode (else under torch.no_grad)
    grad_check: bool = False  # also compare first-order gradients on fresh inputs (fp32)
    seed: int = 0

    @property
    def keys(self) -> int:
        return M_CROSS if self.cross else N

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def score_dtype(self) -> torch.dtype:
        return torch.float32 if self.upcast else self.torch_dtype

    def near_miss(self) -> str | None:
        """Why this program is not (always) softmax attention that may be rewritten, or None."""
        if self.softmax_dim == "-2":
            return "softmax over the query dimension"
        if self.post in NEAR_MISS_POSTS:
            return f"attention weights {self.post}"
        if self.scale in NEAR_MISS_SCALES:
            return f"{self.scale} scale"
        # Only fills that replace scores; "bias-built" adds its fill, so any value is an additive mask.
        uses_fill = self.family in MATMUL_FAMILIES and self.mask in REPLACING_MASKS
        if uses_fill and self.fill in NON_MASK_FILLS:
            return f"fill {self.fill} is not a mask value"
        if uses_fill and self.fill in ("input", "buffer") and self.fill_value > -1e3:  # -1e4 is -9984 in bf16
            return f"fill {self.fill} holding {self.fill_value} is not a mask value"
        return None

    def describe(self) -> str:
        """The choices that matter for this program, as `key=value` pairs (defaults left out)."""
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self.relevant_fields()
                         if name in ("family", "dtype") or getattr(self, name) != getattr(Spec(), name))

    def relevant_fields(self) -> list[str]:
        case = ["example_mask", "example_grad", "grad_check"]
        if self.family == "mha":
            return ["family", "dtype", "cross", "mask", "post", "mha_self", "batch_first"] + case
        names = ["family", "dtype", "cross"]
        if self.family == "sdpa":
            names += ["scale"] + (["scale_value"] if self.scale != "none" else []) + ["mask"]
            if self.mask in ("bool", "float"):
                names += ["mask_source"] + (["mask_shape"] if self.mask_source == "input" else [])
            if self.mask == "bool":
                names += ["polarity"] + (["negation"] if self.polarity == "drop" else [])
            return names + case
        if self.dtype != "float32":
            names.append("upcast")
        names.append("scale")
        if self.scale not in ("none", "head-temp") + NEAR_MISS_SCALES:
            names.append("scale_value")
        if self.scale in ("mul", "div", "const-tensor", "input", "buffer", "head-temp"):
            names.append("scale_inplace")
        names.append("mask")
        if self.mask != "none" and self.scale not in ("none", "prescale-q", "prescale-qk", "alpha"):
            names.append("mask_first")
        if self.mask in KEEP_MASKS + ADDITIVE_MASKS:
            names.append("mask_source")
        if self.mask in KEEP_MASKS + ADDITIVE_MASKS + ("baddbmm-input",) and (
                self.mask_source == "input" or self.mask == "baddbmm-input"):
            names.append("mask_shape")
        if self.mask in KEEP_MASKS:
            names.append("polarity")
        if (self.mask in KEEP_MASKS and self.polarity != "drop") or self.mask == "causal":
            names.append("negation")
        if self.mask in KEEP_MASKS + ("causal",):
            names.append("fill")
            if self.fill in ("input", "buffer"):
                names.append("fill_value")
        names += ["softmax", "softmax_dim", "post"]
        return names + case


@dataclasses.dataclass(frozen=True)
class InputSlot:
    """One forward argument. role: "data" (random normal), "keep"/"drop" (bool mask), "bias"
    (additive float mask), "fill" (0-dim fill value), "scale" (0-dim scale)."""

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class StateSlot:
    """One buffer or parameter of the program (values differ between instances)."""

    name: str
    role: str  # "scale", "fill", "temp" (parameter), "rel_bias", "keep", "drop"
    shape: tuple[int, ...]
    dtype: torch.dtype
    parameter: bool = False


@dataclasses.dataclass(frozen=True)
class Program:
    spec: Spec
    source: str
    inputs: tuple[InputSlot, ...]
    state: tuple[StateSlot, ...]
    mask_shape: tuple[int, ...] | None  # the (B,H,N,M)-broadcastable shape of its mask, if any


def mask_dims(spec: Spec) -> tuple[int, ...]:
    m = spec.keys
    return {"keys": (B, 1, 1, m), "rows": (B, 1, N, m), "square": (N, m), "full": (B, H, N, m)}[spec.mask_shape]


def _fill_literal(spec: Spec) -> str:
    """The expression a masked score is filled with (for masked_fill; `where` may take tensors)."""
    return {
        "-inf": 'float("-inf")',
        "-1e4": "-1e4",
        "-1e9": "-1e9",
        "finfo.min": "torch.finfo(s.dtype).min",
        "full-min": "torch.full([], torch.finfo(s.dtype).min, dtype=s.dtype)",
        "input": "fill",
        "buffer": "self.fill",
        "zero": "0.0",
        "minus-one": "-1.0",
        "zeros_like": "s.new_zeros(())",
        "q.mean": "q.mean()",
    }[spec.fill]


class _Source:
    def __init__(self) -> None:
        self.init: list[str] = []
        self.body: list[str] = []

    def line(self, text: str) -> None:
        self.body.append(text)


def render(spec: Spec) -> Program:
    """The program's source, its forward inputs, its state and its mask shape."""
    if spec.family == "mha":
        return _render_mha(spec)
    src = _Source()
    m = spec.keys
    inputs = [InputSlot("q", "data", (B, H, N, D), spec.torch_dtype),
              InputSlot("k", "data", (B, H, m, D), spec.torch_dtype),
              InputSlot("v", "data", (B, H, m, D), spec.torch_dtype)]
    state: list[StateSlot] = []
    mask_shape = None

    def mask_input(role: str) -> str:
        """Declare the mask (input or buffer) and return the expression reading it."""
        nonlocal mask_shape
        if spec.mask_source == "buffer":
            if role == "bias":
                shape = (1, H, N, m)
                state.append(StateSlot("rel_bias", "rel_bias", shape, spec.torch_dtype))
                mask_shape = shape
                return "self.rel_bias"
            shape = (1, 1, N, m)
            state.append(StateSlot("mask", role, shape, torch.long if role == "keep-int" else torch.bool))
            mask_shape = shape
            return "self.mask"
        shape = mask_dims(spec)
        name = {"keep": "keep", "keep-int": "keep", "drop": "pad", "bias": "bias"}[role]
        dtype = {"bias": spec.torch_dtype, "keep-int": torch.long}.get(role, torch.bool)
        inputs.append(InputSlot(name, role, shape, dtype))
        mask_shape = shape
        return name

    if spec.family == "sdpa":
        return _render_sdpa(spec, src, inputs, state, mask_input)

    # --- matmul families --------------------------------------------------------------------
    src.line("B, H, N, D = q.shape")
    src.line("M = k.shape[-2]")
    if spec.scale == "prescale-q":
        src.line(f"q = q * {spec.scale_value!r}")
    elif spec.scale == "prescale-qk":
        root = math.sqrt(spec.scale_value)
        src.line(f"q = q * {root!r}")
        src.line(f"k = k * {root!r}")

    # Declare mask inputs before the fill/scale inputs, so the argument order is stable.
    keep_expr = None
    bias_expr = None
    if spec.mask in KEEP_MASKS:
        keep_expr = mask_input(spec.polarity)
    elif spec.mask in ADDITIVE_MASKS or spec.mask == "baddbmm-input":
        bias_expr = mask_input("bias")
    uses_fill = spec.mask in KEEP_MASKS + ("causal",)
    if uses_fill and spec.fill == "input":
        inputs.append(InputSlot("fill", "fill", (), spec.torch_dtype))
    if uses_fill and spec.fill == "buffer":
        state.append(StateSlot("fill", "fill", (), spec.torch_dtype))
    if spec.scale == "input":
        inputs.append(InputSlot("scale", "scale", (), spec.torch_dtype))
    elif spec.scale == "buffer":
        state.append(StateSlot("scale", "scale", (), spec.torch_dtype))
    elif spec.scale == "head-temp":
        state.append(StateSlot("temp", "temp", (1, H, 1, 1), spec.torch_dtype, parameter=True))

    # Q Kᵀ
    alpha = 1.0
    if spec.family == "@":
        src.line("s = q @ k.transpose(-1, -2)")
    elif spec.family == "torch.matmul":
        src.line("s = torch.matmul(q, k.transpose(-2, -1))")
    elif spec.family == "einsum":
        src.line('s = torch.einsum("bhnd,bhmd->bhnm", q, k)')
    else:
        src.line("q3 = q.reshape(B * H, N, D)")
        src.line("k3 = k.reshape(B * H, M, D)")
        if spec.family in ("bmm", "bmm-3d"):
            src.line("s = torch.bmm(q3, k3.transpose(1, 2)).view(B, H, N, M)")
        else:
            if spec.scale == "alpha":
                alpha = spec.scale_value
            if spec.mask == "baddbmm-input":
                src.line(f"base = {bias_expr}.expand(B, H, N, M).reshape(B * H, N, M)")
            else:
                src.line("base = q3.new_zeros(B * H, N, M)")
            src.line(f"s = torch.baddbmm(base, q3, k3.transpose(1, 2), beta=1.0, alpha={alpha!r}).view(B, H, N, M)")
    if spec.upcast:
        src.line("s = s.float()")

    def apply_scale() -> None:
        operand = {
            "mul": repr(spec.scale_value),
            "div": repr(round(1.0 / spec.scale_value, 6)),
            "const-tensor": f"torch.tensor({spec.scale_value!r}, dtype=s.dtype)",
            "input": "scale",
            "buffer": "self.scale",
            "head-temp": "self.temp",
            "query-dependent": "q.norm(dim=-1, keepdim=True)",
            "key-dependent": "k.norm(dim=-1).unsqueeze(-2)",
        }.get(spec.scale)
        if operand is None:
            return
        op = "/" if spec.scale in ("div", "head-temp") else "*"
        if spec.scale_inplace == "method" and spec.scale not in NEAR_MISS_SCALES:
            src.line(f"s.{'div_' if op == '/' else 'mul_'}({operand})")
        elif spec.scale_inplace == "augmented" and spec.scale not in NEAR_MISS_SCALES:
            src.line(f"s {op}= {operand}")
        else:
            src.line(f"s = s {op} {operand}")

    def negated(expr: str) -> str:
        """The positions to fill: where the mask does not keep."""
        if spec.polarity == "drop" and spec.mask != "causal":
            return expr
        if spec.polarity == "keep-int" and spec.mask != "causal" and spec.negation == "~":
            return f"({expr} == 0)"  # ~ on an int64 tensor is bitwise
        return {"~": f"~{expr}", "logical_not": f"{expr}.logical_not()", "eq0": f"({expr} == 0)"}[spec.negation]

    def apply_mask() -> None:
        fill = _fill_literal(spec)
        if spec.mask == "fill":
            src.line(f"s = s.masked_fill({negated(keep_expr)}, {fill})")
        elif spec.mask == "fill_":
            src.line(f"s.masked_fill_({negated(keep_expr)}, {fill})")
        elif spec.mask == "where":
            other = "torch.zeros_like(s)" if spec.fill == "zeros_like" else fill
            if spec.polarity == "keep":
                src.line(f"s = torch.where({keep_expr}, s, {other})")
            elif spec.polarity == "keep-int":
                src.line(f"s = torch.where({keep_expr}.bool(), s, {other})")
            else:
                src.line(f"s = torch.where({keep_expr}, {other}, s)")
        elif spec.mask == "bias-built":
            src.line(f"bias = torch.zeros({keep_expr}.shape, dtype=s.dtype, device=s.device)")
            src.line(f"bias = bias.masked_fill({negated(keep_expr)}, {fill})")
            src.line("s = s + bias")
        elif spec.mask == "hf-extended":
            if spec.polarity == "drop":
                src.line(f"ext = {keep_expr}.to(s.dtype) * {fill}")
            else:
                src.line(f"ext = (1.0 - {keep_expr}.to(s.dtype)) * {fill}")
            src.line("s = s + ext")
        elif spec.mask == "causal":
            src.line("causal = torch.ones(N, M, dtype=torch.bool, device=s.device).tril(diagonal=M - N)")
            src.line(f"s = s.masked_fill({negated('causal')}, {fill})")
        elif spec.mask == "add":
            src.line(f"s = s + {bias_expr}")
        elif spec.mask == "add-left":
            src.line(f"s = {bias_expr} + s")
        elif spec.mask == "add_":
            src.line(f"s.add_({bias_expr})")
        elif spec.mask == "iadd":
            src.line(f"s += {bias_expr}")

    if spec.mask_first:
        apply_mask()
        apply_scale()
    else:
        apply_scale()
        apply_mask()

    dim = {"-1": "-1", "3": "3", "-2": "-2"}[spec.softmax_dim]
    if spec.family == "bmm-3d":
        src.line("s = s.view(B * H, N, M)")
        dim = "2" if dim == "3" else dim
    if spec.softmax == "F.softmax":
        src.line(f"w = F.softmax(s, dim={dim})")
    elif spec.softmax == "torch.softmax":
        src.line(f"w = torch.softmax(s, {dim})")
    elif spec.softmax == "Tensor.softmax":
        src.line(f"w = s.softmax(dim={dim})")
    elif spec.softmax == "nn.Softmax":
        src.init.append(f"self.softmax = nn.Softmax(dim={dim})")
        src.line("w = self.softmax(s)")
    elif spec.softmax == "manual":
        src.line(f"e = torch.exp(s - s.amax(dim={dim}, keepdim=True))")
        src.line(f"w = e / e.sum(dim={dim}, keepdim=True)")
    elif spec.softmax == "manual-nomax":
        src.line("e = s.exp()")
        src.line(f"w = e / e.sum({dim}, keepdim=True)")
    elif spec.softmax == "dtype-f32":
        src.line(f"w = F.softmax(s, dim={dim}, dtype=torch.float32).to(v.dtype)")
    elif spec.softmax == "float-cast":
        src.line(f"w = s.float().softmax({dim}).type_as(v)")
    if spec.upcast:
        src.line("w = w.to(v.dtype)")
    if spec.family == "bmm-3d":
        src.line("w = w.view(B, H, N, M)")

    if spec.post == "dropout":
        src.line("w = F.dropout(w, p=0.1, training=self.training)")
    elif spec.post == "clone":
        src.line("w = w.clone()")
    elif spec.post == "clamp":
        src.line("w = w.clamp(min=0.01)")
    elif spec.post == "zero-masked":
        if keep_expr is not None:
            src.line(f"w = w.masked_fill({negated(keep_expr)}, 0.0)")
        else:
            src.line("w = w.masked_fill(w < 0.05, 0.0)")

    if spec.family in ("@",):
        src.line("out = w @ v")
    elif spec.family == "torch.matmul":
        src.line("out = torch.matmul(w, v)")
    elif spec.family == "einsum":
        src.line('out = torch.einsum("bhnm,bhmd->bhnd", w, v)')
    else:
        src.line("out = torch.bmm(w.reshape(B * H, N, M), v.reshape(B * H, M, D)).view(B, H, N, D)")

    if spec.post == "return-weights":
        src.line("return out, w")
    elif spec.post == "weights-elsewhere":
        src.line("return out + w.amax(dim=-1, keepdim=True)")
    else:
        src.line("return out")
    return Program(spec, _assemble(spec, src, inputs, state), tuple(inputs), tuple(state), mask_shape)


def _render_sdpa(spec: Spec, src: _Source, inputs: list[InputSlot], state: list[StateSlot], mask_input) -> Program:
    kwargs = []
    if spec.scale == "prescale-q":
        src.line(f"q = q * {spec.scale_value!r}")
        kwargs.append("scale=1.0")
    elif spec.scale == "kwarg":
        kwargs.append(f"scale={spec.scale_value!r}")
    mask_shape = None
    if spec.mask == "bool":
        expr = mask_input("keep" if spec.polarity == "keep" else "drop")
        if spec.polarity == "drop":
            expr = {"~": f"~{expr}", "logical_not": f"{expr}.logical_not()", "eq0": f"({expr} == 0)"}[spec.negation]
        kwargs.insert(0, f"attn_mask={expr}")
    elif spec.mask == "float":
        kwargs.insert(0, f"attn_mask={mask_input('bias')}")
    elif spec.mask == "causal":
        kwargs.insert(0, "is_causal=True")
    src.line(f"return F.scaled_dot_product_attention(q, k, v, {', '.join(kwargs)})".replace(", )", ")"))
    if spec.mask in ("bool", "float"):
        slot = next((s for s in inputs if s.role in ("keep", "drop", "bias")), None)
        mask_shape = slot.shape if slot is not None else next(s.shape for s in state)
    return Program(spec, _assemble(spec, src, inputs, state), tuple(inputs), tuple(state), mask_shape)


def _render_mha(spec: Spec) -> Program:
    src = _Source()
    m = spec.keys
    bf = spec.batch_first
    qshape = (B, N, E) if bf else (N, B, E)
    kshape = (B, m, E) if bf else (m, B, E)
    inputs = [InputSlot("x" if spec.mha_self else "q", "data", qshape, spec.torch_dtype)]
    if not spec.mha_self:
        inputs += [InputSlot("k", "data", kshape, spec.torch_dtype), InputSlot("v", "data", kshape, spec.torch_dtype)]
    m_eff = N if spec.mha_self else m
    src.init.append(f"self.mha = nn.MultiheadAttention({E}, {H}, batch_first={bf}, dtype=torch.{spec.dtype})")
    kwargs = []
    if spec.mask in ("kpm-bool", "kpm+am"):
        inputs.append(InputSlot("pad", "drop", (B, m_eff), torch.bool))
        kwargs.append("key_padding_mask=pad")
    elif spec.mask == "kpm-float":
        inputs.append(InputSlot("pad", "bias", (B, m_eff), spec.torch_dtype))
        kwargs.append("key_padding_mask=pad")
    if spec.mask in ("am-bool", "kpm+am"):
        inputs.append(InputSlot("blocked", "drop", (N, m_eff), torch.bool))
        kwargs.append("attn_mask=blocked")
    elif spec.mask == "am-float":
        inputs.append(InputSlot("bias", "bias", (N, m_eff), spec.torch_dtype))
        kwargs.append("attn_mask=bias")
    need = spec.post == "return-weights"
    kwargs.append(f"need_weights={need}")
    args = "x, x, x" if spec.mha_self else "q, k, v"
    src.line(f"out, w = self.mha({args}, {', '.join(kwargs)})")
    src.line("return out, w" if need else "return out")
    mask_shape = None
    return Program(spec, _assemble(spec, src, inputs, []), tuple(inputs), (), mask_shape)


def _assemble(spec: Spec, src: _Source, inputs: list[InputSlot], state: list[StateSlot]) -> str:
    lines = ["class Program(nn.Module):", "    def __init__(self, state):", "        super().__init__()"]
    for slot in state:
        if slot.parameter:
            lines.append(f"        self.{slot.name} = nn.Parameter(state[{slot.name!r}])")
        else:
            lines.append(f"        self.register_buffer({slot.name!r}, state[{slot.name!r}])")
    lines += [f"        {text}" for text in src.init]
    lines.append("")
    lines.append(f"    def forward(self, {', '.join(slot.name for slot in inputs)}):")
    lines += [f"        {text}" for text in src.body]
    return "\n".join(lines) + "\n"
