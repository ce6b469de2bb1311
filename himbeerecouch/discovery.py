"""LAN discovery: the original nEDM HimbeereCouch UDP protocol on port 53000.

Wire format (one UTF-8 JSON object per datagram):

* The admin broadcasts ``{"server": "<url>", ...}`` to UDP port 53000
  (:func:`broadcast_message`) and collects replies for a few seconds.
* An unprovisioned Pi (:class:`ProvisioningListener`) answers the sender's
  (ip, port) with ``{"MacID": <int>, "password": "<str>"}`` and starts
  following the server URL it was given. While it waits it blinks the LED on
  GPIO BCM 16 (0.4 s on, 0.4 s off) so that one can see which Pi is waiting.

Security caveat: the protocol has no authentication. Anyone on the LAN who
sends a datagram gets the Pi's MacID and password, and can point the Pi at a
server of their choosing. That is the original protocol's trade-off; it is why
the daemon listens only while it has no server configured, and why the
listener rate-limits its replies and never lets malformed traffic disturb it.
"""
from __future__ import annotations

import json
import logging
import selectors
import socket
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit, urlunsplit

from .config import url_problem
from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

DISCOVERY_PORT = 53000
MAX_REQUEST_BYTES = 4096
BLINK_INTERVAL = 0.4
# Datagrams read per wake-up: the loop gets back to the LED and to stop() even during a flood.
_READS_PER_WAKEUP = 64
# Senders remembered for log throttling; the oldest are forgotten first.
_MAX_THROTTLED_SENDERS = 256
_LOG_EVERY = 60.0
_LOG_LINES_PER_MINUTE = 10


# ---------------------------------------------------------------- admin side


def broadcast_message(server_name: str, send_data: dict | None = None, timeout: float = 10,
                      address: str = "<broadcast>",
                      port: int = DISCOVERY_PORT) -> dict[tuple[str, int], dict]:
    """Send ``{"server": server_name}`` (plus ``send_data``) and collect replies.

    Waits ``timeout`` seconds in total and returns ``{(ip, port): reply}`` for
    every reply that is a JSON object (a later reply from the same address
    replaces an earlier one). Other replies are ignored. Errors sending the
    request (no route, no network) are raised as OSError; a URL with `user:password@` is
    refused with ValueError.
    """
    if has_userinfo(server_name):
        # Pis refuse it, and it would cross the LAN in the clear.
        raise ValueError(f"the server URL {_redact(server_name)} carries user:password@: give the URL "
                         "alone, each Pi logs in with its own credentials")
    message = dict(send_data or {})
    message["server"] = server_name
    payload = json.dumps(message).encode("utf-8")
    replies: dict[tuple[str, int], dict] = {}
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.sendto(payload, (address, port))
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                data, sender = sock.recvfrom(65535)
            except TimeoutError:
                break
            except OSError as error:
                # Windows reports an ICMP port-unreachable here; other answers may still come.
                log.debug("discovery: receiving a reply failed: %s", error)
                continue
            try:
                reply = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                reply = None
            if isinstance(reply, dict):
                replies[(sender[0], sender[1])] = reply
            else:
                log.debug("discovery: ignoring a reply from %s:%s that is not a JSON object",
                          sender[0], sender[1])
    return replies


# ---------------------------------------------------------------- the LED


class Led(Protocol):
    """What the listener needs of an LED; tests pass a fake that records calls."""

    def on(self) -> None: ...

    def off(self) -> None: ...

    def close(self) -> None: ...


class NoLed:
    def on(self) -> None:
        pass

    def off(self) -> None:
        pass

    def close(self) -> None:
        pass


class GpioLed:
    """An LED on a BCM pin through RPi.GPIO; does nothing where RPi.GPIO is unusable.

    RPi.GPIO is imported on first use, not at import time: it is missing on a
    non-Pi, and raises RuntimeError off a Pi or without access to the GPIO.
    """

    def __init__(self, pin: int) -> None:
        self.pin = pin
        self._gpio: Any = None
        self._tried = False

    def _ready(self) -> bool:
        if not self._tried:
            self._tried = True
            try:
                import RPi.GPIO as GPIO  # type: ignore[import-not-found]
                GPIO.setwarnings(False)
                GPIO.setmode(GPIO.BCM)
                GPIO.setup(self.pin, GPIO.OUT)
                self._gpio = GPIO
            except (ImportError, RuntimeError) as error:
                log.debug("discovery: no LED on BCM %d (%s)", self.pin, error)
        return self._gpio is not None

    def _write(self, level: bool) -> None:
        if self._ready():
            try:
                self._gpio.output(self.pin, self._gpio.HIGH if level else self._gpio.LOW)
            except RuntimeError as error:
                log.debug("discovery: LED on BCM %d failed: %s", self.pin, error)

    def on(self) -> None:
        self._write(True)

    def off(self) -> None:
        self._write(False)

    def close(self) -> None:
        if self._gpio is not None:
            try:
                self._gpio.cleanup(self.pin)
            except RuntimeError as error:
                log.debug("discovery: GPIO cleanup of BCM %d failed: %s", self.pin, error)
            self._gpio = None


# ---------------------------------------------------------------- Pi side


def valid_server_url(value: object) -> bool:
    """True for an http(s) URL with a host, at most MAX_URL_LENGTH characters."""
    return isinstance(value, str) and url_problem(value) is None


def has_userinfo(url: str) -> bool:
    """Whether the URL carries `user:password@` (or a user name alone)."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return "@" in url


def _redact(url: str) -> str:
    """The URL as it may appear in a log line: scheme, host, port and path only (as couch.redact)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "(not a URL)"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class ProvisioningListener(threading.Thread):
    """Answers discovery requests with this Pi's credentials (a daemon thread).

    The socket is bound in ``__init__``, which raises OSError when the port
    cannot be had; ``start()`` then only starts the thread. So the daemon does::

        try:
            listener = ProvisioningListener(credentials=..., on_server=...)
        except OSError as error:
            log.warning("cannot listen for discovery on port %d: %s", DISCOVERY_PORT, error)
        else:
            listener.start()

    ``port=0`` binds a free port; ``listener.port`` is the bound one.

    Per valid request (at most ``max_replies_per_second`` overall, with a burst
    of one second's worth; requests over the rate are dropped unanswered):
    ``credentials()`` gives ``(macid, password)``, the reply goes to the
    sender, then ``on_server(url)`` is called when the URL differs from the
    last one accepted. If ``credentials()`` raises, nothing is sent and
    ``on_server`` is not called. Both callbacks run in the listener thread.

    ``led`` overrides the LED; by default it is RPi.GPIO's BCM ``led_pin``
    (none when ``led_pin`` is None). Counters: ``requests`` (valid ones),
    ``replies_sent``, ``dropped`` (malformed), ``rate_limited``, ``failed``
    (credentials or sending failed).
    """

    def __init__(self, *, credentials: Callable[[], tuple[int, str]],
                 on_server: Callable[[str], None], address: str = "",
                 port: int = DISCOVERY_PORT, led_pin: int | None = 16,
                 max_replies_per_second: float = 5.0, led: Led | None = None,
                 blink_interval: float = BLINK_INTERVAL) -> None:
        super().__init__(name="discovery-listener", daemon=True)
        if max_replies_per_second <= 0:
            raise ValueError("max_replies_per_second must be positive")
        self._credentials = credentials
        self._on_server = on_server
        self._bucket = TokenBucket(max_replies_per_second, max(1.0, max_replies_per_second))
        if led is not None:
            self._led: Led = led
        else:
            self._led = GpioLed(led_pin) if led_pin is not None else NoLed()
        self._blink_interval = blink_interval
        self._log_times: OrderedDict[str, float] = OrderedDict()
        self._log_bucket = TokenBucket(_LOG_LINES_PER_MINUTE / 60.0, _LOG_LINES_PER_MINUTE)
        self._led_broken = False
        self._last_url: str | None = None
        self._stopping = threading.Event()
        self._closed = False
        self._close_lock = threading.Lock()
        self.requests = 0
        self.replies_sent = 0
        self.dropped = 0
        self.rate_limited = 0
        self.failed = 0

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.address, self.port = sock.getsockname()[:2]
        # stop() writes a byte here to wake the selector at once.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- lifecycle

    def stop(self, timeout: float = 1.0) -> None:
        """Ask the thread to end and wait up to ``timeout`` seconds for it.

        The thread closes the socket and switches the LED off on its way out;
        a listener that was never started is cleaned up here.
        """
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already closed, or the wake byte is already pending
        if self.is_alive():
            if threading.current_thread() is not self:
                self.join(timeout)
        elif self.ident is None:
            self._cleanup()

    def __enter__(self) -> ProvisioningListener:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def run(self) -> None:
        if self._closed:
            return  # stopped before it was started
        log.info("discovery: listening on UDP %s:%d", self.address or "*", self.port)
        selector = selectors.DefaultSelector()
        try:
            selector.register(self._sock, selectors.EVENT_READ, "data")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            lit = True
            self._led_call("on")
            next_toggle = time.monotonic() + self._blink_interval
            while not self._stopping.is_set():
                now = time.monotonic()
                if now >= next_toggle:
                    lit = not lit
                    self._led_call("on" if lit else "off")
                    next_toggle = now + self._blink_interval
                for key, _ in selector.select(max(0.0, next_toggle - time.monotonic())):
                    if key.data == "data":
                        self._drain()
        except Exception:
            log.exception("discovery: listener failed")
        finally:
            selector.close()
            self._cleanup()
            log.info("discovery: stopped listening")

    def _cleanup(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()
        self._led_call("off")
        self._led_call("close")

    def _led_call(self, action: str) -> None:
        # A broken LED must not take discovery down with it.
        try:
            getattr(self._led, action)()
        except Exception as error:
            if not self._led_broken:
                self._led_broken = True
                log.debug("discovery: LED %s failed: %s", action, error)

    # -- requests

    def _drain(self) -> None:
        for _ in range(_READS_PER_WAKEUP):
            if self._stopping.is_set():
                return
            try:
                # One byte more than allowed: a longer datagram arrives truncated to it.
                data, sender = self._sock.recvfrom(MAX_REQUEST_BYTES + 1)
            except BlockingIOError:
                return
            except OSError as error:
                # E.g. EMSGSIZE on some systems for an oversize datagram.
                self.dropped += 1
                log.debug("discovery: receiving failed: %s", error)
                continue
            self._handle_datagram(data, sender)

    def _handle_datagram(self, data: bytes, sender: tuple[str, int]) -> None:
        url = self._parse(data)
        if not isinstance(url, str):
            self.dropped += 1
            self._log_throttled(sender[0], "discovery: dropped a datagram from %s:%d: %s",
                                sender[0], sender[1], url[0],
                                level=logging.WARNING if url[0].startswith("refused") else logging.INFO)
            return
        self.requests += 1
        if not self._bucket.take():
            self.rate_limited += 1
            self._log_throttled(sender[0], "discovery: too many requests, not answering %s:%d",
                                sender[0], sender[1])
            return
        try:
            macid, password = self._credentials()
            payload = json.dumps({"MacID": int(macid), "password": str(password)}).encode("utf-8")
        except Exception:
            self.failed += 1
            self._log_throttled("credentials", "discovery: cannot read this Pi's credentials; "
                                "not answering", level=logging.ERROR, exc_info=True)
            return
        try:
            self._sock.sendto(payload, sender)
            self.replies_sent += 1
        except OSError as error:
            self.failed += 1
            self._log_throttled(sender[0], "discovery: cannot answer %s:%d: %s",
                                sender[0], sender[1], error)
        if url != self._last_url:
            log.info("discovery: %s:%d offered server %s", sender[0], sender[1], _redact(url))
            try:
                self._on_server(url)
            except Exception:
                self._log_throttled("on_server", "discovery: handling the offered server failed",
                                    level=logging.ERROR, exc_info=True)
            else:
                self._last_url = url

    @staticmethod
    def _parse(data: bytes) -> str | tuple[str]:
        """The request's server URL, or (reason,) when the datagram is not a valid request."""
        if len(data) > MAX_REQUEST_BYTES:
            return (f"longer than {MAX_REQUEST_BYTES} bytes",)
        try:
            message = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            return ("not UTF-8",)
        except ValueError:
            return ("not JSON",)
        if not isinstance(message, dict):
            return ("not a JSON object",)
        if "server" not in message:
            return ("no 'server'",)
        if not valid_server_url(message["server"]):
            return ("'server' is not an http(s) URL",)
        if has_userinfo(message["server"]):
            # It would replace this Pi's own credentials, and land in the state dir and the logs.
            return (f"refused server {_redact(message['server'])}: it carries user:password@ "
                    "(broadcast the URL alone; this Pi logs in with its own credentials)",)
        return message["server"]

    def _log_throttled(self, key: str, message: str, *args: object, level: int = logging.INFO,
                       exc_info: bool = False) -> None:
        """Log at most once a minute per key (a sender's IP), and a few lines a minute overall."""
        now = time.monotonic()
        last = self._log_times.get(key)
        if last is not None and now - last < _LOG_EVERY:
            return
        self._log_times[key] = now
        self._log_times.move_to_end(key)
        while len(self._log_times) > _MAX_THROTTLED_SENDERS:
            self._log_times.popitem(last=False)
        # Spoofed source addresses would otherwise get one line each.
        if self._log_bucket.take():
            log.log(level, message, *args, exc_info=exc_info)
