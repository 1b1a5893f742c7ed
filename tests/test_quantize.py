import torch

from vqflow.models.quantize import VectorQuantizer, perplexity


def _clusters(n_per: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    points = torch.cat([c + 0.3 * torch.randn(n_per, 2, generator=g) for c in centres])
    return centres, points


def _frozen(num_codes: int, dim: int) -> VectorQuantizer:
    """A quantizer with a random codebook in eval mode (no EMA updates)."""
    vq = VectorQuantizer(num_codes, dim)
    vq.codebook.copy_(torch.randn(num_codes, dim))
    vq.initialized.fill_(True)
    return vq.eval()


def test_nearest_code_matches_brute_force():
    vq = _frozen(7, 5)
    x = torch.randn(50, 5)
    out = vq(x)
    expected = torch.cdist(x, vq.codebook).argmin(1)
    assert torch.equal(out.indices, expected)
    assert torch.equal(out.codes, vq.codebook[expected])
    torch.testing.assert_close(out.output, vq.codebook[expected])


def test_straight_through_gradient_is_identity():
    vq = _frozen(4, 3)
    x = torch.randn(10, 3, requires_grad=True)
    weights = torch.randn(10, 3)
    (vq(x).output * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)


def test_commitment_loss_value_and_gradient():
    vq = _frozen(4, 3)
    x = torch.randn(10, 3, requires_grad=True)
    out = vq(x)
    torch.testing.assert_close(out.commitment, ((x - out.codes) ** 2).mean())
    out.commitment.backward()
    torch.testing.assert_close(x.grad, 2 * (x - out.codes).detach() / x.numel())


def test_kmeans_pp_init_from_data_and_ema_moves_codes_to_cluster_means():
    torch.manual_seed(0)
    centres, points = _clusters()
    vq = VectorQuantizer(3, 2, decay=0.9)
    vq.initialize(points, torch.Generator().manual_seed(1))
    assert all(any(torch.equal(code, p) for p in points) for code in vq.codebook), "codes start on data points"
    vq.codebook.copy_(centres + torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]))  # put codes off-centre
    vq.ema_sum.copy_(vq.codebook * vq.ema_count[:, None])
    vq.train()
    for _ in range(150):
        vq(points)
    means = torch.stack([points[i * 200 : (i + 1) * 200].mean(0) for i in range(3)])
    torch.testing.assert_close(vq.codebook, means, atol=1e-3, rtol=0)


def test_dead_codes_are_restarted_on_data():
    torch.manual_seed(0)
    _, points = _clusters()
    vq = VectorQuantizer(4, 2, decay=0.5)
    vq.initialize(points[:3].repeat(2, 1), torch.Generator().manual_seed(0))
    vq.codebook[3] = torch.tensor([100.0, 100.0])  # far from all data: never chosen
    vq.ema_sum[3] = vq.codebook[3] * vq.ema_count[3]
    vq.train()
    seen_far = []
    for _ in range(20):
        seen_far.append(bool((vq.codebook[3] == 100.0).all()))
        vq(points)
    assert seen_far[0] and not seen_far[-1]
    assert torch.cdist(vq.codebook[3:4], points).min() < 1.0, "the restarted code sits on the data"
    indices = vq(points).indices
    assert torch.bincount(indices, minlength=4).min() > 0


def test_perplexity():
    assert abs(perplexity(torch.tensor([5, 5, 5, 5])) - 4.0) < 1e-9
    assert abs(perplexity(torch.tensor([9, 0, 0])) - 1.0) < 1e-9
