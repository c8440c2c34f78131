"""Generating images with a sampler (class-balanced labels, seeded noise, optional VAE decoding) and measuring them:
NFE, FLOPs per sample (torch's FLOP counter), Fréchet distance and KID against cached real features."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from blocktrain.trainer.generative.encoders import frozen_pretrained
from blocktrain.trainer.generative.flow import SampleResult, Velocity, flops_per_sample, sample
from blocktrain.trainer.generative.metrics import cached_real_features, extract, frechet_distance, kernel_inception_distance


@dataclass
class Generated:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1], on the CPU
    labels: torch.Tensor  # (N,) the classes they were generated for
    nfe: int
    flops_per_sample: float


class Latents:
    """Pixels <-> SD-VAE latents (diffusers ``AutoencoderKL``, frozen), scaled by ``scale`` (0.18215)."""

    def __init__(self, vae_id: str, scale: float):
        from diffusers import AutoencoderKL

        self.vae = frozen_pretrained(AutoencoderKL, vae_id, "the VAE (plugin vae)")
        self.scale = scale
        self.channels = self.vae.config.latent_channels
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent, per side

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.vae.to(x.device)
        return self.vae.encode(x).latent_dist.sample() * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.vae.to(z.device)
        return self.vae.decode(z / self.scale).sample.clamp(-1, 1)


def generate(velocity_for: Callable[[], Velocity], shape: tuple[int, ...], num_classes: int, n: int, sampler,
             segments: int, device, decode: Callable | None = None, count_flops: bool = True) -> Generated:
    """``n`` images, labels cycling over the classes, noise seeded by ``sampler.seed``; FLOPs counted on the first
    batch. ``velocity_for()`` gives a fresh velocity callable per batch (BFM's FRN cache is per batch)."""
    gen = torch.Generator(device="cpu").manual_seed(sampler.seed)
    images, nfe, flops = [], 0, 0.0
    for start in range(0, n, sampler.batch_size):
        b = min(sampler.batch_size, n - start)
        noise = torch.randn((b, *shape), generator=gen).to(device)
        y = (torch.arange(start, start + b) % num_classes).to(device)

        def run() -> SampleResult:
            return sample(velocity_for(), noise, y, segments=segments, steps=sampler.steps // segments,
                          method=sampler.method, cfg_scale=sampler.cfg_scale,
                          guidance=(sampler.guidance_low, sampler.guidance_high), null_class=num_classes,
                          sde_t_end=sampler.sde_t_end, repeat_last=sampler.repeat_last, generator=gen_device(gen, device))

        if start == 0 and count_flops:
            result, flops = flops_per_sample(run, b)
        else:
            result = run()
        x = decode(result.x) if decode is not None else result.x
        images.append(x.float().clamp(-1, 1).cpu())
        nfe = result.nfe
    return Generated(torch.cat(images), torch.arange(n) % num_classes, nfe, flops)


def gen_device(gen: torch.Generator, device) -> torch.Generator:
    """A generator for the SDE noise on ``device``, seeded from ``gen``."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    return torch.Generator(device=device).manual_seed(seed)


def real_features(features, images: torch.Tensor, cache_dir: str, key: dict, batch: int = 100) -> torch.Tensor:
    """Features of real images, cached under ``cache_dir`` by a hash of ``key`` (dataset, extractor, count)."""
    digest = hashlib.sha1(repr(sorted(key.items())).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"real_{digest}.pt"
    return cached_real_features(path, lambda: extract(features, images.split(batch)))


def fd_and_kid(features, real: torch.Tensor, fake_images: torch.Tensor, kid_subset_size: int,
               batch: int = 100) -> dict[str, float]:
    fake = extract(features, fake_images.split(batch))
    return {"fd": frechet_distance(real, fake),
            "kid": kernel_inception_distance(real, fake, subset_size=kid_subset_size)}
