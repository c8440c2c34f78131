"""CLIP few-shot classification as CLIP-LoRA trains and evaluates it.

Training: the text features of the training template over *all* class names are recomputed every step (so
gradients reach the text tower's adapters), logits = ``logit_scale`` · cos(image, text) with the scale fixed
at 100, cross-entropy. The training template is the dataset's own (``info["templates"][0]``, CoOp's, as
CLIP-LoRA's ``dataset.template[0]``) unless ``train_template`` names another (e.g. "a photo of a {}.").
Evaluation: top-1 with the dataset's templates (several are ensembled as CLIP does). ``ZeroShotEvaluation``
measures the untouched model when fit starts.

Works with transformers' ``CLIPModel`` (``get_image_features`` / ``get_text_features``; transformers 5 returns
an output whose ``pooler_output`` is the projected embedding, 4.x the tensor itself).
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blocktrain.trainer.errors import UserError
from blocktrain.trainer.tasks.base import Task


def clip_model(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` or the first of its sub-modules with CLIP's two feature methods."""
    for module in (model, *model.modules()):
        if hasattr(module, "get_image_features") and hasattr(module, "get_text_features"):
            return module
    raise UserError(f"task clip_few_shot needs a CLIP model with get_image_features/get_text_features, got "
                    f"{type(model).__name__} (set model.auto_class=CLIPModel)")


def _embedding(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _text_embeddings(clip, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return _embedding(clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class ClipFewShotTask(Task):
    """Batches are ``(images, labels)``; the class prompts come from the data source's ``info``."""

    def __init__(self, config, info: dict):
        super().__init__(config, info)
        missing = [k for k in ("class_names", "templates") if not info.get(k)]
        if missing:
            raise UserError(f"task clip_few_shot needs {' and '.join(missing)} from the data source (data=few_shot)")
        if config.train_template is not None and "{}" not in config.train_template:
            raise UserError(f"task.train_template '{config.train_template}' has no {{}} for the class name")
        if config.text_chunk_size is not None and config.text_chunk_size <= 0:
            raise UserError(f"task.text_chunk_size must be a positive number or null, got {config.text_chunk_size}")
        self.class_names = list(info["class_names"])
        self.templates = list(info["templates"])
        self.train_template = config.train_template or self.templates[0]
        self.train_prompts: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eval_prompts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._eval_text: torch.Tensor | None = None
        self._frozen_text: torch.Tensor | None = None

    def setup(self, model, run) -> None:
        """Tokenise the training prompts and every evaluation template over all class names, once."""
        tokenizer = getattr(run.tokenizer, "tokenizer", run.tokenizer)  # a CLIPProcessor holds its tokenizer
        if not callable(tokenizer):
            raise UserError("task clip_few_shot needs the model's tokenizer: set model.processor=tokenizer (or processor)")
        config = clip_model(model).config
        size, wanted = self.info.get("image_size"), config.vision_config.image_size
        if size is not None and size != wanted:
            raise UserError(f"the model takes {wanted}x{wanted} images but the data gives {size}x{size}: "
                            f"set data.image_size={wanted}")
        max_length = config.text_config.max_position_embeddings

        def encode(template: str) -> tuple[torch.Tensor, torch.Tensor]:
            enc = tokenizer([template.format(name) for name in self.class_names], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]

        self.train_prompts = encode(self.train_template)
        self.eval_prompts = [encode(t) for t in self.templates]

    def callbacks(self) -> list:
        return [ZeroShotEvaluation(self)]

    # -- features and logits -------------------------------------------------------------------
    def encode_text(self, clip, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings, ``text_chunk_size`` prompts per call, each chunk recomputed in the
        backward pass when ``text_checkpointing`` (only one chunk's activations are alive at a time)."""
        size = self.config.text_chunk_size or input_ids.shape[0]
        recompute = self.config.text_checkpointing and torch.is_grad_enabled()
        chunks = []
        for start in range(0, input_ids.shape[0], size):
            ids, mask = input_ids[start:start + size], attention_mask[start:start + size]
            if recompute:
                chunks.append(checkpoint(_text_embeddings, clip, ids, mask, use_reentrant=False))
            else:
                chunks.append(_text_embeddings(clip, ids, mask))
        return torch.cat(chunks)

    def text_features(self, model, which: str = "train") -> torch.Tensor:
        """Unit-norm class embeddings (C, D) in float32: the training template, or the evaluation templates
        ensembled (mean of unit embeddings, renormalised)."""
        clip = clip_model(model)
        device = clip.text_projection.weight.device
        prompts = [self.train_prompts] if which == "train" else self.eval_prompts
        per_template = [F.normalize(self.encode_text(clip, ids.to(device), mask.to(device)).float(), dim=-1)
                        for ids, mask in prompts]
        return F.normalize(torch.stack(per_template).mean(0), dim=-1)

    def logits(self, model, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``logit_scale`` · cos(image, text): (B, C)."""
        image = F.normalize(_embedding(clip_model(model).get_image_features(pixel_values=images)).float(), dim=-1)
        return self.config.logit_scale * image @ text.t()

    def _training_text(self, model) -> torch.Tensor:
        clip = clip_model(model)
        text_side = [*clip.text_model.parameters(), *clip.text_projection.parameters()]
        if any(p.requires_grad for p in text_side):
            return self.text_features(model, "train")
        if self._frozen_text is None:  # nothing trains in the text tower (e.g. encoder=vision): compute once
            with torch.no_grad():
                self._frozen_text = self.text_features(model, "train")
        return self._frozen_text

    # -- Task interface --------------------------------------------------------------------------
    def loss(self, model, batch):
        images, labels = batch
        return F.cross_entropy(self.logits(model, images, self._training_text(model)), labels)

    def eval_sums(self, model, batch):
        images, labels = batch
        if self._eval_text is None:  # once per evaluation pass (reset by ZeroShotEvaluation)
            self._eval_text = self.text_features(model, "eval")
        logits = self.logits(model, images, self._eval_text)
        n = labels.shape[0]
        return {"acc": ((logits.argmax(-1) == labels).sum().item(), n),
                "loss": (F.cross_entropy(logits, labels, reduction="sum").item(), n)}

    def reset_eval_cache(self) -> None:
        self._eval_text = None


class ZeroShotEvaluation(pl.Callback):
    """Evaluates the untouched model on the val (test) split when fit starts: ``val/zero_shot_acc`` and
    ``val/zero_shot_loss``. The result rides in checkpoints and is logged again on resume."""

    def __init__(self, task: ClipFewShotTask):
        self.task = task
        self.result: dict[str, float] | None = None

    def on_validation_epoch_start(self, trainer, pl_module):
        self.task.reset_eval_cache()

    def on_fit_start(self, trainer, pl_module):
        if not self.task.config.zero_shot or trainer.datamodule is None:
            return
        if trainer.ckpt_path is None:  # resuming: the weights are trained, the result came with the checkpoint
            self.result = self._evaluate(trainer, pl_module)
        if self.result:
            pl_module.run.log(self.result, step=0)

    def _evaluate(self, trainer, pl_module) -> dict[str, float] | None:
        loader = trainer.datamodule.val_dataloader()
        if not loader:
            return None
        model = pl_module.model
        was_training = model.training
        model.eval()
        self.task.reset_eval_cache()
        sums = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in pl_module.run.progress(loader, total=len(loader), description="zero-shot evaluation"):
                values = self.task.eval_sums(model, trainer.strategy.batch_to_device(batch))
                sums += torch.tensor([values["acc"][0], values["loss"][0], values["acc"][1]], dtype=torch.float64)
        self.task.reset_eval_cache()
        model.train(was_training)
        correct, loss, count = trainer.strategy.reduce(sums.to(pl_module.device), reduce_op="sum").tolist()
        return {"val/zero_shot_acc": correct / count, "val/zero_shot_loss": loss / count} if count else None

    def state_dict(self) -> dict:
        return {"result": self.result}

    def load_state_dict(self, state_dict: dict) -> None:
        self.result = state_dict.get("result")
