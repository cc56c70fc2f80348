"""The few lines ``factorize convert`` and ``factorize inspect`` print, and their ``--json``.

Each function returns ``(result, text)``: the JSON object for scripts and the human summary.
The full per-layer tables stay in ``report.md`` (convert) and ``inspect --per-layer``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from factorize.conversion.report import ConversionReport


def convert_summary(
    report: ConversionReport, out: Path, *, source: Path, extra: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """What a conversion did: layers converted (per family), whole-model MACs and params
    before → after, the kernel error, accuracy before/after fine-tuning if it ran."""
    extra = extra or {}
    done = report.converted
    families = dict(Counter(r.family for r in done))
    errors = [r.rel_error for r in done]
    result: dict[str, Any] = {
        "out": str(out), "checkpoint": str(out / "checkpoint"), "source": str(source),
        "report": str(out / "report.json"),
        "layers": len(report.rows), "layers_converted": len(done), "families": families,
        "macs_before": report.model_macs_before, "macs_after": report.model_macs_after,
        "mac_ratio": report.mac_ratio, "conv_mac_ratio": report.conv_mac_ratio,
        "params_before": report.model_params_before, "params_after": report.model_params_after,
        "rel_error_mean": sum(errors) / len(errors) if errors else 0.0,
        "rel_error_max": max(errors, default=0.0),
        **extra,
    }
    fams = ", ".join(f"{f} ×{n}" for f, n in families.items())
    lines = [
        f"converted {len(done)} of {len(report.rows)} layers ({fams}); relative kernel error "
        f"mean {result['rel_error_mean']:.3f}, max {result['rel_error_max']:.3f}",
        f"MACs per image {report.model_macs_before:,} → {report.model_macs_after:,} "
        f"({report.mac_ratio:.3f} of the model, convs {report.conv_mac_ratio:.3f}); params "
        f"{report.model_params_before:,} → {report.model_params_after:,}",
    ]
    outputs = [r.output_error for r in done if r.output_error is not None]
    if outputs:  # data-aware conversion
        result["output_error_mean"] = sum(outputs) / len(outputs)
        result["output_error_max"] = max(outputs)
        lines.insert(1, f"relative output error on the calibration data mean "
                        f"{result['output_error_mean']:.3f}, max {result['output_error_max']:.3f}")
    if "accuracy_after" in extra:
        lines.append(f"test accuracy {extra['accuracy_before']:.4f} converted → "
                     f"{extra['accuracy_after']:.4f} fine-tuned")
    lines.append(f"wrote {out}: checkpoint/, report.md (per layer), report.json, report.csv")
    return result, "\n".join(lines)


def inspect_summary(
    rows: list[dict[str, Any]],
    families: list[str],
    fractions: list[float],
    *,
    model,
    name: str,
    source: Path,
    image_shape,
    per_layer: bool = False,
) -> tuple[dict[str, Any], str]:
    """The model's MACs and params, and per family and MAC fraction the MAC-weighted mean
    relative kernel error over the convs the family can bring that low (and how many those
    are); with ``per_layer`` each layer's errors too (the JSON always has them)."""
    import jax.numpy as jnp

    from factorize.costs import count_macs
    from factorize.models import count_params

    macs = int(count_macs(model, jnp.zeros((1, *image_shape))))
    params = count_params(model)
    convs = [r for r in rows if r["errors"]]
    h, w, c = image_shape
    lines = [f"{name} from {source}: {macs:,} MACs per {h}×{w}×{c} image, {params:,} params; "
             f"{len(rows)} layers, {len(convs)} convs a family can replace",
             "MAC-weighted mean relative kernel error ‖W − Ŵ‖/‖W‖ of those convs at each MAC "
             "fraction (k/n: only k of the n can get that low; –: none):",
             f"| family | {' | '.join(f'@{f:g}' for f in fractions)} |",
             "|---|" + "---:|" * len(fractions)]
    summary: dict[str, dict[str, Any]] = {}
    for fam in families:
        cells = []
        for frac in fractions:
            key = f"{fam}@{frac:g}"
            have = [(r["macs"], r["errors"][key]) for r in convs
                    if r["errors"].get(key) is not None]
            total = sum(m for m, _ in have)
            mean = sum(m * e for m, e in have) / total if total else None
            summary.setdefault(fam, {})[f"{frac:g}"] = {"error": mean, "layers": len(have)}
            cell = "–" if mean is None else f"{mean:.3f}"
            partial = 0 < len(have) < len(convs)
            cells.append(f"{cell} ({len(have)}/{len(convs)})" if partial else cell)
        lines.append(f"| {fam} | {' | '.join(cells)} |")
    if per_layer:
        cols = [f"{fam}@{frac:g}" for fam in families for frac in fractions]
        lines += ["", "| layer | kernel | input | MACs | params | " + " | ".join(cols) + " |",
                  "|---|---|---|---:|---:|" + "---:|" * len(cols)]
        for r in rows:
            errs = [r["errors"].get(col) for col in cols]
            cells_ = " | ".join("–" if e is None else f"{e:.3f}" for e in errs)
            lines.append(f"| `{r['path']}` | {'×'.join(map(str, r['kernel_shape']))} "
                         f"| {r['input_hw'][0]}×{r['input_hw'][1]} | {r['macs']:,} "
                         f"| {r['params']:,} | {cells_} |")
    result = {"checkpoint": str(source), "model": name, "image_shape": list(image_shape),
              "macs": macs, "params": params, "families": families, "fractions": fractions,
              "summary": summary, "layers": rows}
    return result, "\n".join(lines)
