"""Whole-model conversion: every selected conv of a trained NNX model to a factorized layer."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from factorize._checks import pair
from factorize.conversion.calibration import (
    InputStats,
    check_calibration,
    collect_input_stats,
    output_error,
)
from factorize.conversion.policy import Policy, Rule
from factorize.conversion.report import ConversionReport, LayerRow
from factorize.costs import conv_macs, count_macs
from factorize.factorized import (
    DecomposeJob,
    decompose_jobs,
    random_factorized,
    relative_error,
)
from factorize.families import Rank, get_family, rank_for_fraction, resolve_rank
from factorize.families.data_aware import DEFAULT_DAMP, DEFAULT_SWEEPS
from factorize.layers import FactorizedConv, FactorizedLinear
from factorize.models.spec import set_submodule

SUPPORTED_PADDING = "'SAME', 'VALID', ints or (low, high) pairs"
RECONSTRUCTIONS = ("symmetric", "asymmetric")


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def candidate_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every ``nnx.Conv`` and ``nnx.Linear`` in ``model`` by path, in graph order."""
    return {
        _path_str(path): node
        for path, node in nnx.iter_graph(model)
        if type(node) in (nnx.Conv, nnx.Linear)
    }


class _Log:
    """Input shapes (and, while collecting statistics, inputs) by layer path (an
    identity-hashed object, so NNX keeps it as static)."""

    def __init__(self):
        self.shapes: dict[str, tuple[int, ...]] = {}
        # set to a dict to also catch the inputs themselves (calibration statistics)
        self.inputs: dict[str, Any] | None = None


class _Probe(nnx.Module):
    """Stands in for a layer while the model is traced and records its input's shape."""

    def __init__(self, inner: nnx.Module, path: str, log: _Log):
        self.inner, self.path, self.log = inner, path, log

    def __call__(self, x, *args, **kwargs):
        self.log.shapes.setdefault(self.path, tuple(x.shape))
        if self.log.inputs is not None:
            self.log.inputs.setdefault(self.path, x)
        return self.inner(x, *args, **kwargs)


def layer_inputs(
    model: nnx.Module,
    sample_input: Any,
    *,
    layers: Callable[[nnx.Module], dict[str, nnx.Module]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """The input shape of every conv/linear layer, in the order the forward pass calls them.

    Traces (does not run) the model on the first example of ``sample_input``, on a copy, so
    the model itself (e.g. BatchNorm statistics) is untouched. ``layers(model)`` picks the
    layers by path (default :func:`candidate_layers`; ``factorize.models.conv_layers`` adds the
    factorized convs).
    """
    probe = nnx.clone(model)
    log = _Log()
    for path, layer in (layers or candidate_layers)(probe).items():
        set_submodule(probe, path, _Probe(layer, path, log))
    graphdef, state = nnx.split(probe)
    first = jax.tree.map(lambda a: jnp.asarray(a)[:1], sample_input)
    jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, first)
    return log.shapes


def _geometry(layer: nnx.Module) -> tuple[tuple[int, int], Any, tuple[int, int], str]:
    """(strides, padding, dilation, reason it cannot be converted or '')."""
    if isinstance(layer, nnx.Linear):
        return (1, 1), "VALID", (1, 1), ""
    strides = pair(layer.strides or 1, "strides")
    dilation = pair(layer.kernel_dilation or 1, "kernel_dilation")
    padding = layer.padding
    if layer.feature_group_count != 1:
        groups = layer.feature_group_count
        return strides, padding, dilation, f"grouped conv (feature_group_count={groups}) kept"
    if pair(layer.input_dilation or 1, "input_dilation") != (1, 1):
        return strides, padding, dilation, "input_dilation ≠ 1 kept"
    if isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        note = f"padding {padding!r} kept (supported: {SUPPORTED_PADDING})"
        return strides, padding, dilation, note
    return strides, padding, dilation, ""


def _kernel(layer: nnx.Module) -> jax.Array:
    k = layer.kernel[...]
    return k.reshape(1, 1, *k.shape) if isinstance(layer, nnx.Linear) else k


def _resolve_rank(rule: Rule, kernel: jax.Array, input_hw, strides, padding, dilation) -> Rank:
    fam = get_family(rule.family)
    shape = tuple(kernel.shape)
    if rule.macs is not None:
        return rank_for_fraction(
            fam, shape, rule.macs, input_hw=input_hw, strides=strides, padding=padding,
            dilation=dilation,
        )
    if isinstance(rule.rank, str) and rule.rank != "full":
        from factorize.decompositions import select_rank_by_name

        return select_rank_by_name(kernel, rule.family, rule.rank)
    return rule.rank


def convert(
    model: nnx.Module,
    policy: Policy,
    sample_input: Any,
    *,
    progress: bool = False,
    workers: int = 2,
    calibration: Any = None,
    reconstruction: str = "asymmetric",
    damp: float = DEFAULT_DAMP,
    refine: int = DEFAULT_SWEEPS,
) -> tuple[nnx.Module, ConversionReport]:
    """A copy of ``model`` with the layers ``policy`` selects replaced by factorized layers.

    Every selected ``nnx.Conv`` (and ``nnx.Linear``, the 1×1 case) becomes a
    :class:`~factorize.layers.FactorizedConv` (:class:`~factorize.layers.FactorizedLinear`) with
    factors from :func:`factorize.decompose`, its bias, stride, padding and dilation kept;
    everything else (BatchNorm, activations, grouped convs) is untouched. ``model`` itself is
    never modified.

    Args:
      model: any NNX module tree.
      policy: which layers become which family at which rank (:class:`Policy`).
      sample_input: an input batch for ``model``; one example of it is run to learn each
        layer's input size (for MAC budgets and the report).
      progress: show a progress bar over the layers.
      workers: threads decomposing the layers (grouped by kernel shape, as in
        :func:`factorize.decompose_many`); ``1`` converts them one at a time, in order.
      calibration: ``None`` (data-free: each layer's factors minimise its kernel error), or
        input batches (an iterable of arrays shaped like ``sample_input``, or one array): each
        layer is fitted to its output error on them (``decompose(..., inputs=...)``,
        docs/data_aware.md), and its row records that error.
      reconstruction: with ``calibration``: ``"asymmetric"`` (default) converts the layers one
        after another in forward order, each fitted to the *original* layer's outputs given the
        inputs of the network converted so far (Zhang et al., TPAMI 2016, Sec. 3.3), so errors
        do not accumulate; ``"symmetric"`` fits every layer to its own outputs on the original
        network's inputs (one statistics pass, layers in parallel).
      damp: the ridge of the data-aware fit (``decompose``'s ``damp``).
      refine: block-coordinate-descent sweeps of the data-aware fit (``decompose``'s ``refine``).

    Biases: a converted layer with a bias has it refitted in closed form (the output means
    match, so the factors fit the centered covariance); one without (BatchNorm follows) is fitted
    on the uncentered second moment, so the mean error is part of its objective. BatchNorm and
    every other layer stay as they are.

    Returns:
      ``(converted_model, report)``; the report has a row per conv/linear layer (converted or
      kept) and whole-model totals measured with :func:`factorize.count_macs`.

    Example::

        policy = Policy.uniform("dsc", 1, skip="^conv1$")
        small, report = factorize.convert(model, policy, x_train[:8])
        print(report.to_markdown())
        fitted, report = factorize.convert(model, policy, x_train[:8],
                                           calibration=x_train[:512])   # data-aware
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a factorize.Policy, got {type(policy).__name__}")
    batches = None
    if calibration is not None:
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, "
                             f"got {reconstruction!r}")
        batches = check_calibration(calibration, sample_input)
    inputs = layer_inputs(model, sample_input)
    first = jax.tree.map(lambda a: jnp.asarray(a)[:1], sample_input)
    converted = nnx.clone(model)
    layers = candidate_layers(converted)
    order = [p for p in inputs if p in layers]  # forward order; layers never called are skipped
    # a LayerRow for a layer kept as it is, a _Planned for one to convert (its row comes later)
    rows: list[LayerRow | _Planned] = [
        _plan_layer(path, layers[path], inputs[path], policy) for path in order
    ]
    plans = [r for r in rows if isinstance(r, _Planned)]
    with tqdm(total=len(plans), desc="convert", unit="layer", disable=not progress,
              leave=False) as bar:
        if batches is None:
            _decompose_all(converted, layers, rows, plans, workers, bar)
        elif reconstruction == "symmetric":
            stats = collect_input_stats(model, batches, [p.path for p in plans])
            _decompose_all(converted, layers, rows, plans, workers, bar, stats,
                           dict(damp=damp, refine=refine))
        else:  # asymmetric: forward order, each on the statistics of the converted prefix
            for plan in plans:
                stats = collect_input_stats(converted, batches, [plan.path], reference=model)
                _decompose_all(converted, layers, rows, [plan], 1, bar, stats,
                               dict(damp=damp, refine=refine))
    report = ConversionReport(
        rows=tuple(rows),  # type: ignore[arg-type]
        model_macs_before=count_macs(model, first),
        model_macs_after=count_macs(converted, first),
        model_params_before=_params(model),
        model_params_after=_params(converted),
    )
    if policy.target_macs is not None:
        check_budget(report, policy)
    return converted, report


def check_budget(report: ConversionReport, policy: Policy) -> None:
    """Raises unless the converted model (``count_macs``, whole model) costs at most its
    unconverted part plus ``policy.target_macs``."""
    limit = report.model_macs_before - policy.convertible_macs + policy.target_macs
    if report.model_macs_after > limit:
        raise ValueError(
            f"the converted model costs {report.model_macs_after:,} MACs (count_macs), above "
            f"the budget's {limit:,} (target {policy.target_macs:,} for the converted layers)")


def _decompose_all(converted, layers, rows, plans, workers, bar, stats=None, fit=None):
    """Decomposes ``plans`` (data-aware on ``stats`` where given) and installs each result in
    ``converted`` and in its place in ``rows``."""
    jobs = []
    for p in plans:
        job = p.job
        if stats is not None:
            centered = layers[p.path].bias is not None
            opts = {**job.options, **fit, "inputs": stats[p.path], "centered": centered}
            job = dataclasses.replace(job, options=opts)
        jobs.append(job)
    results, errors = decompose_jobs(jobs, workers=workers, on_done=lambda _: bar.update())
    if errors:
        i = min(errors)
        e = errors[i]
        if isinstance(e, (ValueError, TypeError)):
            raise type(e)(f"layer {plans[i].path!r}: {e}") from None
        raise e
    index = {id(r): i for i, r in enumerate(rows)}
    for plan, f in zip(plans, results, strict=True):
        layer_stats = None if stats is None else stats[plan.path]
        rows[index[id(plan)]] = _install(converted, layers[plan.path], plan, f, layer_stats)


@dataclasses.dataclass(frozen=True)
class _Planned:
    """A layer ``convert`` will factorize: its decomposition and what its row needs."""

    path: str
    job: DecomposeJob
    kept: dict[str, Any]
    strides: tuple[int, int]
    padding: Any
    dilation: tuple[int, int]


def _plan_layer(path: str, layer: nnx.Module, in_shape, policy: Policy) -> LayerRow | _Planned:
    """The row of a layer that stays as it is, or the plan to convert it (rank resolved and
    checked, so a bad rule fails here, before any decomposition runs)."""
    layer_type = "linear" if isinstance(layer, nnx.Linear) else "conv"
    kernel = _kernel(layer)
    shape = tuple(int(s) for s in kernel.shape)
    input_hw = (1, 1) if layer_type == "linear" else (in_shape[1], in_shape[2])
    strides, padding, dilation, reason = _geometry(layer)
    if layer_type == "conv":
        macs_before = conv_macs(shape, input_hw, strides, padding, dilation)
    else:
        macs_before = math.prod(shape)  # per input vector
    params = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    rule = policy.rule_for(path, layer_type, shape[:2])
    kept = dict(
        path=path, layer_type=layer_type, family=None, rank=None, kernel_shape=shape,
        input_hw=input_hw, strides=strides, params_before=params, params_after=params,
        macs_before=macs_before, macs_after=macs_before, rel_error=0.0,
    )
    if rule is None or rule.family is None or reason:
        return LayerRow(**kept, note=reason)
    try:
        rank = _resolve_rank(rule, kernel, input_hw, strides, padding, dilation)
        resolve_rank(get_family(rule.family), shape, rank)
    except ValueError as e:
        if policy.on_infeasible == "keep" and rule.macs is not None:
            return LayerRow(**kept, note=f"kept: {e}")
        raise ValueError(f"layer {path!r}: {e}") from None
    job = DecomposeJob(kernel, rule.family, rank, dict(rule.options))
    return _Planned(path, job, kept, strides, padding, dilation)


def _install(converted: nnx.Module, layer: nnx.Module, plan: _Planned, f,
             stats: InputStats | None = None) -> LayerRow:
    """Puts the factorized layer for ``plan`` (bias and geometry kept, or refitted on
    ``stats``) in ``converted`` and returns its report row."""
    bias = layer.bias[...] if layer.bias is not None else None
    approx = None if stats is None else f.to_kernel()
    if stats is not None and bias is not None:
        # the output means match: b̂ = b + Wᵀ E[p_ref] − Ŵᵀ E[p]
        p = stats.patch_size
        ref_mean = stats.mean if stats.ref_mean is None else stats.ref_mean
        w, a = plan.job.kernel.reshape(p, -1), approx.reshape(p, -1)
        bias = (bias + ref_mean @ w - stats.mean @ a).astype(bias.dtype)
    if plan.kept["layer_type"] == "linear":
        new = FactorizedLinear.from_factorized(f, bias=bias, dtype=layer.dtype)
    else:
        new = FactorizedConv.from_factorized(
            f, bias=bias, strides=plan.strides, padding=plan.padding,
            kernel_dilation=plan.dilation, dtype=layer.dtype,
        )
    set_submodule(converted, plan.path, new)
    row = _converted_row(plan.kept, f, new, bias, plan.kept["input_hw"], plan.job.kernel)
    if stats is None:
        return row
    centered = layer.bias is not None
    err = float(output_error(plan.job.kernel, approx, stats, centered=centered))
    return dataclasses.replace(row, output_error=err)


def _converted_row(kept, f, new, bias, input_hw, kernel) -> LayerRow:
    row = dict(kept)
    row.update(
        family=f.family,
        rank=f.rank,
        params_after=f.params + (bias.size if bias is not None else 0),
        macs_after=new.macs(input_hw),
        rel_error=float(relative_error(kernel, f)),
    )
    return LayerRow(**row)


def _params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


LayerBuilder = Callable[[nnx.Module, dict[str, Any], nnx.Rngs], nnx.Module]


def layer_builder(old: nnx.Module, layer: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
    """Rebuilds a converted layer's graph (fresh factors) from ``{"family", "rank"}``.

    Pass to ``factorize.models.build`` / checkpoint restore so converted models, linear layers
    included, come back with their factorization.
    """
    if isinstance(old, nnx.Linear):
        shape = (1, 1, old.in_features, old.out_features)
        f = random_factorized(rngs.params(), shape, layer["family"], layer["rank"])
        bias = jnp.zeros((old.out_features,)) if old.bias is not None else None
        return FactorizedLinear.from_factorized(f, bias=bias, dtype=old.dtype)
    kh, kw = pair(old.kernel_size, "kernel_size")
    return FactorizedConv(
        old.in_features, old.out_features, (kh, kw), family=layer["family"], rank=layer["rank"],
        strides=old.strides or 1, padding=old.padding, kernel_dilation=old.kernel_dilation or 1,
        use_bias=old.bias is not None, dtype=old.dtype, rngs=rngs,
    )
