"""Gradient inversion on a toy network: the plain batch-1 update gives its image away, the DP update
and the sum of five sites' updates do not; the updates come from the product's training functions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from client.inversion_at_site import run_inversion, site_update
from privacy.attacks.inversion import DpSetting, best_match_ssim, invert, psnr, save_grid, ssim

SIZE = 16
LR = 0.1


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * SIZE * SIZE, 1))


def shapes() -> tuple[np.ndarray, np.ndarray]:
    """Six 16x16 images: a bright disc or square on a dark background, each somewhere else."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = np.full((6, SIZE, SIZE), 0.1, dtype=np.float32)
    for i, (cy, cx) in enumerate([(5, 5), (10, 11), (4, 11), (11, 4), (8, 8), (12, 12)]):
        if i % 2 == 0:
            images[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 9] = 0.9
        else:
            images[i][cy - 3 : cy + 3, cx - 3 : cx + 3] = 0.9
    return images, np.array([1, 0, 1, 0, 1, 0], dtype=np.float32)


def gradient(model: nn.Module, image: np.ndarray, label: float) -> dict[str, np.ndarray]:
    loss = nn.BCEWithLogitsLoss()(model(torch.from_numpy(image)[None, None]).reshape(1), torch.tensor([label]))
    names, params = zip(*model.named_parameters(), strict=True)
    return {n: g.numpy() for n, g in zip(names, torch.autograd.grad(loss, params), strict=True)}


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays.values()])


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_plain_update_is_one_sgd_step_and_dp_update_is_clipped_and_noised() -> None:
    model = toy_model()
    images, labels = shapes()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = site_update(model, images[:1], labels[:1], learning_rate=LR, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the global model is untouched
    grad = gradient(model, images[0], float(labels[0]))
    assert list(plain) == list(grad)
    np.testing.assert_allclose(flat(plain), -LR * flat(grad), rtol=1e-4, atol=1e-7)

    norm = np.linalg.norm(flat(grad))
    clip = 0.5 * norm  # the patient's gradient is clipped to half its norm
    clipped = flat(site_update(model, images[:1], labels[:1], learning_rate=LR, dp=DpSetting(0.0, clip), seed=0))
    assert np.linalg.norm(clipped) == pytest.approx(LR * clip, rel=1e-4)
    np.testing.assert_allclose(clipped, 0.5 * flat(plain), rtol=1e-3, atol=1e-7)

    dp = DpSetting(noise_multiplier=1.0, max_grad_norm=1.0)
    noisy = flat(site_update(model, images[:1], labels[:1], learning_rate=LR, dp=dp, seed=0))
    again = flat(site_update(model, images[:1], labels[:1], learning_rate=LR, dp=dp, seed=0))
    other = flat(site_update(model, images[:1], labels[:1], learning_rate=LR, dp=dp, seed=1))
    np.testing.assert_array_equal(noisy, again)  # the noise is seeded
    assert not np.allclose(noisy, other)
    # noise N(0, (1.0 * 1.0)^2) on each of d coordinates: norm ~ sqrt(d) (std 0.71), plus at most C from the gradient
    d = noisy.size
    assert abs(np.linalg.norm(noisy) / LR - math.sqrt(d)) < 1.0 + 4 * 0.71
    cosine = noisy @ flat(plain) / (np.linalg.norm(noisy) * np.linalg.norm(flat(plain)))
    assert abs(cosine) < 0.15


def test_inversion_recovers_plain_image_but_not_dp_or_aggregate(tmp_path: Path) -> None:
    model = toy_model()
    images, labels = shapes()
    grid = tmp_path / "grid.png"
    numbers = run_inversion(model, images, labels, learning_rate=LR, dp=DpSetting(1.0, 1.0), aggregate_of=5, seed=0,
                            iterations=200, grid=grid)
    assert set(numbers) == {"plain", "dp", "aggregate", "reference"} and numbers["aggregate"]["sites"] == 5
    assert numbers["reference"] == {"ssim": ssim(images[0], images[5]), "median_ssim": ssim(images[0], images[5]), "images": 1}
    assert all(isinstance(v, float | int) for case in numbers.values() for v in case.values())
    plain, dp, aggregate = numbers["plain"], numbers["dp"], numbers["aggregate"]
    assert plain["ssim"] >= 0.95 and plain["psnr"] >= 30 and plain["objective"] < 0.01
    assert dp["ssim"] <= 0.2 and dp["objective"] > 0.5
    assert aggregate["ssim_target"] <= aggregate["ssim"] <= 0.5  # a blend of the five images
    assert plain["ssim"] - max(dp["ssim"], aggregate["ssim"]) >= 0.4
    with Image.open(grid) as png:
        assert png.format == "PNG" and png.size == (2 * SIZE + 2, 3 * SIZE + 2 * 2)


def test_invert_infers_the_label_and_is_deterministic() -> None:
    model = toy_model()
    images, labels = shapes()
    for i in (0, 1):
        update = site_update(model, images[i : i + 1], labels[i : i + 1], learning_rate=LR, seed=0)
        first = invert(model, update, shape=(SIZE, SIZE), iterations=60, seed=3)
        second = invert(model, update, shape=(SIZE, SIZE), iterations=60, seed=3)
        assert first.label == labels[i]
        np.testing.assert_array_equal(first.image, second.image)
        assert first.image.shape == (SIZE, SIZE) and 0.0 <= first.image.min() and first.image.max() <= 1.0
    with pytest.raises(ValueError):
        invert(model, {"nothing": np.zeros(1)}, shape=(SIZE, SIZE), iterations=1)


def test_metrics_and_grid(tmp_path: Path) -> None:
    images, _ = shapes()
    assert ssim(images[0], images[0]) == pytest.approx(1.0)
    assert psnr(images[0], np.clip(images[0] + 0.1, 0, 1)) == pytest.approx(20.0, abs=0.1)
    assert best_match_ssim(images[1:4], images[2]) == pytest.approx(1.0)
    assert best_match_ssim(images[3:], images[0]) < 0.9
    path = tmp_path / "out" / "grid.png"
    save_grid(path, [images[0], images[1]], [images[2], np.ones((SIZE, SIZE))])
    with Image.open(path) as png:
        pixels = np.asarray(png)
        assert png.mode == "L" and png.size == (2 * SIZE + 2, 2 * SIZE + 2)
    np.testing.assert_array_equal(pixels[:SIZE, :SIZE], np.rint(images[0].astype(np.float64) * 255).astype(np.uint8))
    assert (pixels[SIZE + 2 :, SIZE + 2 :] == 255).all() and (pixels[:, SIZE : SIZE + 2] == 255).all()
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        save_grid(path, [images[0]], [])
