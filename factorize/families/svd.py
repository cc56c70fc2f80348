"""The families whose best projection is a truncated SVD (Eckart–Young), plus ``full``.

Each family here is a two-stage chain whose composed kernel is a product ``A @ B`` of a matrix
unfolding of ``W``; the best rank-r fit in Frobenius norm is the truncated SVD of that
unfolding (batched where the structure is per channel). The singular values are split as
``sqrt(s)`` into both stages so neither factor's scale dominates when fine-tuned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from factorize.chain import Stage
from factorize.families.base import Family, int_rank_path
from factorize.families.data_aware import (
    channel_whitened,
    cholesky,
    per_channel_blocks,
    row_channel_blocks,
    whitened_svd,
)

HW = (True, True)
NONE = (False, False)


def truncated_svd(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Best rank-``rank`` factors ``(A, B)`` with ``A @ B ≈ m``, batched over leading axes."""
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    root = jnp.sqrt(s[..., :rank])
    return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def _no_options(name: str, options: dict) -> None:
    if options:
        raise TypeError(f"family {name!r} takes no projection options, got {sorted(options)}")


# --- full: the kernel itself -------------------------------------------------------------------


def _full_project(kernel, rank, **options):
    _no_options("full", options)
    return (kernel,), {}


FULL = Family(
    name="full",
    chain=lambda s, r: (Stage(s, 1, HW),),
    max_rank=lambda s: None,
    exact_rank=lambda s: None,
    project=_full_project,
    rank_path=lambda s: [None],
    summary="kh×kw C→N (the dense conv)",
)


# --- dsc: depthwise kh×kw (multiplier r) then pointwise ----------------------------------------


@functools.partial(jax.jit, static_argnames="rank")
def _dsc_fit(kernel, rank, left):
    kh, kw, c, n = kernel.shape
    slices = kernel.reshape(kh * kw, c, n).transpose(1, 0, 2)  # (C, kh·kw, N)
    a, b = whitened_svd(slices, rank, left)  # (C, kh·kw, r), (C, r, N)
    depthwise = a.transpose(1, 0, 2).reshape(kh, kw, 1, c * rank)
    pointwise = b.reshape(1, 1, c * rank, n)
    return depthwise, pointwise


def _dsc_project(kernel, rank, **options):
    _no_options("dsc", options)
    return _dsc_fit(kernel, rank, None), {}


def _dsc_whitened(kernel, rank, s, **options):
    """Per input channel ``c``, the whitened SVD of the ``(kh·kw × N)`` slice with the
    ``(kh·kw × kh·kw)`` block of ``S`` at channel ``c``: exact (optimal) for block-diagonal
    ``S`` (input channels uncorrelated), where the objective splits into one weighted rank-r
    problem per channel."""
    _no_options("dsc", options)
    return _dsc_fit(kernel, rank, cholesky(per_channel_blocks(s, kernel.shape)))


DSC = Family(
    name="dsc",
    chain=lambda s, r: (
        Stage((s[0], s[1], 1, s[2] * r), s[2], HW),
        Stage((1, 1, s[2] * r, s[3]), 1, NONE),
    ),
    max_rank=lambda s: min(s[0] * s[1], s[3]),
    exact_rank=lambda s: min(s[0] * s[1], s[3]),
    project=_dsc_project,
    rank_path=int_rank_path(lambda s: min(s[0] * s[1], s[3])),
    summary="depthwise kh×kw C→C·r, 1×1 C·r→N (MobileNet; r = depth multiplier)",
    project_whitened=_dsc_whitened,
)


# --- bsconv: pointwise then grouped kh×kw (BSConv-U, Haase & Amthor 2020) ----------------------


@functools.partial(jax.jit, static_argnames="rank")
def _bsconv_project(kernel, rank, **options):
    _no_options("bsconv", options)
    kh, kw, c, n = kernel.shape
    slices = kernel.reshape(kh * kw, c, n).transpose(2, 0, 1)  # (N, kh·kw, C)
    a, b = truncated_svd(slices, rank)  # (N, kh·kw, r), (N, r, C)
    pointwise = b.transpose(2, 0, 1).reshape(1, 1, c, n * rank)
    grouped = a.transpose(1, 2, 0).reshape(kh, kw, rank, n)
    return (pointwise, grouped), {}


BSCONV = Family(
    name="bsconv",
    chain=lambda s, r: (
        Stage((1, 1, s[2], s[3] * r), 1, NONE),
        Stage((s[0], s[1], r, s[3]), s[3], HW),
    ),
    max_rank=lambda s: min(s[0] * s[1], s[2]),
    exact_rank=lambda s: min(s[0] * s[1], s[2]),
    project=_bsconv_project,
    rank_path=int_rank_path(lambda s: min(s[0] * s[1], s[2])),
    summary="1×1 C→N·r, grouped kh×kw (N groups, r→1) (BSConv-U)",
    # the first stage is a 1×1 on C: per output channel, the slice (kh·kw × C) whitened on its
    # channel side; exact for S = I ⊗ S_C
    project_whitened=channel_whitened(_bsconv_project),
)


# --- spatial: kh×1 then 1×kw (Jaderberg et al. 2014) ------------------------------------------


@functools.partial(jax.jit, static_argnames="rank")
def _spatial_fit(kernel, rank, left):
    kh, kw, c, n = kernel.shape
    m = kernel.transpose(0, 2, 1, 3).reshape(kh * c, kw * n)
    a, b = whitened_svd(m, rank, left)
    vertical = a.reshape(kh, 1, c, rank)
    horizontal = b.reshape(rank, kw, n).transpose(1, 0, 2).reshape(1, kw, rank, n)
    return vertical, horizontal


def _spatial_project(kernel, rank, **options):
    _no_options("spatial", options)
    return _spatial_fit(kernel, rank, None), {}


def _spatial_whitened(kernel, rank, s, **options):
    """The whitened SVD of the ``(kh·C) × (kw·N)`` unfolding with the ``(kh·C)`` row blocks of
    ``S`` averaged over the column offset: exact (optimal) for
    ``S[(i,j,c),(i',j',c')] = δ_{jj'} A[(i,c),(i',c')]`` (horizontal offsets uncorrelated, the
    same vertical × channel covariance at each)."""
    _no_options("spatial", options)
    return _spatial_fit(kernel, rank, cholesky(row_channel_blocks(s, kernel.shape)))


SPATIAL = Family(
    name="spatial",
    chain=lambda s, r: (
        Stage((s[0], 1, s[2], r), 1, (True, False)),
        Stage((1, s[1], r, s[3]), 1, (False, True)),
    ),
    max_rank=lambda s: min(s[0] * s[2], s[1] * s[3]),
    exact_rank=lambda s: min(s[0] * s[2], s[1] * s[3]),
    project=_spatial_project,
    rank_path=int_rank_path(lambda s: min(s[0] * s[2], s[1] * s[3])),
    summary="kh×1 C→R, 1×kw R→N (spatially separable, Jaderberg et al. 2014)",
    project_whitened=_spatial_whitened,
)


# --- lowrank_in / lowrank_out: a 1×1 bottleneck before / after the kh×kw conv ------------------


@functools.partial(jax.jit, static_argnames="rank")
def _lowrank_in_project(kernel, rank, **options):
    _no_options("lowrank_in", options)
    kh, kw, c, n = kernel.shape
    m = kernel.transpose(2, 0, 1, 3).reshape(c, kh * kw * n)  # mode-C unfolding
    a, b = truncated_svd(m, rank)
    reduce = a.reshape(1, 1, c, rank)
    spatial = b.reshape(rank, kh, kw, n).transpose(1, 2, 0, 3)
    return (reduce, spatial), {}


LOWRANK_IN = Family(
    name="lowrank_in",
    chain=lambda s, r: (
        Stage((1, 1, s[2], r), 1, NONE),
        Stage((s[0], s[1], r, s[3]), 1, HW),
    ),
    max_rank=lambda s: min(s[2], s[0] * s[1] * s[3]),
    exact_rank=lambda s: min(s[2], s[0] * s[1] * s[3]),
    project=_lowrank_in_project,
    rank_path=int_rank_path(lambda s: min(s[2], s[0] * s[1] * s[3])),
    summary="1×1 C→R, kh×kw R→N (Inception's 1×1 reduce)",
    # the whitened SVD of the mode-C unfolding with the C×C channel covariance: exact for
    # S = I ⊗ S_C
    project_whitened=channel_whitened(_lowrank_in_project),
)


@functools.partial(jax.jit, static_argnames="rank")
def _lowrank_out_fit(kernel, rank, left):
    kh, kw, c, n = kernel.shape
    a, b = whitened_svd(kernel.reshape(kh * kw * c, n), rank, left)  # mode-N unfolding, transposed
    return a.reshape(kh, kw, c, rank), b.reshape(1, 1, rank, n)


def _lowrank_out_project(kernel, rank, **options):
    _no_options("lowrank_out", options)
    return _lowrank_out_fit(kernel, rank, None), {}


def _lowrank_out_whitened(kernel, rank, s, **options):
    """The whitened SVD of the ``(kh·kw·C) × N`` unfolding with the full ``S``: exact (optimal)
    for every ``S`` (Eckart–Young on ``Lᵀ W``, ``S = L Lᵀ``, then ``L⁻ᵀ`` on the left factor)."""
    _no_options("lowrank_out", options)
    return _lowrank_out_fit(kernel, rank, cholesky(s))


LOWRANK_OUT = Family(
    name="lowrank_out",
    chain=lambda s, r: (
        Stage((s[0], s[1], s[2], r), 1, HW),
        Stage((1, 1, r, s[3]), 1, NONE),
    ),
    max_rank=lambda s: min(s[3], s[0] * s[1] * s[2]),
    exact_rank=lambda s: min(s[3], s[0] * s[1] * s[2]),
    project=_lowrank_out_project,
    rank_path=int_rank_path(lambda s: min(s[3], s[0] * s[1] * s[2])),
    summary="kh×kw C→R, 1×1 R→N (low-rank output)",
    project_whitened=_lowrank_out_whitened,
)
