"""The image classification task's training options: DeiT augmentation with its un-augmented evaluation and
calibration view, repeated augmentation (data), drop path (model), timm Mixup with soft targets, and distillation
from a frozen teacher, onto a distillation token's head where the student has one; bad options are one UserError."""
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
    assert not {"RandAugment", "RandomErasing"} & set(val) and {"Resize", "CenterCrop"} <= set(val)
    assert deit.calibration.dataset is deit.val.dataset and deit.calibration.indices == deit.train.indices
    assert deit.train[0][0].shape == deit.val[0][0].shape == (3, 32, 32)
    plain = build_datasets(cfg, seed=0)
    assert not {"RandAugment", "RandomErasing"} & set(_steps(plain.train.dataset.transform))
    assert plain.val.indices == deit.val.indices
    with pytest.raises(UserError, match=r"data.augment=deit needs .* data.image_size \(got None\)"):
        build_datasets({**cfg, "augment": "deit", "image_size": None})


def test_calibration_reads_the_training_images_without_augmentation(tmp_path):
    from blocktrain.trainer.compression.calibration import calibration_batches

    write_image_folder(tmp_path / "train", per_class=4, size=(40, 40))
    cfg = {"kind": "image_folder", "path": str(tmp_path / "train"), "image_size": 32, "batch_size": 4,
           "val_fraction": 0.25}
    deit = build_datasets({**cfg, "augment": "deit"}, seed=0)
    torch.manual_seed(0)
    first, again = (calibration_batches(deit, 6, 4, seed=5) for _ in range(2))
    for (x, y), (x2, y2) in zip(first, again):  # augmented images would differ between the two draws
        torch.testing.assert_close(x, x2, rtol=0, atol=0)
        assert torch.equal(y, y2)
    i = deit.train.indices[0]  # the calibration view is the training image i through the evaluation transform
    torch.testing.assert_close(deit.calibration[0][0], deit.val.dataset.transform(deit.val.dataset.loader(
        deit.val.dataset.samples[i][0])), rtol=0, atol=0)
    assert not torch.equal(deit.train[0][0], deit.train[0][0])  # while training images are augmented anew
    plain = build_datasets(cfg, seed=0)  # no augmentation: the view is the training data itself
    assert torch.equal(plain.calibration[2][0], plain.train[2][0])
    ordered = [plain.calibration[int(i)] for i in torch.randperm(9, generator=torch.Generator().manual_seed(5))[:4]]
    torch.testing.assert_close(calibration_batches(plain, 4, 4, seed=5)[0][0], torch.stack([x for x, _ in ordered]))


def test_repeated_augmentation_and_drop_path_options(tmp_path):
    from blocktrain.trainer.data_module import RunDataModule
    from blocktrain.trainer.sources.config import validate_model_config
    from blocktrain.trainer.sources.models import load_model

    write_image_folder(tmp_path / "train", per_class=4, size=(40, 40))
    cfg = {"kind": "image_folder", "path": str(tmp_path / "train"), "image_size": 32, "batch_size": 3,
           "val_fraction": 0.25}
    with pytest.raises(UserError, match=r"^data.repeats=3 repeats each training image .* data.augment=none has none"):
        build_datasets({**cfg, "repeats": 3})
    with pytest.raises(UserError, match=r"^data.repeats must be a positive number, got 0"):
        build_datasets({**cfg, "augment": "deit", "repeats": 0})
    data = build_datasets({**cfg, "augment": "deit", "repeats": 3}, seed=0)
    module = RunDataModule(data, 3, None, 0, seed=0, repeats=3)
    loader = module.train_dataloader()
    order = list(loader.sampler)
    assert order[0] == order[1] == order[2] != order[3] and len(order) == len(data.train)
    images, labels = next(iter(loader))
    assert labels.unique().numel() == 1 and not torch.equal(images[0], images[1])  # one image, three augmentations

    timm_cfg = {"kind": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "num_classes": 3,
                "kwargs": {"img_size": 32, "depth": 3}}
    model = load_model({**timm_cfg, "drop_path_rate": 0.1}).model
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])  # timm's linear rule up to the rate
    with pytest.raises(UserError, match=r"^model.drop_path_rate must be a number in \[0, 1\), got 1.5"):
        validate_model_config({**timm_cfg, "drop_path_rate": 1.5})
    with pytest.raises(UserError, match=r"^model.drop_path_rate and model.kwargs.drop_path_rate are both set"):
        load_model({**timm_cfg, "drop_path_rate": 0.1, "kwargs": {"img_size": 32, "drop_path_rate": 0.2}})


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


def _distilled_student():
    import timm

    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=1,
                             num_classes=3).train()


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_token_takes_the_teacher_term_and_evaluation_averages_the_heads(kind):
    student = _distilled_student()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    task = _task(distill={"teacher": TEACHER, "alpha": 0.5, "tau": 2.0, "type": kind})
    task.setup(student, None)
    assert task.token is student
    loss = task.loss(student, (images, labels))
    assert student.distilled_training is False  # switched on for the loss only
    student.set_distilled_training(True)
    cls, dist = student(images)
    student.set_distilled_training(False)
    with torch.no_grad():
        teacher = task.teacher(images)
    base = F.cross_entropy(cls, labels)
    torch.testing.assert_close(loss, distillation_loss(dist, teacher, base, 0.5, 2.0, kind))
    assert not torch.allclose(loss, distillation_loss((cls + dist) / 2, teacher, F.cross_entropy((cls + dist) / 2, labels),
                                                      0.5, 2.0, kind))
    loss.backward()
    assert student.head.weight.grad.abs().sum() > 0 and student.head_dist.weight.grad.abs().sum() > 0
    torch.testing.assert_close(student.eval()(images), (cls + dist) / 2)  # evaluation: the mean of the two heads
    sums = task.eval_sums(student, (images, labels))
    assert sums["acc"] == ((((cls + dist) / 2).argmax(-1) == labels).sum().item(), 4)


def test_distillation_token_switch():
    student, images, labels = _distilled_student(), torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    single = _task(distill={"teacher": TEACHER, "alpha": 0.5, "token": False})
    single.setup(student, None)
    mean = student(images)  # timm's training forward without the token switched on: the mean of the heads
    with torch.no_grad():
        teacher = single.teacher(images)
    torch.testing.assert_close(single.loss(student, (images, labels)),
                               distillation_loss(mean, teacher, F.cross_entropy(mean, labels), 0.5, 1.0))
    with pytest.raises(UserError, match=r"^task.distill.token=true but the student \(VisionTransformer\) has no "):
        _task(distill={"teacher": TEACHER, "token": True}).setup(tiny_timm_vit(num_classes=3), None)
