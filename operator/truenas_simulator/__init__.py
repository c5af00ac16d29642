"""A TrueNAS middleware simulator: virt.instance over JSON-RPC/WebSocket and REST v2.0, jobs,
validation with TrueNAS's wording, version profiles, faults and latency."""

from .context import Session
from .profiles import PROFILES, Profile, get_profile
from .runner import SimulatorThread
from .server import SimulatorServer
from .simulator import Simulator
from .state import ApiKey, Image, Instance, Knobs

__all__ = [
    "PROFILES",
    "ApiKey",
    "Image",
    "Instance",
    "Knobs",
    "Profile",
    "Session",
    "Simulator",
    "SimulatorServer",
    "SimulatorThread",
    "get_profile",
]
