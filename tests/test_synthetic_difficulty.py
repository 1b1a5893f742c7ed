"""The embedded default must need features: a per-pixel z-score of the training set scores clearly lower."""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from vqflow.data.manifest import build_manifest
from vqflow.data.mvtec import read_mvtec
from vqflow.data.synthetic import generate
from vqflow.features import BackboneSpec, load_batch


def _pixel_zscore_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    mean, std = train.mean(0), train.std(0) + 1e-3
    z = np.abs((test - mean) / std).max(axis=1).reshape(len(test), -1)
    k = max(1, z.shape[1] // 100)
    return np.sort(z, axis=1)[:, -k:].mean(1)


def _feature_knn_scores(train_feats: torch.Tensor, test_feats: torch.Tensor) -> np.ndarray:
    bank = train_feats.permute(0, 2, 3, 1).reshape(-1, train_feats.shape[1])
    bank = bank[torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[:20000]]
    scores = []
    for feats in test_feats:
        patches = feats.permute(1, 2, 0).reshape(-1, feats.shape[0])
        scores.append(torch.cdist(patches, bank).min(1).values.max().item())
    return np.asarray(scores)


def test_pixel_zscore_is_clearly_below_a_feature_model(tmp_path):
    root = generate(tmp_path / "d", train_per_category=20, test_good_per_category=6, test_per_defect=3, progress=False)
    frame = build_manifest(read_mvtec(root), 0.0, 0, progress=False)
    train, test = frame[frame.split == "train"], frame[frame.split == "test"]
    labels = test.label.to_numpy()
    x_train, x_test = load_batch(train.path.tolist(), 256), load_batch(test.path.tolist(), 256)
    backbone = BackboneSpec().build()

    def embed(x):
        s1, s2, s3, _ = backbone(x)
        return torch.cat([F.avg_pool2d(s2, 3, 1, 1), F.interpolate(s3, size=s2.shape[-2:], mode="bilinear")], 1)

    with torch.inference_mode():
        f_train = torch.cat([embed(x_train[i : i + 16]) for i in range(0, len(x_train), 16)])
        f_test = torch.cat([embed(x_test[i : i + 16]) for i in range(0, len(x_test), 16)])
    pixel_auroc = roc_auc_score(labels, _pixel_zscore_scores(x_train.numpy(), x_test.numpy()))
    feature_auroc = roc_auc_score(labels, _feature_knn_scores(f_train, f_test))
    print(f"image AUROC: pixel z-score {pixel_auroc:.3f}, feature kNN {feature_auroc:.3f}")
    assert feature_auroc > 0.85
    assert pixel_auroc < feature_auroc - 0.1
