"""Match generically, verify concretely.

Before a site is marked rewritable, its original subgraph (the nodes between the bound inputs
and the site's output, lifted into a small GraphModule of their own) and the canonical call
(`SiteCall` with exact attention) are both run on the same small random inputs of the site's
shapes and dtypes. A binding that disagrees — a swapped Q and K, a mask applied to the wrong
axis, a scale read wrongly — is refused with the measured error as its reason.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from attnopt.numerics import VERIFY_TOLERANCE, mismatch, tolerance

from .detect import SiteMatch
from .fx_utils import meta_value, number_valued, tensor_meta
from .site_ir import MatmulRecipe


def extract_subgraph(match: SiteMatch) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The site's own nodes as a GraphModule whose placeholders are the site's inputs
    followed by any other value the subgraph reads."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders: list[fx.Node] = []

    def placeholder_for(node: fx.Node) -> fx.Node:
        if node not in env:
            env[node] = graph.placeholder(f"in_{len(placeholders)}")
            placeholders.append(node)
        return env[node]

    for node in match.inputs:
        placeholder_for(node)
    inside = set(match.internal)
    for node in match.internal:
        for source in node.all_input_nodes:
            if source not in inside:
                placeholder_for(source)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[match.output])
    root = match.output.graph.owning_module
    return fx.GraphModule(root, graph), placeholders


BLOCKING_VALUES = (float("-inf"), "finfo.min", -1e9)
"""Values a float mask blocks a key with in the wild; verification draws each of them. (-1e4 is
not drawn in general: a row that it blocks entirely keeps its raw scores, to the last few digits,
in the original too — softmax of rounding noise, which the exact op reproduces only where it
adds the mask in the original's order.)"""
SMALL_BLOCKING_VALUE = -1e4
"""Drawn for whole rows too at half-precision sites, whose tolerance covers that noise (whether
the original adds such a mask in fp32, keeping the raw scores, or in half, losing them, shows),
and at sites whose rewrite scales a mask term instead of the masked scores (`reorders_mask`)."""


def reorders_mask(match: SiteMatch) -> bool:
    """Whether the rewrite adds a mask term in another order than the original: the original
    scales the masked scores, `(s + m)·t`, by a tensor or by a number that is not a power of two
    (exact in floating point), and the rewrite computes `s·t + m·t`. On a row that a finite mask
    blocks entirely the two round the raw scores differently, so verification must see one."""
    recipe = match.recipe
    if not isinstance(recipe, MatmulRecipe):
        return False
    return any(term.kind == "add" and (term.factor_inputs or math.frexp(abs(term.factor))[0] != 0.5)
               for term in recipe.terms)


def _blocking_per_trial(dtype: torch.dtype, reordered: bool = False) -> tuple:
    """What a float mask blocks keys with in each trial: trial 0 blocks random entries with -inf
    (over a random bias), each later trial blocks whole rows with one blocking value."""
    half = dtype in (torch.float16, torch.bfloat16)
    return (float("-inf"),) + BLOCKING_VALUES + ((SMALL_BLOCKING_VALUE,) if half or reordered else ())


def _random_like(node: fx.Node, generator: torch.Generator, trial: int, blocking: Any,
                 mask_like: bool = False) -> Any:
    """Random values of `node`'s shape and dtype. Masks are drawn adversarially, never from the
    example: random entries in trial 0, whole rows blocked (and whole rows open) in the others,
    float masks with `blocking` — so a rewrite that drops a mask or mistakes its meaning on fully
    masked rows fails here, whatever the example input held."""
    meta = tensor_meta(node)
    if number_valued(node):  # a number the graph computes (a scale from sizes): this call's value
        return meta_value(node)
    if meta is None:
        raise TypeError(f"`{node.name}` is not a tensor")
    shape, dtype = tuple(meta.shape), meta.dtype
    if mask_like and (dtype == torch.bool or dtype.is_floating_point):
        blocked = _blocked_pattern(shape, generator, trial)
        if dtype == torch.bool:
            return blocked if trial != 2 else ~blocked
        value = torch.finfo(dtype).min if blocking == "finfo.min" else max(float(blocking), torch.finfo(dtype).min)
        bias = torch.randn(shape, generator=generator) if trial == 0 else torch.zeros(shape)
        return bias.to(dtype).masked_fill(blocked, value)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if dtype.is_floating_point:
        value = torch.randn(shape, generator=generator, dtype=torch.float32)
        if meta.dim() == 0:
            value = value.abs() + 0.5  # a scale: keep it positive and away from zero
        return value.to(dtype)
    return torch.randint(0, 2, shape, generator=generator).to(dtype)


def _blocked_pattern(shape: tuple[int, ...], generator: torch.Generator, trial: int) -> torch.Tensor:
    """Bool: random entries (trial 0), or every row of the last dim fully blocked or fully open
    at random, with the rest random (later trials)."""
    blocked = torch.rand(shape, generator=generator) < 0.3
    if trial > 0 and len(shape) >= 1 and math.prod(shape):
        rows = torch.rand(shape[:-1] + (1,), generator=generator)
        blocked = torch.where(rows < 0.35, True, torch.where(rows > 0.65, False, blocked))
    return blocked


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def verify(match: SiteMatch, site_call: nn.Module, seed: int = 0) -> str | None:
    """None when the canonical call reproduces the subgraph; else a one-sentence reason."""
    try:
        subgraph, placeholders = extract_subgraph(match)
    except Exception as error:  # a node we cannot copy out: refuse, never guess
        return f"its subgraph could not be isolated for verification ({type(error).__name__}: {error})."
    bound = set(match.inputs)
    extra = [n for n in placeholders if n not in bound and n not in match.constants]
    if extra:
        names = ", ".join(f"`{n.name}`" for n in extra)
        return f"the attention also reads {names}, which attnopt does not model."
    dtype = tensor_meta(match.output)
    dtype = dtype.dtype if dtype is not None else (tensor_meta(match.inputs[0]).dtype)
    allowed = tolerance(VERIFY_TOLERANCE, dtype)
    worst = 0.0
    for trial, blocking in enumerate(_blocking_per_trial(dtype, reorders_mask(match))):
        generator = torch.Generator().manual_seed(seed + trial)
        try:
            values = [match.constants[node] if node in match.constants else
                      _random_like(node, generator, trial, blocking, any(node is m for m in match.mask_inputs))
                      for node in placeholders]
        except TypeError as error:
            return f"an input of the site is not a tensor ({error}), so it cannot be verified."
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + trial)
                expected = _first(subgraph(*values))
                torch.manual_seed(seed + trial)
                # one tensor may be bound twice (SDPA(q, kv, kv)): the call gets it in each place
                value_of = dict(zip(placeholders, values))
                actual = _first(site_call(*(value_of[node] for node in match.inputs)))
        except Exception as error:
            return f"verification raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        worst = max(worst, mismatch(actual, expected))
    if worst > allowed:
        return f"verification failed: the canonical form differs from the original by {worst:.2e} (relative) on random inputs."
    return None
