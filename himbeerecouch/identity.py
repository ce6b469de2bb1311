"""Who this device is: its MacID, derived from a network interface's MAC address."""
from __future__ import annotations

import time
from pathlib import Path

SYS_NET = Path("/sys/class/net")
YOUNG_SYSTEM_SECONDS = 120.0      # uptime during which a missing interface may still appear


class IdentityError(Exception):
    """The device's identity cannot be determined; the message says what to do."""


def _read_mac(interface: str, sys_net: Path) -> str | None:
    try:
        mac = (sys_net / interface / "address").read_text().strip()
    except OSError:
        return None
    return mac if mac and mac != "00:00:00:00:00:00" else None


def _universally_administered(mac: str) -> bool:
    # Bit 1 of the first octet marks locally administered (random, virtual) MACs.
    return not int(mac.split(":")[0], 16) & 0x02


def mac_to_macid(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def _uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def find_mac(interface: str = "eth0", sys_net: Path = SYS_NET, wait_seconds: float = 0.0,
             uptime=_uptime) -> tuple[str, str]:
    """(interface, MAC) of the configured interface, else of the first real one.

    Early in a boot the configured interface may not exist yet (a Pi 3's Ethernet sits on USB
    and appears late): falling back then would give the device another identity at its next
    boot. So while the system is young, wait up to `wait_seconds` for it first.
    """
    mac = _read_mac(interface, sys_net)
    deadline = time.monotonic() + wait_seconds
    while not mac and uptime() < YOUNG_SYSTEM_SECONDS and time.monotonic() < deadline:
        time.sleep(0.25)
        mac = _read_mac(interface, sys_net)
    if mac:
        return interface, mac
    try:
        names = sorted(path.name for path in sys_net.iterdir())
    except OSError:
        names = []
    for name in names:
        if name == "lo":
            continue
        mac = _read_mac(name, sys_net)
        if mac and _universally_administered(mac):
            return name, mac
    raise IdentityError(
        f"no MAC address: interface {interface!r} does not exist and no other interface has a "
        "universally administered MAC; set 'interface' or 'macid' in the config file")


def getmacid(interface: str | None = None) -> int:
    """The MacID (integer value of the MAC address), as the original module offered it."""
    return mac_to_macid(find_mac(interface or "eth0")[1])


def device_macid(config) -> int:
    """The MacID the daemon uses: the config's override, else the interface's."""
    if config.macid is not None:
        return config.macid
    return mac_to_macid(find_mac(config.interface, wait_seconds=config.interface_wait_seconds)[1])
