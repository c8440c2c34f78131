"""The torch side of the toy extension (imported only when a run uses it)."""
import torch
from torch.utils.data import TensorDataset

from blocktrain.trainer.sources.data import Datasets
from blocktrain.trainer.sources.models import LoadedModel, ModelSource
from blocktrain.trainer.tasks.base import Task


class RegressionTask(Task):
    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def eval_sums(self, model, batch):
        x, y = batch
        return {"mse": (float(((model(x) - y) ** 2).sum()), y.numel())}


def build_points(cfg, tokenizer, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.n, cfg.dim, generator=g)
    y = x.sum(dim=1, keepdim=True)
    return Datasets(train=TensorDataset(x[:48], y[:48]), val=TensorDataset(x[48:], y[48:]), collate_fn=None)


class Mlp(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


MLP_SOURCE = ModelSource(lambda cfg, processor: LoadedModel(Mlp(cfg.dim, cfg.hidden), None, "toy_mlp"))


def report(run, stage):
    (run.run_dir / stage.settings["file"]).write_text(f"{stage.name}: {sum(p.numel() for p in run.model.parameters())}\n")
