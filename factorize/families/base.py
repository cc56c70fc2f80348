"""What a family is: a chain at a given rank, the range of ranks, and a projection.

Like optax's ``GradientTransformation``, a :class:`Family` is a small bundle of pure functions;
everything else (composing, counting, running, rank fractions) is shared code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from factorize.chain import Chain, KernelShape, chain_params

Rank = int | tuple[int, int] | None
RankArg = int | float | tuple[int, int] | str | None
Factors = tuple[jax.Array, ...]
# (kernel, rank, **options) -> (factors, info); info holds diagnostics such as error histories.
Projection = Callable[..., tuple[Factors, dict[str, Any]]]


class Family(NamedTuple):
    """A family of factorized convs.

    Attributes:
      name: the name ``decompose`` takes.
      chain: ``(kernel_shape, rank) -> stages``.
      max_rank: the largest rank accepted for a kernel shape.
      exact_rank: the smallest rank at which every kernel is represented exactly, or ``None``
        where no such rank is known in closed form (CP).
      project: ``(kernel, rank, **options) -> (factors, info)``, the best (or a good) fit.
      rank_path: the ranks in increasing size, for turning a parameter fraction into a rank.
      summary: one line for tables and ``--help``.
      project_whitened: ``(kernel, rank, s, **options) -> factors``, or ``None``: the closed-form
        fit minimising the output error ``tr((W − Ŵ)ᵀ S (W − Ŵ))`` for the structured part of a
        (damped, positive definite) patch second moment ``S`` (``factorize.families.data_aware``;
        each family's docstring says for which ``S`` it is exact). ``None``: the data-aware fit
        starts from ``project``.

    Example::

        fam = factorize.get_family("cp4")
        fam.chain((3, 3, 64, 64), 16)    # 1×1 64→16, depthwise 3×1, depthwise 1×3, 1×1 16→64
        fam.max_rank((3, 3, 64, 64))     # 576
        fam.exact_rank((3, 3, 64, 64))   # None: no closed-form exact CP rank
    """

    name: str
    chain: Callable[[KernelShape, Rank], Chain]
    max_rank: Callable[[KernelShape], Rank]
    exact_rank: Callable[[KernelShape], Rank]
    project: Projection
    rank_path: Callable[[KernelShape], list[Rank]]
    summary: str
    project_whitened: Callable[..., Factors] | None = None


def int_rank_path(max_rank: Callable[[KernelShape], Rank]) -> Callable[[KernelShape], list[Rank]]:
    return lambda shape: list(range(1, int(max_rank(shape)) + 1))  # type: ignore[arg-type]


def _check_int_rank(value: Any, upper: int, family: str, what: str = "rank") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} for {family!r} must be an int, got {value!r}")
    if not 1 <= value <= upper:
        raise ValueError(f"{what} for {family!r} must be in [1, {upper}], got {value}")
    return value


def resolve_rank(family: Family, kernel_shape: KernelShape, rank: RankArg) -> Rank:
    """A user's rank argument (int, pair, fraction or ``"full"``) as the family's rank.

    A float ``f`` in (0, 1] means the largest rank whose parameter count is at most ``f`` times
    the full kernel's (tensorly's convention).
    """
    name = family.name
    upper = family.max_rank(kernel_shape)
    if upper is None:  # the `full` family has no rank
        if rank not in (None, "full"):
            raise ValueError(f"family {name!r} has no rank; pass rank='full' or None, got {rank!r}")
        return None
    if isinstance(rank, str):
        if rank != "full":
            raise ValueError(f"rank must be an int, a float in (0, 1] or 'full', got {rank!r}")
        exact = family.exact_rank(kernel_shape)
        if exact is None:
            raise ValueError(
                f"family {name!r} has no smallest exact rank known in closed form; "
                f"pass an int rank in [1, {upper}] or a fraction in (0, 1]"
            )
        return exact
    if isinstance(rank, float):
        if not 0.0 < rank <= 1.0:
            raise ValueError(f"a float rank is a parameter fraction in (0, 1], got {rank}")
        return rank_for_fraction(family, kernel_shape, rank)
    if isinstance(upper, tuple):
        if not (isinstance(rank, (tuple, list)) and len(rank) == 2):
            raise TypeError(
                f"rank for {name!r} must be a pair (R_in, R_out), a float or 'full', got {rank!r}"
            )
        return tuple(  # type: ignore[return-value]
            _check_int_rank(r, u, name, f"rank[{i}]")
            for i, (r, u) in enumerate(zip(rank, upper, strict=True))
        )
    if rank is None:
        raise TypeError(f"rank for {name!r} is required (an int, a float in (0, 1] or 'full')")
    return _check_int_rank(rank, upper, name)


def rank_for_fraction(
    family: Family,
    kernel_shape: KernelShape,
    fraction: float,
    *,
    input_hw: int | tuple[int, int] | None = None,
    strides: int | tuple[int, int] = 1,
    padding: Any = "SAME",
    dilation: int | tuple[int, int] = 1,
) -> Rank:
    """The largest rank on the family's rank path costing at most ``fraction`` of the full conv.

    Cost is the parameter count, or, given ``input_hw`` (and the layer's geometry), the
    conventional MACs at that input size. Raises if even the smallest rank costs more.
    """
    from factorize.chain import chain_macs
    from factorize.costs import conv_macs

    if input_hw is None:
        what = "parameters"
        full = math.prod(kernel_shape)
        cost = chain_params
    else:
        what = f"MACs at input {input_hw}"
        full = conv_macs(kernel_shape, input_hw, strides, padding, dilation)

        def cost(stages):
            return chain_macs(stages, input_hw, strides, padding, dilation)

    path = family.rank_path(kernel_shape)
    # Costs grow along the path: binary search for the last rank within budget.
    lo, hi = 0, len(path)
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(family.chain(kernel_shape, path[mid])) <= fraction * full:
            lo = mid + 1
        else:
            hi = mid
    if lo == 0:
        smallest = cost(family.chain(kernel_shape, path[0])) / full
        raise ValueError(
            f"rank={fraction} is below the smallest {family.name!r} factorization of a "
            f"{kernel_shape} kernel: rank {path[0]} already needs "
            f"{smallest:.3f} of the full conv's {what}"
        )
    return path[lo - 1]
