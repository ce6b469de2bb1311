"""The program process on its own: module loading, injected names, quit handling."""
import json
import os
import signal
import subprocess
import sys
import time

from himbeerecouch import child


def run_child(spec, timeout=10, quit_after=None):
    read_fd, write_fd = os.pipe()
    env = {**os.environ, child.REPORT_FD_ENV: str(write_fd)}
    process = subprocess.Popen([sys.executable, "-m", "himbeerecouch.child"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_fd,), env=env)
    os.close(write_fd)
    process.stdin.write(json.dumps(spec).encode() + b"\n")
    process.stdin.flush()
    if quit_after is not None:
        time.sleep(quit_after)
        process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=timeout)
    with os.fdopen(read_fd) as report:
        messages = [json.loads(line) for line in report]
    return process.returncode, out.decode(), err.decode(), messages


def test_main_runs_with_the_injected_names_in_every_module():
    code = "import helper\ndef main():\n    log('from main', 1)\n    helper.hello()\n"
    helper = "def hello():\n    log('from helper', callable(should_quit), callable(get_database))\n"
    code_, out, err, messages = run_child({"code": code, "modules": {"helper": helper}})
    assert code_ == 0, err
    assert messages == [{"log": "from main 1"}, {"log": "from helper True True"}]


def test_quit_request_sets_should_quit_and_calls_notifications():
    code = '''
import time
def main():
    register_quit_notification(lambda: log("notified"))
    def removed(): log("must not run")
    register_quit_notification(removed)
    remove_quit_notification(removed)
    while not should_quit():
        time.sleep(0.02)
    log("quit seen")
'''
    returncode, _, err, messages = run_child({"code": code}, quit_after=1.0)
    assert returncode == 0, err
    assert {"log": "notified"} in messages and {"log": "quit seen"} in messages
    assert {"log": "must not run"} not in messages


def test_end_of_stdin_means_the_daemon_is_gone():
    code = "import time\ndef main():\n    while not should_quit():\n        time.sleep(0.02)\n    log('bye')\n"
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen([sys.executable, "-m", "himbeerecouch.child"], stdin=subprocess.PIPE,
                               pass_fds=(write_fd,), env={**os.environ, child.REPORT_FD_ENV: str(write_fd)})
    os.close(write_fd)
    process.stdin.write(json.dumps({"code": code}).encode() + b"\n")
    process.stdin.close()
    assert process.wait(timeout=10) == 0
    with os.fdopen(read_fd) as report:
        assert {"log": "bye"} in [json.loads(line) for line in report]


def test_load_failures_exit_with_the_invalid_code():
    for code, expected in (("def main(:", "SyntaxError"), ("x = 1", "no main()"),
                           ("import nowhere_to_be_found\ndef main(): pass", "ModuleNotFoundError")):
        returncode, _, _, messages = run_child({"code": code})
        assert returncode == child.EXIT_INVALID
        assert expected in messages[-1]["error"]


def test_program_modules_win_over_global_modules():
    spec = {"code": "import m\ndef main():\n    log(m.WHO)\n",
            "modules": {"m": "WHO = 'own'"}, "global_modules": {"m": "WHO = 'global'", "g": ""}}
    assert run_child(spec)[3] == [{"log": "own"}]


def test_get_acct_gives_the_credentials_of_the_pi():
    spec = {"code": "def main():\n    log(get_acct())\n",
            "database": {"url": "http://127.0.0.1:1", "name": "db", "credentials": ["123", "pw"]}}
    assert run_child(spec)[3] == [{"log": "('123', 'pw')"}]
