"""The libvirt ``vm.*`` API family (TrueNAS 25.04.2 and later): IncusInstances of type VM.

``vm.*`` has no images and no cloud-init (truenas-vm-container.md §2.6), so this backend builds both:

1. it finds the alias's VM image (``disk.qcow2``) in a simplestreams index (``images.ImageServer``);
2. once per image version it uploads the image (``/_upload`` + ``filesystem.put``) and writes it into
   a volume, the cached base (``vm.device.convert`` on 25.10+/26, ``vm.import_disk_image`` on 25.04.2),
   one conversion at a time per connection, then snapshots it (``@base``) once ``core.get_jobs`` shows a
   successful conversion of this image into this volume: the snapshot is the mark of a finished base;
3. each VM's root disk is a clone of that snapshot, grown to ``rootDiskSize`` if that is larger;
4. ``environment`` and ``cloudInit`` go into a NoCloud seed ISO (``seed.py``) attached as CDROM;
5. ``vm.create`` (memory in MiB, vcpus from ``cpu``, autostart), the root disk, the seed and the NICs.

Names are deterministic, so a create that is repeated after a crash finds what the first one made:

    <pool>/incus-operator/images/<product>_<serial>_sha256-<hex>         the cached base (@base once converted)
    <pool>/incus-operator/images/<product>_<serial>_sha256-<hex>-upload  the uploaded file (deleted after)
    <pool>/incus-operator/vms/<vm>                         per VM: seed.iso, and its root disk clone /root

VM names allow letters, digits and ``_`` only, so ``web-01`` is ``web_01`` on TrueNAS.

The package: ``backend`` (the backend proper), ``bases`` (the cached base: ensure, an earlier
conversion, convert, the root disk clone, collection), ``entries`` (``vm.query`` entries as
observations; names), ``marks`` (what the description says), ``progress`` (one job-like progress),
``seed`` (the NoCloud seed ISO). Uploads and job following are the transport's (``upload``,
``wait_job``); the image server is ``truenas/images.py`` (the operator's configuration names it).
"""

from .backend import VMBackend
from .bases import BASE_GRACE_SECONDS, FILE_MODE, ROOT, BaseImages, dataset_key
from .entries import instance_of_dataset, vm_name

__all__ = [
    "BASE_GRACE_SECONDS",
    "FILE_MODE",
    "ROOT",
    "BaseImages",
    "VMBackend",
    "dataset_key",
    "instance_of_dataset",
    "vm_name",
]
