"""The command line: clear errors, exit codes, the creds placeholder."""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support import DEVICE_MACID, free_port, marker_program, starts, wait_for


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


# A bad value for every key the boot file may hold, among junk lines, a BOM, CRLF line ends and
# a line that is not UTF-8: what a card edited on another computer may look like.
BAD_BOOT_FILE = ("\ufeff# edited on a laptop\r\n"
                 "server = couch.example.org\r\n" "database = Site DB\r\n" "interface = eth 0\r\n"
                 "interface_wait_seconds = nan\r\n" "macid = twelve\r\n" "state_dir = var/rspby\r\n"
                 "grace_seconds = inf\r\n" "ca_file = site.pem\r\n" "password_scheme = sha1\r\n"
                 "feed_heartbeat_seconds = 0\r\n" "status_interval_seconds = -1\r\n"
                 "restart_backoff_max_seconds = soon\r\n" "offline_start_seconds = 1e300\r\n"
                 "start_seconds = \r\n" "max_program_bytes = 0\r\n" "request_timeout_seconds = -inf\r\n"
                 "command_timeout_seconds = forever\r\n" "command_output_cap_bytes = -5\r\n"
                 "max_parallel_commands = 0\r\n" "provisioning = yes\r\n" "discovery_address = everywhere\r\n"
                 "discovery_port = 99999\r\n" "led_pin = GPIO16\r\n" "log_level = LOUD\r\n"
                 "boot_config = /elsewhere.txt\r\n" "this line is junk\r\n" "[[[\r\n").encode() \
    + b"grace_seconds = 3\xff\r\n"
BOOT_KEYS = ["server", "database", "interface", "interface_wait_seconds", "macid", "state_dir", "grace_seconds",
             "ca_file", "password_scheme", "feed_heartbeat_seconds", "status_interval_seconds",
             "restart_backoff_max_seconds", "offline_start_seconds", "start_seconds", "max_program_bytes",
             "request_timeout_seconds", "command_timeout_seconds", "command_output_cap_bytes",
             "max_parallel_commands", "provisioning", "discovery_address", "discovery_port", "led_pin",
             "log_level"]


def bad_boot_file(folder: Path) -> Path:
    path = folder / "himbeerecouch.txt"
    path.write_bytes(BAD_BOOT_FILE)
    return path


def test_the_daemon_runs_with_a_boot_file_full_of_mistakes(admin, make_daemon, tmp_path):
    admin.put({"_id": "hello", "type": DEVICE_MACID, "name": "greeter", "code": marker_program(tmp_path, "hello")})
    daemon = make_daemon(boot_config=bad_boot_file(tmp_path))
    daemon.start()
    wait_for(lambda: starts(tmp_path, "hello"), message="the program to start")
    daemon.wait_log("greeter: started hello")
    assert daemon.process.poll() is None
    text = daemon.log()
    for key in BOOT_KEYS:
        assert f"{key} = " in text, key
    assert "line 27" in text and "line 29" in text and "Traceback" not in text


def test_creds_first_boot_shows_the_credentials_whatever_the_boot_file_says(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text(f"[himbeerecouch]\nmacid = 1234\nstate_dir = {tmp_path / 'state'}\n"
                      f"boot_config = {bad_boot_file(tmp_path)}\n")
    issue = tmp_path / "issue.d" / "himbeerecouch.issue"
    first = creds("--firstboot", "--config", str(config), "--issue-file", str(issue))
    assert first.returncode == 0, first.stderr
    assert "NEW device credentials" in first.stdout and "1234" in first.stdout
    assert "password_scheme = " in first.stderr and "provisioning = " in first.stderr
    shown = creds("--json", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["password"] in first.stdout


def test_a_config_file_that_is_not_ini_does_not_stop_creds(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text("macid = 1234\n")
    boot = tmp_path / "boot.txt"
    boot.write_text(f"macid = 4321\nstate_dir = {tmp_path / 'state'}\n")
    # The conffile is unusable, so boot_config is the default one: point the test at ours.
    result = subprocess.run([sys.executable, "-c", "import sys; from himbeerecouch import cli, config; "
                             f"config.DEFAULT_BOOT_FILE = {str(boot)!r}; sys.exit(cli.creds_main(sys.argv[1:]))",
                             "--json", "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["MacID"] == 4321 and str(config) in result.stderr


def test_broadcast_refuses_a_url_with_a_password():
    result = run("broadcast", "http://admin:hunter2@couch.example:5984", "--timeout", "0.1",
                 "--address", "127.0.0.1", "--port", "9")
    assert result.returncode == 2 and "user:password@" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


# ---- operator commands: what they read, and a server that is not there ----------------------

def operator(*args, input=None, **env):
    """An operator command whose server does not listen: everything here fails before, or at,
    the first request."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("COUCHDB_") and k != "HIMBEERECOUCH_ADMIN_CONFIG"}
    environment.update({"HOME": "/nonexistent", "COUCHDB_URL": f"http://127.0.0.1:{free_port()}",
                        "COUCHDB_USER": "admin", "COUCHDB_PASSWORD": "secret", **env})
    result = subprocess.run([sys.executable, "-m", "himbeerecouch", *args], capture_output=True, text=True,
                            input=input, env=environment, timeout=30)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_unreadable_files_are_one_clear_line_each(tmp_path):
    missing = tmp_path / "missing.json"
    assert operator("add-device", "--from", str(missing)).stderr == (
        f"himbeerecouch add-device: cannot read the credentials file {missing}: No such file or directory\n")
    result = operator("add-device", "--from", str(tmp_path))
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch add-device: cannot read the credentials file {tmp_path}: Is a directory\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe junk")
    result = operator("add-device", "--from", str(binary))
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch add-device: the credentials file {binary} is not UTF-8 text (byte 0)\n")
    result = operator("add-device", "--from", "-", input="not json")
    assert result.returncode == 2 and result.stderr.startswith("himbeerecouch add-device: stdin does not hold ")
    result = operator("push", "1", str(tmp_path / "prog.py"))
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch push: cannot read the program file {tmp_path / 'prog.py'}: No such file or directory\n")
    nul = tmp_path / "nul.py"
    nul.write_bytes(b"def main():\n    pass\0\n")
    result = operator("push", "1", str(nul))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and str(nul) in result.stderr
    result = operator("status", "--password-file", str(binary))
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch status: the password file {binary} is not UTF-8 text (byte 0)\n")
    result = operator("status", "--ca-file", str(missing), COUCHDB_URL="https://127.0.0.1:9")
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch status: cannot read the CA file {missing}: No such file or directory\n")


def test_a_bad_operator_config_file_is_one_clear_line(tmp_path):
    config = tmp_path / "admin.conf"
    config.write_text("server = http://couch.example:5984\n")
    result = operator("status", "--admin-config", str(config))
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch status: the operator config file {config} is not valid INI: line 1: a key "
           "before any [section] header\n")
    config.write_text("[himbeerecouch-admin]\nserver = a\nserver = b\n")
    assert operator("status", "--admin-config", str(config)).stderr == (
        f"himbeerecouch status: the operator config file {config} is not valid INI: line 3: key server "
        "twice in [himbeerecouch-admin]\n")
    config.write_bytes(b"[himbeerecouch-admin]\nuser = J\xf6rg\n")
    assert operator("status", "--admin-config", str(config)).stderr == (
        f"himbeerecouch status: the operator config file {config} is not UTF-8 text (byte 30)\n")
    result = operator("status", "--admin-config", str(tmp_path / "nope.conf"))
    assert (result.returncode, result.stderr) == (
        2, f"himbeerecouch status: the operator config file {tmp_path / 'nope.conf'} does not exist\n")


def test_a_server_that_is_not_there_is_named_once():
    port = free_port()
    result = operator("status", COUCHDB_URL=f"http://admin:secret@127.0.0.1:{port}")
    assert (result.returncode, result.stderr) == (
        1, f"himbeerecouch status: cannot reach http://127.0.0.1:{port}: Connection refused\n")
    # cmd's own failures have a status of their own: the command was not sent.
    result = operator("cmd", "1", "--", "true", COUCHDB_URL=f"http://127.0.0.1:{port}")
    assert (result.returncode, result.stderr) == (
        125, f"himbeerecouch cmd: cannot reach http://127.0.0.1:{port}: Connection refused\n")
    assert operator("cmd", "1").returncode == 125                      # no command after --
