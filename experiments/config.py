"""One experiment run as plain data: every default reproduces the paper (`docs/algorithm.md` §6)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from functools import cached_property

from classical import NETWORKS
from qcnn.options import QConvOptions, is_integer, is_number

LAYER = QConvOptions()  # the layer's defaults, which are the runs' defaults
MODES = ("theory", "authors")
OPTIMIZERS = ("sgd", "adam")
OVERRIDES = ("norms", "cap_order")  # layer options that can depart from the mode's choice
# The fields that only a QCNN run uses: a CNN run's summaries leave them empty.
QCNN_FIELDS = ("epsilon", "cap", "sigma", "delta", "mode", "estimator", "sampling", "backprop", "norms",
               "cap_order", "layers", "init_from", "calibrate", "shots")  # fmt: skip
# Fields left out of run ids and stores while at these values, so that stores made before
# the fields existed stay valid.
OMITTED_AT = {"norms": None, "cap_order": None, "optimizer": "sgd", "layers": [], "init_from": None,
              "calibrate": 0, "shots": None}  # fmt: skip
# Each network's training recipe (optimizer, lr, momentum): the defaults of --net. The
# authors' net and LeNet-5 keep the paper's plain SGD; the deeper nets learn in 2 epochs
# with Adam, at its usual 1e-3, and 1e-2 for the small GoogLeNet (on 10,000 images, one
# epoch: 79 % at 1e-2 against 62 % at 3e-3).
RECIPES = {
    "authors": ("sgd", 0.01, 0.0),
    "lenet5": ("sgd", 0.01, 0.0),
    "alexnet": ("adam", 1e-3, 0.0),
    "vgg": ("adam", 1e-3, 0.0),
    "googlenet": ("adam", 1e-2, 0.0),
    "resnet": ("adam", 1e-3, 0.0),
}


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
    net: str = "authors"  # a key of classical.NETWORKS
    epsilon: float = LAYER.epsilon
    cap: float = LAYER.cap
    sigma: float | None = LAYER.sigma
    delta: float = LAYER.delta
    mode: str = "theory"
    estimator: str = LAYER.estimator
    shots: int | None = LAYER.shots  # of the shots estimator; None: ⌈1/(4ε²)⌉
    sampling: str = LAYER.sampling
    backprop: str = LAYER.backprop
    norms: str | None = None  # None: the mode's ("exact" in theory, "authors" in authors)
    cap_order: str | None = None  # None: the mode's
    epochs: int = 2
    batch_size: int = 64
    test_batch_size: int = 1000
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    seed: int = 1
    train_limit: int | None = None
    test_limit: int | None = None
    log_every: int = 10
    # Per-layer options, as qcnn.convert's ``layers`` mapping: ((name or pattern, ((option,
    # value), ...) or None for classical), ...), in precedence order for the patterns.
    layers: tuple = ()
    init_from: str | None = None  # a trained CNN's run folder: the QCNN starts from its weights
    calibrate: int = 0  # with init_from: training images that calibrate the BatchNorms first

    def __post_init__(self) -> None:
        if self.model not in ("cnn", "qcnn"):
            raise ValueError(f"model must be 'cnn' or 'qcnn', got {self.model!r}")
        if self.net not in NETWORKS:
            raise ValueError(f"net must be one of {tuple(NETWORKS)}, got {self.net!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer == "adam" and self.momentum != 0:
            raise ValueError(f"momentum is an SGD option: use momentum 0 with adam, got {self.momentum}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not is_integer(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("epochs", "batch_size", "test_batch_size", "log_every"):
            value = getattr(self, name)
            if not (is_integer(value) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            if value is not None and not (is_integer(value) and value >= 1):
                raise ValueError(f"{name} must be None (all images) or an integer >= 1, got {value!r}")
        if not (is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (is_number(self.momentum) and self.momentum >= 0 and math.isfinite(self.momentum)):
            raise ValueError(f"momentum must be a finite number >= 0, got {self.momentum!r}")
        object.__setattr__(self, "layers", layer_rules(self.layers))  # JSON lists become tuples
        for changes in self.layer_map.values():
            if changes is not None:
                self.layer_options.with_changes(**changes)  # an unknown or invalid option, by name
        if not (is_integer(self.calibrate) and self.calibrate >= 0):
            raise ValueError(f"calibrate must be an integer >= 0 (training images), got {self.calibrate!r}")
        if self.init_from is not None and self.model != "qcnn":
            raise ValueError("init_from starts a QCNN from a trained CNN: it needs model 'qcnn'")
        if self.calibrate and self.init_from is None:
            raise ValueError("calibrate goes with init_from (the BatchNorms of a CNN's weights)")
        _ = self.layer_options  # the layer's own checks, before any work

    @cached_property
    def layer_options(self) -> QConvOptions:
        """The options of this run's ``qcnn.QConv2d`` layers (built once, then passed on)."""
        authors = self.mode == "authors"
        return QConvOptions(
            epsilon=self.epsilon,
            cap=self.cap,
            sigma=self.sigma,
            estimator=self.estimator,
            shots=self.shots,
            sampling=self.sampling,
            norms=self.norms or ("authors" if authors else "exact"),
            cap_order=self.cap_order or ("authors" if authors else "theory"),
            delta=0.0 if authors else self.delta,
            backprop="exact" if authors else self.backprop,
        )

    @property
    def layer_map(self) -> dict[str, dict | None]:
        """``layers`` as the mapping :func:`qcnn.convert` takes."""
        return {key: None if changes is None else dict(changes) for key, changes in self.layers}

    @property
    def optimiser_delta(self) -> float:
        """δ added to every gradient at the optimiser step (authors' QCNN only)."""
        return self.delta if self.model == "qcnn" and self.mode == "authors" else 0.0

    def as_dict(self) -> dict:
        """The fields, without those of :data:`OMITTED_AT` at their omitted value: run ids
        and result stores made before these fields existed stay valid."""
        data = asdict(self)
        data["layers"] = [[key, None if changes is None else dict(changes)] for key, changes in self.layers]
        for name, value in OMITTED_AT.items():
            if data[name] == value:
                del data[name]
        return data

    @classmethod
    def for_net(cls, net: str = "authors", **fields) -> RunConfig:
        """A run of ``net`` with its recipe's optimizer, lr and momentum (:data:`RECIPES`)
        where ``fields`` leaves them out or None."""
        if net not in RECIPES:
            raise ValueError(f"net must be one of {tuple(RECIPES)}, got {net!r}")
        recipe = dict(zip(("optimizer", "lr", "momentum"), RECIPES[net], strict=True))
        chosen = {name: value for name, value in fields.items() if value is not None or name not in recipe}
        return cls(net=net, **{**recipe, **chosen})

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def layer_rules(layers: object) -> tuple:
    """A ``layers`` mapping ({key: {option: value} or None}, or its JSON form, a list of
    pairs) as the hashable tuple :class:`RunConfig` keeps; ValueError naming a bad entry."""
    pairs = list(layers.items()) if isinstance(layers, dict) else layers
    if not isinstance(pairs, tuple | list):
        raise ValueError(f"layers must map names or patterns to options or None, got {layers!r}")
    rules = []
    for pair in pairs:
        valid = isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)
        if not (valid and (pair[1] is None or isinstance(pair[1], dict | tuple | list))):
            raise ValueError(f"layers: each entry is a name or pattern and its options or None, got {pair!r}")
        key, changes = pair
        rules.append((key, None if changes is None else tuple(dict(changes).items())))
    return tuple(rules)


def run_id(config: RunConfig) -> str:
    """A readable folder name, made unique by a short hash of the whole config."""
    if config.model == "cnn":
        parts = ["cnn", config.net]
    else:
        parts = [f"qcnn-{config.net}-{config.mode}", f"eps{config.epsilon:g}", f"C{config.cap:g}",
                 f"sigma{config.sigma:g}" if config.sigma is not None else "nosampling",
                 f"delta{config.delta:g}", config.estimator, config.sampling, config.backprop]  # fmt: skip
        parts += [f"{name}-{getattr(config, name)}" for name in OVERRIDES if getattr(config, name)]
        parts += ["per-layer"] * bool(config.layers) + ["from-cnn"] * bool(config.init_from)
    digest = hashlib.sha1(json.dumps(config.as_dict(), sort_keys=True).encode()).hexdigest()[:8]
    parts += [f"e{config.epochs}", f"n{config.train_limit or 'all'}", f"seed{config.seed}", digest]
    return "_".join(parts)
