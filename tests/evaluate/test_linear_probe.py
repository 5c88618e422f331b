import numpy as np
import torch

from clipdistill.evaluate.linear_probe import fit_logistic_regression, linear_probe

COSTS = (0.01, 1.0, 100.0)


def _blobs(rng, n, centers, noise=1.0):
    labels = rng.integers(len(centers), size=n)
    return centers[labels] + noise * rng.standard_normal((n, centers.shape[1])), labels


def test_separable_blobs_are_learned():
    rng = np.random.default_rng(0)
    centers = 4.0 * rng.standard_normal((4, 16))
    splits = [_blobs(rng, n, centers) for n in (300, 100, 200)]

    result = linear_probe(*splits[0], *splits[1], *splits[2], costs=COSTS)

    assert result["acc1"] > 95.0
    assert set(result["val_acc1"]) == {"0.01", "1.0", "100.0"}
    assert result["best_c"] in COSTS
    assert result["val_acc1"][str(result["best_c"])] == max(result["val_acc1"].values())


def test_random_labels_stay_near_chance():
    rng = np.random.default_rng(1)
    splits = [(rng.standard_normal((n, 16)), rng.integers(4, size=n)) for n in (300, 100, 400)]

    result = linear_probe(*splits[0], *splits[1], *splits[2], costs=COSTS)

    assert 10.0 < result["acc1"] < 40.0  # chance is 25%, sd ~2.2 points on 400 samples


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(2)
    centers = 2.0 * rng.standard_normal((3, 8))
    splits = [_blobs(rng, n, centers, noise=2.0) for n in (120, 60, 60)]
    as_numpy = [a for split in splits for a in split]
    as_torch = [torch.from_numpy(a) for a in as_numpy]

    assert linear_probe(*as_torch, costs=COSTS) == linear_probe(*as_numpy, costs=COSTS)


def test_fit_solves_sklearns_objective():
    """The closed-form gradient reaches sklearn's optimum: the same weights, to solver tolerance."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x, y = _blobs(rng, 400, 1.5 * rng.standard_normal((5, 12)), noise=2.0)
    for c in (0.01, 1.0):
        weight, bias = fit_logistic_regression(torch.from_numpy(x), torch.from_numpy(y), 5, c, max_iter=500)
        reference = LogisticRegression(C=c, max_iter=5000, tol=1e-10).fit(x, y)
        # the optimum's weights sum to zero over classes; the unpenalised bias is free up to a constant
        assert np.allclose(weight.T.numpy(), reference.coef_, atol=1e-3), c
        centred = bias.numpy() - bias.numpy().mean()
        assert np.allclose(centred, reference.intercept_ - reference.intercept_.mean(), atol=5e-3), c
