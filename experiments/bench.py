"""Speed of the QCNN layer against the classical one, measured as ratios in one run.

For each device and batch size: one training step (forward, backward, optimiser) of the
authors' network as CNN, as QCNN in theory mode and as QCNN in authors mode, and the two
conv blocks alone (forward + backward). The theory-mode QCNN also runs on torch operations
("qcnn-theory-unfused") instead of its compiled CPU pass (``qcnn.accel.estimate``) or its
fused CUDA kernels (``qcnn.accel.fused``), to show what they save. ``--compile`` adds the
training step under ``torch.compile`` (CNN and theory-mode QCNN; the layers themselves stay
eager), ``--ablation`` the theory-mode step without parts of its work. Variants are timed in interleaved
rounds so that machine noise hits them alike; each one's step time and its ratio to the
classical step of the same round are reported as median (min-max) over the rounds, and
written with the machine and versions to ``bench.json``. This is a benchmark, not a test:
nothing here asserts a speed.
"""

from __future__ import annotations

import json
import logging
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

from experiments.config import RunConfig
from experiments.files import atomic_write_text
from experiments.models import build_model, build_optimiser, check_network, qconv_layers
from experiments.runfolder import provenance, strict

# Each variant: the run's model and mode, layer options set on its QConv2d layers, and
# whether its training step runs through torch.compile (the QCNN layers stay eager inside).
Variant = tuple[dict, dict, bool]
THEORY = {"model": "qcnn", "mode": "theory"}
VARIANTS: dict[str, Variant] = {
    "cnn": ({"model": "cnn"}, {}, False),
    "qcnn-theory": (THEORY, {}, False),
    "qcnn-authors": ({"model": "qcnn", "mode": "authors"}, {}, False),
    # the layers' torch operations instead of their compiled pass (CPU) or fused kernels (CUDA)
    "qcnn-theory-unfused": (THEORY, {"fused": False}, False),
}
COMPILED_VARIANTS: dict[str, Variant] = {
    "cnn-compiled": ({"model": "cnn"}, {}, True),
    "qcnn-theory-compiled": (THEORY, {}, True),
}
# Where the theory-mode step's extra time goes: the same step without the δ noise, then also
# without the estimation noise, then also without the sampling.
ABLATION_VARIANTS: dict[str, Variant] = {
    "qcnn-theory-no-delta": (THEORY, {"delta": 0.0}, False),
    "qcnn-theory-no-noise": (THEORY, {"delta": 0.0, "epsilon": 0.0}, False),
    "qcnn-theory-bare": (THEORY, {"delta": 0.0, "epsilon": 0.0, "sigma": None}, False),
}


def variants(
    net: str = "authors", compiled: bool = False, ablation: bool = False
) -> dict[str, tuple[RunConfig, dict, bool]]:
    """Each variant's run configuration (``net`` with its training recipe), layer options and
    compile flag."""
    chosen = dict(VARIANTS)
    if compiled:
        chosen |= COMPILED_VARIANTS
    if ablation:
        chosen |= ABLATION_VARIANTS
    runnable = {}
    for name, (run, options, flag) in chosen.items():
        config = RunConfig.for_net(net, **run)
        try:
            check_network(config, IMAGE_SHAPE)
        except ValueError as error:  # e.g. the authors' cap order before ResNet's BatchNorm
            log.warning("bench: %s net, %s left out: %s", net, name, error)
            continue
        runnable[name] = (config, options, flag)
    return runnable


log = logging.getLogger(__name__)
IMAGE_SHAPE = (1, 28, 28)  # the steps run on random images of MNIST's shape
TWO_CONV_NETS = ("authors", "lenet5")  # whose conv blocks are timed alone too


def _model(config: RunConfig, layer_options: dict, device: torch.device, generator: torch.Generator):
    """The variant's network, with its layer options set on every QConv2d."""
    model = build_model(config, device, generator)
    for layer in qconv_layers(model).values():
        layer.configure(**layer_options)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _training_step(
    config: RunConfig, layer_options: dict, compiled: bool, device: torch.device, batch: int
) -> Callable[[], None]:
    generator = torch.Generator(device).manual_seed(config.seed)
    model = _model(config, layer_options, device, generator)
    optimiser = build_optimiser(config, model, generator)
    run = torch.compile(model) if compiled else model
    images = torch.randn(batch, *IMAGE_SHAPE, device=device, generator=generator)
    labels = torch.randint(0, 10, (batch,), device=device, generator=generator)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        F.nll_loss(run(images), labels).backward()
        optimiser.step()

    return step


def _conv_blocks(
    config: RunConfig, layer_options: dict, compiled: bool, device: torch.device, batch: int
) -> Callable[[], None]:
    generator = torch.Generator(device).manual_seed(config.seed)
    model = _model(config, layer_options, device, generator)
    blocks = torch.nn.Sequential(*(qconv_layers(model).values() or (model.conv1, model.conv2)))
    images = torch.randn(batch, *IMAGE_SHAPE, device=device, generator=generator)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        blocks(images).sum().backward()

    return step


def time_interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, rounds: int, repeat: int
) -> dict[str, list[float]]:
    """Seconds per call of each step in each of ``rounds`` alternating rounds."""
    for step in steps.values():  # warm-up: allocators, numba compilation, cuDNN choice
        for _ in range(3):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeat):
                step()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / repeat)
    return samples


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def profile_steps(devices: list[torch.device], batch: int, net: str = "authors", steps: int = 10) -> None:
    """Print where one training step of each variant spends its time (torch profiler).

    On CUDA it also prints the GPU kernels launched per step and the GPU time they take: a
    step whose GPU time is far below its wall time is bound by the host (Python, dispatch,
    launches), not by the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    for device in devices:
        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for name, variant in variants(net).items():
            step = _training_step(*variant, device, batch)
            for _ in range(3):  # warm-up, as in time_interleaved
                step()
            _sync(device)
            with profile(activities=activities) as profiler:
                for _ in range(steps):
                    step()
                _sync(device)
            events = profiler.key_averages()
            where = f"{device} ({machine_description(device)}), {net} net"
            print(f"\n== {where}, {name}, batch {batch}, {steps} steps")
            if cuda:
                kernels = [e for e in events if e.device_type.name == "CUDA"]
                count = sum(e.count for e in kernels) / steps
                busy_ms = sum(e.self_device_time_total for e in kernels) / steps / 1e3
                print(f"{count:.0f} GPU kernels per step, GPU busy {busy_ms:.3f} ms per step")
            order = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            print(events.table(sort_by=order, row_limit=12))


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import triton  # the fused kernels run only with it

            kernels = f"Triton {triton.__version__}"
        except ImportError:
            kernels = "no Triton: the QCNN layers run torch operations"
        return f"{torch.cuda.get_device_name(device)}, {kernels}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run_bench(
    devices: list[torch.device],
    batch_sizes: list[int],
    rounds: int = 15,
    repeat: int = 5,
    compiled: bool = False,
    net: str = "authors",
    out: Path | None = None,
    ablation: bool = False,
) -> list[dict]:
    """Time every variant of ``net``; print and return one row per (device, batch, what,
    variant): its ms per step and its ratio to the CNN's step in the same round, each as
    min, median and max over the rounds; with ``out``, also into ``out/bench.json`` with
    the machine and versions (:func:`experiments.runfolder.provenance`).

    With ``compiled``, the training step is also timed under ``torch.compile`` (CNN and
    theory-mode QCNN), each against the eager CNN, so a slowdown shows. With ``ablation``,
    the theory-mode step is also timed without its δ noise, estimation noise and sampling
    (:data:`ABLATION_VARIANTS`). The conv blocks alone are timed for the two-convolution
    nets (authors, lenet5)."""
    rows = []
    print(f"torch {torch.__version__}; {net} net; rounds={rounds}, steps per round={repeat}")
    for device in devices:
        print(f"\n== {device}: {machine_description(device)}")
        header = f"{'ms (min-max)':>22}  {'ratio to cnn (min-max)':>24}"
        print(f"{'batch':>5}  {'timed':<14} {'variant':<21} {header}")
        for batch in batch_sizes:
            timed = [("training step", _training_step, variants(net, compiled, ablation))]
            if net in TWO_CONV_NETS:
                timed.append(("conv blocks", _conv_blocks, variants(net)))
            for what, make, chosen in timed:
                steps = {name: make(*variant, device, batch) for name, variant in chosen.items()}
                samples = time_interleaved(steps, device, rounds, repeat)
                for name, seconds in samples.items():
                    ms = spread([1e3 * value for value in seconds])
                    ratio = spread([value / cnn for value, cnn in zip(seconds, samples["cnn"], strict=True)])
                    rows.append(
                        {"device": str(device), "machine": machine_description(device), "batch": batch,
                         "timed": what, "variant": name, "rounds": rounds, "steps_per_round": repeat,
                         **{f"ms_{key}": value for key, value in ms.items()},
                         **{f"ratio_{key}": value for key, value in ratio.items()}}
                    )  # fmt: skip
                    ms_text = f"{ms['median']:.2f} ({ms['min']:.2f}-{ms['max']:.2f})"
                    ratio_text = f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"
                    print(f"{batch:>5}  {what:<14} {name:<21} {ms_text:>22}  {ratio_text:>24}")
    if out is not None:
        record = {"net": net, "provenance": provenance(devices[-1]), "rows": rows}
        atomic_write_text(out / "bench.json", json.dumps(strict(record), indent=2, allow_nan=False))
        print(f"\nbench.json in {out}")
    return rows
