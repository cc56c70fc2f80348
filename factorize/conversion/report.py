"""The conversion report: one row per layer, totals, and its markdown / CSV / JSON forms."""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path
from typing import Any

from factorize._io import atomic_write_json, atomic_write_text


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """What happened to one layer. MACs are per image at the layer's real input size."""

    path: str
    layer_type: str  # "conv" | "linear"
    family: str | None  # None: kept unchanged
    rank: Any
    kernel_shape: tuple[int, int, int, int]
    input_hw: tuple[int, int]
    strides: tuple[int, int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    rel_error: float
    note: str = ""
    # relative output error E‖Wᵀx − Ŵᵀx̂‖² / E‖Wᵀx‖² on the calibration statistics (data-aware
    # conversion only)
    output_error: float | None = None


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Rows per layer, plus whole-model totals measured with ``count_macs`` on one image.

    ``model_macs_*`` include everything the model computes (heads, kept layers); the per-row MACs
    of the converted layers account for the whole difference between them.
    """

    rows: tuple[LayerRow, ...]
    model_macs_before: int
    model_macs_after: int
    model_params_before: int
    model_params_after: int

    @property
    def converted(self) -> tuple[LayerRow, ...]:
        return tuple(r for r in self.rows if r.family is not None)

    @property
    def mac_ratio(self) -> float:
        """Whole-model MACs after / before."""
        return self.model_macs_after / self.model_macs_before

    @property
    def conv_mac_ratio(self) -> float:
        """MACs after / before over all conv layers (what a MAC budget constrains)."""
        convs = [r for r in self.rows if r.layer_type == "conv"]
        before = sum(r.macs_before for r in convs)
        return sum(r.macs_after for r in convs) / before if before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [_row_dict(r) for r in self.rows],
            "totals": {
                "model_macs_before": self.model_macs_before,
                "model_macs_after": self.model_macs_after,
                "model_params_before": self.model_params_before,
                "model_params_after": self.model_params_after,
                "mac_ratio": self.mac_ratio,
                "conv_mac_ratio": self.conv_mac_ratio,
            },
        }

    def to_csv(self) -> str:
        out = io.StringIO()
        fields = [f.name for f in dataclasses.fields(LayerRow)]
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            row = {k: _cell(v) for k, v in _row_dict(r).items()}
            writer.writerow({**row, "rank": _rank_str(r.rank)})
        return out.getvalue()

    def to_markdown(self) -> str:
        data_aware = any(r.output_error is not None for r in self.rows)
        head = (
            "| layer | family | rank | kernel | input | params | MACs before | MACs after "
            "| ratio | rel. error |" + (" output error |" if data_aware else "")
            + "\n|---|---|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if data_aware else "")
            + "\n"
        )
        lines = []
        for r in self.rows:
            ratio = r.macs_after / r.macs_before if r.macs_before else 1.0
            kernel = "×".join(map(str, r.kernel_shape))
            out = ""
            if data_aware:
                out = " – |" if r.output_error is None else f" {r.output_error:.4f} |"
            lines.append(
                f"| `{r.path}` | {r.family or 'kept'} | {_rank_str(r.rank)} | {kernel} "
                f"| {r.input_hw[0]}×{r.input_hw[1]} | {r.params_before:,} → {r.params_after:,} "
                f"| {r.macs_before:,} | {r.macs_after:,} | {ratio:.3f} | {r.rel_error:.4f} |"
                + out + (f" {r.note}" if r.note else "")
            )
        total = (
            f"\nWhole model (count_macs, one image): {self.model_macs_before:,} → "
            f"{self.model_macs_after:,} MACs ({self.mac_ratio:.3f}); params "
            f"{self.model_params_before:,} → {self.model_params_after:,}; conv layers: "
            f"{self.conv_mac_ratio:.3f} of their MACs.\n"
        )
        return head + "\n".join(lines) + "\n" + total

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes ``report.json``, ``report.md`` and ``report.csv`` into ``directory``."""
        d = Path(directory)
        atomic_write_json(d / "report.json", self.to_dict())
        atomic_write_text(d / "report.md", self.to_markdown())
        atomic_write_text(d / "report.csv", self.to_csv())
        return d


def _row_dict(r: LayerRow) -> dict[str, Any]:
    d = dataclasses.asdict(r)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _cell(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "×".join(map(str, v)) if all(isinstance(x, int) for x in v) else str(v)
    return "" if v is None else str(v)


def _rank_str(rank: Any) -> str:
    if rank is None:
        return ""
    return str(tuple(rank)) if isinstance(rank, (tuple, list)) else str(rank)
