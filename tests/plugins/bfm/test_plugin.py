"""The generative plugins in runs: the idx data kind, the recipes end to end from the CLI, resume inside the FRN
phase, one clear message per bad input, and the Fréchet distance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blocktrain.trainer.cli import load_config
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.generative.data import read_idx, write_idx
from blocktrain.trainer.run import RunInterrupted, run
from blocktrain.trainer.sources.data import build_datasets
from tests.helpers import interrupt_at, read_metrics, train
from tests.plugins.bfm.tiny import tiny_args, write_tiny_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory) -> Path:
    return write_tiny_idx(tmp_path_factory.mktemp("fashion"))


# -- data --------------------------------------------------------------------------------------------
def test_idx_roundtrip_and_data_kind(idx_root, tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), a) and np.array_equal(read_idx(tmp_path / "a"), a)

    data = build_datasets({"kind": "idx_images", "root": str(idx_root), "batch_size": 8})
    x, y = data.train[3]
    raw = read_idx(idx_root / "train-images-idx3-ubyte.gz")[3]
    assert x.shape == (1, 32, 32) and y == 3 and len(data.train) == 48 and len(data.val) == 16
    assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(raw.astype(np.float32) / 127.5 - 1))
    assert (x[0, :2] == -1).all() and x.min() >= -1 and x.max() <= 1
    assert data.info["num_labels"] == 10 and data.info["class_names"][9] == "Ankle boot"

    native = build_datasets({"kind": "idx_images", "root": str(idx_root), "pad_to": None, "max_train": 10,
                             "val_images": None, "batch_size": 8})
    assert native.train[0][0].shape == (1, 28, 28) and len(native.train) == 10 and native.val is None


def test_idx_errors(idx_root, tmp_path):
    with pytest.raises(UserError, match="data.root \\+ data.train_images.*dataset-fashion-mnist"):
        build_datasets({"kind": "idx_images", "root": str(tmp_path), "batch_size": 8})
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    with pytest.raises(UserError, match="data.pad_to=20"):
        build_datasets({"kind": "idx_images", "root": str(idx_root), "pad_to": 20, "batch_size": 8})


@pytest.mark.skipif(not (DEBIAN / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)")
def test_debian_fashion_mnist():
    data = build_datasets({"kind": "idx_images", "batch_size": 8, "max_train": 100})
    assert len(data.val) == 10000 and data.train[0][0].shape == (1, 32, 32)
    assert torch.bincount(data.val.tensors[1]).tolist() == [1000] * 10


# -- runs --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("recipe, plugin", [("fm_fashion", "flow_matching"), ("bfm_fashion", "bfm")])
def test_recipe_end_to_end_from_the_cli(recipe, plugin, idx_root, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(plugin, idx_root, tmp_path / "cache")
    steps = 8 if plugin == "bfm" else 4  # bfm: 2 steps per segment, so the FRN sampler has FRN steps
    result = train(f"recipe={recipe}", *args, f"plugin.{plugin}.sampler.steps={steps}", f"run_dir={run_dir}",
                   OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    m = read_metrics(run_dir)
    assert m["status"] == "finished"
    v = m["metrics"]
    assert v[f"{plugin}/sample/nfe"] == steps and v["val/fm_loss"] > 0
    assert v["fd/steps4"] > 0 and "kid/steps4" in v and v["nfe/steps4"] == 4 and v["gflops/steps4"] > 0
    assert 0 <= v["acc/steps4"] <= 1 and 0 <= v["acc/real"] <= 1  # the small CNN, trained once and cached
    assert len(list((tmp_path / "cache").glob("classifier_*.pt"))) == 1
    media = {p.name for p in (run_dir / "media").iterdir()}
    assert f"{plugin}_sample_samples_step2.png" in media and any(n.startswith(f"{plugin}_quality_vs_nfe") for n in media)
    assert list(run_dir.glob("wandb/offline-run-*"))  # logged to W&B (offline) as well
    if plugin == "bfm":
        assert "frn/val/fm_loss" in v and f"{plugin}_sample_frn_samples_step2.png" in media
        full, frn = v["bfm/sample/gflops_per_sample"], v["bfm/sample_frn/gflops_per_sample"]
        assert frn < full  # after each segment's first step the 1-block FRN replaces the 3-block trunk
        assert v["bfm/sample_frn/nfe"] == steps


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in torch.load(ckpt, weights_only=False)["state_dict"].items()}


@pytest.mark.slow
def test_resume_in_the_frn_phase_keeps_stage_one_weights(idx_root, tmp_path):
    base = ["recipe=bfm_fashion", *tiny_args("bfm", idx_root, tmp_path / "cache"), "logger=none", "ema.decay=null",
            "plugin.bfm.encoder=null", "trainer.max_steps=3", "stages=[fit,{fit:{name:frn,max_steps:3}}]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(load_config([*base, f"run_dir={straight}"]))
    with pytest.raises(RunInterrupted):
        run(load_config([*base, f"run_dir={resumed}"]), extra_callbacks=[interrupt_at(1, "frn/")])
    run(load_config([*base, f"run_dir={resumed}", "resume=auto"]))
    stage1 = _weights(straight / "checkpoints" / "last.ckpt")
    for folder in (straight, resumed):
        final = _weights(folder / "checkpoints" / "frn" / "last.ckpt")
        for name, value in final.items():
            if name.startswith("frn_"):
                assert not torch.equal(value, stage1[name]), name  # the FRN trained in phase 2
            else:
                assert torch.equal(value, stage1[name]), name  # everything else bit-identical
    expected, got = _weights(straight / "checkpoints" / "frn" / "last.ckpt"), _weights(resumed / "checkpoints" / "frn" / "last.ckpt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # resume equals the straight run


@pytest.mark.parametrize("override, message", [
    (["plugin.bfm.sampler.steps=6"], "plugin.bfm.sampler.steps=6 is not a multiple of model.segments=4"),
    (["plugin.bfm.eval.steps=[4,10]"], "plugin.bfm.eval.steps=10 is not a multiple of model.segments=4"),
    (["plugin.bfm.encoder.input_size=96"], "6x6 feature grid cannot be pooled to the trunk's 8x8 token grid"),
    (["model.align_dim=64"], "model.align_dim=64: set model.align_dim=112"),
    (["model.kind=sit"], "unknown key 'model.segments' for model kind 'sit'"),
])
def test_bad_input_gets_one_clear_message(override, message, idx_root, tmp_path):
    cfg = load_config(["recipe=bfm_fashion", *tiny_args("bfm", idx_root, tmp_path / "cache"), "logger=none",
                       f"run_dir={tmp_path / 'run'}", *override])
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(")", "\\)")):
        run(cfg)


@pytest.mark.slow  # a CLI process
def test_wrong_channel_count_from_the_cli(idx_root, tmp_path):
    result = train("recipe=fm_fashion", *tiny_args("flow_matching", idx_root, tmp_path / "cache"), "model.channels=3",
                   f"run_dir={tmp_path / 'run'}", "logger=none")
    assert result.returncode != 0 and "the data has 1 image channels but model.channels=3" in result.stderr
    assert "Traceback" not in result.stderr


def test_imagenet_recipe_validates():
    result = train("recipe=bfm_imagenet256", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sd-vae-ft-ema" in result.stdout and "segment_depth: 5" in result.stdout


# -- Fréchet distance ----------------------------------------------------------------------------------
def test_frechet_distance_of_a_split_against_itself_and_noise(idx_root):
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch is not installed")
    from blocktrain.trainer.generative.config import EncoderConfig
    from blocktrain.trainer.generative.encoders import build_encoder
    from blocktrain.trainer.generative.metrics import extract, frechet_distance, kernel_inception_distance

    try:
        features = build_encoder(EncoderConfig(input_size=32), pooled=True)
    except UserError as e:
        pytest.skip(f"EfficientNet-Lite0 weights unavailable: {e}")
    images = build_datasets({"kind": "idx_images", "root": str(idx_root), "batch_size": 8}).train.tensors[0]
    real = extract(features, images.split(16))
    noise = extract(features, torch.rand_like(images).mul(2).sub(1).split(16))
    same, apart = frechet_distance(real, real), frechet_distance(real, noise)
    assert real.shape == (48, 1280)
    assert abs(same) < 1e-3 * apart and apart > 1.0
    assert kernel_inception_distance(real, noise, subset_size=20) > kernel_inception_distance(real, real, subset_size=20)


# -- latents ------------------------------------------------------------------------------------------
@pytest.mark.slow  # importing diffusers dominates
def test_training_and_sampling_on_vae_latents(tmp_path):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from blocktrain.plugins.bfm.plugin import FlowMatchingConfig, FlowMatchingPlugin
    from blocktrain.trainer.generative.config import SamplerConfig
    from blocktrain.trainer.generative.models import SiT

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    plugin = FlowMatchingPlugin(FlowMatchingConfig(vae=str(tmp_path / "vae"), sampler=SamplerConfig(steps=2)))
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    model = plugin.apply(SiT(8, 4, 2, 32, 1, 4, num_classes=3), SimpleNamespace(data=SimpleNamespace(train=[(images[0], 0)])))
    x, _ = plugin.inputs((images, torch.zeros(4, dtype=torch.long)))
    assert x.shape == (4, 4, 8, 8)  # 2x down, 4 latent channels
    assert torch.isfinite(plugin.loss(model, (images, torch.tensor([0, 1, 2, 0])), None))
    out = plugin.generate(model, plugin.config.sampler, 2, "cpu")
    assert out.images.shape == (2, 3, 16, 16) and out.nfe == 2 and out.flops_per_sample > 0
    with pytest.raises(UserError, match="the data has 4 latent channels .* but model.channels=1"):
        plugin.apply(SiT(8, 1, 2, 32, 1, 4), SimpleNamespace(data=SimpleNamespace(train=[(images[0], 0)])))
    with pytest.raises(UserError, match="(?s)cannot load the VAE .plugin vae. .*missing.*save_pretrained"):
        FlowMatchingPlugin(FlowMatchingConfig(vae=str(tmp_path / "missing"))).apply(
            SiT(8, 4, 2, 32, 1, 4), SimpleNamespace(data=SimpleNamespace(train=[(images[0], 0)])))


def test_dinov2_encoder_gives_patch_tokens_on_the_trunk_grid(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from blocktrain.trainer.generative.config import EncoderConfig
    from blocktrain.trainer.generative.encoders import build_encoder, feature_tokens

    torch.manual_seed(0)
    net = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   patch_size=4, image_size=32)).eval()
    net.save_pretrained(tmp_path / "dino")
    encoder = build_encoder(EncoderConfig(kind="dinov2", id=str(tmp_path / "dino"), input_size=32))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    fmap = encoder(x)
    assert fmap.shape == (2, 32, 8, 8) and encoder.num_features == 32
    rgb = ((x.expand(-1, 3, -1, -1) + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net(pixel_values=rgb).last_hidden_state[:, 1:]  # CLS dropped
    torch.testing.assert_close(feature_tokens(fmap, 8), expected, rtol=1e-4, atol=1e-5)
    assert feature_tokens(fmap, 4).shape == (2, 16, 32)
    with pytest.raises(UserError, match="8x8 feature grid cannot be pooled to the trunk's 3x3"):
        feature_tokens(fmap, 3)
    with pytest.raises(UserError, match="encoder id"):
        build_encoder(EncoderConfig(kind="dinov2", id=str(tmp_path / "missing")))
