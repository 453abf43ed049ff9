"""Running-time accounting, ``docs/algorithm.md`` section 4.

Per layer and per image, with K = D'H'W' outputs and kernel volume D·h·w:

- classical cost: K · D·h·w multiply-adds;
- quantum cost: N_s · M √C / (ε √E), with N_s = ⌊σK⌋ samples (K without sampling),
  M = max_{p,q} ‖A_p‖‖F_q‖ and E = mean of f(Ŷ) over the outputs (the amplitude
  amplification cost √(C/E)); polylog factors are left out.

A :class:`LayerCost` averages these over the images of one forward pass. Accounting is
opt-in (``QConv2d.track_cost``) so that it costs nothing when off. With C = ∞ the largest
f(Ŷ) of the image stands in for C; with ε = 0 the quantum cost is infinite.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from qcnn.sampling import tomography_eta


@dataclass(frozen=True)
class LayerCost:
    images: int
    outputs: int  # K
    samples: int  # N_s
    max_norm_product: float  # M, mean over images
    mean_activation: float  # E, mean over images
    distinct_fraction: float  # distinct positions kept / K, mean over images
    eta: float  # ℓ∞ tomography precision of N_s samples
    quantum_cost: float  # per image, mean over images with E > 0
    classical_cost: float  # multiply-adds per image

    @property
    def speedup(self) -> float:
        """Classical over quantum cost: above 1 where the quantum layer would be cheaper."""
        return self.classical_cost / self.quantum_cost if self.quantum_cost > 0 else math.inf

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "speedup": self.speedup}


@torch.no_grad()
def summarise(
    scale: torch.Tensor, activations: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image, in float64: M = max ‖A_p‖‖F_q‖ (``scale``, broadcastable to the
    activations), E = mean f(Ŷ) over the outputs (``activations`` before sampling), and C,
    or the largest f(Ŷ) where C = ∞."""
    images = len(activations)
    flat = activations.reshape(images, -1).double()
    m = scale.expand_as(activations).reshape(images, -1).amax(1).double()
    c = torch.full((images,), cap, dtype=torch.float64) if math.isfinite(cap) else flat.amax(1)
    return m, flat.mean(1), c.to(flat.device)


@torch.no_grad()
def layer_cost(
    m: torch.Tensor,
    e: torch.Tensor,
    c: torch.Tensor,
    distinct: torch.Tensor | None,
    outputs: int,
    samples: int,
    epsilon: float,
    kernel_volume: int,
) -> LayerCost:
    """The cost of one forward pass from the per-image M, E and C of :func:`summarise` (or of
    a compiled pass that adds them up as it computes f), and the distinct positions each
    image kept (None without sampling)."""
    images = len(e)
    active = e > 0
    if epsilon == 0:
        quantum = math.inf
    elif active.any():
        per_image = samples * m[active] * c[active].sqrt() / (epsilon * e[active].sqrt())
        quantum = per_image.mean().item()
    else:
        quantum = 0.0
    distinct_fraction = 1.0 if distinct is None else (distinct.double() / outputs).mean().item()
    return LayerCost(
        images=images,
        outputs=outputs,
        samples=samples,
        max_norm_product=m.mean().item(),
        mean_activation=e.mean().item(),
        distinct_fraction=distinct_fraction,
        eta=tomography_eta(outputs, samples),
        quantum_cost=quantum,
        classical_cost=float(outputs * kernel_volume),
    )
