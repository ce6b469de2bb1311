"""LAN provisioning inside the daemon: an unprovisioned Pi takes its server from a broadcast."""
import pytest

from support import DEVICE_MACID as MACID, marker_program, starts
from support import free_port, wait_for
from himbeerecouch import broadcast_message

pytestmark = pytest.mark.integration


def udp_port() -> int:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unprovisioned_pi_answers_and_follows_the_server(couch, admin, device, tmp_path):
    daemon = device(discovery_address="127.0.0.1", discovery_port=udp_port(), led_pin="")
    daemon.settings["server"] = ""               # not provisioned
    daemon.write_config()
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon.start()
    daemon.wait_log("listening for discovery")
    port = int(daemon.settings["discovery_port"])
    replies = broadcast_message(couch.url, timeout=1, address="127.0.0.1", port=port)
    assert list(replies.values())[0]["MacID"] == MACID
    password = list(replies.values())[0]["password"]
    assert password in (daemon.state_dir / "credentials.json").read_text()
    wait_for(lambda: starts(tmp_path, "p"), timeout=20, message="the program from the new server")
    assert (daemon.state_dir / "server").read_text().strip() == couch.url
    # Provisioned now: further broadcasts are ignored.
    assert broadcast_message("http://elsewhere:5984", timeout=1, address="127.0.0.1", port=port) == {}
    assert (daemon.state_dir / "server").read_text().strip() == couch.url
    # After a restart, it stays with its server and does not listen.
    assert daemon.stop() == 0
    daemon.start()
    wait_for(lambda: len(starts(tmp_path, "p")) == 2, message="the program after the restart")
    assert broadcast_message("http://elsewhere:5984", timeout=0.5, address="127.0.0.1", port=port) == {}


def test_a_configured_pi_ignores_discovery_unless_provisioning_is_open(couch, admin, device):
    closed = device(discovery_address="127.0.0.1", discovery_port=udp_port(), led_pin="")
    closed.start()
    closed.wait_log("following changes")
    assert broadcast_message(couch.url, timeout=0.5, address="127.0.0.1",
                             port=int(closed.settings["discovery_port"])) == {}
    assert "listening for discovery" not in closed.log()
    opened = device(discovery_address="127.0.0.1", discovery_port=udp_port(), led_pin="", provisioning="open")
    opened.start()
    opened.wait_log("listening for discovery")
    replies = broadcast_message(couch.url, timeout=0.5, address="127.0.0.1", port=int(opened.settings["discovery_port"]))
    assert list(replies.values())[0]["MacID"] == MACID


def test_cli_broadcast_reports_no_answer(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "himbeerecouch", "broadcast", "http://x:5984", "--timeout", "0.3",
                             "--address", "127.0.0.1", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "no answer" in result.stderr
