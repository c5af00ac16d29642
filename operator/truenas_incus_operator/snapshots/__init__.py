"""IncusInstanceSnapshot and IncusInstanceRestore (docs/snapshots.md).

- ``subject``: the IncusInstance a snapshot or restore names, proven (by the ownership ledger) to own
  its instance; status writes;
- ``taking``: take a snapshot once (crash-safe through the snapshot ledger and the owner property),
  delete it with its resource unless Retain;
- ``restoring``: roll an instance back in place, each step recorded before it is taken;
- ``cloning``: the snapshot an IncusInstance's ``spec.source`` names, proven by the snapshot ledger.

The instance's power is never touched here: a hold (instances/holds.py) asks the instance's own
loop to stop or start it.
"""

from ..instances.holds import HOLDERS
from .cloning import CloneSources
from .restoring import PLURAL as RESTORES
from .restoring import Restorer, restore_holds
from .subject import StatusWriter, Subjects
from .taking import PLURAL as SNAPSHOTS
from .taking import SnapshotTaker, snapshot_holds, snapshot_name

HOLDERS[SNAPSHOTS] = snapshot_holds
HOLDERS[RESTORES] = restore_holds

__all__ = [
    "RESTORES",
    "SNAPSHOTS",
    "CloneSources",
    "Restorer",
    "SnapshotTaker",
    "StatusWriter",
    "Subjects",
    "restore_holds",
    "snapshot_holds",
    "snapshot_name",
]
