"""End-to-end runs of the engine: run dir contents, W&B history, resume, multirun, DDP, failures."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blocktrain.trainer.cli import load_config
from blocktrain.trainer.run import RunInterrupted, run
from tests.helpers import cli_env, interrupt_at, read_metrics, train, wandb_history


def test_lora_text_classifier_end_to_end(lora_args, tmp_path):
    result = train(*lora_args)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").read_text().count("lora") >= 1
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "finished"
    values = metrics["metrics"]
    for key in ("train/loss", "train/lr", "val/acc", "val/loss", "perf/samples_per_s", "perf/tokens_per_s",
                "perf/peak_mem_gb", "params/trainable", "params/total"):
        assert key in values, key
    assert 0 < values["params/trainable"] < values["params/total"]
    assert metrics["optimized_metric"] == "val/acc" and metrics["optimized_value"] == values["val/acc"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    history = wandb_history(run_dir)
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert len(losses) >= 10 and all(loss > 0 for loss in losses)
    assert any("val/acc" in row for row in history)
    exported = {p.name for p in (run_dir / "export").rglob("*")}
    assert "adapter_config.json" in exported and "adapter_model.safetensors" in exported


def _final_state(run_dir: Path, step: int) -> tuple[dict, dict]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == step
    return ckpt["state_dict"], ckpt["optimizer_states"][0]


def test_resume_after_interrupt_equals_uninterrupted_run(lora_args, tmp_path):
    common = [a for a in lora_args if not a.startswith(("run_dir=", "trainer.max_steps="))]
    common += ["logger=none", "trainer.max_steps=10", "plugin.lora.dropout=0.2", "trainer.enable_progress_bar=false"]
    straight = tmp_path / "straight"
    run(load_config([*common, f"run_dir={straight}"]))

    resumed = tmp_path / "resumed"
    with pytest.raises(RunInterrupted, match="resume=auto"):
        run(load_config([*common, f"run_dir={resumed}"]), extra_callbacks=[interrupt_at(6)])
    assert read_metrics(resumed)["status"] == "interrupted"
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    run(load_config([*common, f"run_dir={resumed}", "resume=auto"]))
    assert read_metrics(resumed)["status"] == "finished"

    (w_a, opt_a), (w_b, opt_b) = _final_state(straight, 10), _final_state(resumed, 10)
    assert w_a.keys() == w_b.keys()
    trained = [k for k in w_a if "lora_" in k]
    assert trained
    for key in w_a:
        torch.testing.assert_close(w_a[key], w_b[key], rtol=1e-5, atol=1e-6, msg=key)
    for idx, state in opt_a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(value, opt_b["state"][idx][name], rtol=1e-5, atol=1e-6)


def test_interrupt_checkpoint_pairs_weights_with_their_ema_and_resume_is_bit_identical(lora_args, tmp_path):
    """Ctrl-C right after step N (raised by a callback that runs before the engine's own ones) saves the EMA
    updated through step N, and the resumed run ends with the same weights and average as a straight run."""
    import pytorch_lightning as pl

    decay = 0.5
    common = [a for a in lora_args if not a.startswith(("run_dir=", "trainer.max_steps="))]
    common += ["logger=none", "trainer.max_steps=8", "trainer.enable_progress_bar=false", f"ema.decay={decay}"]
    straight = tmp_path / "straight"
    run(load_config([*common, f"run_dir={straight}"]))

    class Record(pl.Callback):  # the trained weights at fit start and after every step
        def __init__(self):
            self.weights: list[dict] = []

        def _keep(self, module):
            self.weights.append({k: v.detach().clone() for k, v in module.model.named_parameters() if v.requires_grad})

        def on_fit_start(self, trainer, pl_module):
            self._keep(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._keep(pl_module)

    resumed, record = tmp_path / "resumed", Record()
    with pytest.raises(RunInterrupted):
        run(load_config([*common, f"run_dir={resumed}"]), extra_callbacks=[record, interrupt_at(5)])
    ckpt = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5 and len(record.weights) == 6
    expected = dict(record.weights[0])
    for step in record.weights[1:]:
        expected = {k: v.lerp(step[k], 1 - decay) for k, v in expected.items()}
    shadow = ckpt["callbacks"]["EMA"]["shadow"]
    assert shadow.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(shadow[key], expected[key], rtol=0, atol=1e-7, msg=key)

    run(load_config([*common, f"run_dir={resumed}", "resume=auto"]))
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for key, value in a["callbacks"]["EMA"]["shadow"].items():
        assert torch.equal(value, b["callbacks"]["EMA"]["shadow"][key]), key


def test_fresh_run_refuses_a_run_dir_with_checkpoints(lora_args, tmp_path):
    args = [*lora_args, "logger=none", "trainer.max_steps=4"]
    assert train(*args).returncode == 0
    result = train(*args)
    assert result.returncode != 0 and "resume=auto" in result.stderr


def test_multirun_gives_one_run_and_one_wandb_run_per_point(lora_args, tmp_path):
    args = [a for a in lora_args if not a.startswith("run_dir=")]
    result = train("-m", *args, "trainer.max_steps=3", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   "stages=[fit]")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    run_ids = set()
    for job in jobs:
        assert read_metrics(job)["status"] == "finished"
        assert any("train/loss" in row for row in wandb_history(job))
        run_ids.add((job / "wandb_run_id").read_text().strip())
    assert len(run_ids) == 2


def _csv_losses(run_dir: Path) -> list[float]:
    import csv

    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_ddp_two_cpu_processes_match_one_process(lora_args, tmp_path):
    base = [a for a in lora_args if not a.startswith(("run_dir=", "data.batch_size=", "trainer="))]
    base += ["logger=csv", "trainer.max_steps=4", "plugin.lora.dropout=0.0", "stages=[fit]",
             "trainer.val_check_interval=100", "trainer.enable_progress_bar=false"]
    single = train(*base, "trainer=cpu", "data.batch_size=8", f"run_dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = train(*base, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=4",
                f"run_dir={tmp_path / 'two'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = _csv_losses(tmp_path / "one"), _csv_losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(lora_args, tmp_path):
    result = train(*lora_args, "logger=none", "optim=sgd", "optim.lr=1e30", "optim.momentum=0.0",
                   "checkpoint.every_n_steps=1", "trainer.max_steps=20")
    assert result.returncode != 0
    assert "non-finite training loss" in result.stderr and "Traceback" not in result.stderr
    run_dir = tmp_path / "run"
    assert read_metrics(run_dir)["status"] == "failed"
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 1 <= step < 20


def test_ctrl_c_writes_checkpoint_and_resume_auto_finishes(lora_args, tmp_path):
    args = [a for a in lora_args if not a.startswith("trainer.max_steps=")]
    args += ["trainer.max_steps=400", "checkpoint.every_n_steps=1000", "trainer.enable_progress_bar=false"]
    cmd = [sys.executable, "-m", "blocktrain.trainer.cli", *args]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and read_step(run_dir) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "resume=auto" in stderr and "Traceback" not in stderr
    assert read_metrics(run_dir)["status"] == "interrupted"
    stopped_at = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 3 <= stopped_at < 400
    resumed = train(*[a for a in args if not a.startswith("trainer.max_steps=")], "trainer.max_steps=" + str(stopped_at + 3),
                    "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(run_dir)["status"] == "finished"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stopped_at + 3
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # the resumed run continues the W&B run


def read_step(run_dir: Path) -> int:
    try:
        return int(read_metrics(run_dir).get("step", 0))
    except (FileNotFoundError, ValueError):
        return 0
