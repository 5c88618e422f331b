"""The performance suite's own tools (benchmarks/perf): interleaving, memory peaks, the synthetic
cache it trains on, and the projection arithmetic. The measurements themselves run in `make bench-perf`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repo root

from benchmarks.perf.__main__ import check  # noqa: E402
from benchmarks.perf.memory import WIDTH, write_cache  # noqa: E402
from benchmarks.perf.scale import projection  # noqa: E402
from benchmarks.perf.timing import interleave, run_with_peak_memory  # noqa: E402

from clipdistill.cache import TeacherCache  # noqa: E402


def test_interleave_alternates_sides_and_takes_medians():
    calls = []
    values = {"a": iter([5.0, 1.0, 2.0]), "b": iter([3.0, 9.0, 4.0])}
    sides = {name: (lambda name=name: calls.append(name) or next(values[name])) for name in values}
    assert interleave(sides, 3) == {"a": 2.0, "b": 4.0}
    assert calls == ["a", "b"] * 3


def test_check_reads_the_target_direction():
    assert check("x", 1.1, "<= 1.15", "cmd")["pass"] and not check("x", 1.2, "<= 1.15", "cmd")["pass"]
    assert check("y", 0.9, ">= 0.85", "cmd")["pass"] and not check("y", 0.8, ">= 0.85", "cmd")["pass"]


def test_peak_memory_of_a_child_sees_its_allocation():
    small = run_with_peak_memory([sys.executable, "-c", "pass"])
    big = run_with_peak_memory(
        [sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"]
    )
    assert big["peak_rss_mib"] - small["peak_rss_mib"] > 150


def test_synthetic_cache_is_a_valid_memory_mapped_cache(tmp_path):
    write_cache(tmp_path / "cache", 100, "lab:default:val5000:train10", shard_size=64)
    cache = TeacherCache(tmp_path / "cache")
    cache.check("lab:default:val5000:train10")
    image, text = cache.rows(np.array([0, 70, 99]))
    assert image.shape == text.shape == (3, WIDTH) and cache.valid.all()
    assert torch.allclose(image.norm(dim=1), torch.ones(3), atol=1e-2)


def test_projection_arithmetic():
    measured = {"cluster": {"seconds": 100.0}, "balance": {"seconds": 2.0}}
    out = projection(measured, 1_000_000, 256, 10_000)
    assert out["measured_cpu_flop"] == 2 * 256 * 10_000 * (320_000 * 10 + 1_000_000)
    assert out["kmeans_train_s_8gpu"] == round(2 * 256 * 1e6 * 64e6 * 20 / (8 * 4e14), 1)
    assert out["balance_s_cpu_here"] == round(2.0 * (225e6 * 225) / (1e6 * 100))
