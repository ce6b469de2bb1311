"""README's first command: the demo runs the sample program, restarts it on an edit, stops on Ctrl-C."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from support import ROOT, free_port, wait_for

pytestmark = pytest.mark.integration


class Output:
    """Everything the demo prints (its own lines, the daemon's log), collected in the background."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.text += line


def test_the_demo_as_the_readme_tells_it(tmp_path):
    port = free_port()
    demo = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port),
                             "--macid", "4242", "--workdir", str(tmp_path / "demo")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)      # its own group: Ctrl-C goes to all of it
    output = Output(demo.stdout)
    try:
        wait_for(lambda: "hello: hello from" in output.text, timeout=60, message=f"the sample program:\n{output.text}")
        # The lines the demo prints for editing the document, run as a user would paste them.
        edit = re.search(r"^  REV=.*?\n(?:^  .*\n)+", output.text, re.MULTILINE)
        assert edit, output.text
        pasted = subprocess.run(["bash", "-c", edit.group(0)], capture_output=True, text=True, timeout=30)
        assert pasted.returncode == 0 and '"ok":true' in pasted.stdout, pasted
        wait_for(lambda: "hello: edited!" in output.text, message=f"the edited program:\n{output.text}")
        assert "hello: asked to quit, bye" in output.text       # the old version was asked to stop
        os.killpg(demo.pid, signal.SIGINT)
        assert demo.wait(timeout=30) == 0, output.text
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    # Server and daemon are gone with it.
    wait_for(lambda: subprocess.run(["pgrep", "-f", "--", f"--port {port}"]).returncode == 1,
             timeout=10, message="the demo's server to stop")
    assert "Traceback" not in output.text
