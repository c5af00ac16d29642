"""The policy's snapshot rules (issue 24 item 5): who may snapshot, restore and clone, the cap per
instance, and the shortest schedule, with the cron edge cases; pure, without a cluster."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from croniter import croniter

from truenas_incus_operator.policy import (
    DEFAULT_CONNECTION,
    SCHEDULE_WINDOW,
    Policy,
    PolicyError,
    ScheduleError,
    SnapshotRule,
    SnapshotVerb,
    Violation,
    load_policy,
    shortest_interval,
)

NS = "team-a"
TNC = f"{NS}/nas"
VERBS: list[SnapshotVerb] = ["snapshot", "restore", "clone"]
FIELDS = {"snapshot": "kind IncusInstanceSnapshot", "restore": "kind IncusInstanceRestore"}
FIELDS["clone"] = "spec.source.snapshotRef"


def policy(**snapshots: Any) -> Policy:
    """One rule for team-* on every connection, with these snapshot fields."""
    return Policy.model_validate({"rules": [{"namespaces": ["team-*"], "snapshots": snapshots}]})


# ----- defaults: the homelab needs no policy ------------------------------------------------------------------
@pytest.mark.parametrize("connection", [DEFAULT_CONNECTION, TNC, "other/nas"])
@pytest.mark.parametrize("namespace", ["default", NS, "kube-system"])
def test_the_default_policy_allows_everything(namespace: str, connection: str) -> None:
    for built_in in (Policy(), load_policy(None)):
        for verb in VERBS:
            assert built_in.snapshot_violation(namespace, connection, verb) is None
        assert built_in.snapshot_cap(namespace, connection) == ("policy.defaultRule.snapshots.maxPerInstance", None)
        assert built_in.schedule_violation(namespace, connection, "* * * * *") is None


def test_a_rule_without_snapshots_is_open_even_under_a_closed_default_rule() -> None:
    """As every other field: left out takes the built-in default, not the defaultRule's."""
    closed = {"snapshot": False, "restore": False, "clone": False, "maxPerInstance": 0, "minScheduleMinutes": 1440}
    layered = Policy.model_validate({"rules": [{"namespaces": ["team-*"]}], "defaultRule": {"snapshots": closed}})
    for verb in VERBS:
        assert layered.snapshot_violation(NS, TNC, verb) is None
        assert layered.snapshot_violation("other", "other/nas", verb) is not None
    assert layered.snapshot_cap(NS, TNC) == ("policy.rules[0].snapshots.maxPerInstance", None)
    assert layered.snapshot_cap("other", TNC) == ("policy.defaultRule.snapshots.maxPerInstance", 0)
    assert layered.schedule_violation(NS, TNC, "*/5 * * * *") is None


def test_snapshots_left_out_or_null_is_the_open_rule() -> None:
    assert Policy.model_validate({"defaultRule": {"snapshots": None}}) == Policy()
    assert Policy.model_validate({"defaultRule": {"snapshots": {}}}) == Policy()
    assert Policy().default_rule.snapshots == SnapshotRule(
        snapshot=True, restore=True, clone=True, max_per_instance=None, min_schedule_minutes=None
    )


# ----- each rule ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_is_refused_alone_naming_the_rule(verb: SnapshotVerb) -> None:
    refusing = policy(**{verb: False})
    found = refusing.snapshot_violation(NS, TNC, verb)
    assert found is not None
    assert (found.rule, found.field) == (f"policy.rules[0].snapshots.{verb}", FIELDS[verb])
    assert NS in found.message and TNC in found.message
    assert str(found).startswith(f"policy.rules[0].snapshots.{verb}: {FIELDS[verb]}: namespace {NS} may not ")
    for other in VERBS:
        if other != verb:
            assert refusing.snapshot_violation(NS, TNC, other) is None
    # Outside the rule's namespaces, the (open) defaultRule applies.
    assert refusing.snapshot_violation("other", TNC, verb) is None


@pytest.mark.parametrize(
    "verb,words",
    [
        ("snapshot", "may not take snapshots (IncusInstanceSnapshot) on connection team-a/nas"),
        ("restore", "may not roll instances back to a snapshot (IncusInstanceRestore) on connection team-a/nas"),
        ("clone", "may not create instances from a snapshot (spec.source.snapshotRef) on connection team-a/nas"),
    ],
)
def test_the_message_says_what_is_refused(verb: SnapshotVerb, words: str) -> None:
    found = policy(**{verb: False}).snapshot_violation(NS, TNC, verb)
    assert found == Violation(f"policy.rules[0].snapshots.{verb}", FIELDS[verb], f"namespace {NS} {words}")


@pytest.mark.parametrize("cap", [0, 1, 50])
def test_the_cap_per_instance_and_its_rule(cap: int) -> None:
    capped = policy(maxPerInstance=cap)
    assert capped.snapshot_cap(NS, DEFAULT_CONNECTION) == ("policy.rules[0].snapshots.maxPerInstance", cap)
    assert capped.snapshot_cap("other", DEFAULT_CONNECTION) == ("policy.defaultRule.snapshots.maxPerInstance", None)
    assert capped.snapshot_violation(NS, DEFAULT_CONNECTION, "snapshot") is None, "a cap is not a refusal"


def test_the_shortest_schedule_is_refused_below_and_allowed_at_the_minimum() -> None:
    hourly = policy(minScheduleMinutes=60)
    assert hourly.schedule_violation(NS, TNC, "0 * * * *") is None
    assert hourly.schedule_violation(NS, TNC, "@hourly") is None
    assert hourly.schedule_violation(NS, TNC, "0 0,1 * * *") is None, "exactly 60 minutes apart"
    found = hourly.schedule_violation(NS, TNC, "0,59 * * * *")
    assert found == Violation(
        "policy.rules[0].snapshots.minScheduleMinutes",
        "spec.snapshots.schedule",
        "'0,59 * * * *' snapshots as little as 1 minute apart (allowed: at least 60 minutes)",
    )
    # Outside the rule, any schedule.
    assert hourly.schedule_violation("other", TNC, "* * * * *") is None


def test_an_irregular_schedule_is_judged_by_its_shortest_gap() -> None:
    quarter = policy(minScheduleMinutes=5)
    assert quarter.schedule_violation(NS, TNC, "*/5 * * * *") is None
    found = quarter.schedule_violation(NS, TNC, "*/7 * * * *")  # 56 past, then on the hour: 4 minutes
    assert found is not None and "as little as 4 minutes apart" in found.message
    daily = policy(minScheduleMinutes=24 * 60)
    assert daily.schedule_violation(NS, TNC, "0 0 * * *") is None
    found = daily.schedule_violation(NS, TNC, "0 1,23 * * *")
    assert found is not None and "as little as 120 minutes apart" in found.message, "23:00 to 01:00"
    weekly = policy(minScheduleMinutes=7 * 24 * 60)
    found = weekly.schedule_violation(NS, TNC, "0 0 1,31 * *")  # the 31st, then the 1st
    assert found is not None and "as little as 1440 minutes apart" in found.message


def test_a_schedule_where_snapshots_are_refused() -> None:
    """A schedule takes snapshots: it is refused where the rule forbids them, whatever the schedule."""
    found = policy(snapshot=False, minScheduleMinutes=1).schedule_violation(NS, TNC, "@daily")
    assert found is not None
    assert (found.rule, found.field) == ("policy.rules[0].snapshots.snapshot", "spec.snapshots")
    assert found.message == f"namespace {NS} may not take snapshots on connection {TNC} (a schedule takes them)"
    # Restores and clones forbidden do not touch schedules.
    assert policy(restore=False, clone=False).schedule_violation(NS, TNC, "@daily") is None


@pytest.mark.parametrize("schedule", ["", "   ", "every hour", "* * * *", "* * * * * *", "60 * * * *", "R * * * *"])
def test_an_unparsable_schedule_is_refused_with_or_without_a_minimum(schedule: str) -> None:
    with_minimum = policy(minScheduleMinutes=60).schedule_violation(NS, TNC, schedule)
    assert with_minimum is not None
    assert (with_minimum.rule, with_minimum.field) == (
        "policy.rules[0].snapshots.minScheduleMinutes",
        "spec.snapshots.schedule",
    )
    assert with_minimum.message.startswith(f"{schedule!r} is not a 5-field cron schedule (minute hour ")
    without = Policy().schedule_violation(NS, TNC, schedule)
    assert without is not None
    assert (without.rule, without.field) == ("policy.defaultRule.snapshots", "spec.snapshots.schedule")


def test_a_schedule_that_never_fires_is_refused() -> None:
    found = Policy().schedule_violation(NS, TNC, "0 0 30 2 *")
    assert found == Violation(
        "policy.defaultRule.snapshots", "spec.snapshots.schedule", "'0 0 30 2 *' never fires (no such day)"
    )


# ----- which rule applies -------------------------------------------------------------------------------------
LAYERED = Policy.model_validate(
    {
        "rules": [
            {"namespaces": ["lab"], "connections": ["<default>"], "snapshots": {"restore": False}},
            {"namespaces": ["team-*"], "connections": ["team-*/*"], "snapshots": {"maxPerInstance": 5}},
            {"namespaces": ["*"], "connections": ["<default>"], "snapshots": {"snapshot": False, "clone": False}},
        ],
        "defaultRule": {"snapshots": {"snapshot": False, "restore": False, "clone": False, "minScheduleMinutes": 60}},
    }
)


@pytest.mark.parametrize(
    "namespace,connection,label,allowed,cap",
    [
        ("lab", DEFAULT_CONNECTION, "policy.rules[0]", {"snapshot", "clone"}, None),
        ("lab", "lab/nas", "policy.defaultRule", set(), None),
        ("team-a", "team-a/nas", "policy.rules[1]", {"snapshot", "restore", "clone"}, 5),
        ("team-a", DEFAULT_CONNECTION, "policy.rules[2]", {"restore"}, None),
        ("other", DEFAULT_CONNECTION, "policy.rules[2]", {"restore"}, None),
        ("other", "other/nas", "policy.defaultRule", set(), None),
    ],
)
def test_the_first_matching_rule_decides(
    namespace: str, connection: str, label: str, allowed: set[str], cap: int | None
) -> None:
    for verb in VERBS:
        found = LAYERED.snapshot_violation(namespace, connection, verb)
        assert (found is None) is (verb in allowed), verb
        if found is not None:
            assert found.rule == f"{label}.snapshots.{verb}"
    assert LAYERED.snapshot_cap(namespace, connection) == (f"{label}.snapshots.maxPerInstance", cap)


def test_the_first_matching_rule_decides_schedules() -> None:
    assert LAYERED.schedule_violation("team-a", "team-a/nas", "* * * * *") is None
    refused = LAYERED.schedule_violation("team-a", DEFAULT_CONNECTION, "@daily")
    assert refused is not None and refused.rule == "policy.rules[2].snapshots.snapshot"
    assert LAYERED.schedule_violation("lab", DEFAULT_CONNECTION, "* * * * *") is None


# ----- the policy file ----------------------------------------------------------------------------------------
def test_a_policy_file_in_camel_case(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n"
        "  - namespaces: [team-*]\n"
        "    snapshots: {snapshot: true, restore: false, clone: false, maxPerInstance: 10, minScheduleMinutes: 60}\n"
        "defaultRule:\n"
        "  snapshots: {snapshot: false}\n"
    )
    loaded = load_policy(path)
    assert loaded.rules[0].snapshots == SnapshotRule(
        snapshot=True, restore=False, clone=False, max_per_instance=10, min_schedule_minutes=60
    )
    assert loaded.default_rule.snapshots == SnapshotRule(snapshot=False)


@pytest.mark.parametrize(
    "snapshots,where",
    [
        ("{maxPerInstance: -1}", "rules.0.snapshots.maxPerInstance"),
        ("{minScheduleMinutes: 0}", "rules.0.snapshots.minScheduleMinutes"),
        ("{restore: maybe}", "rules.0.snapshots.restore"),
        ("{delete: false}", "rules.0.snapshots.delete"),
        ("[snapshot]", "rules.0.snapshots"),
    ],
)
def test_a_bad_snapshot_rule_stops_the_operator(tmp_path: Path, snapshots: str, where: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"rules: [{{namespaces: [x], snapshots: {snapshots}}}]")
    with pytest.raises(PolicyError, match=where.replace(".", r"\.")):
        load_policy(path)


# ----- shortest_interval: the cron edge cases -----------------------------------------------------------------
MINUTE, HOUR, DAY = 1, 60, 24 * 60
INTERVALS = [
    ("* * * * *", MINUTE),
    ("*/5 * * * *", 5 * MINUTE),
    ("*/7 * * * *", 4 * MINUTE),  # ..., 49, 56, then 0 of the next hour
    ("5/15 * * * *", 15 * MINUTE),
    ("0,59 * * * *", MINUTE),
    ("0 * * * *", HOUR),
    ("0 0,1 * * *", HOUR),
    ("0 22,2 * * *", 4 * HOUR),  # 22:00 to 02:00 the next day
    ("30 23 * * *", DAY),
    ("0 1,23 * * *", 2 * HOUR),
    ("0 */5 * * *", 4 * HOUR),  # 20:00, then 00:00
    ("0 22-2/2 * * *", 2 * HOUR),  # a range through midnight (croniter's, as TrueNAS's): 22, 0, 2
    ("0 9-17 * * 1-5", HOUR),
    ("0 18 * * 1-5", DAY),  # Monday to Friday; the weekend gap is longer
    ("0 0 * * 0,6", DAY),  # Saturday then Sunday
    ("0 0 * * 1,3,5", 2 * DAY),
    ("0 0 * * MON", 7 * DAY),
    ("0 0 ? * mon", 7 * DAY),
    ("0 0 1 * *", 28 * DAY),  # February
    ("0 0 31 * *", 31 * DAY),  # July to August
    ("0 0 1,31 * *", DAY),  # the 31st, then the 1st
    ("0 0 L * *", 28 * DAY),  # the last day of February, then of March
    ("0 0 * * 5#3", 28 * DAY),  # the third Friday
    ("0 0 13 * 5", DAY),  # the 13th or a Friday (cron or-s the two): Friday the 12th, then the 13th
    ("0 0 29 2 *", 4 * 365 * DAY + DAY),  # leap days
    ("0 0 28,29 2 *", DAY),
    ("0 0 1,29 2,3 *", DAY),  # only in a leap year: 29 February, then 1 March
    ("0 0 1 1,7 *", 181 * DAY),  # January to July in a common year
    ("0 0 1 JAN *", 365 * DAY),
    ("@hourly", HOUR),
    ("@daily", DAY),
    ("@midnight", DAY),
    ("@weekly", 7 * DAY),
    ("@monthly", 28 * DAY),
    ("@yearly", 365 * DAY),
    ("@annually", 365 * DAY),
    ("  0   */6  * * * ", 6 * HOUR),
]


@pytest.mark.parametrize("schedule,minutes", INTERVALS, ids=[s for s, _ in INTERVALS])
def test_shortest_interval(schedule: str, minutes: int) -> None:
    assert shortest_interval(schedule) == timedelta(minutes=minutes)


def brute_force(schedule: str, firings: int = 3_000) -> timedelta:
    """The shortest gap croniter gives iterating the whole schedule, for the first ``firings`` firings
    or over the whole window, whichever ends first."""
    cron = croniter(schedule.strip(), SCHEDULE_WINDOW[0] - timedelta(minutes=1))
    previous: datetime = cron.get_next(datetime)
    shortest: timedelta | None = None
    for _ in range(firings):
        firing: datetime = cron.get_next(datetime)
        shortest = firing - previous if shortest is None else min(shortest, firing - previous)
        if firing > SCHEDULE_WINDOW[1]:
            break
        previous = firing
    assert shortest is not None
    return shortest


@pytest.mark.parametrize("schedule,minutes", INTERVALS, ids=[s for s, _ in INTERVALS])
def test_shortest_interval_agrees_with_iterating_the_whole_schedule(schedule: str, minutes: int) -> None:
    assert shortest_interval(schedule) == brute_force(schedule)


@pytest.mark.parametrize(
    "schedule,why",
    [
        ("", "is not a 5-field cron schedule"),
        ("hourly", "Exactly 5, 6 or 7 columns"),
        ("@reboot", "Exactly 5, 6 or 7 columns"),
        ("@every 5m", "is not a 5-field cron schedule"),
        ("* * * *", "Exactly 5, 6 or 7 columns"),
        ("0 * * * * 30", "it has 6 fields (no seconds or years)"),
        ("0 0 1 1 * 0 2030", "it has 7 fields (no seconds or years)"),
        ("60 * * * *", "out of range"),
        ("* 24 * * *", "out of range"),
        ("* * 32 * *", "out of range"),
        ("* * * 13 *", "out of range"),
        ("* * * * 8", "out of range"),
        ("*/0 * * * *", "is not a 5-field cron schedule"),
        ("? * * * *", "Question mark"),
        ("0 0 * * FOO", "is not a 5-field cron schedule"),
        ("R * * * *", "random (R) and hashed (H) fields"),
        ("0 R * * *", "random (R) and hashed (H) fields"),
        ("H * * * *", "hash_id"),
        ("0 0 30 2 *", "never fires (no such day)"),
        ("0 0 31 4,6,9,11 *", "never fires (no such day)"),
        ("0 " * 200, "is not a 5-field cron schedule"),
    ],
)
def test_what_is_not_a_schedule(schedule: str, why: str) -> None:
    with pytest.raises(ScheduleError) as raised:
        shortest_interval(schedule)
    assert why in str(raised.value), raised.value


def test_shortest_interval_is_quick_and_cached() -> None:
    """Controllers ask on every pass: each schedule is computed once."""
    shortest_interval.cache_clear()
    for _ in range(100):
        shortest_interval("0 0 * * 1,3,5")  # the slowest kind: firing days never next to each other
    info = shortest_interval.cache_info()
    assert (info.misses, info.hits) == (1, 99)
