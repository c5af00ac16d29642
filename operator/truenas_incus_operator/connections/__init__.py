"""Connections to TrueNAS systems and what each one observes.

- ``config``: a connection's resolved configuration, from the settings or a TrueNASConnection;
- ``cache``: the instances one TrueNAS has, and the loops to wake when one changes;
- ``connection``: one TrueNAS: client, reconnects, one query per resync interval, events;
- ``manager``: connections by key (the default one and one per TrueNASConnection);
- ``resources``: TrueNASConnection resources and the default connection, with their status.
"""

from .cache import InstanceCache
from .config import DEFAULT_KEY, ConnectionConfig, nas_identity, truenas_identity
from .connection import Connection
from .manager import ConnectionManager
from .resources import ConnectionResources

__all__ = [
    "DEFAULT_KEY",
    "Connection",
    "ConnectionConfig",
    "ConnectionManager",
    "ConnectionResources",
    "InstanceCache",
    "nas_identity",
    "truenas_identity",
]
