"""The prebuilt SD card's settings from its FAT partition (image/sd, himbeerecouch-card-setup),
run on a directory tree that stands in for the card's root (--root, --macid)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from himbeerecouch import config
from support import ROOT

SCRIPT = ROOT / "image" / "sd" / "rootfs" / "usr" / "local" / "sbin" / "himbeerecouch-card-setup"
MACID = 202481587074134
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH1y8u3c0QZ0kR2x1bmJqZGd0a2xqZGZsa2pzZGZsa2o= me@laptop"
OTHER_KEY = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY= other"


@pytest.fixture
def card(tmp_path):
    """A root with what the image has: /etc/hosts, zoneinfo, an empty FAT partition."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\thimbeerecouch\n::1\t\tlocalhost\n")
    for zone in ("Etc/UTC", "Europe/Zurich"):
        (root / "usr" / "share" / "zoneinfo" / zone).parent.mkdir(parents=True, exist_ok=True)
        (root / "usr" / "share" / "zoneinfo" / zone).write_text("TZif")
    (root / "boot" / "firmware").mkdir(parents=True)
    return root


def setup(root: Path, boot_file: str | None = None, wifi: str | None = None,
          macid: int | None = MACID) -> subprocess.CompletedProcess:
    if boot_file is not None:
        (root / "boot" / "firmware" / "himbeerecouch.txt").write_text(boot_file)
    if wifi is not None:
        (root / "boot" / "firmware" / "wifi.txt").write_text(wifi)
    args = [sys.executable, str(SCRIPT), "--root", str(root)]
    if macid is not None:
        args += ["--macid", str(macid)]
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_defaults_give_a_host_name_from_the_macid(card):
    result = setup(card, boot_file="server = http://couch:5984\n")
    assert result.returncode == 0, result.stderr
    assert (card / "etc" / "hostname").read_text() == f"himbeerecouch-{MACID}\n"
    hosts = (card / "etc" / "hosts").read_text().splitlines()
    assert hosts == ["127.0.0.1\tlocalhost", f"127.0.1.1\thimbeerecouch-{MACID}", "::1\t\tlocalhost"]
    assert os.readlink(card / "etc" / "localtime") == "/usr/share/zoneinfo/Etc/UTC"
    assert not (card / "etc" / "systemd" / "timesyncd.conf.d").exists()
    assert not (card / "run" / "himbeerecouch-card" / "ssh").exists()
    assert not (card / "etc" / "wpa_supplicant").exists()


def test_a_clone_gets_its_own_host_name_at_every_boot(card):
    setup(card)
    assert setup(card, macid=MACID + 1).returncode == 0
    assert (card / "etc" / "hostname").read_text() == f"himbeerecouch-{MACID + 1}\n"
    assert (card / "etc" / "hosts").read_text().count("127.0.1.1") == 1


def test_system_section_sets_host_name_time_zone_and_ntp(card):
    text = ("\ufeff# comment\nserver = http://couch:5984\n[system]\r\nhostname = Lab-Pi-3\r\n"
            "timezone = Europe/Zurich\nntp = ntp.example.org 10.0.0.1\n")
    result = setup(card, boot_file=text)
    assert result.returncode == 0, result.stderr
    assert (card / "etc" / "hostname").read_text() == "lab-pi-3\n"
    assert os.readlink(card / "etc" / "localtime") == "/usr/share/zoneinfo/Europe/Zurich"
    assert (card / "etc" / "timezone").read_text() == "Europe/Zurich\n"
    dropin = card / "etc" / "systemd" / "timesyncd.conf.d" / "50-himbeerecouch-card.conf"
    assert "[Time]\nNTP=ntp.example.org 10.0.0.1\n" in dropin.read_text()
    # Taken off the card again: back to the defaults at the next boot.
    assert setup(card, boot_file="[system]\n").returncode == 0
    assert not dropin.exists()
    assert os.readlink(card / "etc" / "localtime") == "/usr/share/zoneinfo/Etc/UTC"
    assert (card / "etc" / "hostname").read_text() == f"himbeerecouch-{MACID}\n"


@pytest.mark.parametrize("line, problem", [
    ("hostname = bad_name!", "is not a host name"),
    ("hostname = " + "a" * 64, "is not a host name"),
    ("timezone = ../../etc/shadow", "is not one of /usr/share/zoneinfo"),
    ("timezone = Mars/Olympus", "is not one of /usr/share/zoneinfo"),
    ("ntp = ntp.example.org;reboot", "is not a host name or address"),
    ("ssh_key = not-a-key AAAA", "is not an SSH public key"),
    ("colour = blue", "unknown setting"),
    ("just words", "is not `key = value`"),
])
def test_a_wrong_setting_is_logged_and_skipped(card, line, problem):
    result = setup(card, boot_file=f"[system]\n{line}\n")
    assert result.returncode == 1
    assert problem in result.stderr, result.stderr
    # The rest is still done, with the defaults.
    assert (card / "etc" / "hostname").read_text() == f"himbeerecouch-{MACID}\n"
    assert os.readlink(card / "etc" / "localtime") == "/usr/share/zoneinfo/Etc/UTC"


def test_an_unchanged_setting_is_not_written_again(card):
    """Every boot runs the setup: what is already so costs the SD card no write."""
    text = f"[system]\ntimezone = Europe/Zurich\nntp = ntp.example.org\nssh_key = {KEY}\n"
    assert setup(card, boot_file=text).returncode == 0
    files = [card / "etc" / "hostname", card / "etc" / "hosts", card / "etc" / "timezone",
             card / "etc" / "systemd" / "timesyncd.conf.d" / "50-himbeerecouch-card.conf",
             card / "home" / "admin" / ".ssh" / "authorized_keys", card / "etc" / "sudoers.d" / "50-himbeerecouch-admin"]
    before = {path: path.stat().st_ino for path in files}
    assert setup(card, boot_file=text).returncode == 0
    assert {path: path.stat().st_ino for path in files} == before
    # A change is written.
    assert setup(card, boot_file=text, macid=MACID + 1).returncode == 0
    assert (card / "etc" / "hostname").stat().st_ino != before[card / "etc" / "hostname"]


def test_no_macid_gives_a_plain_host_name(card):
    assert setup(card, macid=None).returncode == 0
    assert (card / "etc" / "hostname").read_text() == "himbeerecouch\n"


def test_ssh_key_turns_ssh_on_for_the_admin_user_only_while_it_is_there(card):
    result = setup(card, boot_file=f"[system]\nssh_key = {KEY}\nssh_key = {OTHER_KEY}\n")
    assert result.returncode == 0, result.stderr
    authorized = card / "home" / "admin" / ".ssh" / "authorized_keys"
    assert authorized.read_text() == f"{KEY}\n{OTHER_KEY}\n"
    assert mode(authorized) == 0o600 and mode(authorized.parent) == 0o700
    sudoers = card / "etc" / "sudoers.d" / "50-himbeerecouch-admin"
    assert sudoers.read_text().endswith("admin ALL=(ALL) NOPASSWD:ALL\n") and mode(sudoers) == 0o440
    assert (card / "run" / "himbeerecouch-card" / "ssh").exists()
    assert "SSH on, key only, for admin (2 keys)" in result.stdout
    # The key taken off the card: no key, no SSH.
    result = setup(card, boot_file="[system]\n")
    assert authorized.read_text() == ""
    assert not (card / "run" / "himbeerecouch-card" / "ssh").exists()
    assert "SSH is off" in result.stdout


def test_keys_taken_off_the_card_are_removed_once(card):
    """With no key the emptied authorized_keys is left alone at the next boots."""
    assert setup(card, boot_file=f"[system]\nssh_key = {KEY}\n").returncode == 0
    authorized = card / "home" / "admin" / ".ssh" / "authorized_keys"
    assert "SSH is off" in setup(card, boot_file="[system]\n").stdout
    emptied = authorized.stat().st_ino
    again = setup(card, boot_file="[system]\n")
    assert again.returncode == 0 and "SSH is off" not in again.stdout
    assert authorized.read_text() == "" and authorized.stat().st_ino == emptied


def test_a_key_in_the_daemons_section_is_not_taken(card):
    assert setup(card, boot_file=f"ssh_key = {KEY}\n[himbeerecouch]\nssh_key = {KEY}\n").returncode == 0
    assert not (card / "home" / "admin").exists()


def test_wifi_file_is_applied_and_removed_from_the_fat_partition(card):
    result = setup(card, wifi="country = ch\nssid = IEEE\npassphrase = password\n")
    assert result.returncode == 0, result.stderr
    conf = card / "etc" / "wpa_supplicant" / "wpa_supplicant-wlan0.conf"
    text = conf.read_text()
    assert mode(conf) == 0o600
    assert "country=CH\n" in text and f"ssid={b'IEEE'.hex()}\n" in text
    # IEEE 802.11i-2004, annex H.4: the PSK of "password" on the SSID "IEEE"; the passphrase
    # itself is stored nowhere.
    assert "psk=f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e\n" in text
    assert "password" not in text
    assert not (card / "boot" / "firmware" / "wifi.txt").exists()
    wants = card / "etc" / "systemd" / "system" / "sys-subsystem-net-devices-wlan0.device.wants"
    link = wants / "wpa_supplicant@wlan0.service"
    assert os.readlink(link) == "/usr/lib/systemd/system/wpa_supplicant@.service"
    # The next boot keeps it (no wifi.txt any more).
    assert setup(card).returncode == 0
    assert conf.read_text() == text


def test_open_wifi_network(card):
    assert setup(card, wifi="country = DE\nssid = Café Gäste\n").returncode == 0
    text = (card / "etc" / "wpa_supplicant" / "wpa_supplicant-wlan0.conf").read_text()
    assert f"ssid={'Café Gäste'.encode().hex()}\n" in text and "key_mgmt=NONE\n" in text


@pytest.mark.parametrize("wifi, problem", [
    ("ssid = Net\npassphrase = long enough\n", "two-letter country code"),
    ("country = CH\npassphrase = long enough\n", "ssid must be 1 to 32 bytes"),
    ("country = CH\nssid = " + "x" * 33 + "\n", "ssid must be 1 to 32 bytes"),
    ("country = CH\nssid = Net\npassphrase = short\n", "passphrase must be 8 to 63"),
])
def test_a_wrong_wifi_file_stays_where_it_is(card, wifi, problem):
    result = setup(card, wifi=wifi)
    assert result.returncode == 1 and problem in result.stderr, result.stderr
    assert (card / "boot" / "firmware" / "wifi.txt").read_text() == wifi
    assert not (card / "etc" / "wpa_supplicant").exists()


def test_the_daemon_reads_nothing_of_the_system_section(tmp_path, caplog):
    boot = tmp_path / "himbeerecouch.txt"
    boot.write_text(f"server = http://couch:5984\n[system]\nhostname = pi\nssh_key = {KEY}\nserver = http://evil\n")
    assert config.read_boot_file(boot) == {"server": "http://couch:5984"}
    assert "unknown key" not in caplog.text


def test_the_image_units_order_the_setup_before_what_it_configures():
    units = ROOT / "image" / "sd" / "rootfs" / "etc" / "systemd" / "system"
    setup_unit = (units / "himbeerecouch-card-setup.service").read_text()
    before = next(line for line in setup_unit.splitlines() if line.startswith("Before="))
    for unit in ("network-pre.target", "systemd-networkd.service", "systemd-timesyncd.service", "ssh.service"):
        assert unit in before.split("=", 1)[1].split()
    ssh = (units / "ssh.service.d" / "50-himbeerecouch-card.conf").read_text()
    assert "ConditionPathExists=/run/himbeerecouch-card/ssh" in ssh
    sshd = (ROOT / "image" / "sd" / "rootfs" / "etc" / "ssh" / "sshd_config.d" / "50-himbeerecouch-card.conf").read_text()
    assert "PasswordAuthentication no" in sshd and "PermitRootLogin no" in sshd and "AllowUsers admin" in sshd

