"""Command line: ``python -m experiments {compare,sweep,evaluate,plot-sweeps,validate,bench} ...``,
run from the repository's root (the harness is not installed with the ``qcnn`` package)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from classical import NETWORKS
from experiments.config import MODES, OPTIMIZERS, RunConfig, run_id
from experiments.files import RunLocked
from experiments.models import check_network
from qcnn.options import (
    BACKEND_DEVICES,
    BACKENDS,
    BACKPROPS,
    CAP_ORDERS,
    ESTIMATORS,
    NORMS,
    SAMPLINGS,
    QConvOptions,
)
from qcnn.sampling import n_samples
from qcnn.training import Diverged

# Backends of ``validate layer`` and ``bench`` (circuit backends), and of ``validate network``
# (the layer's backends); the first of each is the reference the others are compared with.
DEFAULT_BACKENDS = ["outcome-law", "pennylane", "pennylane:lightning.qubit", "qiskit-aer"]
NETWORK_BACKENDS = list(BACKENDS)
# K of the layer that ``validate`` runs: the authors' first, 5 × 22 × 22 outputs per image.
VALIDATED_LAYER_OUTPUTS = 5 * 22 * 22

log = logging.getLogger("experiments")
DEFAULTS = RunConfig()


class CommandError(Exception):
    """A mistake in a command's options or files, found before any work is done."""


def check_count(option: str, value: int) -> None:
    if value < 1:
        raise CommandError(f"{option} must be >= 1, got {value}")


def writable_folder(path: str) -> Path:
    """``path`` as an output folder, checked but not made yet (a failing command leaves
    nothing behind): CommandError if it, or the folder it would be made in, is not writable."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"--out {folder}: exists and is not a folder")
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise CommandError(f"--out {folder}: cannot write there ({existing} is not a writable folder)")
    return folder


def report_diverged(rows: list[dict]) -> None:
    """Diverged if any run's loss became NaN or inf (stored as diverged, not as a result)."""
    if rows:
        runs = ", ".join(f"{row['model']} seed {row['seed']}" for row in rows)
        raise Diverged(f"{len(rows)} run(s) diverged (the loss became NaN or inf): {runs}")


def check_data(config: RunConfig, data) -> None:
    """CommandError for a --train-limit or --test-limit beyond the data (a run's configuration
    records what it used); ValueError for a network the data's images do not fit."""
    for option, limit, available in (("--train-limit", config.train_limit, len(data.train_images)),
                                     ("--test-limit", config.test_limit, len(data.test_images))):  # fmt: skip
        if limit is not None and limit > available:
            raise CommandError(f"{option} {limit}: the data has {available} images (leave it out for all)")
    check_network(config, tuple(data.train_images.shape[1:]))


def resolve_device(name: str) -> torch.device:
    """"auto" takes CUDA when present and says so when it falls back to the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        log.warning("--device auto: no CUDA device found, running on the CPU")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise CommandError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def optional_float(text: str) -> float | None:
    """A float, 'inf', or 'none' (for σ: sampling off)."""
    return None if text.lower() == "none" else float(text)


def add_run_options(
    parser: argparse.ArgumentParser, grid: bool = False, nets: bool = False, from_run: bool = False
) -> None:
    """The options of one training run, defaults from RunConfig (the paper's).

    With ``grid``, --epsilon, --cap, --sigma and --delta take several values (sweep axes);
    with ``nets``, --net takes several networks; with ``from_run``, the net, the data and the
    batch sizes are a source run's (``finetune``), so they are not offered, and passing one
    is an error rather than an option silently overridden.
    """
    d = DEFAULTS

    def axis(default) -> dict:  # a sweep axis takes several values and defaults to a list
        return {"nargs": "+", "default": [default]} if grid else {"default": default}

    group = parser.add_argument_group("training (defaults: the paper's)")
    if nets:
        group.add_argument("--net", choices=tuple(NETWORKS), nargs="+", default=[d.net], help="networks")
    elif not from_run:
        group.add_argument("--net", choices=tuple(NETWORKS), default=d.net, help="network")
    group.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training images")
    if not from_run:
        group.add_argument("--train-limit", type=int, default=None, help="first N training images")
        group.add_argument("--test-limit", type=int, default=None, help="first N test images")
        group.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
        group.add_argument("--test-batch-size", type=int, default=d.test_batch_size, help="test batch size")
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                       help="default: the net's recipe (experiments.config.RECIPES; sgd for authors, lenet5)")
    group.add_argument("--lr", type=float, default=None, help="default: the net's recipe (0.01 for authors)")
    group.add_argument("--momentum", type=float, default=None, help="default: the net's recipe (0)")
    group = parser.add_argument_group("QCNN layer (see qcnn.QConvOptions)")
    group.add_argument("--epsilon", type=float, help="inner-product error ε", **axis(d.epsilon))
    group.add_argument("--cap", type=float, help="ReLU cap C ('inf' for none)", **axis(d.cap))
    group.add_argument("--sigma", type=optional_float, help="sampling ratio σ, or 'none'", **axis(d.sigma))
    group.add_argument("--delta", type=float, help="gradient error δ", **axis(d.delta))
    group.add_argument("--mode", choices=MODES, default=d.mode,
                       help="theory: exact norms, f(Y+noise), δ in the layers' backward; "
                            "authors: the authors' simulation")  # fmt: skip
    group.add_argument("--estimator", default=d.estimator, choices=ESTIMATORS, help="inner-product estimate")
    group.add_argument("--shots", type=int, default=None,
                       help="shots of the shots estimator (default: ⌈1/(4ε²)⌉; needed at ε = 0)")
    group.add_argument("--sampling", choices=SAMPLINGS, default=d.sampling, help="probability ∝ f or f²")
    group.add_argument("--backprop", choices=BACKPROPS, default=d.backprop, help="δ's error model")
    group.add_argument("--norms", choices=NORMS, default=None,
                       help="patch norms, overriding the mode's choice")  # fmt: skip
    group.add_argument("--cap-order", choices=CAP_ORDERS, default=None,
                       help="f(Y+noise) or clamp(clamp(Y)+noise), overriding the mode's choice")  # fmt: skip
    add_layer_mapping(group)
    group = parser.add_argument_group("where")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--tensorboard", action="store_true",
                       help="also write TensorBoard events into each run folder (the tensorboard extra)")


def check_tensorboard(args: argparse.Namespace) -> None:
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise CommandError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'")


def add_layer_mapping(group: argparse._ArgumentGroup) -> None:
    """--classical and --layer-options: qcnn.convert's per-layer mapping."""
    group.add_argument("--classical", nargs="+", default=[], metavar="NAME_OR_PATTERN",
                       help="convolutions kept classical, by qualified name or fnmatch pattern (conv2.*)")
    group.add_argument("--layer-options", metavar="FILE.json", default=None,
                       help='per-layer options: {"name or pattern": {option: value} or null}; patterns '
                            "apply in the file's order, after --classical")  # fmt: skip


def layer_mapping(args: argparse.Namespace) -> dict:
    """The ``layers`` mapping of --classical and --layer-options (checked when a run builds it)."""
    mapping = {pattern: None for pattern in args.classical}
    if args.layer_options is not None:
        spec = read_json_object("--layer-options", Path(args.layer_options))
        mapping.update({key: value for key, value in spec.items() if key not in mapping})
    return mapping


def read_json_object(option: str, path: Path) -> dict:
    """The JSON object in ``path``; CommandError naming ``option`` and the file otherwise."""
    try:
        spec = json.loads(path.read_text())
    except OSError as error:
        raise CommandError(f"{option} {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise CommandError(f"{option} {path}: not valid JSON ({error})") from None
    if not isinstance(spec, dict):
        raise CommandError(f"{option} {path}: expected a JSON object, got {type(spec).__name__}")
    return spec


def run_config(args: argparse.Namespace, **overrides) -> RunConfig:
    """The run the options describe; optimizer, lr and momentum left unset take the net's recipe."""
    fields = RunConfig.__dataclass_fields__
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    return RunConfig.for_net(**{**values, "layers": layer_mapping(args), **overrides})


def cmd_compare(args: argparse.Namespace) -> None:
    from experiments.compare import format_table, run_compare
    from experiments.data import load_mnist

    nets = list(dict.fromkeys(args.net))
    bases = [run_config(args, net=net, seed=args.seed, model="qcnn") for net in nets]  # each run: its model
    check_count("--seeds", args.seeds)
    check_tensorboard(args)
    out = writable_folder(args.out)
    device = resolve_device(args.device)
    models = ["cnn", "qcnn"] if args.model == "both" else [args.model]
    if args.calibrate_images < 0:
        raise CommandError(f"--calibrate must be >= 0 (0: no calibrated row), got {args.calibrate_images}")
    data = load_mnist(args.data_dir, device)
    for base in bases:
        check_data(base, data)
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"compare: {', '.join(models)} on {device}, seeds {seeds}, results in {out}")
    started, rows = time.perf_counter(), []
    for base in bases:  # several nets: one folder each (its summary.csv, curves.png), one table
        folder = out / base.net if len(bases) > 1 else out
        results = run_compare(base, seeds, models, data, folder, device, not args.no_progress,
                              args.calibrate_images, args.tensorboard)  # fmt: skip
        rows += [{**row, "net": base.net} for row in results]
    print()
    print(format_table(rows))
    written = "summary.csv, curves.png and one folder per run"
    written = f"a folder per net with {written}" if len(bases) > 1 else written
    print(f"\nwall time {time.perf_counter() - started:.1f} s; {written} in {out}")
    report_diverged([row for row in rows if row.get("diverged")])


def cmd_bench(args: argparse.Namespace) -> None:
    from experiments.bench import profile_steps, run_bench

    if args.cpu_only and args.cuda_only:
        raise CommandError("bench: --cpu-only and --cuda-only exclude each other")
    if args.cuda_only and not torch.cuda.is_available():
        raise CommandError("bench --cuda-only: no CUDA device is available")
    for size in args.batch_sizes:
        check_count("--batch-sizes", size)
    check_count("--rounds", args.rounds)
    check_count("--repeat", args.repeat)
    devices = [] if args.cuda_only else [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    if args.profile:
        profile_steps(devices, args.batch_sizes[0], args.net)
    else:
        run_bench(devices, args.batch_sizes, args.rounds, args.repeat, args.compile, args.net,
                  writable_folder(args.out), args.ablation)  # fmt: skip


def validated_layer_options(args: argparse.Namespace) -> QConvOptions:
    """The options ``validate layer`` and ``validate network`` give the layers: the shots
    estimator with ``--shots``, ``--sigma`` and ``--cap``, checked by the layer's own checks."""
    check_count("--images", args.images)
    return QConvOptions(sigma=args.sigma, cap=args.cap, estimator="shots", shots=args.shots)


def cmd_validate_layer(args: argparse.Namespace) -> None:
    from experiments.data import load_mnist
    from experiments.validate import run_validate

    options = validated_layer_options(args)
    n_samples(options.sigma, VALIDATED_LAYER_OUTPUTS)
    out = writable_folder(args.out)
    data = load_mnist(args.data_dir, "cpu", train_limit=1, test_limit=args.images)
    print(f"validate layer: {args.images} test images, backends {', '.join(args.backends)}, results in {out}")
    run_validate(data.test_images, args.backends, args.backend_device, options, args.seed, out)


def cmd_validate_network(args: argparse.Namespace) -> None:
    from experiments.data import load_mnist
    from experiments.runfolder import checkpoint_file
    from experiments.validate import network_to_validate, run_network

    options = validated_layer_options(args)
    if unknown := [name for name in args.backends if name not in BACKENDS]:
        raise CommandError(f"validate network: backends must be among {BACKENDS}, got {unknown}")
    if args.checkpoint is not None:
        checkpoint_file(Path(args.checkpoint))
    out = writable_folder(args.out)
    data = load_mnist(args.data_dir, "cpu", train_limit=args.train_images, test_limit=args.images)
    checkpoint = None if args.checkpoint is None else Path(args.checkpoint)
    layer_options = {"sigma": options.sigma, "cap": options.cap}
    model = network_to_validate(checkpoint, data, layer_options, args.seed, out)
    print(f"validate network: {args.images} test images, backends {', '.join(args.backends)}, in {out}")
    run_network(model, data.test_images, data.test_labels, args.backends, args.backend_device,
                options.n_shots, args.seed, out)  # fmt: skip


def cmd_validate_bench(args: argparse.Namespace) -> None:
    from experiments.validate import run_throughput

    run_throughput(args.backends, args.backend_device, args.pairs, args.shots, args.seed, args.ae_qubits)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from experiments.data import load_mnist
    from experiments.evaluate import format_summary, run_evaluate
    from experiments.runfolder import checkpoint_file

    check_count("--repeats", args.repeats)
    if args.calibrate < 0:
        raise CommandError(f"--calibrate must be >= 0 (training images), got {args.calibrate}")
    checkpoint_file(Path(args.checkpoint))
    layers = layer_mapping(args)
    out = writable_folder(args.out)
    device = resolve_device(args.device)
    data = load_mnist(args.data_dir, device, train_limit=max(1, args.calibrate))
    print(f"evaluate: {args.checkpoint} on {device}, {args.repeats} passes per point, results in {out}")
    rows = run_evaluate(Path(args.checkpoint), args.epsilon, args.sigma, args.cap, args.repeats, data,
                        device, args.seed, out, not args.no_progress, layers=layers,
                        calibrate_images=args.calibrate, per_layer=args.per_layer)  # fmt: skip
    print()
    print(format_summary(rows))
    extra = ", per_layer.csv and per_layer.png" if args.per_layer else ""
    print(f"\nevaluate.csv, accuracy_vs_epsilon.png{extra} in {args.out}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from experiments.compare import format_start
    from experiments.data import load_mnist
    from experiments.train import source_run, train_run

    check_tensorboard(args)
    device = resolve_device(args.device)
    jobs = []  # (the CNN's metrics, the fine-tuning run's config), every source checked first
    for run in args.run:
        state = source_run(Path(run), device)
        trained = RunConfig.from_dict(state["config"])
        kept = ("net", "seed", "train_limit", "test_limit", "batch_size", "test_batch_size", "log_every")
        same = {name: getattr(trained, name) for name in kept}  # the data and seed of the CNN's run
        source = str(Path(run).resolve())  # the configuration names its source wherever it runs
        config = run_config(args, **same, model="qcnn", init_from=source, calibrate=args.calibrate)
        jobs.append((state["metrics"], config))
    out = writable_folder(args.out)
    data = load_mnist(args.data_dir, device)
    for _, config in jobs:  # every job checked before any trains
        check_data(config, data)
        if config.calibrate > (trained := config.train_limit or len(data.train_images)):
            source = config.init_from
            raise CommandError(f"--calibrate {config.calibrate}: {source} trained on {trained} images")
    done, diverged = [], []
    for source_metrics, config in jobs:
        name = Path(config.init_from).name
        print(f"finetune: {name} as a QCNN on {device}, {config.epochs} epoch(s), in {out}")
        folder = out / run_id(config)
        metrics = train_run(config, data, folder, device, not args.no_progress, args.tensorboard)
        done.append((source_metrics, metrics))
        diverged += [{"model": "qcnn", "seed": config.seed}] if "diverged" in metrics else []
    print()
    print(format_start(done))
    report_diverged(diverged)


def sweep_configs(args: argparse.Namespace) -> list[RunConfig]:
    """The runs a ``sweep`` command line asks for: grid axes, preset or config file, × seeds,
    each checked on the data's image shape."""
    from experiments.data import load_mnist
    from experiments.sweep import PAPER_GRID, expand_grid

    grid = {name: getattr(args, name) for name in ("epsilon", "cap", "sigma", "delta")}
    check_count("--seeds", args.seeds)
    seeds = list(range(args.seed, args.seed + args.seeds))
    base_fields = {}
    if args.preset == "paper":
        grid = dict(PAPER_GRID)
    if args.config:
        spec = read_sweep_config(Path(args.config))
        grid.update(spec.pop("grid", {}))
        seeds = spec.pop("seeds", seeds)
        base_fields = spec
    scalars = {name: values[0] for name, values in grid.items()}
    base = run_config(args, model="qcnn", seed=seeds[0], **{**scalars, **base_fields})
    configs = expand_grid(base, grid, seeds, with_cnn=not args.no_cnn)
    data = load_mnist(args.data_dir, "cpu")
    for config in {replace(c, seed=seeds[0]) for c in configs}:
        check_data(config, data)
    return configs


def read_sweep_config(path: Path) -> dict:
    """``--config``'s JSON, checked: {"grid": {field: [values]}, "seeds": [ints], field: value}."""
    spec = read_json_object("--config", path)
    fields = set(RunConfig.__dataclass_fields__) - {"model", "seed"}
    grid = spec.get("grid", {})
    if not isinstance(grid, dict):
        raise CommandError(f"--config {path}: \"grid\" must be an object of lists, got {grid!r}")
    unknown = sorted(set(spec) - fields - {"grid", "seeds"}) + sorted(set(grid) - fields)
    if unknown:
        raise CommandError(f"--config {path}: unknown field(s) {unknown}; the fields are {sorted(fields)}")
    for name, values in grid.items():
        if not (isinstance(values, list) and values):
            raise CommandError(f"--config {path}: grid axis {name!r} must be a non-empty list: {values!r}")
    if clash := sorted(set(grid) & set(spec)):
        raise CommandError(f"--config {path}: {clash} given both as a grid axis and as a single value")
    seeds = spec.get("seeds", [1])
    integers = all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds)
    if not (isinstance(seeds, list) and seeds and integers):
        raise CommandError(f"--config {path}: \"seeds\" must be a non-empty list of integers, got {seeds!r}")
    return spec


def cmd_sweep(args: argparse.Namespace) -> None:
    from experiments.sweep import collect, run_sweep, summary_markdown, write_reports

    configs = sweep_configs(args)
    check_count("--workers", args.workers)
    check_tensorboard(args)
    if args.launcher == "ray" and importlib.util.find_spec("ray") is None:
        raise CommandError("--launcher ray needs Ray, which is not installed: pip install -e '.[ray]'")
    out = writable_folder(args.out)
    device = str(resolve_device(args.device))
    run_sweep(configs, out, device, args.data_dir, args.workers, args.launcher, args.ray_address,
              args.tensorboard)  # fmt: skip
    summary = write_reports(out)
    print()
    print(summary_markdown(summary))
    print(f"results.csv, summary.csv, summary.md and figures in {out}")
    asked = {run_id(config) for config in configs}
    report_diverged([row for row in collect(out) if row["diverged"] and row["run"] in asked])


def cmd_plot_sweeps(args: argparse.Namespace) -> None:
    from experiments.sweep import plot_stores, run_folders

    stores = [Path(store) for store in args.stores]
    for store in stores:
        if not (store.is_dir() and any(run_folders(store).glob("*/metrics.json"))):
            raise CommandError(f"{store}: not a sweep store or a compare folder (no run in it)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot_stores(stores, Path(args.out))
    print(f"accuracy against σ for {len(stores)} store(s) in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="QCNN (Kerenidis, Landman, Prakash, ICLR 2020) experiments on MNIST.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verbosity = argparse.ArgumentParser(add_help=False)  # every command's -v / -q
    group = verbosity.add_argument_group("messages")
    group.add_argument("-v", "--verbose", action="count", default=0,
                       help="more messages: -v at INFO (e.g. convert's summary), -vv at DEBUG (its report)")
    group.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress bars")

    compare = sub.add_parser("compare", parents=[verbosity],
                             help="train CNN and QCNN on MNIST and compare them")  # fmt: skip
    compare.add_argument("--model", choices=("cnn", "qcnn", "both"), default="both", help="what to train")
    compare.add_argument("--seed", type=int, default=DEFAULTS.seed, help="first seed")
    compare.add_argument("--seeds", type=int, default=1, help="number of seeds (seed, seed+1, ...)")
    compare.add_argument("--out", default="runs/compare", help="output folder (resumable)")
    compare.add_argument("--calibrate", dest="calibrate_images", type=int, default=2560, metavar="N",
                         help="the CNN through the QCNN once more after calibrating its quantum layers' "
                              "BatchNorms on N training images (0: not)")  # fmt: skip
    add_run_options(compare, nets=True)
    compare.set_defaults(func=cmd_compare)

    bench = sub.add_parser("bench", parents=[verbosity],
                           help="time QCNN against CNN training steps (not a test)")  # fmt: skip
    bench.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 512], help="batch sizes timed")
    bench.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    bench.add_argument("--repeat", type=int, default=5, help="steps per round")
    bench.add_argument("--cpu-only", action="store_true", help="skip CUDA even when present")
    bench.add_argument("--cuda-only", action="store_true", help="skip the CPU")
    bench.add_argument("--net", choices=tuple(NETWORKS), default="authors", help="network (with its recipe)")
    bench.add_argument("--compile", action="store_true",
                       help="also time the training step under torch.compile (CNN and QCNN)")
    bench.add_argument("--ablation", action="store_true",
                       help="also time the theory-mode QCNN without its δ noise, then without its estimation "
                            "noise, then without its sampling: where its extra time goes")
    bench.add_argument("--out", default="runs/bench", help="folder of bench.json (the timings and machine)")
    bench.add_argument("--profile", action="store_true",
                       help="instead of timing, profile 10 steps of each variant at the first batch size")
    bench.set_defaults(func=cmd_bench)

    sweep = sub.add_parser("sweep", parents=[verbosity],
                           help="grid over σ, ε, C, δ × seeds; resumable and parallel")  # fmt: skip
    sweep.add_argument("--preset", choices=("paper",), help="paper: the authors' 40-configuration grid")
    sweep.add_argument("--config", help='JSON: {"grid": {field: [values]}, "seeds": [...], field: value}')
    sweep.add_argument("--seed", type=int, default=DEFAULTS.seed, help="first seed")
    sweep.add_argument("--seeds", type=int, default=1, help="number of seeds")
    sweep.add_argument("--no-cnn", action="store_true", help="skip the CNN baseline runs")
    sweep.add_argument("--workers", type=int, default=1, help="runs side by side (processes or Ray tasks)")
    sweep.add_argument("--launcher", choices=("local", "ray"), default="local", help="where runs execute")
    sweep.add_argument("--ray-address", default=None, help="Ray cluster address (default: start one locally)")
    sweep.add_argument("--out", default="runs/sweep", help="result store (resumable)")
    add_run_options(sweep, grid=True)
    sweep.set_defaults(func=cmd_sweep)

    evaluate = sub.add_parser("evaluate", parents=[verbosity],
                              help="a trained network through the QCNN forward, over a grid")  # fmt: skip
    evaluate.add_argument("checkpoint", help="a run folder or its checkpoint.pt, of a CNN or a QCNN")
    evaluate.add_argument("--epsilon", type=float, nargs="+", default=[0.0, 0.01, 0.1], help="errors ε")
    evaluate.add_argument("--sigma", type=optional_float, nargs="+", default=[DEFAULTS.sigma],
                          help="sampling ratios σ ('none': no sampling)")  # fmt: skip
    evaluate.add_argument("--cap", type=float, nargs="+", default=[DEFAULTS.cap], help="ReLU caps C")
    evaluate.add_argument("--repeats", type=int, default=5, help="passes over the test set per point")
    evaluate.add_argument("--seed", type=int, default=1, help="seed of the layers' randomness")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda")
    evaluate.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    evaluate.add_argument("--out", default="runs/evaluate", help="output folder")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument("--calibrate", type=int, default=0, metavar="N",
                          help="calibrate the quantum layers' BatchNorms on N training images at each point")
    evaluate.add_argument("--per-layer", action="store_true",
                          help="diagnose each quantum layer at each point: per_layer.csv and per_layer.png")
    group = evaluate.add_argument_group("layers (a CNN run's conversion)")
    add_layer_mapping(group)

    finetune = sub.add_parser("finetune", parents=[verbosity],
                              help="a trained CNN made a QCNN, calibrated and trained on")  # fmt: skip
    finetune.add_argument("run", nargs="+", help="CNN run folders (of compare or sweep), e.g. one per seed")
    finetune.add_argument("--calibrate", type=int, default=2560, metavar="N",
                          help="training images that calibrate the BatchNorms first (0: none)")  # fmt: skip
    finetune.add_argument("--out", default="runs/finetune", help="output folder (resumable)")
    add_run_options(finetune, from_run=True)
    finetune.set_defaults(func=cmd_finetune, epochs=1)
    evaluate.set_defaults(func=cmd_evaluate)

    plot = sub.add_parser("plot-sweeps", parents=[verbosity],
                          help="accuracy against σ of sweep or compare folders, side by side")  # fmt: skip
    plot.add_argument("stores", nargs="+", help="sweep or compare --out folders, one panel each")
    plot.add_argument("--out", default="runs/accuracy_vs_sigma.png", help="the figure (PNG)")
    plot.set_defaults(func=cmd_plot_sweeps)

    validate = sub.add_parser("validate", help="check the emulation against circuits (layer, network, bench)")
    jobs = validate.add_subparsers(dest="job", required=True)
    layer = jobs.add_parser("layer", parents=[verbosity],
                            help="the authors' first layer on circuits against the outcome law")  # fmt: skip
    layer.add_argument("--backends", nargs="+", default=DEFAULT_BACKENDS,
                       help="name or name:simulator; the first is the reference")  # fmt: skip
    layer.add_argument("--sigma", type=float, default=DEFAULTS.sigma, help="sampling ratio σ")
    network = jobs.add_parser("network", parents=[verbosity],
                              help="a whole trained network on circuits against the emulation")  # fmt: skip
    network.add_argument("--backends", nargs="+", default=NETWORK_BACKENDS,
                         help=f"among {BACKENDS}; the first is the reference")  # fmt: skip
    network.add_argument("--sigma", type=optional_float, default=DEFAULTS.sigma, help="σ, or 'none'")
    network.add_argument("--checkpoint", default=None,
                         help="a trained run (CNN or QCNN); default: the authors' CNN, trained into --out "
                              "(once; a rerun reuses it)")  # fmt: skip
    network.add_argument("--train-images", type=int, default=10000,
                         help="with no --checkpoint: that CNN's training images")  # fmt: skip
    for job, out in ((layer, "runs/validate"), (network, "runs/validate-network")):
        job.add_argument("--images", type=int, default=8, help="MNIST test images")
        job.add_argument("--shots", type=int, default=100, help="Hadamard-test shots per inner product")
        job.add_argument("--cap", type=float, default=DEFAULTS.cap, help="ReLU cap C")
        job.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
        job.add_argument("--out", default=out, help="output folder")
    bench = jobs.add_parser("bench", parents=[verbosity], help="time inner products for 5-9 qubits")
    bench.add_argument("--backends", nargs="+", default=DEFAULT_BACKENDS, help="name or name:simulator")
    bench.add_argument("--shots", type=int, default=100, help="Hadamard-test shots per inner product")
    bench.add_argument("--pairs", type=int, default=32768, help="pairs per run")
    bench.add_argument("--ae-qubits", type=int, default=None,
                       help="time amplitude estimation on this many qubits instead")  # fmt: skip
    commands = {layer: cmd_validate_layer, network: cmd_validate_network, bench: cmd_validate_bench}
    for job, command in commands.items():
        job.add_argument("--backend-device", choices=BACKEND_DEVICES, default="auto")
        job.add_argument("--seed", type=int, default=1)
        job.set_defaults(func=command)
    for command in parsers(parser):
        command.formatter_class = HelpFormatter
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless it is None or off, or its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every command's parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                found += parsers(command)
    return found


def main(argv: list[str] | None = None) -> None:
    """Run a command. A user error (bad option, file or data, a diverged run, a run folder in
    use) ends in one line, ``error: ...``, and exit status 1; Ctrl-C in exit status 130."""
    args = build_parser().parse_args(argv)
    level = logging.ERROR if args.quiet else max(logging.DEBUG, logging.WARNING - 10 * args.verbose)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except (CommandError, ValueError, OSError, RunLocked, Diverged) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
