"""``simulate --fail SITE:ROUND:STAGE``: the accepted forms, and the errors that name the fix."""

from __future__ import annotations

import pytest

from server.chaos import STAGES, ChaosError, Failure, parse_failure
from server.simulate import SimulationPlan


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
