"""The QCNN layer's forward pass on circuits: ``QConv2d(..., backend="pennylane" | "qiskit-aer")``.

Every inner product <A_p|F_q> is a Hadamard-test (``estimator="shots"``) or amplitude-estimation
(``estimator="amplitude-estimation"``) circuit, and each image's ⌊σK⌋ samples are measurements
of its amplitude-encoded outputs. Forward only, with no gradient, and meant for a few images:
the first layer of the authors' network is 2,420 circuits per image. The receptive fields are
written out with ``unfold`` here, since the circuits need them as vectors.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from qcnn.backends import get_backend, inner_products, sample_positions
from qcnn.options import QConvOptions
from qcnn.sampling import capped_relu_, n_samples


def receptive_field_pairs(
    x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (A_p, F_q) of the layer as rows (B·P·D', D·h·w), ordered image, position, kernel."""
    columns = F.unfold(x, weight.shape[2:], stride=stride, padding=padding).transpose(1, 2)  # (B, P, d)
    filters = weight.flatten(1)  # (D', d)
    a = columns.unsqueeze(2).expand(-1, -1, len(filters), -1).reshape(-1, filters.shape[1])
    f = filters.expand(columns.shape[0] * columns.shape[1], -1, -1).reshape(-1, filters.shape[1])
    return a, f


def without_gradient(out: torch.Tensor, inputs: tuple, backend: str) -> torch.Tensor:
    """``out``, whose backward raises if any of ``inputs`` needs a gradient in grad mode."""
    needed = [t for t in inputs if t is not None and t.requires_grad]
    return _NoGradient.apply(out, backend, *needed) if torch.is_grad_enabled() and needed else out


class _NoGradient(torch.autograd.Function):
    """Passes the circuits' output through; a backward pass through it is an error, so
    training a layer on circuits fails loudly instead of silently learning nothing."""

    @staticmethod
    def forward(ctx, out, backend, *inputs):  # the inputs only tie the output to the graph
        ctx.backend = backend
        return out.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"backend {ctx.backend!r} runs the layer's forward pass on circuits and computes no "
            "gradient: train with backend='torch', and use the circuits to evaluate"
        )


@torch.no_grad()
def circuit_qconv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    options: QConvOptions,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Estimated, capped and sampled output (B, D', H', W') computed by circuits, without a
    gradient (see :func:`without_gradient`)."""
    backend = get_backend(options.backend, options.backend_device)
    images, kernels = len(x), weight.shape[0]
    a, f = receptive_field_pairs(x, weight, stride, padding)
    height = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    width = len(a) // (images * kernels * height)
    scale = a.norm(dim=1) * f.norm(dim=1)
    y_hat = torch.zeros_like(scale)
    active = scale > 0  # a zero patch or kernel has inner product 0: nothing to estimate
    if active.any():
        estimator = {"shots": options.n_shots} if options.estimator == "shots" else {
            "ae_qubits": options.n_ae_qubits}  # fmt: skip
        cosines = inner_products(backend, a[active], f[active], generator=generator, **estimator)
        y_hat[active] = scale[active] * cosines
    y_hat = y_hat.view(images, height, width, kernels).permute(0, 3, 1, 2)
    if bias is not None:
        y_hat = y_hat + bias.view(1, -1, 1, 1)
    # The authors' order needs the exact Y: the noise is what the circuits added to it.
    y = F.conv2d(x, weight, bias, stride, padding) if options.cap_order == "authors" else None
    values = capped_relu_(y_hat, y, options.cap, options.cap_order)
    if options.sigma is None:
        return values
    count = n_samples(options.sigma, values[0].numel())
    mask = torch.zeros(images, values[0].numel(), dtype=torch.bool, device=x.device)
    for index, image in enumerate(values):  # one measurement run per image
        weights = image if options.sampling == "linear" else image.square()
        if weights.sum() > 0:
            mask[index, sample_positions(backend, weights, count, generator)] = True
    return values * mask.view_as(values)
