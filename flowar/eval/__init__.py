"""Offline evaluation: a small self-trained classifier, its accuracy on class-conditional
samples, and the Frechet distance in its feature space."""

from flowar.eval.classifier import (
    Classifier,
    ClassifierConfig,
    accuracy,
    load_classifier,
    predict,
    save_classifier,
    shipped_classifier_dir,
    train_classifier,
)
from flowar.eval.metrics import (
    embed,
    evaluate_samples,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
)

__all__ = [
    "Classifier",
    "ClassifierConfig",
    "accuracy",
    "embed",
    "evaluate_samples",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "load_classifier",
    "predict",
    "save_classifier",
    "shipped_classifier_dir",
    "train_classifier",
]
