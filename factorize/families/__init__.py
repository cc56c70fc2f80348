"""The registry of conv families: one table, every family a row."""

from __future__ import annotations

from factorize.families.base import Family, Rank, RankArg, rank_for_fraction, resolve_rank
from factorize.families.svd import BSCONV, DSC, FULL, LOWRANK_IN, LOWRANK_OUT, SPATIAL
from factorize.families.tensor import CP3, CP4, TUCKER2

REGISTRY: dict[str, Family] = {
    f.name: f for f in (FULL, DSC, BSCONV, SPATIAL, LOWRANK_IN, LOWRANK_OUT, TUCKER2, CP3, CP4)
}
FAMILIES: tuple[str, ...] = tuple(REGISTRY)
"""The family names, in table order: ``full``, ``dsc``, ``bsconv``, ``spatial``, ``lowrank_in``,
``lowrank_out``, ``tucker2``, ``cp3``, ``cp4``.

Example::

    for name in factorize.FAMILIES:
        print(f"{name:12} {factorize.get_family(name).summary}")
"""


def get_family(name: str) -> Family:
    """The family called ``name``; the error lists the valid names.

    Example::

        fam = factorize.get_family("dsc")
        fam.summary                      # 'depthwise kh×kw C→C·r, 1×1 C·r→N (MobileNet; ...)'
        fam.max_rank((3, 3, 16, 32))     # 9: the depth multiplier at which dsc is exact
    """
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}") from None


__all__ = [
    "FAMILIES", "Family", "Rank", "RankArg", "get_family", "rank_for_fraction", "resolve_rank",
]
