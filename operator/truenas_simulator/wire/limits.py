"""What the middleware does with a WebSocket message before it reads it, on ``/api/...`` and on the
legacy ``/websocket`` alike: the size limits of ``utils/limits.py`` (``MsgSizeLimit``,
``parse_message``; the same in TS-25.04.2.6, TS-25.10.6 and TS-26.0.0-BETA.3), and the per-socket
``SoftHardSemaphore(10, 20)`` of ``utils/lock.py`` (``RpcWebSocketApp`` in
``api/base/server/ws_handler/rpc.py``, ``WebSocketApplication`` in ``apps/websocket_app.py``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

UNAUTHENTICATED = 8192
"""Largest message (in characters: ``len(msg.data)``) read from a socket that has not logged in."""
AUTHENTICATED = 65536
"""Largest message read once logged in, but for the methods of ``EXTENDED_METHODS``."""
EXTENDED = 2097152
EXTENDED_METHODS = frozenset({"filesystem.file_receive", "failover.datastore.sql"})

# aiohttp's WSCloseCode values the middleware closes with.
INVALID_TEXT = 1007
MESSAGE_TOO_BIG = 1009


class MessageTooBig(Exception):
    """The socket is closed with ``code`` and ``message``; no reply is sent first (``ws.close``)."""

    def __init__(self, limit: int) -> None:
        if limit == UNAUTHENTICATED:  # "This preserves legacy server behavior"
            self.code, self.message = INVALID_TEXT, "Anonymous connection max message length is 8 kB"
        else:
            self.code, self.message = MESSAGE_TOO_BIG, "Max message length is 64 kB"
        super().__init__(self.message)


def parse_message(authenticated: bool, text: str) -> Any:
    """``parse_message``: the size checks, in the middleware's order, around ``json.loads``.

    Raises ``MessageTooBig``, or ``ValueError`` (a ``json.JSONDecodeError`` too) for text that is not
    a JSON object. The 64 KiB check needs the method's name, so it comes after parsing.
    """
    size = len(text)
    if not authenticated and size > UNAUTHENTICATED:
        raise MessageTooBig(UNAUTHENTICATED)
    if size > EXTENDED:
        raise MessageTooBig(EXTENDED)
    message = json.loads(text)
    if isinstance(message, list):
        raise ValueError("Batch messages are not supported at this time")
    if not isinstance(message, dict):
        raise ValueError("Invalid Message Format")
    if message.get("method") in EXTENDED_METHODS:
        return message
    if size > AUTHENTICATED:
        raise MessageTooBig(AUTHENTICATED)
    return message


class TooManyCalls(Exception):
    """The call came when ``hard`` calls were already running or waiting on the socket."""

    def __init__(self, hard: int) -> None:
        super().__init__(hard)
        self.hard = hard


class SoftHardLimit:
    """At most ``soft`` calls run at once; up to ``hard`` in all are admitted (the rest wait their
    turn); one more is refused with ``TooManyCalls`` without waiting (``SoftHardSemaphore``)."""

    def __init__(self, soft: int, hard: int) -> None:
        self.hard = hard
        self.admitted = 0
        self._running = asyncio.Semaphore(soft)

    async def __aenter__(self) -> None:
        if self.admitted >= self.hard:
            raise TooManyCalls(self.hard)
        self.admitted += 1
        try:
            await self._running.acquire()
        except BaseException:
            self.admitted -= 1
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.admitted -= 1
        self._running.release()
