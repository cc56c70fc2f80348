"""Conversion policies: which layers become which family at which rank.

A :class:`Policy` is an ordered list of :class:`Rule`; for each layer the first rule that matches
decides (``family=None`` keeps the layer as it is). Policies are plain data, so a rules file is
JSON::

    {"rules": [
        {"path": "^conv1$", "family": null},
        {"kernel_size": [3, 3], "family": "cp4", "rank": 0.25},
        {"family": "dsc", "rank": 1}
    ]}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from factorize.families import FAMILIES, RankArg, get_family

LAYER_TYPES = ("conv", "linear", "any")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of a policy.

    Attributes:
      family: the family to convert to, or ``None`` to keep matching layers unchanged.
      rank: an int (pair for ``tucker2``), a parameter fraction in (0, 1], ``"full"``, or a
        selection method name (``"evbmf"``, ``"energy:0.9"``) resolved per layer from its kernel.
      macs: instead of ``rank``, the largest rank within this fraction of the layer's MACs at
        its real input size.
      path: a regular expression searched in the layer's path (``"blocks/0/conv1"``); ``None``
        matches every path.
      kernel_size: match only kernels of this ``(kh, kw)``.
      layer_type: ``"conv"`` (default), ``"linear"`` (``nnx.Linear``, the 1×1 case) or ``"any"``.
      options: projection options for ``decompose`` (e.g. ``{"n_iter": 50}``).
    """

    family: str | None
    rank: RankArg = "full"
    macs: float | None = None
    path: str | None = None
    kernel_size: tuple[int, int] | None = None
    layer_type: str = "conv"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.family is not None:
            get_family(self.family)  # raises with the valid names
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {self.layer_type!r}")
        if self.macs is not None and not 0.0 < self.macs <= 1.0:
            raise ValueError(f"macs must be a fraction in (0, 1], got {self.macs}")
        if self.path is not None:
            try:
                re.compile(self.path)
            except re.error as e:
                raise ValueError(f"path {self.path!r} is not a regular expression: {e}") from None
        if self.kernel_size is not None:
            object.__setattr__(self, "kernel_size", tuple(int(k) for k in self.kernel_size))
        if isinstance(self.rank, list):
            object.__setattr__(self, "rank", tuple(self.rank))

    def matches(self, path: str, layer_type: str, kernel_size: tuple[int, int]) -> bool:
        return (
            (self.layer_type == "any" or self.layer_type == layer_type)
            and (self.path is None or re.search(self.path, path) is not None)
            and (self.kernel_size is None or self.kernel_size == tuple(kernel_size))
        )


@dataclasses.dataclass(frozen=True)
class Policy:
    """Ordered rules; the first match wins, unmatched layers are kept.

    Attributes:
      rules: the rules, in order.
      on_infeasible: what to do with a layer whose family cannot meet a ``macs`` budget (e.g.
        ``lowrank_in`` on a 1-channel input): ``"error"`` (default) or ``"keep"`` it unchanged
        (reported).
      target_macs: a whole-model budget (set by :meth:`budget`): the converted layers may cost
        at most this many MACs per image; ``convert`` checks the built model against it.
      convertible_macs: the original MACs of the layers the budget covers.
    """

    rules: tuple[Rule, ...]
    on_infeasible: str = "error"
    target_macs: int | None = None
    convertible_macs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.on_infeasible not in ("error", "keep"):
            raise ValueError(f"on_infeasible must be 'error' or 'keep', got {self.on_infeasible!r}")
        if (self.target_macs is None) != (self.convertible_macs is None):
            raise ValueError("target_macs and convertible_macs go together, got "
                             f"{self.target_macs!r} and {self.convertible_macs!r}")

    def rule_for(self, path: str, layer_type: str, kernel_size: tuple[int, int]) -> Rule | None:
        for rule in self.rules:
            if rule.matches(path, layer_type, kernel_size):
                return rule
        return None

    # --- the common policies in one call ---------------------------------------------------

    @classmethod
    def uniform(
        cls,
        family: str,
        rank: RankArg = "full",
        *,
        macs: float | None = None,
        skip: str | None = None,
        kernel_size: tuple[int, int] | None = None,
        options: dict[str, Any] | None = None,
        on_infeasible: str = "error",
    ) -> Policy:
        """Every conv (optionally of one ``kernel_size``) to ``family`` at ``rank`` or a
        ``macs`` fraction, except layers whose path matches ``skip``.

        ``Policy.uniform("dsc", 1, skip="^conv1$")``: MobileNet everywhere but the first conv.
        ``Policy.uniform("cp4", 0.25, kernel_size=(3, 3))``: every 3×3 conv at 1/4 of the params.
        ``Policy.uniform("tucker2", "evbmf")``: Tucker-2 with EVBMF-selected ranks.
        ``Policy.uniform("dsc", macs=0.3)``: each layer within 30% of its MACs.
        """
        rules = []
        if skip is not None:
            rules.append(Rule(None, path=skip, layer_type="any"))
        rules.append(
            Rule(family, rank, macs=macs, kernel_size=kernel_size, options=dict(options or {}))
        )
        return cls(tuple(rules), on_infeasible=on_infeasible)

    @classmethod
    def budget(
        cls,
        families: str | Sequence[str],
        macs: float = 0.25,
        allocation: str = "knapsack",
        *,
        model: Any,
        sample_input: Any,
        return_allocation: bool = False,
        **kwargs: Any,
    ) -> Policy | tuple[Policy, Any]:
        """A whole-model MAC budget: each convertible conv's family (among ``families``) and
        rank chosen so that their MACs total at most ``macs`` × their original MACs.

        ``allocation`` is ``"uniform"``, ``"greedy"`` (AIMET) or ``"knapsack"`` (exact DP);
        ``kwargs`` go to :func:`factorize.conversion.allocation.allocate` (``scorer``, ``skip``,
        ``cache``, ``rounds``, ...). The policy has one rule per layer and its ``target_macs``;
        with ``return_allocation`` the :class:`~factorize.conversion.allocation.Allocation`
        (curves, choices and why) comes too.

        Example::

            from factorize.conversion import Policy, convert
            from factorize.models import CNN

            model, x = CNN(10, 1, rngs=nnx.Rngs(0)), jnp.zeros((1, 8, 8, 1))
            policy = Policy.budget(["dsc", "cp3"], macs=0.25, model=model, sample_input=x,
                                   skip="^conv1$")
            small, report = convert(model, policy, x)  # checks the budget with count_macs
            print(report.to_markdown())
        """
        from factorize.conversion.allocation import allocate

        a = allocate(model, sample_input, families, macs, allocation, **kwargs)
        return (a.policy, a) if return_allocation else a.policy

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Policy:
        if not isinstance(d, dict) or not isinstance(d.get("rules"), list):
            raise ValueError(
                f"a policy must be an object with a 'rules' list, got {type(d).__name__}"
                + (f" with keys {sorted(d)}" if isinstance(d, dict) else "")
            )
        known = {f.name for f in dataclasses.fields(Rule)}
        rules = []
        for i, r in enumerate(d["rules"]):
            if not isinstance(r, dict):
                raise ValueError(f"rules[{i}] must be an object, got {r!r}")
            unknown = set(r) - known
            if unknown:
                raise ValueError(
                    f"rules[{i}] has unknown keys {sorted(unknown)}; known: {sorted(known)}"
                )
            if "family" not in r:
                raise ValueError(f"rules[{i}] needs a 'family' ({FAMILIES} or null), got {r}")
            rules.append(Rule(**r))
        return cls(tuple(rules), on_infeasible=d.get("on_infeasible", "error"),
                   target_macs=d.get("target_macs"), convertible_macs=d.get("convertible_macs"))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Policy:
        """A policy from a JSON rules file (see the module docstring)."""
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError:
            raise FileNotFoundError(f"rules file {os.fspath(path)!r} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"rules file {os.fspath(path)!r} is not valid JSON: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": [
                {k: (list(v) if isinstance(v, tuple) else v)
                 for k, v in dataclasses.asdict(r).items()}
                for r in self.rules
            ],
            "on_infeasible": self.on_infeasible,
            **({"target_macs": self.target_macs, "convertible_macs": self.convertible_macs}
               if self.target_macs is not None else {}),
        }
