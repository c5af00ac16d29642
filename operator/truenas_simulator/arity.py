"""How many positional arguments each method's ``*Args`` model has, for the middleware's
"Too many arguments" refusal (api/base/handler/accept.py ``model_dict_from_list``: the same rule and
wording in TS-25.04.2.6, TS-25.10.6 and TS-26.0.0-BETA.3).

Counted from the models in ``api/v25_04_2``, ``api/v25_10_0`` and ``api/v26_0_0`` (the counts agree
where a method exists in several): a ``@single_argument_args(...)`` model is one argument; CRUD
``query`` takes ``filters, options`` (api/base/model.py ``QueryArgs``) and ``get_instance`` takes
``id, options`` (service/crud_service.py ``get_instance_args``). Methods not listed here are not
checked (the 25.04 ``zfs.snapshot.*`` still use the legacy ``@accepts`` schemas).
"""

from __future__ import annotations

import errno

from .errors import ValidationErrors

ARITY: dict[str, int] = {
    # api/v*/auth.py
    "auth.login": 3,
    "auth.login_ex": 1,
    "auth.login_with_api_key": 1,
    "auth.login_with_token": 1,
    "auth.generate_token": 4,
    "auth.logout": 0,
    "auth.me": 0,
    "auth.mechanism_choices": 0,
    # api/v*/core.py
    "core.get_jobs": 2,
    "core.get_methods": 2,
    "core.job_abort": 1,
    "core.job_wait": 1,
    "core.ping": 0,
    "core.set_options": 1,
    "core.subscribe": 1,
    "core.unsubscribe": 1,
    # api/v*/system.py, system_product.py, system_global_id.py
    "system.info": 0,
    "system.version": 0,
    "system.version_short": 0,
    "system.host_id": 0,
    "system.global.id": 0,
    # api/v25_04_*/virt_instance.py, virt_global.py, virt_device.py (25.04, 25.10)
    "virt.global.config": 0,
    "virt.instance.create": 1,
    "virt.instance.update": 2,
    "virt.instance.delete": 1,
    "virt.instance.start": 1,
    "virt.instance.stop": 2,
    "virt.instance.restart": 2,
    "virt.instance.image_choices": 1,
    "virt.instance.device_list": 1,
    "virt.instance.device_add": 2,
    "virt.instance.device_update": 2,
    "virt.instance.device_delete": 2,
    "virt.instance.set_bootable_disk": 2,
    # api/v*/vm.py, vm_device.py
    "vm.create": 1,
    "vm.update": 2,
    "vm.delete": 2,
    "vm.start": 2,
    "vm.stop": 2,
    "vm.restart": 1,
    "vm.poweroff": 1,
    "vm.status": 1,
    "vm.get_available_memory": 1,
    "vm.import_disk_image": 1,
    "vm.device.create": 1,
    "vm.device.update": 2,
    "vm.device.delete": 2,
    "vm.device.convert": 1,
    "vm.device.nic_attach_choices": 0,
    # api/v*/pool_dataset.py, pool_snapshot.py
    "pool.dataset.create": 1,
    "pool.dataset.update": 2,
    "pool.dataset.delete": 2,
    "pool.dataset.promote": 1,
    "pool.snapshot.create": 1,
    "pool.snapshot.delete": 2,
    "pool.snapshot.clone": 1,
    "pool.snapshot.hold": 2,
    "pool.snapshot.release": 2,
    "pool.snapshot.rollback": 2,
    "pool.snapshot.update": 2,
    "pool.snapshot.rename": 2,
    # api/v26_0_0/container.py, container_device.py, container_config.py, container_image.py
    "container.create": 1,
    "container.update": 2,
    "container.delete": 1,
    "container.start": 1,
    "container.stop": 2,
    "container.device.create": 1,
    "container.device.update": 2,
    "container.device.delete": 2,
    "container.image.query_registry": 0,
    "lxc.config": 0,
}


ARITY_27: dict[str, int] = {
    # api/v27_0_0/container.py ContainerDeleteArgs (id, options), vm.py VMResetArgs and
    # VMGetGuestNetworkInterfacesArgs (id)
    "container.delete": 2,
    "vm.reset": 1,
    "vm.get_guest_network_interfaces": 1,
}


def expected_arguments(method: str, api27: bool = False) -> int | None:
    if api27 and method in ARITY_27:
        return ARITY_27[method]
    if method in ARITY:
        return ARITY[method]
    if method.endswith(".query"):
        return 2
    if method.endswith(".get_instance"):
        return 2
    return None


def check_arity(method: str, params: list[object], api27: bool = False) -> None:
    """Raises the middleware's ``ValidationErrors`` (attribute ``""``, EINVAL) for too many arguments
    (``api27``: TrueNAS 27's models, where they differ)."""
    expected = expected_arguments(method, api27)
    if expected is not None and len(params) > expected:
        raise ValidationErrors([("", f"Too many arguments (expected {expected}, found {len(params)})", errno.EINVAL)])
