"""Plumbing of the system tier: SD cards (image files) and a QEMU guest booting one of them."""
from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
MTOOLS_ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")
# Seconds spent per build step and per boot, reported at the end (build/system-test/timings.json).
TIMINGS: dict[str, object] = {}


def run(cmd: list[str], *, timeout: float = 1800, env: dict | None = None, cwd: Path | None = None,
        log: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout, env=env, cwd=cwd)
    if log is not None:
        log.write_text(result.stdout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout[-5000:]}")
    return result


def timed(label: str, function, *args, **kwargs):
    start = time.monotonic()
    try:
        return function(*args, **kwargs)
    finally:
        TIMINGS[label] = round(time.monotonic() - start, 1)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (values may be shell-quoted), as image/build-test-image writes them."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = shlex.split(line)[0].partition("=")
            values[key] = value
    return values


def macid(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


# ---- disks ----------------------------------------------------------------------------------

def flash(image: Path, card: Path) -> None:
    """A card: a copy of the image (sparse, as dd would write it to an SD card)."""
    subprocess.run(["cp", "--sparse=always", str(image), str(card)], check=True)


def boot_file(card: Path, offset: int, name: str = "himbeerecouch.txt") -> str:
    """A file of the card's FAT partition, read as any computer would (mtools, no mount)."""
    result = subprocess.run(["mtype", "-i", f"{card}@@{offset}", f"::/{name}"], env=MTOOLS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True)
    return result.stdout


def write_boot_file(card: Path, offset: int, text: str, scratch: Path, name: str = "himbeerecouch.txt") -> None:
    scratch.write_text(text)
    subprocess.run(["mcopy", "-o", "-i", f"{card}@@{offset}", str(scratch), f"::/{name}"], env=MTOOLS_ENV,
                   check=True)


def fat_file(card: Path, offset: int, name: str, target: Path) -> Path:
    """A file of the card's FAT partition copied out (mtools, no mount)."""
    subprocess.run(["mcopy", "-o", "-n", "-i", f"{card}@@{offset}", f"::/{name}", str(target)], env=MTOOLS_ENV,
                   check=True)
    return target


def pi_boot_files(card: Path, offset: int, folder: Path) -> dict[str, str]:
    """What a Pi's firmware reads from the FAT partition: config.txt's kernel and initramfs
    (copied out beside the card) and cmdline.txt's kernel command line."""
    config = boot_file(card, offset, "config.txt")
    kernel = re.search(r"^kernel=(\S+)$", config, re.MULTILINE)
    initramfs = re.search(r"^initramfs (\S+)", config, re.MULTILINE)
    assert kernel and initramfs, f"config.txt names no kernel and initramfs:\n{config}"
    return {
        "KERNEL": str(fat_file(card, offset, kernel.group(1), folder / kernel.group(1))),
        "INITRD": str(fat_file(card, offset, initramfs.group(1), folder / initramfs.group(1))),
        "CMDLINE": boot_file(card, offset, "cmdline.txt").strip(),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the guest ------------------------------------------------------------------------------

class Guest:
    """One boot of an SD card under qemu-system-aarch64 -M virt (TCG: there is no KVM for an
    arm64 guest here).

    QEMU cannot run a Pi's boot firmware, so it loads the kernel and initramfs that config.txt
    names, with cmdline.txt's command line (`pi_boot_files`), as the firmware would. virt has
    one serial port (ttyAMA0): it is added as the last console, which gets what a Pi shows on
    its screen: `console.log`. The disk is the card itself (raw), so that its FAT partition can
    be read afterwards. SSH is forwarded to the host's 127.0.0.1:`ssh_port`.
    """

    def __init__(self, name: str, disk: Path, boot: dict[str, str], mac: str, folder: Path,
                 memory_mb: int = 1024) -> None:
        self.name = name
        self.disk = disk
        self.boot = boot
        self.mac = mac
        self.folder = folder
        self.memory_mb = memory_mb
        self.console_path = folder / f"{name}-console.log"
        self.qmp_path = folder / f"{name}.qmp"
        self.ssh_port = free_port()
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.marks: dict[str, float] = {}

    def command(self) -> list[str]:
        return [
            "qemu-system-aarch64", "-nodefaults", "-machine", "virt", "-cpu", "cortex-a72", "-accel", "tcg",
            "-m", str(self.memory_mb), "-smp", "2", "-display", "none", "-monitor", "none",
            "-serial", f"file:{self.console_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-kernel", self.boot["KERNEL"], "-initrd", self.boot["INITRD"],
            "-append", f"{self.boot['CMDLINE']} console=ttyAMA0,115200",
            "-drive", f"file={self.disk},if=virtio,format=raw",
            "-nic", f"user,model=virtio-net-pci,mac={self.mac},hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-rng-pci",
            "-no-reboot",
        ]

    def start(self) -> None:
        for path in (self.console_path, self.qmp_path):
            path.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                        stdout=open(self.folder / f"{self.name}-qemu.log", "wb"),
                                        stderr=subprocess.STDOUT)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def mark(self, label: str) -> float:
        """Seconds since QEMU started, recorded under `label` (the first time only)."""
        self.marks.setdefault(label, self.elapsed())
        return self.marks[label]

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return ANSI.sub("", path.read_bytes().decode("utf-8", "replace"))
        except FileNotFoundError:
            return ""

    def console(self) -> str:
        return self._read(self.console_path)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_console(self, pattern: str, timeout: float, label: str | None = None) -> re.Match:
        """The first match of `pattern` (a regex, multiline) on the console."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console())
            if match:
                if label:
                    self.mark(label)
                return match
            if not self.running():
                raise AssertionError(f"{self.name}: QEMU exited ({self.process.returncode}) before "
                                     f"{pattern!r} appeared:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} on the console after {timeout} s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, chars: int = 4000) -> str:
        return f"--- console ({self.console_path}) ---\n{self.console()[-chars:]}"

    def _qmp(self, *commands: str) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_path))
            stream = sock.makefile("rw")
            stream.readline()                                     # the greeting
            for command in ("qmp_capabilities", *commands):
                stream.write(json.dumps({"execute": command}) + "\n")
                stream.flush()
                stream.readline()

    def poweroff(self, timeout: float = 120.0) -> str:
        """The power button (virt's GPIO key, which systemd-logind takes), as a person would
        press it; a kill when nothing happens.

        Returns "clean" or "killed".
        """
        if not self.running():
            return "exited"
        try:
            self._qmp("system_powerdown")
            self.process.wait(timeout=timeout)
            return "clean"
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
            return "killed"

    def kill(self) -> None:
        if self.running():
            self.process.kill()
            self.process.wait(timeout=30)

