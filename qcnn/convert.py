"""Turn a user's CNN into a QCNN: :func:`convert` and :func:`configure`.

A quantum layer stands for a convolution whose output goes through a ReLU-like
non-linearity (``docs/algorithm.md``, *Classical terms before the non-linearity*). :func:`convert` finds each

    Conv2d → [BatchNorm2d] → [+ shortcut] → ReLU | ReLU6 | Hardtanh(0, C) → [Max/AvgPool2d]

and replaces it by one :class:`~qcnn.QConv2d` with the same weights: the BatchNorm becomes
the layer's ``norm``, the shortcut (a ResNet block's identity or projection) its forward's
``shortcut`` argument, ReLU6 and Hardtanh(0, C) set the cap C, and a pooling whose window
equals its stride becomes the layer's pooling. Where the model traces with ``torch.fx``,
the patterns are found in its graph, so ``F.relu``, ``torch.relu``, ``x.relu_()`` and
residual additions in ``forward`` are seen; the result is a ``torch.fx.GraphModule``. Where
it does not trace, each submodule is tried in turn, and ``nn.Sequential`` children are
matched module by module. Every ``nn.Conv2d`` of the model ends in the report, converted or
not and why: nothing is skipped silently.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections import Counter
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
        lines = [f"{name}: QConv2d ({pattern})" for name, pattern in self.converted.items()]
        lines += [f"{name}: left classical ({reason})" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def convert(
    model: nn.Module,
    options: QConvOptions | None = None,
    *,
    generator: torch.Generator | None = None,
    **overrides: object,
) -> nn.Module:
    """A copy of ``model`` with every convertible conv → [BN] → [+ shortcut] → ReLU pattern
    replaced by a :class:`~qcnn.QConv2d`; ``model`` is left untouched.

    ``options`` (a :class:`~qcnn.QConvOptions`, its defaults if None) with ``overrides``
    (``epsilon=``, ``cap=``, ``sigma=``, ...: any of its fields) are given to every new
    layer, with ``generator`` for their randomness; a ReLU6 or Hardtanh(0, C) sets that
    layer's cap instead. Each layer takes its convolution's place, so the convolutions keep
    their state_dict keys; a BatchNorm moves into the layer (``norm``), and
    :func:`classical_state_dict` and :func:`load_classical` translate its keys between the
    two models. The copy's ``conversion_report`` (a :class:`ConversionReport`) names each
    convolution converted, and each left classical with the reason; one summary line is
    logged at INFO, the whole report at DEBUG. ValueError for a non-module or a TorchScript
    module, an unknown or invalid option, or a model with no convertible convolution.
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
    report = ConversionReport()
    converted = _Converter(options, generator, report).convert(copy.deepcopy(model), "")
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


def configure(model: nn.Module, **overrides: object) -> list[str]:
    """Set options on every :class:`~qcnn.QConv2d` of ``model`` (validated for every layer
    before any changes), e.g. ``configure(model, epsilon=0.1)``; returns the layers' names.
    ValueError if there is none."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QConv2d)}
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no QConv2d to configure")
    updated = {name: layer.options.with_changes(**overrides) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.options = updated[name]
    return list(layers)


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


@dataclass
class _Match:
    """One conv → ... → non-linearity chain found in a graph or a Sequential."""

    cap: float | None = None  # None: a plain ReLU (the options' cap applies)
    norm: nn.BatchNorm2d | None = None
    norm_name: str | None = None  # the BatchNorm's qualified name in the model
    pooling: tuple[str, int] | None = None
    steps: list[str] = field(default_factory=list)  # for the report


class _Converter:
    def __init__(self, options: QConvOptions, generator: torch.Generator | None, report: ConversionReport):
        self.options, self.generator, self.report = options, generator, report

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

    def _layer(self, conv: nn.Conv2d, match: _Match) -> QConv2d:
        changes = {}
        if match.cap is not None:
            changes["cap"] = match.cap
        if match.pooling is not None:
            changes["pooling"], changes["pool_size"] = match.pooling
        layer = QConv2d.from_conv(conv, self.options.with_changes(**changes), generator=self.generator)
        layer.norm, layer.norm_origin = match.norm, match.norm_name
        return layer

    def _unsupported(self, conv: nn.Conv2d) -> str | None:
        if conv.groups != 1:
            return f"grouped convolution (groups={conv.groups})"
        if conv.dilation != (1, 1):
            return f"dilated convolution (dilation={conv.dilation})"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} (the layer pads with zeros)"
        if isinstance(conv.padding, str):
            return f"padding={conv.padding!r} (the layer takes numeric padding)"
        return None

    # -- traced models -------------------------------------------------------------------

    def _rewrite(self, gm: fx.GraphModule, prefix: str) -> fx.GraphModule:
        modules = dict(gm.named_modules())
        calls = [
            n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)
        ]
        for node in calls:
            name, conv = f"{prefix}{node.target}", modules[node.target]
            reason = self._unsupported(conv)
            if reason is None and sum(n.target == node.target for n in calls) > 1:
                reason = "called more than once in forward (shared weights)"
            if reason is None:
                match, chain, shortcut, reason = self._match_graph(node, modules, conv)
            if reason is not None:
                self.report.skipped[name] = reason
                continue
            if match.norm is not None:
                match.norm_name = f"{prefix}{chain[1].target}"
            parent, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(parent), leaf, self._layer(conv, match))  # the conv's place
            args = (node.args[0],) if shortcut is None else (node.args[0], shortcut)
            with gm.graph.inserting_after(chain[-1]):
                layer_call = gm.graph.call_module(node.target, args)
            chain[-1].replace_all_uses_with(layer_call)
            for dead in reversed(chain):
                gm.graph.erase_node(dead)
            self.report.converted[name] = " → ".join(["Conv2d", *match.steps])
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

    def _match_graph(self, conv_node: fx.Node, modules: dict, conv: nn.Conv2d):
        """(match, its nodes from the conv on, the shortcut node or None, None), or
        (None, None, None, the reason there is none)."""
        match, chain, shortcut = _Match(), [conv_node], None

        def next_node() -> fx.Node | None:
            return next(iter(chain[-1].users)) if len(chain[-1].users) == 1 else None

        nxt = next_node()
        if nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], nn.BatchNorm2d):
            norm = modules[nxt.target]
            if norm.num_features != conv.out_channels or not norm.track_running_stats:
                return None, None, None, f"{nxt.target} is a BatchNorm2d without running statistics"
            match.norm = norm  # the copy's own module, moved into the layer
            match.steps.append("BatchNorm2d")
            chain.append(nxt)
            nxt = next_node()
        if nxt is not None and _is_add(nxt):
            others = [a for a in nxt.args if a is not chain[-1]]
            if len(others) != 1 or not isinstance(others[0], fx.Node):
                return None, None, None, f"{nxt.name} adds something other than one tensor"
            shortcut = others[0]
            if _is_deeper_branch(shortcut, conv_node, modules):
                return None, None, None, _SHORTCUT
            match.steps.append("+ shortcut")
            chain.append(nxt)
            nxt = next_node()
        if nxt is not None and nxt.op == "call_module" and nxt.args[1:] == (chain[-1],):
            return None, None, None, _SHORTCUT  # the deeper branch was converted first
        cap = _relu_cap(nxt, modules) if nxt is not None else False
        if cap is False:
            users = ", ".join(u.name for u in chain[-1].users) or "nothing"
            return None, None, None, f"no ReLU after it: its output ({chain[-1].name}) goes to {users}"
        match.cap = cap
        match.steps.append("ReLU" if cap is None else f"capped ReLU (C={cap:g})")
        chain.append(nxt)
        nxt = next_node()
        if nxt is not None and nxt.op == "call_module" and (pool := _pooling(modules[nxt.target])):
            match.pooling = pool
            match.steps.append(f"{type(modules[nxt.target]).__name__}({pool[1]})")
            chain.append(nxt)
        return match, chain, shortcut, None

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
        """Conv2d, [BatchNorm2d], ReLU-like, [pool] runs of children, replaced in place
        (the layer where the conv was, ``nn.Identity`` for the rest, so indices hold)."""
        children = list(seq)
        for index, conv in enumerate(children):
            if not isinstance(conv, nn.Conv2d):
                continue
            if reason := self._unsupported(conv):
                self.report.skipped[f"{prefix}{index}"] = reason
                continue
            match, at = _Match(), index + 1
            if at < len(children) and isinstance(children[at], nn.BatchNorm2d):
                match.norm, match.norm_name = children[at], f"{prefix}{at}"
                match.steps.append("BatchNorm2d")
                at += 1
            cap = _relu_module_cap(children[at]) if at < len(children) else False
            if cap is False:
                after = type(children[at]).__name__ if at < len(children) else "the Sequential's end"
                self.report.skipped[f"{prefix}{index}"] = f"no ReLU after it: {after} follows"
                continue
            match.cap = cap
            match.steps.append("ReLU" if cap is None else f"capped ReLU (C={cap:g})")
            at += 1
            if at < len(children) and (pool := _pooling(children[at])):
                match.pooling = pool
                match.steps.append(f"{type(children[at]).__name__}({pool[1]})")
                at += 1
            seq[index] = self._layer(conv, match)
            for dead in range(index + 1, at):
                seq[dead] = nn.Identity()
            self.report.converted[f"{prefix}{index}"] = " → ".join(["Conv2d", *match.steps])


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


def _relu_cap(node: fx.Node, modules: dict) -> float | None | bool:
    """The cap of a ReLU-like node: None for a plain ReLU, C for ReLU6/Hardtanh(0, C), False
    for anything else."""
    if node.op == "call_module":
        return _relu_module_cap(modules.get(node.target))
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
