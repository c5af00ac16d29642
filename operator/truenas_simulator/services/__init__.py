"""The API families the simulated middleware serves, one module each (as moto splits a service):
``virt.instance.*`` (25.x), ``container.*`` (26), ``vm.*``, and the ZFS and file methods the VM path
needs (``storage``)."""
