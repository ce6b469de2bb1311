"""LAN discovery (UDP port 53000 protocol); all traffic stays on 127.0.0.1."""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
import types

import pytest

from himbeerecouch import discovery
from himbeerecouch.discovery import GpioLed, ProvisioningListener, broadcast_message

URL = "http://couch.example:5984/"


class FakeLed:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on(self) -> None:
        self.calls.append("on")

    def off(self) -> None:
        self.calls.append("off")

    def close(self) -> None:
        self.calls.append("close")


class Recorder:
    def __init__(self) -> None:
        self.urls: list[str] = []

    def __call__(self, url: str) -> None:
        self.urls.append(url)

    def wait_for(self, count: int, timeout: float = 1.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.urls) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.urls


@pytest.fixture
def make_listener():
    listeners: list[ProvisioningListener] = []

    def factory(**kwargs) -> ProvisioningListener:
        kwargs.setdefault("credentials", lambda: (123, "pw"))
        kwargs.setdefault("on_server", Recorder())
        kwargs.setdefault("led", FakeLed())
        listener = ProvisioningListener(address="127.0.0.1", port=0, **kwargs)
        listeners.append(listener)
        listener.start()
        return listener

    yield factory
    for listener in listeners:
        listener.stop()


def client(timeout: float = 0.5) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(timeout)
    return sock


def request(server: object = URL) -> bytes:
    return json.dumps({"server": server}).encode()


def ask(port: int, payload: bytes | None = None, timeout: float = 0.5) -> dict | None:
    with client(timeout) as sock:
        sock.sendto(payload or request(), ("127.0.0.1", port))
        try:
            return json.loads(sock.recv(65535))
        except TimeoutError:
            return None


def test_round_trip(make_listener):
    listener = make_listener()
    started = time.monotonic()
    replies = broadcast_message(URL, timeout=1, address="127.0.0.1", port=listener.port)
    assert 0.9 <= time.monotonic() - started < 1.5
    assert replies == {("127.0.0.1", listener.port): {"MacID": 123, "password": "pw"}}
    assert listener._on_server.wait_for(1) == [URL]
    assert (listener.requests, listener.replies_sent, listener.dropped) == (1, 1, 0)


def test_on_server_is_called_only_when_the_url_changes(make_listener):
    recorder = Recorder()
    listener = make_listener(on_server=recorder)
    other = "https://couch.example/"
    for url in (URL, URL, other, other, URL):
        assert ask(listener.port, request(url)) == {"MacID": 123, "password": "pw"}
    assert recorder.wait_for(3) == [URL, other, URL]
    time.sleep(0.05)
    assert recorder.urls == [URL, other, URL]


def test_on_server_failing_is_retried_and_does_not_stop_the_listener(make_listener):
    calls = []

    def on_server(url):
        calls.append(url)
        if len(calls) == 1:
            raise OSError("disk full")

    listener = make_listener(on_server=on_server)
    assert ask(listener.port) is not None
    assert ask(listener.port) is not None
    time.sleep(0.05)
    assert calls == [URL, URL]  # the first failed, so the same URL is offered again
    assert ask(listener.port) is not None
    time.sleep(0.05)
    assert calls == [URL, URL]


def test_send_data_is_merged_and_non_object_replies_are_ignored():
    server = client(timeout=2)
    port = server.getsockname()[1]
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(broadcast_message(
        URL, send_data={"extra": [1, 2], "server": "http://other/"}, timeout=0.5,
        address="127.0.0.1", port=port)))
    thread.start()
    try:
        data, sender = server.recvfrom(65535)
        assert json.loads(data.decode("utf-8")) == {"extra": [1, 2], "server": URL}
        for payload in (b"not json", b"[1, 2]", b"\xff\xfe", b'"text"', b'{"MacID": 7}'):
            server.sendto(payload, sender)
        with client() as second:
            second.sendto(b'{"MacID": 8, "password": "x"}', sender)
            second_port = second.getsockname()[1]
            thread.join(2)
    finally:
        server.close()
    assert not thread.is_alive()
    assert result == {("127.0.0.1", port): {"MacID": 7},
                      ("127.0.0.1", second_port): {"MacID": 8, "password": "x"}}


def test_broadcast_message_without_answers_returns_empty_after_the_timeout():
    with client() as silent:
        started = time.monotonic()
        assert broadcast_message(URL, timeout=0.3, address="127.0.0.1",
                                 port=silent.getsockname()[1]) == {}
        assert 0.25 <= time.monotonic() - started < 0.8


MALFORMED = [
    b"\x00\x01garbage\xff",
    "{\"server\": \"http://h\u00e9\"}".encode("latin-1"),  # not UTF-8
    b'["server", "http://x/"]',
    b'{"url": "http://x/"}',
    b'{"server": 5}',
    b'{"server": "ftp://x"}',
    b'{"server": "notaurl"}',
    b'{"server": "http://"}',
    b'{"server": "http://x:99999/"}',
    b'{"server": "http://x/\\nInjected: 1"}',
    json.dumps({"server": "http://x/" + "a" * 2100}).encode(),
    b"{" + b" " * 4096 + b"}",  # valid JSON but over 4096 bytes
    json.dumps({"server": URL, "pad": "x" * 60000}).encode(),  # oversize 60000-byte datagram
]


def test_malformed_datagrams_get_no_reply_and_do_not_stop_the_listener(make_listener):
    recorder = Recorder()
    listener = make_listener(on_server=recorder)
    with client(timeout=1) as sock:
        for payload in MALFORMED:
            sock.sendto(payload, ("127.0.0.1", listener.port))
        sock.sendto(request(), ("127.0.0.1", listener.port))
        # Loopback keeps the order, so a reply to a malformed datagram would come first.
        assert json.loads(sock.recv(65535)) == {"MacID": 123, "password": "pw"}
        sock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            sock.recv(65535)
    assert listener.dropped == len(MALFORMED)
    assert (listener.requests, listener.replies_sent) == (1, 1)
    assert recorder.wait_for(1) == [URL]
    assert listener.is_alive()


def test_log_throttle_is_bounded(make_listener, caplog):
    listener = make_listener()
    caplog.set_level("DEBUG", logger="himbeerecouch.discovery")
    with client(timeout=1) as sock:
        for _ in range(50):
            sock.sendto(b"junk", ("127.0.0.1", listener.port))
        sock.sendto(request(), ("127.0.0.1", listener.port))
        assert sock.recv(65535)
    dropped_lines = [r for r in caplog.records if "dropped a datagram" in r.getMessage()]
    assert len(dropped_lines) == 1
    # Many distinct senders: the memory used for throttling stays bounded.
    for index in range(1000):
        listener._log_throttled(f"10.0.{index // 256}.{index % 256}", "x")
    assert len(listener._log_times) <= discovery._MAX_THROTTLED_SENDERS


def test_a_flood_is_rate_limited_and_the_listener_stays_responsive(make_listener):
    rate = 5.0
    listener = make_listener(max_replies_per_second=rate)
    started = time.monotonic()
    replies = 0
    with client(timeout=0.05) as sock:
        for _ in range(500):
            sock.sendto(request(), ("127.0.0.1", listener.port))
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            try:
                sock.recv(65535)
                replies += 1
            except TimeoutError:
                pass
    elapsed = time.monotonic() - started
    assert 1 <= replies <= rate + rate * elapsed + 1
    assert listener.replies_sent == replies
    assert listener.rate_limited >= 400 or listener.requests < 500  # the kernel may drop some
    time.sleep(0.25)  # one token back
    assert ask(listener.port, timeout=1) == {"MacID": 123, "password": "pw"}


def test_credentials_failing_sends_nothing_and_the_listener_survives(make_listener):
    broken = [True]

    def credentials():
        if broken[0]:
            raise OSError("cannot read the password file")
        return 123, "pw"

    recorder = Recorder()
    listener = make_listener(credentials=credentials, on_server=recorder)
    assert ask(listener.port, timeout=0.3) is None
    assert listener.is_alive() and listener.failed == 1
    assert recorder.urls == []
    broken[0] = False
    assert ask(listener.port) == {"MacID": 123, "password": "pw"}
    assert recorder.wait_for(1) == [URL]


def test_stop_ends_the_thread_promptly_and_frees_the_port(make_listener):
    led = FakeLed()
    listener = make_listener(led=led)
    port = listener.port
    assert ask(port) is not None
    started = time.monotonic()
    listener.stop()
    assert time.monotonic() - started < 1.0
    assert not listener.is_alive()
    assert led.calls[-2:] == ["off", "close"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))  # would fail if the listener still held it
    listener.stop()  # twice is harmless


def test_stop_before_start_closes_and_start_then_does_nothing():
    led = FakeLed()
    listener = ProvisioningListener(credentials=lambda: (1, "p"), on_server=lambda url: None,
                                    address="127.0.0.1", port=0, led=led)
    listener.stop()
    assert led.calls == ["off", "close"]
    listener.start()
    listener.join(1)
    assert not listener.is_alive()


def test_binding_a_taken_port_raises_oserror_in_init():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))  # no SO_REUSEADDR: nobody else may bind it
        with pytest.raises(OSError):
            ProvisioningListener(credentials=lambda: (1, "p"), on_server=lambda url: None,
                                 address="127.0.0.1", port=taken.getsockname()[1])


def test_the_led_blinks_while_listening_and_is_off_after_stop(make_listener):
    led = FakeLed()
    listener = make_listener(led=led, blink_interval=0.05)
    time.sleep(0.4)
    blinking = list(led.calls)
    assert blinking[0] == "on" and len(blinking) >= 4
    assert all(a != b for a, b in zip(blinking, blinking[1:]))  # strictly alternating
    listener.stop()
    assert led.calls[-2:] == ["off", "close"]


def test_the_default_blink_is_0_4_seconds(make_listener):
    led = FakeLed()
    listener = make_listener(led=led)
    time.sleep(0.6)
    assert led.calls == ["on", "off"]
    listener.stop()


@pytest.fixture
def no_gpio(monkeypatch):
    # None in sys.modules makes the import raise ImportError, as on a machine without RPi.GPIO.
    monkeypatch.setitem(sys.modules, "RPi", None)
    monkeypatch.setitem(sys.modules, "RPi.GPIO", None)


def fake_gpio(monkeypatch, setup_error: Exception | None = None) -> list:
    calls: list = []
    gpio = types.ModuleType("RPi.GPIO")
    gpio.BCM, gpio.OUT, gpio.HIGH, gpio.LOW = "BCM", "OUT", 1, 0
    gpio.setwarnings = lambda flag: None
    gpio.setmode = lambda mode: calls.append(("setmode", mode))

    def setup(pin, mode):
        if setup_error is not None:
            raise setup_error
        calls.append(("setup", pin, mode))

    gpio.setup = setup
    gpio.output = lambda pin, level: calls.append(("output", pin, level))
    gpio.cleanup = lambda pin: calls.append(("cleanup", pin))
    package = types.ModuleType("RPi")
    package.GPIO = gpio
    monkeypatch.setitem(sys.modules, "RPi", package)
    monkeypatch.setitem(sys.modules, "RPi.GPIO", gpio)
    return calls


def test_default_led_without_rpi_gpio_does_nothing(no_gpio, make_listener):
    led = GpioLed(16)
    led.on()
    led.off()
    led.close()
    # The default LED (BCM 16) in a running listener: no error, discovery works.
    listener = make_listener(led=None)
    assert isinstance(listener._led, GpioLed)
    assert ask(listener.port) == {"MacID": 123, "password": "pw"}
    listener.stop()
    assert not listener.is_alive()


def test_default_led_off_a_pi_runtime_error_does_nothing(monkeypatch):
    fake_gpio(monkeypatch, setup_error=RuntimeError("This module can only be run on a Raspberry Pi!"))
    led = GpioLed(16)
    led.on()
    led.off()
    led.close()


def test_default_led_drives_rpi_gpio_when_present(monkeypatch):
    calls = fake_gpio(monkeypatch)
    led = GpioLed(16)
    led.on()
    led.off()
    led.close()
    assert calls == [("setmode", "BCM"), ("setup", 16, "OUT"), ("output", 16, 1),
                     ("output", 16, 0), ("cleanup", 16)]


def test_led_pin_none_disables_the_led(make_listener):
    listener = make_listener(led=None, led_pin=None)
    assert isinstance(listener._led, discovery.NoLed)


@pytest.mark.parametrize("url,ok", [
    ("http://host/", True), ("https://h:6984/db", True), ("http://[::1]:5984/", True),
    ("ftp://x", False), ("notaurl", False), ("http://", False), ("http://[::1/", False),
    ("http://h/\t", False), ("", False), (None, False), ("http://h/" + "a" * 2048, False),
])
def test_valid_server_url(url, ok):
    assert discovery.valid_server_url(url) is ok


@pytest.mark.parametrize("url", ["http://admin:hunter2@couch.example:5984/", "https://admin@couch.example/db",
                                 "http://:hunter2@couch.example/"])
def test_a_server_url_with_user_info_is_refused_and_its_password_never_logged(make_listener, caplog, url):
    # It would replace the Pi's own credentials and end up in the state dir and the logs.
    caplog.set_level("DEBUG", logger="himbeerecouch.discovery")
    recorder = Recorder()
    listener = make_listener(on_server=recorder)
    assert ask(listener.port, request(url), timeout=0.3) is None
    assert ask(listener.port, request(URL)) == {"MacID": 123, "password": "pw"}
    assert recorder.wait_for(1) == [URL]
    assert (listener.dropped, listener.requests) == (1, 1)
    refused = [r for r in caplog.records if "user:password@" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelname == "WARNING"
    assert "couch.example" in refused[0].getMessage()
    assert "hunter2" not in caplog.text and "admin" not in caplog.text


def test_the_offered_server_is_logged_without_its_query(make_listener, caplog):
    caplog.set_level("INFO", logger="himbeerecouch.discovery")
    listener = make_listener()
    assert ask(listener.port, request("http://couch.example:5984/?token=s3cret")) is not None
    listener._on_server.wait_for(1)
    assert "offered server http://couch.example:5984/" in caplog.text and "s3cret" not in caplog.text


def test_broadcast_refuses_a_url_with_user_info():
    with client() as silent:
        with pytest.raises(ValueError, match="user:password@") as refused:
            broadcast_message("http://admin:hunter2@couch.example:5984", timeout=0.1, address="127.0.0.1",
                              port=silent.getsockname()[1])
        assert "hunter2" not in str(refused.value)
        silent.settimeout(0.1)
        with pytest.raises(TimeoutError):
            silent.recv(65535)
