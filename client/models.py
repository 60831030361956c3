"""The run's model: building it (``client.networks``), its arrays, the egress manifest and the device."""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from client.model_names import SLICENET
from client.networks import build_network


def build_model(name: str = SLICENET, *, seed: int = 0, outputs: int = 1, in_channels: int = 1,
                factories: Iterable[str] = ()) -> nn.Module:
    """Build a freshly initialised network (``client.networks``); the same seed gives the same weights.

    ``outputs``: one logit per finding; ``factories``: the model factories the site approved."""
    torch.manual_seed(seed)
    return build_network(name, outputs=outputs, in_channels=in_channels, factories=factories)


def get_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Model weights as numpy arrays in ``state_dict`` order."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


@functools.lru_cache(maxsize=8)
def manifest(name: str = SLICENET, outputs: int = 1, factories: tuple[str, ...] = (), in_channels: int = 1
             ) -> Mapping[str, tuple[tuple[int, ...], str]]:
    """The model's arrays as the egress guard lets them leave: ``name -> (shape, dtype)``.

    Built once per process and network, under a forked torch RNG (building a model seeds it)."""
    with torch.random.fork_rng(devices=[]):
        arrays = get_arrays(build_model(name, outputs=outputs, in_channels=in_channels, factories=factories))
    return MappingProxyType({k: (tuple(v.shape), v.dtype.name) for k, v in arrays.items()})


def set_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load numpy arrays (``state_dict`` names) into the model, strictly."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}, strict=True)


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` selects CUDA when present, else CPU; ``cpu``/``cuda`` force one."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' in site.toml but no CUDA GPU is visible: set device = 'auto'")
    return torch.device(preference)
