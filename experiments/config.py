"""One experiment run as plain data: every default reproduces the paper (`docs/algorithm.md` §6)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from qcnn.options import QConvOptions

MODES = ("theory", "authors")
OVERRIDES = ("norms", "cap_order")  # layer options that can depart from the mode's choice


@dataclass(frozen=True)
class RunConfig:
    """A training run of the classical CNN or the QCNN.

    ``mode`` chooses the fidelity: "theory" = exact patch norms, f(Y + noise), δ applied
    inside each QCNN layer's backward (by ``backprop``); "authors" = the authors' simulation,
    norms of image 0 channel 0, clamp(clamp(Y) + noise), δ on every parameter's gradient at
    the optimiser step. ``norms`` and ``cap_order``, when set, override the mode's choice
    for that one option.
    """

    model: str = "qcnn"  # "cnn" or "qcnn"
    net: str = "authors"  # "authors" or "lenet5"
    epsilon: float = 0.01
    cap: float = 10.0
    sigma: float | None = 0.5
    delta: float = 0.01
    mode: str = "theory"
    estimator: str = "gaussian"
    sampling: str = "linear"
    backprop: str = "gaussian"
    norms: str | None = None  # None: the mode's ("exact" in theory, "authors" in authors)
    cap_order: str | None = None  # None: the mode's
    epochs: int = 2
    batch_size: int = 64
    test_batch_size: int = 1000
    lr: float = 0.01
    momentum: float = 0.0
    seed: int = 1
    train_limit: int | None = None
    test_limit: int | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.model not in ("cnn", "qcnn"):
            raise ValueError(f"model must be 'cnn' or 'qcnn', got {self.model!r}")
        if self.net not in ("authors", "lenet5"):
            raise ValueError(f"net must be 'authors' or 'lenet5', got {self.net!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("epochs", "batch_size", "test_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be None (all images) or >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        QConvOptions(**self.layer_options())  # the layer's own checks, before any work

    def layer_options(self) -> dict:
        """Keyword options of ``qcnn.QConv2d`` for this run."""
        authors = self.mode == "authors"
        return {
            "epsilon": self.epsilon,
            "cap": self.cap,
            "sigma": self.sigma,
            "estimator": self.estimator,
            "sampling": self.sampling,
            "norms": self.norms or ("authors" if authors else "exact"),
            "cap_order": self.cap_order or ("authors" if authors else "theory"),
            "delta": 0.0 if authors else self.delta,
            "backprop": "exact" if authors else self.backprop,
        }

    @property
    def optimiser_delta(self) -> float:
        """δ added to every gradient at the optimiser step (authors' QCNN only)."""
        return self.delta if self.model == "qcnn" and self.mode == "authors" else 0.0

    def as_dict(self) -> dict:
        """The fields, without the overrides left unset: run ids and result stores made
        before the overrides existed stay valid."""
        data = asdict(self)
        for name in OVERRIDES:
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
