"""piuparts: install, remove and purge in a clean root whose base has systemd (so tmpfiles.d
makes /var/rspby and a leftover would be caught)."""
from __future__ import annotations

import pytest

from pkgtools import MIRROR, SUITES, mmdebstrap, reachable, run, timed

pytestmark = pytest.mark.package_tier


@pytest.mark.parametrize("suite", SUITES)
def test_piuparts(suite, build, workdir, timings):
    if suite != "bookworm" and not reachable(suite):
        pytest.skip(f"the Debian archive has no {suite} reachable from here")
    base = workdir / f"piuparts-base-{suite}.tar.gz"
    timed(f"{suite}: piuparts base (mmdebstrap minbase + systemd-sysv)", timings, mmdebstrap, suite, base,
          ["systemd-sysv"], variant="minbase")
    result = timed(f"{suite}: piuparts", timings, run,
                   ["piuparts", f"--basetgz={base}", "-d", suite, "-m", MIRROR,
                    # Where dpkg-preconfigure extracts the debconf templates of whatever apt
                    # installs; it keeps the empty folder, which Debian 12's piuparts does not
                    # know about yet (Debian 13's base has none before the first such package).
                    "--ignore=/var/cache/debconf/tmp.ci/", str(build.deb)],
                   check=False, timeout=1800)
    (workdir / f"piuparts-{suite}.log").write_text(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "PASS: All tests." in result.stdout
