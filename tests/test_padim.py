"""PaDiM: the per-position Gaussian and the Mahalanobis map against numpy/scipy, fitted through the training loop."""

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.distance import mahalanobis

from tests.test_baselines import CFG, tiny_model
from tests.test_vqflow_model import tiny_features
from vqflow.train import train_model


def _embedding(features, stages=(0, 1), grid=8):
    """Numpy reference: stages on the finest grid by nearest repetition, concatenated -> (B, positions, dims)."""
    parts = []
    for s in stages:
        x = features[s].numpy()
        factor = grid // x.shape[-1]
        parts.append(x.repeat(factor, 2).repeat(factor, 3))
    x = np.concatenate(parts, 1)
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(0, 2, 1)


def test_padim_gaussian_and_distance_equal_numpy_and_scipy():
    train, test = tiny_features(12), tiny_features(2, seed=7)
    model = tiny_model("padim")
    history = train_model(model, train, CFG, torch.device("cpu"), progress=False)
    assert len(history) == 1 and not model.trainable
    ref_train, ref_test = _embedding(train).astype(np.float64), _embedding(test).astype(np.float64)
    distances = model.distances(test).flatten(1).numpy()
    for position in (0, 17, 63):
        samples = ref_train[:, position]
        mean = samples.mean(0)
        cov = np.cov(samples, rowvar=False) + 0.01 * np.eye(samples.shape[1])
        np.testing.assert_allclose(model.mean[position].numpy(), mean, atol=1e-5)
        np.testing.assert_allclose(model.precision[position].numpy(), np.linalg.inv(cov), rtol=1e-4, atol=1e-4)
        for b in range(2):
            expected = mahalanobis(ref_test[b, position], mean, np.linalg.inv(cov))
            np.testing.assert_allclose(distances[b, position], expected, rtol=1e-4)


def test_padim_map_is_smoothed_upsampled_distance_and_score_its_max():
    model = tiny_model("padim")
    train_model(model, tiny_features(12), CFG, torch.device("cpu"), progress=False)
    test = tiny_features(3, seed=2)
    prediction = model.predict(test)
    upsampled = torch.nn.functional.interpolate(
        model.distances(test)[:, None], size=(32, 32), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    expected = np.stack(
        [ndimage.gaussian_filter(m.astype(np.float64), 1.0, mode="mirror", truncate=4.0) for m in upsampled]
    )
    np.testing.assert_allclose(prediction.maps.numpy(), expected, atol=1e-5)
    assert torch.equal(prediction.scores, prediction.maps.flatten(1).amax(1))
    # an image far from the training data scores higher than the training images themselves
    shifted = [f + 3.0 for f in tiny_features(3, seed=2)]
    assert (model.predict(shifted).scores > model.predict(tiny_features(12)).scores.max()).all()


def test_padim_channel_subset_is_seeded_and_sized():
    a, b = tiny_model("padim", channels=5, seed=1), tiny_model("padim", channels=5, seed=1)
    assert torch.equal(a.channel_index, b.channel_index) and a.channel_index.numel() == 5
    assert a.precision.shape == (64, 5, 5)
    assert not torch.equal(a.channel_index, tiny_model("padim", channels=5, seed=2).channel_index)
