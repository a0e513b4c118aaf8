"""Reading the canonical attention mask the way the reduced variants need it: per key.

The canonical mask is bool (True = may attend) or additive float, broadcastable to (B, H, N, M).
Agent, mediator and linear attention can only drop or bias whole keys, so they reduce it to one
row per (batch, head); a float key counts as masked at or below MASKED_AT_OR_BELOW.
"""

from __future__ import annotations

import torch

from attnopt.numerics import MASKED_AT_OR_BELOW


def as_4d(mask: torch.Tensor) -> torch.Tensor:
    """The mask with leading broadcast dims made explicit: (B or 1, H or 1, N or 1, M)."""
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def per_key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask as one row per (batch, head): (B or 1, H or 1, 1, M).

    A mask stored per query (e.g. transformers' (B, 1, N, M) padding masks) is accepted when all
    its rows are equal, and raises ValueError otherwise — on every call: the check is an opaque
    op (`attnopt::key_rows`), which a compiled graph (inner="inductor") calls too, so no later
    mask with other rows is silently read as its first row."""
    if mask is None:
        return None
    mask = as_4d(mask)
    if mask.shape[2] == 1:
        return mask
    return _key_rows(mask)


@torch.library.custom_op("attnopt::key_rows", mutates_args=())
def _key_rows(mask: torch.Tensor) -> torch.Tensor:
    """The first query row of a 4-D mask, after checking every row equals it."""
    first_row = mask[:, :, :1, :]
    if not torch.equal(mask, first_row.expand_as(mask)):
        raise ValueError("the attention mask differs between query rows; this variant can only mask whole keys")
    return first_row.clone()


@_key_rows.register_fake
def _(mask: torch.Tensor) -> torch.Tensor:
    return mask.new_empty((*mask.shape[:2], 1, mask.shape[3]))


def _key_rows_context(ctx: object, inputs: tuple, output: torch.Tensor) -> None:
    ctx.mask_shape = inputs[0].shape


def _key_rows_backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
    """A learned float bias gets its gradient in the row that was read, as the slice would give."""
    grad_mask = grad.new_zeros(ctx.mask_shape)
    grad_mask[:, :, :1, :] = grad
    return grad_mask


_key_rows.register_autograd(_key_rows_backward, setup_context=_key_rows_context)


def causal_key_mask(mask: torch.Tensor, variant: str) -> torch.Tensor:
    """The key mask (B, 1, 1, M) of a causal mask stored per query (a tril, possibly with padding),
    for a `variant` that applies causality itself.

    Raises ValueError unless the mask is exactly "j ≤ i and key j valid" — on every call, compiled
    or not (`attnopt::causal_key_rows`, as `per_key_mask`).
    """
    try:
        return _causal_key_rows(key_validity(as_4d(mask)))
    except ValueError as wrong:
        raise ValueError(f"{wrong}; {variant} cannot follow it") from None


@torch.library.custom_op("attnopt::causal_key_rows", mutates_args=())
def _causal_key_rows(validity: torch.Tensor) -> torch.Tensor:
    """The last query row of a bool 4-D mask, after checking the mask is that row ∧ causality."""
    last_row = validity[:, :, -1:, :]
    n_queries, n_keys = validity.shape[-2:]
    causal = torch.ones(n_queries, n_keys, dtype=torch.bool, device=validity.device).tril()
    if not torch.equal(validity, (causal & last_row).expand_as(validity)):
        raise ValueError("the causal site's mask is more than causality and key padding")
    return last_row.clone()


@_causal_key_rows.register_fake
def _(validity: torch.Tensor) -> torch.Tensor:
    return validity.new_empty((*validity.shape[:2], 1, validity.shape[3]))


def key_validity(key_mask: torch.Tensor) -> torch.Tensor:
    """Bool, same shape: True where the key may be attended."""
    return key_mask if key_mask.dtype == torch.bool else key_mask > MASKED_AT_OR_BELOW


def valid_queries(key_mask: torch.Tensor | None, batch: int, n_heads: int, n_queries: int,
                  self_attention: bool, device: torch.device) -> torch.Tensor:
    """Bool (B, H, N): the queries that are real tokens.

    In self-attention a query is a token of the same sequence as the keys, so a padded key is a
    padded query; otherwise (cross-attention) the mask says nothing about queries and all count.
    """
    if key_mask is None or not self_attention or key_mask.shape[-1] != n_queries:
        return torch.ones(batch, n_heads, n_queries, dtype=torch.bool, device=device)
    return key_validity(key_mask)[:, :, 0, :].expand(batch, n_heads, n_queries)


def mask_kind_of(mask: torch.Tensor | None) -> str | None:
    """Name a concrete mask as SiteInfo.mask_kind does: None, "key_padding", "causal", "boolean", "additive".

    For filling a SiteInfo from example inputs: a mask stored per query whose rows are all equal
    (transformers' expanded (B, 1, N, M) padding masks) is "key_padding", which the reduced
    variants accept; "causal" means exactly "key j ≤ query i" together with key padding.
    """
    if mask is None:
        return None
    mask = as_4d(mask)
    if mask.shape[2] == 1 or torch.equal(mask, mask[:, :, :1, :].expand_as(mask)):
        return "key_padding"
    validity = key_validity(mask)
    lower = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
    only_drops = mask.dtype == torch.bool or bool((mask.masked_fill(~validity, 0) == 0).all())
    if only_drops and torch.equal(validity, (lower & validity[:, :, -1:, :]).expand_as(validity)):
        return "causal"
    return "boolean" if mask.dtype == torch.bool else "additive"
