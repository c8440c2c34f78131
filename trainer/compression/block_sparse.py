"""Block-sparse models: Linear layers whose weight is stored as R×C blocks (BSR) and run ``block_sparse_linear``.

``to_block_sparse(model, block)`` swaps every Linear whose weight has whole zero blocks (a block-pruned model) for a
``BlockSparseLinear`` holding only the stored blocks; ``save_block_sparse``/``load_block_sparse`` write and read it
as safetensors plus a manifest, onto a freshly built model of the same architecture.

For training with fixed block masks, ``run_block_sparse(model, block)`` makes every masked Linear (``weight_mask``
buffer, ``fixed_masks``) that the block tiles a ``BlockMaskedLinear``: same parameters, buffers and state dict, but
its forward and backward run ``block_sparse_linear`` over the blocks its mask keeps; ``run_dense`` undoes it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from blocktrain.kernels.block_sparse_linear import block_sparse_linear, from_bsr, to_bsr
from blocktrain.trainer.compression.fixed_masks import MASK, masked_layers

__all__ = ["BlockSparseLinear", "BlockMaskedLinear", "to_block_sparse", "save_block_sparse", "load_block_sparse",
           "run_block_sparse", "run_dense"]

MANIFEST = "block_sparse.json"


class BlockSparseLinear(nn.Module):
    """y = x·Wᵀ + b with W's stored R×C blocks as the parameter ``values`` and its layout as buffers."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], nnzb: int, bias: bool,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.values = nn.Parameter(torch.zeros(nnzb, *block, dtype=dtype, device=device))
        self.register_buffer("crow", torch.zeros(out_features // block[0] + 1, dtype=torch.int64, device=device))
        self.register_buffer("col", torch.zeros(nnzb, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: tuple[int, int]) -> "BlockSparseLinear":
        values, crow, col = to_bsr(linear.weight.detach(), block)
        layer = cls(linear.in_features, linear.out_features, block, values.shape[0], linear.bias is not None,
                    values.dtype, values.device)
        with torch.no_grad():
            layer.values.copy_(values)
            layer.crow.copy_(crow)
            layer.col.copy_(col)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        return from_bsr(self.values, self.crow, self.col, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.values, self.crow, self.col, self.bias, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"blocks={self.values.shape[0]}")


class BlockMaskedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is zero outside fixed R×C blocks, run by ``block_sparse_linear`` on those blocks
    (gathered from the weight each call, so the weight's gradient is theirs scattered into zeros). Made from a
    Linear in place by :func:`run_block_sparse` (a class swap, as ``torch.nn.utils.parametrize`` does), so
    parameters, optimiser state, hooks and the state dict are the Linear's; the layout buffers are not persistent."""

    block: tuple[int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, c = self.block
        tiles = self.weight.view(self.out_features // r, r, self.in_features // c, c).transpose(1, 2)
        return block_sparse_linear(x, tiles[self.bsr_rows, self.bsr_col], self.bsr_crow, self.bsr_col, self.bias,
                                   self.out_features)


_LAYOUT = ("bsr_crow", "bsr_col", "bsr_rows")


def run_block_sparse(model: nn.Module, block: tuple[int, int]) -> list[str]:
    """Make every Linear with a ``weight_mask`` that ``block`` tiles a :class:`BlockMaskedLinear` over the blocks its
    mask keeps any of (in place); returns their names. Layers whose mask keeps every block stay as they are."""
    r, c = block
    done = []
    for name, module in masked_layers(model).items():
        if type(module) is not nn.Linear or module.out_features % r or module.in_features % c:
            continue
        _, crow, col = to_bsr(getattr(module, MASK).float(), block)
        if col.numel() == module.weight.numel() // (r * c):
            continue
        module.__class__ = BlockMaskedLinear
        module.block = (r, c)
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
        for key, value in zip(_LAYOUT, (crow, col, rows)):
            module.register_buffer(key, value, persistent=False)
        done.append(name)
    return done


def run_dense(model: nn.Module) -> None:
    """Turn every :class:`BlockMaskedLinear` back into a plain ``nn.Linear`` (in place)."""
    for module in model.modules():
        if isinstance(module, BlockMaskedLinear):
            for key in _LAYOUT:
                delattr(module, key)
            del module.block
            module.__class__ = nn.Linear


def to_block_sparse(model: nn.Module, block: tuple[int, int], names: list[str] | None = None) -> dict[str, dict]:
    """Swap the Linears ``names`` (default: every Linear that ``block`` tiles, with at least one all-zero block and a
    weight no other module shares) for ``BlockSparseLinear`` in place; returns the manifest {name: layout}."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and counts[id(m.weight)] == 1
                 and m.out_features % block[0] == 0 and m.in_features % block[1] == 0
                 and to_bsr(m.weight.detach(), block)[0].shape[0] < m.weight.numel() // (block[0] * block[1])]
    manifest = {}
    for name in names:
        layer = BlockSparseLinear.from_linear(model.get_submodule(name), block)
        _replace(model, name, layer)
        manifest[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                          "block": list(block), "blocks": layer.values.shape[0], "bias": layer.bias is not None}
    return manifest


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def save_block_sparse(model: nn.Module, manifest: dict[str, dict], out_dir: Path) -> Path:
    """``model.safetensors`` (the whole state, block-sparse layers as values/crow/col) and the manifest."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out_dir / "model.safetensors"))
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out_dir


def load_block_sparse(model: nn.Module, path: Path) -> nn.Module:
    """Rebuild the block-sparse layers of the manifest in ``model`` (same architecture, e.g. freshly built) and load
    the saved state into it."""
    from safetensors.torch import load_model

    path = Path(path)
    for name, spec in json.loads((path / MANIFEST).read_text()).items():
        old = model.get_submodule(name)
        _replace(model, name, BlockSparseLinear(spec["in_features"], spec["out_features"], tuple(spec["block"]),
                                                spec["blocks"], spec["bias"], old.weight.dtype, old.weight.device))
    load_model(model, str(path / "model.safetensors"))
    return model
