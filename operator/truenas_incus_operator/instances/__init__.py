"""IncusInstance resources: one reconcile loop per resource, and their deletion.

- ``resource``: the desired state read from the live body, and a loop's memory between passes;
- ``wakeups``: which loop to wake on a watch event (only for changes it acts on);
- ``ledger``: who owns which instance on which TrueNAS (ConfigMaps in the operator's namespace);
- ``loop``: observe -> plan -> act -> report, until the daemon stops;
- ``executor``: one planned action on TrueNAS;
- ``reporter``: status writes, Events (one per distinct problem), backoff;
- ``deletion``: stop and delete the instance when the resource goes (or leave it: Orphan);
- ``holds``: snapshots and restores holding an instance's power state (its loop acts on them);
- ``reaper``: records whose resource vanished unseen (deleted, or released, per its deletionPolicy).
"""

from .deletion import Deletion
from .executor import Executor
from .holds import HOLDERS, Hold, Holds
from .ledger import Ledger
from .loop import InstanceLoops
from .reaper import Reaper
from .reporter import Reporter
from .wakeups import Wakeups

__all__ = [
    "HOLDERS",
    "Deletion",
    "Executor",
    "Hold",
    "Holds",
    "InstanceLoops",
    "Ledger",
    "Reaper",
    "Reporter",
    "Wakeups",
]
