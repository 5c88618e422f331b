"""ComKD stage 2 (docs/methods.md): distil a prompt-tuned teacher into a student on UNLABELED images.

The student's image encoder and a head (projector P, EduAttention, the teacher's text bank W_t)
train against the teacher's cached image features u_t: refinement KL between the two zero-shot
distributions over W_t, plus IFAlign. No labels and no teacher model are involved: u_t comes from
the cache (or, when stage 1 learned visual prompts, its `image_features.npy`), W_t from stage 1's
`text_bank.npy`. Inference: encoder (with its visual prompts, when stage 2 learned some) -> P ->
EduAttention -> W_t.
PromptKD is the same recipe with IFAlign and EduAttention off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.checkpoint import load_state_dict
from clipdistill.config import ComkdConfig, ConfigError, RunConfig
from clipdistill.losses.comkd import CrossEduAttention, IFAlignLoss, RefinementKDLoss, relative_entropy
from clipdistill.methods.labelled import labelled_train
from clipdistill.methods.task import CacheUse, Task
from clipdistill.models.heads import TEXT_BANK, ComkdHead, comkd_settings
from clipdistill.models.prompts import VisualPromptLearner
from clipdistill.runs import find_run, model_dir

IMAGE_FEATURES = "image_features.npy"  # stage 1 with visual prompts: the prompted teacher's u_t per row
# ComKD's own modules' keys: stage 1 and PromptKD read `comkd` but not these, whose defaults changed under
# their runs, so they stay out of those runs' fingerprints whatever their value.
COMKD_MODULE_KEYS = ("eduattention", "attention_heads", "attention_temperature", "ifalign_reduction")


class ComkdTask(Task):
    """L = λ_kd·L_kd + λ_align·L_align over the student's image tower and the head.

    The student's text tower is frozen (unused: classes come from W_t), so every trainable
    parameter gets a gradient. With `freeze_backbone` the image tower is frozen too, and with
    `student_vpt_depth` it learns deep visual prompts instead (PromptKD's student: prompts and
    projector train). The batch's labels, if any, are never read; `train_rows` (the inductive
    variant's base-class images) only picks which images it sees.
    """

    cache_use = CacheUse.REQUIRED
    sections = ("comkd",)

    def __init__(
        self,
        model: nn.Module,
        text_bank: torch.Tensor,
        cfg: ComkdConfig,
        teacher_images: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
        train_rows: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("visual.") and not cfg.freeze_backbone
        self.model = model
        self.cfg = cfg
        self.visual_prompts = None
        if cfg.student_vpt_depth:
            depth, tokens = cfg.student_vpt_depth, cfg.student_vpt_tokens
            self.visual_prompts = VisualPromptLearner(model.visual, depth, tokens)
        self.head = ComkdHead(int(model.visual.output_dim), text_bank, cfg, skip)
        self.kd_loss = RefinementKDLoss(cfg.temperature, cfg.logit_scale, cfg.kd_reduction)
        self.align_loss = IFAlignLoss(cfg.ifalign_reduction) if cfg.use_ifalign else None
        self.register_buffer("teacher_images", teacher_images, persistent=False)
        self.train_rows = train_rows

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if self.visual_prompts is not None:
            return self.visual_prompts(self.model.visual, images)
        return self.model.encode_image(images)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.teacher_images is not None:  # VPT changed the teacher's features: stage 1's, by cache row
            teacher_image = self.teacher_images[batch["cache_row"].to(self.teacher_images.device)].float()
        else:
            teacher_image = batch["teacher_image"]
        student = self.encode_image(batch["image"])
        p = self.head.project(student)
        f_e, attention = p, None
        if self.head.edu is not None:
            f_e, attention = self.head.edu.attend(p, self.head.text_bank)
        kd = self.kd_loss(f_e, teacher_image, self.head.text_bank)
        # IFAlign on the unit sphere, where u_t lives and where the KD term compares (it normalises f_e)
        on_sphere = F.normalize(p, dim=-1)
        align = self.align_loss(on_sphere, teacher_image) if self.align_loss is not None else kd.new_zeros(())
        loss = self.cfg.lambda_kd * kd + self.cfg.lambda_align * align
        parts = {"loss": loss, "kd": kd.detach(), "align": align.detach(), "term/kd": self.cfg.lambda_kd * kd}
        if self.align_loss is not None:
            parts["term/align"] = self.cfg.lambda_align * align
        if self.head.edu is not None:
            parts["alpha"] = self.head.edu.alpha.detach()
            parts["attention_entropy"] = relative_entropy(attention.detach().float())  # / log K
        else:
            parts["alpha"] = kd.new_zeros(())
        return parts

    def after_step(self) -> None:
        if isinstance(self.head.edu, CrossEduAttention):
            self.head.edu.clamp_temperature()

    def heads(self) -> dict[str, nn.Module]:
        heads: dict[str, nn.Module] = {"head": self.head}
        if self.visual_prompts is not None:  # the image tower runs with them at inference
            heads["visual_prompts"] = self.visual_prompts
        return heads

    def training_pool(self, pool: np.ndarray) -> np.ndarray:
        return pool if self.train_rows is None else pool[np.isin(pool, self.train_rows)]

    @classmethod
    def unread_keys(cls, method: str, values: dict) -> dict[str, dict[str, object]]:
        """PromptKD (this task without IFAlign and EduAttention) reads none of ComKD's module keys."""
        return {"comkd": dict.fromkeys(COMKD_MODULE_KEYS)} if method == "promptkd" else {}

    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> ComkdTask:
        return build_comkd(cfg, model, cache)


def refuse_ensemble_cache(cache: TeacherCache | None) -> None:
    """ComKD's two stages read one teacher's features: an ensemble's are several teachers' side by side,
    which the text bank of the one teacher that stage 1 prompt-tunes does not describe."""
    if cache is not None and cache.meta.ensemble:
        raise ConfigError(
            "ComKD distils one prompt-tuned teacher, whose text bank scores that teacher's own image "
            f"features, but {cache.folder} is an ensemble of {len(cache.meta.ensemble) + 1} teachers "
            "(embed.ensemble): run `clipdistill embed`, stage 1 and stage 2 without --embed.ensemble"
        )


def prompt_teacher_folder(cfg: RunConfig) -> Path:
    """Stage 1's folder, or (a multi-seed lab) the stage-1 run of the same seed."""
    folder = find_run(cfg, cfg.comkd.prompt_teacher, TEXT_BANK)
    if folder is None:
        raise ConfigError(
            f"train.method {cfg.train.method} needs the prompt-tuned teacher's text bank "
            f"{model_dir(cfg, cfg.comkd.prompt_teacher) / TEXT_BANK}: run `clipdistill train "
            "--train.role teacher --train.method prompt_teacher` first"
        )
    return folder


def load_student_init(cfg: RunConfig, model: nn.Module) -> torch.Tensor | None:
    """Load `comkd.student_init`'s trained student into `model`; return its image projection into
    the teacher's space (CID's `proj_image`) for P's skip path, or None when it has none."""
    folder = find_run(cfg, cfg.comkd.student_init, "done.json")
    if folder is None:
        raise ConfigError(
            f"comkd.student_init {cfg.comkd.student_init!r}: no finished run at "
            f"{model_dir(cfg, cfg.comkd.student_init)}: train that student first"
        )
    try:
        model.load_state_dict(load_state_dict(folder / "model.safetensors"))
    except RuntimeError as e:
        raise ConfigError(f"comkd.student_init {folder} is not this student ({cfg.student.name}): {e}") from e
    heads = folder / "heads.safetensors"
    state = load_state_dict(heads) if heads.is_file() else {}
    weight = state.get("proj_image.proj.weight")  # absent when the widths match (identity) or no CID
    return weight.float() if weight is not None else None


def load_text_bank(cfg: RunConfig) -> torch.Tensor:
    return torch.from_numpy(np.load(prompt_teacher_folder(cfg) / TEXT_BANK, allow_pickle=False))


def base_class_rows(cfg: RunConfig) -> np.ndarray:
    """The inductive variant's stage-2 images: those of base classes only, so novel classes are never
    seen, not even unlabeled (the default, transductive, uses every train image). The split picks
    the images; the batches still carry no label the student reads."""
    train = labelled_train(cfg)
    return np.flatnonzero(np.isin(train.labels.numpy(), train.base))


def build_comkd(cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> ComkdTask:
    if cfg.train.role != "student":
        raise ConfigError(
            f"train.method {cfg.train.method} distils into the student: set --train.role student"
        )
    text_bank = load_text_bank(cfg)
    refuse_ensemble_cache(cache)
    if cache is not None and cache.meta.image_dim != text_bank.shape[1]:
        raise ConfigError(
            f"the teacher cache has image width {cache.meta.image_dim} but the text bank "
            f"{text_bank.shape[1]}: embed and prompt_teacher must use the same teacher"
        )
    teacher_images = None
    features = prompt_teacher_folder(cfg) / IMAGE_FEATURES
    if features.is_file() and cache is not None and cache.meta.views > 1:
        raise ConfigError(
            f"stage 1 learned visual prompts, so stage 2's targets are its features of the plain images "
            f"({features}), while a cache of embed.views {cache.meta.views} crops the student's: train "
            "stage 2 without --embed.views, or stage 1 without visual prompts"
        )
    if features.is_file():
        teacher_images = torch.from_numpy(np.load(features, allow_pickle=False))
        if cache is not None and len(teacher_images) != len(cache):
            raise ConfigError(f"{features} has {len(teacher_images)} rows but the teacher cache {len(cache)}")
    skip = load_student_init(cfg, model) if cfg.comkd.student_init else None
    if skip is not None and skip.shape[0] != text_bank.shape[1]:
        raise ConfigError(
            f"comkd.student_init's image projection maps to width {skip.shape[0]}, the text bank is "
            f"{text_bank.shape[1]} wide: the student was distilled from another teacher"
        )
    train_rows = base_class_rows(cfg) if cfg.comkd.inductive else None
    return ComkdTask(model, text_bank, comkd_settings(cfg), teacher_images, skip, train_rows)
