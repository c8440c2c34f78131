"""Plugins ``flow_matching`` (single-network SiT baseline, ``model.kind: sit``) and ``bfm`` (Blockwise Flow Matching,
``model.kind: bfm``; both model kinds are registered by ``trainer/generative/config.py``). Torch is imported inside
the hooks only."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.generative.config import EncoderConfig, EvalConfig, SamplerConfig, check_sampler
from blocktrain.trainer.plugin import Plugin, PluginConfig


@dataclass
class FlowMatchingConfig(PluginConfig):
    vae: Optional[str] = None  # diffusers AutoencoderKL id or folder: train on its latents (null = pixels)
    latent_scale: float = 0.18215
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        check_sampler(self.sampler, f"plugin.{self._name}.sampler")
        if any(s < 1 for s in self.eval.steps) or self.eval.num_samples < 0:
            raise UserError(f"plugin.{self._name}.eval.steps must be >= 1 and eval.num_samples >= 0")

    _name = "flow_matching"


@dataclass
class BFMConfig(FlowMatchingConfig):
    lambda_proj: float = 0.05  # weight of the alignment loss (REPA uses 0.5; BFM's released config 0.05)
    encoder: Optional[EncoderConfig] = field(default_factory=EncoderConfig)  # alignment target; null = no alignment
    frn_phase: str = "frn"  # the fit phase (stage name) that trains the FRN with everything else frozen
    # memoise the encoder's target tokens by image content (exact: the encoder is frozen and a changed or augmented
    # image is a miss); costs grid² × align_dim × 4 bytes per distinct training image
    align_cache: bool = False

    _name = "bfm"

    def __post_init__(self):
        super().__post_init__()
        if self.lambda_proj < 0:
            raise UserError(f"plugin.bfm.lambda_proj must be >= 0, got {self.lambda_proj}")


class FlowMatchingPlugin(Plugin):
    name = "flow_matching"
    description = "Flow matching (SiT-style linear path, one velocity network) with ODE/SDE samplers and FD evaluation"
    config_class = FlowMatchingConfig
    kind = "generative"
    replaces_task_loss = True

    latents = None  # trainer.generative.evaluation.Latents when a VAE is configured

    # -- set-up ----------------------------------------------------------------------------------
    def apply(self, model, run):
        if self.config.vae is not None:
            from blocktrain.trainer.generative.evaluation import Latents

            self.latents = Latents(self.config.vae, self.config.latent_scale)
        self.check_steps(self.config.sampler.steps, f"plugin.{self.name}.sampler.steps", model)
        for steps in self.config.eval.steps:
            self.check_steps(steps, f"plugin.{self.name}.eval.steps", model)
        if run.data is not None:
            self.check_images(run.data.train[0][0], model)
        return model

    def segments(self, model) -> int:
        return 1

    def check_steps(self, steps: int, key: str, model) -> None:
        k = self.segments(model)
        if steps % k:
            raise UserError(f"{key}={steps} is not a multiple of model.segments={k} (each segment takes steps / K)")

    def check_images(self, image, model) -> None:
        """Images (or their latents) must have the model's channel count and size."""
        c = self.latents.channels if self.latents is not None else image.shape[0]
        if c != model.channels:
            what = "latent channels (the VAE's)" if self.latents is not None else "image channels"
            raise UserError(f"the data has {c} {what} but model.channels={model.channels}: set model.channels={c} "
                            "(or data.channels)")
        side = image.shape[-1] // (self.latents.factor if self.latents is not None else 1)
        if side != model.image_size:
            raise UserError(f"the data's {'latents' if self.latents else 'images'} are {side} wide but "
                            f"model.image_size={model.image_size} (pad or resize the data: data.pad_to / data.image_size)")

    def inputs(self, batch):
        """(x, y) of a batch, x in latent space when a VAE is configured."""
        x, y = batch[0], batch[1]
        return (self.latents.encode(x) if self.latents is not None else x), y

    # -- training --------------------------------------------------------------------------------
    def loss(self, model, batch, run):
        import torch

        from blocktrain.trainer.generative.flow import fm_loss

        x, y = self.inputs(batch)
        return fm_loss(model, x, y, torch.rand(x.shape[0], device=x.device), torch.randn_like(x))

    def val_loss(self, model, x, y, eps, u):
        from blocktrain.trainer.generative.flow import fm_loss

        return fm_loss(model, x, y, u, eps)

    def eval_sums(self, model, batch, run):
        """The loss on fixed noise and times (seeded by ``sampler.seed``), so runs compare exactly."""
        import torch

        x, y = self.inputs(batch)
        gen = torch.Generator().manual_seed(self.config.sampler.seed)
        eps = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
        u = torch.rand(x.shape[0], generator=gen).to(x.device, x.dtype)
        return {"fm_loss": (float(self.val_loss(model, x, y, eps, u)) * x.shape[0], x.shape[0])}

    # -- sampling and evaluation -------------------------------------------------------------------
    def velocity_for(self, model, sampler):
        return lambda: (lambda x, t, y, segment, first: model(x, t, y))

    def sampler_settings(self, run) -> SamplerConfig:
        """``sampler`` with the current stage's settings (e.g. ``{sample: {frn: true, steps: 8}}``) on top."""
        settings = dict(getattr(run.stage, "settings", None) or {}) if run is not None else {}
        fields = {f.name for f in dataclasses.fields(SamplerConfig)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise UserError(f"unknown setting '{unknown[0]}' of stage {run.stage.name}; valid: {', '.join(sorted(fields))}")
        sampler = dataclasses.replace(self.config.sampler, **settings)
        check_sampler(sampler, f"stages.{run.stage.name}" if settings else f"plugin.{self.name}.sampler")
        return sampler

    def generate(self, model, sampler, n: int, device, count_flops: bool = True):
        from blocktrain.trainer.generative.evaluation import generate

        self.check_steps(sampler.steps, "the sampler's steps", model)
        shape = (model.channels, model.image_size, model.image_size)
        decode = self.latents.decode if self.latents is not None else None
        return generate(self.velocity_for(model, sampler), shape, model.num_classes, n, sampler, self.segments(model),
                        device, decode, count_flops)

    def sample(self, model, run):
        import torch

        sampler = self.sampler_settings(run)
        device = next(model.parameters()).device
        out = self.generate(model, sampler, sampler.num_samples, device)
        tag = f"{self.name}/{run.stage.name}"
        return {f"{tag}/samples": ((out.images + 1) / 2).clamp(0, 1), f"{tag}/nfe": out.nfe,
                f"{tag}/gflops_per_sample": out.flops_per_sample / 1e9}

    def evaluate(self, model, run):
        """Fréchet distance, KID and class accuracy (``eval.classifier``) of samples vs the real val images, for
        each ``eval.steps`` (quality vs NFE and FLOPs); ``acc/real`` is the classifier's accuracy on those images."""
        if self.config.eval.num_samples == 0 or run.data is None:
            return {}
        import torch

        from blocktrain.trainer.generative.encoders import build_encoder
        from blocktrain.trainer.generative.evaluation import fd_and_kid, real_features
        from blocktrain.trainer.media import Table

        ev = self.config.eval
        device = next(model.parameters()).device
        features = build_encoder(ev.features, pooled=True).to(device)
        split = run.data.val if run.data.val is not None else run.data.train
        n_real = min(ev.num_real, len(split))
        real_images = torch.stack([split[i][0] for i in range(n_real)])
        key = {"data": repr(run.cfg.data), "features": repr(ev.features), "n": n_real}
        real = real_features(lambda x: features(x.to(device)), real_images, ev.cache_dir, key)
        classifier, results = None, {}
        if ev.classifier is not None:
            from blocktrain.trainer.generative.classifier import class_accuracy, load_classifier

            classifier = load_classifier(ev.classifier, run.data.train, real_images.shape[1], model.num_classes,
                                         ev.cache_dir, {"data": repr(run.cfg.data)}, ev.classifier_epochs, device)
            real_labels = torch.as_tensor([int(split[i][1]) for i in range(n_real)])
            results["acc/real"] = class_accuracy(classifier, real_images, real_labels, device)
        base = self.sampler_settings(run)
        rows = []
        for steps in ev.steps:
            out = self.generate(model, dataclasses.replace(base, steps=steps), ev.num_samples, device)
            scores = fd_and_kid(lambda x: features(x.to(device)), real, out.images, ev.kid_subset_size)
            if classifier is not None:
                scores["acc"] = class_accuracy(classifier, out.images, out.labels, device)
            gflops = out.flops_per_sample / 1e9
            results.update({f"{name}/steps{steps}": value for name, value in scores.items()})
            results.update({f"nfe/steps{steps}": out.nfe, f"gflops/steps{steps}": gflops})
            rows.append([steps, out.nfe, gflops, scores["fd"], scores["kid"], scores.get("acc", float("nan"))])
        columns = ["steps", "nfe", "gflops_per_sample", "fd", "kid", "acc"]
        run.log_media({f"{self.name}/quality_vs_nfe": Table(columns, rows)})
        return results


class BFMPlugin(FlowMatchingPlugin):
    name = "bfm"
    description = "Blockwise Flow Matching: per-segment velocity stacks, a trunk aligned to a frozen encoder, the FRN"
    config_class = BFMConfig

    encoder = None
    targets = None  # the encoder's tokens on the trunk's grid: a function of the images (a TokenCache with align_cache)
    train_frn = False  # set per fit phase

    def apply(self, model, run):
        from .model import BFM

        if not isinstance(model, BFM):
            raise UserError("plugin bfm needs the BFM network: set model.kind=bfm")
        model = super().apply(model, run)
        if self.config.encoder is not None and self.config.lambda_proj > 0:
            from blocktrain.trainer.generative.encoders import build_encoder, feature_tokens

            self.encoder = build_encoder(self.config.encoder)
            if self.encoder.num_features != model.projector[-1].out_features:
                raise UserError(f"the encoder gives {self.encoder.num_features} features per token but "
                                f"model.align_dim={model.projector[-1].out_features}: set model.align_dim="
                                f"{self.encoder.num_features}")
            if run.data is not None:  # the encoder's grid must pool onto the trunk's
                import torch

                image = run.data.train[0][0][None]
                with torch.no_grad():
                    feature_tokens(self.encoder(image), model.grid, f"encoder ({self.config.encoder.kind}, "
                                   f"input_size {self.config.encoder.input_size})")
            self.targets = self.encoder_tokens(model.grid)
        return model

    def encoder_tokens(self, grid: int):
        from blocktrain.trainer.generative.encoders import TokenCache, feature_tokens

        def tokens(images):
            self.encoder.to(images.device)
            return feature_tokens(self.encoder(images), grid)

        return TokenCache(tokens) if self.config.align_cache else tokens

    def segments(self, model) -> int:
        return model.segments

    def on_stage_start(self, stage, model, run):
        """Stage 1 trains everything but the FRN; the ``frn_phase`` fit phase trains only the FRN."""
        if stage.kind != "fit":
            return
        self.train_frn = stage.name == self.config.frn_phase
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("frn_") == self.train_frn

    def loss(self, model, batch, run):
        import torch

        from .core import bfm_loss, frn_loss

        x, y = self.inputs(batch)
        eps, u = torch.randn_like(x), torch.rand(x.shape[0], device=x.device)
        if self.train_frn:
            return {"frn": frn_loss(model, x, y, eps, u)}
        terms = bfm_loss(model, x, y, eps, u, self.alignment_target(batch[0]))
        if "align" in terms:
            terms["align"] = self.config.lambda_proj * terms["align"]
        return terms

    def alignment_target(self, images):
        """The frozen encoder's feature tokens on the trunk's grid, or None without alignment."""
        if self.targets is None:
            return None
        import torch

        with torch.no_grad():
            return self.targets(images)

    def val_loss(self, model, x, y, eps, u):
        from .core import bfm_loss

        return bfm_loss(model, x, y, eps, u)["velocity"]

    def velocity_for(self, model, sampler):
        from .core import BFMVelocity

        return lambda: BFMVelocity(model, frn=sampler.frn)
