"""A TCP relay in front of the test server, to make the server go away or go silent on demand.

The server behind it is real; the relay only decides whether bytes pass:
- `down()`: close every connection and refuse new ones (a server that went away);
- `freeze()`: keep connections open but pass no byte (half-open TCP, a pulled cable);
- `up()`: back to normal.
"""
from __future__ import annotations

import selectors
import socket
import threading


class Relay:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener: socket.socket | None = None
        self.port = 0
        self.frozen = False
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._listen()
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self.listener = listener
        with self._lock:
            self._selector.register(listener, selectors.EVENT_READ, None)

    def down(self) -> None:
        with self._lock:
            if self.listener is not None:
                self._selector.unregister(self.listener)
                self.listener.close()
                self.listener = None
            for a, b in self._pairs:
                for s in (a, b):
                    try:
                        self._selector.unregister(s)
                    except (KeyError, ValueError):
                        pass
                    s.close()
            self._pairs.clear()

    def freeze(self) -> None:
        self.frozen = True

    def up(self) -> None:
        self.frozen = False
        if self.listener is None:
            self._listen()

    def close(self) -> None:
        self._stopped = True
        self.down()

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                keys = list(self._selector.get_map().values()) if self._selector.get_map() else []
            if not keys:
                threading.Event().wait(0.05)
                continue
            try:
                events = self._selector.select(0.05)
            except (OSError, ValueError):
                continue
            for key, _ in events:
                with self._lock:
                    if key.data is None:
                        if self.listener is None or key.fileobj is not self.listener:
                            continue
                        try:
                            client, _ = self.listener.accept()
                            upstream = socket.create_connection(self.target)
                        except OSError:
                            continue
                        self._pairs.append((client, upstream))
                        self._selector.register(client, selectors.EVENT_READ, upstream)
                        self._selector.register(upstream, selectors.EVENT_READ, client)
                        continue
                    if self.frozen:
                        continue          # leave the bytes in the kernel: nothing passes
                    source, sink = key.fileobj, key.data
                    try:
                        data = source.recv(65536)
                        if data:
                            sink.sendall(data)
                            continue
                    except OSError:
                        pass
                    for s in (source, sink):
                        try:
                            self._selector.unregister(s)
                        except (KeyError, ValueError):
                            pass
                        s.close()
                    self._pairs = [p for p in self._pairs if source not in p]
            if self.frozen:
                threading.Event().wait(0.05)   # frozen sockets stay readable: do not spin
