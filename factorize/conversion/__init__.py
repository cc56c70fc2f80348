"""Whole-model conversion: policies, ``convert`` and its report."""

from factorize.conversion.convert import candidate_layers, convert, layer_builder, layer_inputs
from factorize.conversion.policy import Policy, Rule
from factorize.conversion.report import ConversionReport, LayerRow

__all__ = [
    "ConversionReport",
    "LayerRow",
    "Policy",
    "Rule",
    "candidate_layers",
    "convert",
    "layer_builder",
    "layer_inputs",
]
