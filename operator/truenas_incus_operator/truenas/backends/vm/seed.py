"""NoCloud seeds: the ``cidata`` ISO cloud-init reads a VM's meta-data, user-data and network-config from.

Written with pycdlib (a maintained, pure-Python ISO 9660 library) with Joliet and Rock Ridge names, so
``user-data`` keeps its name whichever extension the guest's kernel reads.
"""

from __future__ import annotations

import io
import json
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

LABEL = "cidata"


def environment_cloud_config(environment: dict[str, str]) -> str:
    """``/etc/environment`` lines for the guest (what ``environment`` means for a VM)."""
    lines = "".join(f"{key}={json.dumps(value)}\n" for key, value in sorted(environment.items()))
    document = {"write_files": [{"path": "/etc/environment", "append": True, "content": lines}]}
    return "#cloud-config\n" + json.dumps(document) + "\n"


def user_data(environment: dict[str, str], user: str | None) -> str | None:
    """The user's user-data, the environment's cloud-config, or both as MIME multi-part."""
    if not environment:
        return user
    generated = environment_cloud_config(environment)
    if user is None:
        return generated
    message = MIMEMultipart()
    for part in (generated, user):
        # cloud-init reads a part's type from its own first line when the MIME type is text/plain
        subtype = "cloud-config" if part.startswith("#cloud-config\n") else "plain"
        message.attach(MIMEText(part, subtype, "utf-8"))
    return message.as_string()


def seed_iso(instance_id: str, hostname: str, user: str | None, network: str | None) -> bytes:
    """A NoCloud seed ISO (volume label ``cidata``)."""
    files = {"meta-data": f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n"}
    if user is not None:
        files["user-data"] = user
    if network is not None:
        files["network-config"] = network
    import pycdlib  # only where a VM gets a seed: 2 MB of RSS otherwise (BENCHMARKS.md, "Scale round 2")

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
    for index, (name, text) in enumerate(sorted(files.items())):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), f"/FILE{index};1", rr_name=name, joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()
