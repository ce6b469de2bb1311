"""The daemon's configuration: an INI file, section [himbeerecouch]."""
from __future__ import annotations

import configparser
import dataclasses
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SECTION = "himbeerecouch"
DEFAULT_PATH = Path("/etc/himbeerecouch/himbeerecouch.conf")


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


@dataclasses.dataclass(frozen=True)
class Config:
    server: str = ""                      # empty: read <state_dir>/server (original location)
    database: str = "nedm/raspberries"
    interface: str = "eth0"
    interface_wait_seconds: float = 20.0  # early in a boot, wait this long for `interface` to appear
    macid: int | None = None              # overrides the MacID derived from the interface
    state_dir: Path = Path("/var/rspby")
    grace_seconds: float = 20.0           # from quit request to SIGKILL of the program's group
    ca_file: str = ""
    password_scheme: str = "random"
    feed_heartbeat_seconds: float = 10.0  # the feed is dead after 3 heartbeats of silence
    status_interval_seconds: float = 30.0
    restart_backoff_max_seconds: float = 60.0
    offline_start_seconds: float = 10.0   # at start, wait this long for the server before the cache
    start_seconds: float = 5.0            # a run this long counts as a good start (resets back-off)
    max_program_bytes: int = 1024 * 1024  # code + modules of one program
    request_timeout_seconds: float = 30.0
    command_timeout_seconds: float = 600.0   # when a command document gives no "timeout"
    command_output_cap_bytes: int = 1024 * 1024   # kept per stream (stdout, stderr)
    max_parallel_commands: int = 2
    provisioning: str = "auto"            # LAN discovery: auto (only while no server), open, off
    discovery_address: str = ""           # address the discovery listener binds (all by default)
    discovery_port: int = 53000
    led_pin: int | None = 16              # BCM pin blinked while waiting for provisioning; empty: none
    log_level: str = "INFO"
    boot_config: str = "/boot/firmware/himbeerecouch.txt"   # per-card settings; they win; empty: none

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


def _convert(field: dataclasses.Field, raw: str):
    kind = field.type
    if kind in ("int | None",):
        return int(raw, 0) if raw.strip() else None
    if kind == "int":
        return int(raw, 0)
    if kind == "float":
        value = float(raw)
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value
    if kind == "Path":
        return Path(raw)
    return raw.strip()


def _values(items, path, strict: bool) -> dict:
    fields = {field.name: field for field in dataclasses.fields(Config)}
    values = {}
    for key, raw in items:
        if key not in fields or (not strict and key == "boot_config"):
            # A newer config on an older daemon must not take the Pi offline.
            log.warning("ignoring unknown key %r in %s", key, path)
            continue
        try:
            values[key] = _convert(fields[key], raw)
        except ValueError as error:
            if strict:
                raise ConfigError(f"bad value for {key!r} in {path}: {raw!r} ({error})") from error
            log.error("ignoring %s = %r in %s: %s", key, raw, path, error)
    return values


def read_boot_file(path: Path) -> dict:
    """Settings written on another computer into the card's FAT partition before first boot.

    `key = value` lines, with or without a [himbeerecouch] header. Read at every start: a
    mistake there is logged and skipped, never a reason for the Pi to stay offline.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")        # editors on other systems add a BOM
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        log.error("ignoring %s: %s", path, error)
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text if text.lstrip().startswith("[") else f"[{SECTION}]\n{text}", str(path))
    except configparser.Error as error:
        log.error("ignoring %s: not `key = value` lines: %s", path, error)
        return {}
    if not parser.has_section(SECTION):
        return {}
    return _values(parser.items(SECTION), path, strict=False)


def load(path: str | Path | None = None) -> Config:
    """Read the config file (a missing default file means all defaults), then the boot file."""
    parser = configparser.ConfigParser(interpolation=None)
    if path is None and DEFAULT_PATH.exists():
        path = DEFAULT_PATH
    if path is not None:
        try:
            with open(path, encoding="utf-8") as stream:
                parser.read_file(stream)
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
        except configparser.Error as error:
            raise ConfigError(f"config file {path} is not valid INI: {error}") from error
    values = _values(parser.items(SECTION), path, strict=True) if parser.has_section(SECTION) else {}
    boot_config = values.get("boot_config", Config.boot_config)
    if boot_config:
        values.update(read_boot_file(Path(boot_config)))
    config = Config(**values)
    if config.max_parallel_commands < 1 or config.command_output_cap_bytes < 1:
        raise ConfigError("max_parallel_commands and command_output_cap_bytes must be at least 1")
    if config.provisioning not in ("auto", "open", "off"):
        raise ConfigError(f"provisioning must be 'auto', 'open' or 'off', not {config.provisioning!r}")
    if config.password_scheme not in ("random", "legacy"):
        raise ConfigError(f"password_scheme must be 'random' or 'legacy', not {config.password_scheme!r}")
    return config
