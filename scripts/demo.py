"""The demo behind scripts/demo (run with the project's virtualenv)."""
from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import requests

ROOT = Path(__file__).resolve().parent.parent
DATABASE = "nedm/raspberries"
ADMIN = ("admin", "demo")

SAMPLE = '''import socket, time

def main():
    n = 0
    while not should_quit():
        n += 1
        log("hello from %s, tick %d" % (socket.gethostname(), n))
        for _ in range(20):          # 2 s, but quick to notice a quit request
            if should_quit():
                break
            time.sleep(0.1)
    log("asked to quit, bye")
'''


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Run himbeerecouch against a local test server.")
    parser.add_argument("--port", type=int, default=5984)
    parser.add_argument("--macid", type=int, help="MacID to use (default: this machine's)")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "demo",
                        help="config and state of the demo's daemon (default: .cache/demo)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from himbeerecouch.identity import IdentityError, getmacid
    try:
        macid = args.macid or getmacid()
    except IdentityError as error:
        print(f"demo: {error}; pass --macid N", file=sys.stderr)
        return 2
    port = args.port
    while not port_free(port):
        port += 1
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    server = subprocess.Popen([str(ROOT / "scripts" / "couch-server"), "--port", str(port),
                               "--admin", ":".join(ADMIN)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)   # we stop it ourselves, after the daemon
    daemon = None
    try:
        line = server.stdout.readline()
        if not line.startswith("ready"):
            print("demo: the test server did not start", file=sys.stderr)
            return 1
        base = f"http://{ADMIN[0]}:{ADMIN[1]}@127.0.0.1:{port}"
        db_url = f"{base}/{quote(DATABASE, safe='')}"
        requests.put(db_url, timeout=10)
        doc_url = f"{db_url}/demo-hello"
        current = requests.get(doc_url, timeout=10).json()
        doc = {"type": macid, "name": "hello", "code": SAMPLE}
        if "_rev" in current:
            doc["_rev"] = current["_rev"]
        requests.put(doc_url, json=doc, timeout=10).raise_for_status()

        config = workdir / "himbeerecouch.conf"
        config.write_text("[himbeerecouch]\n"
                          f"server = {base}\n"
                          f"database = {DATABASE}\n"
                          f"macid = {macid}\n"
                          f"state_dir = {workdir / 'state'}\n"
                          "grace_seconds = 5\n")
        edit = json.dumps({"type": macid, "name": "hello",
                           "code": 'def main():\n    log("edited!")\n'})
        print(f"""
himbeerecouch demo: server http://127.0.0.1:{port} (admin {ADMIN[0]}:{ADMIN[1]}), database {DATABASE},
MacID {macid}. The sample program is the document demo-hello. Edit it from another terminal:

  REV=$(curl -s {doc_url} | python3 -c 'import json,sys; print(json.load(sys.stdin)["_rev"])')
  curl -X PUT "{doc_url}?rev=$REV" -H 'Content-Type: application/json' \\
       -d '{edit}'

and watch the program restart. Ctrl-C stops everything.
""", flush=True)
        daemon = subprocess.Popen([sys.executable, "-m", "himbeerecouch", "run", "--config", str(config)])
        while daemon.poll() is None:
            try:
                daemon.wait()
            except KeyboardInterrupt:
                pass        # the daemon got the same Ctrl-C and is stopping its programs
        return daemon.returncode
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.terminate()
            daemon.wait()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
