"""The whole inference graph (backbone, model, anomaly map, image score) as one ONNX file, and the ONNX Runtime
scorer that the service and ``vqflow predict`` use with ``serve.runtime: onnx``.

The graph is traced (torch's TorchScript exporter; the torch.export-based one stops at the models'
data-dependent branches, e.g. a codebook's "initialised" flag) at the bundle's image size with a dynamic batch
axis: every shape but the batch is fixed by the image size, so the trace keeps them as constants. After writing, the file is run
by ONNX Runtime on check images and compared with torch; a mismatch is an error, never a silent file.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import AnomalyModel
from .scoring import Scored

OPSET = 17
INPUT = "images"
# |onnx - torch| <= tolerance * max(1, max |torch|) per output: float32 kernels differ in summation order
TOLERANCE = {"scores": 1e-4, "maps": 1e-3}


class OnnxMismatchError(RuntimeError):
    """ONNX Runtime's outputs differ from torch's beyond the tolerance."""


class InferenceGraph(nn.Module):
    """Images (B, 3, S, S) in [0, 1] -> scores (B,), maps (B, S, S)[, concept (B,)]: one module to export."""

    def __init__(self, backbone: nn.Module, model: AnomalyModel):
        super().__init__()
        self.backbone, self.model = backbone, model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prediction = self.model.predict(self.backbone(images))
        concept = prediction.extras.get("concept")
        return (prediction.scores, prediction.maps) + ((concept,) if concept is not None else ())


def check_images(image_size: int, count: int = 3) -> torch.Tensor:
    """Deterministic check inputs: smooth random images and one flat grey image (a different batch size than the
    trace's, so the dynamic batch axis is exercised)."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(count - 1, 3, 8, 8, generator=generator)
    smooth = nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return torch.cat([smooth, torch.full((1, 3, image_size, image_size), 0.5)])


def static_same_padding(backbone: nn.Module, image_size: int) -> int:
    """Replace timm's TF-style "same" convolutions (padding computed from the input size at every call) by a
    constant zero padding + plain convolution for this image size, in place; returns how many were replaced.

    Same values; but traced, the dynamic version leaves shape arithmetic and a Pad of computed amounts in the
    graph, which kept ONNX Runtime from folding the padding into the convolution and the backbone in its blocked
    memory layout (profiled at batch 16: 11 % of the time in layout reorders, 4 % in Pad).
    """
    from timm.layers import Conv2dSame, get_same_padding

    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_, args) -> None:  # None: the input goes on unchanged
            sizes[name] = tuple(args[0].shape[-2:])

        return hook

    hooks = [
        module.register_forward_pre_hook(record(name))
        for name, module in backbone.named_modules()
        if isinstance(module, Conv2dSame)
    ]
    with torch.no_grad():
        backbone(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    for name, (height, width) in sizes.items():
        same = backbone.get_submodule(name)
        pad_h = get_same_padding(height, same.kernel_size[0], same.stride[0], same.dilation[0])
        pad_w = get_same_padding(width, same.kernel_size[1], same.stride[1], same.dilation[1])
        conv = nn.Conv2d(
            same.in_channels,
            same.out_channels,
            same.kernel_size,
            same.stride,
            0,
            same.dilation,
            same.groups,
            same.bias is not None,
        )
        conv.load_state_dict(same.state_dict())
        padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent), child, nn.Sequential(padding, conv))
    return len(sizes)


def export_onnx(backbone: nn.Module, model: AnomalyModel, path: str | Path, image_size: int) -> Path:
    """Trace backbone + model (with ``static_same_padding``) into ``path`` and check it with ONNX Runtime against
    torch on the backbone as given."""
    reference = InferenceGraph(copy.deepcopy(backbone).cpu(), copy.deepcopy(model).cpu()).eval()
    graph = copy.deepcopy(reference)
    static_same_padding(graph.backbone, image_size)
    example = check_images(image_size, 2)
    with torch.no_grad():
        names = ["scores", "maps", "concept"][: len(graph(example))]
    with warnings.catch_warnings():
        # the tracer warns at every shape it turns into a constant: all of them are fixed by the image size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": chosen on purpose, see above
        # a strided Slice (steps != 1) is left unfolded: a missed graph optimisation, checked by `verify` below
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in [INPUT, *names]},
            opset_version=OPSET,
            dynamo=False,
        )
    verify(reference, OnnxScorer(path, threads=1), check_images(image_size))
    return Path(path)


def verify(graph: InferenceGraph, scorer: "OnnxScorer", images: torch.Tensor) -> dict[str, float]:
    """Max absolute difference per output between ONNX Runtime and torch; raises OnnxMismatchError beyond
    TOLERANCE (concept ids must be equal)."""
    with torch.no_grad():
        expected = dict(zip(["scores", "maps", "concept"], (t.numpy() for t in graph(images))))
    got = scorer.run(images)
    differences = {}
    for name, reference in expected.items():
        difference = float(np.abs(got[name].astype(np.float64) - reference).max())
        differences[name] = difference
        allowed = TOLERANCE.get(name, 0.0) * max(1.0, float(np.abs(reference).max()))
        if difference > allowed:
            raise OnnxMismatchError(
                f"{scorer.path}: ONNX Runtime output {name!r} differs from torch by {difference:.3g} "
                f"(allowed {allowed:.3g}); the file is not usable"
            )
    return differences


class OnnxScorer:
    """An exported graph in an ONNX Runtime session (CPU; CUDA when the installed onnxruntime offers it)."""

    def __init__(self, path: str | Path, threads: int = 0, device: str = "cpu"):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no ONNX graph in this model bundle (package with package.onnx: true, or run "
                f"`vqflow export-onnx {self.path.parent}`), or use serve.runtime: torch"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = ONNX Runtime's default (all cores)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.outputs = [output.name for output in self.session.get_outputs()]

    def run(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        values = self.session.run(None, {INPUT: np.ascontiguousarray(images.cpu().numpy(), dtype=np.float32)})
        return dict(zip(self.outputs, values))

    def score(self, images: torch.Tensor) -> Scored:
        """The same result as ``scoring.score_images`` with the torch model."""
        out = self.run(images)
        extras = {"concept": out["concept"]} if "concept" in out else {}
        return Scored(out["scores"].astype(np.float64), out["maps"].astype(np.float32), extras)
