"""The original module API (`himbeerecouch.util`), kept for scripts that use it."""
from __future__ import annotations

import fcntl
import socket
import struct

from . import config as _config
from .credentials import legacy_serial, load_or_create, can_create
from .identity import getmacid as _getmacid

SIOCGIFADDR = 0x8915

__all__ = ["getmacid", "getserial", "getpassword", "getipaddr"]


def getmacid(interface: str | None = None) -> int:
    """Integer value of the MAC address of `interface` (default eth0, else the first real one)."""
    return _getmacid(interface)


def getserial() -> str:
    """The CPU serial as the original read it from /proc/cpuinfo ("ERROR000000000" if none)."""
    return legacy_serial()


def getpassword() -> str:
    """This device's CouchDB password, under the configured scheme (see credentials.py)."""
    settings = _config.load()
    credentials, _ = load_or_create(settings, create=can_create(settings))
    return credentials.password


def _interface_ipv4(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", interface[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def getipaddr(interface: str | None = None) -> str | None:
    """IPv4 address of `interface`, or of the first non-loopback interface that has one."""
    if interface:
        return _interface_ipv4(interface)
    for _, name in sorted(socket.if_nameindex()):
        if name != "lo":
            address = _interface_ipv4(name)
            if address:
                return address
    return None
