"""Admission and the operator agree on device host paths (issue 19 item 9): ``/mnt/./x`` and
``/mnt//x`` were refused by the chart's admission policy (a plain prefix match) but accepted by
the operator's policy check (which normalises them), so the answer depended on which gate ran."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from truenas_incus_operator.crd import incus_instance_crd
from truenas_incus_operator.models import IncusInstanceSpec
from truenas_incus_operator.policy import Policy, Rule

ODD = ["/mnt/./x", "/mnt//x", "/mnt/x/.", "./mnt/x", "//mnt/x", "/mnt/x//"]
PLAIN = ["/mnt/tank/apps", "/mnt/tank/apps/", "/dev/zvol/tank/vol1", "/mnt/tank/.hidden", "/mnt/tank/..x", "vol1"]
TRAVERSAL = "/mnt/tank/apps/../etc"
"""Admitted by the schema: both policies refuse a ``..`` component, naming their rule."""


def spec(source: str) -> dict[str, object]:
    return {
        "type": "CONTAINER",
        "image": "debian/bookworm",
        "devices": [{"name": "d", "type": "DISK", "source": source, "destination": "/data"}],
    }


def crd_source_pattern() -> str:
    schema = incus_instance_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    pattern: str = schema["properties"]["spec"]["properties"]["devices"]["items"]["properties"]["source"]["pattern"]
    return pattern


@pytest.mark.parametrize("source", ODD)
def test_a_source_with_an_empty_or_dot_component_is_refused_at_admission_and_by_the_model(source: str) -> None:
    assert not re.search(crd_source_pattern(), source), "the CRD (admission) refuses it"
    with pytest.raises(ValidationError, match=r"devices\.0\.source\n  String should match pattern"):
        IncusInstanceSpec.model_validate(spec(source))


@pytest.mark.parametrize("source", PLAIN)
def test_a_plain_source_passes_both(source: str) -> None:
    assert re.search(crd_source_pattern(), source)
    IncusInstanceSpec.model_validate(spec(source))


def test_the_policys_answer_on_a_clean_path_is_the_admission_policys() -> None:
    """What reaches the policy is a clean path: under the prefix or not, by components, as the
    chart's ValidatingAdmissionPolicy decides by ``startsWith(prefix + '/')``."""
    policy = Policy(
        default_connection_namespaces=["*"],
        rules=[Rule(namespaces=["*"], connections=["*"], host_path_prefixes=["/mnt/tank/apps"])],
    )
    cases = (("/mnt/tank/apps/x", True), ("/mnt/tank/apps", True), ("/mnt/tank/appsx", False), (TRAVERSAL, False))
    for source, allowed in cases:
        denied = policy.violations("ns", "<default>", IncusInstanceSpec.model_validate(spec(source)))
        assert (not denied) is allowed, (source, denied)
