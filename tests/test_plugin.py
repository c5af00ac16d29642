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

    async def list_events(self, namespace: str, name: str) -> list[dict[str, Any]]:
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
