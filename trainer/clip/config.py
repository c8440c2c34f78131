"""The CLIP few-shot kinds (CoOp / CLIP-LoRA protocol), registered like a plugin's: data kind ``few_shot``,
task kind ``clip_few_shot`` and model kind ``tiny_clip`` (the offline demo's model). Torch-free, so configs
validate before anything heavy loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from blocktrain.trainer.registry import register_data_kind, register_model_source, register_task
from blocktrain.trainer.sources.config import (PATH, POSITIVE, DataConfig, TransformersModelConfig, choices)


@dataclass
class FewShotDataConfig(DataConfig):
    """K images per class for CLIP few-shot learning (CoOp / CLIP-LoRA protocol); see clip/few_shot.py."""

    kind: str = "few_shot"
    dataset: str = MISSING  # imagenet, caltech101, oxford_pets, stanford_cars, flowers102, food101, fgvc_aircraft,
    #                         sun397, dtd, eurosat, ucf101, fashion_mnist, or any name of an image folder under root
    source: Optional[str] = field(default=None, metadata=choices(None, "torchvision", "image_folder", "idx"))
    root: str = "~/.cache/blocktrain/data"  # torchvision download dir; folder datasets live in root/<folder>
    path: Optional[str] = field(default=None, metadata=PATH)  # this dataset's own directory; null = under root
    # CoOp's split_zhou_<Dataset>.json: its train/val/test lists (paths under path)
    split_file: Optional[str] = field(default=None, metadata=PATH)
    download: bool = True  # torchvision sources download where the network allows
    train_split: Optional[str] = None  # split(s) the shots are drawn from, "a+b" pools; null = the dataset's
    test_split: Optional[str] = None  # evaluated split; null = the dataset's
    test_fraction: float = field(default=0.3, metadata={"check": (lambda v: 0 < v < 1, "a number in (0, 1)")})
    shots: int = field(default=16, metadata=POSITIVE)
    sampling_seed: Optional[int] = None  # null = the run's seed
    max_test: Optional[int] = field(default=None, metadata=POSITIVE)  # cap on test images (fixed subset)
    image_size: int = field(default=224, metadata=POSITIVE)
    class_names: Optional[List[str]] = None  # override, in label order
    # one name per line, or "folder_name class name" lines
    class_names_file: Optional[str] = field(default=None, metadata=PATH)
    imagenet_names: str = field(default="clip", metadata=choices("clip", "torchvision"))  # CLIP's curated list
    templates: Optional[List[str]] = None  # prompts; null = the dataset's CoOp template (the task trains with the first)
    steps_per_shot: int = field(default=500, metadata=POSITIVE)  # info.train_steps = steps_per_shot * shots


@dataclass
class ClipFewShotTaskConfig:
    """CLIP few-shot classification (CLIP-LoRA): CE on logit_scale·cos(image, text) over all class prompts."""

    kind: str = "clip_few_shot"
    logit_scale: float = 100.0  # fixed, as CLIP-LoRA; the model's learned logit_scale is not used
    train_template: Optional[str] = None  # null = the data's first template (CLIP-LoRA); e.g. "a photo of a {}."
    text_chunk_size: Optional[int] = None  # prompts per text-tower call; null = all at once
    text_checkpointing: bool = False  # recompute the text tower in backward, chunk by chunk (bounds memory)
    zero_shot: bool = True  # evaluate before training, logged as val/zero_shot_acc


@dataclass
class TinyClipModelConfig(TransformersModelConfig):
    """The offline pipeline demo's tiny random CLIP: built at ``id`` on first use (see clip/tiny_clip.py),
    then loaded like any local checkpoint. Not pretrained: its accuracies mean nothing."""

    kind: str = "tiny_clip"
    id: str = "~/.cache/blocktrain/models/tiny-clip-fashion-mnist"
    auto_class: str = "CLIPModel"


register_data_kind("few_shot", FewShotDataConfig, "blocktrain.trainer.clip.few_shot:build_few_shot_data")
register_task("clip_few_shot", ClipFewShotTaskConfig, "blocktrain.trainer.clip.task:ClipFewShotTask")
register_model_source("tiny_clip", TinyClipModelConfig, "blocktrain.trainer.clip.tiny_clip:TINY_CLIP")
