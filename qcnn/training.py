"""Training and evaluation helpers for any model, quantum layers or not.

:func:`train_epoch` runs one epoch of mini-batch training and stops with :class:`Diverged`
when a loss becomes NaN or inf; :func:`evaluate` gives the test loss, the accuracy and the
mean running-time accounting of each :class:`~qcnn.QConv2d` (``docs/algorithm.md`` section
4). Both take the loss explicitly (``loss_fn``): the default, ``nll_loss``, suits a model
whose output is log-probabilities (a ``log_softmax`` last, as the built-in networks have);
a model that outputs logits wants ``F.cross_entropy``, and one given ``nll_loss`` is told so
(its loss would run to minus infinity without an error).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from qcnn.functional import NonFiniteError
from qcnn.layer import QConv2d

# |logsumexp| of a row of log-probabilities is float rounding; a logits row is off by far more.
_LOG_PROBABILITY_TOLERANCE = 1e-3


class Diverged(ArithmeticError):
    """The training loss became NaN or inf."""


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches by indexing; shuffled with ``generator`` when one is given."""
    n = len(images)
    if generator is None:
        order = None
    else:
        order = torch.randperm(n, generator=generator, device=generator.device).to(images.device)
    for start in range(0, n, batch_size):
        if order is None:
            yield images[start : start + batch_size], labels[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            yield images[index], labels[index]


def check_output(output: torch.Tensor, loss_fn: Callable) -> None:
    """ValueError if ``loss_fn`` is ``nll_loss`` and ``output`` is not log-probabilities."""
    if loss_fn is not F.nll_loss or output.dim() != 2:
        return
    worst = output.detach().logsumexp(1).abs().max().item()
    if worst > _LOG_PROBABILITY_TOLERANCE:  # NaN compares False: training says it diverged
        raise ValueError(
            f"loss_fn is nll_loss, which needs log-probabilities, but the model's output rows have "
            f"logsumexp up to {worst:.3g} (not 0): for a model that outputs logits, pass "
            "loss_fn=torch.nn.functional.cross_entropy"
        )


def _progress(items: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    """``items`` behind a tqdm progress bar if ``enabled`` (tqdm is in the experiments extra)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError as error:
        raise ImportError("progress bars need tqdm: pip install 'qcnn[experiments]'") from error
    return tqdm(items, total=total, desc=desc, leave=False)


def train_epoch(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
    *,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.nll_loss,
    log_every: int = 10,
    on_log: Callable[[int, int, float], None] | None = None,
    progress: bool = False,
    desc: str = "training",
) -> list[float]:
    """One epoch of mini-batch training of any model; returns the loss of every
    ``log_every``-th batch. Raises :class:`Diverged` as soon as a batch's loss, or at the
    end a parameter, is NaN or inf, or a quantum layer meets NaN or inf (its input, its
    weights): a diverged run, where training stops.

    The batches are shuffled by ``generator`` (in order if None). ``loss_fn(output, labels)``
    is the loss (see the module docstring). ``on_log(batch index, batch size, loss)`` is
    called for each logged batch, e.g. to write a curve as it goes. The model is left in
    training mode.
    """
    model.train()
    losses = []
    steps = _progress(batches(images, labels, batch_size, generator), math.ceil(len(images) / batch_size),
                      desc, progress)  # fmt: skip
    for index, (x, y) in enumerate(steps):
        optimiser.zero_grad(set_to_none=True)
        try:
            output = model(x)
        except NonFiniteError as error:
            raise Diverged(f"{error} at batch {index}") from None
        if index == 0:
            check_output(output, loss_fn)
        loss = loss_fn(output, y)
        value = loss.item()  # every batch: a NaN can turn into finite nonsense a batch later
        if not math.isfinite(value):
            raise Diverged(f"the loss became {value} at batch {index}")
        loss.backward()
        optimiser.step()
        if index % log_every == 0:
            losses.append(value)
            if on_log is not None:
                on_log(index, len(x), value)
            if progress:
                steps.set_postfix(loss=f"{value:.3f}")
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise Diverged("a parameter became NaN or inf in the last batch's step")
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    loss_fn: Callable[..., torch.Tensor] = F.nll_loss,
) -> dict:
    """Test loss, accuracy and (QCNN) mean per-layer running-time accounting, of any model,
    in eval mode; the model's mode is restored after.

    The QCNN keeps its quantum forward pass (noise, cap, sampling) at test time: eval mode
    does not switch the quantum layer's noise off, so one pass is one random draw of the
    accuracy (average several). ``loss_fn(output, labels, reduction="sum")`` gives the test
    loss.
    """
    was_training = model.training
    model.eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QConv2d)}
    costs: dict[str, list[dict]] = {name: [] for name in layers}
    for layer in layers.values():
        layer.track_cost = True
    loss_sum, correct = 0.0, 0
    try:
        for index, (x, y) in enumerate(batches(images, labels, batch_size)):
            out = model(x)
            if index == 0:
                check_output(out, loss_fn)
            loss_sum += loss_fn(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            for name, layer in layers.items():
                costs[name].append(layer.last_cost.as_dict())
    finally:
        for layer in layers.values():
            layer.track_cost = False
        model.train(was_training)
    summary = {
        name: {key: finite_mean([row[key] for row in rows]) for key in rows[0]}
        for name, rows in costs.items()
        if rows
    }
    return {"test_loss": loss_sum / len(images), "test_accuracy": correct / len(images), "cost": summary}


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values (a quantum cost is infinite where ε = 0, and None in a
    metrics.json); inf if none is."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf
