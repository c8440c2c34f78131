"""Tiny local models and data for the compression tests: a tiny timm ViT and an image folder (the tiny Llama and
its corpus are shared fixtures of tests/conftest.py); ``llm_args``/``vit_args`` compose a recipe on them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blocktrain.trainer.testing import tiny_timm_vit, write_image_folder
from tests.helpers import llm_args  # noqa: F401  (imported by the tests from here)

# iCBS at toy scale: small blocks, few chains, a fast temperature schedule, 8 steps per epoch
ICBS_FAST = ["plugin.icbs.block_size=64", "plugin.icbs.k=32", "plugin.icbs.restarts=2", "plugin.icbs.beta_factor=1.6",
             "plugin.icbs.steps_per_epoch=8", "plugin.icbs.min_steps=0", "plugin.icbs.pruning.samples=16",
             "plugin.icbs.pruning.batch_size=4", "plugin.icbs.calibration.samples=16"]


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory) -> Path:
    """A tiny timm ViT (32x32 inputs, depth 2, 2 classes) as a safetensors weights file."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny_vit") / "vit.safetensors"
    save_file(tiny_timm_vit(num_classes=2).state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), classes=("cat", "dog"), per_class=12, size=(32, 32))


def vit_args(recipe: str, checkpoint: Path, images: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides running a ViT pruning recipe on the tiny ViT and image folder."""
    return [f"recipe={recipe}", "model.name=vit_tiny_patch16_224", "model.pretrained=false",
            f"model.checkpoint={checkpoint}", "model.num_classes=2", "+model.kwargs.img_size=32", "+model.kwargs.depth=2",
            f"data.path={images}", "data.image_size=32", "data.val_fraction=0.25", "data.batch_size=6",
            f"run_dir={run_dir}", "trainer=cpu", "logger=none", "trainer.enable_progress_bar=false", *extra]


def original_linear_weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in names}
