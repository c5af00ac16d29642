"""``kubectl truenas status`` with a user whose RBAC stops short (no ledger, no snapshots): it says so
and shows the rest; text from the cluster reaches the terminal without control characters."""

from __future__ import annotations

from typing import Any

from truenas_incus_operator.plugin import gather_status, render_status
from truenas_incus_operator.problems import OperatorError, Problem, Reason

FORBIDDEN = OperatorError(Problem(Reason.KUBERNETES_ERROR, "Kubernetes API: 403 Forbidden"))


class UserKube:
    """What a tenant's RBAC lets it read: its IncusInstance and Events, not the operator's ledger."""

    async def read_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        if plural == "truenasconnections":
            raise FORBIDDEN
        return {
            "metadata": {"name": name, "namespace": namespace, "uid": "u1"},
            "spec": {"type": "CONTAINER", "image": "debian/bookworm", "connectionRef": {"name": "nas"}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "reason": "Available"}]},
        }

    async def list_configmaps(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        raise FORBIDDEN

    async def list_objects(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        raise FORBIDDEN

    asked: tuple[str | None, str | None] | None = None

    async def list_events(
        self, namespace: str, name: str, kind: str | None = None, uid: str | None = None
    ) -> list[dict[str, Any]]:
        self.asked = (kind, uid)
        return [{"type": "Warning", "reason": "Spoofed", "message": "\x1b]0;owned\x07 look", "lastTimestamp": "t"}]


async def test_status_says_what_the_users_rbac_does_not_show_and_shows_the_rest() -> None:
    data = await gather_status(UserKube(), "apps", "web", "truenas-incus-operator")
    assert data["ownership"] == {
        "error": "cannot read the ledger in namespace truenas-incus-operator: Kubernetes API: 403 Forbidden"
    }
    assert data["connection"]["error"] == "Kubernetes API: 403 Forbidden"
    assert data["snapshots"]["resources"] == []
    text = render_status(data)
    assert text.startswith("IncusInstance apps/web: Running, Ready=True (Available)")
    assert "cannot read the ledger" in text and "connection:  apps/nas: Kubernetes API: 403 Forbidden" in text
    assert "\x1b" not in text and "\x07" not in text and "?]0;owned? look" in text


async def test_events_are_those_of_this_very_resource() -> None:
    """Not an Event about another kind of the same name, nor about an earlier resource of the name."""
    kube = UserKube()
    await gather_status(kube, "apps", "web", "tio-system")
    assert kube.asked == ("IncusInstance", "u1")


def test_a_users_command_logs_in_with_the_kubeconfig_before_a_service_account(monkeypatch: Any) -> None:
    """As kubectl: inside a pod with a mounted token, the plugin still acts as the kubeconfig's user."""
    import kopf

    from truenas_incus_operator import kube

    monkeypatch.setattr(kopf, "login_with_service_account", lambda settings: "service-account")
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda settings: "kubeconfig")
    assert kube.credentials(prefer_kubeconfig=True) == "kubeconfig"
    assert kube.credentials() == "service-account", "the operator itself: its pod's service account first"
    monkeypatch.setattr(kopf, "login_with_kubeconfig", lambda settings: None)
    assert kube.credentials(prefer_kubeconfig=True) == "service-account"


def test_every_verb_and_option_of_the_plugin_says_what_it_does() -> None:
    import argparse

    from truenas_incus_operator.plugin import build_parser

    parser = build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(verbs.choices) == {"status", "pause", "resume", "snapshot", "restore", "import", "doctor"}
    for verb, sub in verbs.choices.items():
        assert sub.description and len(sub.description) > 30, verb
        for action in sub._actions:
            assert action.help, f"{verb} {action.option_strings or action.dest}"
