"""Units of the plugin contract: stage lists, plugin combinations, loss terms, parameter groups, EMA, media."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.plugin import Plugin
from blocktrain.trainer.stages import metric_prefix, parse_stages
from blocktrain.trainer.validation import check_combination


def test_stages_keep_the_recipe_order_names_and_settings():
    stages = parse_stages(OmegaConf.create(["calibrate", {"fit": {"name": "finetune", "max_steps": 20}}, "evaluate",
                                            {"fit": None}, "export"]))
    assert [(s.kind, s.name) for s in stages] == [("calibrate", "calibrate"), ("fit", "finetune"),
                                                  ("evaluate", "evaluate"), ("fit", "fit"), ("export", "export")]
    assert stages[1].settings == {"max_steps": 20} and stages[3].settings == {}
    assert metric_prefix(stages[1]) == "finetune/" and metric_prefix(stages[3]) == ""


@pytest.mark.parametrize("stages,message", [
    (["fit", "fit"], "stage name 'fit' is used twice"),
    (["fit", "train"], "unknown stage 'train'. Valid stages: fit, calibrate, evaluate, sample, export"),
    ("fit", "stages must be a list"),
    ([{"fit": 3}], "the settings of stage fit must be a mapping"),
    ([{"fit": {}, "evaluate": {}}], "a stage is a kind or"),
])
def test_stage_mistakes_get_one_message(stages, message):
    with pytest.raises(UserError, match=message):
        parse_stages(stages)


class _Stub(Plugin):
    def __init__(self, name, kind="", requires=(), conflicts=()):
        self.name, self.kind, self.requires, self.conflicts = name, kind, requires, conflicts


def test_requires_and_conflicts_by_name_or_kind():
    pruner, quant = _Stub("wanda", "prune", conflicts=("prune",)), _Stub("cbq", "quantize", requires=("prune",))
    check_combination(quant, [pruner], [])
    with pytest.raises(UserError, match="plugin cbq needs a 'prune' plugin before it"):
        check_combination(quant, [], [pruner])
    with pytest.raises(UserError, match=r"plugin wanda cannot be combined with icbs \(another prune plugin\)"):
        check_combination(pruner, [], [_Stub("icbs", "prune")])
    check_combination(pruner, [], [quant])


def test_loss_terms_are_named_summed_and_the_task_can_be_replaced():
    from blocktrain.trainer.module import RunModule

    class Task:
        def loss(self, model, batch):
            return torch.tensor(1.0)

    class Aux(Plugin):
        name = "aux"

        def loss(self, model, batch, run):
            return {"a": torch.tensor(2.0), "b": torch.tensor(3.0)}

    class Whole(Plugin):
        name = "whole"
        replaces_task_loss = True

        def loss(self, model, batch, run):
            return torch.tensor(5.0)

    model = torch.nn.Linear(2, 2)
    terms = RunModule(model, Task(), [Aux(None)], None, None, None).loss_terms(None)
    assert {k: float(v) for k, v in terms.items()} == {"aux/a": 2.0, "aux/b": 3.0, "task": 1.0}
    terms = RunModule(model, Task(), [Aux(None), Whole(None)], None, None, None).loss_terms(None)
    assert {k: float(v) for k, v in terms.items()} == {"aux/a": 2.0, "aux/b": 3.0, "whole": 5.0}
    with pytest.raises(UserError, match="no objective"):
        RunModule(model, None, [], None, None, None).loss_terms(None)


def test_parameter_groups_take_their_settings_and_the_rest_the_presets():
    from blocktrain.trainer.optim import build_optimizer, param_groups

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].bias.requires_grad = False
    groups = param_groups(model, [{"params": [model[1].weight, model[1].bias], "lr": 0.5, "weight_decay": 0.0}])
    opt = build_optimizer(OmegaConf.create({"_target_": "torch.optim.AdamW", "lr": 0.01}), groups)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]  # frozen bias dropped
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.5] and opt.param_groups[1]["weight_decay"] == 0.0
    with pytest.raises(UserError, match="in two plugin parameter groups"):
        param_groups(model, [{"params": [model[0].weight]}, {"params": [model[0].weight]}])


def test_ema_averages_after_each_step_and_swaps_in_and_out():
    from blocktrain.trainer.ema import EMA

    model = torch.nn.Linear(3, 1)
    model.bias.requires_grad = False
    ema = EMA(model, decay=0.75)
    trainer = SimpleNamespace(global_step=0)
    ema.on_fit_start(trainer, None)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.on_train_batch_end(trainer, None, None, None, 0)  # an accumulated micro-batch: no step, no update
    assert torch.equal(ema.shadow["weight"], start)
    trainer.global_step = 1
    ema.on_train_batch_end(trainer, None, None, None, 0)
    ema.on_train_batch_end(trainer, None, None, None, 1)  # the same step again: once only
    assert set(ema.shadow) == {"weight"}  # only trainable parameters
    assert torch.allclose(ema.shadow["weight"], start + 1.0)  # 0.75 * w0 + 0.25 * (w0 + 4)
    with ema.swapped():
        with ema.swapped():  # nested: still the average, restored once
            assert torch.allclose(model.weight, start + 1.0)
        assert torch.allclose(model.weight, start + 1.0)
    assert torch.allclose(model.weight, start + 4.0)
    restored = EMA(model, decay=0.75)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_media_are_written_as_png_text_and_csv(tmp_path):
    from PIL import Image

    from blocktrain.trainer.media import Table, write_media

    batch = torch.zeros(5, 3, 4, 6)
    batch[2] = 1.0
    png, _ = write_media(tmp_path, "samples/grid", batch, 7)
    image = Image.open(png)
    assert png.name == "samples_grid_step7.png" and image.size == (3 * 6, 2 * 4)  # 3 columns, 2 rows
    assert image.getpixel((2 * 6, 0)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 0, 0)
    txt, _ = write_media(tmp_path, "texts", ["one", "two"], 0)
    assert txt.read_text() == "one\n\ntwo\n"
    csv_path, _ = write_media(tmp_path, "table", Table(["a", "b"], [[1, "x"]]), 0)
    assert csv_path.read_text().splitlines() == ["a,b", "1,x"]
    with pytest.raises(UserError, match="cannot log 'bad' as media"):
        write_media(tmp_path, "bad", {"x": 1}, 0)


def test_per_sample_losses_average_to_the_task_loss():
    from blocktrain.trainer.tasks import ImageClassificationTaskConfig
    from blocktrain.trainer.tasks.classification import ImageClassificationTask, SequenceClassificationTask
    from blocktrain.trainer.tasks.language import CausalLMTask
    from blocktrain.trainer.testing import tiny_bert_classifier, tiny_llama, tiny_timm_vit

    torch.manual_seed(0)
    ids = torch.randint(3, 60, (4, 9))
    cases = [(CausalLMTask(None, {}), tiny_llama(64).eval(), {"input_ids": ids}),
             (SequenceClassificationTask(None, {}), tiny_bert_classifier(64).eval(),
              {"input_ids": ids, "labels": torch.tensor([0, 2, 1, 0])}),
             (ImageClassificationTask(ImageClassificationTaskConfig(), {}), tiny_timm_vit(num_classes=3).eval(),
              (torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 0])))]
    for task, model, batch in cases:
        per_sample = task.per_sample_loss(model, batch)
        assert task.has_per_sample_loss and per_sample.shape == (4,)
        torch.testing.assert_close(per_sample.mean(), task.loss(model, batch).float(), rtol=1e-5, atol=1e-6)
        assert per_sample.std() > 0  # one value per sample, not the batch mean repeated
