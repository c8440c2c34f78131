"""LPViT's figures as PIL images: the kept blocks of the pruned layers, and the allocation curves (distortion, power
term, their sum) of a few layers with each layer's chosen amount."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blocktrain.trainer.compression.report import curve_chart

__all__ = ["spread", "mask_picture", "curves_picture"]


def spread(names: list[str], count: int) -> list[str]:
    """Up to ``count`` of ``names`` evenly spread from the first to the last, in order."""
    count = min(count, len(names))
    return list(dict.fromkeys(names[round(i * (len(names) - 1) / max(count - 1, 1))] for i in range(count)))


def _grid(tiles: list, columns: int, background=(150, 150, 150)):
    """Paste equally sized cells (PIL images) in rows of ``columns``."""
    from PIL import Image

    width, height = tiles[0].size
    rows = -(-len(tiles) // columns)
    canvas = Image.new("RGB", (width * min(columns, len(tiles)), height * rows), background)
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % columns) * width, (i // columns) * height))
    return canvas


@torch.no_grad()
def mask_picture(model: torch.nn.Module, names: list[str], block: tuple[int, int], layers: int = 48,
                 box: int = 96, columns: int = 6):
    """The kept blocks (white; pruned black) of up to ``layers`` layers spread over the model, one cell per layer
    (rows = output features, scaled to fit ``box`` pixels) labelled with its name and density."""
    from PIL import Image, ImageDraw

    cells = []
    for name in spread(names, layers):
        weight = model.get_submodule(name).weight
        kept = (weight.reshape(weight.shape[0], -1) != 0).float()
        grid = F.max_pool2d(kept[None, None], block, stride=block, ceil_mode=True)[0, 0]
        tile = Image.fromarray((grid.cpu().numpy() * 255).astype("uint8"))
        scale = box / max(tile.size)
        tile = tile.resize((max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.NEAREST)
        cell = Image.new("RGB", (box + 44, box + 30), (150, 150, 150))
        cell.paste(tile.convert("RGB"), (4, 4))
        draw = ImageDraw.Draw(cell)
        draw.text((4, box + 5), name[-24:], fill="black")
        draw.text((4, box + 16), f"density {float(kept.mean()):.2f}", fill="black")
        cells.append(cell)
    return _grid(cells, columns)


def curves_picture(curves: dict[str, dict[str, torch.Tensor]], amounts: dict[str, float], beta: float,
                   sign: float = 1.0):
    """One chart per layer in ``curves`` ({name: {"distortion", "power", "total"}}) over the pruned fraction a:
    δ(a), ±β·P(a) (when β ≠ 0) and the cost C(a) they sum to, with a line at the layer's allocated amount."""
    charts = []
    for name, c in curves.items():
        total = c["total"].tolist()
        x = [i / (len(total) - 1) for i in range(len(total))]
        series = {"distortion": c["distortion"].tolist()}
        if beta:
            series[f"{'+' if sign > 0 else '-'}beta*power"] = (sign * beta * c["power"]).tolist()
        series["cost"] = total
        charts.append(curve_chart(f"{name}: a = {amounts[name]:.2f} pruned", x, series, mark=amounts[name]))
    return _grid(charts, 2, background=(255, 255, 255))
