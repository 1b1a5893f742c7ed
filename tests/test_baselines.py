"""CFLOW-AD and ViTAD: references for their maths, and every registered model through train/save/reload."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch.distributions import Normal

from tests.test_vqflow_model import TINY, _randomize, tiny_features
from vqflow.weights import load_model, save_model
from vqflow.models import available_models, create_model, make_config
from vqflow.models.cflow import conditional_decoder, per_dim_log_likelihood
from vqflow.models.layers import positional_encoding_2d
from vqflow.train import TrainConfig, seed_everything, train_model

TINY_BY_MODEL = {
    "vqflow": TINY,
    "msflow": TINY,
    "cflow": dict(in_channels=TINY["in_channels"], image_size=32, coupling_blocks=2, pe_channels=8, chunk_size=16),
    "vitad": dict(
        in_channels=TINY["in_channels"],
        image_size=32,
        patch_size=8,
        decoder_dim=12,
        decoder_heads=2,
        blocks_per_stage=1,
        smoothing_sigma=1.0,
        pool_size=4,
    ),
    "padim": dict(in_channels=TINY["in_channels"], image_size=32, stages=[0, 1], smoothing_sigma=1.0),
}
CFG = TrainConfig(epochs=3, batch_size=4, lr=1e-3, warmup_epochs=1, checkpoint_every=1, init_images=8, seed=5)


def tiny_model(name: str, **overrides):
    seed_everything(0)
    return create_model(name, make_config(name, {**TINY_BY_MODEL[name], **overrides}))


def test_every_registered_model_has_a_tiny_config():
    assert available_models() == sorted(TINY_BY_MODEL)


# ------------------------------------------------------------------------------------------------ CFLOW-AD


def test_cflow_log_likelihood_equals_autograd_jacobian():
    """log p(x)/C from the flow == (sum log N(z; 0, 1) + log|det dz/dx|) / C with the Jacobian by autograd."""
    torch.manual_seed(0)
    decoder = _randomize(conditional_decoder(6, 4, 3, 1.9)).double().eval()
    x, cond = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = decoder(x, c=[cond])
        ours = per_dim_log_likelihood(z, logdet)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: decoder(v[None], c=[cond[i : i + 1]])[0][0], x[i])
        reference = float(Normal(0.0, 1.0).log_prob(z[i]).sum() + torch.linalg.slogdet(jac).logabsdet) / 6
        assert abs(float(ours[i] - reference)) < 1e-6


def test_cflow_chunks_cover_every_vector_once_with_its_position():
    model = tiny_model("cflow")
    features = tiny_features(3)
    seen = {}
    for index, vectors, conds in model.training_chunks(features):
        assert len(vectors) <= model.config.chunk_size and conds.shape == (len(vectors), 8)
        seen.setdefault(index, []).append((vectors, conds))
    assert sorted(seen) == [0, 1, 2]
    for index, stage in enumerate(model.config.stages):
        x = features[stage]
        b, c, h, w = x.shape
        vectors = torch.cat([v for v, _ in seen[index]])
        conds = torch.cat([p for _, p in seen[index]])
        assert len(vectors) == b * h * w
        expected = {tuple(v.tolist()): None for v in x.permute(0, 2, 3, 1).reshape(-1, c)}
        assert {tuple(v.tolist()) for v in vectors} == set(expected)
        pe = positional_encoding_2d(8, h, w)
        for v, p in zip(vectors[:10], conds[:10]):  # each vector carries the encoding of its own position
            img, row, col = [int(t) for t in (x.permute(0, 2, 3, 1) == v).all(-1).nonzero()[0]]
            assert torch.equal(p, pe[:, row, col])


def test_cflow_normaliser_is_fitted_on_training_data_and_scores_are_per_image():
    model = tiny_model("cflow")
    train = tiny_features(8)
    train_model(model, train, CFG, torch.device("cpu"), progress=False)
    with torch.no_grad():
        peaks = torch.stack([m.amax() for m in model.log_p_maps(train)])
    torch.testing.assert_close(model.log_p_max, peaks)
    test = tiny_features(4, seed=9)
    together = model.predict(test)
    alone = model.predict([f[2:3] for f in test])
    torch.testing.assert_close(together.scores[2:3], alone.scores)
    assert torch.equal(together.scores, together.maps.flatten(1).amax(1))


def test_vqflow_train_normalisation_is_fitted_on_training_data_and_scores_are_per_image():
    model = tiny_model("vqflow", normalization="train")
    train = tiny_features(8)
    train_model(model, train, CFG, torch.device("cpu"), progress=False)
    with torch.no_grad():
        zs, _, proto_q, _ = model.encode(train)
        log_p = model.log_p_maps(zs, proto_q)
        total = sum(torch.nn.functional.interpolate(m[:, None], size=(32, 32), mode="bilinear")[:, 0] for m in log_p)
    torch.testing.assert_close(model.log_p_max, torch.stack([m.amax() for m in log_p] + [total.amax()]))
    test = tiny_features(4, seed=9)
    torch.testing.assert_close(model.predict(test).scores[1:2], model.predict([f[1:2] for f in test]).scores)
    assert "log_p_max" not in tiny_model("vqflow", normalization="image").state_dict(), (
        "per-image models keep their old weight files"
    )


# ------------------------------------------------------------------------------------------------ ViTAD


def test_vitad_map_is_scipy_gaussian_of_the_mean_cosine_distance_and_score_is_pooled_max():
    model = _randomize(tiny_model("vitad", smoothing_sigma=2.0)).eval()
    features = tiny_features(2)
    with torch.no_grad():
        targets, predictions = model.reconstruct(features)
        prediction = model.predict(features)
    for t, p in zip(targets, predictions):
        assert t.shape == p.shape and t.shape[-1] == 32 // 8
    cosine = [1 - (t * p).sum(1) / (t.norm(dim=1) * p.norm(dim=1)) for t, p in zip(targets, predictions)]
    mean = sum(torch.nn.functional.interpolate(c[:, None], size=(32, 32), mode="bilinear")[:, 0] for c in cosine) / 3
    for i in range(2):
        smoothed = ndimage.gaussian_filter(mean[i].double().numpy(), sigma=2.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(prediction.maps[i].numpy(), smoothed, atol=1e-5)
        windows = np.lib.stride_tricks.sliding_window_view(smoothed, (4, 4)).mean((-1, -2))
        assert abs(float(prediction.scores[i]) - windows.max()) < 1e-5


def test_vitad_decoder_is_as_wide_as_a_vit_encoder_without_heads_and_reconstructs_mirrored():
    model = tiny_model("vitad", in_channels=[12, 12, 12, 12])
    assert all(isinstance(h, torch.nn.Identity) for h in model.heads)
    cnn = tiny_model("vitad")
    assert [h.out_features for h in cnn.heads] == [
        TINY["in_channels"][2],
        TINY["in_channels"][1],
        TINY["in_channels"][0],
    ]


def test_vitad_trains_on_a_plain_vit_encoder():
    from vqflow.backbones import FeaturePyramid

    torch.manual_seed(0)
    encoder = FeaturePyramid("vit_small_patch16_224.dino", pretrained=False)
    assert encoder.channels == [384] * 4
    features = encoder(torch.rand(4, 3, 64, 64))
    model = create_model(
        "vitad",
        make_config(
            "vitad",
            dict(
                in_channels=encoder.channels,
                image_size=64,
                decoder_dim=384,
                decoder_heads=6,
                blocks_per_stage=1,
                pool_size=4,
            ),
        ),
    )
    history = train_model(
        model,
        features,
        TrainConfig(epochs=3, batch_size=2, lr=1e-3, warmup_epochs=0),
        torch.device("cpu"),
        progress=False,
    )
    assert history[-1]["loss"] < history[0]["loss"]
    with pytest.raises(ValueError, match="need a CNN pyramid"):
        tiny_model("vqflow", in_channels=[384] * 4, image_size=64).initialize(features)


# ------------------------------------------------------------------------------------------------ every model


@pytest.mark.parametrize("name", sorted(TINY_BY_MODEL))
def test_model_trains_saves_and_reloads_to_identical_scores(tmp_path, name):
    model = tiny_model(name)
    history = train_model(model, tiny_features(8), CFG, torch.device("cpu"), progress=False)
    if model.trainable:
        assert len(history) == 3 and all(math.isfinite(row["loss"]) for row in history)
    else:  # fitted in one pass after the (skipped) epochs
        assert [row["epoch"] for row in history] == [0]
    save_model(model, name, model.config, tmp_path / "m")
    loaded, meta = load_model(tmp_path / "m")
    assert meta["model"] == name and type(loaded) is type(model)
    test = tiny_features(5, seed=4)
    a, b = model.eval().predict(test), loaded.predict(test)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert a.maps.shape == (5, 32, 32) and a.scores.shape == (5,)


def test_unknown_model_params_are_named():
    with pytest.raises(ValueError, match=r"model.cflow: unknown params \['flow_blocks'\]"):
        make_config("cflow", {"flow_blocks": [1, 1, 1]})
    with pytest.raises(ValueError, match="model.name: unknown model 'patchcore'"):
        make_config("patchcore", {})
