"""JPEG decode + transform to 224 px: the earlier path against today's, side by side in one run.

    python -m benchmarks.decode [--side 512]

Both paths turn the same photo-like JPEGs (`benchmarks.real.photo_jpegs`, quality 90) into
normalised 224-px tensors with bicubic resize and centre crop. The earlier path decodes every JPEG
at full size and converts with torchvision's ToTensor + Normalize; today's (`decode_image(...,
min_side=224)` + `pil_transform`) decodes at 1/2 (from 448 px), 1/4 (from 896 px) or 1/8 size in
the DCT domain, resizes the uint8 pixels with torch's vectorised bicubic kernel and converts the
cropped pixels in one multiply-add (`ResizeCropNormalize`). One process, one thread
(as a DataLoader worker runs), the two paths alternated over several repeats; the rate is images
per CPU second of the process (best repeat), which the machine's other load changes less than wall
time. Also reports the pixel difference between the two outputs.
Results: benchmarks/results/decode_<side>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchmarks.real import photo_jpegs
from torchvision import transforms as T

from clipdistill.data.images import decode_image
from clipdistill.data.sources import pil_transform
from clipdistill.models.factory import Preprocess

PREPROCESS = Preprocess(224, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276))  # CLIP's mean and std


def earlier_transform() -> Callable:
    """The transform before `ResizeCropNormalize`: PIL's resize, then torchvision's two float passes."""
    return T.Compose(
        [
            T.Resize(PREPROCESS.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(PREPROCESS.image_size),
            T.ToTensor(),
            T.Normalize(PREPROCESS.mean, PREPROCESS.std),
        ]
    )


def earlier(data: bytes) -> torch.Tensor:
    return EARLIER(decode_image(data))


def today(data: bytes) -> torch.Tensor:
    return TODAY(decode_image(data, min_side=PREPROCESS.image_size))


EARLIER, TODAY = earlier_transform(), pil_transform(PREPROCESS)


def cpu_seconds(images: list[bytes], path: Callable[[bytes], torch.Tensor]) -> float:
    start = time.process_time()
    for data in images:
        path(data)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--side", type=int, default=512, help="side of the source JPEGs")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = photo_jpegs(args.images, side=args.side)
    paths = {"earlier: full decode, ToTensor + Normalize": earlier, "today: reduced-size decode": today}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, path in paths.items():
            seconds[name].append(cpu_seconds(images, path))
    rates = {name: round(len(images) / min(values), 1) for name, values in seconds.items()}
    earlier_name, today_name = paths
    scale = torch.tensor(PREPROCESS.std).view(3, 1, 1)  # back to [0, 1] pixel units
    diffs = np.concatenate([((earlier(d) - today(d)) * scale).abs().numpy().ravel() for d in images[:50]])
    report = {
        "command": f"python -m benchmarks.decode --images {args.images} --repeats {args.repeats} "
        f"--side {args.side}",
        "images": f"{args.images} photo-like {args.side}-px JPEGs (quality 90) -> 224 px tensors, 1 thread",
        "images_per_cpu_second": rates,
        "speedup": round(rates[today_name] / rates[earlier_name], 2),
        "difference_0_255": {
            "mean": round(float(diffs.mean()) * 255, 2),
            "p99": round(float(np.quantile(diffs, 0.99)) * 255, 2),
            "max": round(float(diffs.max()) * 255, 2),
        },
    }
    out = Path(args.out or f"benchmarks/results/decode_{args.side}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
