"""Whole-model conversion: policies (uniform, rules, per-layer budget allocation), ``convert``
and its report."""

from factorize.conversion.allocation import Allocation, allocate
from factorize.conversion.calibration import InputStats, collect_input_stats, output_error
from factorize.conversion.convert import (
    candidate_layers,
    check_budget,
    convert,
    layer_builder,
    layer_inputs,
)
from factorize.conversion.policy import Policy, Rule
from factorize.conversion.report import ConversionReport, LayerRow

__all__ = [
    "Allocation",
    "ConversionReport",
    "InputStats",
    "LayerRow",
    "Policy",
    "Rule",
    "allocate",
    "candidate_layers",
    "check_budget",
    "collect_input_stats",
    "convert",
    "layer_builder",
    "layer_inputs",
    "output_error",
]
