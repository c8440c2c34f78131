"""Tiny real models, tokenizers and datasets built locally, for tests and benchmarks (no network).

Everything is built locally with the real classes (transformers, tokenizers, timm, gguf, torchvision
file formats); nothing touches the network.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

CORPUS = (
    "the quick brown fox jumps over the lazy dog . "
    "a tiny model reads a tiny corpus and learns nothing at all . "
    "blocks of text are cut into sequences of tokens for training . "
    "good films make people happy ; bad films make people sad . "
    "elizabeth bennet walked to netherfield through the muddy fields . "
)
SPECIAL_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOS = "<|endoftext|>"


def make_wordpiece_tokenizer(corpus: str = CORPUS, vocab_size: int = 200):
    """A BERT-style WordPiece ``PreTrainedTokenizerFast`` ([CLS] ... [SEP], pad id 0) trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tk.train_from_iterator([corpus], trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_BERT))
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def make_bpe_tokenizer(corpus: str = CORPUS, vocab_size: int = 300):
    """A GPT-2-style byte-level BPE ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as BOS/EOS and no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([corpus], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def tiny_bert_classifier(vocab_size: int, num_labels: int = 3):
    """A 2-layer ``BertForSequenceClassification`` with hidden size 32."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_llama(vocab_size: int):
    """A 2-layer ``LlamaForCausalLM`` (hidden 32, 4 heads, 2 KV heads, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
    return LlamaForCausalLM(config).eval()


def save_tiny_bert(out_dir: Path, num_labels: int = 3):
    """Save a tiny BERT classifier and its WordPiece tokenizer to ``out_dir``; returns (model, tokenizer)."""
    tokenizer = make_wordpiece_tokenizer()
    model = tiny_bert_classifier(len(tokenizer), num_labels)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def save_tiny_llama(out_dir: Path):
    """Save a tiny Llama and its byte-level BPE tokenizer to ``out_dir``; returns (model, tokenizer)."""
    tokenizer = make_bpe_tokenizer()
    model = tiny_llama(len(tokenizer))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def tiny_timm_vit(num_classes: int = 10):
    """timm ``vit_tiny_patch16_224`` shrunk to 32x32 inputs, random init."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=num_classes,
                             depth=2).eval()


def write_llama_gguf(path: Path, model, tokenizer) -> Path:
    """Write a Llama model and its byte-level BPE tokenizer as an F32 GGUF file, as llama.cpp's converter
    does (q/k rows permuted for its RoPE layout, tied output embedding left out)."""
    import gguf

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c.vocab_size)

    vocab = tokenizer.backend_tokenizer.model
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [vocab.id_to_token(i) for i in range(c.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == EOS else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        w = tensor.detach().float().numpy()
        if base.endswith("q_proj"):
            w = _permute_rope(w, c.num_attention_heads)
        elif base.endswith("k_proj"):
            w = _permute_rope(w, c.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_mnist_raw(root: Path, folder: str = "FashionMNIST", n_train: int = 40, n_test: int = 12,
                    size: int = 28, seed: int = 0) -> Path:
    """Write MNIST-format idx files (random images, labels ``i % 10``) under ``root/folder/raw``, as
    ``torchvision.datasets.MNIST`` / ``FashionMNIST`` read them offline with ``download=False``."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            np.array([0x803, n, size, size], dtype=">i4").tobytes() + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(np.array([0x801, n], dtype=">i4").tobytes() + labels.tobytes())
    return Path(root)


def write_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4, size=(20, 16),
                       seed: int = 0) -> Path:
    """A ``root/class/img.png`` tree of random RGB images (sizes vary so resizing is exercised)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (Path(root) / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = size[0] + i, size[1] + 2 * i
            Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(Path(root) / c / f"{i}.png")
    return Path(root)


def write_food101(root: Path, classes=("apple_pie", "bibimbap"), per_split: int = 3, seed: int = 0) -> Path:
    """A minimal ``food-101`` tree (meta/{train,test}.json + images) for ``torchvision.datasets.Food101``,
    a dataset selected with ``split=`` rather than ``train=``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = Path(root) / "food-101"
    (base / "meta").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        meta = {}
        for c in classes:
            (base / "images" / c).mkdir(parents=True, exist_ok=True)
            meta[c] = []
            for i in range(per_split):
                name = f"{split}{i}"
                Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(
                    base / "images" / c / f"{name}.jpg")
                meta[c].append(f"{c}/{name}")
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
    return Path(root)


def describe_machine(device: torch.device | None = None) -> str:
    """The GPU name on CUDA, else the CPU model and torch's thread count (benchmark headers)."""
    import platform

    if (device is None and torch.cuda.is_available()) or (device is not None and device.type == "cuda"):
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def interleaved_times(fns: dict[str, Callable[[], object]], device: torch.device,
                      repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` calls of every function, after one warm-up call each; the functions take
    turns, so load changes hit all alike (CUDA is synchronised around every call)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times
