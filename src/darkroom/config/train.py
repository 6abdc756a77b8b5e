"""How a model is trained: every field changes the trained weights (and the version)."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """How one model is trained. Every field here changes the trained weights."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = Field("resnet18", description="Any timm model name.")
    pretrained: bool = Field(
        True,
        description="Start from the backbone's pretrained weights (timm, through the Hugging "
        "Face cache; or pretrained_file). Off: train from scratch.",
    )
    pretrained_file: str | None = Field(
        None,
        description="Backbone weights to start from (.safetensors/.pth): a local path or a "
        "storage URI (s3://..., file://...), loaded by timm; a head of another size is "
        "re-initialised.",
    )
    image_size: int = Field(224, ge=8, le=2048, description="Square input size in pixels.")
    batch_size: int = Field(32, ge=1, description="Training images per batch.")
    epochs: int = Field(5, ge=1, description="Passes over each fold's training rows.")
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        1e-4,
        description="Peak learning rate (cosine from here to lr_min), or auto: the range test "
        "on the first fold's training rows picks it before the folds (kept with the version "
        "as lr_finder.json and lr_finder.png; lr_min is capped at it).",
    )
    lr_min: float = Field(1e-5, ge=0, description="Learning rate at the end of the cosine.")
    weight_decay: float = Field(0.0, ge=0, description="The optimizer's weight decay.")
    folds: int = Field(5, ge=2, description="Stratified K-fold splits of the train rows.")
    seed: int = Field(42, description="Seeds every RNG and the fold assignment.")
    augment: Literal["soft", "no-flip", "none"] = Field(
        "soft",
        description="soft: rotate 45, h-flip, one 64 px hole; no-flip: the same without the "
        "flip (text, digits); none: resize only.",
    )
    metric: Literal["accuracy", "f1_macro"] = Field(
        "accuracy", description="Picks the best fold and decides promotion."
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        "adam",
        description="adam (the tutorials'), adamw (decoupled weight decay), or sgd "
        "(momentum 0.9, Nesterov).",
    )
    freeze_backbone_epochs: int = Field(
        0,
        ge=0,
        description="Train only the new classifier head for this many epochs, then "
        "unfreeze everything (transfer learning).",
    )
    early_stopping_patience: int = Field(
        0,
        ge=0,
        description="Stop after this many epochs without a lower validation loss "
        "(0: never stop early). The best epoch's weights are kept either way.",
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Cross-entropy label smoothing.")
    class_weights: Literal["none", "balanced"] = Field(
        "none",
        description="balanced: weight the loss by n_images / (n_classes * class count) "
        "of the fold's training rows.",
    )
    mixup_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that a training batch is mixed with MixUp (alpha 0.2).",
    )
    cutmix_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that a training batch is mixed with CutMix "
        "(alpha 1.0); mixup_prob + cutmix_prob must not exceed 1.",
    )
    grad_accum_steps: int = Field(
        1, ge=1, description="Batches per optimizer step (effective batch = batch_size x this)."
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="CUDA only (ignored on a CPU). auto: bf16 where the GPU supports it, "
        "else fp16 with a gradient scaler.",
    )
    channels_last: bool = Field(True, description="NHWC memory layout on CUDA (faster convs).")
    compile: bool = Field(False, description="torch.compile the model on CUDA.")
    final_model: Literal["best_fold", "ensemble", "refit"] = Field(
        "best_fold",
        description="best_fold: the best fold's weights; ensemble: every fold's "
        "model, probabilities averaged; refit: one model on all train rows for the folds' mean "
        "best epoch count.",
    )

    @model_validator(mode="after")
    def _lr_min_below_lr(self):
        # also when lr_min is left at its default; lr auto caps lr_min when it picks the lr
        if self.lr != "auto" and self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min}) must not exceed lr ({self.lr})")
        return self

    @model_validator(mode="after")
    def _mix_probs_add_up(self):
        if self.mixup_prob + self.cutmix_prob > 1:
            raise ValueError(
                f"mixup_prob + cutmix_prob ({self.mixup_prob} + {self.cutmix_prob})"
                " must not exceed 1"
            )
        return self

    def fingerprint(self) -> str:
        """A short hash of every field and the code version: same fingerprint, same training.

        The code version is in it so that a release that changes training retrains.
        """
        from darkroom import __version__

        blob = json.dumps({**self.model_dump(mode="json"), "_code": __version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
