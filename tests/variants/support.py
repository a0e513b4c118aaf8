"""Small builders shared by the variant tests: a SiteInfo, seeded q/k/v, a key-padding mask."""

from __future__ import annotations

import torch

from attnopt.variants import SiteInfo


def make_site(B=2, H=4, Hkv=4, N=48, M=48, d=16, e=8, **fields) -> SiteInfo:
    return SiteInfo(B=B, H=H, Hkv=Hkv, N=N, M=M, d=d, e=e, **fields)


def tensors(site: SiteInfo, seed: int = 0, dtype=torch.float32):
    """Seeded standard-normal q (B, H, N, d), k (B, Hkv, M, d), v (B, Hkv, M, e)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(site.B, site.H, site.N, site.d, generator=generator)
    k = torch.randn(site.B, site.Hkv, site.M, site.d, generator=generator)
    v = torch.randn(site.B, site.Hkv, site.M, site.e, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(batch: int, n_keys: int, lengths: list[int]) -> torch.Tensor:
    """Bool (B, 1, 1, M): True for the first `length` keys of each row."""
    return (torch.arange(n_keys)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
