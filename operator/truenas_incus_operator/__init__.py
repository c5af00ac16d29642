"""truenas-incus-operator: a Kubernetes operator for TrueNAS Incus instances."""

__version__ = "0.1.0"
