"""The configuration: every key is checked in every source; a bad value never stops a Pi."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from himbeerecouch import config
from himbeerecouch.config import Config

# A valid value for every key (none of them the default) and what it reads as.
GOOD = {
    "server": ("https://couch.example.org:6984", "https://couch.example.org:6984"),
    "database": ("site/pis", "site/pis"),
    "status_database": ("site/pis_status", "site/pis_status"),
    "interface": ("wlan0", "wlan0"),
    "interface_wait_seconds": ("7.5", 7.5),
    "macid": ("0x10", 16),
    "state_dir": ("/srv/rspby", Path("/srv/rspby")),
    "grace_seconds": ("3", 3.0),
    "ca_file": ("/etc/ssl/site.pem", "/etc/ssl/site.pem"),
    "password_scheme": ("legacy", "legacy"),
    "feed_heartbeat_seconds": ("5", 5.0),
    "status_interval_seconds": ("60", 60.0),
    "output_tail_lines": ("0", 0),
    "output_interval_seconds": ("2.5", 2.5),
    "restart_backoff_max_seconds": ("120", 120.0),
    "offline_start_seconds": ("1", 1.0),
    "start_seconds": ("2", 2.0),
    "max_program_bytes": ("4096", 4096),
    "request_timeout_seconds": ("10", 10.0),
    "clock_wait_seconds": ("0", 0.0),
    "timesync_flag": ("/run/other/synchronized", "/run/other/synchronized"),
    "command_timeout_seconds": ("60", 60.0),
    "command_output_cap_bytes": ("100", 100),
    "max_parallel_commands": ("4", 4),
    "provisioning": ("off", "off"),
    "discovery_address": ("127.0.0.1", "127.0.0.1"),
    "discovery_port": ("53001", 53001),
    "led_pin": ("", None),
    "log_level": ("debug", "DEBUG"),
    "spawn": (" Exec ", "exec"),
    "command_privileges": (" Root ", "root"),
    "root_helper": ("/run/other/root.sock", "/run/other/root.sock"),
    "boot_config": ("/boot/other.txt", "/boot/other.txt"),
}

DURATION_BAD = ["", "soon", "0", "-1", "nan", "inf", "-inf", "1e300", "1e-300"]
BAD = {
    "server": ["ftp://h", "couch.example.org", "http://", "http://h:99999", "http://h/ x", "https://u:secret@"],
    "database": ["", "Site", "has space", "_users", "/x"],
    "status_database": ["Site", "has space", "_users", "/x"],
    "interface": ["", "a" * 16, "eth 0", "../x"],
    "macid": ["twelve", "-1", "1.5", str(2 ** 48)],
    "state_dir": ["", "var/rspby", "/a\x00b"],
    "ca_file": ["site.pem", "/a\x00b"],
    "password_scheme": ["sha1", "", "randomly"],
    "max_program_bytes": ["0", "-5", "1.5", "lots", ""],
    "command_output_cap_bytes": ["0", "-5", "1.5", "lots", ""],
    "max_parallel_commands": ["0", "-1", "two", "", "100000"],
    "output_tail_lines": ["-1", "1001", "1.5", "many", ""],
    "provisioning": ["yes", "", "on"],
    "discovery_address": ["not an address", "300.1.1.1", "::1"],
    "discovery_port": ["0", "65536", "-1", "port", ""],
    "led_pin": ["28", "-1", "GPIO16", "1.5"],
    "log_level": ["LOUD", "", "10"],
    "spawn": ["fork", "", "forkserver"],
    "command_privileges": ["sudo", "", "yes"],
    "root_helper": ["root.sock", ""],
    "clock_wait_seconds": ["", "soon", "-1", "nan", "inf", "1e300"],
    "timesync_flag": ["synchronized", ""],
    "boot_config": ["himbeerecouch.txt"],
    **{key: DURATION_BAD for key in (
        "interface_wait_seconds", "grace_seconds", "feed_heartbeat_seconds", "status_interval_seconds",
        "output_interval_seconds",
        "restart_backoff_max_seconds", "offline_start_seconds", "start_seconds", "request_timeout_seconds",
        "command_timeout_seconds")},
}
BAD_CASES = [(key, raw) for key, raws in BAD.items() for raw in raws]
BOOT_KEYS = [key for key in GOOD if key != "boot_config"]   # a boot file cannot name another


def default(key: str):
    return getattr(Config(), key)


def test_the_tables_cover_every_key():
    keys = {field.name for field in dataclasses.fields(Config)}
    assert set(config.VALIDATORS) == keys
    assert set(GOOD) == keys and set(BAD) == keys


@pytest.mark.parametrize("key", sorted(GOOD))
def test_good_values(tmp_path, key):
    raw, expected = GOOD[key]
    conffile = tmp_path / "c.conf"
    conffile.write_text(f"[himbeerecouch]\n{key} = {raw}\nboot_config =\n" if key != "boot_config"
                        else f"[himbeerecouch]\n{key} = {raw}\n")
    assert getattr(config.load(conffile), key) == expected


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    return path


@pytest.mark.parametrize("key,raw", [case for case in BAD_CASES if case[0] != "boot_config"])
def test_a_bad_boot_file_value_falls_back_to_the_conffile(tmp_path, caplog, key, raw):
    boot = _write(tmp_path / "himbeerecouch.txt", f"{key} = {raw}\n")
    conffile = _write(tmp_path / "c.conf", f"[himbeerecouch]\n{key} = {GOOD[key][0]}\nboot_config = {boot}\n")
    with caplog.at_level(logging.WARNING, logger="himbeerecouch.config"):
        loaded = config.load(conffile)
    assert getattr(loaded, key) == GOOD[key][1]
    message = caplog.text
    assert str(boot) in message and f"{key} = " in message and "from " + str(conffile) in message, message
    if "secret" in raw:
        assert "secret" not in message
    elif raw.isprintable():
        assert repr(raw.strip())[:60].rstrip("'") in message


@pytest.mark.parametrize("key,raw", BAD_CASES)
def test_a_bad_conffile_value_falls_back_to_the_default(tmp_path, caplog, key, raw):
    conffile = _write(tmp_path / "c.conf", f"[himbeerecouch]\n{key} = {raw}\n"
                      + ("boot_config =\n" if key != "boot_config" else ""))
    with caplog.at_level(logging.WARNING, logger="himbeerecouch.config"):
        loaded = config.load(conffile)
    assert getattr(loaded, key) == default(key)
    assert str(conffile) in caplog.text and f"{key} = " in caplog.text and "default" in caplog.text


def test_the_boot_file_wins_over_the_conffile_and_the_conffile_over_the_defaults(tmp_path):
    boot = _write(tmp_path / "boot.txt", "\ufeffprovisioning = open\r\nlog_level = warning\r\n")
    conffile = _write(tmp_path / "c.conf", f"[himbeerecouch]\nprovisioning = off\ngrace_seconds = 3\n"
                      f"boot_config = {boot}\n")
    loaded = config.load(conffile)
    assert (loaded.provisioning, loaded.log_level, loaded.grace_seconds) == ("open", "WARNING", 3.0)


def test_a_bad_line_in_the_boot_file_costs_that_line_only(tmp_path, caplog):
    boot = tmp_path / "boot.txt"
    boot.write_bytes(b"\xef\xbb\xbf# settings\r\nserver = http://fleet:5984\r\njunk without equals\r\n"
                     b"[[[\r\nmacid = 77\xff\r\ngrace_seconds = 4\r\nprovisioning = open\r\nprovisioning = off\r\n")
    conffile = _write(tmp_path / "c.conf", f"[himbeerecouch]\nboot_config = {boot}\n")
    with caplog.at_level(logging.WARNING, logger="himbeerecouch.config"):
        loaded = config.load(conffile)
    assert (loaded.server, loaded.grace_seconds, loaded.macid, loaded.provisioning) == \
        ("http://fleet:5984", 4.0, None, "off")
    assert "line 3" in caplog.text and "line 5" in caplog.text and "UTF-8" in caplog.text


def test_a_conffile_that_is_not_ini_gives_the_defaults_and_the_boot_file(tmp_path, caplog, monkeypatch):
    boot = _write(tmp_path / "boot.txt", "server = http://fleet:5984\n")
    monkeypatch.setattr(config, "DEFAULT_BOOT_FILE", str(boot))
    for text in (b"grace_seconds = 3\n", b"[himbeerecouch]\nx\n", b"[himbeerecouch]\na = 1\na = 2\n",
                 b"[himbeerecouch]\ngrace_seconds = 3\xff\n"):
        conffile = tmp_path / "c.conf"
        conffile.write_bytes(text)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="himbeerecouch.config"):
            loaded = config.load(conffile)
        assert loaded == Config(server="http://fleet:5984"), text
        assert str(conffile) in caplog.text, text


def test_an_unreadable_conffile_gives_the_defaults(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="himbeerecouch.config"):
        assert config.load(tmp_path) == Config()        # a directory: EISDIR
    assert str(tmp_path) in caplog.text


def test_only_a_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.conf")


def test_the_boot_file_cannot_name_another_boot_file(tmp_path, caplog):
    other = _write(tmp_path / "other.txt", "grace_seconds = 9\n")
    boot = _write(tmp_path / "boot.txt", f"boot_config = {other}\n")
    conffile = _write(tmp_path / "c.conf", f"[himbeerecouch]\nboot_config = {boot}\n")
    loaded = config.load(conffile)
    assert loaded.boot_config == str(boot) and loaded.grace_seconds == default("grace_seconds")


def test_read_boot_file_keeps_its_valid_values_only(tmp_path):
    boot = _write(tmp_path / "boot.txt", "server = http://fleet:5984\nprovisioning = maybe\n")
    assert config.read_boot_file(boot) == {"server": "http://fleet:5984"}
    assert config.read_boot_file(tmp_path / "missing.txt") == {}


def test_a_password_in_a_bad_server_value_is_not_logged(tmp_path, caplog):
    conffile = _write(tmp_path / "c.conf", "[himbeerecouch]\nserver = ftp://admin:hunter2@couch:5984\n"
                      "boot_config =\n")
    with caplog.at_level(logging.WARNING, logger="himbeerecouch.config"):
        assert config.load(conffile).server == ""
    assert "server = " in caplog.text and "hunter2" not in caplog.text


def test_a_server_url_may_carry_credentials_in_the_conffile(tmp_path):
    conffile = _write(tmp_path / "c.conf", "[himbeerecouch]\nserver = http://reader:pw@couch:5984\n"
                      "boot_config =\n")
    assert config.load(conffile).server == "http://reader:pw@couch:5984"


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["himbeerecouch.postinst", "himbeerecouch.config"])
def test_the_debconf_scripts_recognise_a_url_with_a_password(script):
    # The scripts' own check, run by sh; the package tier runs the scripts as a whole.
    import re
    import subprocess
    text = (ROOT / "debian" / script).read_text()
    function = re.search(r"^has_userinfo\(\) \{\n.*?^\}\n", text, re.M | re.S)
    assert function, f"no has_userinfo() in debian/{script}"
    cases = {"https://admin:secret@couch.example.org:6984": True, "http://admin@couch/": True,
             "admin:secret@couch:5984": True, "https://couch.example.org:6984": False,
             "http://couch/path@x": False, "": False}
    for url, expected in cases.items():
        result = subprocess.run(["sh", "-c", function.group(0) + 'has_userinfo "$1"', "sh", url])
        assert (result.returncode == 0) is expected, url
    assert 'if has_userinfo "$url"' in text or 'has_userinfo "$RET"' in text
