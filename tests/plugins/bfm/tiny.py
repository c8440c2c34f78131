"""Tiny Fashion-MNIST-like idx files and the overrides that shrink the generative recipes to a few seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from blocktrain.trainer.generative.data import write_idx


def write_tiny_idx(root: Path, n_train: int = 48, n_val: int = 16, seed: int = 0) -> Path:
    """28x28 uint8 images whose bright bar position encodes the class (10 classes), in the Debian file names."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_val)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c:5 + 2 * c, 4:24] = 220
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def tiny_args(plugin: str, root: Path, cache: Path) -> list[str]:
    """Overrides of fm_fashion / bfm_fashion for a seconds-long run on the tiny files."""
    p = f"plugin.{plugin}"
    args = [f"data.root={root}", "data.batch_size=8", "model.hidden=32", "model.heads=2", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "scheduler.warmup_steps=0", "checkpoint.every_n_steps=1",
            f"{p}.sampler.num_samples=4", f"{p}.sampler.batch_size=4",
            f"{p}.sampler.steps=4", f"{p}.eval.num_samples=8", f"{p}.eval.num_real=8", f"{p}.eval.steps=[4]",
            f"{p}.eval.features.input_size=32", f"{p}.eval.kid_subset_size=4", f"{p}.eval.cache_dir={cache}"]
    if plugin == "bfm":
        args += ["model.trunk_depth=3", "model.segment_depth=1", "model.frn_depth=1", "model.proj_hidden=32",
                 "stages=[fit,{fit:{name:frn,max_steps:2}},sample,{sample:{name:sample_frn,frn:true}},evaluate]"]
    else:
        args += ["model.depth=2"]
    return args
