"""Control characters from a server never reach status or Events (issue 19 item 9), with fakes:
TrueNAS's error texts (and the names in them) are hostile input; ANSI escapes, line breaks and
bidirectional overrides in them would rewrite what ``kubectl describe`` shows."""

from __future__ import annotations

import json
from typing import Any

from truenas_incus_operator.instances.resource import LoopState
from truenas_incus_operator.status import MAX_MESSAGE, printable
from truenas_incus_operator.truenas import FieldError, InstanceConfig, ObservedInstance, ValidationFailed

from .fakes import FakeBackend, fake_operator, resource

HOSTILE = "bad image\x1b[2J\x1b[31m\r\nReady: True\u202egnp.exe\x00\x7f\u0085"


class LyingBackend(FakeBackend):
    async def create(self, config: InstanceConfig, on_progress: Any = None) -> ObservedInstance:
        self._log(f"create {config.name}")
        raise ValidationFailed([FieldError("virt_instance_create.image", HOSTILE)])


def no_wake() -> None:
    return None


def has_control(text: str) -> bool:
    return any(ch in text for ch in ("\x1b", "\r", "\n", "\x00", "\x7f", "\u202e", "\u0085"))


async def test_a_servers_control_characters_are_escaped_in_status_and_events() -> None:
    fake = fake_operator(LyingBackend())
    await fake.operator.loops.reconcile_once(resource(), LoopState(status={}), no_wake)
    last = fake.kube.statuses("web01")[-1]
    text = json.dumps(last, ensure_ascii=False)
    assert "bad image" in last["message"]
    assert not has_control(last["message"]), last["message"]
    assert not has_control(text.replace("\\n", "").replace("\\u", "")), "no raw control character anywhere"
    assert "\\x1b[2J" in last["message"], "escaped, so the text stays readable"
    events = [message for _, reason, message in fake.events if "bad image" in message]
    assert events and not any(has_control(message) for message in events), events


def test_printable_leaves_ordinary_text_alone() -> None:
    assert printable("Image 'debian/bookworm' not found: ünïcode ok") == "Image 'debian/bookworm' not found: ünïcode ok"
    assert printable("a\tb\nc\u200bd") == "a\\tb\\nc\\u200bd"


class FloodingBackend(FakeBackend):
    async def create(self, config: InstanceConfig, on_progress: Any = None) -> ObservedInstance:
        self._log(f"create {config.name}")
        raise ValidationFailed([FieldError("virt_instance_create.image", "\U000e0041" * 5000)])


async def test_escaping_never_makes_a_status_string_longer_than_the_crd_allows() -> None:
    """Each format character becomes a 10-character escape: escaped after clipping, 5000 of them gave
    a 40807-character condition message, over the CRD's maxLength, and every status write was refused."""
    fake = fake_operator(FloodingBackend())
    await fake.operator.loops.reconcile_once(resource(), LoopState(status={}), no_wake)
    last = fake.kube.statuses("web01")[-1]
    messages = [last["message"], *(c["message"] for c in last["conditions"])]
    assert "\\U000e0041" in last["message"]
    assert max(len(m) for m in messages) <= MAX_MESSAGE, [len(m) for m in messages]
