import numpy as np
import pytest
import torch
from PIL import Image

from vqflow.backbones import (
    FeaturePyramid,
    WeightsNotFoundError,
    create_classifier,
    packaged_state_dict,
    resolve_device,
)


def _imagenet_input(array: np.ndarray) -> torch.Tensor:
    img = Image.fromarray(array).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5


@pytest.fixture(scope="module")
def lite0_classifier():
    return create_classifier("tf_efficientnet_lite0", "packaged")


def test_lite0_sees_a_cat_in_chelsea(lite0_classifier):
    from skimage import data

    top = lite0_classifier(_imagenet_input(data.chelsea())).argmax(-1).item()
    assert 281 <= top <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_lite0_sees_espresso_or_cup_in_coffee(lite0_classifier):
    from skimage import data

    probs = lite0_classifier(_imagenet_input(data.coffee())).softmax(-1)[0]
    assert probs.argmax().item() in (967, 968)  # espresso, cup
    assert probs[967] + probs[968] > 0.5


@pytest.mark.parametrize(
    "name,channels",
    [
        ("tf_efficientnet_lite0", [24, 40, 112, 320]),
        ("tf_efficientnet_lite1", [24, 40, 112, 320]),
        ("tf_efficientnet_lite2", [24, 48, 120, 352]),
    ],
)
def test_pyramid_shapes_per_stage(name, channels):
    model = FeaturePyramid(name, "packaged")
    feats = model(torch.rand(2, 3, 256, 256))
    assert model.channels == channels
    assert [tuple(f.shape) for f in feats] == [(2, c, 256 // s, 256 // s) for c, s in zip(channels, (4, 8, 16, 32))]
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training, "the backbone stays in eval mode"


def test_packaged_weights_really_load():
    pretrained = FeaturePyramid("tf_efficientnet_lite0", "packaged", fuse=False)
    state = packaged_state_dict("tf_efficientnet_lite0")
    assert torch.equal(pretrained.body.conv_stem.weight, state["conv_stem.weight"])
    random = FeaturePyramid("tf_efficientnet_lite0", pretrained=False, fuse=False)
    assert not torch.equal(random.body.conv_stem.weight, state["conv_stem.weight"])


def test_missing_timm_weights_raise_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="wide_resnet50_2.*not on this machine"):
        FeaturePyramid("wide_resnet50_2", "timm")
    with pytest.raises(WeightsNotFoundError, match="vit_small_patch16_224.dino.*not on this machine"):
        FeaturePyramid("vit_small_patch16_224.dino", "timm")


def test_timm_weights_in_the_local_torch_cache_are_used(monkeypatch, tmp_path):
    """DINO ViT-S weights (here: a random stand-in) placed where timm caches them are loaded, offline."""
    import timm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = timm.create_model("vit_small_patch16_224.dino", pretrained=False)
    (tmp_path / "hub/checkpoints").mkdir(parents=True)
    torch.save(reference.state_dict(), tmp_path / "hub/checkpoints/dino_deitsmall16_pretrain.pth")
    encoder = FeaturePyramid("vit_small_patch16_224.dino", "timm")
    assert torch.equal(encoder.body.model.blocks[5].mlp.fc1.weight, reference.blocks[5].mlp.fc1.weight)
    maps = encoder(torch.rand(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 384, 4, 4)] * 4


def test_missing_weights_file_and_unpackaged_model(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="weights file not found"):
        FeaturePyramid("tf_efficientnet_lite0", str(tmp_path / "nope.safetensors"))
    with pytest.raises(WeightsNotFoundError, match="no packaged weights for 'resnet18'"):
        FeaturePyramid("resnet18", "packaged")


def test_weights_from_a_local_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lite0.safetensors"
    save_file(packaged_state_dict("tf_efficientnet_lite0"), str(path))
    x = torch.rand(1, 3, 64, 64)
    from_file = FeaturePyramid("tf_efficientnet_lite0", str(path))(x)
    packaged = FeaturePyramid("tf_efficientnet_lite0", "packaged")(x)
    assert all(torch.equal(a, b) for a, b in zip(from_file, packaged))


def test_wrong_weights_for_the_architecture_are_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lite2.safetensors"
    save_file(packaged_state_dict("tf_efficientnet_lite2"), str(path))
    with pytest.raises(RuntimeError, match="size mismatch"):
        FeaturePyramid("tf_efficientnet_lite0", str(path))


def test_device_selection():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1"])
def test_fused_channels_last_extractor_equals_the_loaded_one(name):
    """Batch norms folded into the convolutions + channels-last: the same features to ~1e-6 relative."""
    from torch import nn

    exact, fused = FeaturePyramid(name, "packaged", fuse=False), FeaturePyramid(name, "packaged")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in exact.modules()) > 40
    x = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    for a, b in zip(exact(x), fused(x)):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), (a - b).abs().max()
