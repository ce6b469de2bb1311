"""Property-based: no boot file and no config file, however wrong, makes config.load fail.

Random bad values for every key (and junk lines, a BOM, CRLF, bytes that are not UTF-8) in both
sources: load never raises, every bad value is logged with its key, the result holds only valid
values. HIMBEERECOUCH_SOAK=1 runs many more examples.
"""
from __future__ import annotations

import configparser
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from himbeerecouch import config
from himbeerecouch.config import Config

SOAK = os.environ.get("HIMBEERECOUCH_SOAK") == "1"
EXAMPLES = 2000 if SOAK else 60
FIELDS = {field.name: field for field in dataclasses.fields(Config)}
BOOT_KEYS = sorted(key for key in FIELDS if key != "boot_config")


def valid(key: str, text: str) -> bool:
    try:
        config.VALIDATORS[key](text)
    except ValueError:
        return False
    return True


def holds_only_valid_values(loaded: Config) -> None:
    """Every value of the result is one its validator accepts (or the default)."""
    for key, field in FIELDS.items():
        value = getattr(loaded, key)
        if value == field.default:
            continue
        text = "" if value is None else str(value)
        assert valid(key, text), (key, value)
        assert config.VALIDATORS[key](text) == value, (key, value)


# Text a person or a broken card may put in a value: near misses of real values, numbers of
# every kind, and arbitrary characters (no line breaks: a value is one line).
NEAR_MISSES = st.sampled_from([
    "", " ", "nan", "inf", "-inf", "1e309", "1e300", "-0", "0", "-1", "0x", "1.5", "08", "1_000", "١٢",
    "AUTO ", "Legacy", "yes", "on", "DEBUG!", "warn", "http://", "http://h:0", "http://h:65536",
    "https://u:p@", "ftp://h", "/", "relative/path", "eth0 wlan0", "127.0.0.256", "\x00", "\ufeff",
    "\u2028", "\x0b", "#comment", ";x", "[himbeerecouch]", "=", "a = b", "'quoted'", '"16"', "27.0", "28",
    str(2 ** 48), str(2 ** 64), "9" * 5000,
])
LINE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=40)
VALUES = st.one_of(NEAR_MISSES, LINE_TEXT, st.integers().map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
def _not_a_section(line: str | bytes) -> bool:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    return not text.strip().startswith("[")


# Lines that are no setting of a known key; a section header would rightly hide what follows.
JUNK_LINES = st.one_of(LINE_TEXT, st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b)
                       ).filter(_not_a_section)


@st.composite
def settings_file(draw, keys: list[str]) -> tuple[list[tuple[str, str]], list[bytes]]:
    """(key, value) pairs and the lines of a file that holds them among junk."""
    pairs = draw(st.lists(st.tuples(st.sampled_from(keys), VALUES), max_size=len(keys)))
    lines: list[bytes] = []
    for key, value in pairs:
        lines += [junk if isinstance(junk, bytes) else junk.encode("utf-8", "surrogatepass")
                  for junk in draw(st.lists(JUNK_LINES, max_size=2))]
        separator = draw(st.sampled_from([" = ", "=", ": ", " =\t"]))
        lines.append(f"{key}{separator}{value}".encode("utf-8", "surrogatepass"))
    return pairs, lines


def join(lines: list[bytes], bom: bool, crlf: bool) -> bytes:
    return (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines) + b"\n"


def is_setting(line: bytes) -> bool:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    text = text.strip()
    return bool(text) and text[0] not in "#;[" and ("=" in text or ":" in text)


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def load_logged(conffile: Path) -> tuple[Config, str]:
    handler = Captured()
    logger = logging.getLogger("himbeerecouch.config")
    logger.addHandler(handler)
    default_boot_file, config.DEFAULT_BOOT_FILE = config.DEFAULT_BOOT_FILE, str(conffile.parent / "none.txt")
    try:
        loaded = config.load(conffile)
    finally:
        config.DEFAULT_BOOT_FILE = default_boot_file
        logger.removeHandler(handler)
    return loaded, "\n".join(handler.lines)


PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY_SETTINGS
@given(boot=settings_file(BOOT_KEYS), bom=st.booleans(), crlf=st.booleans())
def test_any_boot_file_leaves_a_valid_configuration(boot, bom, crlf):
    pairs, lines = boot
    with tempfile.TemporaryDirectory() as folder:
        boot_file = Path(folder) / "himbeerecouch.txt"
        boot_file.write_bytes(join(lines, bom, crlf))
        conffile = Path(folder) / "c.conf"
        conffile.write_text(f"[himbeerecouch]\nprovisioning = off\nboot_config = {boot_file}\n")
        loaded, logged = load_logged(conffile)
    holds_only_valid_values(loaded)
    assert loaded.boot_config == str(boot_file)
    expected: dict = {}
    for key, value in pairs:
        if valid(key, value):
            expected[key] = config.VALIDATORS[key](value)     # the last good line of a key wins
        else:
            assert f"ignoring {key} = " in logged, (key, value, logged)
    for key in BOOT_KEYS:
        fallback = "off" if key == "provisioning" else FIELDS[key].default   # the config file's, else the default
        assert getattr(loaded, key) == expected.get(key, fallback), key


@PROPERTY_SETTINGS
@given(conf=settings_file(BOOT_KEYS), bom=st.booleans(), crlf=st.booleans(), header=st.booleans())
def test_any_config_file_leaves_a_valid_configuration(conf, bom, crlf, header):
    _, lines = conf
    head = [b"[himbeerecouch]"] if header else []
    data = join(head + [b"boot_config ="] + lines, bom, crlf)
    with tempfile.TemporaryDirectory() as folder:
        conffile = Path(folder) / "c.conf"
        conffile.write_bytes(data)
        loaded, logged = load_logged(conffile)
    holds_only_valid_values(loaded)
    # The INI reading is configparser's; what it reads must be checked key by key.
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, configparser.Error):
        assert "cannot use the config file" in logged and loaded == Config(), logged
        return
    for key, value in parser.items(config.SECTION):
        if key not in FIELDS:
            continue
        if valid(key, value):
            assert getattr(loaded, key) == config.VALIDATORS[key](value), key
        else:
            assert f"ignoring {key} = " in logged and getattr(loaded, key) == FIELDS[key].default, key


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=2000))
def test_any_bytes_as_boot_file_never_break_the_load(data):
    with tempfile.TemporaryDirectory() as folder:
        boot_file = Path(folder) / "himbeerecouch.txt"
        boot_file.write_bytes(data)
        conffile = Path(folder) / "c.conf"
        conffile.write_text(f"[himbeerecouch]\nboot_config = {boot_file}\n")
        loaded, _ = load_logged(conffile)
    holds_only_valid_values(loaded)


@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.binary(max_size=2000))
def test_any_bytes_as_config_file_never_break_the_load(data):
    with tempfile.TemporaryDirectory() as folder:
        conffile = Path(folder) / "c.conf"
        conffile.write_bytes(data)
        loaded, _ = load_logged(conffile)
    holds_only_valid_values(loaded)
