"""The offered networks: built with GroupNorm, valid for Opacus, exact per-sample gradients."""

from __future__ import annotations

import sys

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

import privacy.conv_grad_sample  # noqa: F401  (medfed's Conv2d sampler, as training registers it)
from client.model_names import BUILTIN, MONAI_NETWORKS, ModelNameError, ModelRefused, check_name
from client.models import build_model, manifest
from client.networks import build_network

SIZE, BATCH, OUTPUTS = 32, 3, 2


@pytest.mark.parametrize("name", BUILTIN)
def test_network_is_groupnorm_and_valid_for_opacus(name: str) -> None:
    model = build_model(name, outputs=OUTPUTS)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms, f"{name} has no GroupNorm"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    out = model.eval()(torch.rand(BATCH, 1, SIZE, SIZE))
    assert out.shape == (BATCH, OUTPUTS)


@pytest.mark.parametrize("name", BUILTIN)
def test_per_sample_gradients_match_per_example_backward(name: str) -> None:
    torch.manual_seed(1)
    model = build_model(name, outputs=OUTPUTS, seed=3).train()
    for m in model.modules():  # dropout draws differ between one batch and single examples
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if getattr(m, "drop_connect_rate", None):  # EfficientNet's per-sample stochastic depth
            m.drop_connect_rate = 0.0
    x, y = torch.rand(BATCH, 1, SIZE, SIZE), torch.randint(0, 2, (BATCH, OUTPUTS)).float()
    loss_fn = nn.BCEWithLogitsLoss(reduction="sum")
    expected = []
    for i in range(BATCH):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.zero_grad(set_to_none=True)
    loss_fn(gsm(x), y).backward()
    checked = 0
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad_sample is not None, f"{name}: no per-sample gradient for {n}"
        for i in range(BATCH):
            scale = max(1.0, float(expected[i][n].abs().max()))  # float32 sums: relative to the gradient's size
            error = float((p.grad_sample[i] - expected[i][n]).abs().max())
            assert error <= 1e-4 * scale, f"{name} {n} sample {i}: per-sample gradient off by {error:.3g}"
        checked += 1
    gsm.remove_hooks()
    assert checked == sum(1 for p in model.parameters() if p.requires_grad) > 10 or name == "slicenet"


def test_monai_resnet_batchnorm_is_replaced() -> None:
    """MONAI 1.6's ResNet builds BatchNorm in its blocks whatever ``norm`` says: Opacus' fix replaces it."""
    from monai.networks import nets

    raw = nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=1, norm=("group", {"num_groups": 32}))
    assert ModuleValidator.validate(raw, strict=False), "MONAI now honours norm: the fix step can go"
    assert ModuleValidator.validate(build_network("resnet18"), strict=False) == []


def test_manifest_follows_the_network_and_the_outputs() -> None:
    one, three = manifest("resnet18", 1), manifest("resnet18", 3)
    assert one != three and one.keys() == three.keys()
    assert three["fc.weight"][0] == (3, 512)
    assert manifest("slicenet")["head.weight"][0] == (1, 32)


def test_unknown_names_are_refused_with_the_choices() -> None:
    with pytest.raises(ModelNameError, match="densenet121"):
        check_name("vgg16")
    with pytest.raises(ModelNameError):
        check_name("os:system; rm -rf")


def test_factory_must_be_approved_by_the_site() -> None:
    with pytest.raises(ModelRefused, match="not approved"):
        build_network("monai.networks.nets:DenseNet121")


def test_factory_must_come_from_an_installed_distribution(tmp_path, monkeypatch) -> None:
    """A module that only the server's bundle (a folder on sys.path) provides is not imported."""
    (tmp_path / "bundle_models.py").write_text("raise SystemExit('server code ran at the site')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelRefused, match="no installed distribution"):
        build_network("bundle_models:net", factories=["bundle_models:net"])


def test_an_approved_installed_factory_with_the_wrong_signature_is_refused() -> None:
    name = "monai.networks.nets:DenseNet121"  # installed, but it does not take (in_channels=, outputs=)
    with pytest.raises(ModelRefused, match="in_channels=, outputs="):
        build_network(name, factories=[name])
    assert set(MONAI_NETWORKS) < set(BUILTIN)


def _installed(root, package: str, body: str) -> None:
    """A distribution installed into ``root`` the way pip lays one out: the package and its dist-info."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(body)
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "top_level.txt").write_text(package + "\n")
    (info / "RECORD").write_text(f"{package}/__init__.py,,\n{info.name}/METADATA,,\n")


FACTORY_BODY = ("from monai.networks import nets\n"
                "def net(*, in_channels, outputs):\n"
                "    return nets.DenseNet(spatial_dims=2, in_channels=in_channels, out_channels=outputs,\n"
                "                         init_features=8, growth_rate=8, block_config=(2, 2))\n")


def test_an_approved_installed_factory_builds_with_groupnorm(tmp_path, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "medfed_test_nets", raising=False)
    _installed(tmp_path / "env", "medfed_test_nets", FACTORY_BODY)
    monkeypatch.syspath_prepend(str(tmp_path / "env"))
    name = "medfed_test_nets:net"
    model = build_network(name, outputs=2, factories=[name])
    assert ModuleValidator.validate(model, strict=False) == []  # its BatchNorm was replaced
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 2)


def test_a_bundle_copy_shadowing_an_installed_factory_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "medfed_test_nets", raising=False)
    _installed(tmp_path / "env", "medfed_test_nets", FACTORY_BODY)
    (tmp_path / "bundle" / "medfed_test_nets").mkdir(parents=True)
    (tmp_path / "bundle" / "medfed_test_nets" / "__init__.py").write_text("raise SystemExit('bundle code ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "env"))
    monkeypatch.syspath_prepend(str(tmp_path / "bundle"))  # first on the path, as Flower puts a FAB
    with pytest.raises(ModelRefused, match="not the installed one"):
        build_network("medfed_test_nets:net", factories=["medfed_test_nets:net"])


def test_a_bundle_dist_info_that_does_not_record_the_copy_is_refused(tmp_path, monkeypatch) -> None:
    """The red team's shadow: the bundle adds its own dist-info naming the package; its RECORD lists no such file."""
    monkeypatch.delitem(sys.modules, "medfed_test_nets", raising=False)
    _installed(tmp_path / "env", "medfed_test_nets", FACTORY_BODY)
    bundle = tmp_path / "bundle"
    (bundle / "medfed_test_nets").mkdir(parents=True)
    (bundle / "medfed_test_nets" / "__init__.py").write_text("raise SystemExit('bundle code ran')\n")
    (bundle / "evil-1.0.dist-info").mkdir()
    (bundle / "evil-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n")
    (bundle / "evil-1.0.dist-info" / "top_level.txt").write_text("medfed_test_nets\n")
    monkeypatch.syspath_prepend(str(tmp_path / "env"))
    monkeypatch.syspath_prepend(str(bundle))
    with pytest.raises(ModelRefused, match="not the installed one"):
        build_network("medfed_test_nets:net", factories=["medfed_test_nets:net"])


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_dp_training_survives_empty_poisson_batches_on_every_network(name: str) -> None:
    """MONAI's ResNet cannot run a batch of zero samples; an empty Poisson batch still takes a noise-only step."""
    import numpy as np

    from client.dicom.cohort import Cohort
    from client.train import PatientImages, run_steps
    from privacy.dp import make_private

    rng = np.random.default_rng(0)
    cohort = Cohort(rng.uniform(size=(9, 32, 32)).astype(np.float32), rng.integers(0, 2, 9).astype(np.float32),
                    np.arange(9), 9)
    model = build_model(name)
    loader = torch.utils.data.DataLoader(PatientImages(cohort, seed=0), batch_size=1,
                                         generator=torch.Generator().manual_seed(0))
    noise = torch.Generator().manual_seed(4)
    dp_model, dp_opt, _ = make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                       data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                       noise_generator=noise)
    before = [p.detach().clone() for p in model.parameters()]
    empty = [(torch.zeros(0, 1, 32, 32), torch.zeros(0))]  # what Opacus' DPDataLoader yields for an empty draw
    result = run_steps(dp_model, dp_opt, empty, steps=2, device=torch.device("cpu"), summed=True)
    assert result.steps == 2 and result.num_examples == 0 and result.train_loss == 0.0
    moved = [float((a - b.detach()).abs().max()) for a, b in zip(before, model.parameters(), strict=True)]
    assert min(moved) > 0  # every parameter took the noise (sigma * C / expected batch), nothing else
    dp_model.to_standard_module()


def test_the_site_refuses_inputs_too_small_for_the_network_and_oversized_batches() -> None:
    from client.config import ModelPolicy

    policy = ModelPolicy(max_batch_size=64)
    assert "at least 32 px" in (policy.refusal("densenet121", 16) or "")
    assert policy.refusal("resnet18", 16) is None
    assert "max_batch_size" in (policy.refusal("slicenet", 64, batch_size=65) or "")


def test_several_windows_become_input_channels(tmp_path, small_site) -> None:  # type: ignore[no-untyped-def]
    """Real DICOM, two CT windows: (N, 2, S, S) inputs; a two-channel network trains one DP step on them."""
    import numpy as np

    from client.dicom import Preprocessing, load_cohort
    from client.train import LocalPlan, train_private

    lung, soft = (-600.0, 1500.0), (40.0, 400.0)
    both = load_cohort(small_site, small_site / "labels.csv", Preprocessing(image_size=32), cache_dir=tmp_path / "c",
                       channels=(lung, soft))
    one = load_cohort(small_site, small_site / "labels.csv", Preprocessing(image_size=32, window=soft),
                      cache_dir=tmp_path / "c")
    assert both.images.shape == (len(both.labels), 2, 32, 32) and np.array_equal(both.images[:, 1], one.images)
    assert not np.array_equal(both.images[:, 0], both.images[:, 1])
    model = build_model("resnet18", in_channels=2)
    result = train_private(model, both, LocalPlan(steps=1, batch_size=8, learning_rate=1e-3, seed=0),
                           torch.device("cpu"), noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=1)
    assert result.steps == 1
    with pytest.raises(ModelRefused, match="one input channel"):
        build_network("slicenet", in_channels=2)
