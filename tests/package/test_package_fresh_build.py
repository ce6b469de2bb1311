"""`make deb` on a fresh machine: a clean Debian root with apt and make only (no package lists, no
build tools, no pip), where the build installs what it needs itself, in one go and saying so once."""
from __future__ import annotations

import pytest

from pkgtools import SUITES, export_checkout, mmdebstrap, nspawn, timed

pytestmark = pytest.mark.package_tier


@pytest.fixture(scope="module")
def fresh(build, workdir, timings):
    """The first release of the tier (Debian 12 by default), as a CI machine or container starts."""
    suite = SUITES[0]
    root = workdir / f"fresh-{suite}" / "root"
    root.parent.mkdir(parents=True)
    timed(f"{suite}: mmdebstrap fresh root (apt, make)", timings, mmdebstrap, suite, root, ["make"])
    export_checkout(build.ref, root / "root" / "src")
    return root


def installed(root, package: str) -> bool:
    result = nspawn(root, "dpkg-query", "-W", "-f", "${Status}", package, check=False)
    return result.stdout.strip().endswith("install ok installed")


def test_make_deb_installs_what_it_needs_then_builds(fresh, build, timings):
    assert not installed(fresh, "debhelper") and not installed(fresh, "python3-pip")
    result = timed("make deb on a fresh root (build dependencies installed)", timings, nspawn, fresh,
                   "make", "deb", chdir="/root/src", check=False)
    (fresh.parent / "make-deb.log").write_text(result.stdout)
    assert result.returncode == 0, result.stdout[-5000:]
    messages = [line for line in result.stdout.splitlines() if line.startswith("build-deb: installing")]
    assert len(messages) == 1, messages
    assert "debhelper" in messages[0] and "dh-python" in messages[0], messages
    deb = fresh / "root" / "src" / "dist" / build.deb.name
    assert deb.exists()
    # pip is neither needed nor installed: pycouchdb comes from the source tree.
    assert not installed(fresh, "python3-pip")
    contents = nspawn(fresh, "dpkg-deb", "-c", f"/root/src/dist/{build.deb.name}").stdout
    assert "./usr/lib/himbeerecouch/python/pycouchdb/__init__.py" in contents


def test_second_make_deb_installs_nothing(fresh):
    result = nspawn(fresh, "make", "deb", chdir="/root/src", check=False)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "build-deb: installing" not in result.stdout, result.stdout
