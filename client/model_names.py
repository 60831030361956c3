"""The names a run config may give its network: the built-in ones and the form of a site-installed factory.

Light on purpose (no torch): site commands and the site configuration check names without building anything.
"""

from __future__ import annotations

import re

from privacy.errors import InputError, RefusedError

SLICENET = "slicenet"
# name -> (MONAI constructor, GroupNorm groups: every normalised channel count of the network divides by it)
MONAI_NETWORKS: dict[str, tuple[str, int]] = {
    "densenet121": ("DenseNet121", 32),
    "resnet18": ("resnet18", 32),
    "resnet34": ("resnet34", 32),
    "resnet50": ("resnet50", 32),
    "efficientnet-b0": ("EfficientNetBN", 8),
}
BUILTIN = (SLICENET, *MONAI_NETWORKS)
# the smallest input each network runs on (five stride-2 stages; EfficientNet's "same" padding needs 32)
MIN_IMAGE_SIZE = {SLICENET: 8, "densenet121": 32, "resnet18": 16, "resnet34": 16, "resnet50": 16,
                  "efficientnet-b0": 32}
FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
MAX_NAME = 200


class ModelNameError(InputError, ValueError):
    """A model name is neither a built-in network nor a ``package.module:function`` factory."""


class ModelRefused(RefusedError, ValueError):
    """This site does not train the requested network (not allowed, not installed or not valid for DP)."""


def check_name(name: str) -> str:
    """``name`` if it names a built-in network or has the form of a factory; else an error with the choices."""
    if name in BUILTIN or (len(name) <= MAX_NAME and FACTORY.match(name)):
        return name
    raise ModelNameError(f"model {name[:MAX_NAME]!r} is unknown: use one of {', '.join(BUILTIN)}, or a factory "
                         "'package.module:function' installed at every site")
