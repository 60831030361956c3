"""The networks a run may train: medfed's SliceNet, MONAI's 2D radiology networks with GroupNorm,
or a factory ``package.module:function`` that the site installed and listed in ``[models]``.

A run names its network (``model`` in the run config); every site builds it from its own
installed code after checking its own policy, never from code the server sent. MONAI builds
the radiology networks (``monai.networks.nets``, no weights are downloaded: ``pretrained`` is
off). DP-SGD needs per-sample gradients, which BatchNorm does not have: the networks are built
with GroupNorm where MONAI takes a ``norm`` argument, and any BatchNorm MONAI still builds (its
ResNet passes ``norm`` to the stem only, in MONAI 1.6) is replaced by Opacus'
``ModuleValidator.fix``; the result must pass ``ModuleValidator.validate`` or it is refused.
In-place activations (``ReLU(inplace=True)``, the torch attribute ``inplace``) are turned off:
Opacus' per-sample hooks cannot see through an in-place op on a hooked layer's output.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.model_names import MONAI_NETWORKS, SLICENET, ModelRefused, check_name
from client.slicenet import SliceNet

# How Opacus computes each network's per-sample gradients. Hooks (with medfed's Conv2d sampler) were faster
# than functorch for every built-in network (benchmarks/dp_overhead.py, benchmarks/README.md); a layer type
# Opacus has no sampler for falls back to functorch inside hooks mode. Expanded weights: see docs/models.md.
GRAD_SAMPLE_MODES = {SLICENET: "hooks", **dict.fromkeys(MONAI_NETWORKS, "hooks")}


def grad_sample_mode(name: str) -> str:
    """The per-sample gradient mode medfed trains ``name`` with (recorded in the ledger event)."""
    return GRAD_SAMPLE_MODES.get(name, "hooks")


class FreshOutput(nn.Module):
    """Runs ``layer`` and returns a new tensor: MONAI's residual blocks add the shortcut in place
    to their last norm's output, which Opacus' per-sample hooks on that norm forbid."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).clone()


def _resnet(ctor: str, *, in_channels: int, outputs: int, norm: tuple[str, dict[str, int]]) -> nn.Module:
    from monai.networks import nets
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    model = getattr(nets, ctor)(spatial_dims=2, n_input_channels=in_channels, num_classes=outputs, norm=norm)
    for block in model.modules():
        if isinstance(block, ResNetBlock):
            block.bn2 = FreshOutput(block.bn2)
        elif isinstance(block, ResNetBottleneck):
            block.bn3 = FreshOutput(block.bn3)
    return model


def _monai(name: str, *, in_channels: int, outputs: int) -> nn.Module:
    from monai.networks import nets

    ctor, groups = MONAI_NETWORKS[name]
    norm = ("group", {"num_groups": groups})
    if name.startswith("resnet"):
        return _resnet(ctor, in_channels=in_channels, outputs=outputs, norm=norm)
    if name.startswith("efficientnet"):
        return nets.EfficientNetBN(name, pretrained=False, spatial_dims=2, in_channels=in_channels,
                                   num_classes=outputs, norm=norm)
    return getattr(nets, ctor)(spatial_dims=2, in_channels=in_channels, out_channels=outputs, norm=norm,
                               pretrained=False)


def _require_installed(name: str, top: str) -> None:
    """The package ``top`` must be provided by an installed distribution, and the file Python finds
    first for it (found, not run) must be one that distribution's RECORD lists: a same-named module
    earlier on ``sys.path`` is refused. (A folder that also forges a dist-info whose RECORD lists its
    own files passes: only a bundle the site approved to run is ever on the path — docs/models.md.)"""
    spec = importlib.util.find_spec(top)
    dists = importlib.metadata.packages_distributions().get(top, [])
    if spec is None or not dists:
        raise ModelRefused(f"model factory {name!r}: no installed distribution provides the package {top!r}; "
                           "install it at this site (pip install ...) before approving it")
    where = Path(spec.origin or next(iter(spec.submodule_search_locations or []), "")).resolve()
    listed: set[Path] = set()
    for dist_name in dists:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
        listed |= {Path(str(dist.locate_file(f))).resolve() for f in dist.files or ()}
    if where not in listed:
        raise ModelRefused(f"model factory {name!r}: the package {top!r} found first is not the installed one; "
                           "remove the other copy from the Python path (an editable install is not accepted: "
                           "install the package normally)")


def _factory(name: str, approved: Iterable[str]) -> Callable[..., Any]:
    """The installed factory function; refused unless this site listed it and an installed
    distribution provides its package (never a module of the server's bundle)."""
    if name not in set(approved):
        raise ModelRefused(f"model factory {name!r} is not approved at this site: add it to [models] factories in "
                           "site.toml after installing and reviewing the package that provides it")
    module_name, function = name.split(":")
    _require_installed(name, module_name.split(".")[0])
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ModelRefused(f"model factory {name!r} cannot be loaded ({type(exc).__name__}); check the installed "
                           "package and the name in [models] factories") from None
    if not callable(factory):
        raise ModelRefused(f"model factory {name!r} is not a function")
    return factory


def build_network(name: str, *, outputs: int = 1, in_channels: int = 1, factories: Iterable[str] = ()) -> nn.Module:
    """A freshly initialised network (the caller seeds torch); DP-valid or :class:`ModelRefused`.

    ``factories``: the factories this site approved; a factory is called as
    ``function(in_channels=..., outputs=...)`` and must return a ``torch.nn.Module``.
    """
    check_name(name)
    if name == SLICENET:  # DP-valid by construction (tests/unit check it with Opacus' validator)
        if in_channels != 1:
            raise ModelRefused(f"slicenet takes one input channel ({in_channels} windows were asked for): choose a "
                               "MONAI network or a factory for several windows")
        return SliceNet(outputs=outputs)
    from opacus.validators import ModuleValidator  # here: a site training SliceNet without DP never imports Opacus

    if name in MONAI_NETWORKS:
        model = _monai(name, in_channels=in_channels, outputs=outputs)
    else:
        try:
            model = _factory(name, factories)(in_channels=in_channels, outputs=outputs)
        except TypeError as exc:
            raise ModelRefused(f"model factory {name!r} must take the keywords (in_channels=, outputs=) and return a "
                               f"torch.nn.Module ({exc})") from None
        if not isinstance(model, nn.Module):
            raise ModelRefused(f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)  # BatchNorm -> GroupNorm, the documented Opacus repair
    for module in model.modules():  # Opacus' backward hooks forbid in-place activations after a hooked layer
        if getattr(module, "inplace", False) is True:
            setattr(module, "inplace", False)  # noqa: B010  (a torch module's public flag; mypy types it loosely)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ModelRefused(f"model {name!r} cannot be trained with DP-SGD: {'; '.join(map(str, problems))[:500]}")
    return model
