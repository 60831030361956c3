"""Per-sample gradients of Conv2d weights for Opacus, from the convolution's own backward.

Opacus' sampler builds each sample's im2col matrix (``unfold2d``: batch × C·k² × H·W,
copied) and multiplies it with the backprops. The same per-sample gradients are the
weight gradient of one convolution whose groups are the samples: input reshaped to
(1, B·C, H, W), backprops to (1, B·O, H, W), ``groups = B``. ATen's
``convolution_backward`` computes that directly (oneDNN on CPU, cuDNN on CUDA), without
the im2col copy: 2.2-2.4x faster than Opacus' sampler for layers with 16 or 32 input
channels on this 2-core CPU, slower below 8 input channels; 1.7-2.1x faster for every layer
of SliceNet on an H200 (benchmarks/README.md). On CUDA, cuDNN convolutions use TF32 unless
``torch.backends.cudnn.allow_tf32`` is off, as the model's own convolutions do; clipping
bounds the per-sample gradients as computed, so the privacy guarantee is unchanged.

Registered with Opacus' own extension point (``register_grad_sampler``) for
``nn.Conv2d``; every case it does not cover (fewer than 8 input channels on CPU, grouped
or string-padded convolutions, an empty batch) goes to Opacus' sampler unchanged.

Autograd still computes each layer's summed weight gradient, which the DP optimizer then
replaces: sparing it took replacing live modules' ``forward`` (retired; it saved about 7% of
a DP step's time at one thread, measured side by side).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

MIN_IN_CHANNELS = 8  # below this Opacus' im2col product is faster (measured)


def covered(layer: nn.Conv2d, activations: torch.Tensor) -> bool:
    """Whether the grouped-backward path applies to this layer and batch (on CUDA: any channel count)."""
    return (layer.groups == 1 and not isinstance(layer.padding, str) and activations.shape[0] > 0
            and activations.dim() == 4 and (layer.in_channels >= MIN_IN_CHANNELS or activations.is_cuda))


@register_grad_sampler(nn.Conv2d)
def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """{weight: (B, O, C, kh, kw), bias: (B, O)} for the parameters that require grad."""
    x = activations[0]
    if not covered(layer, x):
        return compute_conv_grad_sample(layer, activations, backprops)
    x = x.to(backprops.dtype)
    n, c, h, w = x.shape
    out = backprops.shape[1]
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        shape_only = torch.empty((n * out, c, *layer.kernel_size), dtype=x.dtype, device=x.device)
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, n * out, *backprops.shape[2:]), x.reshape(1, n * c, h, w), shape_only, None,
            list(layer.stride), list(layer.padding), list(layer.dilation), False, [0, 0], n, [False, True, False],
        )
        ret[layer.weight] = grad_weight.view(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum(dim=(2, 3))
    return ret
