"""This device's CouchDB credentials: user name = MacID, and a password bound to the device.

Schemes (config key `password_scheme`):
- `random` (default): a random password made once and kept in <state_dir>/credentials.json
  (mode 0600) with the identity (MacID and CPU serial) it was made for. When the identity no
  longer matches (the card was cloned into another Pi), new credentials are made and the old
  file is kept aside, never silently reused.
- `legacy`: the original HimbeereCouch password, sha1(str(MacID) + serial) with the original's
  serial parsing, for sites whose CouchDB users already exist. It is recorded the same way, so
  a new identity is noticed (and announced) in both schemes.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .identity import device_macid
from .state import write_atomic

CPUINFO = Path("/proc/cpuinfo")
DEVICE_TREE_SERIAL = Path("/sys/firmware/devicetree/base/serial-number")
MACHINE_ID = Path("/etc/machine-id")
LEGACY_SERIAL_ERROR = "ERROR000000000"
FILE_NAME = "credentials.json"
# No look-alikes (0/O, 1/l/I): the password is read off a console and typed elsewhere.
ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
PASSWORD_LENGTH = 20          # about 99 bits


class CredentialsError(Exception):
    """The credentials cannot be read or made; the message says what to do."""


def legacy_serial(cpuinfo: Path = CPUINFO) -> str:
    """The serial exactly as the original read it: characters 10..25 of the `Serial` line."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as stream:
            for line in stream:
                if line[0:6] == "Serial":
                    return line[10:26]
    except OSError:
        pass
    return LEGACY_SERIAL_ERROR


def device_serial(cpuinfo: Path = CPUINFO, device_tree: Path = DEVICE_TREE_SERIAL,
                  machine_id: Path = MACHINE_ID) -> str:
    """The CPU serial (cpuinfo, else the device tree); off a Pi, `machine-id:<id>` as a stand-in."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Serial" and value.strip().strip("0"):
                return value.strip()
    except OSError:
        pass
    try:
        serial = device_tree.read_bytes().rstrip(b"\0").decode("ascii", "replace").strip()
        if serial.strip("0"):
            return serial
    except OSError:
        pass
    try:
        return "machine-id:" + machine_id.read_text().strip()
    except OSError:
        return "unknown"


def legacy_password(macid: int, serial: str) -> str:
    return hashlib.sha1((str(macid) + serial).encode()).hexdigest()


def random_password() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(PASSWORD_LENGTH))


@dataclass(frozen=True)
class Credentials:
    macid: int
    password: str
    serial: str
    scheme: str
    created: str

    @property
    def user(self) -> str:
        return str(self.macid)


@dataclass(frozen=True)
class Sources:
    """Where identity facts are read; tests point these into a fake root."""
    cpuinfo: Path = CPUINFO
    device_tree: Path = DEVICE_TREE_SERIAL
    machine_id: Path = MACHINE_ID


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def credentials_path(config: Config) -> Path:
    return Path(config.state_dir) / FILE_NAME


def _read(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except PermissionError:
        raise CredentialsError(f"cannot read {path}: permission denied; run as root or as the "
                               "service user (sudo himbeerecouch-creds)") from None
    except (OSError, ValueError):
        return None                       # unreadable garbage: treated as missing, kept aside
    return content if isinstance(content, dict) else None


def _matches(content: dict | None, macid: int, serial: str, scheme: str) -> bool:
    return (content is not None and content.get("macid") == macid and content.get("serial") == serial
            and content.get("scheme") == scheme and isinstance(content.get("password"), str))


def load_or_create(config: Config, *, create: bool, sources: Sources = Sources(),
                   macid: int | None = None) -> tuple[Credentials, bool]:
    """This device's credentials, and whether they were made just now.

    With `create=False` nothing is written: missing or outdated credentials are an error that
    says how to make them.
    """
    macid = device_macid(config) if macid is None else macid
    serial = device_serial(sources.cpuinfo, sources.device_tree, sources.machine_id)
    scheme = config.password_scheme
    path = credentials_path(config)
    content = _read(path)
    if _matches(content, macid, serial, scheme):
        if scheme == "legacy":
            content["password"] = legacy_password(macid, legacy_serial(sources.cpuinfo))
        return Credentials(macid, content["password"], serial, scheme, content.get("created", "")), False
    if not create:
        reason = "none yet" if content is None and not path.exists() else \
            "they belong to another identity (a cloned card?) or scheme"
        raise CredentialsError(f"no credentials for this device in {path} ({reason}); they are made at "
                               "first boot, or by running himbeerecouch-creds as root")
    if scheme == "legacy":
        password = legacy_password(macid, legacy_serial(sources.cpuinfo))
    else:
        password = random_password()
    credentials = Credentials(macid, password, serial, scheme, _now())
    _store(path, credentials)
    return credentials, True


def _store(path: Path, credentials: Credentials) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            # Another identity's credentials are kept aside for the operator, never reused.
            aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.old")
            os.replace(path, aside)
        data = json.dumps({"macid": credentials.macid, "serial": credentials.serial,
                           "scheme": credentials.scheme, "password": credentials.password,
                           "created": credentials.created}, indent=1).encode()
        write_atomic(path, data, mode=0o600)
        _give_to_state_dir_owner(path)
    except PermissionError:
        raise CredentialsError(f"cannot write {path}: permission denied; run as root "
                               "(sudo himbeerecouch-creds)") from None
    except OSError as error:
        raise CredentialsError(f"cannot write {path}: {error}") from None


def _give_to_state_dir_owner(path: Path) -> None:
    """Made by root (first boot), the file must still be readable by the daemon's user."""
    if os.geteuid() != 0:
        return
    owner = path.parent.stat()
    for file in [path, *path.parent.glob(f"{path.name}.*.old")]:
        os.chown(file, owner.st_uid, owner.st_gid)


def can_create(config: Config) -> bool:
    """Whether this process may store credentials (it never makes them otherwise)."""
    state_dir = Path(config.state_dir)
    target = state_dir if state_dir.exists() else state_dir.parent
    return os.access(target, os.W_OK)
