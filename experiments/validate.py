"""Check the emulation against real circuits on the authors' first layer (1→5, 7×7).

For each backend, on k MNIST test images:
- estimation: every inner product of the layer, as the emulation's ``shots`` (or AE) model
  and as circuits; the normalised error (Ŷ − Y)/(‖A_p‖‖F_q‖) is summarised by mean and std,
  and each circuit backend's errors are compared with the emulation's by a two-sample
  Kolmogorov–Smirnov test;
- sampling: N_s = ⌊σK⌋ positions measured per image from √(f/Σf); the positions are binned
  into 10 bins of equal probability mass per image, and the summed chi-square over images
  (10k − k degrees of freedom) tests p ∝ f;
- throughput: inner products per second and sampled images per second.

``--bench`` instead times the Hadamard test alone for 5 to 9 qubits on every backend.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.nn import functional as F

from experiments.files import atomic_write_text
from qcnn.backends import get_backend, inner_products, sample_positions
from qcnn.backends.circuit_layer import receptive_field_pairs
from qcnn.sampling import n_samples

BINS = 10


DEFAULT_BACKENDS = ["torch", "pennylane", "pennylane:lightning.qubit", "qiskit-aer"]


def open_backend(spec: str, device: str):
    """A backend from "name" or "name:simulator" (e.g. "pennylane:lightning.qubit")."""
    name, _, simulator = spec.partition(":")
    return get_backend(name, device, simulator or None)


def sampling_chi_square(positions: np.ndarray, probabilities: np.ndarray) -> tuple[float, int]:
    """Chi-square of the positions over 10 bins of equal probability mass, and its dof."""
    order = np.argsort(probabilities)
    cumulative = np.cumsum(probabilities[order])
    bin_of = np.empty(len(probabilities), dtype=int)
    bin_of[order] = np.minimum((cumulative * BINS / cumulative[-1] - 1e-12).astype(int), BINS - 1)
    mass = np.bincount(bin_of, weights=probabilities, minlength=BINS)
    observed = np.bincount(bin_of[positions], minlength=BINS)
    expected = mass / mass.sum() * len(positions)
    used = expected > 0
    statistic = float(((observed[used] - expected[used]) ** 2 / expected[used]).sum())
    return statistic, int(used.sum()) - 1


def run_validate(
    images: torch.Tensor,
    backends: list[str],
    device: str,
    shots: int,
    sigma: float,
    cap: float,
    seed: int,
    out: Path,
) -> dict:
    """Run every backend on ``images`` and write ``validate.json`` and ``validate.md``."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(1, 5, 7).double()  # the authors' first layer, nn.Conv2d's initialisation
    images = images.double()
    a, f = receptive_field_pairs(images, conv.weight.detach(), (1, 1), (0, 0))
    keep = (a.norm(dim=1) > 0) & (f.norm(dim=1) > 0)  # a zero vector has no amplitude encoding
    a, f = a[keep], f[keep]
    exact = (a * f).sum(1) / (a.norm(dim=1) * f.norm(dim=1))
    values = F.conv2d(images, conv.weight, conv.bias).detach().clamp(0, cap).flatten(1)
    samples = n_samples(sigma, values.shape[1])
    results, reference = [], None
    for spec in backends:
        backend = open_backend(spec, device)
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        errors = (inner_products(backend, a, f, shots=shots, generator=generator) - exact).numpy()
        estimate_seconds = time.perf_counter() - started
        started = time.perf_counter()
        chi_square, dof = 0.0, 0
        for image in values:
            positions = sample_positions(backend, image, samples, generator).numpy()
            statistic, degrees = sampling_chi_square(positions, (image / image.sum()).numpy())
            chi_square, dof = chi_square + statistic, dof + degrees
        sample_seconds = time.perf_counter() - started
        row = {
            "backend": spec, "device": backend.device, "inner_products": len(errors),
            "error_mean": float(errors.mean()), "error_std": float(errors.std()),
            "expected_std": float(np.sqrt(((1 - exact.numpy() ** 2) / shots).mean())),
            "sampling_chi_square": chi_square, "sampling_dof": dof,
            "sampling_p_value": float(stats.chi2.sf(chi_square, dof)),
            "inner_products_per_s": len(errors) / estimate_seconds,
            "sampled_images_per_s": len(values) / sample_seconds,
        }  # fmt: skip
        if reference is None:
            reference = errors
        else:
            test = stats.ks_2samp(errors, reference)
            row.update(ks_statistic=float(test.statistic), ks_p_value=float(test.pvalue))
        results.append(row)
        print(format_row(row))
    report = {"images": len(images), "shots": shots, "sigma": sigma, "cap": cap, "seed": seed,
              "samples_per_image": samples, "results": results}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "validate.json", json.dumps(report, indent=2))
    atomic_write_text(out / "validate.md", markdown_table(report))
    return report


HEADER = (
    "| backend | device | inner products | error mean | error std (theory) | KS p vs torch "
    "| sampling χ² / dof (p) | inner products/s | images sampled/s |"
)


def format_row(row: dict) -> str:
    ks = f"{row['ks_p_value']:.3f}" if "ks_p_value" in row else "reference"
    return (
        f"| {row['backend']} | {row['device']} | {row['inner_products']} | {row['error_mean']:+.5f} "
        f"| {row['error_std']:.4f} ({row['expected_std']:.4f}) | {ks} "
        f"| {row['sampling_chi_square']:.0f} / {row['sampling_dof']} ({row['sampling_p_value']:.3f}) "
        f"| {row['inner_products_per_s']:,.0f} | {row['sampled_images_per_s']:.1f} |"
    )


def markdown_table(report: dict) -> str:
    lines = [
        f"Authors' first layer (1→5, 7×7) on {report['images']} MNIST test images, "
        f"{report['shots']} shots per inner product, σ = {report['sigma']} "
        f"({report['samples_per_image']} samples per image), C = {report['cap']}, seed {report['seed']}.",
        "",
        HEADER,
        "|" + "---|" * 9,
        *(format_row(row) for row in report["results"]),
    ]
    return "\n".join(lines) + "\n"


def run_throughput(backends: list[str], device: str, pairs: int, shots: int, seed: int) -> list[dict]:
    """Hadamard-test inner products per second for 5 to 9 qubits (ancilla included)."""
    rows = []
    print("| backend | device | qubits | pairs | shots | seconds | inner products/s |")
    print("|---|---|---|---|---|---|---|")
    for spec in backends:
        backend = open_backend(spec, device)
        for qubits in range(5, 10):
            generator = torch.Generator().manual_seed(seed)
            a = torch.randn(pairs, 2 ** (qubits - 1), generator=generator, dtype=torch.float64)
            f = torch.randn(pairs, 2 ** (qubits - 1), generator=generator, dtype=torch.float64)
            inner_products(backend, a[:2], f[:2], shots=shots, generator=generator)  # warm-up
            started = time.perf_counter()
            inner_products(backend, a, f, shots=shots, generator=generator)
            seconds = time.perf_counter() - started
            row = {"backend": spec, "device": backend.device, "qubits": qubits, "pairs": pairs,
                   "shots": shots, "seconds": seconds, "per_s": pairs / seconds}  # fmt: skip
            rows.append(row)
            print(f"| {spec} | {backend.device} | {qubits} | {pairs} | {shots} | {seconds:.3f} "
                  f"| {row['per_s']:,.0f} |")  # fmt: skip
    return rows
