"""What the image-only families (``virt.instance``, ``container.*``) create from."""

from __future__ import annotations

import errno

from ..errors import FieldError, ValidationFailed
from ..types import InstanceConfig


def image_of(config: InstanceConfig, method: str) -> str:
    """The image a create builds from. These families take nothing else: a clone (``config.source``) is
    refused here, whatever let it through (the operator reports it as Unsupported before a create)."""
    if config.source is not None or not config.image:
        raise ValidationFailed(
            [
                FieldError(
                    "source", f"{method} builds an instance from an image only, never from a snapshot", errno.EINVAL
                )
            ],
            method,
        )
    return config.image
