"""The .deb and its source package: built from a clean checkout, complete (the source package alone
builds offline), lintian-clean, with the contents the issue asks for."""
from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path

import pytest

from pkgtools import CLEAN_ENV, ROOT, export_checkout, run

pytestmark = pytest.mark.package_tier

PRIVATE = Path("usr/lib/himbeerecouch/python")


def pinned_sdist(src: Path) -> tuple[str, str]:
    """(file name, sha256) of the pycouchdb sdist that debian/pycouchdb.sha256 pins."""
    for line in (src / "debian" / "pycouchdb.sha256").read_text().splitlines():
        digest, name = line.split()
        if name.endswith(".tar.gz"):
            return name, digest
    raise AssertionError("debian/pycouchdb.sha256 pins no sdist")


def deb_contents(deb: Path) -> list[str]:
    return sorted(line.split()[-1] for line in run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines())


def deb_md5sums(deb: Path, where: Path) -> str:
    run(["dpkg-deb", "-e", str(deb), str(where)])
    return (where / "md5sums").read_text()


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


def test_private_pycouchdb_is_the_pinned_release(build, unpacked):
    """The private copy is the vendored sdist's package, the sdist the one pinned."""
    name, digest = pinned_sdist(build.src)
    sdist = build.src / "vendor" / "pycouchdb" / name
    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == digest
    private = unpacked / PRIVATE
    base = name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as archive:
        modules = {member.name.removeprefix(f"{base}/"): archive.extractfile(member).read()
                   for member in archive.getmembers() if member.isfile() and member.name.startswith(f"{base}/pycouchdb/")}
        metadata = archive.extractfile(f"{base}/PKG-INFO").read()
    assert modules and "pycouchdb/__init__.py" in modules
    for path, data in modules.items():
        assert (private / path).read_bytes() == data, path
    shipped = sorted(str(path.relative_to(private)) for path in private.rglob("*") if path.is_file())
    assert shipped == sorted([*modules, f"{base}.dist-info/METADATA"]), shipped
    assert (private / f"{base}.dist-info" / "METADATA").read_bytes() == metadata
    # Byte-code is made at installation (dh_python3's py3compile), not shipped.
    assert not list(unpacked.rglob("__pycache__"))


def test_vendored_sdist_is_the_one_pypi_publishes(build):
    """scripts/fetch-pycouchdb: the kept sdist, the pin and PyPI's published sha256 agree."""
    result = run(["/usr/bin/python3", "scripts/fetch-pycouchdb", "--check"], cwd=build.src, env=dict(CLEAN_ENV),
                 check=False, timeout=120)
    print(result.stdout)
    assert result.returncode == 0, result.stdout


def test_copyright_patterns_match_files_of_the_source_package(build, source_tree):
    """Every Files: pattern of debian/copyright names files that the source package has."""
    text = (source_tree / "debian" / "copyright").read_text()
    patterns = []
    for paragraph in text.split("\n\n"):
        match = re.search(r"^Files:((?:.*\n?)(?:[ \t].*\n?)*)", paragraph, re.MULTILINE)
        if match:
            patterns += match.group(1).split()
    assert patterns and "*" in patterns
    files = [str(path.relative_to(source_tree)) for path in source_tree.rglob("*") if path.is_file()]
    for pattern in patterns:
        # copyright-format 1.0: * matches any characters, slashes included; ? one character.
        regex = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))
        assert any(regex.fullmatch(name) for name in files), f"debian/copyright: Files: {pattern} matches no file"


@pytest.fixture(scope="module")
def source_tree(build, tmp_path_factory) -> Path:
    """The source package of the clean checkout (dpkg-source -b, as dpkg-buildpackage -S makes it),
    unpacked alone in a folder of its own (dpkg-source -x)."""
    where = tmp_path_factory.mktemp("source")
    tree = where / f"himbeerecouch-{build.version}"
    export_checkout(build.ref, tree)
    run(["dpkg-source", "-b", tree.name], cwd=where, env=dict(CLEAN_ENV))
    alone = tmp_path_factory.mktemp("alone")
    for path in where.glob(f"himbeerecouch_{build.version}*"):
        (alone / path.name).write_bytes(path.read_bytes())
    run(["dpkg-source", "-x", f"himbeerecouch_{build.version}.dsc", "himbeerecouch"], cwd=alone, env=dict(CLEAN_ENV))
    return alone / "himbeerecouch"


def test_make_deb_leaves_the_source_package_in_dist(build):
    assert build.dsc.exists(), sorted(path.name for path in build.dsc.parent.iterdir())
    assert f"himbeerecouch_{build.version}.tar.xz" in build.dsc.read_text()
    assert (build.dsc.parent / f"himbeerecouch_{build.version}.tar.xz").exists()


def test_source_package_alone_builds_offline(build, source_tree, tmp_path_factory, timings):
    """dpkg-buildpackage on the unpacked source package, without network (its own network
    namespace) and without any cache of the host (an empty HOME): the same .deb as `make deb`."""
    from pkgtools import timed
    home = tmp_path_factory.mktemp("home")
    env = dict(CLEAN_ENV, HOME=str(home))
    result = timed("build from the source package alone, offline", timings, run,
                   ["unshare", "--net", "--", "dpkg-buildpackage", "-us", "-uc", "-b"],
                   cwd=source_tree, env=env, check=False)
    assert result.returncode == 0, result.stdout[-5000:]
    deb = source_tree.parent / build.deb.name
    assert f"./{PRIVATE}/pycouchdb/__init__.py" in deb_contents(deb)
    assert deb_contents(deb) == deb_contents(build.deb)
    assert deb_md5sums(deb, tmp_path_factory.mktemp("a")) == deb_md5sums(build.deb, tmp_path_factory.mktemp("b"))


def test_package_layout(unpacked):
    for path in ["etc/himbeerecouch/himbeerecouch.conf", "usr/lib/systemd/system/himbeerecouch.service",
                 "usr/lib/systemd/system/himbeerecouch-firstboot.service", "usr/lib/tmpfiles.d/himbeerecouch.conf",
                 "usr/lib/systemd/system/himbeerecouch-root.socket",
                 "usr/lib/systemd/system/himbeerecouch-root@.service",
                 "usr/lib/python3/dist-packages/himbeerecouch/roothelper.py",
                 "usr/bin/himbeerecouch", "usr/bin/himbeerecouch-creds",
                 "usr/share/man/man8/himbeerecouch.8.gz", "usr/share/man/man8/himbeerecouch-creds.8.gz",
                 "usr/lib/python3/dist-packages/himbeerecouch/__init__.py",
                 # the fleet page that `himbeerecouch setup-db` installs from the package
                 *(f"usr/lib/python3/dist-packages/himbeerecouch/fleetpage/{name}"
                   for name in ("index.html", "fleet.css", "fleet.js"))]:
        assert (unpacked / path).exists(), path
    # /var/rspby comes from tmpfiles.d at installation and boot, not from the package.
    assert not (unpacked / "var").exists()
    # Nothing under the aliased /lib (merged /usr): dpkg on Debian 13 could not remove its folders.
    assert not (unpacked / "lib").exists()
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
