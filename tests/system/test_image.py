"""The SD card image, booted: first boot, a program pushed from the host, a second boot, a clone.

One card (a copy of the test image, its boot file edited as on any computer before first
boot) boots three times under QEMU: first with the MAC b8:27:eb:12:34:56; again with the same
MAC; then a copy of that booted disk (a clone of the card) with b8:27:eb:65:43:21.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from guest import TIMINGS, Guest, boot_file, copy_disk, flash, macid, overlay, run, write_boot_file
from support import ADMIN, wait_for

MAC_1 = "b8:27:eb:12:34:56"
MAC_2 = "b8:27:eb:65:43:21"
DATABASE = "nedm/raspberries"
BOOT_TIMEOUT = 420          # to the login prompt, under TCG on a busy machine
RUNNING_TIMEOUT = 300       # from the CouchDB user's creation to the program's RUNNING
CREDENTIALS = re.compile(
    r"^himbeerecouch: (?P<headline>NEW device credentials: create this CouchDB user|device credentials)\n"
    r"himbeerecouch:   MacID \(user name\): (?P<macid>\d+)\n"
    r"himbeerecouch:   password:          (?P<password>\S+)$", re.MULTILINE)
PROGRAM = '''\
import time

def main():
    log("hello from the SD card image")
    while not should_quit():
        time.sleep(1)
'''


class Story:
    """What the steps share: the server, the disks, the guests and what they printed."""

    def __init__(self, folder: Path, couch, image: dict[str, str]) -> None:
        self.folder = folder
        self.couch = couch
        self.image = image
        self.card = folder / "card.img"
        self.first_disk = folder / "pi-1.qcow2"
        self.clone_disk = folder / "pi-2-clone.qcow2"
        self.guests: list[Guest] = []
        self.credentials: dict[str, dict] = {}
        self.first_started = ""
        self.env = dict(os.environ, COUCHDB_URL=couch.url, COUCHDB_USER=ADMIN[0], COUCHDB_PASSWORD=ADMIN[1],
                        COUCHDB_DATABASE=DATABASE)

    def operator(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """The operator's command line (`himbeerecouch ...`) on the host."""
        result = subprocess.run([sys.executable, "-m", "himbeerecouch", *args], input=input, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, timeout=timeout)
        assert result.returncode == 0, f"himbeerecouch {' '.join(args)} exited {result.returncode}:\n{result.stdout}"
        return result

    def boot(self, name: str, disk: Path, mac: str) -> Guest:
        guest = Guest(name, disk, self.image, mac, self.folder)
        self.guests.append(guest)
        guest.start()
        return guest

    def credentials_on_console(self, guest: Guest) -> dict:
        match = guest.wait_console(CREDENTIALS.pattern, BOOT_TIMEOUT, label="credentials on the console")
        found = match.groupdict()
        self.credentials[guest.name] = found
        return found

    def heartbeat(self, device: int) -> dict | None:
        response = requests.get(f"{self.couch.url}/{DATABASE.replace('/', '%2F')}/{device}_heartbeat",
                                auth=ADMIN, timeout=10)
        return response.json() if response.status_code == 200 else None

    def program_running(self, device: int, doc_id: str) -> dict | None:
        status = self.heartbeat(device)
        if status and status.get("programs", {}).get(doc_id, {}).get("state") == "RUNNING" \
                and doc_id in status.get("running_ids", []):
            return status
        return None

    def wait_running(self, guest: Guest, device: int, doc_id: str, not_started: str | None = None) -> dict:
        """The status document says the program runs (written by a daemon started later than
        `not_started`, the `started` of an earlier boot's daemon)."""
        def check():
            if not guest.running():
                raise AssertionError(f"{guest.name}: QEMU exited ({guest.process.returncode}):\n{guest.tail()}")
            status = self.program_running(device, doc_id)
            return status if status and status.get("started") != not_started else None

        status = wait_for(check, timeout=RUNNING_TIMEOUT, interval=1,
                          message=f"{doc_id} RUNNING in {device}_heartbeat ({guest.name}); last status: "
                                  f"{self.heartbeat(device)}\n{guest.tail()}")
        guest.mark("program RUNNING")
        return status

    def record(self, guest: Guest) -> None:
        TIMINGS[f"boot {guest.name}"] = dict(guest.marks)


@pytest.fixture(scope="class")
def story(workdir, couch, image):
    story = Story(workdir / "boots", couch, image)
    yield story
    for guest in story.guests:
        guest.kill()


@pytest.mark.system_steps
class TestSdCardImage:
    def test_image_is_clone_ready(self, story):
        rootfs = Path(story.image["ROOTFS"])
        state = rootfs / "var" / "rspby"
        assert state.is_dir() and not any(state.iterdir()), sorted(p.name for p in state.iterdir())
        owner = run(["chroot", str(rootfs), "stat", "-c", "%U:%G %a", "/var/rspby"]).stdout.strip()
        assert owner == "rspby:rspby 750"
        assert not (rootfs / "etc" / "issue.d" / "himbeerecouch.issue").exists()
        assert (rootfs / "etc" / "machine-id").read_text().strip() == "uninitialized"
        found = run(["find", str(rootfs), "-xdev", "-name", "credentials.json*"]).stdout.strip()
        assert found == ""
        # No SSH host keys (none are installed in the test image; pi-gen removes them in stage2).
        assert not list((rootfs / "etc" / "ssh").glob("ssh_host_*"))
        # The boot file is on the FAT partition: the commented example, no server, no password.
        text = boot_file(Path(story.image["DISK"]), int(story.image["BOOT_OFFSET"]))
        assert "#server = " in text
        assert not re.search(r"^\s*server\s*=", text, re.MULTILINE)
        assert "password" not in "".join(line for line in text.splitlines() if not line.startswith("#"))

    def test_first_boot_shows_new_credentials(self, story):
        # Flash a card, then give it the server in its boot file, as on any computer.
        flash(Path(story.image["DISK"]), story.card)
        offset = int(story.image["BOOT_OFFSET"])
        text = boot_file(story.card, offset)
        write_boot_file(story.card, offset, text + f"\nserver = http://10.0.2.2:{story.couch.port}\n",
                        story.folder / "himbeerecouch.txt")
        overlay(story.card, story.first_disk)
        guest = story.boot("1-first-boot", story.first_disk, MAC_1)
        creds = story.credentials_on_console(guest)
        assert creds["headline"].startswith("NEW device credentials"), guest.tail()
        assert int(creds["macid"]) == macid(MAC_1) == 202481587074134
        assert re.fullmatch(r"[a-z2-9]{20}", creds["password"]), creds["password"]
        guest.wait_console(r"login: *$", BOOT_TIMEOUT, label="login prompt")
        # The login prompt shows them too (/etc/issue.d/himbeerecouch.issue).
        assert f"MacID {creds['macid']}  password {creds['password']}" in guest.console()
        story.record(guest)

    def test_program_pushed_from_host_runs(self, story):
        guest = story.guests[-1]
        creds = story.credentials[guest.name]
        device = int(creds["macid"])
        story.operator("setup-db")
        story.operator("add-device", "--from", "-",
                       input=f'{{"MacID": {device}, "password": "{creds["password"]}"}}')
        guest.mark("CouchDB user created")
        program = story.folder / "hello.py"
        program.write_text(PROGRAM)
        story.operator("push", str(device), str(program), "--name", "hello")
        status = story.wait_running(guest, device, f"code:{device}:hello")
        assert status["daemon"] == "running" and status["macid"] == device
        story.first_started = status["started"]
        assert "hello from the SD card image" in guest.journal()
        # The daemon runs as a systemd service; asked through a command document.
        result = story.operator("cmd", str(device), "--wait", "180", "--",
                                "systemctl", "is-active", "himbeerecouch.service", "himbeerecouch-firstboot.service",
                                timeout=240)
        assert result.stdout.split() == ["active", "active"], result.stdout
        story.record(guest)
        TIMINGS["shutdown 1-first-boot"] = guest.poweroff()

    def test_second_boot_keeps_credentials(self, story):
        first = story.credentials["1-first-boot"]
        device = int(first["macid"])
        guest = story.boot("2-second-boot", story.first_disk, MAC_1)
        creds = story.credentials_on_console(guest)
        assert creds["headline"] == "device credentials", guest.tail()
        assert "NEW device credentials" not in guest.console()
        assert (creds["macid"], creds["password"]) == (first["macid"], first["password"])
        guest.wait_console(r"login: *$", BOOT_TIMEOUT, label="login prompt")
        # Running again, by this boot's daemon (the server answers, so its code, not the cache).
        story.wait_running(guest, device, f"code:{device}:hello", not_started=story.first_started)
        story.record(guest)
        TIMINGS["shutdown 2-second-boot"] = guest.poweroff()

    def test_clone_gets_its_own_identity(self, story):
        first = story.credentials["1-first-boot"]
        copy_disk(story.first_disk, story.clone_disk)
        guest = story.boot("3-clone", story.clone_disk, MAC_2)
        creds = story.credentials_on_console(guest)
        assert creds["headline"].startswith("NEW device credentials"), guest.tail()
        assert int(creds["macid"]) == macid(MAC_2) == 202481592517409
        assert creds["password"] != first["password"]
        guest.wait_console(r"login: *$", BOOT_TIMEOUT, label="login prompt")
        device = int(creds["macid"])
        story.operator("add-device", "--from", "-",
                       input=f'{{"MacID": {device}, "password": "{creds["password"]}"}}')
        guest.mark("CouchDB user created")
        program = story.folder / "hello.py"
        story.operator("push", str(device), str(program), "--name", "hello")
        status = story.wait_running(guest, device, f"code:{device}:hello")
        # The first Pi's program is not run by its clone.
        assert status["running_ids"] == [f"code:{device}:hello"], status
        story.record(guest)
        TIMINGS["shutdown 3-clone"] = guest.poweroff()
