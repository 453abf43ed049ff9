"""``QConv2d``: the QCNN layer as a drop-in ``nn.Module`` (``docs/algorithm.md`` sections 1-4).

It owns the kernels and bias like ``nn.Conv2d`` (same shapes, same initialisation), holds the
validated :class:`~qcnn.options.QConvOptions`, and its forward calls
:func:`qcnn.functional.qconv2d_with_options`. Replacing ``nn.Conv2d`` + ``nn.ReLU`` (+ pooling)
by ``QConv2d`` is a one-line change.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict

import torch
from torch import nn

from qcnn.cost import LayerCost
from qcnn.functional import qconv2d_with_options
from qcnn.options import OPTION_NAMES, QConvOptions, check_generator, conv_pair, is_integer

log = logging.getLogger(__name__)


class QConv2d(nn.Module):
    """Quantum convolution layer (Kerenidis, Landman, Prakash, ICLR 2020).

    Input (N, in_channels, H, W) -> output (N, out_channels, H', W') (pooled if asked),
    with H' = (H + 2·padding − kernel) // stride + 1. The first six arguments are those of
    ``nn.Conv2d``. ``options`` is a :class:`~qcnn.options.QConvOptions` (its defaults if
    None); ``overrides`` change some of its fields: epsilon, cap, sigma, estimator, shots,
    ae_qubits, norms, cap_order, sampling, pooling, pool_size, delta, backprop, backend,
    backend_device, fused. ``generator`` (a ``torch.Generator`` on the input's device) drives
    all randomness; None uses PyTorch's global RNG. Set ``track_cost = True`` to record each
    forward's :class:`~qcnn.cost.LayerCost` in ``last_cost``.

    ``norm`` (a BatchNorm put there by :func:`qcnn.convert`) is applied to the estimate
    before the cap; ``norm_origin`` names the module it came from in the classical model,
    for :func:`qcnn.classical_state_dict`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        *,
        options: QConvOptions | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **overrides: object,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not (is_integer(value) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        check_generator(generator)
        if options is not None and not isinstance(options, QConvOptions):
            raise ValueError(f"options must be a QConvOptions or None, got {options!r}")
        self.options = (options or QConvOptions()).with_changes(**overrides)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = conv_pair("kernel_size", kernel_size, 1)
        self.stride, self.padding = conv_pair("stride", stride, 1), conv_pair("padding", padding, 0)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.generator = generator
        self.norm: nn.BatchNorm2d | None = None
        self.norm_origin: str | None = None
        self.track_cost = False
        self.last_cost: LayerCost | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Conv2d``, drawing the same random numbers in the same order."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        options: QConvOptions | None = None,
        *,
        generator: torch.Generator | None = None,
        **overrides: object,
    ) -> QConv2d:
        """A QConv2d with a copy of ``conv``'s weights and bias (e.g. trained classically),
        ``options`` and ``overrides`` as in the constructor.

        It draws no initialisation, so building it leaves the global RNG as it was.
        """
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError(
                "from_conv needs groups=1, dilation=1 and padding_mode='zeros', got "
                f"groups={conv.groups}, dilation={conv.dilation}, padding_mode={conv.padding_mode!r}"
            )
        layer = nn.utils.skip_init(
            cls, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.bias is not None, options=options, generator=generator, device=conv.weight.device,
            dtype=conv.weight.dtype, **overrides,
        )  # fmt: skip
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def configure(self, **overrides: object) -> None:
        """Change options in place (validated), e.g. ``layer.configure(sigma=0.2)``."""
        self.options = self.options.with_changes(**overrides)

    def _store_cost(self, cost: LayerCost) -> None:
        self.last_cost = cost

    def forward(self, input: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on ``input`` (N, in_channels, H, W): estimate, [norm], [+ shortcut], cap,
        sample, [pool] (``docs/algorithm.md`` sections 1-2).

        ``shortcut``, a tensor of the convolution's output shape (N, out_channels, H', W'), is
        a residual block's classical input, added to the estimate (after ``norm``) before the
        cap: f(norm(Ŷ + b) + shortcut) is what gets sampled. ValueError for input the layer
        cannot take (shape, dtype, NaN, a kernel or pooling larger than the map).
        """
        record = self._store_cost if self.track_cost else None
        return qconv2d_with_options(
            input, self.weight, self.bias, self.stride, self.padding,
            self.options, self.generator, record, self.norm, shortcut,
        )  # fmt: skip

    def get_extra_state(self) -> dict:
        return {"options": asdict(self.options)}

    def set_extra_state(self, state: dict) -> None:
        saved = QConvOptions.from_dict(state["options"])
        if saved != self.options:
            changed = {
                name: (getattr(self.options, name), getattr(saved, name))
                for name in OPTION_NAMES
                if getattr(saved, name) != getattr(self.options, name)
            }
            log.warning(
                "QConv2d: restoring the options saved in the state_dict (now, saved): %s", changed
            )
        self.options = saved

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "_extra_state" in missing_keys:  # saved without options: keep the layer's
            missing_keys.remove(prefix + "_extra_state")

    def extra_repr(self) -> str:
        """The convolution's arguments, then the options that differ from their defaults,
        as ``nn.Conv2d`` prints only what departs from its own."""
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        text += f", stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.bias is None:
            text += ", bias=False"
        defaults = QConvOptions()
        changed = [
            f"{name}={getattr(self.options, name)!r}"
            for name in OPTION_NAMES
            if getattr(self.options, name) != getattr(defaults, name)
        ]
        return ", ".join([text, *changed])

