"""A tiny, randomly initialised ``CLIPModel`` with a CLIP-style tokenizer, saved like a hub checkpoint.

No pretrained CLIP installs offline (see the shared assets notes), so the offline demo
(``train recipe=blocklora_clip_demo``) and the tests run the real pipeline on this model: a *pipeline
demo*, not a result. The demo recipe's model source ``model.kind=tiny_clip`` builds it on first use at
``model.id`` (``~/.cache/blocktrain/models/tiny-clip-fashion-mnist``) and then loads it as a local checkpoint. The tokenizer is word-level over the
words of the class names and prompt templates (lower-cased, ``<|startoftext|> ... <|endoftext|>``, padded with
``<|endoftext|>`` as CLIP's is), built with the ``tokenizers`` library.

    python -m blocktrain.trainer.clip.tiny_clip --out DIR --class-names cat dog    # one for other classes
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.io import atomic_path
from blocktrain.trainer.clip.class_names import FASHION_MNIST, GENERIC_TEMPLATE, template_for
from blocktrain.trainer.sources.models import ModelSource

DEMO_DIR = "~/.cache/blocktrain/models/tiny-clip-fashion-mnist"
BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"


def clip_style_tokenizer(texts: Sequence[str], max_length: int = 32):
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts``: BOS/EOS around every text, EOS as
    pad (CLIP pools the first EOS), unknown words to ``<|unk|>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token=UNK))
    tk.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=[BOS, EOS, UNK]))
    tk.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                      special_tokens=[(BOS, tk.token_to_id(BOS)), (EOS, tk.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=UNK,
                                   model_max_length=max_length)


def tiny_clip(tokenizer, image_size: int = 32, patch_size: int = 4, width: int = 64, layers: int = 2,
              heads: int = 4, projection_dim: int = 64, seed: int = 0):
    """A random ``CLIPModel`` whose towers are ``layers`` deep and ``width`` wide (width divisible by 8, as
    Block-LoRA's n = 8 needs), its text config matched to ``tokenizer``."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads,
                num_hidden_layers=layers, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads, num_hidden_layers=layers,
                  image_size=image_size, patch_size=patch_size)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)).eval()


def save_tiny_clip(out_dir: str | Path, class_names: Sequence[str], templates: Sequence[str],
                   **model_kwargs) -> Path:
    """Build the tokenizer from every ``template.format(name)`` and a matching tiny CLIP; save both to ``out_dir``."""
    tokenizer = clip_style_tokenizer([t.format(n) for t in templates for n in class_names])
    model = tiny_clip(tokenizer, **model_kwargs)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def vocabulary_templates(dataset: str) -> list[str]:
    """The prompts a tiny CLIP's vocabulary covers: the generic one and the dataset's."""
    return sorted({GENERIC_TEMPLATE, template_for(dataset)})


def build_once(out_dir: str | Path, class_names: Sequence[str], templates: Sequence[str], **model_kwargs) -> bool:
    """Build a tiny CLIP at ``out_dir`` unless that exists; True if it built one. Atomic: written to a temporary
    folder next to it, then renamed, so a crash or a concurrent build never leaves half a model."""
    out = Path(out_dir).expanduser()
    if out.exists():
        return False
    try:
        with atomic_path(out, directory=True) as tmp:
            save_tiny_clip(tmp, class_names, templates, **model_kwargs)
    except OSError:
        if not (out / "config.json").is_file():
            raise
        return False  # another process built it first
    return True


def _built(cfg):
    """``cfg`` after building the Fashion-MNIST tiny CLIP at ``cfg.id`` if nothing is there yet."""
    path = Path(str(cfg.id)).expanduser()
    try:
        built = build_once(path, FASHION_MNIST, vocabulary_templates("fashion_mnist"))
    except OSError as e:
        raise UserError(f"cannot build the demo's tiny CLIP at {path} (model.id): {e}") from None
    if built:
        print(f"built the demo's tiny random CLIPModel (not pretrained: a pipeline demo) at {path}", file=sys.stderr)
    return cfg


def _load(cfg, processor):
    from blocktrain.trainer.sources.models import TRANSFORMERS

    return TRANSFORMERS.load(_built(cfg), processor)


def _load_processor(cfg):
    from blocktrain.trainer.sources.models import TRANSFORMERS

    return TRANSFORMERS.load_processor(_built(cfg))


TINY_CLIP = ModelSource(_load, _load_processor)  # model.kind=tiny_clip: built on first use, then a local checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a tiny random CLIPModel + tokenizer for offline pipeline runs")
    parser.add_argument("--out", default=DEMO_DIR)
    parser.add_argument("--dataset", default="fashion_mnist", help="whose class names and template the vocabulary covers")
    parser.add_argument("--class-names", nargs="*", help="class names (default: the dataset's, Fashion-MNIST's)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    names = args.class_names or FASHION_MNIST
    out = save_tiny_clip(args.out, names, vocabulary_templates(args.dataset), image_size=args.image_size,
                         patch_size=args.patch_size, width=args.width, layers=args.layers)
    print(f"saved a tiny random CLIPModel (not pretrained) and its tokenizer to {out}")


if __name__ == "__main__":
    main()
