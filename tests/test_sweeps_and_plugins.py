"""Optuna and SLURM presets, and third-party plugins installed from a package's entry point."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml
from omegaconf import OmegaConf

from tests.helpers import read_metrics, train


def test_optuna_sweep_returns_the_recipes_metric(lora_args, tmp_path):
    args = [a for a in lora_args if not a.startswith(("run_dir=", "optim.lr="))]
    sweep = tmp_path / "sweep"
    result = train("-m", *args, "hydra/sweeper=optuna_tpe", "hydra.sweeper.n_trials=2", "trainer.max_steps=3",
                   "optim.lr=interval(1e-4,1e-2)", "stages=[fit,evaluate]",
                   f"hydra.sweep.dir={sweep}", "logger=none")
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    accs = [read_metrics(sweep / str(i))["metrics"]["val/acc"] for i in range(2)]
    assert best["best_value"] == max(accs)
    assert "optim.lr" in best["best_params"]


def test_slurm_launcher_preset_follows_the_trainer():
    result = train("recipe=lora_text_classifier", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                   "hydra/launcher=slurm", "--cfg", "all")
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)


PLUGIN_MODULE = '''
from dataclasses import dataclass
from blocktrain.trainer.plugin import Plugin, PluginConfig

@dataclass
class FreezeConfig(PluginConfig):
    keep: str = "classifier"

class FreezePlugin(Plugin):
    name = "freeze"
    description = "unused: the listing shows the distribution summary"
    config_class = FreezeConfig

    def apply(self, model, run):
        for name, param in model.named_parameters():
            param.requires_grad = self.config.keep in name
        return model
'''


def test_third_party_plugin_from_an_installed_package(lora_args, tiny_bert_dir, tmp_path):
    pkg = tmp_path / "freeze_pkg"
    (pkg / "freeze_plugin").mkdir(parents=True)
    (pkg / "freeze_plugin" / "__init__.py").write_text(PLUGIN_MODULE)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "freeze-plugin"
        version = "0.1"
        description = "Train only the modules whose name contains `keep`"
        [project.entry-points."blocktrain.plugins"]
        freeze = "freeze_plugin:FreezePlugin"
        '''))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(pkg)], check=True, capture_output=True)

    listing = train("--list", PYTHONPATH=str(site))
    assert "freeze" in listing.stdout and "Train only the modules whose name contains" in listing.stdout

    result = train(*lora_args, "plugin=[freeze]", "plugin.freeze.keep=classifier", "stages=[fit]", "logger=none",
                   "trainer.max_steps=2", PYTHONPATH=str(site))
    assert result.returncode == 0, result.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    expected = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n)
    assert read_metrics(tmp_path / "run")["metrics"]["params/trainable"] == expected

    bad = train(*lora_args, "plugin=[freeze]", "plugin.freeze.keep=3", "+plugin.freeze.typo=1", PYTHONPATH=str(site))
    assert bad.returncode != 0 and "unknown key 'typo' in plugin.freeze" in bad.stderr
