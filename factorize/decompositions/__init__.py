"""Tensor decompositions that fit the tensor families to a trained kernel."""

from factorize.decompositions.cp import cp3_project, cp4_project
from factorize.decompositions.tucker import tucker2_project

__all__ = ["cp3_project", "cp4_project", "tucker2_project"]
