"""``simulate --fail SITE:ROUND:STAGE``: the accepted forms, and the errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.chaos import STAGES, ChaosError, Failure, parse_failure
from server.simulate import SimulationPlan
from tests.conftest import make_workspace


def test_every_stage_parses() -> None:
    assert [parse_failure(f"site-2:3:{s}") for s in STAGES] == [Failure("site-2", 3, s) for s in STAGES]
    assert parse_failure(" site-1:1:unmask ") == Failure("site-1", 1, "unmask")


@pytest.mark.parametrize("bad", ["site-2:1", "site-2:0:train", "site-2:x:train", "site-2:1:evaluate",
                                 "site-2:1:TRAIN", ":1:train", "site 2:1:train"])
def test_malformed_values_name_the_accepted_form(bad: str) -> None:
    with pytest.raises(ChaosError, match="SITE:ROUND:STAGE") as err:
        parse_failure(bad)
    assert "advertise" in str(err.value) and "unmask" in str(err.value)


def test_a_site_not_in_the_simulation_is_refused() -> None:
    with pytest.raises(ValueError, match="--fail names a site that is not in this simulation"):
        SimulationPlan(sites=3, failures=(Failure("site-4", 1, "train"),))
    assert SimulationPlan(sites=3, failures=(Failure("site-3", 1, "train"),)).failures[0].site == "site-3"


def _first_death(stage: str, sequence: list[str], workspace: str) -> str | None:
    """The stage of ``sequence`` (one round's SecAgg+ requests, in order) at which a site killed at
    ``stage`` of round 2 dies, through the real mods and Flower messages; None if it never does."""
    import time

    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from privacy import egress as K
    from server.chaos import SiteDown, failure_mods

    outer, _ = failure_mods([Failure("site-a", 2, stage)], [workspace])
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    for rnd in (1, 2):
        for name in sequence:
            md = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=1,
                          reply_to_message_id="", group_id="", created_at=time.time(), ttl=60.0,
                          message_type=MessageType.TRAIN)
            msg = Message(RecordDict({K.CONFIG: ConfigRecord({K.SERVER_ROUND: rnd, K.SECAGG_STAGE: name})}), metadata=md)
            try:
                outer(msg, context, lambda m, c: Message(RecordDict(), reply_to=m))
            except SiteDown:
                assert rnd == 2, "a kill in round 2 never touches round 1"
                return name
    return None


def test_a_kill_lands_at_its_stage_in_a_sparse_round_and_at_the_next_request_without_a_reveal(
        tmp_path: Path, small_site: Path) -> None:
    ws = str(make_workspace(tmp_path, "site-a", small_site))
    sparse = ["advertise", "reveal", "share", "input", "consistency", "unmask"]
    complete = [s for s in sparse if s != "reveal"]
    for stage in ("advertise", "reveal", "share", "input", "consistency", "unmask"):
        assert _first_death(stage, sparse, ws) == stage  # above 64 sites every stage has its request
    assert _first_death("reveal", complete, ws) == "share"  # the complete graph has no reveal: the next request
    assert _first_death("share", complete, ws) == "share"
