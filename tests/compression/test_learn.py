"""The engine-owned learning loop of the calibrate stage: presets, stage settings, clipping, logging."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from blocktrain.trainer.compression.learn import learn
from blocktrain.trainer.context import RunContext
from blocktrain.trainer.stages import Stage


class _Sink:
    def __init__(self):
        self.rows = []

    def log(self, values, step=None):
        self.rows.append(dict(values))


def _run(tmp_path, optim, clip=None, stage_settings=None):
    cfg = OmegaConf.create({"optim": optim, "scheduler": {"kind": "cosine", "warmup_steps": 0, "min_lr": 0.0},
                            "trainer": {"precision": "32-true", "gradient_clip_val": clip}})
    run = RunContext(cfg=cfg, run_dir=tmp_path, metrics=_Sink())
    run.stage = Stage("calibrate", "calibrate", stage_settings or {})
    return run


def _problem():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    w = torch.zeros(3, requires_grad=True)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    return w, batches, lambda b: ((b[0] @ w - b[1]) ** 2).mean()


def test_learn_uses_the_presets_and_the_stage_settings(tmp_path):
    w, batches, loss = _problem()
    run = _run(tmp_path, {"_target_": "torch.optim.SGD", "lr": 0.001}, stage_settings={"optim": {"lr": 0.1}})
    losses = learn(run, [w], loss, batches, steps=40, name="block0", log_every=10)
    assert len(losses) == 40 and losses[-1] < 0.01 * losses[0]
    assert torch.allclose(w.detach(), torch.tensor([1.0, -2.0, 0.5]), atol=0.1)
    logged = run.metrics.rows
    assert [r["block0/lr"] for r in logged][0] == 0.1  # the stage's lr, not the preset's 0.001
    assert len(logged) == 5 and logged[-1]["block0/lr"] < 1e-3  # steps 0, 10, 20, 30, 39; cosine to 0
    assert logged[-1]["block0/loss"] == losses[-1]


def test_learn_clips_gradients_like_the_trainer(tmp_path):
    w, batches, loss = _problem()
    run = _run(tmp_path, {"_target_": "torch.optim.SGD", "lr": 1.0}, clip=0.01)
    run.cfg.scheduler.kind = "constant"
    learn(run, [w], loss, batches[:1], steps=1, name="b")
    assert 0.0099 < float(w.detach().norm()) <= 0.01 + 1e-7  # one SGD step of a gradient clipped to norm 0.01
