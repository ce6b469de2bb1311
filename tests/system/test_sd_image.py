"""The prebuilt SD card image (image/build-sd-image): its files as a Pi's firmware reads them,
then its boots under qemu-system-aarch64 -M virt.

QEMU cannot run a Pi's boot firmware, so what only the firmware reads (the firmware files, the
device trees, config.txt) is checked in the files, and the boots load the kernel and initramfs
that config.txt names with cmdline.txt's command line, from the card's FAT partition, as the
firmware does. One card (a copy of the image on a card 1 GiB larger, its FAT partition edited
as on any computer: server, an SSH key, Wi-Fi) boots three times: first with the MAC
b8:27:eb:12:34:56; again with the same MAC; then a copy of that booted card (a clone) with
b8:27:eb:65:43:21.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from guest import (MTOOLS_ENV, TIMINGS, Guest, boot_file, flash, macid, pi_boot_files, run,
                   write_boot_file)
from support import ADMIN, ROOT, wait_for

MAC_1 = "b8:27:eb:12:34:56"
MAC_2 = "b8:27:eb:65:43:21"
DATABASE = "nedm/raspberries"
BOOT_TIMEOUT = 900          # to the login prompt: an arm64 guest under TCG on a busy machine
RUNNING_TIMEOUT = 600       # from the CouchDB user's creation to the program's RUNNING
COMMAND_WAIT = 300
CARD_GROWTH = 1024 ** 3     # the card is this much larger than the image
CREDENTIALS = re.compile(
    r"^himbeerecouch: (?P<headline>NEW device credentials: create this CouchDB user|device credentials)\n"
    r"himbeerecouch:   MacID \(user name\): (?P<macid>\d+)\n"
    r"himbeerecouch:   password:          (?P<password>\S+)$", re.MULTILINE)
PROGRAM = '''\
import time

def main():
    print("hello from the SD card image", flush=True)
    while not should_quit():
        time.sleep(1)
'''
# Firmware and device trees on the FAT partition, per supported model (Debian's kernel names
# the Pi 3's and Zero 2 W's SoC bcm2837, the Raspberry Pi kernel bcm2710).
MODEL_FILES = {
    "Pi 3 B, 3 B+, 3 A+, Zero 2 W (firmware)": ["bootcode.bin", "start.elf", "fixup.dat"],
    "Pi 4, 400, CM4 (firmware)": ["start4.elf", "fixup4.dat"],
    "Pi 3 B": ["bcm2837-rpi-3-b.dtb"],
    "Pi 3 B+": ["bcm2837-rpi-3-b-plus.dtb"],
    "Pi 3 A+": ["bcm2837-rpi-3-a-plus.dtb"],
    "Pi Zero 2 W": ["bcm2837-rpi-zero-2-w.dtb"],
    "Pi 4 B": ["bcm2711-rpi-4-b.dtb"],
    "Pi 400": ["bcm2711-rpi-400.dtb"],
    "CM4 IO board": ["bcm2711-rpi-cm4-io.dtb"],
}


def fat_names(image: dict[str, str]) -> set[str]:
    listing = subprocess.run(["mdir", "-/", "-b", "-i", f"{image['IMAGE']}@@{image['BOOT_OFFSET']}", "::/"],
                             env=MTOOLS_ENV, stdout=subprocess.PIPE, text=True, check=True).stdout
    return {line.removeprefix("::/") for line in listing.splitlines() if line.strip()}


def probe(image: Path, offset: str) -> dict[str, str]:
    """blkid's view of the file system at `offset` (TYPE, LABEL, ...)."""
    output = run(["blkid", "-p", "-o", "export", "-O", offset, str(image)]).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


# ---- the files ----------------------------------------------------------------------------

def test_partitions_as_a_pi_expects(sd_image):
    """An MS-DOS label (a Pi 3's boot ROM reads no GPT): FAT first, ext4 second, by PARTUUID."""
    image = Path(sd_image["IMAGE"])
    table = json.loads(run(["sfdisk", "--json", str(image)]).stdout)["partitiontable"]
    assert table["label"] == "dos"
    assert table["id"] == f"0x{sd_image['DISK_ID']}"
    boot, root = table["partitions"]
    assert (boot["type"], boot["start"] * 512) == ("c", int(sd_image["BOOT_OFFSET"]))
    assert (root["type"], root["start"] * 512) == ("83", int(sd_image["ROOT_OFFSET"]))
    assert root["start"] * 512 + root["size"] * 512 == image.stat().st_size
    assert probe(image, sd_image["BOOT_OFFSET"])["TYPE"] == "vfat"
    assert probe(image, sd_image["BOOT_OFFSET"])["LABEL"].lower() == "bootfs"
    assert probe(image, sd_image["ROOT_OFFSET"])["TYPE"] == "ext4"
    assert probe(image, sd_image["ROOT_OFFSET"])["LABEL"] == "rootfs"


def test_firmware_and_device_trees_for_every_supported_model(sd_image):
    names = fat_names(sd_image)
    missing = {model: [name for name in files if name not in names]
               for model, files in MODEL_FILES.items()}
    assert not any(missing.values()), f"missing on the FAT partition: {missing}\nthere: {sorted(names)}"
    assert "himbeerecouch.txt" in names


def test_wifi_firmware_for_every_supported_model(sd_image):
    brcm = Path(sd_image["ROOTFS"]) / "usr" / "lib" / "firmware" / "brcm"
    # The radios: Pi 3 B and Zero 2 W (43430), Pi 3 B+ and 4 (43455), Pi 400 (43456).
    for name in ("brcmfmac43430-sdio.bin", "brcmfmac43455-sdio.bin", "brcmfmac43456-sdio.bin",
                 "brcmfmac43430-sdio.raspberrypi,3-model-b.txt", "brcmfmac43455-sdio.raspberrypi,4-model-b.txt",
                 "brcmfmac43455-sdio.raspberrypi,3-model-b-plus.txt", "brcmfmac43455-sdio.raspberrypi,3-model-a-plus.txt",
                 "brcmfmac43430-sdio.raspberrypi,model-zero-2-w.txt", "brcmfmac43456-sdio.txt"):
        assert (brcm / name).exists() or (brcm / name).is_symlink(), f"{name} not in {brcm}"


def test_config_and_cmdline_match_the_kernel_and_the_card(sd_image):
    """raspi-firmware's kernel hook ran for this card: config.txt names the kernel and initramfs
    that are on the FAT partition (the root's own), cmdline.txt the card's root partition."""
    image, offset, rootfs = Path(sd_image["IMAGE"]), int(sd_image["BOOT_OFFSET"]), Path(sd_image["ROOTFS"])
    version = sd_image["KERNEL_VERSION"]
    config = boot_file(image, offset, "config.txt")
    assert re.search(r"^arm_64bit=1$", config, re.MULTILINE), config
    assert re.search(r"^upstream_kernel=1$", config, re.MULTILINE), config
    assert re.search(rf"^kernel=vmlinuz-{re.escape(version)}$", config, re.MULTILINE), config
    assert re.search(rf"^initramfs initrd.img-{re.escape(version)}", config, re.MULTILINE), config
    names = fat_names(sd_image)
    assert {f"vmlinuz-{version}", f"initrd.img-{version}"} <= names
    folder = rootfs.parent / "fat-check"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    files = pi_boot_files(image, offset, folder)
    assert Path(files["KERNEL"]).read_bytes() == (rootfs / "boot" / f"vmlinuz-{version}").read_bytes()
    assert Path(files["INITRD"]).read_bytes() == (rootfs / "boot" / f"initrd.img-{version}").read_bytes()
    root = f"PARTUUID={sd_image['DISK_ID']}-02"
    assert f" root={root} " in f" {files['CMDLINE']} ", files["CMDLINE"]
    # The screen's console last: the credentials go to the last one.
    assert [word for word in files["CMDLINE"].split() if word.startswith("console=")][-1] == "console=tty0"
    fstab = (rootfs / "etc" / "fstab").read_text()
    assert re.search(rf"^{root}\s+/\s+ext4", fstab, re.MULTILINE), fstab
    assert re.search(rf"^PARTUUID={sd_image['DISK_ID']}-01\s+/boot/firmware\s+vfat", fstab, re.MULTILINE), fstab
    assert f"ROOTPART={root}" in (rootfs / "etc" / "default" / "raspi-firmware").read_text()
    # One image for the Pi 3 and 4 families: no cma= (raspi-firmware leaves it out on a Pi 4).
    assert "cma=" not in files["CMDLINE"], files["CMDLINE"]


def test_clone_ready_and_no_password(sd_image):
    rootfs = Path(sd_image["ROOTFS"])
    assert (rootfs / "etc" / "machine-id").read_text().strip() == "uninitialized"
    state = rootfs / "var" / "rspby"
    assert state.is_dir() and not any(state.iterdir()), sorted(p.name for p in state.iterdir())
    assert not list((rootfs / "etc" / "ssh").glob("ssh_host_*"))
    assert not (rootfs / "var" / "lib" / "systemd" / "random-seed").exists()
    assert run(["find", str(rootfs), "-xdev", "-name", "credentials.json*"]).stdout.strip() == ""
    # No account with a password (locked "*" or "!"), none with an empty one.
    for line in (rootfs / "etc" / "shadow").read_text().splitlines():
        user, password = line.split(":")[:2]
        assert password.startswith(("*", "!")), f"{user} has a password"
    assert not (rootfs / "home" / "admin").exists()
    # The boot file: the commented example, no server, nothing else of a card on the FAT.
    text = boot_file(Path(sd_image["IMAGE"]), int(sd_image["BOOT_OFFSET"]))
    assert "#server = " in text and not re.search(r"^\s*server\s*=", text, re.MULTILINE)
    assert "wifi.txt" not in fat_names(sd_image)


def test_block_map_writes_the_same_card(sd_image, workdir):
    """bmaptool copy, as a user flashes the image with its block map: the same bytes."""
    image = Path(sd_image["IMAGE"])
    copy = workdir / "bmap-copy.img"
    copy.unlink(missing_ok=True)
    try:
        run(["bmaptool", "copy", "--bmap", f"{image}.bmap", str(image), str(copy)], timeout=600)
        run(["cmp", str(image), str(copy)], timeout=600)
    finally:
        copy.unlink(missing_ok=True)


# ---- the boots ----------------------------------------------------------------------------

class Story:
    """What the boot steps share: the server, the cards, the guests and what they printed."""

    def __init__(self, folder: Path, couch, image: dict[str, str]) -> None:
        self.folder = folder
        self.couch = couch
        self.image = image
        self.card = folder / "card.img"
        self.clone = folder / "clone.img"
        self.offset = int(image["BOOT_OFFSET"])
        self.ssh_key = folder / "admin_key"
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

    def command(self, device: int, *argv: str) -> str:
        """A command document for the Pi, its output once it ran."""
        return self.operator("cmd", str(device), "--wait", str(COMMAND_WAIT), "--", *argv,
                             timeout=COMMAND_WAIT + 60).stdout

    def boot(self, name: str, card: Path, mac: str) -> Guest:
        files = pi_boot_files(card, self.offset, self.folder)
        guest = Guest(name, card, files, mac, self.folder)
        self.guests.append(guest)
        guest.start()
        return guest

    def credentials_on_console(self, guest: Guest) -> dict:
        match = guest.wait_console(CREDENTIALS.pattern, BOOT_TIMEOUT, label="credentials on the console")
        found = match.groupdict()
        self.credentials[guest.name] = found
        return found

    def login_prompt(self, guest: Guest, device: int) -> None:
        """The console's login prompt, with the host name made from the MacID."""
        guest.wait_console(rf"^himbeerecouch-{device} login: *$", BOOT_TIMEOUT, label="login prompt")

    def heartbeat(self, device: int) -> dict | None:
        return self.document(f"{device}_heartbeat")

    def document(self, doc_id: str) -> dict | None:
        response = requests.get(f"{self.couch.url}/{DATABASE.replace('/', '%2F')}/{doc_id}", auth=ADMIN, timeout=10)
        return response.json() if response.status_code == 200 else None

    def wait_running(self, guest: Guest, device: int, doc_id: str, not_started: str | None = None) -> dict:
        """The status document says the program runs (written by a daemon started later than
        `not_started`, the `started` of an earlier boot's daemon)."""
        def check():
            if not guest.running():
                raise AssertionError(f"{guest.name}: QEMU exited ({guest.process.returncode}):\n{guest.tail()}")
            status = self.heartbeat(device)
            if status and status.get("programs", {}).get(doc_id, {}).get("state") == "RUNNING" \
                    and doc_id in status.get("running_ids", []) and status.get("started") != not_started:
                return status
            return None

        status = wait_for(check, timeout=RUNNING_TIMEOUT, interval=1,
                          message=f"{doc_id} RUNNING in {device}_heartbeat ({guest.name}); last status: "
                                  f"{self.heartbeat(device)}\n{guest.tail()}")
        guest.mark("program RUNNING")
        return status

    def ssh(self, guest: Guest, *command: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-p", str(guest.ssh_port), "-i", str(self.ssh_key), "-o", "BatchMode=yes",
                               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                               "-o", "ConnectTimeout=30", *options, "admin@127.0.0.1", *command],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)

    def record(self, guest: Guest) -> None:
        TIMINGS[f"boot {guest.name}"] = dict(guest.marks)


@pytest.fixture(scope="class")
def story(workdir, couch, sd_image):
    folder = workdir / "boots"
    story = Story(folder, couch, sd_image)
    yield story
    for guest in story.guests:
        guest.kill()


@pytest.mark.system_steps
class TestSdCardBoots:
    def test_first_boot_grows_the_root_and_shows_new_credentials(self, story):
        # Flash a larger card, then edit its FAT partition as on any computer: the server, an
        # SSH key for remote access, Wi-Fi.
        flash(Path(story.image["IMAGE"]), story.card)
        os.truncate(story.card, story.card.stat().st_size + CARD_GROWTH)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "operator@host", "-f", str(story.ssh_key)])
        public_key = Path(f"{story.ssh_key}.pub").read_text().strip()
        text = boot_file(story.card, story.offset)
        write_boot_file(story.card, story.offset,
                        text + f"\nserver = http://10.0.2.2:{story.couch.port}\n\n[system]\nssh_key = {public_key}\n",
                        story.folder / "himbeerecouch.txt")
        write_boot_file(story.card, story.offset, "country = CH\nssid = Lab\npassphrase = not the real one\n",
                        story.folder / "wifi.txt", name="wifi.txt")
        guest = story.boot("1-first-boot", story.card, MAC_1)
        creds = story.credentials_on_console(guest)
        assert creds["headline"].startswith("NEW device credentials"), guest.tail()
        assert int(creds["macid"]) == macid(MAC_1) == 202481587074134
        assert re.fullmatch(r"[a-z2-9]{20}", creds["password"]), creds["password"]
        story.login_prompt(guest, int(creds["macid"]))
        console = guest.console()
        # The login prompt shows them too (/etc/issue.d/himbeerecouch.issue).
        assert f"MacID {creds['macid']}  password {creds['password']}" in console
        # The initramfs checked the root before mounting it (an SD card loses power), and no
        # unit or generator failed.
        assert re.search(r"^rootfs: clean, \d+/\d+ files", console, re.MULTILINE), guest.tail()
        assert "fsck not present" not in console
        assert not re.search(r"failed with exit status|\[FAILED\]", console), guest.tail()
        story.record(guest)

    def test_program_pushed_from_host_runs_and_commands_answer(self, story):
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
        doc_id = f"code:{device}:hello"
        status = story.wait_running(guest, device, doc_id)
        assert status["daemon"] == "running" and status["macid"] == device
        story.first_started = status["started"]
        wait_for(lambda: "hello from the SD card image" in json.dumps(story.document(f"{device}_output")),
                 timeout=120, interval=2, message=f"the program's output in {device}_output")
        # The services, the root grown to the card, the host name, Wi-Fi set up from wifi.txt.
        output = story.command(device, "systemctl", "is-active", "himbeerecouch.service",
                               "himbeerecouch-firstboot.service", "himbeerecouch-growroot.service",
                               "himbeerecouch-card-setup.service")
        assert output.split() == ["active"] * 4, output
        root_size = int(story.command(device, "findmnt", "-bno", "SIZE", "/").strip())
        assert root_size > int(story.image["ROOT_SIZE"]) + CARD_GROWTH * 0.9, root_size
        assert story.command(device, "hostname").strip() == f"himbeerecouch-{device}"
        wifi = story.command(device, "stat", "-c", "%a %U", "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf")
        assert wifi.strip() == "600 root", wifi
        # The daemon sees systemd-timesyncd's folder, so over https it would wait for its first
        # synchronisation (clock.py; here the server is plain http and nothing waits).
        seen = story.command(device, "stat", "-c", "%F", "/run/systemd/timesync")
        assert seen.strip() == "directory", seen
        story.record(guest)

    def test_ssh_key_from_the_boot_file_lets_the_admin_in_and_nothing_else(self, story):
        guest = story.guests[-1]
        result = story.ssh(guest, "sudo", "-n", "id", "-u")
        assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "0", result.stdout
        refused = story.ssh(guest, "true", options=("-o", "PreferredAuthentications=password,keyboard-interactive",
                                                      "-o", "PubkeyAuthentication=no"))
        assert refused.returncode != 0 and "Permission denied (publickey)" in refused.stdout, refused.stdout
        TIMINGS["shutdown 1-first-boot"] = guest.poweroff(timeout=300)
        # wifi.txt held a passphrase: applied and gone from the FAT partition.
        names = subprocess.run(["mdir", "-b", "-i", f"{story.card}@@{story.offset}", "::/"], env=MTOOLS_ENV,
                               stdout=subprocess.PIPE, text=True).stdout
        assert "wifi.txt" not in names and "himbeerecouch.txt" in names, names

    def test_second_boot_keeps_the_identity(self, story):
        first = story.credentials["1-first-boot"]
        device = int(first["macid"])
        guest = story.boot("2-second-boot", story.card, MAC_1)
        creds = story.credentials_on_console(guest)
        assert creds["headline"] == "device credentials", guest.tail()
        assert "NEW device credentials" not in guest.console()
        assert (creds["macid"], creds["password"]) == (first["macid"], first["password"])
        story.login_prompt(guest, device)
        # Running again, by this boot's daemon (the server answers, so its code, not the cache).
        story.wait_running(guest, device, f"code:{device}:hello", not_started=story.first_started)
        story.record(guest)
        TIMINGS["shutdown 2-second-boot"] = guest.poweroff(timeout=300)

    def test_clone_gets_its_own_identity(self, story):
        first = story.credentials["1-first-boot"]
        flash(story.card, story.clone)                 # a copy of a card that has booted
        guest = story.boot("3-clone", story.clone, MAC_2)
        creds = story.credentials_on_console(guest)
        assert creds["headline"].startswith("NEW device credentials"), guest.tail()
        assert int(creds["macid"]) == macid(MAC_2) == 202481592517409
        assert creds["password"] != first["password"]
        story.login_prompt(guest, int(creds["macid"]))
        story.record(guest)
        TIMINGS["shutdown 3-clone"] = guest.poweroff(timeout=300)


def test_publish_makes_what_a_download_needs(tmp_path):
    """image/publish-sd-image on a small card image: block map, xz, checksum, Imager's list."""
    image = tmp_path / "himbeerecouch-9.8.7-raspi-arm64.img"
    with open(image, "wb") as stream:
        stream.truncate(64 * 1024 * 1024)               # sparse, as a card image is
        for offset in (0, 5 * 1024 * 1024, 40 * 1024 * 1024):
            stream.seek(offset)
            stream.write(os.urandom(300 * 1024))
    run([str(ROOT / "image" / "publish-sd-image"), "--url-base", "https://example.org/pis/", str(image)])
    xz = Path(f"{image}.xz")
    restored = tmp_path / "restored.img"
    with open(restored, "wb") as stream:
        subprocess.run(["xz", "-dc", str(xz)], stdout=stream, check=True)
    run(["cmp", str(image), str(restored)])
    assert run(["sha256sum", "-c", f"{xz.name}.sha256"], cwd=tmp_path).stdout.strip() == f"{xz.name}: OK"
    copy = tmp_path / "card.img"
    run(["bmaptool", "copy", str(xz), str(copy)])        # finds the .img.bmap beside the .img.xz
    run(["cmp", str(image), str(copy)])
    listing = json.loads((tmp_path / "himbeerecouch-9.8.7-raspi-arm64.rpi-imager.json").read_text())
    entry, = listing["os_list"]
    assert entry["url"] == f"https://example.org/pis/{xz.name}"
    assert entry["extract_size"] == image.stat().st_size
    assert entry["extract_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert entry["image_download_size"] == xz.stat().st_size
    assert entry["image_download_sha256"] == hashlib.sha256(xz.read_bytes()).hexdigest()
    assert entry["name"].startswith("himbeerecouch 9.8.7 ")
    assert "init_format" not in entry        # no Imager customisation: the card is set up on its FAT


def test_an_old_cached_root_is_made_anew_and_kept_if_that_fails(tmp_path):
    """Past --max-root-age the arm64 root is made anew, for the archive's security updates; with
    no mirror to make it from, the old root is kept and the build stops, saying how to go on."""
    cache = tmp_path / "cache"
    build = [str(ROOT / "image" / "build-sd-image"), "--root-only", "--cache-dir", str(cache),
             "--out", str(tmp_path / "out"), "--mirror", "http://127.0.0.1:9/debian"]

    def build_root(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(build + list(extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=600)

    first = build_root()
    assert first.returncode == 1, first.stdout
    cached = Path(re.search(r"mmdebstrap \S+ \S+ into (\S+\.tar) ", first.stdout).group(1))
    assert cached.parent == cache
    assert not cached.exists() and not Path(f"{cached}.partial").exists()

    cached.write_bytes(b"a root")
    made = Path(f"{cached}.ok")
    made.touch()
    fresh = build_root()
    assert fresh.returncode == 0, fresh.stdout
    assert "arm64 root from the cache, made 0 days ago" in fresh.stdout
    assert "mmdebstrap" not in fresh.stdout

    eight_days_ago = time.time() - 8 * 86400
    os.utime(made, (eight_days_ago, eight_days_ago))
    old = build_root()
    assert old.returncode == 1, old.stdout
    assert "made 8 days ago, more than --max-root-age 7: it is made anew" in old.stdout
    assert "mmdebstrap failed" in old.stdout
    assert "the cached root, 8 days old, is kept; to build from it as it is: --max-root-age 0" in old.stdout
    assert cached.read_bytes() == b"a root" and made.exists()
    assert not Path(f"{cached}.partial").exists()

    as_it_is = build_root("--max-root-age", "0")
    assert as_it_is.returncode == 0, as_it_is.stdout
    assert "arm64 root from the cache, made 8 days ago" in as_it_is.stdout
    assert build_root("--max-root-age", "a week").returncode == 2
