"""Block-LoRA on CLIP: parameter counts at ViT-B/16 size, tower and layer selection, our LoRA vs PEFT's."""
import copy
import logging

import pytest
import torch

from blocktrain.plugins.blocklora import apply_block_lora, block_lora_layers, clip_towers, count_parameters
from blocktrain.plugins.lora import apply_lora, lora_layers
from blocktrain.trainer.errors import UserError

QKV = ["q_proj", "k_proj", "v_proj"]


def vit_b16_config():
    """OpenAI CLIP ViT-B/16's shapes (random weights, nothing downloaded)."""
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                       num_hidden_layers=12),
                      vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                         num_hidden_layers=12, patch_size=16, image_size=224),
                      projection_dim=512)


def meta_vit_b16():
    """ViT-B/16 CLIP on the meta device: real module shapes, no memory, built in milliseconds."""
    from transformers import CLIPModel

    with torch.device("meta"):
        return CLIPModel(vit_b16_config())


def tiny_clip_config(vision_hidden=48, vision_layers=3, text_layers=2):
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=2,
                                       num_hidden_layers=text_layers, vocab_size=99, max_position_embeddings=16,
                                       bos_token_id=0, eos_token_id=2, pad_token_id=1),
                      vision_config=dict(hidden_size=vision_hidden, intermediate_size=37, num_attention_heads=2,
                                         num_hidden_layers=vision_layers, image_size=16, patch_size=8),
                      projection_dim=16)


def tiny_clip(**kwargs):
    """A tiny random ``CLIPModel`` (vision width 48, text width 32, both divisible by 8)."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(tiny_clip_config(**kwargs)).eval()


def clip_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 99, (3, 7), generator=g),
            "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def randomize(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def per_matrix(width, rank, n_blocks):
    """Trainable parameters of one adapted width×width matrix: out·r + r·in/n (both readings, spec §4)."""
    return width * rank + rank * width // n_blocks


# -- spec §7 and §9: the parameter-count unit test ------------------------------------------------------------


def test_lora_on_vit_b16_clip_trains_184320_parameters():
    model = apply_lora(meta_vit_b16(), targets=QKV, rank=2, alpha=1.0, scaling="sqrt_rank")
    assert len(lora_layers(model)) == 72
    assert count_parameters(model)[0] == 36 * 2 * (768 + 768) + 36 * 2 * (512 + 512) == 184_320


@pytest.mark.parametrize("mode, rank, n_blocks, expected", [
    ("tile_input", 2, 8, 103_680),  # spec: 36·(768·2 + 2·96) + 36·(512·2 + 2·64)
    ("sum_rank", 8, 8, 414_720),    # 36·(768·8 + 1·768) + 36·(512·8 + 1·512): A_s is (r/n, in)
    ("sum_rank", 2, 2, 138_240),    # 36·(768·2 + 1·768) + 36·(512·2 + 1·512)
])
def test_block_lora_on_vit_b16_clip_parameter_count(mode, rank, n_blocks, expected):
    """Both readings train out·r (B) + r·in/n (A_s) per matrix. Reading B cannot reach 103,680: at
    r = 2 it needs n | r, so n = 8 takes r = 8 (or n = 2 at r = 2)."""
    model = apply_block_lora(meta_vit_b16(), targets=QKV, rank=rank, n_blocks=n_blocks, mode=mode)
    layers = block_lora_layers(model)
    assert len(layers) == 72 and all(layer.variant.mode == mode for layer in layers.values())
    assert count_parameters(model)[0] == 36 * (per_matrix(768, rank, n_blocks) + per_matrix(512, rank, n_blocks))
    assert count_parameters(model)[0] == expected
    if mode == "tile_input":
        assert expected / 184_320 == pytest.approx(1 - 0.4375)  # −43.75 % vs CLIP-LoRA (spec §4)


def test_sum_rank_at_the_spec_rank_is_a_clear_error():
    with pytest.raises(UserError, match=r"n_blocks must divide rank: rank=2, n_blocks=8"):
        apply_block_lora(meta_vit_b16(), mode="sum_rank", rank=2, n_blocks=8)


# -- our LoRA equals PEFT's on a CLIPModel ---------------------------------------------------------------------


@pytest.mark.parametrize("scaling, rslora", [("sqrt_rank", True), ("rank", False)])
def test_our_lora_equals_peft_lora_on_clip(scaling, rslora):
    from peft import LoraConfig, get_peft_model

    base = tiny_clip()
    ours = apply_lora(copy.deepcopy(base), targets=QKV, rank=2, alpha=1.0, scaling=scaling)
    randomize(lora_layers(ours))
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=1.0, use_rslora=rslora, target_modules=QKV))
    peft_modules = dict(peft.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            target = peft_modules[f"base_model.model.{name}"]
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
            assert target.scaling["default"] == pytest.approx(layer.scaling)
    names = {n for n in lora_layers(ours)}
    assert {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, m in peft.named_modules()
            if n.endswith(".lora_A")} == names
    assert {n.split(".")[0] for n in names} == {"vision_model", "text_model"} and len(names) == 3 * (3 + 2)
    assert count_parameters(ours)[0] == peft.get_nb_trainable_parameters()[0]
    inputs = clip_inputs()
    want = peft.eval()(**inputs).logits_per_image
    got = ours(**inputs).logits_per_image
    assert not torch.allclose(got, base(**inputs).logits_per_image, atol=1e-4)  # the adapters do something
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- choosing the targets --------------------------------------------------------------------------------------


def names(tower, layers, projections=QKV, prefix=None):
    prefix = f"{tower}_model." if prefix is None else prefix
    return sorted(f"{prefix}encoder.layers.{i}.self_attn.{p}" for i in layers for p in projections)


@pytest.mark.parametrize("encoder, layers, targets, expected", [
    ("both", None, QKV, names("vision", range(3)) + names("text", range(2))),
    ("vision", None, QKV, names("vision", range(3))),
    ("text", None, [*QKV, "out_proj"], names("text", range(2), [*QKV, "out_proj"])),
    ("vision", [1, 3], QKV, names("vision", [1, 2])),
    ("both", [0, 1], ["v_proj"], names("vision", [0], ["v_proj"]) + names("text", [0], ["v_proj"])),
    ("text", [1, 5], r".*\.(q|v)_proj", names("text", [1], ["q_proj", "v_proj"])),
    ("both", [2, 3], r"vision_model\..*\.q_proj", names("vision", [2], ["q_proj"])),
])
def test_encoder_and_layers_pick_exactly_these_modules(encoder, layers, targets, expected):
    model = apply_block_lora(tiny_clip(), targets=targets, encoder=encoder, layers=layers)
    assert sorted(block_lora_layers(model)) == sorted(expected)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)


def test_vision_and_text_models_alone():
    from transformers import CLIPTextModel, CLIPVisionModel

    config = tiny_clip_config()
    vision, text = CLIPVisionModel(config.vision_config), CLIPTextModel(config.text_config)
    assert clip_towers(vision) == {"vision": [""]} and clip_towers(text) == {"text": [""]}
    assert clip_towers(tiny_clip()) == {"text": ["text_model"], "vision": ["vision_model"]}
    assert sorted(block_lora_layers(apply_block_lora(vision, layers=[2, 3]))) == names("", [2], prefix="")
    with pytest.raises(UserError, match="encoder=vision: CLIPTextModel has no vision tower"):
        apply_block_lora(text, encoder="vision")


def test_selection_errors_are_clear():
    with pytest.raises(UserError, match=r"layers \[2, 4\) selects no target of the text tower: its targets are "
                                        r"in layers 0..1"):
        apply_block_lora(tiny_clip(), layers=[2, 4])
    with pytest.raises(UserError, match=r"layers \[0, 2\): none of the targets lies in a numbered layer"):
        apply_block_lora(tiny_clip(), targets=["visual_projection"], layers=[0, 2])
    with pytest.raises(UserError, match=r"in_features 36 is not divisible by n_blocks 8"):
        apply_block_lora(tiny_clip(vision_hidden=36), n_blocks=8)
    with pytest.raises(UserError, match=r"target vision_model\.encoder\.layers\.0\.self_attn\.[qkv]_proj: "
                                        r"in_features 36"):
        apply_block_lora(tiny_clip(vision_hidden=36), n_blocks=8)
    model = tiny_clip(vision_hidden=36)
    apply_block_lora(model, encoder="text", n_blocks=8)  # only the text tower (width 32) is adapted
    assert len(block_lora_layers(model)) == 6
    apply_block_lora(tiny_clip(vision_hidden=36), mode="sum_rank", rank=8, n_blocks=8)  # B: n | r, any width
    with pytest.raises(UserError, match="target 'qq_proj' matches no nn.Linear"):
        apply_block_lora(tiny_clip(), targets=["qq_proj"])
    with pytest.raises(UserError, match="already has LoRA layers"):
        apply_block_lora(apply_block_lora(tiny_clip()))
    with pytest.raises(UserError, match="unknown Block-LoRA encoder 'image'"):
        apply_block_lora(tiny_clip(), encoder="image")


def test_other_models_ignore_encoder_with_a_log_line(caplog):
    from blocktrain.trainer.testing import tiny_bert_classifier, tiny_timm_vit

    with caplog.at_level(logging.INFO, logger="blocktrain.trainer.adapters"):
        model = apply_block_lora(tiny_bert_classifier(100), targets=["query", "value"], encoder="vision",
                                 layers=[1, 2], n_blocks=4)
    assert "BertForSequenceClassification is not a CLIP model" in caplog.text
    assert "encoder=vision is ignored" in caplog.text
    assert sorted(block_lora_layers(model)) == [f"bert.encoder.layer.1.attention.self.{p}" for p in ("query", "value")]
    vit = tiny_timm_vit()
    x = torch.randn(2, 3, 32, 32)
    y = vit(x)
    apply_block_lora(vit, targets=["qkv"], layers=[1, 20])
    assert sorted(block_lora_layers(vit)) == ["blocks.1.attn.qkv"]  # two blocks: 0 and 1
    torch.testing.assert_close(vit(x), y, rtol=0, atol=0)


@pytest.mark.skipif(__import__("importlib").util.find_spec("open_clip") is None,
                    reason="open_clip is not installed (its nn.MultiheadAttention split is tested on torch's own)")
def test_open_clip_attention_is_split_and_adapted():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8,
                                                         image_size=16),
                           text_cfg=dict(context_length=8, vocab_size=99, width=32, heads=2, layers=2)).eval()
    image, text = torch.randn(2, 3, 16, 16), torch.randint(1, 99, (3, 8))
    want = model(image, text)
    apply_block_lora(model, n_blocks=8, dropout=0.0)
    assert sorted(clip_towers(model)) == ["text", "vision"]
    assert len(block_lora_layers(model)) == 2 * 2 * 3
    for got, ref in zip(model(image, text), want):
        if torch.is_tensor(ref):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    fresh = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8,
                                                         image_size=16),
                           text_cfg=dict(context_length=8, vocab_size=99, width=32, heads=2, layers=2))
    chosen = sorted(block_lora_layers(apply_block_lora(fresh, encoder="vision", layers=[1, 2])))
    assert chosen == [f"visual.transformer.resblocks.1.attn.{p}" for p in ("k_proj", "q_proj", "v_proj")]
