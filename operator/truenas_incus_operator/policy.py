"""The administrator's policy: what tenants may do with the NAS through this operator.

It comes from a file only the administrator writes (the chart renders it from its values into a
ConfigMap in the operator's namespace and points ``TIO_POLICY_FILE`` at it), never from anything a
tenant writes. Pure: loading parses a file, evaluating reads nothing.

Connections are named as the operator keys them: ``<default>`` for the operator's own connection,
``namespace/name`` for a TrueNASConnection. Namespace and connection patterns are shell globs.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

DEFAULT_CONNECTION = "<default>"


class _Policy(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Grant(_Policy):
    """Namespaces allowed something on connections."""

    namespaces: list[str] = Field(default_factory=lambda: ["*"], description="Namespace globs.")
    connections: list[str] = Field(default_factory=lambda: ["*"], description="Connection globs.")

    def covers(self, namespace: str, connection: str) -> bool:
        return any(fnmatchcase(namespace, p) for p in self.namespaces) and any(
            fnmatchcase(connection, p) for p in self.connections
        )


class Policy(_Policy):
    default_connection_namespaces: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Namespaces whose IncusInstances may use the operator's default connection (its own key).",
    )
    adoption: list[Grant] = Field(
        default_factory=list,
        description=(
            "Where a resource may take over an instance that exists on TrueNAS and that no resource created "
            "(with the incus.truenas.io/adopt annotation). Empty: nowhere."
        ),
    )

    def may_use_default_connection(self, namespace: str) -> bool:
        return any(fnmatchcase(namespace, p) for p in self.default_connection_namespaces)

    def may_adopt(self, namespace: str, connection: str) -> bool:
        return any(grant.covers(namespace, connection) for grant in self.adoption)


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path`` (YAML), or the default one (no file): every namespace may use the
    default connection, nothing may be adopted. Raises ``ValueError`` naming what is wrong."""
    if path is None:
        return Policy()
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the policy must be a mapping")
    return Policy.model_validate(data)
