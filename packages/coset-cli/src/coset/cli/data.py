"""Offline datasets for the QAT experiments (nothing is downloaded).

* MNIST-1D (Greydanus 2020): ``mnist1d.data.make_dataset(get_dataset_args())`` generates the standard
  benchmark locally from the package's templates: 4000 train / 1000 test signals of length 40, 10 classes
  (published baselines: logistic 32 %, MLP 68 %, CNN 94 %).
* scikit-learn digits: the 1797 real 8x8 handwritten digits shipped inside scikit-learn, pixels scaled to
  [0, 1], split 75/25 stratified with a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["Dataset", "load_mnist1d", "load_digits", "load_dataset", "DATASETS"]

DATASETS = ("mnist1d", "digits")


@dataclass(frozen=True)
class Dataset:
    """A train/test split as float32 features and int64 labels.

    Attributes
    ----------
    name : str
    x_train : (N_train, *feature_shape) float32
    y_train : (N_train,) int64
    x_test : (N_test, *feature_shape) float32
    y_test : (N_test,) int64
    num_classes : int
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("features and labels must have the same length")


@lru_cache(maxsize=2)
def _mnist1d_arrays(seed: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def load_mnist1d(seed: int = 42) -> Dataset:
    """MNIST-1D generated locally (``seed=42`` is the published benchmark's seed).

    Returns
    -------
    Dataset with x_train (4000, 40), x_test (1000, 40).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    x, y, xt, yt = _mnist1d_arrays(seed)
    f = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    g = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.int64)  # noqa: E731
    return Dataset("mnist1d", f(x), g(y), f(xt), g(yt), 10)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, pixels / 16, stratified split.

    Returns
    -------
    Dataset with x_train (1347, 64), x_test (450, 64) for the default split.
    """
    if not isinstance(test_fraction, float) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    try:
        from sklearn.datasets import load_digits as _load
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # scikit-learn is in the workspace dev group, not a coset-cli dependency
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from e

    d = _load()
    x = d.data.astype(np.float32) / 16.0
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_fraction, random_state=seed, stratify=d.target)
    return Dataset(
        "digits",
        torch.from_numpy(xtr),
        torch.from_numpy(ytr.astype(np.int64)),
        torch.from_numpy(xte),
        torch.from_numpy(yte.astype(np.int64)),
        10,
    )


def load_dataset(name: str) -> Dataset:
    """``"mnist1d"`` or ``"digits"`` with their default arguments."""
    if name == "mnist1d":
        return load_mnist1d()
    if name == "digits":
        return load_digits()
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
