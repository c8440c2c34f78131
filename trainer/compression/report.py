"""The per-layer sparsity report: counted from the weights (real zeros), written as a table and a bar chart,
logged as scalars and as media (a table and an image: files under media/ and, with W&B, W&B media)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from blocktrain.trainer.io import atomic_path, write_json
from blocktrain.trainer.media import Table

__all__ = ["layer_densities", "density_chart", "curve_chart", "report_sparsity"]


@torch.no_grad()
def layer_densities(model: torch.nn.Module, names: list[str]) -> list[dict]:
    """One row per layer: name, shape, numel, nonzero (weights that are not exactly 0) and density."""
    rows = []
    for name in names:
        weight = model.get_submodule(name).weight
        nonzero = int(weight.count_nonzero())
        rows.append({"layer": name, "shape": list(weight.shape), "numel": weight.numel(), "nonzero": nonzero,
                     "density": nonzero / weight.numel()})
    return rows


def density_chart(rows: list[dict], target: float | None = None, height: int = 240):
    """A PIL bar chart of the per-layer densities (layer index on x, density 0..1 on y; target as a line)."""
    from PIL import Image, ImageDraw

    bar, left, top, bottom = max(2, min(12, 1200 // max(len(rows), 1))), 40, 24, 20
    width = max(360, left + bar * len(rows) + 10)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot = height - top - bottom
    for value in (0.0, 0.5, 1.0):
        y = top + plot * (1 - value)
        draw.line([(left, y), (width - 5, y)], fill=(220, 220, 220))
        draw.text((4, y - 6), f"{value:.1f}", fill="black")
    for i, row in enumerate(rows):
        x = left + i * bar
        draw.rectangle([x, top + plot * (1 - row["density"]), x + bar - 2, top + plot], fill=(60, 110, 180))
    if target is not None:
        y = top + plot * (1 - target)
        draw.line([(left, y), (width - 5, y)], fill=(200, 40, 40))
    draw.text((left, 4), f"density per layer ({len(rows)} layers, in model order)", fill="black")
    draw.text((left, height - bottom + 4), "layer", fill="black")
    return image


COLOURS = [(60, 110, 180), (220, 120, 30), (40, 150, 70), (150, 60, 160)]


def curve_chart(title: str, x: list[float], series: dict[str, list[float]], mark: float | None = None,
                size: tuple[int, int] = (360, 220)):
    """A PIL line chart of ``series`` over ``x``, each scaled to its own range (given in the legend), with a
    vertical line at ``mark`` (an operating point)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 8, 8, 20, 16 + 12 * len(series)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    box = (left, top, width - right, height - bottom)
    draw.rectangle(box, outline=(160, 160, 160))
    x0, x1 = min(x), max(x)

    def px(v: float) -> float:
        return box[0] + (box[2] - box[0]) * (v - x0) / ((x1 - x0) or 1)

    for i, (label, ys) in enumerate(series.items()):
        lo, hi = min(ys), max(ys)
        points = [(px(a), box[3] - (box[3] - box[1]) * ((y - lo) / (hi - lo) if hi > lo else 0.5)) for a, y in zip(x, ys)]
        colour = COLOURS[i % len(COLOURS)]
        draw.line(points, fill=colour, width=2)
        draw.text((left, box[3] + 4 + 12 * i), f"{label}: {lo:.3g} .. {hi:.3g}", fill=colour)
    if mark is not None:
        draw.line([(px(mark), box[1]), (px(mark), box[3])], fill=(200, 40, 40), width=1)
    draw.text((left, 4), title, fill="black")
    draw.text((box[2] - 40, box[3] + 4), f"{x0:g}..{x1:g}", fill=(120, 120, 120))
    return image


def _markdown(rows: list[dict], overall: float) -> str:
    lines = ["| layer | shape | nonzero / numel | density |", "|---|---|---:|---:|"]
    lines += [f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['nonzero']} / {r['numel']} | {r['density']:.4f} |"
              for r in rows]
    total = sum(r["numel"] for r in rows)
    lines.append(f"| **all {len(rows)} layers** | | {sum(r['nonzero'] for r in rows)} / {total} | {overall:.4f} |")
    return "\n".join(lines) + "\n"


def report_sparsity(model: torch.nn.Module, names: list[str], run, target: float | None = None) -> dict[str, float]:
    """Write ``sparsity_report.{md,json,png}`` in the run dir, log the table and chart to W&B, and return the
    metrics: ``sparsity/density`` (all target layers), min/max over layers and ``sparsity/density/<layer>``."""
    rows = layer_densities(model, names)
    total = sum(r["numel"] for r in rows)
    overall = sum(r["nonzero"] for r in rows) / total
    out = Path(run.run_dir)
    with atomic_path(out / "sparsity_report.md") as tmp:
        tmp.write_text(_markdown(rows, overall))
    write_json(out / "sparsity_report.json", {"density": overall, "target_density": target, "layers": rows})
    chart = density_chart(rows, target)
    with atomic_path(out / "sparsity_report.png") as tmp:
        chart.save(tmp, format="PNG")
    table = Table(["layer", "shape", "numel", "nonzero", "density"],
                  [[r["layer"], json.dumps(r["shape"]), r["numel"], r["nonzero"], r["density"]] for r in rows])
    run.log_media({"sparsity/layers": table, "sparsity/density_chart": chart})
    densities = [r["density"] for r in rows]
    print(f"sparsity: {len(rows)} layers, density {overall:.4f} (per layer {min(densities):.4f} .. "
          f"{max(densities):.4f}); table: {out / 'sparsity_report.md'}", file=sys.stderr)
    return {"sparsity/density": overall, "sparsity/min_layer_density": min(densities),
            "sparsity/max_layer_density": max(densities),
            **{f"sparsity/density/{r['layer']}": r["density"] for r in rows}}
