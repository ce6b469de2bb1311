"""What the benchmarks share: a test server with one daemon on a fresh database, and percentiles."""
from __future__ import annotations

import contextlib
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import DEVICE_MACID, AdminClient, DaemonProcess, make_server  # noqa: E402

MACID = DEVICE_MACID


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@contextlib.contextmanager
def server_and_daemon(**settings) -> Iterator[tuple[AdminClient, DaemonProcess, Path]]:
    """A running test server, a fresh database and a daemon for it (not started yet)."""
    with tempfile.TemporaryDirectory(prefix="hc-bench-") as tmp:
        tmp_path = Path(tmp)
        server = make_server(tmp_path)
        server.start()
        daemon = None
        try:
            admin = AdminClient(server.url, f"bench_{uuid.uuid4().hex[:8]}")
            admin.create_db()
            (tmp_path / "daemon").mkdir()
            daemon = DaemonProcess(tmp_path / "daemon", server.admin_url, admin.db, MACID,
                                   feed_heartbeat_seconds=10, status_interval_seconds=30, **settings)
            yield admin, daemon, tmp_path
        finally:
            if daemon is not None:
                daemon.stop()
            server.stop()
