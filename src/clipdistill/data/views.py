"""Augmented views of a reinforced teacher cache (`embed --embed.views N`).

A view is a random resized crop and an optional horizontal flip of the model's input image, stored
as five numbers `(y0, x0, h, w, flip)`: the crop box in fractions of the image side and 1.0 for a
flip. View 0 is always the identity (the plain centre view), so a cache's first view is the
one-view cache. Every number is a pure function of (view seed, sample row, view) or, for the view a
training step draws, of (train seed, step, sample row): reruns, resumed runs, any batch order and any
number of ranks see the same views.

The crop is applied to the preprocessed model input (`apply_views`), for every data source alike, by
bilinear resampling; the teacher's input at `embed` and the student's input at `train` go through
the same function, so the student sees exactly the view its target was computed on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PARAMS = 5  # y0, x0, h, w, flip
IDENTITY = (0.0, 0.0, 1.0, 1.0, 0.0)
ATTEMPTS = 10  # torchvision's RandomResizedCrop: 10 draws, then the whole image
RATIO = (3 / 4, 4 / 3)  # aspect ratios of the crop box (torchvision's default)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash of each value."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_keys(*keys: np.ndarray | int) -> np.ndarray:
    """One 64-bit hash per element of the broadcast keys (counter-based: no generator state)."""
    arrays = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    h = np.zeros(arrays[0].shape, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in arrays:
            h = _mix(h ^ (key.astype(np.uint64) + _GOLDEN))
    return h


def uniform(*keys: np.ndarray | int) -> np.ndarray:
    """Uniform floats in [0, 1), one per element of the broadcast keys."""
    return (hash_keys(*keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def view_params(seed: int, rows: np.ndarray, views: int, min_scale: float) -> np.ndarray:
    """float32 [len(rows), views, 5]: view 0 the identity, views 1.. a random resized crop (area a
    fraction in [min_scale, 1] of the image, aspect ratio in 3/4..4/3) flipped with probability 1/2."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.tile(np.asarray(IDENTITY, dtype=np.float32), (len(rows), views, 1))
    if views == 1:
        return out
    r = rows[:, None, None]
    v = np.arange(1, views)[None, :, None]
    attempt = np.arange(ATTEMPTS)[None, None, :]
    area = min_scale + (1.0 - min_scale) * uniform(seed, r, v, attempt, 0)
    low, high = math.log(RATIO[0]), math.log(RATIO[1])
    log_ratio = low + (high - low) * uniform(seed, r, v, attempt, 1)
    w = np.sqrt(area * np.exp(log_ratio))
    h = np.sqrt(area / np.exp(log_ratio))
    fits = (w <= 1.0) & (h <= 1.0)
    first = np.argmax(fits, axis=-1)[..., None]  # the first box that fits (none fits: the whole image)
    any_fit = fits.any(axis=-1)
    w = np.where(any_fit, np.take_along_axis(w, first, -1)[..., 0], 1.0)
    h = np.where(any_fit, np.take_along_axis(h, first, -1)[..., 0], 1.0)
    y0 = (1.0 - h) * uniform(seed, rows[:, None], v[..., 0], ATTEMPTS, 2)
    x0 = (1.0 - w) * uniform(seed, rows[:, None], v[..., 0], ATTEMPTS, 3)
    flip = (uniform(seed, rows[:, None], v[..., 0], ATTEMPTS, 4) < 0.5).astype(np.float64)
    out[:, 1:] = np.stack([y0, x0, h, w, flip], axis=-1).astype(np.float32)
    return out


def pick_views(seed: int, step: int, rows: np.ndarray, views: int) -> np.ndarray:
    """int64 [len(rows)]: the view each sample trains on at `step` (uniform over the cache's views)."""
    return (hash_keys(seed, step, np.asarray(rows, dtype=np.int64)) % np.uint64(views)).astype(np.int64)


def step_views(seed: int, step: int, rows: np.ndarray, min_scale: float) -> np.ndarray:
    """float32 [len(rows), 5]: a fresh random resized crop and flip of each sample for training step
    `step` (`train.augment`), drawn like a cache's views but new at every step."""
    step_seed = int(hash_keys(seed, step)[()] >> np.uint64(1))  # non-negative, fits int64
    return view_params(step_seed, rows, 2, min_scale)[:, 1]


def apply_views(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """images [B, C, H, W] cropped to each row's box, resized back to H x W (bilinear) and flipped
    where asked; identity rows are returned untouched, bit for bit."""
    params = params.to(device=images.device, dtype=torch.float32)
    identity = (params == torch.tensor(IDENTITY, device=images.device)).all(dim=1)
    if bool(identity.all()):
        return images
    y0, x0, h, w, flip = params.unbind(dim=1)
    sign = 1.0 - 2.0 * flip  # a flip mirrors the sampling grid's x axis
    theta = torch.zeros(len(images), 2, 3, device=images.device)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * x0 + w - 1  # the box's centre in [-1, 1] coordinates
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * y0 + h - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    sampled = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(identity[:, None, None, None], images, sampled.to(images.dtype))
