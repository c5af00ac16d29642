"""Development tooling that is not part of the operator's install: the local control plane (etcd +
kube-apiserver built from the upstream Go modules) and the README's main command (the operator
against a configured cluster and TrueNAS, else a local demo with simulators).

Runs from the checkout only (it needs ``crds/``, ``examples/`` and ``tools/build-controlplane.sh``):
``PYTHONPATH=tools .venv/bin/python -m truenas_incus_dev start|controlplane`` (``make run``).
"""
