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


def test_what_no_retry_can_fix_is_reported_fatal_the_rest_as_errors():
    cases = (
        ("def main(:", "fatal", "SyntaxError"),
        ("x = 1", "fatal", "no main()"),
        ("import helper\ndef main(): pass", "fatal", "SyntaxError"),                # in a module
        ("def main():\n    import helper", "fatal", "SyntaxError"),                 # imported late
        ("import nowhere_to_be_found\ndef main(): pass", "error", "ModuleNotFoundError"),
        ("raise OSError('sensor not ready')\ndef main(): pass", "error", "sensor not ready"),
    )
    for code, kind, expected in cases:
        returncode, _, _, messages = run_child({"code": code, "modules": {"helper": "x = (\n"}})
        assert returncode == child.EXIT_FAILED, code
        assert list(messages[-1])[0] == kind and expected in messages[-1][kind], (code, messages)
        # An exception's report carries its traceback; a fatal report has none to give.
        assert ("traceback" in messages[-1]) == (kind == "error"), (code, messages)


def test_the_exit_code_is_the_programs_own():
    returncode, _, _, messages = run_child({"code": "import sys\ndef main():\n    sys.exit(3)\n"})
    assert returncode == 3 and messages == [{"error": "main() exited with 3"}]
    returncode, _, _, messages = run_child({"code": "import sys\nsys.exit(4)\ndef main(): pass\n"})
    assert returncode == 4 and not any("fatal" in m for m in messages)


def test_the_program_can_come_from_a_descriptor_of_its_own():
    read_fd, write_fd = os.pipe()
    program = os.memfd_create("program")
    os.write(program, json.dumps({"code": "def main():\n    log('from the memfd')\n"}).encode())
    os.lseek(program, 0, os.SEEK_SET)
    env = {**os.environ, child.REPORT_FD_ENV: str(write_fd), child.PROGRAM_FD_ENV: str(program)}
    process = subprocess.Popen([sys.executable, "-P", "-m", "himbeerecouch.child"], stdin=subprocess.PIPE,
                               pass_fds=(write_fd, program), env=env)
    os.close(write_fd)
    os.close(program)
    assert process.wait(timeout=10) == 0
    with os.fdopen(read_fd) as report:
        assert [json.loads(line) for line in report] == [{"log": "from the memfd"}]


def test_sigterm_while_the_program_holds_the_quit_lock_does_not_hang():
    # The program registers and removes notifications in a tight loop, so a SIGTERM often
    # lands while the main thread holds the lock those calls take.
    code = """
def main():
    def noop(): pass
    while not should_quit():
        register_quit_notification(noop)
        remove_quit_notification(noop)
    log("quit seen")
"""
    for _ in range(12):
        returncode, _, err, messages = run_child({"code": code}, timeout=10, quit_after=0.3)
        assert returncode == 0, err
        assert {"log": "quit seen"} in messages


def test_programs_and_what_they_start_get_sigint_as_default():
    code = """
import subprocess
def main():
    status = subprocess.run(["grep", "SigIgn", "/proc/self/status"], capture_output=True, text=True)
    log(status.stdout.split()[1])
"""
    ignored = int(run_child({"code": code})[3][0]["log"], 16)
    assert not ignored & (1 << (signal.SIGINT - 1))


def test_program_modules_win_over_global_modules():
    spec = {"code": "import m\ndef main():\n    log(m.WHO)\n",
            "modules": {"m": "WHO = 'own'"}, "global_modules": {"m": "WHO = 'global'", "g": ""}}
    assert run_child(spec)[3] == [{"log": "own"}]


def test_get_acct_gives_the_credentials_of_the_pi():
    spec = {"code": "def main():\n    log(get_acct())\n",
            "database": {"url": "http://127.0.0.1:1", "name": "db", "credentials": ["123", "pw"]}}
    assert run_child(spec)[3] == [{"log": "('123', 'pw')"}]


def test_an_error_report_carries_the_traceback_and_stderr_still_shows_it():
    code = "def check():\n    raise KeyError('probe')\ndef main():\n    check()\n"
    returncode, _, err, messages = run_child({"code": code})
    assert returncode == child.EXIT_FAILED
    report = messages[-1]
    assert report["error"] == "main() raised KeyError: 'probe'"
    trace = report["traceback"]
    assert trace.startswith("Traceback (most recent call last):") and ", in check" in trace
    assert trace.rstrip().endswith("KeyError: 'probe'")
    assert "Traceback (most recent call last):" in err and "KeyError: 'probe'" in err


def test_a_long_traceback_is_cut_so_that_the_report_stays_one_readable_line():
    # 3000 characters that JSON escapes to 12 bytes each: whole, the line would pass the
    # daemon's longest line and be lost.
    code = "def main():\n    raise ValueError('\\U0001F600' * 3000 + ' the end')\n"
    returncode, _, _, messages = run_child({"code": code})
    assert returncode == child.EXIT_FAILED
    report = messages[-1]
    assert report["error"].startswith("main() raised ValueError: ") and report["error"].endswith(" the end")
    assert report["traceback"].startswith("[...]\n") and report["traceback"].rstrip().endswith(" the end")
    assert len(json.dumps(report)) <= child.REPORT_LINE_LIMIT
