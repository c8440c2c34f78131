"""A third-party blocktrain extension, installed by tests/engine/test_extensions.py as its own package.

It registers one of each extension point — a task kind, a data kind, a model source (a model it builds
from its config) and a stage — and a plugin that uses the wider hooks: a named loss term, a parameter
group, a per-phase trainable set, validate-loop metrics and sampled media.
"""
from dataclasses import dataclass
from typing import Optional

from blocktrain.trainer.plugin import Plugin, PluginConfig
from blocktrain.trainer.registry import register_data_kind, register_model_source, register_stage, register_task


@dataclass
class PointsDataConfig:
    kind: str = "toy_points"
    batch_size: int = 8
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    n: int = 64
    dim: int = 4


@dataclass
class MlpModelConfig:
    kind: str = "toy_mlp"
    dim: int = 4
    hidden: int = 8


@dataclass
class RegressionTaskConfig:
    kind: str = "toy_regression"


@dataclass
class ReportStageConfig:
    file: str = "report.txt"


register_task("toy_regression", RegressionTaskConfig, "toyext_impl:RegressionTask")
register_data_kind("toy_points", PointsDataConfig, "toyext_impl:build_points")
register_model_source("toy_mlp", MlpModelConfig, "toyext_impl:MLP_SOURCE")
register_stage("report", "toyext_impl:report", ReportStageConfig)


@dataclass
class ToyConfig(PluginConfig):
    l2: float = 0.01
    bias_lr: float = 0.5


class ToyPlugin(Plugin):
    name = "toy"
    description = "toy objective for the extension test"
    config_class = ToyConfig
    kind = "objective"

    def loss(self, model, batch, run):
        return {"l2": self.config.l2 * sum((p ** 2).sum() for p in model.parameters())}

    def param_groups(self, model, run):
        return [{"params": [model.out.bias], "lr": self.config.bias_lr}]

    def on_stage_start(self, stage, model, run):
        if stage.kind == "fit":  # phase "head" trains the output layer only
            for name, p in model.named_parameters():
                p.requires_grad = stage.name != "head" or name.startswith("out.")

    def eval_sums(self, model, batch, run):
        x, y = batch
        return {"toy_abs_err": (float((model(x) - y).abs().sum()), y.numel())}

    def sample(self, model, run):
        import torch

        return {"toy/grid": torch.rand(4, 3, 8, 8), "toy/texts": ["first sample", "second sample"], "toy/count": 2}
