"""The command line: clear errors, exit codes, the creds placeholder."""
import json
import subprocess
import sys


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


def test_creds_prints_the_macid_and_no_invented_password(tmp_path):
    config = tmp_path / "c.conf"
    config.write_text("[himbeerecouch]\nmacid = 1234\n")
    result = subprocess.run([sys.executable, "-c", "import sys; from himbeerecouch.cli import creds_main; "
                             "sys.exit(creds_main(sys.argv[1:]))", "--json", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"MacID": 1234, "password": None}
