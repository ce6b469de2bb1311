"""The package tier (README.md, "Debian package"): scripts/package-test runs it.

Tests marked `package_tier` build the .deb and boot Debian roots; they need root, the network to
the Debian archive and several minutes, so they are skipped unless HIMBEERECOUCH_PACKAGE_TESTS=1
(scripts/package-test sets it). The other tests here are quick checks of the packaging files
and run with the rest of the suite.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pkgtools import ROOT, Build, in_use, remove_tree, timed

ENABLED = os.environ.get("HIMBEERECOUCH_PACKAGE_TESTS") == "1"
TIMINGS: dict[str, float] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "package_tier: the package tier (HIMBEERECOUCH_PACKAGE_TESTS=1)")
    config.addinivalue_line("markers", "incremental: steps of one story; a failure skips the rest")


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="package tier: set HIMBEERECOUCH_PACKAGE_TESTS=1 (scripts/package-test)")
    for item in items:
        if item.get_closest_marker("package_tier"):
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if ENABLED and TIMINGS:
        out = Path(os.environ.get("HIMBEERECOUCH_PACKAGE_TIMINGS", ROOT / "build" / "package-test" / "timings.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(TIMINGS, indent=1) + "\n")


@pytest.fixture(scope="session")
def timings() -> dict[str, float]:
    return TIMINGS


@pytest.fixture(scope="session")
def workdir() -> Path:
    """Large scratch space (Debian roots); kept until the next run for post-mortems."""
    base = Path(os.environ.get("HIMBEERECOUCH_PACKAGE_WORKDIR", "/var/tmp/himbeerecouch-package-test"))
    base.mkdir(parents=True, exist_ok=True)
    path = base / time.strftime("run-%Y%m%d-%H%M%S")
    for old in base.glob("run-*"):
        if in_use(old):
            print(f"package tier: {old} is still used by a container; not removed")
        else:
            remove_tree(old)
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def build(workdir, timings) -> Build:
    """The .deb built by `make deb` from a clean checkout of HEAD (or HIMBEERECOUCH_PACKAGE_REF)."""
    result = Build(workdir / "build", os.environ.get("HIMBEERECOUCH_PACKAGE_REF", "HEAD"))
    timed("build (make deb, clean checkout)", timings, result.run)
    return result


# Steps of a lifecycle class build on each other: after a failure the rest are skipped, so the
# first failure is the one reported.
def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and item.get_closest_marker("incremental") and call.when == "call":
        key = (item.cls, _param_id(item))
        _FAILED_STEPS.setdefault(key, item.name)


def pytest_runtest_setup(item):
    if item.get_closest_marker("incremental"):
        failed = _FAILED_STEPS.get((item.cls, _param_id(item)))
        if failed:
            pytest.skip(f"an earlier step failed: {failed}")


def _param_id(item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec else ""


_FAILED_STEPS: dict = {}
