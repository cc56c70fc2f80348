"""Whole-model conversion: policies, ``convert`` and its report."""

from factorize.conversion.calibration import InputStats, collect_input_stats, output_error
from factorize.conversion.convert import candidate_layers, convert, layer_builder, layer_inputs
from factorize.conversion.policy import Policy, Rule
from factorize.conversion.report import ConversionReport, LayerRow

__all__ = [
    "ConversionReport",
    "InputStats",
    "LayerRow",
    "Policy",
    "Rule",
    "candidate_layers",
    "collect_input_stats",
    "convert",
    "layer_builder",
    "layer_inputs",
    "output_error",
]
