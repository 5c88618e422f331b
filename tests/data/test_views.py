"""A reinforced cache's views: crop boxes and flips that depend only on (seed, row, view), applied to
any batch of model inputs the same way."""

import numpy as np
import torch

from clipdistill.data.views import IDENTITY, apply_views, pick_views, step_views, view_params


def test_view_0_is_the_identity_and_boxes_stay_inside_the_image():
    params = view_params(seed=0, rows=np.arange(500), views=4, min_scale=0.5)
    assert params.shape == (500, 4, 5) and params.dtype == np.float32
    assert (params[:, 0] == np.asarray(IDENTITY, dtype=np.float32)).all()
    y0, x0, h, w, flip = np.moveaxis(params[:, 1:], -1, 0)
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 1 + 1e-6).all() and (x0 + w <= 1 + 1e-6).all()
    assert (h * w >= 0.5 - 1e-6).all() and (h * w <= 1 + 1e-6).all()
    ratio = w / h
    assert ((ratio >= 3 / 4 - 1e-5) & (ratio <= 4 / 3 + 1e-5)).all()
    assert set(np.unique(flip)) == {0.0, 1.0} and 0.4 < flip.mean() < 0.6
    assert (h < 0.999).mean() > 0.9  # crops, not the whole image


def test_views_depend_on_seed_row_and_view_only():
    rows = np.arange(100, 164)
    params = view_params(3, rows, 3, 0.4)
    order = np.random.default_rng(0).permutation(len(rows))
    np.testing.assert_array_equal(view_params(3, rows[order], 3, 0.4), params[order])  # any batch order
    np.testing.assert_array_equal(view_params(3, rows[:7], 3, 0.4), params[:7])  # any batch split
    np.testing.assert_array_equal(view_params(3, rows, 5, 0.4)[:, :3], params)  # more views keep the first
    assert not np.array_equal(view_params(4, rows, 3, 0.4)[:, 1:], params[:, 1:])  # another seed
    assert not np.array_equal(params[:, 1], params[:, 2])


def test_pick_views_is_a_function_of_seed_step_and_row():
    rows = np.arange(2000)
    picked = pick_views(0, 7, rows, 4)
    assert picked.dtype == np.int64 and set(np.unique(picked)) == {0, 1, 2, 3}
    assert np.abs(np.bincount(picked) / len(rows) - 0.25).max() < 0.05
    np.testing.assert_array_equal(pick_views(0, 7, rows[::-1], 4), picked[::-1])
    assert not np.array_equal(pick_views(0, 8, rows, 4), picked)
    assert not np.array_equal(pick_views(1, 7, rows, 4), picked)
    assert (pick_views(0, 7, rows, 1) == 0).all()


def test_apply_views_crops_resizes_and_flips():
    images = torch.randn(3, 3, 8, 8)
    params = torch.tensor([IDENTITY, [0, 0, 1, 1, 1.0], [0, 0.5, 0.5, 0.5, 0.0]])
    out = apply_views(images, params)
    assert torch.equal(out[0], images[0])  # the identity: untouched, bit for bit
    torch.testing.assert_close(out[1], images[1].flip(-1), rtol=0, atol=1e-5)
    # the top-right quarter upsampled 2x: output (1, 1) is a quarter pixel past source (0, 4)
    quarter = images[2, :, :4, 4:]
    expected = (
        0.5625 * quarter[:, 0, 0] + 0.1875 * quarter[:, 0, 1] + 0.1875 * quarter[:, 1, 0]
        + 0.0625 * quarter[:, 1, 1]
    )  # fmt: skip
    torch.testing.assert_close(out[2, :, 1, 1], expected, rtol=0, atol=1e-5)
    assert torch.equal(apply_views(images, torch.tensor([IDENTITY] * 3)), images)


def test_apply_views_commutes_with_normalisation():
    """Teacher and student normalise differently; a view of the normalised input is the normalised view."""
    pixels = torch.rand(4, 3, 16, 16)
    params = torch.from_numpy(view_params(0, np.arange(4), 2, 0.3)[:, 1])
    mean = torch.tensor([0.3, 0.4, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1)
    normalised_view = (apply_views(pixels, params) - mean) / std
    torch.testing.assert_close(apply_views((pixels - mean) / std, params), normalised_view, rtol=0, atol=1e-5)


def test_step_views_are_fresh_at_every_step_and_reproducible():
    rows = np.arange(64)
    first = step_views(0, 3, rows, 0.5)
    assert first.shape == (64, 5)
    assert np.array_equal(first, step_views(0, 3, rows, 0.5))
    assert np.array_equal(first[10:20], step_views(0, 3, rows[10:20], 0.5))  # any batch order
    assert not np.array_equal(first, step_views(0, 4, rows, 0.5))
    assert not np.array_equal(first, step_views(1, 3, rows, 0.5))
    area = first[:, 2] * first[:, 3]
    assert (area >= 0.5 - 1e-6).all() and (area <= 1.0 + 1e-6).all()
    assert 0.3 < first[:, 4].mean() < 0.7  # about half are mirrored
