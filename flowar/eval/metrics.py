"""Scores for generated images: classifier accuracy and Frechet distance in its feature space.

The Frechet distance between Gaussians N(m1, C1) and N(m2, C2) is
``|m1 - m2|^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2)``. Everything is computed in
float64; both square roots are taken by eigendecomposition of symmetric positive semi-definite
matrices, with tiny negative eigenvalues (round-off) clipped to zero.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from flowar.errors import ConfigError
from flowar.eval.classifier import Classifier

logger = logging.getLogger(__name__)


def _as_features(feats: Any, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().double().numpy()
    array = np.asarray(feats, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ConfigError(f"{name} must be an (N, F) array with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ConfigError(f"{name} holds non-finite values")
    return array


def feature_statistics(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, in float64."""
    array = _as_features(feats, "features")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], -1)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negatives clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_from_statistics(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
        raise ConfigError(
            f"feature statistics disagree in dimension: means {mu1.shape} / {mu2.shape}, "
            f"covariances {cov1.shape} / {cov2.shape}"
        )
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1  # symmetric PSD, similar to cov1 @ cov2
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    cross = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)
    return max(value, 0.0)  # round-off can leave a tiny negative number for equal inputs


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N_a, F) and (N_b, F).

    Args:
        feats_a, feats_b: tensors or arrays with at least two rows each and the same width.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ConfigError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    return frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b))


@torch.no_grad()
def embed(
    classifier: Classifier, images: torch.Tensor, *, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) and logits (N, K) of (N, C, S, S) images, on the CPU."""
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        f, z = classifier.features_and_logits(images[start : start + batch_size].to(device))
        feats.append(f.cpu())
        logits.append(z.cpu())
    return torch.cat(feats), torch.cat(logits)


def _check_images(images: torch.Tensor, classifier: Classifier, name: str) -> None:
    c = classifier.config
    expected = (c.in_channels, c.image_size, c.image_size)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(
        images.shape[1:]
    ) != expected:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise ConfigError(
            f"{name} must be a (N, {c.in_channels}, {c.image_size}, {c.image_size}) tensor to "
            f"match the classifier, got {shape}"
        )
    if not torch.isfinite(images).all():
        raise ConfigError(f"{name} holds non-finite values")


def evaluate_samples(
    classifier: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    real_images: torch.Tensor,
    *,
    seed: int = 0,
    real_labels: torch.Tensor | None = None,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Score class-conditional samples against held-out real images.

    Args:
        classifier: the scoring network (its input shape must match the images).
        images: (N, C, S, S) generated images in [0, 1].
        labels: (N,) the class each image was generated for.
        real_images: (M, C, S, S) held-out real images, M >= 4.
        seed: seeds the random split of the real images into two halves.
        real_labels: (M,) labels of the real images; adds "real_accuracy" when given.
        batch_size: images per classifier call.

    Returns:
        A JSON-ready dict: "accuracy" (share of samples classified as the requested class),
        "per_class_accuracy" (None for classes with no sample), "predicted_counts",
        "fd" (generated vs all real images), "fd_real_halves" (one random half of the real
        images vs the other: the score of a perfect generator, up to sample size; it uses
        fewer images than "fd" and so carries more small-sample bias), counts and
        "feature_dim".
    """
    _check_images(images, classifier, "images")
    _check_images(real_images, classifier, "real_images")
    num_classes = classifier.config.num_classes
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (len(images),):
        raise ConfigError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes})")
    if len(images) < 2 or len(real_images) < 4:
        raise ConfigError(
            f"need at least 2 generated and 4 real images, got {len(images)} and "
            f"{len(real_images)}"
        )

    feats, logits = embed(classifier, images, batch_size=batch_size)
    real_feats, real_logits = embed(classifier, real_images, batch_size=batch_size)
    preds = logits.argmax(1)
    correct = preds == labels
    per_class: list[float | None] = []
    for cls in range(num_classes):
        mask = labels == cls
        per_class.append(float(correct[mask].float().mean()) if mask.any() else None)

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(real_images), generator=generator)
    half = len(real_images) // 2
    result: dict[str, Any] = {
        "num_samples": len(images),
        "num_real": len(real_images),
        "num_real_half": half,
        "feature_dim": feats.shape[1],
        "accuracy": float(correct.float().mean()),
        "per_class_accuracy": per_class,
        "predicted_counts": torch.bincount(preds, minlength=num_classes).tolist(),
        "fd": frechet_distance(feats, real_feats),
        "fd_real_halves": frechet_distance(real_feats[order[:half]],
                                           real_feats[order[half : 2 * half]]),
    }
    if real_labels is not None:
        real_labels = torch.as_tensor(real_labels, dtype=torch.long)
        if real_labels.shape != (len(real_images),):
            raise ConfigError(f"real_labels must have shape ({len(real_images)},)")
        result["real_accuracy"] = float((real_logits.argmax(1) == real_labels).float().mean())
    return result
