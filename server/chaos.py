"""Reproducible faults for simulations (``medfed-server simulate --poison`` and ``--fail``).

Only the simulation driver uses this module; a deployed ClientApp never carries these mods.

``--poison``, a poisoned virtual site:

- ``SITE:scale=F``: the site sends its update multiplied by F (it skips its own bound, as a
  compromised site would), before secure aggregation masks it.
- ``SITE:flip-labels``: the site trains on its labels flipped (0 <-> 1) with honest code.

``--fail SITE:ROUND:STAGE``, a virtual site killed in round ROUND (see :data:`STAGES`). A killed
site runs none of its own handlers after the kill point and sends nothing more in that round (the
runtime answers the server with an error, as a deployed SuperLink times a dead SuperNode out); it
comes back for the next round with its in-memory state gone (``context.state`` cleared), its
files (ledger, audit log, keys) as the kill left them.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from client.app import resolve_site
from privacy import egress as K
from privacy.errors import InputError, ServiceError
from privacy.model_arrays import arrays_to_record, record_to_arrays

_POISON = re.compile(r"^(?P<site>[A-Za-z0-9_.\-]+):(?:scale=(?P<scale>[0-9.eE+\-]+)|(?P<flip>flip-labels))$")


class ChaosError(InputError, ValueError):
    """A ``--poison`` or ``--fail`` value is malformed; the message shows the accepted forms."""


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


# Where ``--fail`` kills a site, in the order of a round's messages. ``train``: during local training
# (after the ledger was charged; the update never reaches the mask or the egress guard); ``advertise``,
# ``reveal``, ``share``, ``input``, ``consistency``, ``unmask``: on receipt of that SecAgg+ stage's
# request, before the site does its work (``input``: before training, so nothing is charged; ``reveal``
# exists only for sparse graphs, above 64 sites: with the complete graph the site dies on receipt of
# ``share``); ``reply``: the train reply was built, masked and passed the guard, and is lost on its way out.
STAGES = ("advertise", "reveal", "share", "input", "train", "reply", "consistency", "unmask")
_POSITION = {"advertise": 0, "reveal": 1, "share": 2, "input": 3, "train": 3, "reply": 3, "consistency": 4,
             "unmask": 5, "evaluate": 6}
_FAIL = re.compile(r"^(?P<site>[A-Za-z0-9_.\-]+):(?P<round>[0-9]{1,7}):(?P<stage>[a-z]+)$")
_RESTARTED = "chaos-restarted"  # in context.state: the round after which this site's state was cleared


@dataclass(frozen=True)
class Failure:
    site: str
    round: int
    stage: str


def parse_failure(text: str) -> Failure:
    m = _FAIL.match(text.strip())
    if m is None or m["stage"] not in STAGES or int(m["round"]) < 1:
        raise ChaosError(f"--fail {text!r}: use SITE:ROUND:STAGE with ROUND >= 1 and STAGE one of "
                         f"{', '.join(STAGES)} (e.g. site-2:1:unmask)")
    return Failure(m["site"], int(m["round"]), m["stage"])


class _SiteKilled(BaseException):
    """Unwinds a killed site's ClientApp past its own handlers (a killed process runs none of them;
    the egress guard catches every ``Exception``); :func:`failure_mods`' outer mod turns it into
    :class:`SiteDown`. Control flow, not an error: never leaves this module."""


class SiteDown(ServiceError, RuntimeError):
    """What the simulation runtime reports for a killed virtual site (no patient data: site, round, stage)."""


def _position(msg: Message) -> tuple[int, int] | None:
    """(round, position in the round) of a message, or None when it carries no round."""
    conf = msg.content.config_records.get(K.CONFIG)
    if conf is None or K.SERVER_ROUND not in conf:
        return None
    kind = msg.metadata.message_type.split(".", 1)[0]
    stage = str(conf.get(K.SECAGG_STAGE, "train")) if kind == MessageType.TRAIN else "evaluate"
    return int(conf[K.SERVER_ROUND]), _POSITION.get(stage, _POSITION["evaluate"])


def failure_mods(failures: Sequence[Failure], sim_sites: Sequence[str]) -> tuple[Mod, Mod]:
    """(outermost mod, innermost mod) that kill the named sites where ``failures`` say."""
    by_site: dict[str, list[Failure]] = {}
    for f in failures:
        by_site.setdefault(f.site, []).append(f)

    def resolve(context: Context) -> str:
        return resolve_site(context, sim_sites).name

    def outer(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        mine, where = by_site.get(resolve(context), []), _position(msg)
        if not mine or where is None:
            return call_next(msg, context)
        rnd, pos = where
        _restart_after(context, [f.round for f in mine if f.round < rnd])
        for f in mine:
            if f.round != rnd or pos < _POSITION[f.stage]:
                continue
            if pos > _POSITION[f.stage] or f.stage not in ("train", "reply"):
                raise SiteDown(f"virtual site killed by --fail {f.site}:{f.round}:{f.stage}")
            try:
                call_next(msg, context)  # "reply": the reply is built and lost; "train": killed inside (inner)
            except _SiteKilled:
                pass
            raise SiteDown(f"virtual site killed by --fail {f.site}:{f.round}:{f.stage}")
        return call_next(msg, context)

    def inner(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        where = _position(msg)
        if where is not None and any(f.stage == "train" and (f.round, _POSITION["train"]) == where
                                     for f in by_site.get(resolve(context), [])):
            raise _SiteKilled  # after the handler charged the ledger and trained; before masking and the guard
        return reply

    return outer, inner


def _restart_after(context: Context, killed_rounds: list[int]) -> None:
    """A site killed in an earlier round comes back once with its in-memory state gone."""
    if not killed_rounds:
        return
    last = max(killed_rounds)
    seen = context.state.config_records.get(_RESTARTED)
    if seen is not None and int(seen["round"]) >= last:
        return
    for key in list(context.state.keys()):
        del context.state[key]
    context.state[_RESTARTED] = ConfigRecord({"round": last})
