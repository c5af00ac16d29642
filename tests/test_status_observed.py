"""status.py and reconcile.py (pure): what was observed stays through outages (issue 21 item 1), the
binding that anchors immutability, and Synced through retries of a failing create (item 3)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from truenas_incus_operator.models import IncusInstanceSpec, InstanceBinding, Phase
from truenas_incus_operator.problems import Problem, Reason
from truenas_incus_operator.reconcile import Desired, Ownership, plan
from truenas_incus_operator.status import as_patch, render_instance
from truenas_incus_operator.truenas.types import InstanceStatus, ObservedImage, ObservedInstance

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
OURS = Ownership(mine=True)
BAD_KEY = Problem(Reason.AUTHENTICATION_FAILED, "TrueNAS refused the API key")


def desired(bound: InstanceBinding | None = None, **spec: Any) -> Desired:
    body = {"type": "CONTAINER", "image": "debian/bookworm", "cpu": "2", "memory": "1Gi", **spec}
    return Desired("ns", "web", 3, IncusInstanceSpec.model_validate(body), uid="u1", ownership=OURS, bound=bound)


RUNNING = ObservedInstance(
    id="web", name="web", type="CONTAINER", status=InstanceStatus.RUNNING, cpu="2", memory=2**30, autostart=True,
    environment={}, addresses=("10.0.0.2",), image=ObservedImage(os="Debian", release="bookworm"),
)  # fmt: skip


def render(want: Desired, observed: ObservedInstance | None, previous: dict[str, Any], **kw: Any) -> dict[str, Any]:
    kw.setdefault("plan", None)
    patch = as_patch(render_instance(want, observed, previous=previous, now=kw.pop("now", T0), **kw))
    return {key: value for key, value in {**previous, **patch}.items() if value is not None}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def running_status() -> dict[str, Any]:
    want = desired()
    return render(want, RUNNING, {}, plan=plan(want, RUNNING))


def test_a_running_instance_records_its_binding() -> None:
    status = running_status()
    assert status["phase"] == "Running" and condition(status, "Ready")["status"] == "True"
    binding = {key: value for key, value in status["binding"].items() if value is not None}
    assert binding == {"name": "web", "type": "CONTAINER", "image": "debian/bookworm"}


def test_an_outage_keeps_what_was_observed_and_says_since_when() -> None:
    before = running_status()
    for problem in (
        BAD_KEY,
        Problem(Reason.UNREACHABLE, "cannot reach wss://nas:443"),
        Problem(Reason.CONNECTING, "..."),
    ):
        status = render(desired(), None, before, problem=problem, connected=False, now=T0 + timedelta(minutes=1))
        assert status["phase"] == "Unknown", problem
        for key in ("instanceId", "binding", "cpu", "memory", "autostart", "ipAddresses", "image"):
            assert status[key] == before[key], (problem, key)
        ready = condition(status, "Ready")
        assert (ready["status"], ready["reason"]) == ("Unknown", "NotObserved")
        assert "does not exist" not in ready["message"] and problem.reason in ready["message"]
        assert "since 2026-11-30T12:01:00Z" in ready["message"]
        assert condition(status, "Synced")["reason"] == problem.reason
    # Still out a minute later: the same "since", the same transition time (nothing new to write).
    first = render(desired(), None, before, problem=BAD_KEY, connected=False, now=T0 + timedelta(minutes=1))
    later = render(desired(), None, first, problem=BAD_KEY, connected=False, now=T0 + timedelta(minutes=2))
    assert condition(later, "Ready") == condition(first, "Ready")


def test_a_resource_never_observed_is_pending_not_missing_while_truenas_cannot_be_asked() -> None:
    status = render(desired(), None, {}, problem=BAD_KEY, connected=False)
    assert status["phase"] == "Pending" and "binding" not in status and "instanceId" not in status
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NotObserved")
    assert "does not exist" not in ready["message"]


def test_only_truenas_saying_the_instance_is_gone_removes_the_binding() -> None:
    before = running_status()
    want = desired(bound=InstanceBinding.model_validate(before["binding"]))
    status = render(want, None, before, plan=plan(want, None))
    assert "binding" not in status and "instanceId" not in status
    assert condition(status, "Ready")["reason"] == "NotFound"


def test_the_binding_is_set_when_the_create_starts_and_kept_after() -> None:
    status = render(desired(), None, {}, activity=Phase.CREATING)
    assert status["phase"] == "Creating" and status["binding"]["image"] == "debian/bookworm"
    # Set once: a later spec (admission bypassed or raced) does not rewrite it.
    changed = desired(bound=InstanceBinding.model_validate(status["binding"]), image="ubuntu/noble")
    again = render(changed, RUNNING, status, plan=plan(changed, RUNNING))
    assert again["binding"]["image"] == "debian/bookworm"


def test_a_spec_the_instance_cannot_follow_is_never_ready() -> None:
    before = running_status()
    bound = InstanceBinding.model_validate(before["binding"])
    for spec in ({"image": "ubuntu/noble"}, {"storagePool": "fast"}, {"type": "VM"}):
        want = desired(bound=bound, **spec)
        result = plan(want, RUNNING)
        assert result.actions == () and result.blocked is not None, spec
        assert result.blocked.reason == "ImmutableFieldChanged" and "debian/bookworm" in result.blocked.message + (
            "" if "image" in spec else "debian/bookworm"
        )
        status = render(want, RUNNING, before, plan=result)
        assert condition(status, "Ready")["status"] == "False", spec
        assert condition(status, "Synced")["reason"] == "ImmutableFieldChanged"
        assert status["binding"] == before["binding"] and status["instanceId"] == "web"
    # A renamed spec names another instance: the bound one is not reported gone, nothing is created.
    renamed = desired(bound=bound, name="other")
    result = plan(renamed, None)
    assert result.actions == () and result.blocked is not None and result.blocked.reason == "ImmutableFieldChanged"
    assert render(renamed, None, before, plan=result)["binding"] == before["binding"]


def test_synced_stays_false_through_a_retried_create() -> None:
    want = desired()
    refused = Problem(Reason.IMAGE_NOT_FOUND, "image debian/nope not found")
    failed = render(want, None, {}, problem=refused)
    assert failed["phase"] == "Error"
    since = condition(failed, "Synced")["lastTransitionTime"]
    for attempt in range(1, 4):
        now = T0 + timedelta(seconds=10 * attempt)
        retry = render(want, None, failed, activity=Phase.CREATING, now=now)
        synced = condition(retry, "Synced")
        assert (synced["status"], synced["reason"]) == ("False", "ImageNotFound"), attempt
        assert synced["lastTransitionTime"] == since
        failed = render(want, None, retry, problem=refused, now=now)
        assert condition(failed, "Synced")["lastTransitionTime"] == since
    # Success is the first transition.
    done = render(want, RUNNING, failed, plan=plan(replace(want, bound=None), RUNNING), now=T0 + timedelta(minutes=5))
    synced = condition(done, "Synced")
    assert synced["status"] == "True" and synced["lastTransitionTime"] != since


def test_a_failed_delete_keeps_what_was_observed() -> None:
    before = running_status()
    want = replace(desired(), deleting=True)
    failed = Problem(Reason.DELETE_FAILED, "CallFailed: Simulated failure of virt.instance.delete")
    status = render(want, None, before, problem=failed, connected=False)
    assert status["phase"] == "Deleting" and status["instanceId"] == "web" and status["binding"] == before["binding"]
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Deleting") and "does not exist" not in ready["message"]
    assert condition(status, "Synced")["reason"] == "DeleteFailed"
