"""Per-layer diagnosis of a QCNN: where its accuracy goes (``docs/algorithm.md`` sections 2-4).

As torch.ao's Numeric Suite compares each layer of a quantized model with the float one,
:func:`diagnose` compares each :class:`~qcnn.QConv2d` with the same layer in the exact limit
(ε = 0, no sampling, no cap) on the same inputs, the ones the quantum model itself feeds it:

- ``relative_error``: ‖out − exact‖ / ‖exact‖ over every output, and ``sqnr_db``,
  10 log₁₀(‖exact‖² / ‖out − exact‖²);
- ``distinct_fraction``: the distinct positions the sampling kept, over K (1 without
  sampling), and ``nonzero_fraction``: the outputs that are not 0;
- ``cost_ratio``: the quantum over the classical cost of section 4 (below 1 where the
  quantum layer would be cheaper);

and, given labels, the **sensitivity**: the accuracy with only that layer quantum and every
other exact, beside the accuracy with every layer exact and with every layer quantum.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from qcnn.layer import QConv2d
from qcnn.options import QConvOptions
from qcnn.training import batches, evaluate


def exact_limit(options: QConvOptions) -> QConvOptions:
    """``options`` in the exact limit: the classical convolution and a plain ReLU."""
    return options.with_changes(epsilon=0.0, estimator="exact", sigma=None, cap=math.inf, delta=0.0,
                                backend="torch")  # fmt: skip


class _Comparison:
    """Sums over the outputs of one layer: its quantum output against its exact one."""

    def __init__(self) -> None:
        self.error = self.signal = 0.0
        self.nonzero = self.outputs = 0
        self.costs: list[dict] = []

    def add(self, out: torch.Tensor, exact: torch.Tensor, cost: dict | None) -> None:
        self.error += (out - exact).double().square().sum().item()
        self.signal += exact.double().square().sum().item()
        self.nonzero += int((out != 0).sum())
        self.outputs += out.numel()
        if cost is not None:
            self.costs.append(cost)

    def row(self, name: str) -> dict:
        distinct = [cost["distinct_fraction"] for cost in self.costs]
        finite = [cost for cost in self.costs if math.isfinite(cost["quantum_cost"])]
        ratios = [cost["quantum_cost"] / cost["classical_cost"] for cost in finite]
        return {
            "layer": name,
            "relative_error": math.sqrt(self.error / self.signal) if self.signal > 0 else math.nan,
            "sqnr_db": 10 * math.log10(self.signal / self.error) if self.error > 0 else math.inf,
            "distinct_fraction": sum(distinct) / len(distinct),
            "nonzero_fraction": self.nonzero / self.outputs,
            "cost_ratio": sum(ratios) / len(ratios) if ratios else math.inf,
        }


def _compare(layer: QConv2d, comparison: _Comparison):
    """A forward hook: the layer's exact output on the same input, added to ``comparison``."""

    def hook(module: QConv2d, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        cost = module.last_cost.as_dict() if module.last_cost is not None else None
        options, track = module.options, module.track_cost
        module.options, module.track_cost = exact_limit(options), False
        try:
            exact = module.forward(*args, **kwargs)  # forward, not __call__: no hook again
        finally:
            module.options, module.track_cost = options, track
        comparison.add(out, exact, cost)

    return layer.register_forward_hook(hook, with_kwargs=True)


@torch.no_grad()
def diagnose(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_size: int = 1000,
) -> dict:
    """Each quantum layer of ``model`` against its exact limit on ``images`` (see the module
    docstring): ``{"layers": [row per layer], "exact_accuracy", "quantum_accuracy"}``, each
    row with ``sensitivity_accuracy`` when ``labels`` are given (the accuracies are None
    without them). The model runs in eval mode and keeps its options and mode."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QConv2d)}
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no QConv2d to diagnose")
    was_training = model.training
    model.eval()
    comparisons = {name: _Comparison() for name in layers}
    hooks = [_compare(layer, comparisons[name]) for name, layer in layers.items()]
    tracked = {name: layer.track_cost for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.track_cost = True
        for x, _ in _batches(images, labels, batch_size):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
        for name, layer in layers.items():
            layer.track_cost = tracked[name]
        model.train(was_training)
    rows = [comparisons[name].row(name) for name in layers]
    result = {"layers": rows, "exact_accuracy": None, "quantum_accuracy": None}
    if labels is None:
        return result
    options = {name: layer.options for name, layer in layers.items()}

    def accuracy(quantum: set[str]) -> float:
        for name, layer in layers.items():
            layer.options = options[name] if name in quantum else exact_limit(options[name])
        try:
            return evaluate(model, images, labels, batch_size, loss_fn=_no_loss)["test_accuracy"]
        finally:
            for name, layer in layers.items():
                layer.options = options[name]

    result["exact_accuracy"], result["quantum_accuracy"] = accuracy(set()), accuracy(set(layers))
    for row in rows:
        row["sensitivity_accuracy"] = accuracy({row["layer"]})
    return result


def _batches(images: torch.Tensor, labels: torch.Tensor | None, size: int) -> Iterator[tuple]:
    return batches(images, images if labels is None else labels, size)


def _no_loss(output: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """The sensitivity counts correct answers only: whatever the model outputs, no loss."""
    return output.new_zeros(())
