"""Device credentials: schemes, identity binding and cloned cards (fake identity sources)."""
from pathlib import Path

import pytest

from himbeerecouch import credentials
from himbeerecouch.config import Config

MACID = 202481596538417
PI_CPUINFO = "processor\t: 0\nHardware\t: BCM2835\nRevision\t: a02082\nSerial\t\t: 00000000a1b2c3d4\nModel\t\t: Raspberry Pi 3\n"


def sources(root: Path, cpuinfo: str | None = PI_CPUINFO, device_tree: bytes | None = None,
            machine_id: str | None = None) -> credentials.Sources:
    root.mkdir(parents=True, exist_ok=True)
    if cpuinfo is not None:
        (root / "cpuinfo").write_text(cpuinfo)
    if device_tree is not None:
        (root / "serial-number").write_bytes(device_tree)
    if machine_id is not None:
        (root / "machine-id").write_text(machine_id + "\n")
    return credentials.Sources(root / "cpuinfo", root / "serial-number", root / "machine-id")


def test_legacy_password_matches_the_original_formula(tmp_path):
    # sha1("202481596538417" + "00000000a1b2c3d4"), computed outside Python.
    expected = "b4b5749fe1100e9bf8957cc7d7dbd206fbaf115b"
    src = sources(tmp_path / "root")
    assert credentials.legacy_serial(src.cpuinfo) == "00000000a1b2c3d4"
    config = Config(state_dir=tmp_path / "state", password_scheme="legacy")
    creds, new = credentials.load_or_create(config, create=True, sources=src, macid=MACID)
    assert new and creds.password == expected and creds.user == str(MACID)


def test_legacy_serial_defaults_like_the_original(tmp_path):
    assert credentials.legacy_serial(tmp_path / "missing") == "ERROR000000000"
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n")
    assert credentials.legacy_serial(tmp_path / "cpuinfo") == "ERROR000000000"


def test_serial_sources_in_order(tmp_path):
    assert credentials.device_serial(*sources(tmp_path / "a").__dict__.values()) == "00000000a1b2c3d4"
    tree = sources(tmp_path / "b", cpuinfo="processor\t: 0\n", device_tree=b"10000000feedbeef\0")
    assert credentials.device_serial(tree.cpuinfo, tree.device_tree, tree.machine_id) == "10000000feedbeef"
    pc = sources(tmp_path / "c", cpuinfo="processor\t: 0\n", machine_id="0123abcd")
    assert credentials.device_serial(pc.cpuinfo, pc.device_tree, pc.machine_id) == "machine-id:0123abcd"


def test_random_credentials_are_made_once_and_kept(tmp_path):
    src = sources(tmp_path / "root")
    config = Config(state_dir=tmp_path / "state")
    first, new = credentials.load_or_create(config, create=True, sources=src, macid=MACID)
    again, new_again = credentials.load_or_create(config, create=False, sources=src, macid=MACID)
    assert new and not new_again and first.password == again.password
    assert len(first.password) == 20 and set(first.password) <= set(credentials.ALPHABET)
    assert (tmp_path / "state" / "credentials.json").stat().st_mode & 0o777 == 0o600


def test_nothing_is_made_without_create(tmp_path):
    config = Config(state_dir=tmp_path / "state")
    with pytest.raises(credentials.CredentialsError, match="first boot"):
        credentials.load_or_create(config, create=False, sources=sources(tmp_path / "root"), macid=MACID)
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("change", ["macid", "serial"])
def test_a_cloned_card_gets_new_credentials_and_keeps_the_old_aside(tmp_path, change):
    config = Config(state_dir=tmp_path / "state")
    original, _ = credentials.load_or_create(config, create=True, sources=sources(tmp_path / "pi1"), macid=MACID)
    other_pi = sources(tmp_path / "pi2", cpuinfo=PI_CPUINFO.replace("a1b2c3d4", "99998888")) \
        if change == "serial" else sources(tmp_path / "pi1")
    macid = MACID + 1 if change == "macid" else MACID
    with pytest.raises(credentials.CredentialsError, match="another identity"):
        credentials.load_or_create(config, create=False, sources=other_pi, macid=macid)
    clone, new = credentials.load_or_create(config, create=True, sources=other_pi, macid=macid)
    assert new and clone.password != original.password and clone.macid == macid
    kept = list((tmp_path / "state").glob("credentials.json.*.old"))
    assert len(kept) == 1 and original.password in kept[0].read_text()


def test_switching_scheme_makes_new_credentials(tmp_path):
    src = sources(tmp_path / "root")
    random_creds, _ = credentials.load_or_create(Config(state_dir=tmp_path / "s"), create=True, sources=src, macid=MACID)
    legacy, new = credentials.load_or_create(Config(state_dir=tmp_path / "s", password_scheme="legacy"),
                                             create=True, sources=src, macid=MACID)
    assert new and legacy.password != random_creds.password and len(legacy.password) == 40
