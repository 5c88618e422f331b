"""Student vs teacher image towers as shipped: parameters, file sizes and CPU images/s, PyTorch vs ONNX.

Random weights (speed and size do not depend on them). Run: `.venv/bin/python benchmarks/export_speed.py`
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clipdistill.checkpoint import save_state_dict  # noqa: E402
from clipdistill.config import ModelConfig  # noqa: E402
from clipdistill.export import export_image_encoder  # noqa: E402
from clipdistill.models.factory import count_parameters, create_model  # noqa: E402

BATCH, REPEATS = 256, 5


def images_per_second(run, pixels) -> float:
    """Best of REPEATS timed batches after one warm-up: the least disturbed by other load."""
    run(pixels)
    best = min(_timed(run, pixels) for _ in range(REPEATS))
    return BATCH / best


def _timed(run, pixels) -> float:
    start = time.perf_counter()
    run(pixels)
    return time.perf_counter() - start


def measure(name: str, folder: Path) -> dict:
    loaded = create_model(ModelConfig(name=name))
    model = loaded.model.eval().requires_grad_(False)
    size = loaded.preprocess.image_size
    save_state_dict(model.visual.state_dict(), folder / f"{name}.safetensors")
    onnx_path = export_image_encoder(model, size, folder / f"{name}.onnx")
    pixels = torch.randn(BATCH, 3, size, size)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    @torch.no_grad()
    def by_torch(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.encode_image(x), dim=-1)

    return {
        "model": name,
        "params": count_parameters(model.visual),
        "safetensors_mb": (folder / f"{name}.safetensors").stat().st_size / 1e6,
        "onnx_mb": onnx_path.stat().st_size / 1e6,
        "torch_ips": images_per_second(by_torch, pixels),
        "onnx_ips": images_per_second(lambda x: session.run(None, {"pixels": x}), pixels.numpy()),
    }


def main() -> None:
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
        f"batch {BATCH}, best of {REPEATS}"
    )
    print("| image tower | params | safetensors | ONNX | PyTorch img/s | ONNX img/s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("lab-student", "lab-teacher"):
            r = measure(name, Path(tmp))
            print(
                f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['safetensors_mb']:.1f} MB | "
                f"{r['onnx_mb']:.1f} MB | {r['torch_ips']:.0f} | {r['onnx_ips']:.0f} |"
            )


if __name__ == "__main__":
    main()
