"""The way in and the way out: PyTorch import is ``factorize.models.from_torch``; export to a
PyTorch state dict with its loader (:func:`export_torch`) and to StableHLO
(:func:`export_stablehlo`). ``import factorize.interop`` never imports torch."""

from factorize.interop.stablehlo import export_stablehlo, exported_forward
from factorize.interop.torch_export import SUPPORTED_MODELS, export_torch, torch_state

__all__ = [
    "SUPPORTED_MODELS",
    "export_stablehlo",
    "export_torch",
    "exported_forward",
    "torch_state",
]
