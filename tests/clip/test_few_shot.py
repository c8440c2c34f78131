"""CLIP few-shot protocol: the K-shot sampler and pools of the few_shot data kind, and the clip_few_shot task's
logits, text features and chunking/checkpointing, on a tiny random CLIPModel built and saved locally."""
from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from blocktrain.trainer import cli
from blocktrain.trainer.errors import UserError
from blocktrain.trainer.clip import few_shot as few_shot_source
from blocktrain.trainer.clip.class_names import GENERIC_TEMPLATE, coop_class_names, imagenet_class_names, template_for
from blocktrain.trainer.sources.data import build_datasets
from blocktrain.trainer.clip.few_shot import augment_transform, eval_transform, hold_out, sample_shots
from blocktrain.trainer.clip.tiny_clip import save_tiny_clip
from blocktrain.trainer.tasks import build_task
from blocktrain.trainer.testing import write_food101, write_mnist_raw

NAMES = ["red", "green", "blue", "yellow"]


def write_folder(root: Path, counts: dict[str, int], size=(20, 26), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def few_shot(**overrides) -> dict:
    return {"kind": "few_shot", "batch_size": 4, "image_size": 16, **overrides}


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("few_shot_data")
    write_folder(root / "toys" / "train", {"cat": 7, "dog": 5, "fox": 9})
    write_folder(root / "toys" / "test", {"cat": 3, "dog": 4, "fox": 2}, seed=1)
    return root


# -- sampling ------------------------------------------------------------------------------------------------
def test_sampler_draws_exactly_k_per_class_and_repeats_with_the_seed():
    labels = [i % 5 for i in range(103)]
    names = [f"c{i}" for i in range(5)]
    picked = sample_shots(labels, names, 4, seed=3, what="t")
    assert [sum(labels[i] == c for i in picked) for c in range(5)] == [4] * 5
    assert len(set(picked)) == 20
    assert picked == sample_shots(labels, names, 4, seed=3, what="t")
    assert picked != sample_shots(labels, names, 4, seed=4, what="t")


def test_sampler_names_the_class_with_too_few_images():
    labels = [0] * 6 + [1] * 2 + [2] * 3
    with pytest.raises(UserError, match=r"class 'dog' has 2 training images, fewer than data.shots=3"):
        sample_shots(labels, ["cat", "dog", "fox"], 3, seed=0, what="t")


def test_folder_source_gives_k_shots_the_full_test_split_and_info(folder_root):
    data = build_datasets(few_shot(dataset="toys", root=str(folder_root), shots=4), seed=5)
    assert [data.train.labels.count(c) for c in range(3)] == [4, 4, 4]
    assert sorted(data.val.labels) == [0] * 3 + [1] * 4 + [2] * 2
    info = data.info
    assert info["class_names"] == ["cat", "dog", "fox"] and info["num_labels"] == 3
    assert info["templates"] == ["a photo of a {}."] and info["dataset"] == "toys" and info["shots"] == 4
    assert info["train_steps"] == 500 * 4 and info["sampling_seed"] == 5 and info["batch_size"] == 4
    image, label = data.train[0]
    assert image.shape == (3, 16, 16) and label == 0
    again = build_datasets(few_shot(dataset="toys", root=str(folder_root), shots=4), seed=5)
    other = build_datasets(few_shot(dataset="toys", root=str(folder_root), shots=4, sampling_seed=6), seed=5)
    assert again.train.pool.refs == data.train.pool.refs
    assert other.train.pool.refs != data.train.pool.refs


def test_too_few_images_is_one_clear_error(folder_root):
    with pytest.raises(UserError, match=r"data.dataset=toys: class 'dog' has 5 training images, fewer than "
                                        r"data.shots=6"):
        build_datasets(few_shot(dataset="toys", root=str(folder_root), shots=6))


def test_a_pool_smaller_than_a_batch_is_one_batch(folder_root):
    data = build_datasets(few_shot(dataset="toys", root=str(folder_root), shots=1, batch_size=32))
    assert len(data.train) == 3 and data.info["batch_size"] == 3


def test_max_test_keeps_a_fixed_subset(folder_root):
    a = build_datasets(few_shot(dataset="toys", root=str(folder_root), shots=1, max_test=5), seed=0)
    b = build_datasets(few_shot(dataset="toys", root=str(folder_root), shots=1, max_test=5), seed=9)
    assert len(a.val) == 5 and a.val.pool.refs == b.val.pool.refs


def test_imagenet_layout_with_a_class_names_file(tmp_path):
    wnids = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    write_folder(tmp_path / "imagenet" / "train", {w: 3 for w in wnids})
    write_folder(tmp_path / "imagenet" / "val", {w: 2 for w in wnids}, seed=1)
    names = tmp_path / "classnames.txt"
    names.write_text("".join(f"{w} {n}\n" for w, n in reversed(wnids.items())))
    data = build_datasets(few_shot(dataset="imagenet", root=str(tmp_path), shots=2, class_names_file=str(names)))
    assert data.info["class_names"] == ["tench", "goldfish", "great white shark"]
    assert len(data.train) == 6 and len(data.val) == 6


def test_imagenet_class_names_are_clip_s_curated_list_by_default(tmp_path):
    clip, torchvision = imagenet_class_names(), imagenet_class_names("torchvision")
    assert len(clip) == len(torchvision) == 1000 and clip[:2] == torchvision[:2] == ["tench", "goldfish"]
    # where torchvision's names are ambiguous or obscure, CLIP's curated list (CLIP-LoRA's) differs
    assert (clip[134], clip[517]) == ("crane bird", "construction crane") and torchvision[517] == "crane"
    assert (clip[638], clip[639]) == ("tights", "one-piece bathing suit")
    assert (torchvision[638], torchvision[639]) == ("maillot", "maillot tank suit")
    assert clip[21] == "kite (bird of prey)" and torchvision[21] == "kite"
    # through the data source: 1000 wnid folders get CLIP's names unless data.imagenet_names=torchvision
    wnids = [f"n{i:08d}" for i in range(1000)]
    png = tmp_path / "one.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(png)
    for split in ("train", "val"):
        for w in wnids:
            (tmp_path / "imagenet" / split / w).mkdir(parents=True)
            (tmp_path / "imagenet" / split / w / "0.png").write_bytes(png.read_bytes())
    base = few_shot(dataset="imagenet", root=str(tmp_path), shots=1, max_test=2)
    assert build_datasets(base).info["class_names"] == clip
    assert build_datasets({**base, "imagenet_names": "torchvision"}).info["class_names"] == torchvision


def test_coop_split_file_gives_its_train_and_test_lists_and_names(tmp_path):
    images = write_folder(tmp_path / "images", {"airplanes": 6, "Faces_easy": 6})
    rows = {split: [[f"{folder}/{i:03d}.png", label, name] for label, (folder, name) in
                    enumerate([("airplanes", "airplane"), ("Faces_easy", "face")]) for i in picks]
            for split, picks in {"train": range(0, 3), "val": range(3, 4), "test": range(4, 6)}.items()}
    split_file = tmp_path / "split_zhou_Caltech101.json"
    split_file.write_text(json.dumps(rows))
    base = few_shot(dataset="caltech101", path=str(images), split_file=str(split_file))
    data = build_datasets({**base, "shots": 3})
    assert data.info["class_names"] == ["airplane", "face"]
    assert data.info["templates"] == ["a photo of a {}."]
    pool = data.train.pool
    chosen = sorted(Path(pool.loaders[loader].paths[i]).name for loader, i in pool.refs)
    assert chosen == ["000.png", "000.png", "001.png", "001.png", "002.png", "002.png"]  # the train list only
    assert sorted(data.val.labels) == [0, 0, 1, 1] and len(data.val) == 4
    with pytest.raises(UserError, match="has 3 training images, fewer than data.shots=4"):
        build_datasets({**base, "shots": 4})
    assert len(build_datasets({**base, "shots": 4, "train_split": "train+val"}).train) == 8
    with pytest.raises(UserError, match=r"has no split 'trainval' \(it has: train, val, test\)"):
        build_datasets({**base, "shots": 1, "train_split": "trainval"})
    with pytest.raises(UserError, match="data.path must be the directory"):
        build_datasets({**base, "shots": 1, "path": str(tmp_path)})


def test_torchvision_source_with_coop_names_and_template(tmp_path):
    write_food101(tmp_path, classes=("apple_pie", "bibimbap", "club_sandwich"), per_split=3)
    data = build_datasets(few_shot(dataset="food101", root=str(tmp_path), download=False, shots=2))
    assert data.info["class_names"] == ["apple pie", "bibimbap", "club sandwich"]
    assert data.info["templates"] == ["a photo of {}, a type of food."]
    assert len(data.train) == 6 and len(data.val) == 9
    with pytest.raises(UserError, match="cannot open torchvision Food101"):
        build_datasets(few_shot(dataset="food101", root=str(tmp_path / "absent"), download=False, shots=2))


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_gzipped_fashion_mnist(directory: Path, n_train: int = 40, n_test: int = 20) -> Path:
    """Fake Fashion-MNIST as Debian's dataset-fashion-mnist lays it out: gzipped idx files in one folder."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(directory / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 0x803)
        _write_idx(directory / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x801)
    return directory


def test_idx_source_reads_fashion_mnist_files(tmp_path):
    write_gzipped_fashion_mnist(tmp_path)
    data = build_datasets(few_shot(dataset="fashion_mnist", path=str(tmp_path), shots=3, image_size=32))
    assert data.info["class_names"][0] == "T-shirt/top" and data.info["num_labels"] == 10
    assert len(data.train) == 30 and len(data.val) == 20 and data.train[0][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\(.gz\) not found in .*none \(data.path\)"):
        build_datasets(few_shot(dataset="fashion_mnist", path=str(tmp_path / "none"), shots=1))


@pytest.fixture
def no_debian_package(tmp_path, monkeypatch):
    """Debian's Fashion-MNIST folder pointed at an empty place, whatever this machine has installed."""
    monkeypatch.setattr(few_shot_source, "FASHION_MNIST_DIR", str(tmp_path / "no-debian-package"))


def offline_download(self):
    raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://mirror/, got:\n"
                       "<urlopen error [Errno -2] Name or service not known>\n")


def test_fashion_mnist_is_found_in_debian_s_folder(tmp_path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    debian = write_gzipped_fashion_mnist(tmp_path / "usr" / "share" / "datasets" / "fashion-mnist")
    monkeypatch.setattr(few_shot_source, "FASHION_MNIST_DIR", str(debian))
    monkeypatch.setattr(FashionMNIST, "download", offline_download)
    data = build_datasets(few_shot(dataset="fashion_mnist", root=str(tmp_path / "cache"), shots=2))
    assert len(data.train) == 20 and len(data.val) == 20 and data.info["class_names"][9] == "Ankle boot"
    assert not (tmp_path / "cache").exists()  # nothing downloaded


def test_fashion_mnist_is_downloaded_by_torchvision_without_debian_s_package(tmp_path, monkeypatch,
                                                                              no_debian_package):
    from torchvision.datasets import FashionMNIST

    calls = []

    def download(self):  # what torchvision's download leaves behind: idx files in root/FashionMNIST/raw
        calls.append(self.root)
        write_mnist_raw(Path(self.root), n_train=30, n_test=10)

    monkeypatch.setattr(FashionMNIST, "download", download)
    config = few_shot(dataset="fashion_mnist", root=str(tmp_path / "cache"), shots=3)
    data = build_datasets(config)
    assert calls == [str(tmp_path / "cache")] and len(data.train) == 30 and len(data.val) == 10
    monkeypatch.setattr(FashionMNIST, "download", offline_download)
    assert len(build_datasets(config).val) == 10  # the second time from torchvision's copy, offline


def test_fashion_mnist_nowhere_is_one_error_naming_both_ways(tmp_path, monkeypatch, no_debian_package):
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "download", offline_download)
    both_ways = r"Either .*`apt-get install -y dataset-fashion-mnist`.*data.download=true \(into .*FashionMNIST/raw\)$"
    with pytest.raises(UserError, match=r"^Fashion-MNIST not found \(the download failed: Error downloading "
                                        r"train-images-idx3-ubyte.gz: .*Name or service not known>\)\. " + both_ways):
        build_datasets(few_shot(dataset="fashion_mnist", root=str(tmp_path), shots=1))
    with pytest.raises(UserError, match=r"^Fashion-MNIST not found \(data.download=false\)\. " + both_ways):
        build_datasets(few_shot(dataset="fashion_mnist", root=str(tmp_path), shots=1, download=False))


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)")
def test_real_fashion_mnist_from_the_debian_package():
    data = build_datasets(few_shot(dataset="fashion_mnist", shots=2, image_size=28))
    assert len(data.train) == 20 and len(data.val) == 10_000
    assert sorted(data.train.labels) == sorted(list(range(10)) * 2)


def test_hold_out_is_per_class_disjoint_and_fixed():
    labels = [i % 3 for i in range(30)]
    train, test = hold_out(labels, 3, 0.3)
    assert not set(train) & set(test) and len(train) + len(test) == 30
    assert [sum(labels[i] == c for i in test) for c in range(3)] == [3, 3, 3]
    assert (train, test) == hold_out(labels, 3, 0.3)


def test_coop_class_names():
    assert coop_class_names("caltech101", ["Faces", "Faces_easy", "airplanes", "water_lilly"]) == \
        ["face", None, "airplane", "water lilly"]
    assert coop_class_names("stanford_cars", ["AM General Hummer SUV 2000"]) == ["2000 AM General Hummer SUV"]
    assert coop_class_names("sun397", ["apartment_building/outdoor", "abbey"]) == \
        ["outdoor apartment building", "abbey"]
    assert coop_class_names("eurosat", ["SeaLake", "AnnualCrop"]) == ["Sea or Lake", "Annual Crop Land"]
    assert coop_class_names("oxford_pets", ["American Bulldog"]) == ["american bulldog"]


def test_preprocessing_is_clip_lora_s():
    image = Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8))
    steps = [type(t).__name__ for t in augment_transform(224).transforms]
    assert steps == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    crop = augment_transform(224).transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation.value == "bicubic"
    resize, center = eval_transform(32).transforms[:2]
    assert resize.size == 32 and resize.interpolation.value == "bicubic"  # shortest side, aspect kept
    assert eval_transform(32)(image).shape == (3, 32, 32) and center.size == (32, 32)


# -- the task ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random CLIPModel and its word-level tokenizer, saved and loaded through the model source."""
    from blocktrain.trainer.sources.models import load_model

    templates = ["a photo of a {}.", "a {} texture.", template_for("flowers102")]
    path = save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), NAMES, templates, image_size=32, patch_size=8, width=32, layers=2, heads=2, projection_dim=16)
    loaded = load_model({"kind": "transformers", "id": str(path), "auto_class": "CLIPModel"})
    return loaded.model, loaded.tokenizer


def make_task(model, tokenizer, templates=("a photo of a {}.",), **config):
    task = build_task(OmegaConf.create({"kind": "clip_few_shot", **config}),
                      {"class_names": NAMES, "templates": list(templates)})
    task.setup(model, SimpleNamespace(tokenizer=tokenizer))
    return task


def _by_hand(model, tokenizer, prompts, images):
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    text = model.text_projection(model.text_model(**enc).pooler_output)
    image = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
    return image, text


def test_logits_are_100_cos_of_image_and_prompt_features(tiny):
    model, tokenizer = tiny
    task = make_task(model, tokenizer)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = task.logits(model, images, task.text_features(model, "train"))
        image, text = _by_hand(model, tokenizer, [f"a photo of a {n}." for n in NAMES], images)
    cos = (image @ text.T) / (image.norm(dim=-1, keepdim=True) * text.norm(dim=-1)[None])
    assert logits.shape == (3, 4)
    torch.testing.assert_close(logits, 100 * cos, rtol=1e-5, atol=1e-4)


def test_evaluation_ensembles_the_dataset_templates(tiny):
    model, tokenizer = tiny
    templates = ["a photo of a {}.", "a {} texture."]
    task = make_task(model, tokenizer, templates=templates)
    with torch.no_grad():
        got = task.text_features(model, "eval")
        units = [torch.nn.functional.normalize(_by_hand(model, tokenizer, [t.format(n) for n in NAMES],
                                                        torch.zeros(1, 3, 32, 32))[1], dim=-1) for t in templates]
    torch.testing.assert_close(got, torch.nn.functional.normalize(units[0] + units[1], dim=-1), rtol=1e-5, atol=1e-6)


def test_training_prompts_are_the_dataset_template_by_default_and_the_generic_one_on_request(tiny):
    model, tokenizer = tiny
    flowers = template_for("flowers102")
    assert flowers == "a photo of a {}, a type of flower."

    def ids(template):
        ids = tokenizer([template.format(n) for n in NAMES], padding=True, return_tensors="pt")["input_ids"]
        assert tokenizer.unk_token_id not in ids  # every word of the prompt is in the tiny vocabulary
        return ids

    task = make_task(model, tokenizer, templates=[flowers])
    assert task.train_template == flowers
    assert torch.equal(task.train_prompts[0], ids(flowers)) and torch.equal(task.eval_prompts[0][0], ids(flowers))
    generic = make_task(model, tokenizer, templates=[flowers], train_template=GENERIC_TEMPLATE)
    assert torch.equal(generic.train_prompts[0], ids("a photo of a {}."))
    assert torch.equal(generic.eval_prompts[0][0], ids(flowers))  # evaluation keeps the dataset's template


@pytest.mark.parametrize("recipe", ["blocklora_clip", "lora_clip", "blocklora_clip_demo"])
def test_clip_recipes_train_with_the_prompts_they_evaluate_with(recipe, tiny, folder_root, tmp_path):
    model, tokenizer = tiny
    flowers = write_folder(tmp_path / "flowers102" / "train", {n: 2 for n in NAMES}).parent
    write_folder(flowers / "test", {n: 1 for n in NAMES}, seed=1)
    cfg = cli.load_config([f"recipe={recipe}", "data.dataset=flowers102", "data.source=image_folder",
                           f"data.path={flowers}", "data.shots=1", "data.image_size=32"])
    assert cfg.task.train_template is None and cfg.data.imagenet_names == "clip"
    data = build_datasets(cfg.data)
    assert data.info["templates"] == ["a photo of a {}, a type of flower."]
    task = build_task(cfg.task, data.info)
    task.setup(model, SimpleNamespace(tokenizer=tokenizer))
    assert torch.equal(task.train_prompts[0], task.eval_prompts[0][0])
    assert torch.equal(task.train_prompts[0], tokenizer([f"a photo of a {n}, a type of flower." for n in data.info[
        "class_names"]], padding=True, return_tensors="pt")["input_ids"])


@pytest.mark.parametrize("chunk, checkpointing", [(3, False), (1, True), (2, True)])
def test_text_chunking_and_checkpointing_change_nothing_but_memory(tiny, chunk, checkpointing):
    from blocktrain.plugins.lora import apply_lora

    model, tokenizer = tiny
    torch.manual_seed(0)
    adapted = apply_lora(copy.deepcopy(model), targets=["q_proj", "k_proj", "v_proj"], rank=2,
                         alpha=1.0, dropout=0.0, scaling="sqrt_rank")
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = (images, torch.tensor([0, 1, 2, 3]))
    results = []
    for config in ({}, {"text_chunk_size": chunk, "text_checkpointing": checkpointing}):
        task = make_task(adapted, tokenizer, **config)
        adapted.zero_grad()
        loss = task.loss(adapted, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad}
        assert any(g.abs().sum() > 0 for n, g in grads.items() if "text_model" in n)  # gradients reach the text tower
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_task_config_mistakes_are_user_errors(tiny):
    model, tokenizer = tiny
    with pytest.raises(UserError, match="needs class_names and templates"):
        build_task(OmegaConf.create({"kind": "clip_few_shot"}), {"num_labels": 4})
    with pytest.raises(UserError, match="has no {}"):
        make_task(model, tokenizer, train_template="a photo")
    with pytest.raises(UserError, match="needs a CLIP model"):
        make_task(torch.nn.Linear(2, 2), tokenizer)
    task = build_task(OmegaConf.create({"kind": "clip_few_shot"}),
                      {"class_names": NAMES, "templates": ["{}"], "image_size": 224})
    with pytest.raises(UserError, match="takes 32x32 images but the data gives 224x224: set data.image_size=32"):
        task.setup(model, SimpleNamespace(tokenizer=tokenizer))
