"""The system tier (README.md, "SD card image"): scripts/system-test runs it.

It builds the test image from image/stage-himbeerecouch (image/build-test-image: the stage
applied by image/run-stage, as pi-gen applies it, to a Debian root), boots it under QEMU with
the console captured, and drives the Pi from the host through a CouchDB-protocol server on the
host's 127.0.0.1 (the guest reaches it at 10.0.2.2). The stage is also applied to an arm64
root under binfmt, in the background while the amd64 guest boots.

Skipped unless HIMBEERECOUCH_SYSTEM_TESTS=1: it needs root, QEMU, mmdebstrap, qemu-user-static
with binfmt, the network to the Debian archive and several minutes.

Knobs (environment):
  HIMBEERECOUCH_SYSTEM_DEB     use this .deb instead of building one (make deb on a copy of the tree)
  HIMBEERECOUCH_SYSTEM_IMAGE   use this image.env (an amd64 image built before) instead of building
  HIMBEERECOUCH_SYSTEM_SUITE   Debian suite of the images (default trixie, as current pi-gen)
  HIMBEERECOUCH_SYSTEM_ARM64=0 leave out the arm64 stage check
Timings go to build/system-test/timings.json and to the end of pytest's report.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
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


class BackgroundBuild:
    """image/build-test-image running in the background (the arm64 root, under binfmt)."""

    def __init__(self, arch: str, deb: Path, out: Path) -> None:
        self.arch = arch
        self.out = out
        self.log_path = out.parent / f"build-{arch}.log"
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [str(ROOT / "image" / "build-test-image"), "--arch", arch, "--suite", SUITE, "--deb", str(deb),
             "--out", str(out), "--no-disk"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, env=CLEAN_ENV, cwd=ROOT)

    def wait(self, timeout: float = 1800) -> dict[str, str]:
        code = self.process.wait(timeout=timeout)
        TIMINGS[f"build: {self.arch} root with the stage (background)"] = round(time.monotonic() - self.started, 1)
        assert code == 0, f"build-test-image --arch {self.arch} exited {code}:\n{self.log_path.read_text()[-5000:]}"
        return read_env_file(self.out / "image.env")


@pytest.fixture(scope="session")
def arm64_build(workdir, deb):
    if os.environ.get("HIMBEERECOUCH_SYSTEM_ARM64", "1") == "0":
        pytest.skip("HIMBEERECOUCH_SYSTEM_ARM64=0")
    build = BackgroundBuild("arm64", deb, workdir / "arm64")
    yield build
    if build.process.poll() is None:
        build.process.terminate()
        build.process.wait(timeout=60)


@pytest.fixture(scope="session")
def image(workdir, deb, request) -> dict[str, str]:
    """The amd64 test image: image.env's values (DISK, BOOT_OFFSET, KERNEL, INITRD, CMDLINE, ROOTFS)."""
    given = os.environ.get("HIMBEERECOUCH_SYSTEM_IMAGE")
    if given:
        return read_env_file(Path(given))
    if os.environ.get("HIMBEERECOUCH_SYSTEM_ARM64", "1") != "0":
        request.getfixturevalue("arm64_build")         # started first: it runs while this one builds and boots
    out = workdir / "amd64"
    timed("build: amd64 image (build-test-image)", run,
          [str(ROOT / "image" / "build-test-image"), "--arch", "amd64", "--suite", SUITE, "--deb", str(deb),
           "--out", str(out)], env=CLEAN_ENV, cwd=ROOT, log=workdir / "build-amd64.log")
    stages = json.loads((out / "timings.json").read_text())
    for key, value in stages.items():
        TIMINGS[f"build: amd64 {key}"] = value
    return read_env_file(out / "image.env")
