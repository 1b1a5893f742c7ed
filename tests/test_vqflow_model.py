import numpy as np
import pytest
import torch
from torch.distributions import Normal

from vqflow.weights import load_model, save_model
from vqflow.models import create_model, make_config
from vqflow.models.cadm import gaussian_log_density, mixture_log_density, summed_log_density
from vqflow.models.flows import FusionCoupling, parallel_flow

TINY = dict(
    in_channels=[4, 6, 8, 10],
    image_size=32,
    embed_dim=8,
    pe_channels=4,
    num_prototypes=3,
    num_patterns=5,
    flow_blocks=[1, 2, 2],
)


def tiny_features(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, 32 // s, 32 // s, generator=g) for c, s in zip(TINY["in_channels"], (4, 8, 16, 32))]


def _randomize(model, seed=0):
    """Zero-initialised last layers make a fresh flow the identity: perturb every parameter so tests bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _model(name="vqflow", **overrides):
    torch.manual_seed(0)
    np.random.seed(0)
    model = create_model(name, make_config(name, {**TINY, **overrides}))
    model.initialize(tiny_features(8, seed=1))
    return _randomize(model).eval()


@pytest.mark.parametrize(
    "cond, kernels, separable", [(0, (3,), False), (3, (3,), False), (3, (3, 1), False), (3, (3,), True)]
)
def test_parallel_flow_is_invertible(cond, kernels, separable):
    torch.manual_seed(0)
    flow = _randomize(parallel_flow(6, 5, 5, 3, cond, 1.9, kernels, separable))
    x, c = torch.randn(2, 6, 5, 5), ([torch.randn(2, 3, 5, 5)] if cond else None)
    z, logdet = flow(x, c=c)
    back, inv_logdet = flow(z, c=c, rev=True)
    assert (back - x).abs().max() < 1e-4
    torch.testing.assert_close(logdet, -inv_logdet, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kernels, separable, blocks, reach",
    [((3,), False, 1, 2), ((1, 3), False, 1, 0), ((1,), False, 3, 0), ((3,), True, 1, 2)],
)
def test_subnet_kernels_set_how_far_a_pixel_reaches(kernels, separable, blocks, reach):
    """A change of one input pixel moves the outputs within the flow's receptive field only: a block's subnet (two
    k x k convolutions, separable or not) reaches k - 1 pixels; 1 x 1 subnets none (block i takes the i-th kernel
    size of the cycle: (1, 3) starts with 1 x 1)."""
    torch.manual_seed(0)
    flow = _randomize(parallel_flow(4, 9, 9, blocks, 0, 1.9, kernels, separable)).eval()
    x = torch.randn(1, 4, 9, 9)
    moved = x.clone()
    moved[0, :, 4, 4] += 1.0
    with torch.no_grad():
        changed = (flow(moved)[0] - flow(x)[0]).abs().amax(1)[0] > 1e-6
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert int(torch.maximum((rows - 4).abs(), (cols - 4).abs()).max()) == reach, changed.int()


def test_fusion_coupling_is_invertible():
    torch.manual_seed(0)
    fusion = _randomize(FusionCoupling([4, 6, 8], cond_channels=5))
    xs = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)]
    proto = torch.randn(2, 5)
    zs, logdet = fusion(xs, proto)
    back, inv = fusion(zs, proto, rev=True)
    assert max((b - x).abs().max() for b, x in zip(back, xs)) < 1e-4
    torch.testing.assert_close(logdet, -inv, atol=1e-4, rtol=1e-4)


def _jacobian_logdet(fn, x):
    jac = torch.autograd.functional.jacobian(fn, x)
    return torch.linalg.slogdet(jac.reshape(x.numel(), x.numel()).double())[1]


def test_flow_logdet_equals_autograd_jacobian():
    torch.manual_seed(0)
    flow = _randomize(parallel_flow(4, 2, 2, 2, 2, 1.9)).double()
    x, c = torch.randn(1, 4, 2, 2, dtype=torch.float64), torch.randn(1, 2, 2, 2, dtype=torch.float64)
    expected = _jacobian_logdet(lambda v: flow(v, c=[c])[0], x)
    torch.testing.assert_close(flow(x, c=[c])[1][0], expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("vqflow", {}),
        ("msflow", {}),
        ("vqflow", {"cadm_placement": "parallel"}),
        ("vqflow", {"flow_kernels": [3, [3, 1], 1], "fusion_kernel": 1, "separable": True}),
    ],
)
def test_whole_model_invertible_and_logdet_matches_autograd(name, overrides):
    model = _model(name, **overrides).double()
    feats = [f.double()[:1] for f in tiny_features(1)]
    pooled = model.flow_inputs(feats)
    proto = model._prototype(feats).output if model.config.cpc else None
    conds, _ = model._conditions(pooled, proto)
    zs, logdet = model.transform(pooled, conds, proto)
    back, _ = model.transform(zs, conds, proto, rev=True)
    assert max((b - x).abs().max() for b, x in zip(back, pooled)) < 1e-4

    sizes = [p.numel() for p in pooled]
    flat = torch.cat([p.flatten() for p in pooled])

    def fn(v):
        parts = [chunk.view_as(p) for chunk, p in zip(torch.split(v, sizes), pooled)]
        return torch.cat([z.flatten() for z in model.transform(parts, conds, proto)[0]])

    jac = torch.autograd.functional.jacobian(fn, flat)
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-6, rtol=1e-6)


def test_cadm_log_density_equals_torch_normal():
    g = torch.Generator().manual_seed(0)
    z, mean, log_scale = (
        torch.randn(3, 4, 5, 5, generator=g),
        torch.randn(3, 4, 1, 1, generator=g),
        torch.randn(3, 4, 1, 1, generator=g),
    )
    expected = Normal(mean, log_scale.exp()).log_prob(z)
    torch.testing.assert_close(gaussian_log_density(z, mean, log_scale), expected)
    zs = [z, torch.randn(3, 2, 2, 2, generator=g)]
    params = [
        (mean[:, :, 0, 0], log_scale[:, :, 0, 0]),
        (torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)),
    ]
    total = sum(
        Normal(m[:, :, None, None], s.exp()[:, :, None, None]).log_prob(zz).sum((1, 2, 3))
        for zz, (m, s) in zip(zs, params)
    )
    torch.testing.assert_close(summed_log_density(zs, params), total)
    standard = sum(Normal(0.0, 1.0).log_prob(zz).sum((1, 2, 3)) for zz in zs)
    torch.testing.assert_close(summed_log_density(zs, None), standard)


def test_base_densities_of_bfloat16_latents_are_summed_in_float32():
    """Under train.precision: bfloat16 the flows return bfloat16 latents; their densities over a 32 x 32 x 64 scale
    must be float32 sums (a bfloat16 sum of ~65k terms is off by tens of nats)."""
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(2, 64, 32, 32, generator=g).bfloat16(), torch.randn(2, 32, 16, 16, generator=g).bfloat16()]
    params = [  # under autocast the CADM heads (linear layers) return bfloat16 too
        (
            0.1 * torch.randn(2, z.shape[1], generator=g).bfloat16(),
            0.1 * torch.randn(2, z.shape[1], generator=g).bfloat16(),
        )
        for z in zs
    ]
    total = summed_log_density(zs, params)
    assert total.dtype == torch.float32
    reference = sum(
        Normal(m.double()[:, :, None, None], s.double().exp()[:, :, None, None]).log_prob(z.double()).sum((1, 2, 3))
        for z, (m, s) in zip(zs, params)
    )
    torch.testing.assert_close(total.double(), reference, atol=0.05, rtol=1e-6)
    standard = sum(Normal(0.0, 1.0).log_prob(z.double()).sum((1, 2, 3)) for z in zs)
    torch.testing.assert_close(summed_log_density(zs, None).double(), standard, atol=0.05, rtol=1e-6)
    log_w = torch.log_softmax(torch.randn(2, generator=g), 0)
    upcast = [z.float() for z in zs]  # the same values in float32
    upcast_params = [(m.float(), s.float()) for m, s in params]
    expected = mixture_log_density(upcast, upcast_params, log_w)
    torch.testing.assert_close(mixture_log_density(zs, params, log_w), expected)


def test_soft_mixture_equals_brute_force_logsumexp():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    k = 4
    params = [
        (torch.randn(k, 3, generator=g), 0.5 * torch.randn(k, 3, generator=g)),
        (torch.randn(k, 5, generator=g), 0.5 * torch.randn(k, 5, generator=g)),
    ]
    log_w = torch.log_softmax(torch.randn(k, generator=g), 0)
    brute = torch.stack(
        [
            log_w[j]
            + sum(
                Normal(m[j][None, :, None, None], s[j].exp()[None, :, None, None]).log_prob(z).sum((1, 2, 3))
                for z, (m, s) in zip(zs, params)
            )
            for j in range(k)
        ],
        1,
    ).logsumexp(1)
    torch.testing.assert_close(mixture_log_density(zs, params, log_w), brute, atol=1e-3, rtol=1e-5)


def test_log_likelihood_includes_minus_log_sigma():
    """Scaling the base sigma by e must lower log p by (number of latent dims) nats for the same z."""
    model = _model()
    feats = tiny_features(2)
    zs, logdet, proto_q, _ = model.encode(feats)
    before = model.log_likelihood([torch.zeros_like(z) for z in zs], logdet, proto_q)
    with torch.no_grad():
        for head in model.base.means:
            head[-1].weight.zero_()
            head[-1].bias.zero_()
        for head in model.base.log_scales:
            head[-1].weight.zero_()
            head[-1].bias.fill_(0.0)
        base0 = model.log_likelihood([torch.zeros_like(z) for z in zs], logdet, proto_q)
        for head in model.base.log_scales:
            head[-1].bias.fill_(4.0 * float(np.arctanh(1 / 4.0)))  # log sigma = 1 after the soft bound
        base1 = model.log_likelihood([torch.zeros_like(z) for z in zs], logdet, proto_q)
    dims = sum(z[0].numel() for z in zs)
    torch.testing.assert_close(base0 - base1, torch.full_like(base0, float(dims)), atol=1e-3, rtol=1e-5)
    assert before.shape == (2,)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"cspc_mode": "naive"},
        {"cadm_mixture": "soft"},
        {"pe": False},
        {"cspc": False},
        {"cadm": False, "cspc": False},
    ],
)
def test_ablation_switches_train_and_predict(overrides):
    model = _model(**overrides)
    model.train()
    out = model.training_step(tiny_features(4))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.eval()
    features = tiny_features(3)
    pred = model.predict(features)
    assert pred.scores.shape == (3,) and pred.maps.shape == (3, 32, 32)
    assert torch.isfinite(pred.maps).all() and torch.isfinite(pred.scores).all()
    # an image's score and map do not depend on the images scored with it
    alone = model.predict([f[1:2] for f in features])
    torch.testing.assert_close(alone.scores, pred.scores[1:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.maps, pred.maps[1:2], atol=1e-5, rtol=1e-5)


def test_invalid_switch_combination_is_named():
    with pytest.raises(ValueError, match="model.cadm needs model.cpc"):
        make_config("vqflow", {**TINY, "cpc": False})


@pytest.mark.parametrize(
    "field, value, message, boundary",
    [
        ("map_scales", 0, "map_scales must be 1, 2 or 3", 1),
        ("map_scales", 4, "map_scales must be 1, 2 or 3", 3),
        ("map_sigma", -1.0, "map_sigma must be >= 0", 0.0),
    ],
)
def test_invalid_anomaly_map_setting_is_named(field, value, message, boundary):
    with pytest.raises(ValueError, match=f"model.{message}.*got {value}"):
        make_config("vqflow", {**TINY, field: value})
    assert getattr(make_config("vqflow", {**TINY, field: boundary}), field) == boundary  # the valid value next to it


def test_msflow_is_vqflow_with_every_vq_part_off_and_the_published_pe_condition():
    cfg = make_config("msflow", {**TINY, "cpc": True, "pe": False})
    assert not (cfg.cpc or cfg.cspc or cfg.cadm) and cfg.pe
    model = create_model("msflow", cfg)
    assert model.cond_dim == TINY["pe_channels"], "every parallel flow is conditioned on the positional encoding"


def test_reloaded_model_gives_identical_scores(tmp_path):
    model = _model()
    save_model(model, "vqflow", model.config, tmp_path / "m")
    loaded, meta = load_model(tmp_path / "m")
    assert meta["model"] == "vqflow"
    feats = tiny_features(5, seed=3)
    a, b = model.predict(feats), loaded.predict(feats)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert torch.equal(a.extras["concept"], b.extras["concept"])
    assert not list(tmp_path.glob("**/*.pt*")), "no pickle files"


def test_a_model_saved_before_the_layout_fields_loads_with_the_layout_it_was_trained_with(tmp_path):
    import json

    model = _model(flow_stages=[0, 1, 2], pool=True, normalization="image", map_scales=3, map_sigma=0.0)
    save_model(model, "vqflow", model.config, tmp_path / "m")
    meta = json.loads((tmp_path / "m/config.json").read_text())
    for added in ("flow_stages", "pool", "normalization", "cadm_placement", "map_scales", "map_sigma"):
        del meta["config"][added]
    (tmp_path / "m/config.json").write_text(json.dumps(meta))
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.flow_stages == [0, 1, 2] and loaded.config.pool and loaded.config.normalization == "image"
    assert (loaded.config.map_scales, loaded.config.map_sigma) == (3, 0.0)
    feats = tiny_features(3, seed=2)
    a, b = model.predict(feats), loaded.predict(feats)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


@pytest.mark.parametrize("scales, sigma", [(2, 4.0), (3, 0.0), (1, 2.0)])
def test_the_anomaly_map_is_the_smoothed_add_map_of_the_finest_scales(scales, sigma):
    """predict's map against a direct computation: scales - sum over the finest ``scales`` of upsampled
    exp(log p_l - c_l) (c_l = the training maximum of scale l), then scipy's Gaussian filter (mirrored borders)."""
    from scipy.ndimage import gaussian_filter

    model = _model(normalization="position", map_scales=scales, map_sigma=sigma)
    with torch.no_grad():
        model.fit_statistics([tiny_features(4, seed=s) for s in (5, 6)])
        test = tiny_features(3, seed=9)
        log_p = model.log_p_maps(*_encoded(model, test))
        probs = [np.exp((m - model.log_p_max[l]).numpy()) for l, m in enumerate(log_p[:scales])]
        up = [
            torch.nn.functional.interpolate(torch.from_numpy(p)[:, None], size=32, mode="bilinear")[:, 0] for p in probs
        ]
        added = scales - sum(up).numpy()
        expected = gaussian_filter(added, (0, sigma, sigma), mode="mirror", truncate=4.0) if sigma else added
        np.testing.assert_allclose(model.predict(test).maps.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_position_normalization_standardises_each_scale_with_the_training_statistics():
    """The fitted per-position mean/std equal torch's over the training images' -log p maps (floored std), and
    the image score is the top-k mean of sum_l upsample(z_l): both checked against a direct computation."""
    from vqflow.models.anomaly_map import floored_std, top_k_score, upsample

    model = _model(normalization="position")
    batches = [tiny_features(4, seed=s) for s in (5, 6, 7)]
    with torch.no_grad():
        model.fit_statistics(batches)
        maps = [torch.cat(parts) for parts in zip(*[model.log_p_maps(*_encoded(model, b)) for b in batches])]
        for l, m in enumerate(maps):
            nll = -m.double()
            assert torch.allclose(getattr(model, f"nll_mean_{l}").double(), nll.mean(0), atol=1e-5)
            expected_std = floored_std(nll.std(0, correction=0)).float()
            assert torch.allclose(getattr(model, f"nll_std_{l}"), expected_std, atol=1e-5)
        test = tiny_features(3, seed=9)
        log_p = model.log_p_maps(*_encoded(model, test))
        z = sum(
            upsample((-m - getattr(model, f"nll_mean_{l}")) / getattr(model, f"nll_std_{l}"), 32)
            for l, m in enumerate(log_p)
        )
        assert torch.allclose(model.predict(test).scores, top_k_score(z, model.config.top_k), atol=1e-5)


def _encoded(model, features):
    zs, _, proto_q, _ = model.encode(features)
    return zs, proto_q


@pytest.mark.parametrize("images", [40, 6])  # more and fewer training images than channels (shrinkage needed)
def test_pooled_gaussian_equals_sklearn_ledoit_wolf_mahalanobis(images):
    from sklearn.covariance import LedoitWolf

    from vqflow.models.global_density import PooledGaussian

    g = torch.Generator().manual_seed(images)
    mixing = torch.randn(10, 10, generator=g)
    train = torch.randn(images, 10, generator=g) @ mixing + 3.0
    test = torch.randn(7, 10, generator=g) @ mixing * 1.5 + 3.0
    density = PooledGaussian(10)
    density.fit(train)
    reference = LedoitWolf().fit(train.double().numpy())
    expected = -0.5 * reference.mahalanobis(test.double().numpy()) / 10  # sklearn: squared distances
    np.testing.assert_allclose(density.log_density(test).numpy(), expected, rtol=1e-4)
    nll = 0.5 * reference.mahalanobis(train.double().numpy()) / 10
    assert float(density.nll_mean) == pytest.approx(nll.mean(), rel=1e-4)
    assert float(density.nll_std) == pytest.approx(nll.std(), rel=1e-4)
    with pytest.raises(ValueError, match="at least 2 training images"):
        PooledGaussian(10).fit(train[:1])


@pytest.mark.parametrize("normalization, weight", [("train", 1.0), ("train", 3.0), ("position", 2.0)])
def test_global_gaussian_is_a_fourth_scale_of_the_detection_map(normalization, weight):
    """The image score with the global term = the top-k mean of the local detection map plus the pooled stride-32
    feature's weighted -log p (train) or standardised -log p (position) at every pixel; the training reference c
    includes the term; the anomaly map does not change."""
    from sklearn.covariance import LedoitWolf

    from vqflow.models.anomaly_map import log_map, top_k_score

    model = _model(normalization=normalization, global_gaussian=True, global_weight=weight)
    batches = [tiny_features(4, seed=s) for s in (5, 6, 7)]
    with torch.no_grad():
        model.fit_statistics(batches)
        pooled = torch.cat([b[3].mean((2, 3)) for b in batches])
        reference = LedoitWolf().fit(pooled.double().numpy())
        test = tiny_features(3, seed=9)
        pooled_test = test[3].mean((2, 3)).double().numpy()
        nll = torch.from_numpy(0.5 * reference.mahalanobis(pooled_test) / TINY["in_channels"][3]).float()
        log_p = model.log_p_maps(*_encoded(model, test))
        if normalization == "train":
            train_nll = torch.from_numpy(0.5 * reference.mahalanobis(pooled.double().numpy()) / TINY["in_channels"][3])
            train_nll = train_nll.float()
            train_totals = torch.cat(
                [log_map(model.log_p_maps(*_encoded(model, b)), 32, torch.zeros(())) for b in batches]
            )
            c = (-train_totals.flatten(1).amin(1) - weight * train_nll).max()
            assert float(model.log_p_max[3]) == pytest.approx(float(c), abs=1e-4)
            local = log_map(log_p, 32, model.log_p_max[3])
            expected = top_k_score(local + weight * nll[:, None, None], model.config.top_k)
        else:
            spread = (nll - model.global_density.nll_mean) / model.global_density.nll_std
            expected = top_k_score(model.position_map(log_p) + weight * spread[:, None, None], model.config.top_k)
        prediction = model.predict(test)
        torch.testing.assert_close(prediction.scores, expected, atol=1e-4, rtol=1e-4)
        model.config.global_gaussian = False
        without = model.predict(test)
        assert torch.equal(without.maps, prediction.maps)
        assert not torch.allclose(without.scores, prediction.scores)


def test_global_gaussian_needs_a_training_reference_and_msflow_keeps_it_off():
    with pytest.raises(ValueError, match="global_gaussian.*normalization: image"):
        make_config("vqflow", {**TINY, "global_gaussian": True, "normalization": "image"})
    with pytest.raises(ValueError, match="global_weight must be > 0"):
        make_config("vqflow", {**TINY, "global_gaussian": True, "global_weight": 0})
    assert not make_config("msflow", {**TINY, "global_gaussian": True}).global_gaussian
