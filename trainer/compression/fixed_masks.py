"""Fixed pruning masks for fine-tuning a pruned model: the mask is a persistent bool buffer ``weight_mask`` on the
layer (so checkpoints carry it), the masked weights are zero, and neither gradients nor optimiser state can revive
them:

- a gradient hook on the weight zeroes the masked entries of every gradient (the gradient of W ⊙ M);
- ``mask_optimizer`` adds a step post-hook that re-zeroes the masked weights and the masked entries of the
  optimiser's per-weight state (Adam moments, momentum buffers) after every step.

``detach_masks`` removes the buffers (``attach_masks`` puts them back), e.g. for an export: the saved model is then
a plain dense model with zeros (``save_pretrained`` / safetensors) that loads without the masks.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MASK", "find_weight_layers", "attach_masks", "masked_layers", "apply_fixed_masks", "mask_optimizer",
           "detach_masks"]

MASK = "weight_mask"


def find_weight_layers(model: nn.Module, types: tuple[type, ...] = (nn.Linear, nn.Conv2d),
                       exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of every module of ``types`` in registration order, except those whose last name part is in ``exclude``."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, types) and name.rsplit(".", 1)[-1] not in exclude]


def _mask_grad(module: nn.Module):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        mask = getattr(module, MASK, None)
        return grad if mask is None else grad.masked_fill(~mask, 0)

    return hook


@torch.no_grad()
def attach_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Register each bool keep-mask as the layer's ``weight_mask`` buffer, zero the masked weights and mask every
    later gradient of the weight. Attaching again replaces the masks (the hook is registered once)."""
    for name, keep in masks.items():
        module = model.get_submodule(name)
        keep = keep.to(device=module.weight.device, dtype=torch.bool)
        if keep.shape != module.weight.shape:
            raise ValueError(f"mask of {name} is {tuple(keep.shape)}, its weight {tuple(module.weight.shape)}")
        module.register_buffer(MASK, keep, persistent=True)
        module.weight.masked_fill_(~keep, 0)
        if not getattr(module.weight, "_fixed_mask_hooked", False):
            module.weight.register_hook(_mask_grad(module))
            module.weight._fixed_mask_hooked = True


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers that carry a ``weight_mask`` buffer, by name."""
    return {name: mod for name, mod in model.named_modules() if isinstance(getattr(mod, MASK, None), torch.Tensor)}


@torch.no_grad()
def apply_fixed_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero the masked weights, and the masked entries of their optimiser state tensors shaped like the weight."""
    for module in masked_layers(model).values():
        keep = getattr(module, MASK)
        module.weight.masked_fill_(~keep, 0)
        state = optimizer.state.get(module.weight, {}) if optimizer is not None else {}
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == keep.shape:
                value.masked_fill_(~keep, 0)


def mask_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Re-apply the fixed masks to the weights and the optimiser state after every ``optimizer.step()`` (and once
    now); returns the hook's handle."""
    apply_fixed_masks(model, optimizer)
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: apply_fixed_masks(model, opt))


def detach_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove the ``weight_mask`` buffers and return them by layer name (the weights keep their zeros; the gradient
    hooks stay and mask nothing until ``attach_masks`` puts the buffers back)."""
    return {name: mod._buffers.pop(MASK) for name, mod in masked_layers(model).items()}
