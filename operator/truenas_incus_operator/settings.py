"""Operator configuration from the environment (prefix ``TIO_``), e.g. set by the Helm chart."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .models import TransportType
from .models.limits import USERNAME_PATTERN


class Settings(BaseSettings):
    """Not kopf's ``OperatorSettings``: this operator's own configuration."""

    model_config = SettingsConfigDict(env_prefix="TIO_", extra="ignore")

    truenas_url: str | None = Field(
        None, description="Default connection: wss://host or https://host. Unset: only TrueNASConnections work."
    )
    truenas_transport: TransportType = Field(TransportType.WEBSOCKET, description="websocket or rest")
    truenas_api_key: SecretStr | None = Field(None, description="Default connection's API key (prefer the file).")
    truenas_api_key_file: Path | None = Field(None, description="File holding the API key (a mounted Secret).")
    truenas_username: str = Field(
        "root",
        pattern=USERNAME_PATTERN,
        description="The default connection's API key owner, which SCRAM login (TrueNAS 26) names.",
    )
    truenas_ca_file: Path | None = Field(None, description="PEM CA bundle that signed TrueNAS's certificate.")
    truenas_insecure_skip_verify: bool = Field(False, description="Skip TLS verification (tests only).")
    truenas_allow_insecure_transport: bool = Field(
        False, description="Allow plain ws:// or http:// to a host other than loopback (the key travels in clear)."
    )
    truenas_max_concurrent_calls: int = Field(
        20, ge=1, le=20, description="Calls in flight at once on the default connection (TrueNAS allows 20)."
    )
    vm_image_server: str | None = Field(
        None,
        description=(
            "Where VM images come from on the default connection (and TrueNASConnections without "
            "spec.vmImageServer): a simplestreams URL or a local mirror (file:// or a directory). "
            "Unset: https://images.linuxcontainers.org. The administrator's choice, so trusted: it may be "
            "internal; tenants may name others only where the policy's vmImageServers allows."
        ),
    )
    scratch_dir: Path | None = Field(
        None,
        description=(
            "Where VM images are downloaded before their upload to TrueNAS (the chart mounts a scratch volume "
            "here); free space for the image is checked first. Unset: the system's temporary directory."
        ),
    )
    vm_image_max_bytes: int = Field(
        64 * 2**30, gt=0, description="Largest VM image the operator downloads (the index's size is checked)."
    )
    vm_base_grace_seconds: float = Field(
        24 * 3600.0,
        gt=0,
        description=(
            "A cached VM base (one per image sha256 on each pool) that no VM clones is deleted after being "
            "unused this long (counted from when the operator first saw it unused; tio_vm_bases_collected)."
        ),
    )
    vm_image_index_max_bytes: int = Field(
        32 * 2**20, gt=0, description="Largest simplestreams index or products file the operator reads."
    )

    ledger_namespace: str = Field(
        default_factory=lambda: _own_namespace(),
        description="Namespace of the ownership ledger (the operator's own; tenants must not write there).",
    )
    credentials_secret: str = Field(
        "truenas-incus-operator-credentials",
        description=(
            "Secret in the ledger's namespace holding a copy of each TrueNASConnection's credentials, so "
            "that a connection being deleted can still delete its instances after its Secret is gone and "
            "the operator restarted (the chart creates it and grants only that name)."
        ),
    )
    policy_file: Path | None = Field(
        None, description="The administrator's policy (policy.py); unset: the default policy."
    )

    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics on this port (/metrics); 0: not served. The chart sets 9090.",
    )
    metrics_address: str = Field("0.0.0.0", description="Address the metrics server listens on.")
    metrics_connection_names: bool = Field(
        False,
        description=(
            "Label TrueNASConnections' metrics with their namespace/name. Default: a pseudonym (tnc-<12 hex>, "
            "logged once per connection), since the metrics endpoint has no authentication."
        ),
    )

    leader_election: bool = Field(
        False,
        description=(
            "Act only while holding a Lease in the ledger namespace (election.py): run two replicas, one acts, "
            "the other waits and takes over when the first stops renewing."
        ),
    )
    lease_name: str = Field("truenas-incus-operator", description="The election's Lease (in the ledger namespace).")
    lease_duration_seconds: float = Field(
        15.0, gt=0, description="How long a standby waits after the last renewal it saw before taking over."
    )
    lease_renew_deadline_seconds: float = Field(
        10.0, gt=0, description="The leader exits when it could not renew for this long (less than the duration)."
    )
    lease_retry_seconds: float = Field(2.0, gt=0, description="How often the leader renews and a standby looks.")
    pod_name: str | None = Field(
        None, description="The holder identity's prefix (the chart sets the pod's name); unset: the host name."
    )

    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: [time] logger [level] [namespace/name] message; json: one JSON object a line "
        "(timestamp, severity, message, object).",
    )
    resync_seconds: float = Field(60.0, gt=0, description="How often each connection re-reads all instances.")
    device_audits_per_resync: int = Field(
        10,
        ge=0,
        description=(
            "Instances per connection whose devices are compared with TrueNAS each resync interval (round robin), "
            "to notice device changes made outside the operator. 0: only on spec changes and restarts."
        ),
    )
    kube_timeout_seconds: float = Field(
        60.0, gt=0, description="Seconds for one of the operator's own Kubernetes API requests (status, ledger, Lease)."
    )
    kube_connections: int = Field(
        8,
        ge=0,
        description=(
            "At most this many of kopf's API requests in flight at once (watch-streams apart), so at most about as "
            "many connections. 0: kopf's own session (no bound)."
        ),
    )
    retry_min_seconds: float = Field(2.0, gt=0, description="First retry delay after a failure.")
    retry_max_seconds: float = Field(300.0, gt=0, description="Longest retry delay (bounded backoff).")
    call_timeout_seconds: float = Field(60.0, gt=0, description="Longest wait for one TrueNAS call's answer.")
    job_timeout_seconds: float = Field(
        15 * 60.0, gt=0, description="Longest wait for one TrueNAS job (create, start, stop, delete) to finish."
    )

    def default_api_key(self) -> str | None:
        if self.truenas_api_key_file is not None:
            return self.truenas_api_key_file.read_text().strip()
        return self.truenas_api_key.get_secret_value() if self.truenas_api_key else None

    def default_ca(self) -> str | None:
        return self.truenas_ca_file.read_text() if self.truenas_ca_file else None


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _own_namespace() -> str:
    """In a pod: the pod's namespace; elsewhere: truenas-incus-operator."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "truenas-incus-operator"
    except OSError:
        return "truenas-incus-operator"
