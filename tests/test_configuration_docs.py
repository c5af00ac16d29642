"""Every TIO_* variable is documented (issue 21 item 9): the README's configuration table lists each
setting the operator reads and each variable the chart or the tooling sets, and `run --help` lists
the operator's settings with their defaults."""

from __future__ import annotations

import argparse
import re

from truenas_incus_operator.__main__ import build_parser
from truenas_incus_operator.problems import Reason
from truenas_incus_operator.settings import Settings

from .conftest import ROOT

README = (ROOT / "README.md").read_text()
TOOLING = {"TIO_CONTROLPLANE_BIN", "TIO_CONTROLPLANE_CACHE", "TIO_ARGOCD_HEALTH_BIN", "TIO_ARGOCD_HEALTH_CACHE"}


def settings_variables() -> set[str]:
    return {f"TIO_{name.upper()}" for name in Settings.model_fields}


def configuration_table() -> dict[str, str]:
    section = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(TIO_[A-Z0-9_]+)` \|(.*)$", section, flags=re.M)
    return dict(rows)


def test_the_readme_table_lists_every_variable_and_nothing_else() -> None:
    table = configuration_table()
    chart = set(
        re.findall(r"TIO_[A-Z0-9_]+", (ROOT / "charts/truenas-incus-operator/templates/deployment.yaml").read_text())
    )
    tools = set(re.findall(r"TIO_[A-Z0-9_]+", "".join(p.read_text() for p in (ROOT / "tools").rglob("*.sh"))))
    documented = set(table)
    assert settings_variables() - documented == set()
    assert chart - documented == set(), "every variable the chart sets"
    assert (tools & {v for v in tools if not v.endswith("_")}) - documented == set(), "and the build tools'"
    assert documented - settings_variables() - chart - TOOLING == set(), "no row for a variable nothing reads"


def test_run_help_lists_every_setting_with_its_default() -> None:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    text = commands.choices["run"].format_help()
    for variable in settings_variables():
        assert variable in text, variable
    assert "TIO_RESYNC_SECONDS (default 60.0)" in " ".join(text.split())


def test_every_status_reason_has_a_troubleshooting_entry() -> None:
    """Each reason the README's status table lists: what it means, what to check, the command."""
    table = README.split("## What the status says", 1)[1].split("\n## ", 1)[0]
    reasons: set[str] = set()
    for cells in re.findall(r"^\|\s*(?:[A-Za-z]+=(?:True|False))?\s*\| ([A-Za-z /,]+) \|", table, flags=re.M):
        reasons |= {r.strip() for r in re.split(r"[/,]", cells) if r.strip()}
    assert {"SecretNotFound", "Conflict", "PolicyDenied"} <= reasons, reasons
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    entries = set(re.findall(r"\*\*([A-Za-z]+)\*\*", page))
    ready_reasons = {"Available", "Stopped", "Manual", "Creating", "Starting", "Stopping", "Deleting", "Progressing"}
    ready_reasons |= {"Transitioning", "NotRunning", "NotStopped", "NotSynced", "ReconcileSuccess", "PartiallyApplied"}
    ready_reasons |= {"Connected", "Verified", "Observed", "Observing", "Matches"}
    assert reasons - ready_reasons - entries == set(), "reasons without a troubleshooting entry"


def test_the_status_table_lists_exactly_the_reasons_the_operator_writes() -> None:
    """Issue 22 item 4: the README's table missed reasons the code emits (KubernetesError,
    LedgerUnavailable, ...). Every reason is a ``Reason`` (``fail``, ``Problem`` and ``Blocked``
    take nothing else), and the table lists each once-named reason, and no other."""
    table = README.split("## What the status says", 1)[1].split("\n## ", 1)[0]
    listed: set[str] = set()
    for row in re.findall(r"^\|([^|\n]*)\|([^|\n]+)\|", table, flags=re.M):
        condition, reasons = row[0].strip(), row[1].strip()
        if "=" not in condition and condition != "":
            continue  # the phase table and the headers
        listed |= {r.strip() for r in re.split(r"[/,]", reasons) if r.strip()}
    listed.discard("reason")
    assert listed == {r.value for r in Reason}, (
        f"in the code, not the README: {sorted({r.value for r in Reason} - listed)}; "
        f"in the README, not the code: {sorted(listed - {r.value for r in Reason})}"
    )
