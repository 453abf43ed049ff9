"""Turn a user's CNN into a QCNN: :func:`convert` and :func:`configure`.

A quantum layer stands for a convolution whose output goes through a ReLU-like
non-linearity (``docs/algorithm.md``, *Classical terms before the non-linearity*).
:func:`convert` finds each

    Conv2d → [BatchNorm2d] → [+ shortcut] → ReLU | ReLU6 | Hardtanh(0, C) → [Max/AvgPool2d]

and replaces it by one :class:`~qcnn.QConv2d` with the same weights: the BatchNorm becomes
the layer's ``norm``, the shortcut (a ResNet block's identity or projection) its forward's
``shortcut`` argument, ReLU6 and Hardtanh(0, C) set the cap C, and a pooling whose window
equals its stride becomes the layer's pooling.

As in torch.ao's fx fusion, the pattern is data (:data:`PATTERN`), each model form only
lists the steps that follow a convolution (the nodes of its ``torch.fx`` graph, where the
model traces, so that ``F.relu``, ``torch.relu``, ``x.relu_()`` and residual additions in
``forward`` are seen; else the children of each ``nn.Sequential``, submodule by submodule),
one matcher decides, and a separate pass replaces what matched. A traced model comes back as
a ``torch.fx.GraphModule``, a ``Sequential`` as a ``Sequential``.

``layers`` chooses options per layer, with torch.ao's ``QConfigMapping`` precedence: a
convolution's qualified name, then fnmatch patterns in the mapping's order, then module
types, then the global options; ``None`` keeps a layer classical. Every ``nn.Conv2d`` of the
model ends in the report, converted (with the rule that set its options) or not and why:
nothing is skipped silently.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import operator
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from qcnn.layer import QConv2d
from qcnn.options import QConvOptions

log = logging.getLogger(__name__)

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_POOLS = {nn.MaxPool2d: "max", nn.AvgPool2d: "avg"}
_SHORTCUT = (
    "a residual shortcut: classical input to the quantum layer of the block's deeper branch, "
    "added to its estimate before the ReLU"
)


@dataclass
class ConversionReport:
    """What :func:`convert` did with each ``nn.Conv2d``, by qualified name."""

    converted: dict[str, str] = field(default_factory=dict)  # name -> the pattern replaced
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it stayed classical
    rules: dict[str, str] = field(default_factory=dict)  # name -> the rule that chose its options

    def summary(self) -> str:
        """One line: how many convolutions were converted, how many left classical and why."""
        total = len(self.converted) + len(self.skipped)
        text = f"{len(self.converted)} of {total} Conv2d converted to QConv2d"
        if self.skipped:
            kinds = Counter(reason.split(" (")[0].split(":")[0] for reason in self.skipped.values())
            why = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
            text += f"; {len(self.skipped)} left classical ({why}); see conversion_report"
        return text

    def __str__(self) -> str:
        lines = [
            f"{name}: QConv2d ({pattern}), options by {self.rules[name]}"
            for name, pattern in self.converted.items()
        ]
        lines += [f"{name}: left classical ({reason})" for name, reason in self.skipped.items()]
        return "\n".join(lines)


LayerRules = Mapping[str | type[nn.Module], dict | None]  # the ``layers`` of convert and configure


def convert(
    model: nn.Module,
    options: QConvOptions | None = None,
    *,
    layers: LayerRules | None = None,
    generator: torch.Generator | None = None,
    **overrides: object,
) -> nn.Module:
    """A copy of ``model`` with every convertible conv → [BN] → [+ shortcut] → ReLU pattern
    replaced by a :class:`~qcnn.QConv2d`; ``model`` is left untouched.

    ``options`` (a :class:`~qcnn.QConvOptions`, its defaults if None) with ``overrides``
    (``epsilon=``, ``cap=``, ``sigma=``, ...: any of its fields) are given to every new
    layer, with ``generator`` for their randomness; a ReLU6 or Hardtanh(0, C) sets that
    layer's cap instead. ``layers`` maps a convolution's qualified name (``"features.0"``),
    an fnmatch pattern (``"layer4.*"``) or a module type to a dict of options that override
    the global ones for those layers, or to None to keep them classical (precedence: name,
    patterns in order, types, global). Each layer takes its convolution's place, so the
    convolutions keep their state_dict keys; a BatchNorm moves into the layer (``norm``), and
    :func:`classical_state_dict` and :func:`load_classical` translate its keys between the
    two models. The copy's ``conversion_report`` (a :class:`ConversionReport`) names each
    convolution converted, and each left classical with the reason; one summary line is
    logged at INFO, the whole report at DEBUG. ValueError for a non-module or a TorchScript
    module, an unknown or invalid option, a ``layers`` key that matches no convolution, or a
    model with no convertible convolution.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"convert needs the nn.Module itself, got a TorchScript {type(model).__name__}: "
            "convert the model first, then torch.jit.script the result"
        )
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert needs a torch.nn.Module, got {type(model).__name__}")
    if options is not None and not isinstance(options, QConvOptions):
        raise ValueError(f"options must be a QConvOptions or None, got {options!r}")
    options = (options or QConvOptions()).with_changes(**overrides)  # fails here, once
    convolutions = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    rules = _Rules(options, layers or {}, convolutions)
    report = ConversionReport()
    converted = _Converter(rules, generator, report).convert(copy.deepcopy(model), "")
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name not in report.converted and name not in report.skipped:
            report.skipped[name] = "not reached by a traced graph or a module walk"
    if not report.converted:
        reasons = "; ".join(f"{name}: {why}" for name, why in report.skipped.items()) or "it has no Conv2d"
        raise ValueError(f"{type(model).__name__} has no convolution that can become a QConv2d ({reasons})")
    log.info("convert: %s", report.summary())
    log.debug("convert: the conversion report of %s:\n%s", type(model).__name__, report)
    converted.conversion_report = report
    return converted


def configure(model: nn.Module, *, layers: LayerRules | None = None, **overrides: object) -> list[str]:
    """Set options on the :class:`~qcnn.QConv2d` layers of ``model`` (validated for every
    layer before any changes), e.g. ``configure(model, epsilon=0.1)``: ``overrides`` on every
    layer, then ``layers`` (keyed as in :func:`convert`) per layer on top, where None leaves a
    layer as it was. Returns the names of the layers changed. ValueError if there is none,
    or for a ``layers`` key that matches no layer."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, QConv2d)}
    if not found:
        raise ValueError(f"{type(model).__name__} holds no QConv2d to configure")
    rules = _Rules(QConvOptions(), layers or {}, found)
    updated = {}
    for name, layer in found.items():
        changes, _ = rules.changes(name, layer)
        if changes is not None:
            updated[name] = layer.options.with_changes(**{**overrides, **changes})
    for name, options in updated.items():
        found[name].options = options
    return list(updated)


def _norm_renames(model: nn.Module) -> dict[str, str]:
    """{prefix in the converted model: prefix in the classical one} of every BatchNorm that
    :func:`convert` moved into a layer, e.g. {"conv1.norm.": "bn1."}."""
    return {
        f"{name}.norm.": f"{layer.norm_origin}."
        for name, layer in model.named_modules()
        if isinstance(layer, QConv2d) and layer.norm_origin is not None
    }


def _renamed(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def classical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict of a converted ``model`` in the keys of the classical model it was
    converted from, without the layers' saved options: ``cnn.load_state_dict(
    classical_state_dict(qcnn_model))`` gives the CNN the QCNN's trained weights (to test a
    QCNN-trained network classically)."""
    renames = _norm_renames(model)
    layers = {name for name, m in model.named_modules() if isinstance(m, QConv2d)}
    return {
        _renamed(key, renames): value
        for key, value in model.state_dict().items()
        if not (key.endswith("._extra_state") and key[: -len("._extra_state")] in layers)
    }


def load_classical(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load a classical model's ``state_dict`` (e.g. a trained CNN's checkpoint) into its
    converted ``model``: the keys of each BatchNorm moved into a layer are translated, the
    layers keep their options. Returns ``load_state_dict``'s missing and unexpected keys."""
    renames = {old: new for new, old in _norm_renames(model).items()}
    return model.load_state_dict({_renamed(key, renames): v for key, v in state_dict.items()}, strict)


class _Rules:
    """The options of each convolution from the global options and a ``layers`` mapping,
    with torch.ao's precedence: exact name, then patterns in order, then types."""

    def __init__(self, options: QConvOptions, layers: LayerRules, modules: dict[str, nn.Module]) -> None:
        self.options = options
        self.names, self.patterns, self.types = {}, {}, {}
        for key, value in layers.items():
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"layers[{key!r}] must be a dict of options or None, got {value!r}")
            if value is not None:
                options.with_changes(**value)  # an unknown or invalid option fails here, once
            if isinstance(key, type) and issubclass(key, nn.Module):
                self.types[key] = value
            elif isinstance(key, str) and key in modules:
                self.names[key] = value
            elif isinstance(key, str) and any(char in key for char in "*?["):
                self.patterns[key] = value
            elif isinstance(key, str):
                raise ValueError(f"layers key {key!r} names no convolution; they are {sorted(modules)}")
            else:
                raise ValueError(f"layers keys are names, patterns or module types, got {key!r}")
        unmatched = [key for key in self.patterns if not any(fnmatch.fnmatchcase(n, key) for n in modules)]
        unmatched += [t.__name__ for t in self.types if not any(isinstance(m, t) for m in modules.values())]
        if unmatched:
            raise ValueError(f"layers key(s) {unmatched} match no convolution; they are {sorted(modules)}")

    def changes(self, name: str, module: nn.Module) -> tuple[dict | None, str]:
        """(the option changes for this layer, or None to keep it classical; the rule)."""
        if name in self.names:
            return self.names[name], f"name {name!r}"
        for pattern, value in self.patterns.items():
            if fnmatch.fnmatchcase(name, pattern):
                return value, f"pattern {pattern!r}"
        for kind, value in self.types.items():
            if isinstance(module, kind):
                return value, f"type {kind.__name__}"
        return {}, "the global options"


@dataclass
class _Step:
    """One step after a convolution, in a graph or a Sequential: its kind (a kind of
    :data:`PATTERN`, "other", or "refuse" with the reason in ``value``), what it holds (the
    BatchNorm, the cap, the pooling, the shortcut node), a label for the report, and where
    it is (the fx node or the Sequential's index, and a module's qualified name)."""

    kind: str
    value: object = None
    label: str = ""
    place: object = None
    name: str | None = None


# The pattern, as data: the kinds of step that may follow a Conv2d, in order, and whether
# each may be absent. One matcher (_match) walks it over the steps of any model form.
PATTERN = (("norm", True), ("add", True), ("relu", False), ("pool", True))


@dataclass
class _Match:
    """The steps a convolution's pattern took, and what the layer takes from them."""

    steps: list[_Step] = field(default_factory=list)
    cap: float | None = None  # None: a plain ReLU (the options' cap applies)
    norm: nn.BatchNorm2d | None = None
    norm_name: str | None = None
    pooling: tuple[str, int] | None = None
    shortcut: fx.Node | None = None

    def describe(self) -> str:
        return " → ".join(["Conv2d", *(step.label for step in self.steps)])


def _match(conv: nn.Conv2d, steps: Iterator[_Step]) -> _Match | str:
    """The match of :data:`PATTERN` on the steps that follow ``conv``, or why there is none."""
    match, step = _Match(), next(steps, None)
    for kind, optional in PATTERN:
        if step is not None and step.kind == "refuse":
            return str(step.value)
        if step is None or step.kind != kind:
            if optional:
                continue
            return f"no ReLU after it: {step.label if step is not None else 'nothing follows'}"
        if kind == "norm":
            if step.value.num_features != conv.out_channels:
                return f"{step.name} normalises {step.value.num_features} channels, not {conv.out_channels}"
            match.norm, match.norm_name = step.value, step.name
        elif kind == "add":
            match.shortcut = step.value
        elif kind == "relu":
            match.cap = step.value
        elif kind == "pool":
            match.pooling = step.value
        match.steps.append(step)
        step = next(steps, None)
    return match


def _module_step(module: nn.Module, name: str, place: object) -> _Step:
    """The step a module is, wherever it stands."""
    if isinstance(module, nn.BatchNorm2d):
        return _Step("norm", module, "BatchNorm2d", place, name)
    if (cap := _relu_module_cap(module)) is not False:
        return _Step("relu", cap, "ReLU" if cap is None else f"capped ReLU (C={cap:g})", place)
    if pool := _pooling(module):
        return _Step("pool", pool, f"{type(module).__name__}({pool[1]})", place)
    return _Step("other", None, f"{type(module).__name__} follows", place)


def _sequential_steps(seq: nn.Sequential, index: int, prefix: str) -> Iterator[_Step]:
    for at in range(index + 1, len(seq)):
        yield _module_step(seq[at], f"{prefix}{at}", at)
    yield _Step("other", None, "the Sequential's end follows")


def _graph_steps(conv_node: fx.Node, modules: dict) -> Iterator[_Step]:
    """The steps along the single-user chain from ``conv_node`` in its graph."""
    node = conv_node
    while True:
        if len(node.users) != 1:
            users = ", ".join(user.name for user in node.users) or "nothing"
            yield _Step("other", None, f"its output ({node.name}) goes to {users}")
            return
        previous, node = node, next(iter(node.users))
        if node.op == "call_module" and isinstance(modules[node.target], QConv2d):
            if node.args[1:] == (previous,):  # the deeper branch, converted first, takes it
                yield _Step("refuse", _SHORTCUT)
            else:
                yield _Step("other", None, f"its output goes to {node.name}")
        elif node.op == "call_module":
            yield _module_step(modules[node.target], node.target, node)
        elif _is_add(node):
            others = [arg for arg in node.args if arg is not previous]
            if len(others) != 1 or not isinstance(others[0], fx.Node):
                yield _Step("refuse", f"{node.name} adds something other than one tensor")
            elif _is_deeper_branch(others[0], conv_node, modules):
                yield _Step("refuse", _SHORTCUT)
            else:
                yield _Step("add", others[0], "+ shortcut", node)
        elif (cap := _relu_function_cap(node)) is not False:
            yield _Step("relu", cap, "ReLU" if cap is None else f"capped ReLU (C={cap:g})", node)
        else:
            yield _Step("other", None, f"its output goes to {node.name}")


class _Converter:
    def __init__(self, rules: _Rules, generator: torch.Generator | None, report: ConversionReport):
        self.rules, self.generator, self.report = rules, generator, report

    def convert(self, module: nn.Module, prefix: str) -> nn.Module:
        """``module`` converted: by its fx graph where it traces, else by a module walk."""
        if isinstance(module, nn.Conv2d):
            self.report.skipped[prefix.rstrip(".")] = "a bare Conv2d: no ReLU after it can be seen"
            return module
        if isinstance(module, nn.Sequential):  # walked, so that it stays a Sequential
            return self._walk(module, prefix, None)
        try:
            graph_module = fx.symbolic_trace(module)
        except Exception as error:  # whatever fx cannot trace, the walk below handles
            return self._walk(module, prefix, f"{type(error).__name__}: {str(error).splitlines()[0]}")
        return self._rewrite(graph_module, prefix)

    def _decide(self, name: str, conv: nn.Conv2d, steps: Iterator[_Step], shared: bool = False):
        """The match and the layer's options for the convolution ``name``, or None (with the
        reason in the report)."""
        changes, rule = self.rules.changes(name, conv)
        self.report.rules[name] = rule
        if changes is None:
            reason = f"kept classical by the layers mapping ({rule})"
        elif shared:
            reason = "called more than once in forward (shared weights)"
        else:
            reason = _unsupported(conv)
        match = _match(conv, steps) if reason is None else reason
        if isinstance(match, str):
            self.report.skipped[name] = match
            return None
        self.report.converted[name] = match.describe()
        if match.cap is not None:
            changes = {**changes, "cap": match.cap}
        if match.pooling is not None:
            changes = {**changes, "pooling": match.pooling[0], "pool_size": match.pooling[1]}
        return match, self.rules.options.with_changes(**changes)

    def _layer(self, conv: nn.Conv2d, match: _Match, options: QConvOptions) -> QConv2d:
        layer = QConv2d.from_conv(conv, options, generator=self.generator)
        layer.norm, layer.norm_origin = match.norm, match.norm_name
        return layer

    # -- traced models: replace the matched nodes by one call of the layer ------------------

    def _rewrite(self, gm: fx.GraphModule, prefix: str) -> fx.GraphModule:
        modules = dict(gm.named_modules())
        calls = [
            n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)
        ]
        for node in calls:
            conv, shared = modules[node.target], sum(n.target == node.target for n in calls) > 1
            steps = _graph_steps(node, modules)
            decided = self._decide(f"{prefix}{node.target}", conv, steps, shared)
            if decided is None:
                continue
            match, options = decided
            if match.norm is not None:
                match.norm_name = f"{prefix}{match.norm_name}"
            parent, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(parent), leaf, self._layer(conv, match, options))  # the conv's place
            chain = [node, *(step.place for step in match.steps)]
            args = (node.args[0],) if match.shortcut is None else (node.args[0], match.shortcut)
            with gm.graph.inserting_after(chain[-1]):
                layer_call = gm.graph.call_module(node.target, args)
            chain[-1].replace_all_uses_with(layer_call)
            for dead in reversed(chain):
                gm.graph.erase_node(dead)
            modules[node.target] = gm.get_submodule(node.target)
        gm.graph.lint()
        # A BatchNorm moved into a layer is also a submodule of that layer, where
        # delete_all_unused_submodules (which visits each module once) would keep it: delete it.
        called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        moved = [
            layer.norm_origin[len(prefix) :]
            for layer in gm.modules()
            if isinstance(layer, QConv2d) and layer.norm_origin and layer.norm_origin.startswith(prefix)
        ]
        for target in moved:
            if target not in called and _has_submodule(gm, target):
                gm.delete_submodule(target)
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm

    # -- untraceable models: a module walk ------------------------------------------------

    def _walk(self, module: nn.Module, prefix: str, why: str | None) -> nn.Module:
        """Convert ``module``'s children; ``why`` says why its own forward did not trace
        (None for a Sequential, whose children are matched in order)."""
        if why is None:
            self._convert_sequential(module, prefix)
        for name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                if f"{prefix}{name}" not in self.report.converted and why is not None:
                    self.report.skipped[f"{prefix}{name}"] = (
                        f"the forward of {type(module).__name__} does not trace ({why}), "
                        "so no ReLU after it can be seen"
                    )
            elif not isinstance(child, QConv2d):
                setattr(module, name, self.convert(child, f"{prefix}{name}."))
        return module

    def _convert_sequential(self, seq: nn.Sequential, prefix: str) -> None:
        """Replace each matched run of children: the layer where the conv was,
        ``nn.Identity`` for the rest, so that indices hold."""
        for index, conv in enumerate(list(seq)):
            if not isinstance(conv, nn.Conv2d):
                continue
            decided = self._decide(f"{prefix}{index}", conv, _sequential_steps(seq, index, prefix))
            if decided is None:
                continue
            match, options = decided
            seq[index] = self._layer(conv, match, options)
            for step in match.steps:
                seq[step.place] = nn.Identity()


def _unsupported(conv: nn.Conv2d) -> str | None:
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if conv.dilation != (1, 1):
        return f"dilated convolution (dilation={conv.dilation})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (the layer pads with zeros)"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (the layer takes numeric padding)"
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return not node.kwargs  # torch.add(..., alpha=...) scales the shortcut
    return node.op == "call_method" and node.target in ("add", "add_") and not node.kwargs


def _has_submodule(module: nn.Module, target: str) -> bool:
    try:
        module.get_submodule(target)
    except AttributeError:
        return False
    return True


def _is_deeper_branch(node: fx.Node, conv_node: fx.Node, modules: dict) -> bool:
    """Whether ``node`` ends a conv → [BN] branch whose convolution starts later in the graph
    than ``conv_node`` (a ResNet block's main path, against its projection shortcut)."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
        node = node.args[0]
    if not (node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d)):
        return False
    order = {n: i for i, n in enumerate(conv_node.graph.nodes)}
    return order[node.args[0]] > order[conv_node.args[0]]


def _relu_function_cap(node: fx.Node) -> float | None | bool:
    """The cap of a ReLU-like function or method call: None for a plain ReLU, C for
    relu6/hardtanh(0, C), False for anything else."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return None
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return None
    if node.op == "call_function" and node.target is F.relu6:
        return 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return float(high) if low == 0 and isinstance(high, int | float) and high > 0 else False
    return False


def _relu_module_cap(module: nn.Module | None) -> float | None | bool:
    if type(module) is nn.ReLU:
        return None
    if isinstance(module, nn.Hardtanh) and module.min_val == 0 and module.max_val > 0:
        return float(module.max_val)  # nn.ReLU6 is Hardtanh(0, 6)
    return False


def _pooling(module: nn.Module | None) -> tuple[str, int] | None:
    """("max" | "avg", size) for a square pooling whose window equals its stride, else None
    (a classical pooling after the layer then gives the same result)."""
    kind = _POOLS.get(type(module))
    if kind is None:
        return None
    size, stride, padding = (module.kernel_size, module.stride, module.padding)
    if not (isinstance(size, int) and stride in (size, (size, size)) and padding in (0, (0, 0))):
        return None
    if module.ceil_mode or (kind == "max" and module.dilation not in (1, (1, 1))):
        return None
    if kind == "avg" and module.divisor_override is not None:
        return None
    return kind, size
