"""Tensor decompositions that fit the tensor families to a trained kernel, and rank selection.

``select_rank``, ``select_rank_by_name``, ``evbmf`` (``rank.py``) and ``to_tensorly``,
``from_tensorly`` (``tensorly_interop.py``) are loaded on first access: they depend on
``factorize.families``, which itself imports the projections below. tensorly is only imported
when a conversion runs.
"""

from factorize.decompositions.cp import cp3_project, cp4_project
from factorize.decompositions.tucker import tucker2_project

_LAZY = {
    "select_rank": "rank",
    "evbmf": "rank",
    "select_rank_by_name": "rank",
    "to_tensorly": "tensorly_interop",
    "from_tensorly": "tensorly_interop",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "cp3_project",
    "cp4_project",
    "evbmf",
    "from_tensorly",
    "select_rank",
    "select_rank_by_name",
    "to_tensorly",
    "tucker2_project",
]
