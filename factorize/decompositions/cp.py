"""CP decompositions of conv kernels (Lebedev et al. 2015): not implemented yet (issue 3)."""

from __future__ import annotations


def cp3_project(kernel, rank, **options):
    raise NotImplementedError("the cp3 projection (CP-ALS) is not implemented yet")


def cp4_project(kernel, rank, **options):
    raise NotImplementedError("the cp4 projection (CP-ALS) is not implemented yet")
