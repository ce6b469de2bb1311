"""The daemon's configuration: an INI file, section [himbeerecouch]."""
from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import logging
import math
import re
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SECTION = "himbeerecouch"
DEFAULT_PATH = Path("/etc/himbeerecouch/himbeerecouch.conf")
DEFAULT_BOOT_FILE = "/boot/firmware/himbeerecouch.txt"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


@dataclasses.dataclass(frozen=True)
class Config:
    server: str = ""                      # empty: read <state_dir>/server (original location)
    database: str = "nedm/raspberries"
    status_database: str = ""             # where the status document goes; empty: `database`
    interface: str = "eth0"
    interface_wait_seconds: float = 20.0  # early in a boot, wait this long for `interface` to appear
    macid: int | None = None              # overrides the MacID derived from the interface
    state_dir: Path = Path("/var/rspby")
    grace_seconds: float = 20.0           # from quit request to SIGKILL of the program's group
    ca_file: str = ""
    password_scheme: str = "random"
    feed_heartbeat_seconds: float = 10.0  # the feed is dead after 3 heartbeats of silence
    status_interval_seconds: float = 300.0   # keep-alive: rewrite when nothing changed
    output_tail_lines: int = 20           # last lines of each program in <MacID>_output; 0: none
    output_interval_seconds: float = 10.0   # <MacID>_output is written at most this often
    restart_backoff_max_seconds: float = 60.0
    offline_start_seconds: float = 10.0   # at start, wait this long for the server before the cache
    start_seconds: float = 5.0            # a run this long counts as a good start (resets back-off)
    max_program_bytes: int = 1024 * 1024  # code + modules of one program
    request_timeout_seconds: float = 30.0
    clock_wait_seconds: float = 120.0     # https: wait this long for NTP (systemd-timesyncd) first; 0: never
    timesync_flag: str = "/run/systemd/timesync/synchronized"   # timesyncd makes it once synchronised
    command_timeout_seconds: float = 600.0   # when a command document gives no "timeout"
    command_output_cap_bytes: int = 1024 * 1024   # kept per stream (stdout, stderr)
    max_parallel_commands: int = 2
    provisioning: str = "auto"            # LAN discovery: auto (only while no server), open, off
    discovery_address: str = ""           # address the discovery listener binds (all by default)
    discovery_port: int = 53000
    led_pin: int | None = 16              # BCM pin blinked while waiting for provisioning; empty: none
    log_level: str = "INFO"
    spawn: str = "fork-server"           # how programs start: fork-server (preloaded) or exec (fresh)
    command_privileges: str = "none"      # none, power (reboot, power off, restart), root (see privileges.py)
    root_helper: str = "/run/himbeerecouch/root.sock"   # the root helper's socket
    boot_config: str = DEFAULT_BOOT_FILE  # per-card settings; they win; empty: none

    @property
    def status_db_name(self) -> str:
        """The database of the status document: `status_database`, else the code database."""
        return self.status_database or self.database

    @property
    def server_file(self) -> Path:
        return self.state_dir / "server"

    def server_url(self) -> str:
        """The configured server, else the one written to the state dir by provisioning."""
        if self.server:
            return self.server
        try:
            return self.server_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""
        except OSError as error:
            raise ConfigError(f"cannot read {self.server_file}: {error}") from error


# ---------------------------------------------------------------- one check per key
#
# Each validator takes the text of a value and returns what it means, or raises ValueError
# with the reason in words an operator understands. A bad value costs that key only.

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MIN_SECONDS = 0.01                  # shorter would spin: a loop turn, a request, a status write
MAX_SECONDS = 365 * 24 * 3600.0     # beyond this, timers and waits overflow (threading.TIMEOUT_MAX)
MAX_URL_LENGTH = 2048
MAX_PARALLEL_COMMANDS = 64          # one thread each
MAX_OUTPUT_TAIL_LINES = 1000        # x 500 characters x programs: in memory and in one document
MAX_BOOT_FILE_BYTES = 64 * 1024
_DATABASE_NAME = re.compile(r"[a-z][a-z0-9_$()+/-]{0,237}")   # CouchDB's rule for database names


def url_problem(value: str) -> str | None:
    """Why `value` is not an http(s) URL with a host (None when it is one)."""
    if not value or len(value) > MAX_URL_LENGTH:
        return f"not an http(s) URL of at most {MAX_URL_LENGTH} characters"
    # urlsplit silently drops tabs and newlines; the URL goes into files and logs, so refuse them.
    if not value.isprintable() or any(ch.isspace() for ch in value):
        return "a URL has no spaces or control characters"
    try:
        parts = urlsplit(value)
        parts.port                  # raises ValueError for a port out of range or not a number
    except ValueError as error:
        return f"not a valid URL ({error})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http:// or https:// URL with a host name"
    return None


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not math.isfinite(value) or not MIN_SECONDS <= value <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds from {MIN_SECONDS:g} to {MAX_SECONDS:.0f} (a year)")
    return value


def _seconds_or_zero(raw: str) -> float:
    return 0.0 if raw.strip() in ("0", "0.0") else _seconds(raw)


def _integer(raw: str) -> int:
    text = raw.strip()
    try:
        return int(text, 0)         # 0x10 too, as MAC addresses are written
    except ValueError:
        pass
    try:
        return int(text, 10)        # 08: a leading zero is no reason to refuse
    except ValueError:
        raise ValueError("not a whole number") from None


def _whole(low: int, high: int | None = None, what: str = "") -> Callable[[str], int]:
    def check(raw: str) -> int:
        value = _integer(raw)
        if value < low or (high is not None and value > high):
            limit = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {limit}{what}")
        return value
    return check


def _optional(check: Callable[[str], object]) -> Callable[[str], object]:
    """Empty means none."""
    return lambda raw: None if not raw.strip() else check(raw)


def _choice(*allowed: str, upper: bool = False) -> Callable[[str], str]:
    def check(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value
    return check


def _absolute_path(raw: str) -> str:
    value = raw.strip()
    if not value.startswith("/") or not value.isprintable():
        raise ValueError("must be an absolute path (starting with /)")
    return value


def _optional_path(raw: str) -> str:
    return _absolute_path(raw) if raw.strip() else ""


def _server(raw: str) -> str:
    value = raw.strip()
    problem = url_problem(value) if value else None
    if problem:
        raise ValueError(problem)
    return value


def _database(raw: str) -> str:
    value = raw.strip()
    if not _DATABASE_NAME.fullmatch(value):
        raise ValueError("a CouchDB database name: lower case letters, digits and _$()+-/, "
                         "starting with a letter")
    return value


def _optional_database(raw: str) -> str:
    return _database(raw) if raw.strip() else ""


def _interface(raw: str) -> str:
    value = raw.strip()
    if not 0 < len(value) < 16 or not value.isprintable() or any(ch.isspace() or ch == "/" for ch in value) \
            or value in (".", ".."):
        raise ValueError("a network interface name such as eth0 or wlan0 (at most 15 characters)")
    return value


def _address(raw: str) -> str:
    value = raw.strip()
    if value:
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError("an IPv4 address such as 192.168.1.5, or empty for all") from None
    return value


VALIDATORS: dict[str, Callable[[str], object]] = {
    "server": _server,
    "database": _database,
    "status_database": _optional_database,
    "interface": _interface,
    "interface_wait_seconds": _seconds,
    "macid": _optional(_whole(0, 2 ** 48 - 1, " (a MAC address has 48 bits)")),
    "state_dir": lambda raw: Path(_absolute_path(raw)),
    "grace_seconds": _seconds,
    "ca_file": _optional_path,
    "password_scheme": _choice("random", "legacy"),
    "feed_heartbeat_seconds": _seconds,
    "status_interval_seconds": _seconds,
    "output_tail_lines": _whole(0, MAX_OUTPUT_TAIL_LINES),
    "output_interval_seconds": _seconds,
    "restart_backoff_max_seconds": _seconds,
    "offline_start_seconds": _seconds,
    "start_seconds": _seconds,
    "max_program_bytes": _whole(1),
    "request_timeout_seconds": _seconds,
    "clock_wait_seconds": _seconds_or_zero,
    "timesync_flag": _absolute_path,
    "command_timeout_seconds": _seconds,
    "command_output_cap_bytes": _whole(1),
    "max_parallel_commands": _whole(1, MAX_PARALLEL_COMMANDS),
    "provisioning": _choice("auto", "open", "off"),
    "discovery_address": _address,
    "discovery_port": _whole(1, 65535),
    "led_pin": _optional(_whole(0, 27, " (a BCM GPIO number)")),
    "log_level": _choice(*LOG_LEVELS, upper=True),
    "spawn": _choice("fork-server", "exec"),
    "command_privileges": _choice("none", "power", "root"),
    "root_helper": _absolute_path,
    "boot_config": _optional_path,
}


def _shown(key: str, raw: str) -> str:
    """The value as it may appear in a log line: short, and never with a password."""
    if key == "server" and "@" in raw:
        raw = "...@" + raw.rsplit("@", 1)[1]
    return repr(raw if len(raw) <= 80 else raw[:80] + "...")


def _display(value: object) -> str:
    return "(none)" if value is None or value == "" else repr(str(value) if isinstance(value, Path) else value)


def _apply(values: dict, origins: dict, items, path, *, boot: bool) -> None:
    """Check `items` (key, text) from `path`; good values go into `values`, bad ones are logged
    with what is used instead (the value from an earlier source, else the default)."""
    fields = {field.name: field for field in dataclasses.fields(Config)}
    for key, raw in items:
        if key not in fields:
            # A newer config on an older daemon must not take the Pi offline.
            log.warning("%s: ignoring unknown key %r", path, key)
            continue
        if boot and key == "boot_config":
            log.warning("%s: ignoring boot_config: only the config file can name the boot file", path)
            continue
        try:
            values[key] = VALIDATORS[key](raw)
            origins[key] = path
        except ValueError as error:
            if key in origins:
                instead = f"{_display(values[key])} from {origins[key]}"
            else:
                instead = f"the default {_display(fields[key].default)}"
            log.error("%s: ignoring %s = %s: %s; using %s", path, key, _shown(key, raw), error, instead)


def _boot_items(path: Path) -> list[tuple[str, str]]:
    """`key = value` lines; every line that is not one is logged and skipped on its own."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_BOOT_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as error:
        log.error("%s: cannot read the boot file, ignoring it: %s", path, error)
        return []
    if len(data) > MAX_BOOT_FILE_BYTES:
        log.error("%s: longer than %d bytes, reading only the beginning", path, MAX_BOOT_FILE_BYTES)
        data = data[:MAX_BOOT_FILE_BYTES]
    if data.startswith(b"\xef\xbb\xbf"):           # editors on other systems add a BOM
        data = data[3:]
    items = []
    section = SECTION
    for number, line in enumerate(data.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            log.error("%s: line %d is not UTF-8 text, ignoring it", path, number)
            continue
        if not text or text[0] in "#;":
            continue
        if text.startswith("[") and text.endswith("]") and len(text) > 2:
            section = text[1:-1].strip()
            continue
        key, equals, value = text.partition("=")
        colon_key, colon, colon_value = text.partition(":")
        if colon and (not equals or len(colon_key) < len(key)):
            key, value = colon_key, colon_value
        elif not equals:
            key = ""
        key = key.strip().lower()
        if not key:
            log.error("%s: line %d is not `key = value`, ignoring it: %s", path, number,
                      repr(text if len(text) <= 80 else text[:80] + "..."))
            continue
        if section == SECTION:
            items.append((key, value.strip()))
    return items


def read_boot_file(path: Path) -> dict:
    """Settings written on another computer into the card's FAT partition before first boot.

    `key = value` lines, with or without a [himbeerecouch] header. Read at every start: a
    mistake there is logged and skipped, never a reason for the Pi to stay offline.
    """
    values: dict = {}
    _apply(values, {}, _boot_items(Path(path)), path, boot=True)
    return values


def _conffile_items(path) -> list[tuple[str, str]]:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8-sig") as stream:
            parser.read_file(stream)
    except FileNotFoundError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        # An unreachable Pi must still come up, so that it can be mended remotely.
        log.error("%s: cannot use the config file (%s); going on with the defaults and the boot file",
                  path, error)
        return []
    return parser.items(SECTION) if parser.has_section(SECTION) else []


def load(path: str | Path | None = None) -> Config:
    """Read the config file, then the boot file; never fails on a bad value.

    A bad value in the boot file is logged and the config file's value is used; a bad value in
    the config file is logged and the default is used. Only an explicitly named config file that
    does not exist is an error (a typo at a terminal).
    """
    if path is None and DEFAULT_PATH.exists():
        path = DEFAULT_PATH
    values: dict = {}
    origins: dict = {}
    if path is not None:
        _apply(values, origins, _conffile_items(path), path, boot=False)
    boot_config = values.get("boot_config", DEFAULT_BOOT_FILE)
    if boot_config:
        _apply(values, origins, _boot_items(Path(boot_config)), boot_config, boot=True)
    return Config(**values)
