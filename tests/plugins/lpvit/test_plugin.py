"""The ``lpvit`` plugin through the engine: bad input fails before calibration with one clear message; calibrate ->
fine-tune (masks fixed, optimiser state included) -> evaluate -> export on a tiny Llama, interrupted mid-fine-tune
and resumed with the same masks; the fine-tune through block_sparse_linear equals the masked dense one; a tiny timm
ViT end to end; the DeiT recipe validates."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from blocktrain.trainer.cli import load_config
from blocktrain.trainer.compression.fixed_masks import MASK, masked_layers
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.run import RunInterrupted, run
from blocktrain.trainer.validation import validate_config
from tests.compression.conftest import llm_args, vit_args
from tests.helpers import interrupt_at, read_metrics, train, wandb_history

TINY = ["plugin.lpvit.block=[4,4]", "plugin.lpvit.calibration.samples=16", "plugin.lpvit.calibration.batch_size=8"]
FINETUNE = ["stages=[calibrate,{fit:{name:finetune,max_steps:4}},evaluate,export]", "checkpoint.every_n_steps=1",
            "scheduler.warmup_steps=0", "optim.lr=1e-2", "optim.weight_decay=0.1", "trainer.val_check_interval=2",
            "data.stride=8"]


@pytest.mark.parametrize("override,match", [("plugin.lpvit.flops=0", "flops must be in \\(0, 1\\]"),
                                            ("plugin.lpvit.flops=1.5", "flops must be in \\(0, 1\\]"),
                                            ("plugin.lpvit.block=[8]", "block must be two")])
def test_bad_config_is_one_user_error(override, match):
    with pytest.raises(UserError, match=match):
        validate_config(load_config(["recipe=lpvit_llm", "data.files=[book.txt]", override]))


@pytest.mark.parametrize("overrides,match", [
    (["plugin.lpvit.block=[24,24]", "plugin.lpvit.ceil_mode=false"],
     r"block 24x24 does not tile model\.layers\.0\.self_attn\.q_proj \(32x32 as out x in·k·k\): "
     r"plugin\.lpvit\.ceil_mode=true scores the overhanging edge blocks on their valid part"),
    (["plugin.lpvit.exclude=[]"], r"lm_head\.weight is shared with another module \(tied weights\); add 'lm_head'"),
    (["plugin.lpvit.exclude=[lm_head,q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
     "no nn.Linear or nn.Conv2d layers to prune"),
])
def test_bad_model_input_fails_before_calibration(overrides, match, llama_dir, corpus, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=match):
        run(load_config(llm_args("lpvit_llm", llama_dir, corpus, run_dir, *TINY, *overrides)))
    assert not (run_dir / "state").exists()  # nothing was calibrated


class MaskWatch(pl.Callback):
    """After every optimiser step of the fine-tune: masked weights and their optimiser state are exactly zero."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layers = masked_layers(pl_module)
        assert layers
        [opt] = trainer.optimizers
        for module in layers.values():
            keep = getattr(module, MASK)
            assert (module.weight[~keep] == 0).all()
            state = opt.state[module.weight]
            assert state and all((v[~keep] == 0).all() for v in state.values() if v.shape == keep.shape)
        self.checked += 1


def test_llm_prune_finetune_resume_export(llama_dir, corpus, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    watch = MaskWatch()
    run(load_config(llm_args("lpvit_llm", llama_dir, corpus, straight, *TINY, *FINETUNE)), extra_callbacks=[watch])
    assert watch.checked == 4
    metrics = read_metrics(straight)["metrics"]
    assert abs(metrics["lpvit/flops_kept"] - 0.5) <= 0.02 and "val/ppl" in metrics and "finetune/val/ppl" in metrics
    masks = torch.load(straight / "state" / "lpvit.pt", weights_only=False)["payload"]["masks"]
    exported = load_file(str(straight / "export" / "model" / "model.safetensors"))
    assert not any(k.endswith(MASK) for k in exported)  # a plain dense model with zeros
    for name, keep in masks.items():
        weight = exported[f"{name}.weight"]
        assert (weight[~keep] == 0).all() and (weight[keep] != 0).all()

    with pytest.raises(RunInterrupted):  # Ctrl-C after fine-tune step 2
        run(load_config(llm_args("lpvit_llm", llama_dir, corpus, resumed, *TINY, *FINETUNE)),
            extra_callbacks=[interrupt_at(2, "finetune/")])
    ckpt = torch.load(next((resumed / "checkpoints" / "finetune").glob("last.ckpt")), weights_only=False)
    for name, keep in masks.items():
        assert torch.equal(ckpt["state_dict"][f"model.{name}.{MASK}"], keep)
    run(load_config(llm_args("lpvit_llm", llama_dir, corpus, resumed, *TINY, *FINETUNE, "resume=auto")))
    again = load_file(str(resumed / "export" / "model" / "model.safetensors"))
    assert exported.keys() == again.keys()
    for key in exported:
        assert torch.equal(exported[key], again[key]), key


class LayerKinds(pl.Callback):
    """The classes of the masked layers seen at every training step."""

    def __init__(self):
        self.kinds: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.kinds |= {type(m).__name__ for m in masked_layers(pl_module).values()}


def test_block_sparse_finetune_matches_the_masked_dense_finetune(llama_dir, corpus, tmp_path):
    exports = {}
    for flag in (False, True):
        kinds = LayerKinds()
        run(load_config(llm_args("lpvit_llm", llama_dir, corpus, tmp_path / str(flag), "plugin.lpvit.block=[16,16]",
                                 "plugin.lpvit.calibration.samples=8",
                                 "stages=[calibrate,{fit:{name:ft,max_steps:2}},export]",
                                 "scheduler.warmup_steps=0", "optim.lr=1e-2", "data.stride=8",
                                 f"plugin.lpvit.finetune_block_sparse={flag}")), extra_callbacks=[kinds])
        assert kinds.kinds == ({"BlockMaskedLinear", "Linear"} if flag else {"Linear"})
        exports[flag] = load_file(str(tmp_path / str(flag) / "export" / "model" / "model.safetensors"))
    assert exports[True].keys() == exports[False].keys()
    for key, value in exports[False].items():
        torch.testing.assert_close(exports[True][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_block_sparse_export_reloads_and_matches_the_dense_export(llama_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from blocktrain.trainer.compression.block_sparse import BlockSparseLinear, load_block_sparse
    from tests.pruning.conftest import token_batches

    run_dir = tmp_path / "run"
    run(load_config(llm_args("lpvit_llm", llama_dir, corpus, run_dir, "plugin.lpvit.block=[16,16]",
                             "plugin.lpvit.calibration.samples=8", "plugin.lpvit.export_block_sparse=true",
                             "stages=[calibrate,export]")))
    export = run_dir / "export" / "lpvit"
    dense = AutoModelForCausalLM.from_pretrained(export / "model").eval()
    sparse = load_block_sparse(AutoModelForCausalLM.from_pretrained(llama_dir).eval(), export / "block_sparse")
    swapped = [n for n, m in sparse.named_modules() if isinstance(m, BlockSparseLinear)]
    assert len(swapped) == 14
    for name in swapped:
        torch.testing.assert_close(sparse.get_submodule(name).dense_weight(), dense.get_submodule(name).weight)
    batch = {"input_ids": token_batches(1)[0]["input_ids"] % dense.config.vocab_size}
    with torch.no_grad():
        torch.testing.assert_close(sparse(**batch).logits, dense(**batch).logits, rtol=1e-5, atol=1e-5)


def test_tiny_timm_vit_end_to_end(vit_checkpoint, images, tmp_path, monkeypatch):
    """The DeiT recipe (augmentation, repeated augmentation, mixup, drop path, warm-up in epochs) with a teacher on a
    tiny ViT, logged to offline W&B: calibration reads un-augmented images; the figures and tables are logged."""
    from blocktrain.plugins.lpvit import pruner
    from blocktrain.trainer.sources.data import build_datasets

    seen = []
    original = pruner.gradient_statistic
    monkeypatch.setattr(pruner, "gradient_statistic", lambda model, names, batches, **kw: (
        seen.extend(batches), original(model, names, batches, **kw))[1])
    run_dir = tmp_path / "run"
    args = [a for a in vit_args("lpvit_deit_s", vit_checkpoint, images, run_dir, "plugin.lpvit.calibration.samples=12",
                                "plugin.lpvit.calibration.batch_size=6",
                                "stages=[calibrate,{fit:{name:finetune,max_steps:2}},evaluate,export]",
                                "trainer.max_epochs=null", "trainer.log_every_n_steps=1", "scheduler.warmup_epochs=1",
                                "task.distill={teacher:{kind:timm,name:vit_tiny_patch16_224,pretrained:false,"
                                "num_classes:2,kwargs:{img_size:32,depth:1}}}") if a != "logger=none"]
    cfg = load_config(args)
    assert (cfg.model.drop_path_rate, cfg.data.repeats, cfg.data.augment) == (0.1, 3, "deit")
    run(cfg)
    metrics = read_metrics(run_dir)["metrics"]
    layers = {k.removeprefix("sparsity/density/") for k in metrics if k.startswith("sparsity/density/")}
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.1.mlp.fc2", "head"} <= layers
    assert metrics["sparsity/density/patch_embed.proj"] < 1 or metrics["sparsity/density/blocks.0.attn.qkv"] < 1
    assert 0 < metrics["lpvit/flops_kept"] < 1 and "val/acc" in metrics
    assert metrics["finetune/train/lr"] == pytest.approx(2.5e-4 * 2 / 3)  # step 2 of a 3-step (one epoch) warm-up
    state = load_file(str(next((run_dir / "export").rglob("*.safetensors"))))
    masks = torch.load(run_dir / "state" / "lpvit.pt", weights_only=False)["payload"]["masks"]
    assert masks["patch_embed.proj"].shape == state["patch_embed.proj.weight"].shape == (192, 3, 16, 16)
    for name, keep in masks.items():
        assert (state[f"{name}.weight"][~keep] == 0).all()

    plain = build_datasets(cfg.data, seed=cfg.seed).calibration  # the training images through the eval transform
    views = torch.stack([plain[i][0] for i in range(len(plain))])
    calibrated = torch.cat([x for x, _ in seen])
    assert len(calibrated) == 12 and all((views == x).flatten(1).all(1).any() for x in calibrated)

    media = {p.name.split("_step")[0] for p in (run_dir / "media").iterdir()}
    assert {"lpvit_curves", "lpvit_allocation", "lpvit_block_masks", "sparsity_layers", "sparsity_density_chart"} <= media
    curves = next((run_dir / "media").glob("lpvit_curves_step*.png"))
    from PIL import Image

    assert Image.open(curves).size == (720, 440)  # four layers' charts, two by two
    picture = Image.open(next((run_dir / "media").glob("lpvit_block_masks_step*.png")))
    assert picture.size == (6 * 140, 2 * 126)  # all 10 pruned layers, six cells a row
    table = next((run_dir / "media").glob("lpvit_allocation_step*.csv")).read_text().splitlines()
    assert table[0] == "layer,amount,density,flops_kept_share" and len(table) == 1 + len(masks)
    rows = [line.split(",") for line in table[1:]]
    assert sum(float(r[3]) for r in rows) == pytest.approx(metrics["lpvit/flops_kept_planned"], abs=1e-4)
    history = wandb_history(run_dir)
    logged = {k for row in history for k, v in row.items() if k.endswith("/_type") and v in ("image-file", "table-file")}
    assert {"lpvit/curves/_type", "lpvit/block_masks/_type", "lpvit/allocation/_type"} <= logged
    assert any("finetune/train/loss" in row for row in history)  # the fine-tune curve


def test_deit_finetune_resumes_exactly_mid_epoch(vit_checkpoint, images, tmp_path):
    """Ctrl-C in the second epoch of a fine-tune with the DeiT pieces (augmentation, repeated augmentation, mixup, drop
    path): the resumed run's export equals the straight run's (sample order, augmentation and mixup draws)."""
    def args(run_dir, *extra):
        return vit_args("lpvit_deit_s", vit_checkpoint, images, run_dir, "plugin.lpvit.calibration.samples=12",
                        "plugin.lpvit.calibration.batch_size=6", "stages=[calibrate,{fit:{name:finetune,max_steps:5}},export]",
                        "checkpoint.every_n_steps=1", *extra)  # 18 training images in batches of 6: 3 steps an epoch

    run(load_config(args(tmp_path / "straight")))
    with pytest.raises(RunInterrupted):
        run(load_config(args(tmp_path / "resumed")), extra_callbacks=[interrupt_at(4, "finetune/")])
    run(load_config(args(tmp_path / "resumed", "resume=auto")))
    straight, resumed = (load_file(str(next((tmp_path / d / "export").rglob("*.safetensors"))))
                         for d in ("straight", "resumed"))
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_deit_recipe_composes_with_the_cli():
    result = train("recipe=lpvit_deit_s", "data.path=/data/imagenet/train", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "name: deit_small_distilled_patch16_224" in result.stdout and "block:\n    - 16\n    - 16" in result.stdout
    cfg = load_config(["recipe=lpvit_deit_s", "data.path=/data/train"])
    assert validate_config(cfg)["lpvit"].exclude == []
    base = train("recipe=lpvit_deit_b", "data.path=/data/imagenet/train", "--cfg", "job")
    assert base.returncode == 0, base.stderr[-2000:]
    assert "name: deit_base_distilled_patch16_224" in base.stdout and "block:\n    - 32\n    - 32" in base.stdout
    assert "lr: 0.000125" in base.stdout and "max_epochs: 300" in base.stdout
    for recipe in ("lpvit_deit_s", "lpvit_deit_b"):  # the DeiT augmentation is on; distillation is an option
        cfg = load_config([f"recipe={recipe}", "data.path=/data/train", "task.distill={teacher:{kind:timm,name:regnety_160}}"])
        validate_config(cfg)
        assert (cfg.data.augment, cfg.task.label_smoothing, dict(cfg.task.mixup)) == ("deit", 0.1, {})
        assert (cfg.data.repeats, cfg.model.drop_path_rate, cfg.scheduler.warmup_epochs, cfg.optim.weight_decay) == (
            3, 0.1, 5, 0.05)  # DeiT: repeated augmentation, drop path 0.1, 5 warm-up epochs, wd 0.05
        assert cfg.task.distill.teacher.name == "regnety_160"
    bad = load_config(["recipe=lpvit_deit_s", "data.path=/data/train", "task.distill={teacher:{kind:timm,name:x},alpha:2}"])
    with pytest.raises(UserError, match=r"^task.distill.alpha must be in \[0, 1\], got 2"):  # before anything loads
        validate_config(bad)
