"""Per-source auto-tag control from spot checks (`workflows.sources.SourceGate`)."""
import json

import numpy as np
import pytest

from featpipe.workflows.sources import SourceGate


def _checks_until_off(gate: SourceGate, source: str, outcomes) -> int | None:
    """How many of `outcomes` (check results, in order) it takes to switch `source` off; None if it never is."""
    for n, correct in enumerate(outcomes, start=1):
        gate.record(source, bool(correct))
        if gate.status(source)["state"] == "off":
            return n
    return None


def test_a_new_source_is_on_probation_and_auto_tagged():
    gate = SourceGate()
    assert gate.allows_auto("shopA") == (True, "")
    assert gate.spot_check_rate("shopA") == 0.2
    status = gate.status("shopA")
    assert status["state"] == "probation" and status["checks"] == 0 and status["precision"] is None
    assert status["lower_bound"] == 0.0 and status["upper_bound"] == 1.0


def test_a_confidently_wrong_source_is_switched_off_within_30_checks():
    # 30% of its auto-tags wrong; every one of 500 such sources is caught within 30 checks
    rng = np.random.default_rng(0)
    for k in range(500):
        gate = SourceGate()
        n = _checks_until_off(gate, "wrong", rng.random(30) >= 0.3)
        assert n is not None and n <= 30, f"source {k} still on after 30 checks"
        allowed, reason = gate.allows_auto("wrong")
        assert not allowed and reason.startswith("source wrong: spot checks ") and "< 0.99" in reason
        assert gate.spot_check_rate("wrong") == 1.0


def test_the_reason_says_what_the_checks_showed():
    gate = SourceGate()
    for correct in [True] * 21 + [False] * 4:  # off at the 23rd check already: 21 of 23
        gate.record("shopA", correct)
    assert gate.allows_auto("shopA") == (False, "source shopA: spot checks 21 of 23 right (upper bound 0.98 < 0.99): "
                                                "its photos go to review until 30 checks clear it again (2 so far)")
    gate = SourceGate()
    for correct in [True] * 4 + [False]:  # one miss in the first five checks is already too many at 0.99
        gate.record("shopB", correct)
    assert gate.allows_auto("shopB")[1].startswith("source shopB: spot checks 4 of 5 right (upper bound 0.9898 < 0.99)")


def test_a_perfect_source_is_never_switched_off_and_gets_certified():
    gate = SourceGate()
    states = []
    for _ in range(400):
        gate.record("perfect", True)
        states.append(gate.status("perfect")["state"])
    assert "off" not in states
    first = states.index("certified") + 1  # the lower bound at alpha 0.05 reaches 0.99 at 299 straight checks
    assert first == 299 and set(states[first - 1:]) == {"certified"}
    assert gate.spot_check_rate("perfect") == 0.02 and gate.status("perfect")["lower_bound"] >= 0.99


def test_probation_checks_is_a_floor_for_certification():
    gate = SourceGate(target_precision=0.8, probation_checks=30)
    for n in range(1, 31):
        gate.record("s", True)
        assert gate.status("s")["state"] == ("certified" if n == 30 else "probation")  # bound alone: 14 checks


def test_a_switched_off_source_comes_back_after_enough_correct_checks():
    gate = SourceGate()
    _checks_until_off(gate, "shopB", [True, True, False])
    assert gate.status("shopB")["state"] == "off"
    for n in range(1, 30):
        gate.record("shopB", True)  # reviews of photos the model would have auto-tagged, all agreeing
        assert gate.status("shopB")["state"] == "off", n
    gate.record("shopB", True)
    assert gate.allows_auto("shopB") == (True, "") and gate.status("shopB")["state"] == "probation"
    assert gate.spot_check_rate("shopB") == 0.2
    status = gate.status("shopB")
    assert (status["checks"], status["all_checks"], status["switch_offs"]) == (30, 33, 1)
    for _ in range(300):
        gate.record("shopB", True)
    assert gate.status("shopB")["state"] == "certified"


def test_a_source_that_is_still_wrong_stays_off():
    gate = SourceGate()
    rng = np.random.default_rng(1)
    _checks_until_off(gate, "bad", rng.random(30) >= 0.3)
    for correct in rng.random(200) >= 0.3:
        gate.record("bad", bool(correct))
    assert gate.status("bad")["state"] == "off"


def test_a_certified_source_that_declines_is_switched_off():
    gate = SourceGate()
    for _ in range(300):
        gate.record("drift", True)
    assert gate.status("drift")["state"] == "certified"
    n = _checks_until_off(gate, "drift", [False] * 50)
    assert n is not None and gate.status("drift")["switch_offs"] == 1


def test_sources_are_independent():
    gate = SourceGate()
    _checks_until_off(gate, "bad", [False])
    gate.record("good", True)
    assert gate.allows_auto("bad")[0] is False and gate.allows_auto("good") == (True, "")
    assert gate.sources() == ["bad", "good"]


def test_the_gate_round_trips_through_json():
    gate = SourceGate(target_precision=0.95, alpha=0.1, probation_rate=0.3, spot_rate=0.05, probation_checks=20)
    _checks_until_off(gate, "bad", [True, False, False])
    for _ in range(40):
        gate.record("good", True)
    again = SourceGate.from_dict(json.loads(json.dumps(gate.to_dict())))
    assert again.to_dict() == gate.to_dict()
    for source in ("bad", "good", "new"):
        assert again.status(source) == gate.status(source)
        assert again.allows_auto(source) == gate.allows_auto(source)
    again.record("bad", True)
    assert again.status("bad")["checks"] == 1


@pytest.mark.parametrize("name, value", [("target_precision", 1.0), ("alpha", 0.0), ("probation_rate", 1.5),
                                         ("spot_rate", -0.1), ("probation_checks", 0), ("probation_checks", 2.5)])
def test_bad_settings_name_the_parameter(name, value):
    with pytest.raises(ValueError, match=f"^{name} "):
        SourceGate(**{name: value})


def test_a_bad_saved_state_names_the_source():
    d = SourceGate().to_dict() | {"sources": {"shopA": {"state": "paused"}}}
    with pytest.raises(ValueError, match="'shopA' has state 'paused'"):
        SourceGate.from_dict(d)
