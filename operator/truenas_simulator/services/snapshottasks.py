"""Periodic snapshot tasks, ``pool.snapshottask.*`` (plugins/snapshot.py, every version here), run on
the simulator's clock: ``advance(seconds)`` moves it on and fires every task whose cron schedule
came due meanwhile, as zettarepl would, then applies the tasks' retention.

What a task does (zettarepl's periodic snapshot task, as TrueNAS configures it): at each time its
``schedule`` matches (minute, hour, dom, month, dow as cron, croniter's evaluation as TrueNAS's
``croniter_for_schedule``; only between ``begin`` and ``end``), it snapshots ``dataset`` (with its
descendants when ``recursive``, less ``exclude``) under ``naming_schema`` formatted with that time
(UTC here; TrueNAS uses the NAS's time zone); snapshots that its naming schema parses and that are
older than ``lifetime_value`` ``lifetime_unit`` are destroyed, only those (never another task's or a
hand-made one), and never one with clones or holds.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from croniter import croniter

from ..context import CallContext, Handler
from ..errors import CallError, InstanceNotFound, ValidationErrors
from ..filters import check_query_args, filter_list
from .base import Methods, Service

if TYPE_CHECKING:
    from .storage import StorageService

LIFETIMES = {"HOUR": 3600, "DAY": 86400, "WEEK": 7 * 86400, "MONTH": 30 * 86400, "YEAR": 365 * 86400}
"""zettarepl's lifetimes in seconds (a month as 30 days, a year as 365 [INF])."""
SCHEDULE_DEFAULTS = {
    "minute": "00",
    "hour": "*",
    "dom": "*",
    "month": "*",
    "dow": "*",
    "begin": "00:00",
    "end": "23:59",
}
"""PoolSnapshotTaskCron's defaults (api/v25_10_0/pool_snapshottask.py)."""
CRON_FIELDS = ("minute", "hour", "dom", "month", "dow")
TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


def naming_schema_problem(schema: Any) -> str | None:
    """zettarepl's validate_snapshot_naming_schema: the five placeholders must be there."""
    if not isinstance(schema, str) or not schema:
        return "Field required"
    for placeholder in ("%Y", "%m", "%d", "%H", "%M"):
        if not re.search(f"(^|[^%]){placeholder}", schema):
            return f"{placeholder} must be present in snapshot naming schema"
    return None


def cron_for(schedule: dict[str, str], start: datetime) -> croniter:
    """utils/cron.py croniter_for_schedule: the five fields joined; ``/`` only after ``*`` or a range."""
    expression = []
    for name in CRON_FIELDS:
        value = str(schedule.get(name) or "*")
        if "/" in value and not re.match(r"^(\*|[0-9]+-[0-9]+)/([0-9]+)$", value):
            raise ValueError("Only range or `*` are allowed before `/`")
        expression.append(value)
    return croniter(" ".join(expression), start)


@dataclass
class Task:
    id: int
    dataset: str
    recursive: bool = False
    lifetime_value: int = 2
    lifetime_unit: str = "WEEK"
    enabled: bool = True
    exclude: list[str] = field(default_factory=list)
    naming_schema: str = "auto-%Y-%m-%d_%H-%M"
    allow_empty: bool = True
    schedule: dict[str, str] = field(default_factory=lambda: dict(SCHEDULE_DEFAULTS))
    state: dict[str, Any] = field(default_factory=lambda: {"state": "PENDING"})

    def entry(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "dataset": self.dataset,
            "recursive": self.recursive,
            "lifetime_value": self.lifetime_value,
            "lifetime_unit": self.lifetime_unit,
            "enabled": self.enabled,
            "exclude": list(self.exclude),
            "naming_schema": self.naming_schema,
            "allow_empty": self.allow_empty,
            "schedule": dict(self.schedule),
            "vmware_sync": False,
            "state": dict(self.state),
        }


class SnapshotTaskService(Service):
    FIELDS = ("dataset", "recursive", "lifetime_value", "lifetime_unit", "enabled", "exclude", "naming_schema")
    FIELDS_ALL = (*FIELDS, "allow_empty", "schedule")

    def __init__(self, storage: StorageService) -> None:
        super().__init__(storage.mw)
        self.storage = storage
        self.tasks: dict[int, Task] = {}
        self.next_id = 1
        self.now = storage.clock()
        """The simulator's time for tasks: ``advance`` moves it (and the snapshots' creation times)."""

    def methods(self) -> Methods:
        plain: dict[str, Handler] = {
            "pool.snapshottask.query": self.query,
            "pool.snapshottask.get_instance": self.get_instance,
            "pool.snapshottask.create": self.create,
            "pool.snapshottask.update": self.update,
            "pool.snapshottask.delete": self.delete,
            "pool.snapshottask.run": self.run,
        }
        return {name: (handler, False) for name, handler in plain.items()}

    # ----- CRUD ------------------------------------------------------------------------------------
    def _get(self, ident: Any) -> Task:
        found = self.tasks.get(ident) if isinstance(ident, int) and not isinstance(ident, bool) else None
        if found is None:
            raise InstanceNotFound("Periodic Snapshot Task", ident)
        return found

    def query(self, ctx: CallContext, params: list[Any]) -> Any:
        filters, options = check_query_args(params, ctx.schema)
        return filter_list([t.entry() for t in self.tasks.values()], filters, options)

    def get_instance(self, ctx: CallContext, params: list[Any]) -> Any:
        return self._get(params[0] if params else None).entry()

    def _validated(self, data: dict[str, Any], schema: str) -> dict[str, Any]:
        """The model's checks (api/v*/pool_snapshottask.py) and plugins/snapshot.py ``_validate``."""
        errors = ValidationErrors()
        unknown = sorted(set(data) - set(self.FIELDS_ALL) - {"fixate_removal_date"})
        for key in unknown:
            errors.add(f"{schema}.{key}", "Extra inputs are not permitted")
        if data.get("lifetime_unit", "WEEK") not in LIFETIMES:
            errors.add(f"{schema}.lifetime_unit", "Input should be 'HOUR', 'DAY', 'WEEK', 'MONTH' or 'YEAR'")
        problem = naming_schema_problem(data.get("naming_schema", "auto-%Y-%m-%d_%H-%M"))
        if problem:
            errors.add(f"{schema}.naming_schema", problem)
        schedule = {**SCHEDULE_DEFAULTS, **(data.get("schedule") or {})}
        for key in ("begin", "end"):
            if not TIME.match(str(schedule[key])):
                errors.add(f"{schema}.schedule.{key}", "Time should be in 24 hour format like '18:00'")
        try:
            cron_for(schedule, datetime.now(UTC))
        except (ValueError, KeyError) as exc:
            errors.add(f"{schema}.schedule", f"Please ensure fields match cron syntax - {exc}")
        errors.check()
        dataset = str(data.get("dataset") or "")
        # pool.filesystem_choices: 25.x leaves internal datasets (.ix-virt ...) out, 26 lists every one
        hidden = self.storage.internal(dataset) and not self.mw.profile.pylibvirt
        if dataset not in self.storage.datasets or hidden:
            errors.add(f"{schema}.dataset", "Dataset not found")
        exclude = list(data.get("exclude") or [])
        if exclude and not data.get("recursive"):
            errors.add(
                f"{schema}.exclude", "Excluding datasets is not necessary for non-recursive periodic snapshot tasks"
            )
        for index, value in enumerate(exclude):
            if not str(value).startswith(f"{dataset}/"):
                errors.add(
                    f"{schema}.exclude.{index}",
                    "Excluded dataset should be a child or other descendant of the selected dataset",
                )
        errors.check()
        return {**data, "schedule": schedule}

    def create(self, ctx: CallContext, params: list[Any]) -> Any:
        data = params[0] if params and isinstance(params[0], dict) else {}
        checked = self._validated(data, "periodic_snapshot_create")
        task = Task(self.next_id, **{k: v for k, v in checked.items() if k in self.FIELDS_ALL})
        self.next_id += 1
        self.tasks[task.id] = task
        return task.entry()

    def update(self, ctx: CallContext, params: list[Any]) -> Any:
        task = self._get(params[0] if params else None)
        data = params[1] if len(params) > 1 and isinstance(params[1], dict) else {}
        merged = {**{k: v for k, v in task.entry().items() if k in self.FIELDS_ALL}, **data}
        merged["schedule"] = {**task.schedule, **(data.get("schedule") or {})}
        checked = self._validated(merged, "periodic_snapshot_update")
        for key in self.FIELDS_ALL:
            setattr(task, key, checked[key])
        return task.entry()

    def delete(self, ctx: CallContext, params: list[Any]) -> Any:
        task = self._get(params[0] if params else None)
        del self.tasks[task.id]
        return True  # datastore.delete's answer

    def run(self, ctx: CallContext, params: list[Any]) -> Any:
        task = self._get(params[0] if params else None)
        if not task.enabled:
            raise CallError("Task is not enabled", errno.EFAULT)
        self._fire(task, datetime.fromtimestamp(self.now, UTC))
        return None

    # ----- the clock ------------------------------------------------------------------------------
    def advance(self, seconds: float) -> list[str]:
        """Moves the clock on by ``seconds``; fires each enabled task at every time its schedule came
        due (within its begin..end window), then retention. Returns the snapshots taken."""
        start, end = self.now, self.now + seconds
        taken: list[str] = []
        due: list[tuple[datetime, Task]] = []
        for task in self.tasks.values():
            if not task.enabled:
                continue
            times = cron_for(task.schedule, datetime.fromtimestamp(start, UTC))
            while (when := times.get_next(datetime)).timestamp() <= end:
                if task.schedule["begin"] <= when.strftime("%H:%M") <= task.schedule["end"]:
                    due.append((when, task))
        for when, task in sorted(due, key=lambda d: (d[0], d[1].id)):
            self.now = when.timestamp()
            taken.extend(self._fire(task, when))
        self.now = end
        self._retain()
        return taken

    def _fire(self, task: Task, when: datetime) -> list[str]:
        """One run: the snapshot named for ``when`` (kept only if another task took it already)."""
        name = when.strftime(task.naming_schema)
        if task.dataset not in self.storage.datasets:
            task.state = {"state": "ERROR", "error": f"Dataset {task.dataset!r} does not exist"}
            return []
        if f"{task.dataset}@{name}" in self.storage.snapshots:
            return []  # zettarepl: tasks that fire together share the snapshot
        clock = self.storage.clock
        self.storage.clock = lambda: when.timestamp()
        try:
            payload = {"dataset": task.dataset, "name": name, "recursive": task.recursive, "exclude": task.exclude}
            self.storage.snaps.create(None, [payload])  # type: ignore[arg-type]
        finally:
            self.storage.clock = clock
        task.state = {"state": "FINISHED", "datetime": {"$date": int(when.timestamp() * 1000)}}
        return [f"{task.dataset}@{name}"]

    def _expiry(self, dataset: str, name: str) -> float | None:
        """When snapshot ``name`` of ``dataset`` may go: the time its name says plus the lifetime, the
        latest among the tasks that cover the dataset and whose naming schema parses the name (a
        snapshot two tasks took is kept until the last of them lets it go); None: no task's."""
        found = None
        for task in self.tasks.values():
            if dataset != task.dataset and not (task.recursive and dataset.startswith(f"{task.dataset}/")):
                continue
            try:
                taken = datetime.strptime(name, task.naming_schema).replace(tzinfo=UTC)
            except ValueError:
                continue
            expiry = taken.timestamp() + task.lifetime_value * LIFETIMES[task.lifetime_unit]
            found = expiry if found is None else max(found, expiry)
        return found

    def _retain(self) -> None:
        snaps = self.storage.snaps
        for snap in list(snaps.snapshots.values()):
            expiry = self._expiry(snap.dataset, snap.name)
            # None: not made by a task's naming, never a task's to destroy
            if expiry is not None and self.now > expiry and not snaps.clones_of(snap) and not snap.holds:
                snaps.forget(snap)
