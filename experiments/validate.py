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

``validate bench`` instead times the Hadamard test alone for 5 to 9 qubits on every backend.

``validate network`` (:func:`run_network`) runs a whole trained network instead: every inner product
of every QCNN layer, and every sampling step, on each backend in turn (``torch``, the
emulation, first), with the same estimator, on the same test images; it reports each
accuracy, the paired difference to the emulation with an exact 95 % interval and McNemar's
exact test (:func:`paired_difference`), and the throughput.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.nn import functional as F

from experiments.config import RunConfig, run_id
from experiments.data import Mnist
from experiments.evaluate import load_checkpoint
from experiments.files import atomic_write_text
from experiments.train import train_run
from qcnn import QConv2d, configure, convert
from qcnn.backends import get_backend, inner_products, sample_positions
from qcnn.backends.circuit_layer import receptive_field_pairs
from qcnn.options import QConvOptions
from qcnn.sampling import n_samples
from qcnn.training import batches

BINS = 10



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
    options: QConvOptions,
    seed: int,
    out: Path,
) -> dict:
    """Run every backend on ``images`` with ``options``' shots, σ and C; write
    ``validate.json`` and ``validate.md``."""
    shots, sigma, cap = options.n_shots, options.sigma, options.cap
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
    "| backend | device | inner products | error mean | error std (theory) | KS p vs the first "
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


def run_throughput(
    backends: list[str], device: str, pairs: int, shots: int, seed: int, ae_qubits: int | None = None
) -> list[dict]:
    """Inner products per second for 5 to 9 qubits (ancilla included): Hadamard tests of
    ``shots`` shots, or with ``ae_qubits``, amplitude estimation on that many more qubits."""
    estimator = {"shots": shots} if ae_qubits is None else {"ae_qubits": ae_qubits}
    column = "shots" if ae_qubits is None else "AE qubits"
    rows = []
    print(f"| backend | device | qubits | pairs | {column} | seconds | inner products/s |")
    print("|---|---|---|---|---|---|---|")
    for spec in backends:
        backend = open_backend(spec, device)
        for qubits in range(5, 10):
            generator = torch.Generator().manual_seed(seed)
            a = torch.randn(pairs, 2 ** (qubits - 1), generator=generator, dtype=torch.float64)
            f = torch.randn(pairs, 2 ** (qubits - 1), generator=generator, dtype=torch.float64)
            inner_products(backend, a[:2], f[:2], generator=generator, **estimator)  # warm-up
            started = time.perf_counter()
            inner_products(backend, a, f, generator=generator, **estimator)
            seconds = time.perf_counter() - started
            value = next(iter(estimator.values()))
            row = {"backend": spec, "device": backend.device, "qubits": qubits, "pairs": pairs,
                   column: value, "seconds": seconds, "per_s": pairs / seconds}  # fmt: skip
            rows.append(row)
            print(f"| {spec} | {backend.device} | {qubits} | {pairs} | {value} | {seconds:.3f} "
                  f"| {row['per_s']:,.0f} |")  # fmt: skip
    return rows



def network_to_validate(
    checkpoint: Path | None, data: Mnist, options: dict, seed: int, out: Path
) -> torch.nn.Module:
    """The QCNN of a checkpoint (a CNN's is converted), or else of the authors' CNN trained as
    ``compare`` trains it (2 epochs, seed ``seed``) on ``data``'s training images, in a run
    folder under ``out`` that a later call reuses; ``options`` set on its layers."""
    if checkpoint is None:
        config = RunConfig(model="cnn", seed=seed, train_limit=len(data.train_images),
                           test_limit=len(data.test_images))  # fmt: skip
        checkpoint = out / run_id(config)
        train_run(config, data, checkpoint, torch.device("cpu"), progress=False)
    config, model, _ = load_checkpoint(checkpoint, torch.device("cpu"), torch.Generator().manual_seed(seed))
    if config.model == "cnn":
        model = convert(model)
    configure(model, **options)
    return model.eval()


def run_network(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    backends: list[str],
    device: str,
    shots: int,
    seed: int,
    out: Path,
    batch_size: int = 100,
) -> dict:
    """Test accuracy of ``model`` (holding QConv2d layers) with its layers on each backend.

    Every layer gets the ``shots`` estimator and exact norms; its other options (σ, C, cap
    order, sampling) stay. Each backend starts from the same generator seed. Writes
    ``validate-network.json`` and ``.md`` into ``out``.
    """
    layers = [m for m in model.modules() if isinstance(m, QConv2d)]
    pairs = []  # inner products per forward pass: images × positions × kernels, per layer
    for layer in layers:
        layer.register_forward_hook(lambda layer, inputs, _: pairs.append(_pair_count(layer, inputs[0])))
    results, reference = [], None
    for name in backends:
        configure(model, backend=name, backend_device=device, estimator="shots", shots=shots, norms="exact")
        generator = torch.Generator().manual_seed(seed)
        for layer in layers:
            layer.generator = generator
        pairs.clear()
        started = time.perf_counter()
        with torch.no_grad():
            correct = torch.cat([model(x).argmax(1) == y for x, y in batches(images, labels, batch_size)])
        seconds = time.perf_counter() - started
        where = "emulation" if name == "torch" else get_backend(name, device).device
        accuracy, count = correct.double().mean().item(), sum(pairs)
        row = {"backend": name, "device": where, "images": len(images), "accuracy": accuracy,
               "inner_products": count, "seconds": seconds, "inner_products_per_s": count / seconds,
               "images_per_s": len(images) / seconds}  # fmt: skip
        if reference is None:
            reference = correct
        else:
            row.update(paired_difference(correct, reference))
        results.append(row)
        print(format_network_row(row))
    report = {"images": len(images), "shots": shots, "seed": seed, "results": results,
              "layers": [layer.extra_repr() for layer in layers]}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "validate-network.json", json.dumps(report, indent=2))
    lines = [NETWORK_HEADER, "|" + "---|" * 8, *(format_network_row(row) for row in results)]
    atomic_write_text(out / "validate-network.md", "\n".join(lines) + "\n")
    return report


def paired_difference(correct: torch.Tensor, reference: torch.Tensor, level: float = 0.95) -> dict:
    """The accuracy difference of two classifiers on the same images, with an exact test and
    interval: ``b`` images only ``correct`` gets right, ``c`` only ``reference``; McNemar's
    exact p-value (b ~ Binomial(b + c, 1/2) if neither is better), and for the difference
    (b − c)/n the interval of the Clopper–Pearson intervals of b/n and c/n at (1 + level)/2
    each (Bonferroni): exact, never narrower than ``level``, and not empty of width when no
    image differs, where a normal approximation collapses to ± 0."""
    n = len(correct)
    b = int((correct & ~reference).sum())
    c = int((~correct & reference).sum())
    each = 1 - (1 - level) / 2
    b_low, b_high = stats.binomtest(b, n).proportion_ci(each, method="exact")
    c_low, c_high = stats.binomtest(c, n).proportion_ci(each, method="exact")
    p_value = stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return {"difference": (b - c) / n, "difference_low": b_low - c_high, "difference_high": b_high - c_low,
            "disagreements": b + c, "mcnemar_p": p_value}


def _pair_count(layer: QConv2d, x: torch.Tensor) -> int:
    """The inner products a forward pass of ``layer`` on ``x`` estimates: B · H'W' · D'."""
    geometry = zip(x.shape[2:], layer.padding, layer.kernel_size, layer.stride, strict=True)
    height, width = ((size + 2 * pad - kernel) // step + 1 for size, pad, kernel, step in geometry)
    return len(x) * height * width * layer.out_channels


NETWORK_HEADER = (
    "| backend | device | images | test accuracy | difference to the emulation [exact 95 % CI], McNemar p "
    "| images that differ | inner products/s | images/s |"
)


def format_network_row(row: dict) -> str:
    if "difference" in row:
        interval = f"[{100 * row['difference_low']:+.2f}, {100 * row['difference_high']:+.2f}]"
        difference = f"{100 * row['difference']:+.2f} % {interval}, p = {row['mcnemar_p']:.3g}"
        differ = str(row["disagreements"])
    else:
        difference, differ = "reference", ""
    return (
        f"| {row['backend']} | {row['device']} | {row['images']} | {100 * row['accuracy']:.2f} % "
        f"| {difference} | {differ} | {row['inner_products_per_s']:,.0f} | {row['images_per_s']:.1f} |"
    )
