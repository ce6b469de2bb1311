"""Checks of the packaging files against the code of the same commit (the clean checkout the
package is built from): a config key or a command-line option added without its line in the
shipped conffile and man page fails here, where it would otherwise go unnoticed until an
operator looks. Quick, but part of the package tier, so that a key being added in himbeerecouch/
does not fail the other tiers while its conffile line and man page entry follow.
"""
from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.package_tier


@pytest.fixture(scope="module")
def src(build) -> Path:
    return build.src


def _py(src: Path, code: str) -> str:
    """Run Python code against the checkout's himbeerecouch package; returns its stdout."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=src,
                            env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def _fields(src: Path) -> dict:
    """Config keys and their defaults as the conffile should show them."""
    return json.loads(_py(src, """
import dataclasses, json
from himbeerecouch.config import Config
def shown(value):
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
print(json.dumps({f.name: shown(f.default) for f in dataclasses.fields(Config)}))
"""))


CONFFILE = Path("debian/conf/himbeerecouch.conf")
MAN = Path("man")


def _commented_settings(src: Path) -> dict[str, str]:
    return {match.group(1): match.group(2).strip()
            for match in re.finditer(r"^#([a-z_]+) =(.*)$", (src / CONFFILE).read_text(), re.MULTILINE)}


def test_conffile_lists_every_key_commented_with_its_default(src):
    settings = _commented_settings(src)
    expected = _fields(src)
    missing = sorted(set(expected) - set(settings))
    assert not missing, f"keys missing from {CONFFILE}: {missing}"
    unknown = sorted(set(settings) - set(expected))
    assert not unknown, f"{CONFFILE} lists keys the daemon does not know: {unknown}"
    wrong = {key: (settings[key], expected[key]) for key in expected if settings[key] != expected[key]}
    assert not wrong, f"shipped default differs from the code's (shipped, code): {wrong}"


def test_conffile_as_shipped_means_all_defaults(src):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(src / CONFFILE)
    assert parser.sections() == ["himbeerecouch"] and not parser.items("himbeerecouch")
    assert _py(src, f"""
from himbeerecouch.config import Config, load
print(load({str(src / CONFFILE)!r}) == Config())
""").strip() == "True"


def test_man_page_documents_every_key(src):
    page = (src / MAN / "himbeerecouch.8").read_text()
    missing = [name for name in _fields(src) if not re.search(rf"^\.BR {name} ", page, re.MULTILINE)]
    assert not missing, f"keys missing from man/himbeerecouch.8: {missing}"


def _help(src: Path, *args: str) -> str:
    return _py(src, "import sys; from himbeerecouch.cli import main, creds_main\n"
                    f"args = {list(args)!r}\n"
                    "f = creds_main if args[0] == 'creds' else main\n"
                    "try:\n    f(args[1:])\nexcept SystemExit:\n    pass\n")


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", help_text)) - {"--help"}


def _commands(src: Path) -> list[str]:
    return json.loads(_py(src, """
import json
from himbeerecouch.cli import build_parser
actions = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
print(json.dumps(sorted(actions[0].choices) if actions else []))
"""))


@pytest.mark.parametrize("page,args", [("himbeerecouch.8", ("main", "--help")),
                                       ("himbeerecouch-creds.8", ("creds", "--help"))])
def test_man_pages_document_every_option(src, page, args):
    text = (src / MAN / page).read_text().replace("\\-", "-")
    missing = sorted(option for option in _options(_help(src, *args)) if option not in text)
    assert not missing, f"options missing from man/{page}: {missing}"


def test_man_page_documents_every_command_and_its_options(src):
    text = (src / MAN / "himbeerecouch.8").read_text().replace("\\-", "-")
    for command in _commands(src):
        assert re.search(rf"^\.(B|BI|BR) {command}\b", text, re.MULTILINE), f"command {command} missing from man/himbeerecouch.8"
        missing = sorted(option for option in _options(_help(src, "main", command, "--help")) if option not in text)
        assert not missing, f"options of {command} missing from man/himbeerecouch.8: {missing}"


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#", ";"))
    parser.optionxform = str
    parser.read(path)
    return parser


def test_daemon_unit_contract(src):
    unit = _unit(src / "debian" / "himbeerecouch.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure" and service["User"] == "rspby"
    assert "WatchdogSec" in service and "TasksMax" in service
    assert "MemoryMax" in service or "MemoryHigh" in service
    assert "PrivateDevices" not in service, "programs drive GPIO, I2C and SPI devices"
    # Built to run offline: no wait for an "online" network (a boot without one would wait for
    # the wait-online timeout), only ordered after network.target (stopped before it at shutdown).
    assert "network.target" in unit["Unit"]["After"].split()
    dependencies = " ".join(unit["Unit"].get(key, "") for key in ("After", "Wants", "Requires", "BindsTo"))
    assert "network-online.target" not in dependencies.split()
    assert unit["Unit"]["Documentation"]
    grace = float(_fields(src)["grace_seconds"])
    assert float(service["TimeoutStopSec"].rstrip("s")) > grace + 5, "TimeoutStopSec must outlast grace_seconds"
    assert service["ExecStart"].split()[:2] == ["/usr/bin/himbeerecouch", "run"]


def test_firstboot_unit_contract(src):
    unit = _unit(src / "debian" / "himbeerecouch.himbeerecouch-firstboot.service")
    service = unit["Service"]
    assert service["Type"] == "oneshot"
    assert service["StandardOutput"] == "tty" and service["TTYPath"] == "/dev/console"
    assert "--firstboot" in service["ExecStart"].split()
    before = unit["Unit"]["Before"].split()
    assert "himbeerecouch.service" in before and "getty-pre.target" in before
    # It reads the interfaces' MAC addresses, which need no configured network.
    assert not any("network" in unit["Unit"].get(key, "") for key in ("After", "Wants", "Requires"))
    assert unit["Unit"]["Documentation"]


def test_root_helper_units_contract(src):
    """The root helper: one per connection, on a socket that only root and the group rspby may
    use, started as a fresh, isolated interpreter (no PYTHONPATH, no user site, no script dir)."""
    socket_unit = _unit(src / "debian" / "himbeerecouch.himbeerecouch-root.socket")["Socket"]
    assert socket_unit["ListenSequentialPacket"] == "/run/himbeerecouch/root.sock"
    assert socket_unit["Accept"] == "yes" and socket_unit["SocketMode"] == "0660"
    assert (socket_unit["SocketUser"], socket_unit["SocketGroup"]) == ("root", "rspby")
    service = _unit(src / "debian" / "himbeerecouch.himbeerecouch-root@.service")["Service"]
    assert service["StandardInput"] == "socket" and "User" not in service
    assert service["ExecStart"].split()[:4] == ["/usr/bin/python3", "-I", "-m", "himbeerecouch.roothelper"]
    assert "--config /etc/himbeerecouch/himbeerecouch.conf" in service["ExecStart"]
    assert "--daemon-pid" not in service["ExecStart"] and "--power-log" not in service["ExecStart"]


def test_debconf_question_is_asked_at_priority_high(src):
    """A person installing the package by hand is asked for the server (debconf's default
    priority threshold is high); the lifecycle shows it with the teletype frontend."""
    config = (src / "debian" / "himbeerecouch.config").read_text()
    asked = re.findall(r"db_input (\w+) himbeerecouch/server(?![\w-])", config)
    assert asked == ["high"], asked
