"""CLIP-CID (docs/methods.md): the student's CLIP loss plus cluster and instance discrimination.

Everything teacher-side comes from disk: the cached teacher rows in each batch and the k-means
centroids and labels written by `clipdistill cluster`. The teacher model never runs here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.config import CidConfig, ConfigError, RunConfig
from clipdistill.losses.baselines import ContrastiveRelationalLoss, Projection
from clipdistill.losses.cid import ClusterDiscriminationLoss, InstanceDiscriminationLoss
from clipdistill.methods.baselines import teacher_scale
from clipdistill.methods.clip import ClipTask
from clipdistill.methods.task import CacheUse
from clipdistill.runs import model_dir


class CidTask(ClipTask):
    """L = L_clip + λ_cd·L_cd + λ_id·L_id (+ λ_rd·L_rd, off by default); a λ of 0 skips its term
    (reported as 0).

    L_rd is not part of CLIP-CID: CLIP-KD's contrastive relational term (`crd`), which asks the
    student's in-batch image<->text similarity distributions to match the teacher's. Instance
    discrimination's targets are one-hot (each sample is its own class); L_rd's are the teacher's
    soft similarities, which say how alike the other samples of the batch are.

    Only the modules a term uses are built, so DDP never meets a parameter without a gradient.
    """

    cache_use = CacheUse.REQUIRED
    sections = ("cid", "cluster", "balance")

    def __init__(
        self,
        model: nn.Module,
        cache_dims: tuple[int, int],
        centroids: torch.Tensor,
        labels_path: str | Path,
        cfg: CidConfig,
        teacher_scale: float = 100.0,
    ) -> None:
        super().__init__(model)
        self.cfg = cfg
        student_dim = int(model.visual.output_dim)
        image_dim, text_dim = cache_dims
        centroid_dim = int(centroids.shape[1])  # wider than image_dim for image+text clusters
        self.proj_image = self.proj_text = self.proj_cluster = None
        if cfg.lambda_id or (cfg.lambda_cd and centroid_dim == image_dim):
            self.proj_image = Projection(student_dim, image_dim)
        if cfg.lambda_id:
            self.proj_text = Projection(student_dim, text_dim)
            self.id_loss = InstanceDiscriminationLoss(temperature=cfg.temperature)
        if cfg.lambda_rd:
            self.rd_loss = ContrastiveRelationalLoss()
            self.register_buffer("teacher_logit_scale", torch.tensor(teacher_scale), persistent=False)
        if cfg.lambda_cd:
            self.proj_cluster = (
                self.proj_image if centroid_dim == image_dim else Projection(student_dim, centroid_dim)
            )
            self.cd_loss = ClusterDiscriminationLoss(
                centroids,
                scale=cfg.scale,
                margin=cfg.margin,
                learnable=cfg.learnable_prototypes,
                sample_rate=cfg.sample_rate,
                shard=cfg.shard,
            )
            self.labels = np.load(labels_path, mmap_mode="r")  # one per cache row; -1 = not clustered

    def cluster_loss(self, image: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """L_cd over the batch rows that have a cluster (rows outside `cluster.subset` do not)."""
        labels = torch.from_numpy(np.asarray(self.labels[rows.cpu().numpy()], dtype=np.int64))
        labels = labels.to(image.device)
        z = F.normalize(self.proj_cluster(image), dim=-1)
        keep = labels >= 0
        if self.cfg.shard or keep.all():  # sharded: build_cid checked that every row has a label
            return self.cd_loss(z, labels)
        if not keep.any():  # nothing to score; zero that still reaches every parameter (DDP)
            return z.sum() * 0 + sum(p.sum() * 0 for p in self.cd_loss.parameters())
        return self.cd_loss(z[keep], labels[keep])

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = self.encode(batch)
        clip = self.clip_loss(image, text, self.model.logit_scale.exp())
        cd = id_ = clip.new_zeros(())
        if self.cfg.lambda_cd:
            cd = self.cluster_loss(image, batch.get("cache_row", batch["index"]))
        if self.cfg.lambda_id:
            id_ = self.id_loss(
                F.normalize(self.proj_image(image), dim=-1),
                F.normalize(self.proj_text(text), dim=-1),
                batch["teacher_image"],
                batch["teacher_text"],
            )
        terms = {"term/clip": self.cfg.lambda_clip * clip} if self.cfg.lambda_clip else {}
        if self.cfg.lambda_cd:
            terms["term/cd"] = self.cfg.lambda_cd * cd
        if self.cfg.lambda_id:
            terms["term/id"] = self.cfg.lambda_id * id_
        losses = {"clip": clip.detach(), "cd": cd.detach(), "id": id_.detach()}
        if self.cfg.lambda_rd:
            teacher = batch["teacher_image"], batch["teacher_text"]
            rd = self.rd_loss(image, text, *teacher, self.model.logit_scale.exp(), self.teacher_logit_scale)
            terms["term/rd"] = self.cfg.lambda_rd * rd
            losses["rd"] = rd.detach()
        return {"loss": sum(terms.values()), **losses, **terms}

    def heads(self) -> dict[str, nn.Module]:
        """The projections to teacher space (and learnt prototypes): what reusing the student's
        teacher-space embeddings needs."""
        heads = {"proj_image": self.proj_image, "proj_text": self.proj_text}
        if self.proj_cluster is not self.proj_image:
            heads["proj_cluster"] = self.proj_cluster
        if self.cfg.lambda_cd and self.cfg.learnable_prototypes:
            heads["prototypes"] = self.cd_loss
        return {name: head for name, head in heads.items() if head is not None}

    @classmethod
    def unread_keys(cls, method: str, values: dict) -> dict[str, dict[str, object]]:
        """The relational term's teacher scale while the term is off."""
        return {} if values.get("cid", {}).get("lambda_rd") else {"cid": {"rd_teacher_logit_scale": None}}

    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> CidTask:
        return build_cid(cfg, model, cache)


def build_cid(cfg: RunConfig, model: nn.Module, cache: TeacherCache) -> CidTask:
    """CidTask with the centroids and labels of `<run_dir>/<cid.clusters>/`."""
    weights = {key: getattr(cfg.cid, key) for key in ("lambda_clip", "lambda_cd", "lambda_id", "lambda_rd")}
    if not any(weights.values()):
        raise ConfigError(f"train.method cid has every loss weight at 0 ({weights}): nothing would train")
    folder = model_dir(cfg, cfg.cid.clusters)
    centroids_path, labels_path = folder / "centroids.npy", folder / "labels.npy"
    if not (centroids_path.is_file() and labels_path.is_file()):
        raise ConfigError(
            f"train.method cid needs cluster centroids and labels in {folder}: run `clipdistill cluster` "
            "first (after `embed`)"
        )
    labels = np.load(labels_path, mmap_mode="r")
    if len(labels) != len(cache):
        raise ConfigError(
            f"{labels_path} has {len(labels)} labels but the teacher cache has {len(cache)} rows: "
            "rerun `clipdistill cluster`"
        )
    if cfg.cid.shard and cfg.cid.lambda_cd and (labels < 0).any():
        raise ConfigError(
            f"cid.shard needs a cluster label for every sample, but {labels_path} leaves some out: "
            "rerun `clipdistill cluster` without --cluster.subset"
        )
    centroids = torch.from_numpy(np.load(centroids_path, allow_pickle=False))
    dims = (cache.meta.image_dim, cache.meta.text_dim)
    scale = 100.0
    if cfg.cid.lambda_rd:
        scale = teacher_scale(cfg.cid.rd_teacher_logit_scale, cache, "cid.rd_teacher_logit_scale")
    return CidTask(model, dims, centroids, labels_path, cfg.cid, scale)
