"""medfed's Conv2d per-sample gradients equal Opacus' sampler and per-sample autograd."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import nn

from privacy.conv_grad_sample import conv2d_grad_sample, covered


@pytest.mark.parametrize("cin, cout, size, kwargs", [
    (16, 32, 16, {"padding": 1}),
    (8, 4, 9, {"padding": 2, "stride": 2, "bias": False}),
    (32, 8, 12, {"padding": (1, 0), "dilation": 2, "kernel_size": (3, 5)}),
    (4, 16, 8, {"padding": 1}),  # below the channel threshold: Opacus' sampler
    (16, 16, 8, {"padding": 1, "groups": 4}),  # grouped: Opacus' sampler
])
def test_equals_opacus_sampler(cin: int, cout: int, size: int, kwargs: dict) -> None:
    torch.manual_seed(0)
    kwargs = {"kernel_size": 3, **kwargs}
    layer = nn.Conv2d(cin, cout, **kwargs)
    x = torch.randn(5, cin, size, size)
    backprops = torch.randn_like(layer(x))
    ours = conv2d_grad_sample(layer, [x], backprops)
    ref = compute_conv_grad_sample(layer, [x], backprops)
    assert set(ours) == set(ref)
    for p in ref:
        assert ours[p].shape == ref[p].shape == (5, *p.shape)
        torch.testing.assert_close(ours[p], ref[p], rtol=1e-4, atol=1e-4)
    assert covered(layer, x) == (cin >= 8 and kwargs.get("groups", 1) == 1)


def _per_sample_grads(model: nn.Module, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """Each sample's own gradient (its own backward pass), per parameter."""
    expected = []
    for i in range(len(x)):
        model.zero_grad()
        model(x[i : i + 1]).sum().backward()
        expected.append([p.grad.clone() for p in model.parameters()])
    return expected


def _assert_grad_samples(model: nn.Module, expected: list[list[torch.Tensor]]) -> None:
    for j, p in enumerate(model.parameters()):
        for i in range(len(expected)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][j], rtol=1e-4, atol=1e-5)


def test_grad_sample_module_matches_per_sample_autograd() -> None:
    """Through Opacus' hooks, each sample's gradient equals that sample's own backward pass."""
    from opacus import GradSampleModule

    import privacy.conv_grad_sample  # noqa: F401  (registered)

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, bias=False),
                          nn.GroupNorm(4, 16, affine=False), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                          nn.Linear(16, 1))
    x = torch.randn(6, 1, 10, 10)
    expected = _per_sample_grads(model, x)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm(x).sum().backward()
    _assert_grad_samples(model, expected)
    gsm.to_standard_module()


def test_make_private_leaves_the_modules_as_they_are() -> None:
    """Opacus' hooks only: no layer's forward is replaced; summed and per-sample gradients are exact,
    and the standard module Opacus hands back trains as before."""
    from torch.utils.data import DataLoader, TensorDataset

    from privacy.dp import make_private

    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, bias=False),
                          nn.GroupNorm(4, 16, affine=False), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, bias=False),
                          nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 1))
    x = torch.randn(5, 1, 10, 10)
    expected = _per_sample_grads(model, x)
    model.zero_grad(set_to_none=True)
    loader = DataLoader(TensorDataset(x, torch.zeros(5)), batch_size=5, generator=torch.Generator().manual_seed(0))
    gsm, _, _ = make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                             noise_generator=torch.Generator().manual_seed(1))
    assert not any("forward" in vars(m) for m in model.modules())
    gsm(x).sum().backward()
    _assert_grad_samples(model, expected)
    torch.testing.assert_close(model[2].weight.grad, sum(e[2] for e in expected), rtol=1e-4, atol=1e-5)
    assert gsm.to_standard_module() is model
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
