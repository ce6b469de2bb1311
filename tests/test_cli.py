"""The command line: clear errors, exit codes, the creds placeholder."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "himbeerecouch", *args], capture_output=True, text=True,
                          timeout=30)


def test_help_and_version():
    assert "run" in run("--help").stdout
    assert run("--version").stdout.startswith("himbeerecouch ")


def test_a_missing_config_file_is_a_clear_error(tmp_path):
    result = run("run", "--config", str(tmp_path / "nope.conf"))
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_value_names_the_key(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text("[himbeerecouch]\nmacid = twelve\n")
    result = run("run", "--config", str(config))
    assert result.returncode == 2 and "'macid'" in result.stderr


def creds(*args):
    return subprocess.run([sys.executable, "-c", "import sys; from himbeerecouch.cli import creds_main; "
                           "sys.exit(creds_main(sys.argv[1:]))", *args], capture_output=True, text=True, timeout=30)


def test_creds_first_boot_announces_new_credentials_once(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text(f"[himbeerecouch]\nmacid = 1234\nstate_dir = {tmp_path / 'state'}\n")
    issue = tmp_path / "issue.d" / "himbeerecouch.issue"
    first = creds("--firstboot", "--config", str(config), "--issue-file", str(issue))
    assert first.returncode == 0, first.stderr
    assert "NEW device credentials" in first.stdout and "1234" in first.stdout
    second = creds("--firstboot", "--config", str(config), "--issue-file", str(issue))
    assert "NEW" not in second.stdout
    shown = json.loads(creds("--json", "--config", str(config)).stdout)
    assert shown["MacID"] == 1234 and shown["password"] in first.stdout and shown["password"] in second.stdout
    assert shown["password"] in issue.read_text()
    assert oct((tmp_path / "state" / "credentials.json").stat().st_mode & 0o777) == "0o600"


ROOT = Path(__file__).resolve().parent.parent


def _world_readable(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [path, *path.parents])


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3") or not _world_readable(ROOT),
                    reason="needs root, Debian's python3 and a checkout other users can read")
def test_creds_never_makes_credentials_without_the_right_to_store_them():
    # A user who cannot write the state dir gets advice, and no credentials appear anywhere.
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        root.chmod(0o755)
        (root / "state").mkdir(mode=0o755)
        config = root / "c.conf"
        config.write_text(f"[himbeerecouch]\nmacid = 1234\nstate_dir = {root / 'state'}\n")
        config.chmod(0o644)
        # Debian's python3 with the checkout on PYTHONPATH: the nobody user can run that.
        result = subprocess.run(
            ["/usr/bin/python3", "-c", "import sys; from himbeerecouch.cli import creds_main; "
             "sys.exit(creds_main(sys.argv[1:]))", "--config", str(config)],
            capture_output=True, text=True, timeout=30, preexec_fn=lambda: os.setuid(65534),
            env={"PATH": "/usr/bin:/bin", "HOME": "/", "PYTHONPATH": str(ROOT)})
        assert result.returncode == 1, result.stdout + result.stderr
        assert "made at first boot, or by running himbeerecouch-creds as root" in result.stderr
        assert list((root / "state").iterdir()) == []
