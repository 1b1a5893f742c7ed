"""VQ-Flow (Zhou et al.): hierarchical vector quantisation conditions MSFlow's flows on concepts and patterns.

With every VQ part off (``msflow``) this is the published MSFlow: parallel flows conditioned on a 2-D positional
encoding + fusion flow, N(0, I) base.

- CPC: GAP(stage 4) -> MLP -> nearest of K_cp prototypes (EMA codebook, straight-through).
- CSPC: per scale, conv1x1 patterns f_l; target t = [PE ; prototype]; the residual f_l - t is quantised with
  K_csp codes and q_l = t + Q(f_l - t); the flow condition is [q_l ; prototype]. ``cspc_mode: naive`` is the
  concept-agnostic ablation (CAPC): q_l = Q(f_l).
- CADM: the base density of scale l is N(mu_l(c_k), sigma_l(c_k)^2), a proper log-density (with -log sigma);
  ``cadm_mixture: soft`` uses the mixture over all prototypes with learned weights instead of the hard one;
  ``cadm_placement: parallel`` standardises the parallel flows' outputs before the fusion (released code).
- Scores (``normalization``): ``position`` (default): image = top-k mean of sum_l z_l, each scale's -log p_l
  standardised per position with its mean and std over the training images; ``train``: top-k mean of
  c - sum_l log p_l, c fitted on training images; ``image``: MSFlow's per-image normalisation. The map is
  MSFlow's add map.
- ``global_gaussian``: the image's pooled stride-32 feature (the CPC's input, before its projection) gets a
  Gaussian density fitted on the training images (Ledoit-Wolf covariance) and enters the detection map as a
  fourth, 1 x 1 scale: its log p per dimension (times ``global_weight``) is added to every pixel. A wrong kind of
  object is far from the training images as a whole even where no single patch is unusual (semantic anomalies,
  CIFAR-10); the anomaly map stays local.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .registry import register_model
from .anomaly_map import add_map, floored_std, gaussian_smooth, log_map, top_k_score, upsample
from .base import AnomalyModel, Prediction, StepOutput
from .cadm import ConceptGaussian, mixture_log_density, summed_log_density
from .flows import FusionCoupling, parallel_flow
from .global_density import PooledGaussian
from .layers import conv_bn, mlp_bn, positional_encoding_2d
from .quantize import VectorQuantizer


@dataclass
class VQFlowConfig:
    in_channels: list[int] = field(default_factory=lambda: [24, 40, 112, 320])
    image_size: int = 256
    embed_dim: int = 32  # D (paper 256)
    pe_channels: int = 16  # P (paper 32)
    num_prototypes: int = 16  # K_cp (paper 32)
    num_patterns: int = 128  # K_csp (paper 512)
    flow_blocks: list[int] = field(default_factory=lambda: [2, 5, 8])
    flow_stages: list[int] = field(default_factory=lambda: [1, 2, 3])  # pyramid stages feeding the 3 flows
    # kernel sizes of each scale's coupling subnets, cycled over its blocks ([3, 1] alternates), and the fusion's
    flow_kernels: list[list[int]] = field(default_factory=lambda: [[3], [3], [3]])
    fusion_kernel: int = 3
    separable: bool = False  # depthwise-separable subnet convolutions (MobileNet's factorisation)
    pool: bool = False  # AvgPool(3, 2, 1) on the flow inputs (MSFlow on stages [0, 1, 2]), halving every scale
    clamp: float = 1.9
    cpc: bool = True
    cspc: bool = True
    cspc_mode: str = "residual"  # residual (CSPC) | naive (CAPC ablation)
    cadm: bool = True
    cadm_mixture: str = "hard"  # hard (paper) | soft (logsumexp over prototypes with learned weights)
    cadm_placement: str = "fusion"  # fusion: base density of the fused outputs | parallel: between the flows and fusion
    pe: bool = True
    vq_decay: float = 0.99
    dead_fraction: float = 0.03
    lambda_cpc: float = 1.0
    lambda_cspc: float = 1.0
    top_k: float = 0.03
    normalization: str = "position"  # position: score from -log p_l standardised per position (training mean/std)
    # | train: relative to the training images' max | image: to each image's own max
    global_gaussian: bool = False  # a Gaussian on the pooled stride-32 feature as a 1 x 1 fourth detection scale
    global_weight: float = 1.0  # its weight: 1 = one more scale; 3 = as much as the three local scales together
    map_scales: int = 3  # the anomaly map: MSFlow's add map of the finest map_scales of the 3 scales
    map_sigma: float = 0.0  # its Gaussian smoothing (pixels at image_size; 0 = none)

    # what a model saved before these fields existed was built with (load_model fills absent fields from here)
    LEGACY_VALUES: ClassVar[dict] = {
        "flow_stages": [0, 1, 2],
        "pool": True,
        "normalization": "image",
        "cadm_placement": "fusion",
        "flow_kernels": [[3], [3], [3]],
        "fusion_kernel": 3,
        "separable": False,
    }

    def __post_init__(self):
        if len(self.in_channels) != 4:
            raise ValueError(f"vqflow needs the 4-stage pyramid, got channels {self.in_channels}")
        if (
            len(self.flow_stages) != 3
            or sorted(set(self.flow_stages)) != self.flow_stages
            or not all(0 <= s <= 3 for s in self.flow_stages)
        ):
            raise ValueError(f"model.flow_stages needs 3 increasing pyramid stages (0-3), got {self.flow_stages}")
        if len(self.flow_blocks) != 3:
            raise ValueError(f"model.flow_blocks needs 3 entries (one per scale), got {self.flow_blocks}")
        self.flow_kernels = [[k] if isinstance(k, int) else list(k) for k in self.flow_kernels]
        if len(self.flow_kernels) != 3 or not all(
            kernels and all(isinstance(k, int) and k >= 1 and k % 2 for k in kernels) for kernels in self.flow_kernels
        ):
            raise ValueError(
                "model.flow_kernels needs 3 entries (one per scale), each an odd kernel size or a list of them "
                f"cycled over the scale's blocks, got {self.flow_kernels}"
            )
        if self.fusion_kernel < 1 or self.fusion_kernel % 2 == 0:
            raise ValueError(f"model.fusion_kernel must be an odd kernel size >= 1, got {self.fusion_kernel}")
        if self.cadm and not self.cpc:
            raise ValueError("model.cadm needs model.cpc: the base distribution is a function of the prototype")
        if self.cspc_mode not in ("residual", "naive"):
            raise ValueError(f"model.cspc_mode must be residual or naive, got {self.cspc_mode!r}")
        if self.cadm_mixture not in ("hard", "soft"):
            raise ValueError(f"model.cadm_mixture must be hard or soft, got {self.cadm_mixture!r}")
        if self.cadm_placement not in ("fusion", "parallel"):
            raise ValueError(f"model.cadm_placement must be fusion or parallel, got {self.cadm_placement!r}")
        if self.cadm and self.cadm_mixture == "soft" and self.cadm_placement != "fusion":
            raise ValueError("model.cadm_mixture: soft is a mixture base density: it needs cadm_placement: fusion")
        if self.normalization not in ("image", "train", "position"):
            raise ValueError(f"model.normalization must be position, train or image, got {self.normalization!r}")
        if self.global_gaussian and self.normalization == "image":
            raise ValueError(
                "model.global_gaussian adds one value per image to the detection map, which normalization: image "
                "subtracts again (each image's own max): use normalization train or position"
            )
        if self.global_weight <= 0:
            raise ValueError(
                f"model.global_weight must be > 0 (switch the term off with global_gaussian), got {self.global_weight}"
            )
        if not 1 <= self.map_scales <= 3:
            raise ValueError(
                f"model.map_scales must be 1, 2 or 3 (the finest scales in the map), got {self.map_scales}"
            )
        if self.map_sigma < 0:
            raise ValueError(f"model.map_sigma must be >= 0 (0 = no smoothing), got {self.map_sigma}")
        if self.cspc and self.cspc_mode == "residual" and not (self.cpc or self.pe):
            raise ValueError("model.cspc (residual) quantises w.r.t. [PE ; prototype]: turn on cpc or pe, or use naive")

    @property
    def scale_sizes(self) -> list[int]:
        """Spatial size of the three flow scales (stage s has stride 2^(s+2), halved again by the pool)."""
        return [self.image_size // 2 ** (s + 2 + int(self.pool)) for s in self.flow_stages]

    @property
    def flow_channels(self) -> list[int]:
        return [self.in_channels[s] for s in self.flow_stages]


class VQFlow(AnomalyModel):
    def __init__(self, config: VQFlowConfig):
        super().__init__()
        self.config = cfg = config
        channels = cfg.flow_channels
        self.pool = nn.AvgPool2d(3, 2, 1) if cfg.pool else nn.Identity()
        pe_dim = cfg.pe_channels if cfg.pe else 0
        proto_dim = cfg.embed_dim if cfg.cpc else 0
        if cfg.cpc:
            self.cpc_proj = mlp_bn(cfg.in_channels[3], cfg.embed_dim)
            self.cpc_vq = VectorQuantizer(
                cfg.num_prototypes, cfg.embed_dim, cfg.vq_decay, dead_fraction=cfg.dead_fraction
            )
        pattern_dim = (pe_dim + proto_dim) if cfg.cspc_mode == "residual" else (pe_dim + cfg.embed_dim)
        if cfg.cspc:
            self.cspc_proj = nn.ModuleList(conv_bn(c, pattern_dim) for c in channels)
            self.cspc_vq = nn.ModuleList(
                VectorQuantizer(cfg.num_patterns, pattern_dim, cfg.vq_decay, dead_fraction=cfg.dead_fraction)
                for _ in channels
            )
            cond_dim = pattern_dim + proto_dim
        else:
            cond_dim = pe_dim + proto_dim
        self.cond_dim = cond_dim
        self.flows = nn.ModuleList(
            parallel_flow(c, s, s, b, cond_dim, cfg.clamp, k, cfg.separable)
            for c, s, b, k in zip(channels, cfg.scale_sizes, cfg.flow_blocks, cfg.flow_kernels)
        )
        self.fusion = FusionCoupling(channels, proto_dim, cfg.clamp, cfg.fusion_kernel, cfg.separable)
        if cfg.cadm:
            self.base = ConceptGaussian(cfg.embed_dim, channels)
            if cfg.cadm_mixture == "soft":
                self.mixture_logits = nn.Parameter(torch.zeros(cfg.num_prototypes))
        for size in cfg.scale_sizes:
            self.register_buffer(f"pe_{size}", positional_encoding_2d(cfg.pe_channels, size, size), persistent=False)
        if cfg.normalization != "image":  # max log p of each scale and of their sum over the training images
            self.register_buffer("log_p_max", torch.zeros(4))
        if cfg.normalization == "position":  # per scale: mean and std of -log p at each position over training images
            for l, size in enumerate(cfg.scale_sizes):
                self.register_buffer(f"nll_mean_{l}", torch.zeros(size, size))
                self.register_buffer(f"nll_std_{l}", torch.ones(size, size))
        if cfg.global_gaussian:
            self.global_density = PooledGaussian(cfg.in_channels[3])
        self.codebook_sizes = {}
        if cfg.cpc:
            self.codebook_sizes["cpc"] = cfg.num_prototypes
        if cfg.cspc:
            self.codebook_sizes.update({f"cspc{l}": cfg.num_patterns for l in range(3)})

    # ------------------------------------------------------------------------------------------ encoding

    def flow_inputs(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The three flow scales: the configured pyramid stages, pooled when ``pool`` is on."""
        return [self.pool(features[s]) for s in self.config.flow_stages]

    @staticmethod
    def image_feature(features: list[torch.Tensor]) -> torch.Tensor:
        """(B, C): the pooled stride-32 feature, what the CPC and the global Gaussian see of the whole image."""
        return features[3].mean((2, 3))

    def _concept_vector(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.cpc_proj(self.image_feature(features))

    def _prototype(self, features: list[torch.Tensor]):
        return self.cpc_vq(self._concept_vector(features))

    def _context(self, x: torch.Tensor, proto: torch.Tensor | None) -> list[torch.Tensor]:
        """[PE ; prototype] broadcast over the pixels of one scale (the parts that are switched on)."""
        b, _, h, w = x.shape
        parts = [getattr(self, f"pe_{h}")[None].expand(b, -1, -1, -1)] if self.config.pe else []
        if proto is not None:
            parts.append(proto[:, :, None, None].expand(-1, -1, h, w))
        return parts

    def _pattern_source(self, level: int, x: torch.Tensor, context: list[torch.Tensor]):
        """What CSPC quantises at one scale: f - [PE ; prototype] (residual) or f (naive); and that target."""
        f = self.cspc_proj[level](x)
        if self.config.cspc_mode == "residual":
            target = torch.cat(context, 1)
            return f - target, target
        return f, None

    def _conditions(self, pooled: list[torch.Tensor], proto: torch.Tensor | None):
        conds, quantized = [], []
        for level, x in enumerate(pooled):
            parts = self._context(x, proto)
            if self.config.cspc:
                source, target = self._pattern_source(level, x, parts)
                q = self.cspc_vq[level](source.permute(0, 2, 3, 1))
                pattern = q.output.permute(0, 3, 1, 2)
                pattern = pattern + target if target is not None else pattern
                parts = [pattern] + ([parts[-1]] if proto is not None else [])
                quantized.append(q)
            conds.append(torch.cat(parts, 1) if parts else None)
        return conds, quantized

    def encode(self, features: list[torch.Tensor]):
        """Run quantisation and flows: latents per scale, log|det J| per image, prototype info, VQ results."""
        pooled = self.flow_inputs(features)
        proto_q = self._prototype(features) if self.config.cpc else None
        proto = proto_q.output if proto_q is not None else None
        conds, pattern_q = self._conditions(pooled, proto)
        zs, logdet = self.transform(pooled, conds, proto)
        return zs, logdet, proto_q, pattern_q

    def _standardize(self, zs: list[torch.Tensor], proto: torch.Tensor, rev: bool):
        """CADM between the parallel flows and fusion (the released code's placement): z -> (z - mu(c)) / sigma(c)
        per scale, an affine map conditioned on the prototype, with its log|det J| (which that code drops)."""
        outs, logdet = [], zs[0].new_zeros(zs[0].shape[0])
        for z, (mean, log_scale) in zip(zs, self.base(proto)):
            mean, log_scale = mean[:, :, None, None], log_scale[:, :, None, None]
            outs.append(z * torch.exp(log_scale) + mean if rev else (z - mean) * torch.exp(-log_scale))
            logdet = logdet + (1 if rev else -1) * log_scale.sum((1, 2, 3)) * z.shape[2] * z.shape[3]
        return outs, logdet

    def transform(self, xs: list[torch.Tensor], conds: list, proto: torch.Tensor | None, rev: bool = False):
        """The invertible part: parallel flows (+ CADM standardisation when placed there) then fusion (or the
        inverse). Returns (outputs, log|det J|)."""
        standardize = self.config.cadm and self.config.cadm_placement == "parallel"
        logdet = xs[0].new_zeros(xs[0].shape[0])
        if rev:
            xs, logdet = self.fusion(xs, proto, rev=True)
            if standardize:
                xs, j = self._standardize(xs, proto, rev=True)
                logdet = logdet + j
        outs = []
        for flow, x, c in zip(self.flows, xs, conds):
            y, j = flow(x, c=[c] if c is not None else None, rev=rev)
            outs.append(y)
            logdet = logdet + j
        if not rev:
            if standardize:
                outs, j = self._standardize(outs, proto, rev=False)
                logdet = logdet + j
            outs, fusion_logdet = self.fusion(outs, proto)
            logdet = logdet + fusion_logdet
        return outs, logdet

    def base_params(self, proto: torch.Tensor | None):
        """(mean, log_scale) per scale of the base density of the fused outputs; None = N(0, I)."""
        return self.base(proto) if self.config.cadm and self.config.cadm_placement == "fusion" else None

    def log_likelihood(self, zs, logdet, proto_q) -> torch.Tensor:
        """log p(x) per image (in nats) under the configured base density."""
        cfg = self.config
        if cfg.cadm and cfg.cadm_mixture == "soft":
            params = self.base(self.cpc_vq.codebook)
            log_density = mixture_log_density(zs, params, torch.log_softmax(self.mixture_logits, 0))
        else:
            log_density = summed_log_density(zs, self.base_params(proto_q.output if proto_q is not None else None))
        return log_density + logdet

    # ------------------------------------------------------------------------------------------ training

    @torch.no_grad()
    def initialize(self, features: list[torch.Tensor]) -> None:
        """k-means++ codebooks from the training data, level by level (prototypes first, then patterns)."""
        sizes, expected = [f.shape[-1] for f in features], [self.config.image_size // s for s in (4, 8, 16, 32)]
        if sizes != expected:
            raise ValueError(
                f"vqflow/msflow need a CNN pyramid at strides 4/8/16/32 (sizes {expected}), the features "
                f"have sizes {sizes}: use a CNN features.backbone (cflow and vitad also take a plain ViT)"
            )
        was_training = self.training
        self.train()
        for vq in ([self.cpc_vq] if self.config.cpc else []) + (list(self.cspc_vq) if self.config.cspc else []):
            vq.initialized.fill_(False)
        if self.config.cpc:
            self.cpc_vq.initialize(self._concept_vector(features))
        if self.config.cspc:
            proto = self._prototype(features).codes if self.config.cpc else None
            for level, x in enumerate(self.flow_inputs(features)):
                source, _ = self._pattern_source(level, x, self._context(x, proto))
                self.cspc_vq[level].initialize(source.permute(0, 2, 3, 1).reshape(-1, source.shape[1]))
        self.train(was_training)

    def training_step(self, features: list[torch.Tensor]) -> StepOutput:
        zs, logdet, proto_q, pattern_q = self.encode(features)
        dims = sum(z[0].numel() for z in zs)
        flow_loss = -self.log_likelihood(zs, logdet, proto_q).mean() / dims
        terms = {"flow": flow_loss}
        codes = {}
        loss = flow_loss
        if proto_q is not None:
            terms["cpc"] = proto_q.commitment
            loss = loss + self.config.lambda_cpc * proto_q.commitment
            codes["cpc"] = proto_q.indices
        if pattern_q:
            terms["cspc"] = sum(q.commitment for q in pattern_q) / len(pattern_q)
            loss = loss + self.config.lambda_cspc * terms["cspc"]
            codes.update({f"cspc{l}": q.indices for l, q in enumerate(pattern_q)})
        return StepOutput(loss, terms, codes)

    # ------------------------------------------------------------------------------------------ scoring

    def log_p_maps(self, zs, proto_q) -> list[torch.Tensor]:
        """Per-scale per-pixel log p = -0.5 * mean over channels of the standardised z^2 (MSFlow's map)."""
        params = self.base_params(proto_q.output if proto_q is not None else None)
        maps = []
        for l, z in enumerate(zs):
            if params is not None:
                mean, log_scale = (p[:, :, None, None] for p in params[l])
                z = (z - mean) * torch.exp(-log_scale)
            maps.append(-0.5 * (z * z).mean(1))
        return maps

    def fit_statistics(self, batches) -> None:
        if self.config.normalization == "image":
            return
        peak = torch.full_like(self.log_p_max, -torch.inf)
        position = self.config.normalization == "position"
        count, sums, squares = 0, [0.0] * 3, [0.0] * 3
        image_peaks, pooled = [], []
        for features in batches:
            zs, _, proto_q, _ = self.encode(features)
            log_p = self.log_p_maps(zs, proto_q)
            total = sum(upsample(m, self.config.image_size) for m in log_p)
            peak = torch.maximum(peak, torch.stack([m.amax() for m in log_p] + [total.amax()]))
            if self.config.global_gaussian:  # the max of the total needs the global term fitted on all images
                image_peaks.append(total.flatten(1).amax(1))
                pooled.append(self.image_feature(features))
            for l, m in enumerate(log_p if position else []):
                nll = -m.double()
                sums[l] = sums[l] + nll.sum(0)
                squares[l] = squares[l] + (nll * nll).sum(0)
            count += len(zs[0])
        if self.config.global_gaussian:
            pooled = torch.cat(pooled)
            self.global_density.fit(pooled)
            global_log_p = self.config.global_weight * self.global_density.log_density(pooled)
            peak[3] = (torch.cat(image_peaks) + global_log_p).max()
        self.log_p_max.copy_(peak)
        if not position:
            return
        for l in range(3):
            mean = sums[l] / count
            std = (squares[l] / count - mean * mean).clamp_min(0).sqrt()
            getattr(self, f"nll_mean_{l}").copy_(mean)
            getattr(self, f"nll_std_{l}").copy_(floored_std(std))

    def position_map(self, log_p: list[torch.Tensor]) -> torch.Tensor:
        """sum_l upsample((-log p_l - mean_l) / std_l): each scale in units of its own variation on normal images."""
        return sum(
            upsample((-m - getattr(self, f"nll_mean_{l}")) / getattr(self, f"nll_std_{l}"), self.config.image_size)
            for l, m in enumerate(log_p)
        )

    @torch.no_grad()
    def predict(self, features: list[torch.Tensor]) -> Prediction:
        zs, logdet, proto_q, _ = self.encode(features)
        log_p = self.log_p_maps(zs, proto_q)
        size = self.config.image_size
        extras = {"log_likelihood": self.log_likelihood(zs, logdet, proto_q)}
        if proto_q is not None:
            extras["concept"] = proto_q.indices
        reference = self.log_p_max if self.config.normalization != "image" else None
        if self.config.normalization == "position":
            detection = self.position_map(log_p)
        else:
            detection = log_map(log_p, size, reference[3] if reference is not None else None)
        if self.config.global_gaussian:  # the 1 x 1 fourth scale: the same value added to every pixel
            pooled = self.image_feature(features)
            weight = self.config.global_weight
            if self.config.normalization == "position":
                detection = detection + weight * self.global_density.standardized_nll(pooled)[:, None, None]
            else:
                detection = detection - weight * self.global_density.log_density(pooled)[:, None, None]
        scales = self.config.map_scales
        anomaly_map = add_map(log_p[:scales], size, reference[:scales] if reference is not None else None)
        if self.config.map_sigma > 0:
            anomaly_map = gaussian_smooth(anomaly_map, self.config.map_sigma)
        return Prediction(top_k_score(detection, self.config.top_k), anomaly_map, extras)


@register_model("vqflow", VQFlowConfig)
def build_vqflow(config: VQFlowConfig) -> VQFlow:
    return VQFlow(config)


# the published MSFlow: parallel flows conditioned on a 2-D positional encoding, fusion flow, N(0, I) base
@register_model(
    "msflow",
    VQFlowConfig,
    {"cpc": False, "cspc": False, "cadm": False, "pe": True, "global_gaussian": False},
    section="vqflow",
)
def build_msflow(config: VQFlowConfig) -> VQFlow:
    return VQFlow(config)
