"""Reproducible faults for simulations (``medfed-server simulate --poison``): a poisoned virtual site.

Only the simulation driver uses this module; a deployed ClientApp never carries these mods.

- ``SITE:scale=F``: the site sends its update multiplied by F (it skips its own bound, as a
  compromised site would), before secure aggregation masks it.
- ``SITE:flip-labels``: the site trains on its labels flipped (0 <-> 1) with honest code.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.app import resolve_site
from privacy import egress as K
from privacy.errors import InputError
from privacy.model_arrays import arrays_to_record, record_to_arrays

_POISON = re.compile(r"^(?P<site>[A-Za-z0-9_.\-]+):(?:scale=(?P<scale>[0-9.eE+\-]+)|(?P<flip>flip-labels))$")


class ChaosError(InputError, ValueError):
    """A ``--poison`` value is malformed; the message shows the accepted forms."""


@dataclass(frozen=True)
class Poison:
    site: str
    scale: float | None = None  # multiply the update by this
    flip_labels: bool = False


def parse_poison(text: str) -> Poison:
    m = _POISON.match(text.strip())
    if m is None:
        raise ChaosError(f"--poison {text!r}: use SITE:scale=FACTOR (e.g. site-2:scale=100) or SITE:flip-labels")
    if m["flip"]:
        return Poison(m["site"], flip_labels=True)
    try:
        scale = float(m["scale"])
    except ValueError:
        raise ChaosError(f"--poison {text!r}: the scale must be a number") from None
    return Poison(m["site"], scale=scale)


def flip_labels(labels_csv: Path, out: Path) -> Path:
    """A copy of a labels CSV with every 0/1 label column flipped (the key column kept)."""
    with open(labels_csv, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    flipped = [[row[0], *("1" if v == "0" else "0" if v == "1" else v for v in row[1:])] for row in body]
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *flipped])
    return out


def scale_mod(poisons: Sequence[Poison], sim_sites: Sequence[str]) -> Mod:
    """The innermost mod: the named sites' train replies leave with their update scaled."""
    factors = {p.site: p.scale for p in poisons if p.scale is not None}
    resolve: Callable[[Context], str] = lambda context: resolve_site(context, sim_sites).name  # noqa: E731

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        factor = factors.get(resolve(context))
        if factor is None or msg.metadata.message_type != MessageType.TRAIN or reply.has_error() \
                or K.ARRAYS not in reply.content.array_records:
            return reply
        update = record_to_arrays(reply.content.array_records[K.ARRAYS])
        reply.content[K.ARRAYS] = arrays_to_record({k: v * factor for k, v in update.items()})
        return reply

    return mod
