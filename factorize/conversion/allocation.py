"""Per-layer budget allocation: each layer's family and rank under one whole-model MAC budget.

Three steps, each replaceable:

1. **Candidates** (:func:`candidates`): for every convertible layer, the (family, rank) points
   on a grid of MAC fractions, each costed by its chain's MACs at the layer's real input size
   (:func:`factorize.chain.chain_macs`), plus "keep the layer as it is" at its full cost.
2. **Sensitivity curves** (:func:`sensitivity_curves`): a *scorer* gives each candidate a
   loss (lower is better) with only that layer converted; :func:`eval_scorer` evaluates the
   whole model on held-out data (AIMET's per-layer eval callback), :func:`kernel_error_scorer`
   is the data-free proxy ‖W − Ŵ‖/‖W‖. Curves are cached as JSON (:class:`CurveCache`).
3. **Allocators**, pure functions ``(curves, budget) -> {path: index of the chosen point}``:
   :func:`uniform` (each layer within the same fraction: today's rule), :func:`greedy` (AIMET's
   greedy compression-ratio selection) and :func:`knapsack` (exact multiple-choice knapsack by
   dynamic programming over the per-layer loss-vs-MACs curves, as in ALDS).

:func:`allocate` runs the three and returns an :class:`Allocation`, whose ``policy`` is an
ordinary :class:`~factorize.conversion.Policy` (one rule per layer) carrying its MAC target, so
:func:`factorize.convert` checks the built model against it with :func:`factorize.count_macs`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from factorize._io import atomic_write_json
from factorize.chain import chain_macs
from factorize.costs import conv_macs
from factorize.families import Rank, get_family, rank_for_fraction

ALLOCATIONS = ("uniform", "greedy", "knapsack")
# MAC fractions at which each family's rank is sampled; the budget's own fraction is added, so
# the uniform solution is always among the candidates.
GRID = (0.03, 0.05, 0.07, 0.09, 0.11, 0.125, 0.15, 0.18, 0.22, 0.25, 0.3, 0.36, 0.43, 0.5, 0.6,
        0.75)


class Point(NamedTuple):
    """One candidate of one layer: ``family=None`` keeps the layer (its full cost, no loss)."""

    family: str | None
    rank: Rank
    macs: int
    loss: float = 0.0


@dataclasses.dataclass(frozen=True)
class Slot:
    """A convertible conv layer: what its candidates need to know."""

    path: str
    kernel: jax.Array
    input_hw: tuple[int, int]
    strides: tuple[int, int]
    padding: Any
    dilation: tuple[int, int]

    @property
    def macs(self) -> int:
        return conv_macs(tuple(self.kernel.shape), self.input_hw, self.strides, self.padding,
                         self.dilation)


def convertible_layers(
    model: nnx.Module,
    sample_input: Any,
    *,
    skip: str | None = None,
    kernel_size: tuple[int, int] | None = None,
) -> list[Slot]:
    """The convs a uniform policy (``Policy.uniform(family, skip=, kernel_size=)``) converts,
    in forward order: not skipped, not grouped, of ``kernel_size`` if given."""
    from factorize.conversion.convert import _geometry, candidate_layers, layer_inputs
    from factorize.conversion.policy import Policy

    probe = Policy.uniform("full", skip=skip, kernel_size=kernel_size)
    inputs = layer_inputs(model, sample_input)
    layers = candidate_layers(model)
    slots = []
    for path, shape in inputs.items():
        layer = layers.get(path)
        if not isinstance(layer, nnx.Conv):
            continue
        kernel = layer.kernel[...]
        rule = probe.rule_for(path, "conv", tuple(kernel.shape[:2]))
        strides, padding, dilation, reason = _geometry(layer)
        if rule is None or rule.family is None or reason:
            continue
        slots.append(Slot(path, kernel, (shape[1], shape[2]), strides, padding, dilation))
    return slots


def candidates(
    slot: Slot, families: Sequence[str], grid: Sequence[float] = GRID
) -> list[Point]:
    """``slot``'s points: keep, then per family the largest rank within each grid fraction of
    its MACs (fractions the family cannot reach are left out), without duplicates."""
    shape = tuple(int(s) for s in slot.kernel.shape)
    points = [Point(None, None, slot.macs)]
    seen = set()
    for family in families:
        fam = get_family(family)
        for fraction in sorted(grid):
            try:
                rank = rank_for_fraction(fam, shape, fraction, input_hw=slot.input_hw,
                                         strides=slot.strides, padding=slot.padding,
                                         dilation=slot.dilation)
            except ValueError:
                continue  # the family's smallest rank costs more
            if (family, rank) in seen:
                continue
            seen.add((family, rank))
            macs = chain_macs(fam.chain(shape, rank), slot.input_hw, slot.strides, slot.padding,
                              slot.dilation)
            points.append(Point(family, rank, macs))
    return points


# --- scorers -----------------------------------------------------------------------------------

# A projection fits one layer: (path, kernel, family, rank) -> the composed kernel Ŵ it yields.
Projection = Callable[[str, jax.Array, str, Rank], jax.Array]


def data_free_projection(options: Mapping[str, Mapping[str, Any]] | None = None) -> Projection:
    """``decompose(kernel, family, rank, **options[family])``: the kernel-error projection."""
    from factorize.factorized import decompose

    opts = {k: dict(v) for k, v in (options or {}).items()}

    def project(path: str, kernel: jax.Array, family: str, rank: Rank) -> jax.Array:
        return decompose(kernel, family, rank, **opts.get(family, {})).to_kernel()

    project.name = "data-free" + (f":{json.dumps(opts, sort_keys=True)}" if opts else "")
    return project


def data_aware_projection(
    model: nnx.Module,
    calibration: Any,
    paths: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    reconstruction: str = "symmetric",
    **fit: Any,
) -> Projection:
    """``decompose(kernel, family, rank, inputs=stats[path])``: each candidate fitted to the
    layer's output error on ``calibration`` (statistics of the original network).

    With one layer converted at a time its inputs are the original network's, so the
    asymmetric fit of that layer is this symmetric one: one-round curves serve both modes.
    Re-scoring rounds see the other layers converted (``projection.with_context(kernels)``):
    with ``reconstruction="asymmetric"`` each candidate is then fitted, as
    ``convert(..., reconstruction="asymmetric")`` will fit it, to the original layer's outputs
    given the inputs of the network with ``kernels`` swapped in (Zhang et al., TPAMI 2016,
    Sec. 3.3); with ``"symmetric"`` the context changes nothing. ``fit`` goes to ``decompose``
    (``damp``, ``refine``).
    """
    from factorize.conversion.calibration import collect_input_stats

    if reconstruction not in ("symmetric", "asymmetric"):
        raise ValueError(f"reconstruction must be 'symmetric' or 'asymmetric', got "
                         f"{reconstruction!r}")
    batches = [calibration] if not isinstance(calibration, (list, tuple)) else calibration
    paths = list(paths)
    opts = {k: dict(v) for k, v in (options or {}).items()}
    n = sum(len(b) for b in batches)
    digest = hashlib.sha256(b"".join(np.asarray(b).tobytes() for b in batches)).hexdigest()
    name = (f"data-aware:{n}:{digest[:12]}" + (f":{json.dumps(fit, sort_keys=True)}"
            if fit else "") + (f":{json.dumps(opts, sort_keys=True)}" if opts else ""))
    centered = {p: m.bias is not None for p, m in _convs(model).items()}
    contextual = (model, batches, paths) if reconstruction == "asymmetric" else None
    return _DataAwareProjection(name, collect_input_stats(model, batches, paths), centered,
                                opts, fit, contextual)


class _DataAwareProjection:
    """A :data:`Projection` on fixed per-layer input statistics (see
    :func:`data_aware_projection`)."""

    KEEP = 4  # contexts whose statistics are kept (each is one set of per-layer covariances)

    def __init__(self, name, stats, centered, options, fit, contextual=None):
        self.name, self.stats, self.centered = name, stats, centered
        self.options, self.fit = options, fit
        self.contextual: tuple | None = contextual  # (model, batches, paths) when asymmetric
        self._contexts: dict[str, _DataAwareProjection] = {}

    @property
    def reconstruction(self) -> str:
        """How a whole network of its fits is built."""
        return "symmetric" if self.contextual is None else "asymmetric"

    def __call__(self, path: str, kernel: jax.Array, family: str, rank: Rank) -> jax.Array:
        from factorize.factorized import decompose

        return decompose(kernel, family, rank, inputs=self.stats[path],
                         centered=self.centered[path], **self.options.get(family, {}),
                         **self.fit).to_kernel()

    def with_context(self, kernels: Mapping[str, jax.Array]) -> _DataAwareProjection:
        """The projection with the layers in ``kernels`` replaced by those kernels: itself if
        symmetric, else one on the asymmetric statistics of that network against the original
        (each layer's inputs depend only on the layers before it, so one pass serves all)."""
        if self.contextual is None:
            return self
        key = _kernels_id(kernels)
        if key not in self._contexts:
            from factorize.conversion.calibration import collect_input_stats

            model, batches, paths = self.contextual
            swapped = nnx.clone(model)
            layers = _convs(swapped)
            for p, k in kernels.items():
                layers[p].kernel[...] = k
            stats = collect_input_stats(swapped, batches, paths, reference=model)
            if len(self._contexts) >= self.KEEP:
                self._contexts.pop(next(iter(self._contexts)))
            self._contexts[key] = _DataAwareProjection(
                f"{self.name}:asymmetric:{key}", stats, self.centered, self.options, self.fit,
                self.contextual)
        return self._contexts[key]


def _kernels_id(kernels: Mapping[str, jax.Array]) -> str:
    return hashlib.sha256(b"".join(p.encode() + np.asarray(k).tobytes()
                                   for p, k in sorted(kernels.items()))).hexdigest()[:12]


def _in_context(projection: Projection, kernels: Mapping[str, jax.Array]) -> Projection:
    """``projection`` with other layers replaced by ``kernels`` (unchanged if it ignores them)."""
    with_context = getattr(projection, "with_context", None)
    return with_context(kernels) if with_context is not None else projection


class Scorer:
    """``scorer(path, kernel_hat)``: the loss of the model with the kernel at ``path`` replaced by
    ``kernel_hat`` (every other layer as in ``context``). Lower is better. ``name`` identifies the
    scorer in the cache."""

    name: str = "scorer"

    def __call__(self, path: str, kernel_hat: jax.Array) -> float:
        raise NotImplementedError

    def with_context(self, kernels: Mapping[str, jax.Array]) -> Scorer:
        """The same scorer with other layers' kernels replaced (for re-scoring rounds)."""
        return self


class kernel_error_scorer(Scorer):
    """Relative kernel error ‖W − Ŵ‖_F / ‖W‖_F: the data-free proxy (no model run).

    Example::

        from factorize.conversion.allocation import kernel_error_scorer
        w = jax.random.normal(jax.random.key(0), (3, 3, 8, 8))
        score = kernel_error_scorer({"conv": w})
        score("conv", w)                     # 0.0
        score("conv", jnp.zeros_like(w))     # 1.0
    """

    def __init__(self, kernels: Mapping[str, jax.Array]):
        self.kernels = dict(kernels)
        self.name = "kernel_error"

    def __call__(self, path: str, kernel_hat: jax.Array) -> float:
        w = self.kernels[path]
        return float(jnp.linalg.norm(w - kernel_hat) / jnp.linalg.norm(w))


class output_error_scorer(Scorer):
    """Relative output error E‖Wᵀx − Ŵᵀx‖² / E‖Wᵀx‖² on calibration statistics
    (``factorize.conversion.calibration.output_error``): the cheap data-aware proxy.

    Example::

        from factorize.conversion.allocation import output_error_scorer
        from factorize.conversion.calibration import InputStats
        x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
        w = jax.random.normal(jax.random.key(1), (3, 3, 3, 16))
        score = output_error_scorer({"conv": w}, {"conv": InputStats.from_inputs(x, w.shape)})
        score("conv", w)                     # 0.0
    """

    def __init__(self, kernels: Mapping[str, jax.Array], stats: Mapping[str, Any]):
        self.kernels, self.stats = dict(kernels), dict(stats)
        self.name = "output_error"

    def __call__(self, path: str, kernel_hat: jax.Array) -> float:
        from factorize.conversion.calibration import output_error

        return float(output_error(self.kernels[path], kernel_hat, self.stats[path]))


class eval_scorer(Scorer):
    """The whole model's held-out loss (``metric="loss"``, mean cross-entropy) or error rate
    (``metric="error"``, 1 − accuracy) with one layer's kernel replaced by its projection: the
    eval callback of AIMET's per-layer sensitivity analysis.

    The projection Ŵ is swapped into the layer's full kernel: a chain of linear convs computes
    the same function as the conv with its composed kernel, so this is the converted model's loss
    (up to float rounding) and one compiled forward pass serves every candidate.
    """

    def __init__(self, model: nnx.Module, x: Any, y: Any, *, metric: str = "loss",
                 batch_size: int = 500):
        from factorize.training.train import _eval_fn

        if metric not in ("loss", "error"):
            raise ValueError(f"metric must be 'loss' or 'error', got {metric!r}")
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} "
                             f"and {len(y)}")
        self.model = nnx.clone(model)
        self.model.eval()
        self.x, self.y, self.metric, self.batch_size = x, y, metric, batch_size
        self._step = _eval_fn(nnx.split(self.model, nnx.Param, ...)[0])
        self._layers = {p: m for p, m in _convs(self.model).items()}
        self._context: dict[str, jax.Array] = {}
        digest = hashlib.sha256(np.asarray(x).tobytes() + np.asarray(y).tobytes()).hexdigest()
        self.name = f"eval:{metric}:{len(x)}:{digest[:12]}"

    def with_context(self, kernels: Mapping[str, jax.Array]) -> eval_scorer:
        new = object.__new__(eval_scorer)
        new.__dict__.update(self.__dict__)
        new._context = dict(kernels)
        return new

    def __call__(self, path: str, kernel_hat: jax.Array) -> float:
        from factorize.training import evaluate

        swapped = {**self._context, path: kernel_hat}
        saved = {p: self._layers[p].kernel[...] for p in swapped}
        try:
            for p, k in swapped.items():
                self._layers[p].kernel[...] = k
            r = evaluate(self.model, self.x, self.y, batch_size=self.batch_size, _step=self._step)
        finally:
            for p, k in saved.items():
                self._layers[p].kernel[...] = k
        return r["loss"] if self.metric == "loss" else 1.0 - r["accuracy"]


def _convs(model: nnx.Module) -> dict[str, nnx.Module]:
    from factorize.conversion.convert import candidate_layers

    return {p: m for p, m in candidate_layers(model).items() if isinstance(m, nnx.Conv)}


# --- the curve cache ---------------------------------------------------------------------------


def model_hash(model: nnx.Module) -> str:
    """SHA-256 (first 16 hex digits) of the model's parameters and batch statistics."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(nnx.state(model))[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()[:16]


class CurveCache:
    """Scores by (model hash, layer, family, rank, scorer, projection, context) in a JSON file.

    Written atomically after each layer's curve, so an interrupted run keeps what it scored;
    ``path=None`` keeps the cache in memory only.
    """

    VERSION = 1

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else Path(path)
        self.entries: dict[str, float] = self._read()

    def _read(self) -> dict[str, float]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != self.VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError(f"expected version {self.VERSION} with an 'entries' object")
            return {str(k): float(v) for k, v in data["entries"].items()}
        except (ValueError, AttributeError, TypeError) as e:
            raise ValueError(
                f"sensitivity cache {os.fspath(self.path)!r} is not a valid cache file "
                f"({e}); remove it or pass another path") from None

    @staticmethod
    def key(*parts: Any) -> str:
        return "|".join(json.dumps(p, sort_keys=True) if not isinstance(p, str) else p
                        for p in parts)

    def save(self) -> None:
        """Writes the entries merged with what the file holds now, so two runs sharing one
        cache keep each other's scores (a score is a function of its key)."""
        if self.path is not None:
            self.entries = {**self._read(), **self.entries}
            atomic_write_json(self.path, {"version": self.VERSION, "entries": self.entries})


def sensitivity_curves(
    slots: Sequence[Slot],
    points: Mapping[str, Sequence[Point]],
    scorer: Scorer,
    projection: Projection,
    *,
    cache: CurveCache | None = None,
    model_id: str = "",
    context: Mapping[str, jax.Array] | None = None,
) -> dict[str, list[Point]]:
    """Each layer's points with ``loss`` = score with that layer at the point (others as in
    ``context``, default unconverted) minus the score with it kept: the loss *increase*."""
    cache = cache if cache is not None else CurveCache()
    ctx = dict(context or {})
    ctx_id = _kernels_id(ctx)
    curves = {}
    for slot in slots:
        others = {p: k for p, k in ctx.items() if p != slot.path}
        score = scorer.with_context(others) if others else scorer
        cid = ctx_id if others else ""

        def cached(point: Point, slot=slot, score=score, cid=cid) -> float:
            key = CurveCache.key(model_id, slot.path, point.family or "keep",
                                 _rank_json(point.rank), scorer.name, projection.name, cid)
            if key not in cache.entries:
                k = slot.kernel if point.family is None else projection(
                    slot.path, slot.kernel, point.family, point.rank)
                cache.entries[key] = float(score(slot.path, k))
            return cache.entries[key]

        before = len(cache.entries)
        base = cached(points[slot.path][0])
        curves[slot.path] = [p._replace(loss=cached(p) - base) if p.family else p
                             for p in points[slot.path]]
        if len(cache.entries) > before:  # a run that only reads leaves the file alone
            cache.save()
    return curves


def _fit_context(slots: Sequence[Slot], chosen: Mapping[str, Point], projection: Projection
                 ) -> dict[str, jax.Array]:
    """Every layer's kernel at its chosen point, fitted in forward order given the layers before
    it as fitted (what ``convert`` builds; for a projection that ignores context, each alone)."""
    context: dict[str, jax.Array] = {}
    for s in slots:
        c = chosen[s.path]
        context[s.path] = s.kernel if c.family is None else _in_context(projection, context)(
            s.path, s.kernel, c.family, c.rank)
    return context


def _rank_json(rank: Rank) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


# --- allocators: (curves, budget) -> {path: index} ---------------------------------------------


def _check_budget(curves: Mapping[str, Sequence[Point]], budget: int) -> None:
    smallest = sum(min(p.macs for p in pts) for pts in curves.values())
    if budget < smallest:
        full = sum(max(p.macs for p in pts) for pts in curves.values())
        raise ValueError(
            f"macs: the target {budget:,} MACs ({budget / full:.4f} of the convertible layers' "
            f"{full:,}) is below the smallest reachable {smallest:,} ({smallest / full:.4f})")


def uniform(curves: Mapping[str, Sequence[Point]], budget: int) -> dict[str, int]:
    """Each layer within the same fraction of its own MACs (budget / total): per family the
    largest candidate within it (``Policy.uniform(family, macs=)``), the lowest-loss family if
    there are several. Raises if a layer has no candidate within the fraction."""
    total = sum(pts[0].macs for pts in curves.values())
    fraction = budget / total
    choice = {}
    for path, pts in curves.items():
        best: dict[str, int] = {}
        for i, p in enumerate(pts):
            if p.family is not None and p.macs <= fraction * pts[0].macs and (
                    p.family not in best or p.macs > pts[best[p.family]].macs):
                best[p.family] = i
        if not best:
            smallest = min(p.macs for p in pts if p.family) / pts[0].macs
            raise ValueError(
                f"macs: layer {path!r} cannot get within {fraction:.4f} of its MACs with a "
                f"uniform allocation (its smallest candidate costs {smallest:.4f})")
        choice[path] = min(best.values(), key=lambda i: (pts[i].loss, -pts[i].macs))
    return choice


def _cost(curves, choice) -> int:
    return sum(curves[p][i].macs for p, i in choice.items())


def greedy(curves: Mapping[str, Sequence[Point]], budget: int) -> tuple[dict[str, int], float]:
    """AIMET's greedy compression-ratio selection: the smallest common loss threshold ``t`` at
    which every layer taking its cheapest point with loss ≤ ``t`` meets the budget; returns the
    choice and ``t``.

    The total cost falls as ``t`` grows, so a binary search over the distinct losses finds the
    smallest such ``t`` exactly (Qualcomm AIMET, "greedy compression ratio selection").
    """
    _check_budget(curves, budget)

    def pick(t: float) -> dict[str, int]:
        return {path: min((i for i, p in enumerate(pts) if p.loss <= t),
                          key=lambda i: (pts[i].macs, pts[i].loss))
                for path, pts in curves.items()}

    # t >= 0: the kept layer (no loss increase) is always admissible; at the largest level
    # every point is, so the cheapest, which _check_budget found within the budget.
    levels = sorted({max(p.loss, 0.0) for pts in curves.values() for p in pts} | {0.0})
    lo, hi = 0, len(levels) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _cost(curves, pick(levels[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return pick(levels[lo]), levels[lo]


def knapsack(curves: Mapping[str, Sequence[Point]], budget: int, *, grid: int = 4000
             ) -> dict[str, int]:
    """Exact multiple-choice knapsack: one point per layer minimising the summed loss increase
    with summed MACs ≤ ``budget`` (ALDS, Liebenwein et al., NeurIPS 2021, allocate by per-layer
    error-vs-cost curves), by dynamic programming over costs.

    Costs are counted in units of ``ceil(budget / grid)`` MACs, each rounded *up* and the
    capacity rounded down, so every solution the DP accepts meets the exact budget; with a unit
    of one MAC (``budget <= grid``) the result is the exact optimum.
    """
    _check_budget(curves, budget)
    unit = max(1, -(-budget // grid))
    cap = budget // unit
    paths = list(curves)
    inf = math.inf
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = []
    for path in paths:
        pts = curves[path]
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, np.int64)
        for i, p in enumerate(pts):
            q = -(-p.macs // unit)
            if q > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[q:] = best[: cap + 1 - q] + p.loss
            better = cand < new
            new[better], arg[better] = cand[better], i
        best = new
        picks.append(arg)
    if not np.isfinite(best).any():
        # the quantisation can lose a budget met with a few MACs to spare: search exactly
        return _exhaustive(curves, budget)
    q = int(np.argmin(best))
    choice = {}
    for path, arg in zip(reversed(paths), reversed(picks), strict=True):
        i = int(arg[q])
        choice[path] = i
        q -= -(-curves[path][i].macs // unit)
    return {p: choice[p] for p in paths}


def _exhaustive(curves, budget) -> dict[str, int]:
    import itertools

    paths = list(curves)
    best, arg = math.inf, None
    for combo in itertools.product(*(range(len(curves[p])) for p in paths)):
        choice = dict(zip(paths, combo, strict=True))
        if _cost(curves, choice) <= budget:
            loss = sum(curves[p][i].loss for p, i in choice.items())
            if loss < best:
                best, arg = loss, choice
    if arg is None:
        raise ValueError(f"macs: no combination of candidates meets {budget:,} MACs")
    return arg


# --- the whole step ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Allocation:
    """The allocator's result: the policy to convert with, and why each layer got its point.

    Attributes:
      policy: one rule per convertible layer (``family=None``: kept), with ``target_macs``.
      curves: every layer's points (``loss`` = the scorer's increase at that point).
      choice: the index into ``curves[path]`` each layer got.
      method: the allocator's name.
      fraction: the budget as a fraction of the convertible layers' MACs.
      target: the budget in MACs (``floor(fraction × convertible MACs)``).
      scorer: the scorer's name (``"none"``: nothing was scored).
      projection: the projection's name.
      threshold: greedy's loss threshold (else ``None``).
      rounds: how many times the curves were scored.
      whole: with ``keep_best``: each candidate allocation's score on the whole network
        (``"round 1"``, ``"round 2"``, ..., ``"uniform"``), every layer at its point.
      selected: which of ``whole`` the policy is (``None`` without ``keep_best``).
    """

    policy: Any
    curves: dict[str, list[Point]]
    choice: dict[str, int]
    method: str
    fraction: float
    target: int
    scorer: str
    projection: str
    threshold: float | None = None
    rounds: int = 1
    whole: dict[str, float] = dataclasses.field(default_factory=dict)
    selected: str | None = None

    @property
    def macs(self) -> int:
        return _cost(self.curves, self.choice)

    def to_dict(self) -> dict[str, Any]:
        layers = {}
        for path, pts in self.curves.items():
            c = pts[self.choice[path]]
            layers[path] = {
                "family": c.family, "rank": _rank_json(c.rank), "macs": c.macs,
                "macs_full": pts[0].macs, "loss_increase": c.loss,
                "curve": [{"family": p.family, "rank": _rank_json(p.rank), "macs": p.macs,
                           "loss_increase": p.loss} for p in pts],
            }
        return {"method": self.method, "fraction": self.fraction, "target_macs": self.target,
                "macs": self.macs, "scorer": self.scorer, "projection": self.projection,
                "threshold": self.threshold, "rounds": self.rounds, "whole": self.whole,
                "selected": self.selected, "layers": layers}

    def to_markdown(self) -> str:
        why = {"uniform": "every layer within the same fraction of its MACs",
               "greedy": f"cheapest point with loss increase ≤ threshold {self.threshold:.4g}"
               if self.threshold is not None else "",
               "knapsack": "least summed loss increase within the budget (exact DP)"}[self.method]
        lines = [f"Allocation `{self.method}` ({why}); scorer `{self.scorer}`, projection "
                 f"`{self.projection}`; {self.macs:,} of {self.target:,} target MACs "
                 f"({self.macs / sum(p[0].macs for p in self.curves.values()):.4f} of the "
                 f"convertible layers)." + (
                     f" Kept the best on the whole network: {self.selected} ("
                     + ", ".join(f"{k} {v:.4g}" for k, v in self.whole.items()) + ")."
                     if self.selected else ""), "",
                 "| layer | family | rank | MACs | fraction | loss increase | next dearer point |",
                 "|---|---|---|---:|---:|---:|---|"]
        for path, pts in self.curves.items():
            c = pts[self.choice[path]]
            dearer = [p for p in pts if p.macs > c.macs and p.loss < c.loss]
            nxt = min(dearer, key=lambda p: p.macs) if dearer else None
            step = (f"{nxt.family} {_rank_str(nxt.rank)}: +{nxt.macs - c.macs:,} MACs, "
                    f"{nxt.loss - c.loss:+.4g} loss" if nxt else "–")
            lines.append(f"| `{path}` | {c.family or 'kept'} | {_rank_str(c.rank)} | {c.macs:,} "
                         f"| {c.macs / pts[0].macs:.3f} | {c.loss:.4g} | {step} |")
        return "\n".join(lines) + "\n"


def _rank_str(rank: Rank) -> str:
    return "" if rank is None else str(tuple(rank)) if isinstance(rank, (tuple, list)) else str(
        rank)


def allocate(
    model: nnx.Module,
    sample_input: Any,
    families: str | Sequence[str],
    macs: float = 0.25,
    allocation: str = "knapsack",
    *,
    scorer: Scorer | None = None,
    projection: Projection | None = None,
    skip: str | None = None,
    kernel_size: tuple[int, int] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    cache: CurveCache | str | os.PathLike | None = None,
    grid: Sequence[float] = GRID,
    rounds: int = 1,
    keep_best: bool = False,
) -> Allocation:
    """Chooses each convertible layer's family and rank so that their MACs total at most
    ``macs`` × their original MACs; see the module docstring.

    Args:
      model: the trained model.
      sample_input: an input batch (its first example sizes the layers).
      families: one family name or several (each layer then picks its family too).
      macs: the budget, a fraction in (0, 1] of the convertible layers' MACs.
      allocation: ``"uniform"``, ``"greedy"`` or ``"knapsack"``.
      scorer: a :class:`Scorer` (default :class:`kernel_error_scorer`, data-free).
      projection: fits a candidate (default :func:`data_free_projection` with ``options``).
      skip: a regex of layer paths kept as they are, as in ``Policy.uniform``.
      kernel_size: convert only kernels of this ``(kh, kw)``.
      options: projection options per family, e.g. ``{"cp3": {"n_iter": 50}}``.
      cache: a :class:`CurveCache` or a JSON file path for one; a second run reads its scores.
      grid: the MAC fractions at which candidates are sampled.
      rounds: with ``rounds=2`` the curves are scored again with the other layers converted
        as the first allocation chose (layers interact), then allocated again.
      keep_best: score every round's allocation and the uniform one (where every layer has a
        point within the fraction) on the whole network, every layer at its point as the
        projection fits it (in forward order, given the layers before it: what ``convert``
        builds), and keep the lowest. The curves add one layer's loss increase at a time; this
        checks their sum against the network itself, so the result is never worse than
        uniform on the scorer's data. Needs a scorer that sees the other layers
        (:class:`eval_scorer`).

    Raises:
      ValueError: an unknown family or allocation, ``macs`` out of (0, 1], or a target below
        the cheapest candidate of every layer (naming ``macs``, the target and the smallest
        reachable).

    Example::

        from factorize.conversion import convert
        from factorize.conversion.allocation import allocate
        from factorize.models import CNN

        model, x = CNN(10, 1, rngs=nnx.Rngs(0)), jnp.zeros((1, 8, 8, 1))
        a = allocate(model, x, ["dsc", "cp3"], macs=0.25, allocation="knapsack", skip="^conv1$")
        print(a.to_markdown())                      # each layer's point and the next dearer one
        assert a.macs <= a.target
        small, report = convert(model, a.policy, x)
    """
    from factorize.conversion.policy import Policy, Rule

    families = [families] if isinstance(families, str) else list(families)
    if not families:
        raise ValueError("families must name at least one family, got none")
    for f in families:
        get_family(f)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if isinstance(macs, bool) or not isinstance(macs, (int, float)) or not 0.0 < macs <= 1.0:
        raise ValueError(f"macs must be a fraction in (0, 1], got {macs!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if keep_best and (scorer is None or type(scorer).with_context is Scorer.with_context):
        raise ValueError(f"keep_best needs a scorer that sees the other layers (eval_scorer), "
                         f"got {type(scorer).__name__ if scorer else 'the default kernel_error'}")
    slots = convertible_layers(model, sample_input, skip=skip, kernel_size=kernel_size)
    if not slots:
        raise ValueError("no convertible conv layer (check skip and kernel_size)")
    full = sum(s.macs for s in slots)
    target = int(math.floor(macs * full))
    grid = sorted(set(grid) | {float(macs)})
    points = {s.path: candidates(s, families, grid) for s in slots}
    _check_budget(points, target)
    projection = projection or data_free_projection(options)
    scorer = scorer or kernel_error_scorer({s.path: s.kernel for s in slots})
    if not isinstance(cache, CurveCache):
        cache = CurveCache(cache)
    mid = model_hash(model)
    threshold = None
    context: dict[str, jax.Array] = {}
    rounds = 1 if allocation == "uniform" else rounds
    chosen_by: dict[str, dict[str, int]] = {}
    for r in range(rounds):
        if allocation == "uniform" and len(families) == 1:
            curves = {p: list(pts) for p, pts in points.items()}  # one family: nothing to score
        else:
            # round one: one layer at a time on the original inputs, where the asymmetric fit
            # is the symmetric one (up to the ridge), so both modes share its curves
            fitted = _in_context(projection, context) if context else projection
            curves = sensitivity_curves(slots, points, scorer, fitted, cache=cache,
                                        model_id=mid, context=context)
        if allocation == "greedy":
            choice, threshold = greedy(curves, target)
        elif allocation == "knapsack":
            choice = knapsack(curves, target)
        else:
            choice = uniform(curves, target)
        chosen_by[f"round {r + 1}"] = choice
        if r + 1 == rounds:
            break
        context = _fit_context(slots, {s.path: curves[s.path][choice[s.path]] for s in slots},
                               projection)
    whole, selected = {}, None
    if keep_best:
        if allocation != "uniform":
            try:
                chosen_by["uniform"] = uniform(curves, target)
            except ValueError:
                pass  # some layer has no point within the fraction: no uniform candidate
        whole = {name: _whole_score(slots, curves, c, scorer, projection, cache, mid)
                 for name, c in chosen_by.items()}
        selected = min(whole, key=lambda k: (whole[k], k != f"round {rounds}"))
        choice = chosen_by[selected]
    cost = _cost(curves, choice)
    assert cost <= target, (cost, target)  # every allocator meets the budget by construction
    rules = []
    for s in slots:
        c = curves[s.path][choice[s.path]]
        rules.append(Rule(c.family, c.rank if c.family else "full",
                          path=f"^{re.escape(s.path)}$",
                          options=dict((options or {}).get(c.family, {})) if c.family else {}))
    policy = Policy(tuple(rules), target_macs=target, convertible_macs=full)
    scored = not (allocation == "uniform" and len(families) == 1)
    return Allocation(policy, curves, choice, allocation, float(macs), target,
                      scorer.name if scored or keep_best else "none", projection.name,
                      threshold, rounds, whole, selected)


def _whole_score(slots, curves, choice, scorer, projection, cache, model_id) -> float:
    """The scorer on the network with every layer at its chosen point (cached)."""
    chosen = {s.path: curves[s.path][choice[s.path]] for s in slots}
    # one-layer fits are shared by both reconstructions, whole networks are not
    key = CurveCache.key(model_id, "whole", [[p, c.family or "keep", _rank_json(c.rank)]
                                              for p, c in chosen.items()],
                         scorer.name, projection.name,
                         getattr(projection, "reconstruction", "symmetric"))
    if key not in cache.entries:
        kernels = _fit_context(slots, chosen, projection)
        first = slots[0].path
        cache.entries[key] = float(scorer.with_context(
            {p: k for p, k in kernels.items() if p != first})(first, kernels[first]))
        cache.save()
    return cache.entries[key]
