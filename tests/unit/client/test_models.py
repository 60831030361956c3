"""The model: fixed blob filters are what they claim to be; weights round-trip; DP-compatible."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator

from client.models import build_model, get_arrays, set_arrays
from client.slicenet import BlobFilters


def _dog_2d(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)

    def g(s: float) -> torch.Tensor:
        k = torch.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * s * s))
        return k / k.sum()

    return g(sigma) - g(1.6 * sigma)


def test_separable_filters_equal_the_2d_difference_of_gaussians() -> None:
    bf = BlobFilters(scales=(1.0, 2.0))
    x = torch.rand(3, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    out = bf(x)
    assert out.shape == (3, 3, 40, 40)
    torch.testing.assert_close(out[:, 0], x[:, 0])  # channel 0 keeps the intensities
    for i, s in enumerate((1.0, 2.0), start=1):
        ref = 8.0 * F.conv2d(x, _dog_2d(s, bf.radius)[None, None], padding=bf.radius)[:, 0]
        torch.testing.assert_close(out[:, i], ref, atol=1e-5, rtol=1e-4)


def test_dog_prefers_nodule_sized_blobs_to_vessel_dots() -> None:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def blob(sigma: float) -> torch.Tensor:
        return torch.exp(-((yy - 32) ** 2 + (xx - 32) ** 2) / (2 * sigma**2))[None, None]

    bf = BlobFilters()
    nodule, vessel = bf(blob(2.0))[0, 3].max(), bf(blob(0.5))[0, 3].max()  # coarsest scale
    assert nodule > 3 * vessel


def test_model_is_dp_compatible_and_weights_round_trip() -> None:
    model = build_model(seed=1)
    assert ModuleValidator.validate(model, strict=False) == []
    arrays = get_arrays(model)
    assert all(not k.startswith("features.0.") for k in arrays)  # fixed filters never travel
    other = build_model(seed=2)
    assert not np.array_equal(get_arrays(other)["head.weight"], arrays["head.weight"])
    set_arrays(other, arrays)
    x = torch.rand(4, 1, 64, 64)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))
