"""The refusal sentences shared by the reduced variants (agent, mediator, linear).

Each function returns one sentence when its condition rules the variant out at a site, else None;
a variant's refusal is the first non-None among the checks it needs.
"""

from __future__ import annotations

from .site import SiteInfo


def first_reason(*reasons: str | None) -> str | None:
    """The first refusal sentence given, or None when every check passed."""
    return next((reason for reason in reasons if reason is not None), None)


def dropout_reason(site_info: SiteInfo, variant: str) -> str | None:
    if site_info.dropout > 0:
        return (f"the site applies attention dropout (p={site_info.dropout}), which {variant} attention "
                "cannot reproduce; rewrite it in eval mode.")
    return None


def per_query_mask_reason(site_info: SiteInfo, variant: str) -> str | None:
    if site_info.mask_varies_per_query:
        return (f"the site's {site_info.mask_kind} mask differs between queries, and {variant} attention "
                "can only mask whole keys.")
    return None


def causal_reason(site_info: SiteInfo, variant: str, tokens: str) -> str | None:
    if site_info.causal:
        return (f"the site is causal, and in {variant} attention every query reads {tokens} that have "
                "seen all keys, so future tokens would leak into the past.")
    return None
