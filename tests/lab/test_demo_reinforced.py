"""The lab's reinforced-cache rows: each builds its own cache before training, and the ensemble row
trains the second lab teacher (seed 1) first; the stages themselves are tested on their own."""

from __future__ import annotations

import clipdistill.lab.demo as demo
from clipdistill.config import load_config
from clipdistill.lab import LAB_CONFIG, summarize
from clipdistill.runs import cache_dir


def test_views_and_ensemble_rows_build_their_caches_first(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        demo, "train_teacher", lambda cfg, seed=0, name="teacher": calls.append(("teacher", seed, name))
    )
    monkeypatch.setattr(demo, "run_embed", lambda cfg: calls.append(("embed", cache_dir(cfg).name)))
    monkeypatch.setattr(demo, "train", lambda cfg: calls.append(("train", cfg.train.name)))
    monkeypatch.setattr(demo, "evaluated", lambda cfg, name: {"zeroshot_top1": 80.0, "train_seconds": 1.0})
    rows = '["cid_views2", "cid_ensemble"]'
    cfg = load_config(
        str(LAB_CONFIG), ["--run_dir", str(tmp_path), "--lab.rows", rows, "--lab.seeds", "[0, 1]"]
    )
    results = demo.run_rows(cfg)
    assert calls == [  # every job's caches (each reused after its first build), then the trainings
        ("embed", "cache_views2"), ("embed", "cache_views2"),
        ("teacher", 1, "teacher_seed1"), ("embed", "cache_ensemble2"),
        ("teacher", 1, "teacher_seed1"), ("embed", "cache_ensemble2"),
        ("train", "cid_views2_seed0"), ("train", "cid_views2_seed1"),
        ("train", "cid_ensemble_seed0"), ("train", "cid_ensemble_seed1"),
    ]  # fmt: skip
    assert results["cid_views2"]["zeroshot_top1"] == summarize([80.0, 80.0])
    ensemble = demo.row_config(cfg, "cid_ensemble", 0)
    assert ensemble.embed.ensemble == ["teacher_seed1/model.safetensors"]
    assert ensemble.train.subset == "balance/kept.npy" and ensemble.train.method == "cid"
