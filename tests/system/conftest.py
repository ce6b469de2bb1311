"""The system tier (README.md, "Flashing a Raspberry Pi"): scripts/system-test runs it.

It builds the prebuilt SD card image (image/build-sd-image: Debian arm64 with raspi-firmware,
image/stage-himbeerecouch applied by image/run-stage as pi-gen applies it), checks its files,
boots it under qemu-system-aarch64 with the console captured, and drives the Pi from the host
through a CouchDB-protocol server on the host's 127.0.0.1 (the guest reaches it at 10.0.2.2).
image/run-stage's pi-gen conventions are checked on an amd64 stand-in root
(image/build-test-image).

Skipped unless HIMBEERECOUCH_SYSTEM_TESTS=1: it needs root, QEMU, mmdebstrap, qemu-user-static
with binfmt, the network to the Debian archive and several minutes (the arm64 root is cached in
/var/cache/himbeerecouch/sd-root by its package list: 10-15 minutes more when it is not there).

Knobs (environment):
  HIMBEERECOUCH_SYSTEM_DEB       use this .deb instead of building one (make deb on a copy of the tree)
  HIMBEERECOUCH_SYSTEM_SD_IMAGE  use this sd-image.env (an SD image built before) instead of building
  HIMBEERECOUCH_SYSTEM_IMAGE     use this image.env (an amd64 stand-in root built before)
  HIMBEERECOUCH_SYSTEM_SUITE     Debian suite of the amd64 stand-in root (default trixie, as current pi-gen)
Timings go to build/system-test/timings.json and to the end of pytest's report.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from guest import TIMINGS, read_env_file, run, timed
from support import ROOT

ENABLED = os.environ.get("HIMBEERECOUCH_SYSTEM_TESTS") == "1"
HERE = Path(__file__).resolve().parent
WORKDIR = ROOT / "build" / "system-test"
SUITE = os.environ.get("HIMBEERECOUCH_SYSTEM_SUITE", "trixie")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"), "LC_ALL": "C.UTF-8"}
_FAILED_STEPS: dict = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "system_steps: steps of one story; after a failure the rest are skipped")


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="system tier: set HIMBEERECOUCH_SYSTEM_TESTS=1 (scripts/system-test)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and call.when == "call" and item.get_closest_marker("system_steps"):
        _FAILED_STEPS.setdefault(item.cls, item.name)


def pytest_runtest_setup(item):
    if item.get_closest_marker("system_steps") and item.cls in _FAILED_STEPS:
        pytest.skip(f"an earlier step failed: {_FAILED_STEPS[item.cls]}")


def pytest_terminal_summary(terminalreporter):
    if ENABLED and TIMINGS:
        WORKDIR.mkdir(parents=True, exist_ok=True)
        (WORKDIR / "timings.json").write_text(json.dumps(TIMINGS, indent=1) + "\n")
        terminalreporter.section("system tier timings (seconds)")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def workdir() -> Path:
    """build/system-test (git-ignored): the .deb, the images, the disks and logs of this run."""
    WORKDIR.mkdir(parents=True, exist_ok=True)
    for old in ("boots", "src"):
        shutil.rmtree(WORKDIR / old, ignore_errors=True)
    (WORKDIR / "boots").mkdir()
    return WORKDIR


def build_deb(workdir: Path) -> Path:
    """`make deb` on a copy of the work tree (tracked files and new ones not ignored), so that
    the checkout's own build/deb and dist/ are left alone."""
    src = workdir / "src"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           stdout=subprocess.PIPE, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = src / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # The copy lies inside this checkout: git must not take it for a part of it.
    env = dict(CLEAN_ENV, GIT_CEILING_DIRECTORIES=str(workdir))
    run(["make", "deb"], cwd=src, env=env, log=workdir / "make-deb.log", timeout=900)
    return next((src / "dist").glob("himbeerecouch_*_all.deb"))


@pytest.fixture(scope="session")
def deb(workdir) -> Path:
    given = os.environ.get("HIMBEERECOUCH_SYSTEM_DEB")
    if given:
        return Path(given).resolve()
    return timed("build: make deb", build_deb, workdir)


@pytest.fixture(scope="session")
def image(workdir, deb) -> dict[str, str]:
    """The amd64 stand-in for pi-gen's stages 0-2 with the stage applied (no disk): image.env's
    values (ROOTFS; the stand-in root is ROOTFS/../../stage2/rootfs)."""
    given = os.environ.get("HIMBEERECOUCH_SYSTEM_IMAGE")
    if given:
        return read_env_file(Path(given))
    out = workdir / "amd64"
    timed("build: amd64 stand-in root (build-test-image)", run,
          [str(ROOT / "image" / "build-test-image"), "--arch", "amd64", "--suite", SUITE, "--deb", str(deb),
           "--out", str(out)], env=CLEAN_ENV, cwd=ROOT, log=workdir / "build-amd64.log")
    return read_env_file(out / "image.env")


@pytest.fixture(scope="session")
def sd_image(workdir, deb) -> dict[str, str]:
    """The prebuilt SD card image, uncompressed: sd-image.env's values (IMAGE, BOOT_OFFSET,
    ROOT_OFFSET, ROOT_SIZE, DISK_ID, ROOTFS, KERNEL_VERSION, ROOT_CACHE)."""
    given = os.environ.get("HIMBEERECOUCH_SYSTEM_SD_IMAGE")
    if given:
        return read_env_file(Path(given))
    out = workdir / "sd"
    timed("build: SD card image (build-sd-image --no-compress)", run,
          [str(ROOT / "image" / "build-sd-image"), "--deb", str(deb), "--out", str(out), "--no-compress"],
          env=CLEAN_ENV, cwd=ROOT, log=workdir / "build-sd.log", timeout=3600)
    stages = json.loads((out / "sd-image-timings.json").read_text())
    for key, value in stages.items():
        TIMINGS[f"build: SD {key}"] = value
    return read_env_file(out / "sd-image.env")
