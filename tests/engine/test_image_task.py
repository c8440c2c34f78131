"""The image classification task's training options: DeiT augmentation (data), timm Mixup with soft targets, and
distillation from a frozen teacher; bad options are one UserError."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.sources.data import build_datasets
from blocktrain.trainer.tasks import build_task
from blocktrain.trainer.tasks.classification import distillation_loss
from blocktrain.trainer.testing import tiny_timm_vit, write_image_folder

TEACHER = {"kind": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "num_classes": 3,
           "kwargs": {"img_size": 32, "depth": 1}}


def _steps(transform) -> list[str]:
    """Class names of every step of a (nested) Compose."""
    out = []
    for step in getattr(transform, "transforms", [transform]):
        out += _steps(step) if hasattr(step, "transforms") and not hasattr(step, "ops") else [type(step).__name__]
    return out


@pytest.mark.parametrize("kind", ["image_folder", "torchvision"])
def test_deit_augmentation_on_the_train_split_only(tmp_path, kind):
    write_image_folder(tmp_path / "train", per_class=4, size=(40, 40))
    base = ({"kind": "image_folder", "path": str(tmp_path / "train")} if kind == "image_folder" else
            {"kind": "torchvision", "name": "FakeData", "val_split": None, "channels": 3,
             "kwargs": {"size": 12, "image_size": [3, 40, 40], "num_classes": 3}})
    cfg = {**base, "image_size": 32, "batch_size": 4, "val_fraction": 0.25}
    deit = build_datasets({**cfg, "augment": "deit"}, seed=0)
    train, val = _steps(deit.train.dataset.transform), _steps(deit.val.dataset.transform)
    assert {"RandAugment", "RandomErasing", "RandomResizedCropAndInterpolation"} <= set(train)
    assert not {"RandAugment", "RandomErasing"} & set(val) and "Resize" in val
    assert deit.train[0][0].shape == deit.val[0][0].shape == (3, 32, 32)
    plain = build_datasets(cfg, seed=0)
    assert not {"RandAugment", "RandomErasing"} & set(_steps(plain.train.dataset.transform))
    assert plain.val.indices == deit.val.indices
    with pytest.raises(UserError, match=r"data.augment=deit needs .* data.image_size \(got None\)"):
        build_datasets({**cfg, "augment": "deit", "image_size": None})


def _task(**options):
    return build_task({"kind": "image_classification", **options}, {"num_labels": 3})


def test_mixup_gives_soft_targets_and_soft_target_cross_entropy():
    model = tiny_timm_vit(num_classes=3)
    task = _task(label_smoothing=0.1, mixup={"cutmix_alpha": 0.0})
    task.setup(model, None)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    np.random.seed(3)
    loss = task.loss(model, (images.clone(), labels))
    np.random.seed(3)
    mixed, targets = task.mixup(images.clone(), labels)
    smooth = torch.full((4, 3), 0.1 / 3) + 0.9 * F.one_hot(labels, 3)
    lam = float((targets - smooth.flip(0))[0, 0] / (smooth - smooth.flip(0))[0, 0])
    assert 0 < lam < 1 and targets.shape == (4, 3)
    torch.testing.assert_close(targets, lam * smooth + (1 - lam) * smooth.flip(0))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    by_hand = -(targets * F.log_softmax(model(mixed), -1)).sum(-1).mean()
    torch.testing.assert_close(loss, by_hand)
    assert not torch.allclose(loss, F.cross_entropy(model(images), labels, label_smoothing=0.1))
    assert task.loss(model, (images[:3], labels[:3])).isfinite()  # an odd batch drops its last sample


def test_distillation_loss_is_the_formula():
    torch.manual_seed(0)
    student, teacher, base = torch.randn(5, 4), torch.randn(5, 4), torch.tensor(1.7)
    alpha, tau = 0.3, 2.0
    p = F.softmax(teacher / tau, -1)
    kl = (p * (p.log() - F.log_softmax(student / tau, -1))).sum(-1).mean()
    expected = (1 - alpha) * base + alpha * tau ** 2 * kl
    torch.testing.assert_close(distillation_loss(student, teacher, base, alpha, tau), expected)
    torch.testing.assert_close(distillation_loss(student, teacher, base, alpha, tau, reduction="numel"),
                               (1 - alpha) * base + alpha * tau ** 2 * kl / 4)
    hard = F.cross_entropy(student, teacher.argmax(-1))
    torch.testing.assert_close(distillation_loss(student, teacher, base, alpha, tau, "hard"),
                               (1 - alpha) * base + alpha * hard)


def test_distillation_through_the_task_with_a_frozen_teacher():
    model = tiny_timm_vit(num_classes=3).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    off = _task(distill={"teacher": TEACHER, "alpha": 0.0})
    off.setup(model, None)
    torch.testing.assert_close(off.loss(model, (images, labels)), F.cross_entropy(model(images), labels))
    task = _task(distill={"teacher": TEACHER, "alpha": 0.5, "tau": 1.0})
    task.setup(model, None)
    teacher = task.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss = task.loss(model, (images, labels))
    with torch.no_grad():
        t = teacher(images)
    s = model(images)
    expected = 0.5 * F.cross_entropy(s, labels) + 0.5 * F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1),
                                                                  reduction="batchmean")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bad_distillation_options_are_one_clear_error():
    with pytest.raises(UserError, match=r"^task.distill.alpha must be in \[0, 1\], got 1.5$"):
        _task(distill={"teacher": TEACHER, "alpha": 1.5})
    with pytest.raises(UserError, match=r"task.distill.tau must be > 0, got 0.0; task.distill.type must be soft or hard"):
        _task(distill={"teacher": TEACHER, "tau": 0.0, "type": "medium"})
    with pytest.raises(UserError, match=r"^task.distill.teacher \(a model config\): unknown key 'model.depth'"):
        _task(distill={"teacher": {**TEACHER, "depth": 1}})
    task = _task(distill={"teacher": {**TEACHER, "num_classes": 5}})
    with pytest.raises(UserError, match=r"^task.distill.teacher has 5 classes but the student has 3"):
        task.setup(tiny_timm_vit(num_classes=3), None)
