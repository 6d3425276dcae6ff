"""Evaluation on the built-in digits: class accuracy and Fréchet distance of generated digits.

Class accuracy: a scikit-learn MLP is trained on real digits (a fixed 70/30 split; its own
held-out accuracy is reported next to the result) and asked which class each generated image
shows; the score is the fraction recognised as the class it was generated for.

Fréchet distance: between Gaussians fitted to the MLP's hidden-layer activations of generated
and of real images (the FID recipe with this small classifier standing in for Inception). The
real reference set is the classifier's training split; the same distance for the held-out real
split is reported as the floor that a perfect generator would reach at that sample size.

Generated and real images go through the same path (32x32 -> 8x8 cell means), so the classifier
never sees a difference of preprocessing between the two.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
from torch import Tensor

from deco.data import DIGITS_CLASSES, downsample_to_digits, load_digits_arrays, upsample_digits
from deco.evaluate.frechet import frechet_distance, gaussian_stats

Array = NDArray[np.float64]


class DigitsClassifier:
    """An MLP (64 ReLU units) on 8x8 cell means of 32x32 digits, trained on a fixed split."""

    def __init__(self, seed: int = 0, test_fraction: float = 0.3) -> None:
        raw, labels = load_digits_arrays()
        features = downsample_to_digits(upsample_digits(raw))
        x_train, x_test, y_train, y_test = train_test_split(
            features, labels, test_size=test_fraction, random_state=seed, stratify=labels
        )
        self.mlp = MLPClassifier((64,), alpha=1e-3, max_iter=1000, random_state=seed)
        with threadpool_limits(1):  # tiny matrices: BLAS threads only contend
            self.mlp.fit(x_train / 16.0, y_train)
        self.test_accuracy = float(self.mlp.score(x_test / 16.0, y_test))
        self.real_stats = gaussian_stats(self.hidden(x_train))
        self.holdout_fd = frechet_distance(*gaussian_stats(self.hidden(x_test)), *self.real_stats)
        self.train_size, self.test_size = len(y_train), len(y_test)

    def hidden(self, cells: Array) -> Array:
        """(N, 64) cell intensities in [0, 16] -> (N, 64) hidden ReLU activations."""
        out: Array = np.maximum(cells / 16.0 @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0.0)
        return out

    def predict(self, images: Tensor | Array) -> NDArray[np.int64]:
        return np.asarray(self.mlp.predict(downsample_to_digits(images) / 16.0), dtype=np.int64)

    def features(self, images: Tensor | Array) -> Array:
        return self.hidden(downsample_to_digits(images))


def score_samples(images: Tensor | Array, labels: Any, classifier: DigitsClassifier) -> dict[str, Any]:
    """Accuracy (overall and per class) and Fréchet distance of generated digits (N, 3, H, W)."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = classifier.predict(images)
    correct = predicted == labels
    per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    fd = frechet_distance(*gaussian_stats(classifier.features(images)), *classifier.real_stats)
    return {
        "accuracy": float(correct.mean()),
        "accuracy_per_class": per_class,
        "frechet_distance": fd,
        "num_samples": len(labels),
        "classifier_test_accuracy": classifier.test_accuracy,
        "frechet_distance_real_holdout": classifier.holdout_fd,
        "real_reference_size": classifier.train_size,
        "real_holdout_size": classifier.test_size,
    }


def digits_compatible(config: Any) -> None:
    """Evaluation on the digits needs a 10-class model (3 channels)."""
    if config.num_classes != DIGITS_CLASSES or config.in_channels != 3:
        raise ValueError(
            f"CKPT: evaluation on the built-in digits needs a 10-class RGB model, got "
            f"num_classes={config.num_classes}, in_channels={config.in_channels}"
        )
