"""A JSON architecture spec that rebuilds a model, including per-layer factorizations."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from flax import nnx

from factorize.models.registry import make_model

LayerBuilder = Callable[[nnx.Module, dict[str, Any], nnx.Rngs], nnx.Module]


def _jsonable_rank(rank: Any) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


def _rank_from_json(rank: Any) -> Any:
    return tuple(rank) if isinstance(rank, list) else rank


@dataclasses.dataclass
class ModelSpec:
    """Everything needed to rebuild a model's graph (not its weights).

    ``conv`` is the factory used for every factorizable conv: ``None`` for ``nnx.Conv``, else
    ``{"family": ..., "rank": ...}`` for ``factorize.layers.conv_factory``. ``layers`` overrides
    single convs by path (``"blocks/0/conv1"``) with ``{"family": ..., "rank": ...}`` — what a
    converted model records (see :func:`record_layers`).
    """

    model: str
    num_classes: int
    in_channels: int
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    conv: dict[str, Any] | None = None
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["conv"]:
            d["conv"] = {**d["conv"], "rank": _jsonable_rank(d["conv"]["rank"])}
        d["layers"] = {p: {**v, "rank": _jsonable_rank(v["rank"])} for p, v in self.layers.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model spec keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if d.get("conv"):
            d["conv"] = {**d["conv"], "rank": _rank_from_json(d["conv"].get("rank", "full"))}
        d["layers"] = {
            p: {**v, "rank": _rank_from_json(v.get("rank", "full"))}
            for p, v in (d.get("layers") or {}).items()
        }
        return cls(**d)


def conv_factory_for(conv: dict[str, Any] | None) -> Callable[..., nnx.Module]:
    if not conv:
        return nnx.Conv
    from factorize.layers import conv_factory

    return conv_factory(conv.get("family", "full"), conv.get("rank", "full"))


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def conv_layers(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every ``nnx.Conv`` and factorized conv in ``model`` by path (depthwise convs included)."""
    from factorize.layers import FactorizedConv

    return {
        _path_str(path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Conv | FactorizedConv)
    }


def record_layers(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """``{path: {"family", "rank"}}`` for every ``FactorizedConv`` in ``model``.

    Put into ``ModelSpec.layers`` so a converted model's checkpoint rebuilds its graph.
    """
    from factorize.layers import FactorizedConv

    return {
        p: {"family": m.family, "rank": m.rank}
        for p, m in conv_layers(model).items()
        if isinstance(m, FactorizedConv)
    }


def set_submodule(model: nnx.Module, path: str, module: nnx.Module) -> None:
    """Replace the submodule at ``path`` (as :func:`conv_layers` spells it)."""
    *parents, last = path.split("/")
    node: Any = model
    for key in parents:
        node = node[int(key)] if key.isdigit() else getattr(node, key)
    if last.isdigit():
        node[int(last)] = module
    else:
        setattr(node, last, module)


def default_layer_builder(old: nnx.Module, layer: dict[str, Any], rngs: nnx.Rngs) -> nnx.Module:
    """A ``FactorizedConv`` with ``old``'s geometry and ``layer``'s family/rank."""
    from factorize.layers import FactorizedConv

    extra = {k: v for k, v in layer.items() if k not in ("family", "rank")}
    return FactorizedConv(
        old.in_features,
        old.out_features,
        old.kernel_size,
        family=layer["family"],
        rank=layer["rank"],
        strides=old.strides,
        padding=old.padding,
        use_bias=old.use_bias,
        kernel_dilation=old.kernel_dilation,
        rngs=rngs,
        **extra,
    )


def build(
    spec: ModelSpec, *, rngs: nnx.Rngs, layer_builder: LayerBuilder | None = None
) -> nnx.Module:
    """Rebuild ``spec``'s model (fresh weights): the base model, then per-layer overrides.

    ``layer_builder(old_module, layer_spec, rngs)`` builds an overridden layer; the default makes
    a ``FactorizedConv`` with the old layer's geometry, so extra keys in a layer spec are passed
    to it. A conversion that produces other layer types passes its own builder.
    """
    model = make_model(
        spec.model,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        conv=conv_factory_for(spec.conv),
        rngs=rngs,
        **spec.kwargs,
    )
    if spec.layers:
        builder = layer_builder or default_layer_builder
        convs = conv_layers(model)
        for path, layer in spec.layers.items():
            if path not in convs:
                raise ValueError(
                    f"model spec names layer {path!r}, which {spec.model} does not have; "
                    f"conv layers: {', '.join(convs)}"
                )
            set_submodule(model, path, builder(convs[path], layer, rngs))
    return model
