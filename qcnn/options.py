"""The options of one QCNN layer, validated once, with the defaults in one place.

Defaults follow the theory of ``docs/algorithm.md``; every place where the authors'
simulation differs has an option that reproduces it (``norms="authors"``,
``cap_order="authors"``, and ``backprop="exact"`` with :class:`qcnn.QuantumSGD`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

ESTIMATORS = ("exact", "gaussian", "shots", "amplitude-estimation")
NORMS = ("exact", "authors")
CAP_ORDERS = ("theory", "authors")
SAMPLINGS = ("linear", "quadratic")
POOLINGS = (None, "max", "avg")
BACKPROPS = ("exact", "gaussian", "tomography")
BACKENDS = ("torch", "pennylane", "qiskit-aer")
BACKEND_DEVICES = ("auto", "cpu", "gpu")


def conv_pair(name: str, value: object, least: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints, each >= ``least``) as a pair; else a ValueError
    naming it, e.g. for ``padding="same"``, which the layer does not take."""
    pair = tuple(value) if isinstance(value, tuple | list) else (value, value)
    if not (len(pair) == 2 and all(is_integer(v) and v >= least for v in pair)):
        raise ValueError(f"{name} must be an int >= {least} or a pair of them, got {value!r}")
    return pair


def is_number(value: object) -> bool:
    """An int or float, not a bool (``True`` is an int to Python, never a σ or an ε here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {generator!r}")


def _choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class QConvOptions:
    """How the layer estimates, caps, samples, pools and backpropagates.

    epsilon: inner-product precision ε >= 0 (section 2.1). ``gaussian`` adds
        2ε‖A_p‖‖F_q‖ξ; ``shots`` uses ⌈1/(4ε²)⌉ shots unless ``shots`` is given;
        ``amplitude-estimation`` uses m = ⌈log2(π/ε)⌉ evaluation qubits unless ``ae_qubits``.
    cap: C > 0 of the capped ReLU min(max(x, 0), C); ``math.inf`` gives a plain ReLU.
    sigma: fraction σ in (0, 1] of outputs drawn per image (⌊σK⌋ draws with replacement);
        None keeps every output (sampling off).
    sampling: draw positions with probability ∝ f ("linear") or ∝ f² ("quadratic").
    norms: "exact" per image and patch; "authors" takes ‖A_p‖ from image 0, channel 0.
    cap_order: "theory" f(Y + noise); "authors" clamp(clamp(Y) + noise).
    pooling: None, "max" or "avg" pooling of size ``pool_size`` on the sampled tensor.
    delta: gradient precision δ >= 0 (section 3) applied in the layer's backward by
        ``backprop``: "gaussian" g + δ‖g‖₂ξ, "tomography" simulated ℓ∞ tomography, "exact".
    backend: "torch" emulates; "pennylane" or "qiskit-aer" run every inner product and the
        sampling as circuits (forward only, estimator "shots" or "amplitude-estimation",
        exact norms), on ``backend_device`` "auto", "cpu" or "gpu".
    fused: for float32 input with the "gaussian" or "exact" estimator, run the work after
        the convolution as compiled code instead of a chain of torch operations. On CPU, the
        estimation and the cap are one compiled pass (:mod:`qcnn.accel.estimate`) that gives
        the same numbers. On CUDA, with Triton installed (torch's CUDA builds bring it), the
        norms, estimation, cap and sampling, and the Gaussian δ noise, run as fused Triton
        kernels (:mod:`qcnn.accel.fused`), once they pass a smoke test on the device (else a
        warning, and torch operations); they draw other random numbers than torch
        operations, from the same distributions. False uses torch operations everywhere.
    """

    epsilon: float = 0.01
    cap: float = 10.0
    sigma: float | None = 0.5
    estimator: str = "gaussian"
    shots: int | None = None
    ae_qubits: int | None = None
    norms: str = "exact"
    cap_order: str = "theory"
    sampling: str = "linear"
    pooling: str | None = None
    pool_size: int = 2
    delta: float = 0.01
    backprop: str = "gaussian"
    backend: str = "torch"
    backend_device: str = "auto"
    fused: bool = True

    def __post_init__(self) -> None:
        if not (is_number(self.epsilon) and 0 <= self.epsilon < math.inf):
            raise ValueError(f"epsilon must be a finite number >= 0, got {self.epsilon!r}")
        if not (is_number(self.cap) and self.cap > 0):
            raise ValueError(f"cap must be > 0 (math.inf for no cap), got {self.cap!r}")
        if self.sigma is not None and not (
            is_number(self.sigma) and 0 < self.sigma <= 1
        ):
            raise ValueError(f"sigma must be in (0, 1] or None (no sampling), got {self.sigma!r}")
        if not (is_number(self.delta) and 0 <= self.delta < math.inf):
            raise ValueError(f"delta must be a finite number >= 0, got {self.delta!r}")
        _choice("estimator", self.estimator, ESTIMATORS)
        _choice("norms", self.norms, NORMS)
        _choice("cap_order", self.cap_order, CAP_ORDERS)
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("pooling", self.pooling, POOLINGS)
        _choice("backprop", self.backprop, BACKPROPS)
        _choice("backend", self.backend, BACKENDS)
        _choice("backend_device", self.backend_device, BACKEND_DEVICES)
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be True or False, got {self.fused!r}")
        if self.backend != "torch" and self.estimator not in ("shots", "amplitude-estimation"):
            raise ValueError(
                f"backend {self.backend!r} runs circuits: estimator must be 'shots' or "
                f"'amplitude-estimation', got {self.estimator!r}"
            )
        if self.backend != "torch" and self.norms != "exact":
            raise ValueError(f"backend {self.backend!r} uses exact norms, got norms={self.norms!r}")
        if self.shots is not None and not (is_integer(self.shots) and self.shots >= 1):
            raise ValueError(f"shots must be a positive integer or None, got {self.shots!r}")
        if self.ae_qubits is not None and not (
            is_integer(self.ae_qubits) and 1 <= self.ae_qubits <= 16
        ):
            raise ValueError(f"ae_qubits must be an integer in [1, 16] or None, got {self.ae_qubits!r}")
        if not (is_integer(self.pool_size) and self.pool_size >= 1):
            raise ValueError(f"pool_size must be a positive integer, got {self.pool_size!r}")
        if self.estimator in ("shots", "amplitude-estimation") and self.epsilon == 0:
            if (self.shots if self.estimator == "shots" else self.ae_qubits) is None:
                raise ValueError(
                    f"estimator {self.estimator!r} with epsilon=0 needs an explicit "
                    f"{'shots' if self.estimator == 'shots' else 'ae_qubits'}"
                )

    @classmethod
    def from_dict(cls, data: dict) -> QConvOptions:
        """Options from a dict (a state_dict's, a JSON file's); ValueError naming an unknown key."""
        return cls().with_changes(**data)

    def with_changes(self, **changes) -> QConvOptions:
        """These options with ``changes`` applied, validated; ValueError naming an unknown option."""
        if unknown := sorted(set(changes) - set(OPTION_NAMES)):
            raise ValueError(f"unknown QConv2d option(s) {unknown}; the options are {list(OPTION_NAMES)}")
        return replace(self, **changes)

    @property
    def n_shots(self) -> int:
        """Shots of the Hadamard test: N = ⌈1/(4ε²)⌉ gives std 2P̂−1 <= 2ε."""
        return self.shots if self.shots is not None else math.ceil(1 / (4 * self.epsilon**2))

    @property
    def n_ae_qubits(self) -> int:
        """Evaluation qubits of amplitude estimation: 2^m >= π/ε."""
        if self.ae_qubits is not None:
            return self.ae_qubits
        return max(1, math.ceil(math.log2(math.pi / self.epsilon)))


OPTION_NAMES = tuple(f.name for f in fields(QConvOptions))
