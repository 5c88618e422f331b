"""Heads a trained student classifies with besides its encoders: ComKD's projector, EduAttention and the
teacher's class-text bank. They live with the models because evaluation, prediction and export load
them as much as training does."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.checkpoint import load_state_dict
from clipdistill.config import ComkdConfig, RunConfig, trained_config
from clipdistill.losses.comkd import CrossEduAttention, EduAttention, Projector

TEXT_BANK = "text_bank.npy"  # written by ComKD stage 1 (methods/prompt_teacher.py)
SPLIT = "split.json"  # stage 1's class names (the bank's row order) and base/novel split
COMKD_METHODS = ("comkd", "promptkd")


class ComkdHead(nn.Module):
    """What the student needs at inference besides its encoder: P, EduAttention and W_t (a buffer,
    so it is saved in heads.safetensors and the student needs no text tower)."""

    def __init__(
        self,
        student_dim: int,
        text_bank: torch.Tensor,
        cfg: ComkdConfig,
        skip: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        dim = int(text_bank.shape[1])
        self.projector = Projector(student_dim, dim, skip=skip)
        self.edu: EduAttention | CrossEduAttention | None = None
        if cfg.use_eduattention and cfg.eduattention == "cross":
            self.edu = CrossEduAttention(dim, cfg.attention_heads, cfg.attention_temperature)
        elif cfg.use_eduattention:
            self.edu = EduAttention(dim, cfg.attention_scale)
        self.register_buffer("text_bank", F.normalize(text_bank.float(), dim=-1))
        self.logit_scale = cfg.logit_scale

    def project(self, student_image: torch.Tensor) -> torch.Tensor:
        """P(u_s) of the L2-normalised student feature (normalised so training and eval agree)."""
        return self.projector(F.normalize(student_image, dim=-1))

    def forward(self, student_image: torch.Tensor) -> torch.Tensor:
        """f_e: the student feature in the teacher's space, after EduAttention when it is on."""
        p = self.project(student_image)
        return self.edu(p, self.text_bank) if self.edu is not None else p

    def logits(self, student_image: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(self(student_image), dim=-1) @ self.text_bank.T


def comkd_settings(cfg: RunConfig) -> ComkdConfig:
    """The ComKD settings of a run, with `promptkd` switching IFAlign and EduAttention off."""
    settings = ComkdConfig(**vars(cfg.comkd))
    if cfg.train.method == "promptkd":
        settings.use_ifalign = settings.use_eduattention = False
    return settings


def load_head(folder: str | Path) -> ComkdHead | None:
    """The trained head of a comkd/promptkd run folder (None for any other method)."""
    folder = Path(folder)
    trained = trained_config(folder)
    if trained.train.method not in COMKD_METHODS:
        return None
    saved = load_state_dict(folder / "heads.safetensors")  # also the student's visual prompts, if any
    state = {k.removeprefix("head."): v for k, v in saved.items() if k.startswith("head.")}
    student_dim = int(state["projector.net.0.weight"].shape[1])
    head = ComkdHead(
        student_dim, state["text_bank"], comkd_settings(trained), state.get("projector.skip.weight")
    )
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)
