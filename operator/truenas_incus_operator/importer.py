"""``truenas-incus-operator import``: IncusInstance manifests that reproduce the instances a NAS has.

Read-only, like doctor: the client refuses every call that is not a read before it is sent
(``connect(read_only=True)``). It connects as doctor does (the ``TIO_TRUENAS_*`` settings), or
through a TrueNASConnection and its Secrets with ``--connection NAMESPACE/NAME`` (the kubeconfig's
user and its RBAC). Each instance (virt.instance, container.*, vm.*) becomes one manifest, with
``spec.managementPolicy: ObserveOnly`` (or the adopt annotation with ``--adopt``); what the CRD cannot
express is listed in YAML comments above it, never dropped silently. Manifests are written as each
instance is read (one ``list`` call, then one device listing per instance), so hundreds of instances
take no more memory than TrueNAS's one answer.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import ValidationError

from .connections.config import ConnectionConfig, resource_loader, settings_loader
from .instances.resource import desired_from
from .models import (
    ADOPT_ANNOTATION,
    API_GROUP,
    API_VERSION,
    DEVICE_NAME_PATTERN,
    INSTANCE_NAME_PATTERN,
    IncusInstanceSpec,
    TrueNASConnectionSpec,
)
from .models.limits import EXTRA_KEY_PATTERN, EXTRA_NIC_OWNED_KEYS, EXTRA_OWNED_KEYS, EXTRA_VALUE_PATTERN
from .problems import OperatorError
from .quantity import format_bytes
from .reconcile import Ownership, by_name, describe_action, instance_config, plan
from .settings import Settings
from .status import printable
from .truenas import (
    DeviceConfig,
    InstanceBackend,
    InstanceStatus,
    ObservedInstance,
    TrueNASClient,
    TrueNASError,
    connect,
)
from .truenas.backends.vm.marks import MANAGED_MARK
from .truenas.client import Timings

KUBERNETES_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
POWER = {InstanceStatus.RUNNING: "Running", InstanceStatus.STOPPED: "Stopped"}


PLAIN_KEY = re.compile(r"[a-z][a-zA-Z]*")
YAML11_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml where PyYAML's wheel has it: 3x faster
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class QuotingDumper(_Dumper):  # type: ignore[misc,valid-type]
    """Every string value double-quoted, every key too but the schema's own field names: PyYAML
    resolves scalars by YAML 1.1 rules that are not kubectl's and Argo CD's (sigs.k8s.io/yaml reads a
    plain ``y`` as true and ``1e3`` as a number), so what the NAS said is never left for a parser to
    guess."""


def _quoted_str(dumper: Any, value: str) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')


def _mapping(dumper: Any, value: dict[Any, Any]) -> Any:
    node = dumper.represent_mapping("tag:yaml.org,2002:map", value.items())
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and PLAIN_KEY.fullmatch(key.value) and key.value not in YAML11_WORDS:
            key.style = None
    return node


QuotingDumper.add_representer(str, _quoted_str)
QuotingDumper.add_representer(dict, _mapping)


@dataclass
class Imported:
    """One instance as a manifest (None: it cannot be one) and what the manifest leaves out."""

    instance: str
    manifest: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(printable(text))

    def as_yaml(self) -> str:
        """The manifest with its notes above it as comments. What TrueNAS said is escaped (a line break
        in a key or a message would end the comment and start YAML of the NAS's choosing), and the text
        is read back: it must be exactly this one manifest, or it is not written at all."""
        lines = [f"# TrueNAS instance {self.instance!r}"]
        lines += [f"# not expressed: {printable(note)}" for note in self.notes]
        body = yaml.dump(self.manifest, Dumper=QuotingDumper, sort_keys=False) if self.manifest is not None else ""
        text = "\n".join(lines) + "\n" + body
        expected = [self.manifest] if self.manifest is not None else [None]
        if list(yaml.load_all(text, Loader=_Loader)) != expected:  # a safe loader (C or Python)
            return f"# TrueNAS instance {self.instance!r}\n# not imported: its manifest did not read back as itself\n"
        return text


def kubernetes_name(instance: str, taken: set[str]) -> str | None:
    """A metadata.name for the instance: lower case, ``_`` and ``.`` as ``-``, unique among ``taken``."""
    base = re.sub(r"[^a-z0-9-]", "-", instance.lower()).strip("-")
    base = re.sub(r"-{2,}", "-", base)[:56].rstrip("-")
    if not base or not base[0].isalpha():
        base = f"i-{base}".rstrip("-")
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    if not KUBERNETES_NAME.fullmatch(candidate):
        return None
    taken.add(candidate)
    return candidate


def image_of(observed: ObservedInstance) -> tuple[str | None, str | None]:
    """The image alias TrueNAS knows the instance was made from, and a note when it does not know."""
    image = observed.image
    if observed.family == "vm":
        described = image.description or ""
        if described.endswith(MANAGED_MARK):
            made_of = described.split(" (", 1)[0].split(",", 1)[0].strip()
            if made_of and "/" in made_of:
                return made_of, None
        return None, "spec.image: TrueNAS does not record the image a VM was made from"
    if image.os and image.release:
        alias = f"{image.os.lower()}/{image.release}"
        if image.variant and image.variant != "default":
            alias += f"/{image.variant}"
        return alias, None
    return None, "spec.image: TrueNAS does not report the image this instance was made from"


def _extra(device: DeviceConfig, owned: tuple[str, ...], notes: list[str]) -> dict[str, Any]:
    """The extra keys the CRD can carry; the others are noted (the planner never touches a key the spec
    does not name, so leaving one out loses nothing)."""
    kept: dict[str, Any] = {}
    for key, value in sorted(device.extra.items()):
        if key in owned:
            continue
        fits = isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31
        fits = fits or (isinstance(value, str) and len(value) <= 64 and bool(re.fullmatch(EXTRA_VALUE_PATTERN, value)))
        if isinstance(key, str) and re.fullmatch(EXTRA_KEY_PATTERN, key) and fits:
            kept[key] = value
        elif value not in (None, "", [], {}, False):
            notes.append(f"devices[{device.name}].extra.{key} ({type(value).__name__})")
    return kept


def devices_of(
    devices: Iterable[DeviceConfig], notes: list[str], lost: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """spec.devices and spec.nics for the instance's own devices (a profile's are left to the profile).
    A device left out is also named in ``lost``: Full would remove it."""
    specs: list[dict[str, Any]] = []
    nics: list[dict[str, Any]] = []
    for device in devices:
        if device.inherited:
            continue
        if not re.fullmatch(DEVICE_NAME_PATTERN, device.name):
            notes.append(f"device {device.name!r} ({device.type}): its name is not a valid device name")
            lost.append(f"device {device.name!r}")
            continue
        if device.type == "NIC":
            nic: dict[str, Any] = {"name": device.name}
            kind = str(device.extra.get("nic_type") or "").lower()
            if kind in ("bridged", "macvlan"):
                nic["type"] = kind
            if device.extra.get("parent"):
                nic["parent"] = device.extra["parent"]
            if device.extra.get("mac"):
                nic["hwaddr"] = device.extra["mac"]
            left = {k for k, v in device.extra.items() if v and k not in EXTRA_NIC_OWNED_KEYS}
            notes.extend(f"nics[{device.name}].{key}" for key in sorted(left, key=str))
            nics.append(nic)
            continue
        entry: dict[str, Any] = {"name": device.name, "type": device.type}
        if device.source:
            entry["source"] = device.source
        if device.destination:
            entry["destination"] = device.destination
        if device.readonly:
            entry["readonly"] = True
        extra = _extra(device, EXTRA_OWNED_KEYS, notes)
        if extra:
            entry["extra"] = extra
        specs.append(entry)
    return specs, nics


def spec_of(
    observed: ObservedInstance, devices: list[DeviceConfig] | None, notes: list[str], lost: list[str]
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": observed.type}
    image, missing = image_of(observed)
    if image is not None:
        spec["image"] = image
    if missing is not None:
        notes.append(missing)
    if observed.cpu is not None:
        spec["cpu"] = observed.cpu
    if observed.memory is not None:
        spec["memory"] = format_bytes(observed.memory)
    spec["autostart"] = observed.autostart
    power = POWER.get(observed.status)
    if power is not None:
        spec["powerState"] = power
    else:
        notes.append(f"spec.powerState: TrueNAS reports {observed.status} (half-built, or busy): none is named")
        lost.append("spec.powerState")
    if observed.environment is None:
        notes.append("spec.environment: TrueNAS does not show a VM's environment (it is in its seed)")
    elif observed.environment:
        spec["environment"] = dict(sorted(observed.environment.items()))
        notes.append("spec.environment holds TrueNAS's values as they are: review them (secrets?) before committing")
    if observed.storage_pool:
        spec["storagePool"] = observed.storage_pool
    if devices is not None:
        specs, nics = devices_of(devices, notes, lost)
        if specs:
            spec["devices"] = specs
        if nics:
            spec["nics"] = nics
    return spec


KEPT = ("name", "type", "connectionRef", "managementPolicy", "deletionPolicy")
"""Fields the manifest is nothing without: one the models refuse refuses the instance, never left out
(without ``name`` the manifest would point at another instance)."""


def valid_spec(spec: dict[str, Any], notes: list[str], lost: list[str]) -> dict[str, Any] | None:
    """``spec`` as the CRD accepts it: a field (or a device) the models refuse is left out, noted and
    named in ``lost``; one of ``KEPT`` refuses the instance (None)."""
    for _ in range(64):
        try:
            IncusInstanceSpec.model_validate(spec)
            return spec
        except ValidationError as exc:
            error = exc.errors()[0]
            loc = [str(part) for part in error["loc"]]
            top = _field_of(loc[0]) if loc else ""
            message = str(error["msg"])
            if top in ("devices", "nics") and len(loc) > 1 and loc[1].isdigit() and top in spec:
                dropped = spec[top].pop(int(loc[1]))
                notes.append(f"spec.{top}[{dropped.get('name')}]: {message}")
                lost.append(f"spec.{top}[{dropped.get('name')}]")
                if not spec[top]:
                    spec.pop(top)
            elif top in spec and top not in KEPT:
                spec.pop(top)
                notes.append(f"spec.{top}: {message}")
                lost.append(f"spec.{top}")
            else:
                notes.append(f"the instance: {message}")
                return None
    return None


def _field_of(name: str) -> str:
    """A model field's name as the manifest spells it (camelCase)."""
    info = IncusInstanceSpec.model_fields.get(name)
    return str(info.alias) if info is not None and info.alias else name


def imported(
    observed: ObservedInstance,
    devices: list[DeviceConfig] | None,
    taken: set[str],
    *,
    adopt: bool = False,
    namespace: str | None = None,
    connection: str | None = None,
    backend: InstanceBackend | None = None,
) -> Imported:
    """The instance as a manifest. Every manifest says ``deletionPolicy: Orphan``: deleting what import
    wrote never deletes an instance; a user who wants that says Delete. With ``adopt`` the manifest
    adopts (Full) only when it expresses everything Full would otherwise change: a device, a field or a
    power state left out (Full would remove, reset or start it) leaves it ObserveOnly."""
    found = Imported(observed.name, None)
    if not re.fullmatch(INSTANCE_NAME_PATTERN, observed.name):
        found.note("spec.name: the instance's name is not one the CRD allows (letters, digits and '-')")
        return found
    name = kubernetes_name(observed.name, taken)
    if name is None:
        found.note("metadata.name: no valid Kubernetes name could be made from the instance's")
        return found
    notes: list[str] = []
    lost: list[str] = []
    spec = spec_of(observed, devices, notes, lost)
    if devices is None:
        lost.append("spec.devices")
    if name != observed.name:
        spec = {"name": observed.name, **spec}
    if connection is not None:
        spec["connectionRef"] = {"name": connection}
    spec["deletionPolicy"] = "Orphan"
    spec["managementPolicy"] = "ObserveOnly"
    checked = valid_spec(spec, notes, lost)
    found.notes.extend(printable(note) for note in notes)
    if checked is None:
        return found
    metadata: dict[str, Any] = {"name": name}
    if namespace:
        metadata["namespace"] = namespace
    if adopt:
        if "image" not in checked:
            found.note("--adopt: left ObserveOnly (Full needs spec.image; name it, then switch)")
        elif lost:
            found.note(f"--adopt: left ObserveOnly (Full would change what the manifest leaves out: {', '.join(lost)})")
        else:
            full = {key: value for key, value in checked.items() if key != "managementPolicy"}
            changes = full_would(name, full, observed, devices, backend)
            if changes:
                found.note(f"--adopt: left ObserveOnly (Full would: {'; '.join(changes)})")
            else:
                metadata["annotations"] = {ADOPT_ANNOTATION: "true"}
                checked = full
    found.manifest = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "IncusInstance", "metadata": metadata}
    found.manifest["spec"] = checked
    return found


def full_would(
    name: str,
    spec: dict[str, Any],
    observed: ObservedInstance,
    devices: list[DeviceConfig] | None,
    backend: InstanceBackend | None = None,
) -> list[str]:
    """What the operator's Full planner would do on its first pass after adopting with ``spec``: an
    adopt manifest is written only when that is nothing (a value TrueNAS holds in a form the spec
    rounds or normalises, e.g. memory that is not whole MiB or an upper-case MAC, would be rewritten)."""
    body = {"metadata": {"name": name, "namespace": "import", "uid": "import", "generation": 1}, "spec": spec}
    desired = desired_from(body, Ownership(mine=True, adopted=True))
    wanted = instance_config(desired)
    result = plan(
        desired,
        observed,
        devices,
        config=backend.honoured(wanted, observed) if backend is not None else None,
        identity=backend.device_identity if backend is not None else by_name,
    )
    if result.blocked is not None:
        return [f"refuse it ({result.blocked.reason}): {result.blocked.message}"]
    return [describe_action(action, observed) for action in result.actions]


async def import_instances(
    client: TrueNASClient, *, adopt: bool = False, namespace: str | None = None, connection: str | None = None
) -> AsyncIterator[Imported]:
    """Each instance of the NAS as a manifest, in TrueNAS's order, one at a time."""
    backend = client.instances
    taken: set[str] = set()
    for observed in await backend.list_instances():
        devices: list[DeviceConfig] | None = None
        try:
            devices = await backend.list_devices(observed.name)
        except TrueNASError as exc:
            found = imported(observed, None, taken, adopt=adopt, namespace=namespace, connection=connection)  # lost
            found.note(f"spec.devices: TrueNAS did not list them ({type(exc).__name__}: {exc.message})")
            yield found
            continue
        yield imported(
            observed, devices, taken, adopt=adopt, namespace=namespace, connection=connection, backend=backend
        )


async def _config(settings: Settings, connection: str | None) -> ConnectionConfig:
    if connection is None:
        if not settings.truenas_url:
            raise SystemExit("import: TIO_TRUENAS_URL is not set (or name a TrueNASConnection: --connection NS/NAME)")
        return await settings_loader(settings)()
    namespace, _, name = connection.partition("/")
    if not namespace or not name:
        raise SystemExit("import: --connection takes NAMESPACE/NAME")
    from .kube import Kube

    kube = Kube(settings.kube_timeout_seconds, prefer_kubeconfig=True)
    try:
        body = await kube.read_object("truenasconnections", namespace, name)
        if body is None:
            raise SystemExit(f"import: TrueNASConnection {namespace}/{name} does not exist (or you may not read it)")
        spec = TrueNASConnectionSpec.model_validate(body.get("spec") or {})
        return await resource_loader(kube, namespace, spec, settings, name=name)()
    finally:
        await kube.close()


async def run_import(
    settings: Settings,
    sink: Callable[[Imported], None],
    *,
    connection: str | None = None,
    adopt: bool = False,
    namespace: str | None = None,
    timeout: float = 30.0,
) -> int:
    """Hands each instance's manifest to ``sink`` as it is read; how many there were."""
    config = await _config(settings, connection)
    client = await connect(config, Timings(call=timeout, connect=timeout), read_only=True)
    count = 0
    try:
        manifests_namespace = namespace or (connection.partition("/")[0] if connection else None)
        connection_name = connection.partition("/")[2] if connection else None
        async for found in import_instances(
            client, adopt=adopt, namespace=manifests_namespace, connection=connection_name
        ):
            sink(found)
            count += 1
    finally:
        await client.close()
        await asyncio.sleep(0.25)  # aiohttp's graceful shutdown: a TLS socket closes a moment later
    return count


class Output:
    """Where the manifests go: one stream (documents separated by ``---``), or a folder (a file each)."""

    def __init__(self, stream: TextIO | None = None, folder: Path | None = None) -> None:
        self.stream, self.folder, self.written = stream, folder, 0
        self.refused: list[str] = []
        """Files of the folder that existed already: left as they were (the command exits 1)."""

    def __call__(self, found: Imported) -> None:
        text = found.as_yaml()
        if self.folder is not None:
            # "_": no Kubernetes name starts with it. "x": an existing file (the folder's own
            # kustomization.yaml, an earlier import) is never overwritten by an instance's name.
            name = found.manifest["metadata"]["name"] if found.manifest else f"_not-imported-{self.written}"
            try:
                with (self.folder / f"{name}.yaml").open("x") as handle:
                    handle.write(text)
            except FileExistsError:
                self.refused.append(f"{name}.yaml")
                print(f"import: {self.folder / name}.yaml exists: not overwritten", file=sys.stderr)
        elif self.stream is not None:
            self.stream.write(("---\n" if self.written else "") + text)
            self.stream.flush()
        self.written += 1


def main(args: Any) -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"import: bad settings: {exc}", file=sys.stderr)
        return 2
    output = Output(stream=sys.stdout)
    handle: TextIO | None = None
    if args.output:
        target = Path(args.output)
        if args.output.endswith("/") or target.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            output = Output(folder=target)
        else:
            handle = target.open("w")
            output = Output(stream=handle)
    try:
        count = asyncio.run(
            run_import(
                settings,
                output,
                connection=args.connection,
                adopt=args.adopt,
                namespace=args.namespace,
                timeout=args.timeout,
            )
        )
    except OperatorError as exc:
        print(printable(f"import: {exc.problem.reason}: {exc.problem.message}"), file=sys.stderr)
        return 1
    except TrueNASError as exc:
        print(printable(f"import: {type(exc).__name__}: {exc.message}"), file=sys.stderr)
        return 1
    finally:
        if handle is not None:
            handle.close()
    print(f"import: {count} instances", file=sys.stderr)
    return 1 if output.refused else 0
