"""The .deb: built from a clean checkout, lintian-clean, with the contents the issue asks for."""
from __future__ import annotations

import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from pkgtools import ROOT, run

pytestmark = pytest.mark.package_tier

WHEEL = "pycouchdb-1.17.1-py3-none-any.whl"


@pytest.fixture(scope="module")
def unpacked(build, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("deb")
    run(["dpkg-deb", "-x", str(build.deb), str(target)])
    run(["dpkg-deb", "-e", str(build.deb), str(target / "DEBIAN")])
    return target


def test_make_deb_builds_dist_deb(build):
    assert build.deb.name == f"himbeerecouch_{build.version}_all.deb" and build.deb.exists()
    assert build.deb.parent.name == "dist"
    init = (build.src / "himbeerecouch" / "__init__.py").read_text()
    assert f'__version__ = "{build.version}"' in init, "debian/changelog and __version__ disagree"


def test_lintian_passes(build, timings):
    from pkgtools import timed
    result = timed("lintian", timings, run, ["lintian", "--fail-on", "error,warning", "--info",
                                             "--display-info", str(build.changes)], check=False)
    print(result.stdout)
    (build.workdir / "lintian.txt").write_text(result.stdout)
    assert result.returncode == 0, result.stdout


def test_lintian_overrides_are_commented():
    overrides = ROOT / "debian" / "himbeerecouch.lintian-overrides"
    if not overrides.exists():
        return
    previous = ""
    for line in overrides.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert previous.startswith("#"), f"lintian override without a comment giving its reason: {line}"
        previous = line


def test_private_pycouchdb_is_the_pinned_wheel(unpacked):
    expected = dict(line.split()[::-1] for line in (ROOT / "debian" / "pycouchdb.sha256").read_text().splitlines())
    wheel = ROOT / ".cache" / "deb" / WHEEL
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == expected[WHEEL]
    private = unpacked / "usr" / "lib" / "himbeerecouch" / "python"
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("pycouchdb/"):
                assert (private / name).read_bytes() == archive.read(name), name
    # Byte-code is made at installation (dh_python3's py3compile), not shipped.
    assert not list(unpacked.rglob("__pycache__"))


def test_package_layout(unpacked):
    for path in ["etc/himbeerecouch/himbeerecouch.conf", "lib/systemd/system/himbeerecouch.service",
                 "lib/systemd/system/himbeerecouch-firstboot.service", "usr/lib/tmpfiles.d/himbeerecouch.conf",
                 "usr/bin/himbeerecouch", "usr/bin/himbeerecouch-creds",
                 "usr/share/man/man8/himbeerecouch.8.gz", "usr/share/man/man8/himbeerecouch-creds.8.gz",
                 "usr/lib/python3/dist-packages/himbeerecouch/__init__.py"]:
        assert (unpacked / path).exists(), path
    # /var/rspby comes from tmpfiles.d at installation and boot, not from the package.
    assert not (unpacked / "var").exists()
    assert (unpacked / "DEBIAN" / "conffiles").read_text().split() == ["/etc/himbeerecouch/himbeerecouch.conf"]
    assert (unpacked / "usr/bin/himbeerecouch").read_text().startswith("#! /usr/bin/python3") or \
        (unpacked / "usr/bin/himbeerecouch").read_text().startswith("#!/usr/bin/python3")


def test_dependencies_come_from_the_archive(build):
    fields = run(["dpkg-deb", "-f", str(build.deb), "Depends", "Recommends"]).stdout
    depends = re.search(r"^Depends: (.*)$", fields, re.MULTILINE).group(1)
    recommends = re.search(r"^Recommends: (.*)$", fields, re.MULTILINE).group(1)
    names = {re.sub(r"[:\s(].*", "", alternative.strip()) for item in depends.split(",") for alternative in item.split("|")}
    assert "python3-pycouchdb" not in names and not any("pycouchdb" in name for name in names)
    assert {"python3-requests", "python3-typing-extensions", "python3-sdnotify"} <= names
    assert recommends.replace(" ", "") == "python3-rpi-lgpio|python3-rpi.gpio"


def test_daemon_unit_exposure(unpacked, timings):
    result = run(["systemd-analyze", "security", "--offline=yes", "--threshold=30",
                  f"--root={unpacked}", "himbeerecouch.service"], check=False)
    line = result.stdout.strip().splitlines()[-1]
    print(line)
    timings["exposure himbeerecouch.service"] = float(re.search(r"level for \S+: ([\d.]+)", line).group(1))
    assert result.returncode == 0, result.stdout
