"""The package's whole life in a clean Debian root: install with mmdebstrap, boot with
systemd-nspawn, run a program pushed from the host, watchdog, stop, upgrade, the unit's memory
limit, clone, remove, purge, installing again by hand and with a refused preseed, purge. One story
per Debian release; each step builds on the previous one.
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
import uuid
from pathlib import Path

import pytest

from pkgtools import ROOT, ROOT_PACKAGES, SUITES, Container, chroot, mmdebstrap, new_machine_id, reachable, run, timed
from support import ADMIN, AdminClient, wait_for

pytestmark = [pytest.mark.package_tier, pytest.mark.incremental]

PRESEEDED = "http://preseeded.invalid:5984"
# What a person types, and what must never be kept: a password in a server URL.
TYPED = "http://typed.invalid:5984"
SECRET = "pkgtest-secret-4711"
UNITS = ["himbeerecouch.service", "himbeerecouch-firstboot.service", "himbeerecouch-root.socket"]
CONFFILE = "etc/himbeerecouch/himbeerecouch.conf"
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

PROGRAM = '''
import json, os, threading
def main():
    info = {"pid": os.getpid(), "uid": os.getuid(), "groups": os.getgroups(), "cwd": os.getcwd()}
    import pycouchdb
    info["pycouchdb"] = pycouchdb.__file__
    with open("pkgtest-%d.json" % os.getpid(), "w") as f:
        json.dump(info, f)
    log("pkgtest started")
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''
# Eats memory until the kernel kills it: bytes filled with "x", every page touched (a bytearray
# of zeros could stay unbacked). It stops at 1.5 GB and says so, should no limit apply.
HOG = '''
import time
def main():
    log("hog started")
    hoard = []
    while len(hoard) < 150 and not should_quit():
        hoard.append(b"x" * 10_000_000)
        time.sleep(0.01)
    log("hog holds %d MB: no memory limit stopped it" % (len(hoard) * 10))
    while not should_quit():
        time.sleep(0.2)
'''
# Under the unit's memory limit of the test (a drop-in): far below the machine's memory, far
# above what the daemon and a program need.
MEMORY_MAX = 200 * 1024 * 1024
MEMORY_DROP_IN = "etc/systemd/system/himbeerecouch.service.d/50-pkgtest-memory.conf"
# Ignores the quit request: the daemon kills its process group after grace_seconds.
STUBBORN = '''
import os, time
def main():
    open("stubborn-%d" % os.getpid(), "w").close()
    while True:
        time.sleep(1)
'''
# A program (user rspby, like the daemon) that tries to have the root helper run a command, and
# to read the daemon's memory-backed files (non-dumpable: hidden or refused).
SNEAKY = '''
import json, os, socket, threading
def main():
    found = {"uid": os.getuid()}
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect("/run/himbeerecouch/root.sock")
        r, w = os.pipe()
        request = {"request": "run", "argv": ["touch", "/etc/himbeerecouch-pwned"], "token": "abc"}
        socket.send_fds(s, [json.dumps(request).encode()], [w, w])
        found["answer"] = json.loads(s.recv(65536) or b"null")
    except OSError as error:
        found["answer"] = {"oserror": str(error)}
    parent = os.getppid()
    with open("/proc/%d/cmdline" % parent, "rb") as f:
        if b"forkserver" in f.read():                 # the daemon is the fork server's parent
            with open("/proc/%d/stat" % parent) as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
    found["daemon"] = parent
    try:
        open("/proc/%d/environ" % parent, "rb").read()
        found["environ"] = "read"
    except OSError as error:
        found["environ"] = error.strerror
    with open("sneaky.json", "w") as f:
        json.dump(found, f)
    done = threading.Event()
    register_quit_notification(done.set)
    done.wait()
'''


class Story:
    """What the steps share: the root, its container, the test database, what was seen."""

    def __init__(self, suite: str, root: Path, admin: AdminClient, macid: int, couch) -> None:
        self.suite = suite
        self.couch = couch
        self.root = root
        self.admin = admin
        self.macid = macid
        self.container = Container(root, f"hbtest-{suite}", root.parent / f"console-{suite}.log")
        self.boots = 0
        self.password = ""
        self.deb: Path | None = None
        self.rspby_uid: int | None = None

    def boot(self, timings: dict) -> str:
        """Boot; returns what the console showed during this boot."""
        self.boots += 1
        self.container.console_log = self.root.parent / f"console-{self.suite}-{self.boots}.log"
        seconds = self.container.boot()
        timings[f"{self.suite}: boot {self.boots} to running"] = round(seconds, 1)
        return self.console()

    def console(self) -> str:
        return ANSI.sub("", self.container.console()).replace("\r", "")

    def var(self, *parts: str) -> Path:
        return self.root / "var" / "rspby" / Path(*parts)

    def markers(self, label: str = "pkgtest") -> list[Path]:
        """What the program of document `label` wrote in its working directory."""
        return sorted(self.var("programs", label).glob(f"{label}-*"))

    def wait_new_marker(self, before: list[Path], timeout: float = 60) -> dict:
        marker = wait_for(lambda: sorted(set(self.markers()) - set(before)), timeout,
                          message=f"the program to start in the container\n{self.daemon_log()}")[-1]
        wait_for(lambda: marker.stat().st_size > 0, 10, message=f"{marker} to be written")
        return json.loads(marker.read_text())

    def daemon_log(self) -> str:
        return self.container.journal("himbeerecouch")[-4000:] if self.container.leader else ""

    def daemon(self) -> dict[str, str]:
        return self.container.show("himbeerecouch", "ActiveState", "SubState", "StatusText", "MainPID",
                                   "NRestarts", "Result", "ExecMainStatus", "InvocationID")

    def uid(self, name: str) -> int:
        for line in (self.root / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2])
        raise AssertionError(f"no user {name}")

    def gid(self, name: str) -> int | None:
        for line in (self.root / "etc" / "group").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == name:
                return int(fields[2])
        return None

    def rspby_processes(self) -> str:
        return self.container.exec("pgrep", "-a", "-u", "rspby", check=False).stdout.strip()

    def active(self, unit: str) -> str:
        return self.container.exec("systemctl", "is-active", unit, check=False).stdout.strip()

    def install_deb(self, *command: str, input: str | None = None):
        """Install the built .deb inside the booted container with a command naming it as {deb}."""
        deb = self.root / "root" / self.deb.name
        shutil.copy(self.deb, deb)
        try:
            return self.container.exec(*(part.replace("{deb}", f"/root/{deb.name}") for part in command),
                                       check=False, input=input)
        finally:
            deb.unlink()

    def holding_the_secret(self) -> list[str]:
        """Files of the root that keep the password of a refused URL (root-relative paths).

        Not counted: debconf's backup of its database as it was before its last save
        (config.dat-old). debconf-set-selections put the preseeded URL in config.dat; the
        package clears it there, and the backup of the state before that keeps it until debconf
        next saves. The package does not edit debconf's own files."""
        backup = self.root / "var" / "cache" / "debconf" / "config.dat-old"
        found = run(["grep", "-rl", "-e", SECRET, str(self.root / "etc"), str(self.root / "var" / "cache" / "debconf"),
                     str(self.root / "var" / "rspby"), str(self.root / "var" / "lib")], check=False).stdout.split()
        return [str(Path(path).relative_to(self.root)) for path in found if path != str(backup)]

    def status(self) -> dict:
        return self.admin.get(f"{self.macid}_heartbeat") or {}

    def command(self, doc_id: str, cmd: list[str], wait: float = 60, **fields) -> dict:
        """Post a command document for this Pi and wait for its result."""
        self.admin.put({"_id": doc_id, "type": f"{self.macid}_cmd", "cmd": cmd, **fields})
        return wait_for(lambda: (lambda d: d if d and "ret" in d else None)(self.admin.get(doc_id)), wait,
                        message=f"the result of {cmd}\n{self.daemon_log()}")

    def set_privileges(self, setting: str | None) -> None:
        """command_privileges (with the server in the conffile, which they need), or neither;
        then a daemon restart."""
        conffile = self.root / CONFFILE
        lines = [line for line in conffile.read_text().splitlines()
                 if not line.startswith(("command_privileges =", "server ="))]
        if setting:
            lines += [f"server = {self.couch.url}", f"command_privileges = {setting}"]
        conffile.write_text("\n".join(lines) + "\n")
        before = self.daemon()["InvocationID"]
        self.container.exec("systemctl", "restart", "himbeerecouch.service")
        wait_for(lambda: (lambda s: s["ActiveState"] == "active" and s["InvocationID"] != before)(self.daemon()),
                 30, message="the daemon restarted")

    def operator(self, *args: str, input: str | None = None) -> str:
        """The operator's command line (`himbeerecouch ...`) on the host, as the test server's admin."""
        env = dict(os.environ, COUCHDB_URL=self.couch.url, COUCHDB_USER=ADMIN[0], COUCHDB_PASSWORD=ADMIN[1],
                   COUCHDB_DATABASE=self.admin.db)
        result = subprocess.run([sys.executable, "-m", "himbeerecouch", *args], input=input, text=True, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=120)
        assert result.returncode == 0, f"himbeerecouch {' '.join(args)} exited {result.returncode}:\n{result.stdout}"
        return result.stdout


def firstboot_lines(console: str) -> list[str]:
    """What the first-boot unit printed (and the login prompt's issue line)."""
    return [line for line in console.splitlines() if line.startswith("himbeerecouch:")]


def printed_password(lines: list[str]) -> str:
    for line in lines:
        match = re.search(r"password:?\s+(\S+)\s*$", line)
        if match:
            return match.group(1)
    raise AssertionError(f"no password among the console lines {lines}")


@pytest.fixture(scope="class", params=SUITES)
def story(request, build, workdir, couch, timings):
    suite = request.param
    if suite != "bookworm" and not reachable(suite):
        pytest.skip(f"the Debian archive has no {suite} reachable from here")
    root = workdir / suite / "root"
    root.parent.mkdir(parents=True)
    preseed = f'echo "himbeerecouch himbeerecouch/server string {PRESEEDED}" | chroot "$1" debconf-set-selections'
    # Raspberry Pi OS has these groups (the device nodes' owners); a Debian root has dialout only.
    pi_groups = ('for g in gpio:990 i2c:991 spi:992; do echo "${g%:*}:x:${g#*:}:" >> "$1/etc/group"; '
                 'echo "${g%:*}:!::" >> "$1/etc/gshadow"; done')
    timed(f"{suite}: mmdebstrap root with the .deb", timings, mmdebstrap, suite, root,
          ROOT_PACKAGES + [str(build.deb)], essential_hooks=[preseed, pi_groups])
    admin = AdminClient(couch.url, f"pkgtest_{suite}_{uuid.uuid4().hex[:8]}")
    # A Pi's CPU serial does not change between boots; off a Pi the machine-id stands in for it.
    new_machine_id(root)
    result = Story(suite, root, admin, macid=0x02AB00000000 + SUITES.index(suite) + 1, couch=couch)
    result.deb = build.deb
    # As an operator sets up a site: the database, its security object and validation.
    result.operator("setup-db")
    yield result
    result.container.poweroff()


@pytest.fixture(scope="session")
def pycouchdb_deb(build) -> Path:
    """python3-pycouchdb built with stdeb by `make pycouchdb-deb` in the clean checkout."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root")}
    run(["make", "pycouchdb-deb"], cwd=build.src, env=env)
    return next((build.src / "dist").glob("python3-pycouchdb_*_all.deb"))


class TestLifecycle:
    # ---- installed by mmdebstrap ---------------------------------------------------------

    def test_user_groups_and_state_dir(self, story):
        passwd = chroot(story.root, "getent", "passwd", "rspby").stdout.strip().split(":")
        assert passwd[5] == "/var/rspby" and passwd[6] == "/usr/sbin/nologin"
        assert int(passwd[2]) < 1000, "a system user"
        groups = chroot(story.root, "id", "-nG", "rspby").stdout.split()
        assert {"rspby", "dialout", "gpio", "i2c", "spi"} <= set(groups), groups
        stat = chroot(story.root, "stat", "-c", "%U:%G %a", "/var/rspby").stdout.strip()
        assert stat == "rspby:rspby 750"

    def test_units_enabled(self, story):
        wants = story.root / "etc" / "systemd" / "system" / "multi-user.target.wants"
        assert (wants / "himbeerecouch.service").is_symlink()
        assert (wants / "himbeerecouch-firstboot.service").is_symlink()
        assert (story.root / "etc/systemd/system/sockets.target.wants/himbeerecouch-root.socket").is_symlink()
        # (Debian 13's systemctl also says, among its lines, that /proc is not mounted.)
        states = chroot(story.root, "systemctl", "is-enabled", "himbeerecouch.service",
                        "himbeerecouch-firstboot.service").stdout.splitlines()
        assert [line for line in states if re.fullmatch(r"[a-z-]+", line)] == ["enabled", "enabled"], states

    def test_systemd_analyze_verify_prints_nothing(self, story):
        # It exits 0 even on parse errors: its output is the verdict.
        result = chroot(story.root, "systemd-analyze", "verify", "/usr/lib/systemd/system/himbeerecouch.service",
                        "/usr/lib/systemd/system/himbeerecouch-firstboot.service",
                        "/usr/lib/systemd/system/himbeerecouch-root.socket", check=False)
        assert result.stdout.strip() == "" and result.returncode == 0, result.stdout

    def test_systemd_analyze_security(self, story):
        result = run(["systemd-analyze", "security", "--offline=yes", "--threshold=30", f"--root={story.root}",
                      "himbeerecouch.service"], check=False)
        assert result.returncode == 0, result.stdout

    def test_preseeded_server_written_to_state_dir(self, story):
        server = story.var("server")
        assert server.read_text() == PRESEEDED + "\n"
        assert chroot(story.root, "stat", "-c", "%U:%G %a", "/var/rspby/server").stdout.strip() == "rspby:rspby 640"
        conffile = (story.root / "etc" / "himbeerecouch" / "himbeerecouch.conf").read_text()
        assert PRESEEDED not in conffile and not re.search(r"^server", conffile, re.MULTILINE)

    def test_reconfigure_updates_the_debconf_server_file(self, story):
        # The URL alone: the Pi logs in with its own credentials (user:password@ is refused).
        url = story.couch.url
        chroot(story.root, "debconf-set-selections", input=f"himbeerecouch himbeerecouch/server string {url}\n")
        chroot(story.root, "dpkg-reconfigure", "-fnoninteractive", "himbeerecouch")
        assert story.var("server").read_text() == url + "\n"
        # An empty answer leaves the file as it is.
        chroot(story.root, "debconf-set-selections", input="himbeerecouch himbeerecouch/server string\n")
        chroot(story.root, "dpkg-reconfigure", "-fnoninteractive", "himbeerecouch")
        assert story.var("server").read_text() == url + "\n"
        chroot(story.root, "debconf-set-selections", input=f"himbeerecouch himbeerecouch/server string {url}\n")

    # ---- first boot ----------------------------------------------------------------------

    def test_first_boot_shows_new_credentials(self, story, timings):
        conffile = story.root / "etc" / "himbeerecouch" / "himbeerecouch.conf"
        with open(conffile, "a") as stream:
            stream.write(f"\n# package tier\ndatabase = {story.admin.db}\nmacid = {story.macid}\n")
        story.admin.put({"_id": "pkgtest", "type": story.macid, "code": PROGRAM})
        story.admin.put({"_id": "stubborn", "type": story.macid, "code": STUBBORN})
        console = story.boot(timings)
        lines = firstboot_lines(console)
        assert any(str(story.macid) in line for line in lines), console[-3000:]
        assert any(re.search(r"\bnew\b", line, re.IGNORECASE) for line in lines), lines
        # Clean lines: no journal-style prefixes.
        assert not any(re.search(r"himbeerecouch-creds\[\d+\]", line) for line in lines), lines
        story.password = printed_password(lines)
        # The operator creates the Pi's CouchDB user from what the console showed.
        story.operator("add-device", "--from", "-", input=json.dumps({"MacID": story.macid, "password": story.password}))
        creds = json.loads(story.var("credentials.json").read_text())
        assert creds["password"] == story.password
        assert chroot(story.root, "stat", "-c", "%U:%G %a", "/var/rspby/credentials.json").stdout.strip() == "rspby:rspby 600"
        issue = (story.root / "etc" / "issue.d" / "himbeerecouch.issue").read_text()
        assert story.password in issue and str(story.macid) in issue

    def test_daemon_ready(self, story):
        state = wait_for(lambda: (lambda s: s if s["ActiveState"] == "active" else None)(story.daemon()), 30,
                         message="himbeerecouch.service active")
        # Type=notify: "active (running)" means READY=1 was received; STATUS= is its summary.
        assert state["SubState"] == "running" and state["StatusText"], state
        # It does not wait for an "online" network (it runs offline and retries the server itself).
        dependencies = story.container.show("himbeerecouch.service", "After", "Wants", "Requires")
        assert "network-online.target" not in " ".join(dependencies.values()).split(), dependencies
        assert "network.target" in dependencies["After"].split(), dependencies

    def test_program_from_the_host_runs_in_the_container(self, story):
        info = story.wait_new_marker([])
        assert info["uid"] == story.uid("rspby") and info["cwd"] == "/var/rspby/programs/pkgtest"
        # The groups that own GPIO, I2C, SPI and serial devices reach the programs.
        for group in ["dialout", "gpio", "i2c", "spi"]:
            assert story.gid(group) in info["groups"], group
        # Debian has no pycouchdb: the package's private copy.
        assert info["pycouchdb"] == "/usr/lib/himbeerecouch/python/pycouchdb/__init__.py"
        assert story.markers("stubborn")
        heartbeat = wait_for(lambda: story.admin.get(f"{story.macid}_heartbeat"), 30,
                             message="the status document")
        assert "pkgtest" in heartbeat["running_ids"]
        # Under the unit's sandbox (seccomp filter, no capabilities) programs come from the fork
        # server: pidfds, SCM_RIGHTS and the server's preload all work there.
        assert heartbeat["spawn"]["mode"] == "fork-server" and heartbeat["spawn"]["error"] is None, heartbeat["spawn"]
        assert heartbeat["programs"]["pkgtest"]["spawn"] == "fork-server", heartbeat["programs"]["pkgtest"]

    def test_watchdog_restarts_a_stopped_daemon(self, story, timings):
        before = story.daemon()
        markers = story.markers()
        start = time.monotonic()
        story.container.exec("kill", "-STOP", before["MainPID"])

        def restarted():
            state = story.daemon()
            return state if (state["NRestarts"] == "1" and state["ActiveState"] == "active"
                             and state["MainPID"] not in ("0", before["MainPID"])) else None
        state = wait_for(restarted, 120, interval=0.5, message="a watchdog restart")
        timings[f"{story.suite}: watchdog restart after SIGSTOP"] = round(time.monotonic() - start, 1)
        assert "watchdog" in story.container.journal("himbeerecouch").lower()
        assert state["SubState"] == "running"
        story.wait_new_marker(markers)

    def test_stop_stops_every_program(self, story, timings):
        assert "himbeerecouch.child" in story.rspby_processes()
        start = time.monotonic()
        story.container.exec("systemctl", "stop", "himbeerecouch.service")
        seconds = time.monotonic() - start
        timings[f"{story.suite}: systemctl stop (a program ignoring the quit request)"] = round(seconds, 1)
        assert story.rspby_processes() == ""
        state = story.daemon()
        # The daemon itself killed the stubborn program after grace_seconds and exited 0:
        # systemd did not have to kill anything (TimeoutStopSec outlasts the grace).
        assert state["ActiveState"] == "inactive" and state["Result"] == "success", state
        assert state["ExecMainStatus"] == "0", state
        assert 15 < seconds < 40, seconds
        # The rest of the story does not need to wait for it at every stop.
        story.admin.delete("stubborn")

    # ---- second boot, upgrade ------------------------------------------------------------

    def test_second_boot_same_credentials_not_new(self, story, timings):
        story.container.poweroff()
        console = story.boot(timings)
        lines = firstboot_lines(console)
        assert printed_password(lines) == story.password, lines
        assert not any(re.search(r"\bnew\b", line, re.IGNORECASE) for line in lines), lines
        wait_for(lambda: story.daemon()["ActiveState"] == "active", 30, message="the daemon after boot")
        # The last-known code still had the stubborn program, deleted while the daemon was down:
        # the server answers before offline_start_seconds, so only the current code runs.
        wait_for(lambda: story.rspby_processes().count("himbeerecouch.child") == 1, 60, interval=0.5,
                 message="only the current program to run")

    def test_upgrade_restarts_once_and_keeps_state(self, story, build, timings):
        wait_for(lambda: story.markers(), 30, message="programs running")
        kept = {name: hashlib.sha256(story.var(name).read_bytes()).hexdigest()
                for name in ("credentials.json", "server", "code.json")}
        cursor = story.container.exec("journalctl", "-u", "himbeerecouch", "-n", "0", "--show-cursor",
                                      check=False).stdout.strip().split("cursor: ")[-1]
        before = story.daemon()
        deb = build.upgraded_deb()
        shutil.copy(deb, story.root / "root" / deb.name)
        start = time.monotonic()
        story.container.exec("dpkg", "-i", f"/root/{deb.name}")
        timings[f"{story.suite}: upgrade (dpkg -i)"] = round(time.monotonic() - start, 1)
        (story.root / "root" / deb.name).unlink()
        after = wait_for(lambda: (lambda s: s if s["ActiveState"] == "active" else None)(story.daemon()), 60,
                         message="the daemon after the upgrade")
        assert after["InvocationID"] != before["InvocationID"]
        journal = story.container.exec("journalctl", "-u", "himbeerecouch", "--no-pager",
                                       f"--after-cursor={cursor}").stdout
        assert len(re.findall(r"systemd\[1\]: Started himbeerecouch\.service", journal)) == 1, journal
        assert len(re.findall(r"systemd\[1\]: Stopping himbeerecouch\.service", journal)) == 1, journal
        for name, digest in kept.items():
            assert hashlib.sha256(story.var(name).read_bytes()).hexdigest() == digest, f"{name} changed"
        assert story.container.exec("dpkg-query", "-W", "-f", "${Version}", "himbeerecouch").stdout.endswith("+pkgtest1")

    def test_system_pycouchdb_wins_over_the_private_copy(self, story, pycouchdb_deb):
        shutil.copy(pycouchdb_deb, story.root / "root" / pycouchdb_deb.name)
        story.container.exec("dpkg", "-i", f"/root/{pycouchdb_deb.name}")
        (story.root / "root" / pycouchdb_deb.name).unlink()
        markers = story.markers()
        story.container.exec("systemctl", "restart", "himbeerecouch.service")
        info = story.wait_new_marker(markers)
        assert info["pycouchdb"] == "/usr/lib/python3/dist-packages/pycouchdb/__init__.py"
        story.container.exec("dpkg", "--purge", "python3-pycouchdb")
        markers = story.markers()
        story.container.exec("systemctl", "restart", "himbeerecouch.service")
        assert story.wait_new_marker(markers)["pycouchdb"].startswith("/usr/lib/himbeerecouch/python/")

    # ---- the unit's memory limit ---------------------------------------------------------

    def test_memory_hog_is_killed_and_the_daemon_survives(self, story, timings):
        """MemoryMax= (with OOMPolicy=continue) on the whole service: the kernel's OOM killer takes
        the program that eats memory, the daemon restarts it with back-off and keeps running.
        A drop-in gives the unit a small limit; it is removed and the unit restarted at the end."""
        container = story.container
        drop_in = story.root / MEMORY_DROP_IN
        drop_in.parent.mkdir(parents=True, exist_ok=True)
        drop_in.write_text(f"[Service]\nMemoryMax={MEMORY_MAX}\nMemorySwapMax=0\n")
        start = time.monotonic()
        try:
            why_not = container.enable_memory_limits()
            container.exec("systemctl", "daemon-reload")
            markers = story.markers()
            container.exec("systemctl", "restart", "himbeerecouch.service")
            story.wait_new_marker(markers)
            if why_not is None and container.memory_limit("himbeerecouch.service") != MEMORY_MAX:
                why_not = (f"MemoryMax={MEMORY_MAX} does not apply in the container: the unit's cgroup limit is "
                           f"{container.memory_limit('himbeerecouch.service')}")
            if why_not:
                pytest.skip(f"no memory limit inside systemd-nspawn on this machine: {why_not}")
            pkgtest = wait_for(lambda: (lambda p: p if p.get("state") == "RUNNING" else None)(
                story.status().get("programs", {}).get("pkgtest", {})), 30, message="pkgtest RUNNING in the status")
            before = story.daemon()
            story.admin.put({"_id": "hog", "type": story.macid, "code": HOG})

            def killed_twice():
                hog = story.status().get("programs", {}).get("hog", {})
                return hog if hog.get("restarts", 0) >= 2 and hog.get("last_exit") == "killed by SIGKILL" else None
            hog = wait_for(killed_twice, 60, interval=0.5,
                           message=f"the hog to be killed and restarted twice\n{story.daemon_log()}")
            timings[f"{story.suite}: a memory hog killed twice under MemoryMax"] = round(time.monotonic() - start, 1)
            assert container.oom_kills("himbeerecouch.service") >= 2, "the kernel's OOM killer did not act"
            assert "no memory limit stopped it" not in story.daemon_log()
            after = story.daemon()
            assert after["ActiveState"] == "active" and after["SubState"] == "running", after
            assert after["MainPID"] == before["MainPID"] and after["NRestarts"] == before["NRestarts"], (before, after)
            # The other program was left alone.
            status = story.status()
            assert status["programs"]["pkgtest"]["state"] == "RUNNING"
            assert status["programs"]["pkgtest"]["pid"] == pkgtest["pid"]
            assert "pkgtest" in status["running_ids"]
            container.exec("kill", "-0", str(pkgtest["pid"]))
            assert hog["state"] in ("BACKOFF", "STARTING", "RUNNING"), hog
        finally:
            # The unit as it was: no drop-in, restarted without the hog.
            if story.admin.get("hog"):
                story.admin.delete("hog")
            drop_in.unlink()
            drop_in.parent.rmdir()
            container.exec("systemctl", "daemon-reload")
            markers = story.markers()
            container.exec("systemctl", "restart", "himbeerecouch.service")
            story.wait_new_marker(markers)
        assert container.memory_limit("himbeerecouch.service") != MEMORY_MAX

    # ---- privileged commands (command_privileges) -----------------------------------------

    def test_privileged_commands_are_refused_by_default(self, story):
        assert story.active("himbeerecouch-root.socket") == "active"
        stat = story.container.exec("stat", "-c", "%U:%G %a %F", "/run/himbeerecouch/root.sock").stdout.strip()
        assert stat == "root:rspby 660 socket", stat
        doc = story.command("pkg-reboot-none", ["systemctl", "reboot"])
        assert doc["error"] == "not allowed" and "command_privileges = power" in doc["ret"][1], doc
        doc = story.command("pkg-sudo-none", ["sudo", "id", "-u"])
        assert doc["error"] == "not allowed" and "command_privileges = root" in doc["ret"][1], doc
        assert story.command("pkg-id-none", ["id", "-u"])["ret"][0] == f"{story.uid('rspby')}\n"
        assert story.container.process.poll() is None, "the container went down"

    def test_root_runs_commands_as_root_and_no_program_gets_it(self, story):
        story.set_privileges("root")
        doc = story.command("pkg-id-root", ["id", "-u"])
        assert doc["ret"] == ["0\n", ""] and doc["returncode"] == 0, f"{doc}\n{story.daemon_log()}"
        doc = story.command("pkg-sudo-root", ["sudo", "touch", "/etc/himbeerecouch-root-was-here"])
        assert doc["returncode"] == 0, doc
        assert chroot(story.root, "stat", "-c", "%U", "/etc/himbeerecouch-root-was-here").stdout.strip() == "root"
        (story.root / "etc" / "himbeerecouch-root-was-here").unlink()
        # What a root command leaves running in a session of its own, holding its output, is
        # killed once it ends (the helper's unit is its control group): the answer comes at once.
        doc = story.command("pkg-setsid-root", ["sh", "-c", "setsid sleep 300.25 & echo started"],
                            timeout=120)
        assert doc["ret"][0] == "started\n" and doc["returncode"] == 0 and "error" not in doc, doc
        assert "300.25" not in story.container.exec("ps", "-eo", "args").stdout
        story.admin.put({"_id": "sneaky", "type": story.macid, "code": SNEAKY})
        report = story.var("programs", "sneaky", "sneaky.json")
        found = json.loads(wait_for(lambda: report.exists() and report.stat().st_size and report.read_text(), 60,
                                    message=f"the program's report\n{story.daemon_log()}"))
        story.admin.delete("sneaky")
        assert found["uid"] == story.uid("rspby"), found
        assert "only the himbeerecouch daemon" in found["answer"].get("error", ""), found
        assert str(found["daemon"]) == story.daemon()["MainPID"], found
        # The daemon is non-dumpable: under ProtectProc=invisible its programs do not even see it.
        assert found["environ"] in ("No such file or directory", "Permission denied"), found
        assert not (story.root / "etc" / "himbeerecouch-pwned").exists()
        helper_log = story.container.exec("journalctl", "--no-pager", "-u", "himbeerecouch-root@*").stdout
        assert "refused" in helper_log and "running as root for the daemon" in helper_log, helper_log

    def test_power_reboots_once_its_result_is_written_and_not_again(self, story, timings):
        story.set_privileges("power")
        assert story.command("pkg-id-power", ["id", "-u"])["ret"][0] == f"{story.uid('rspby')}\n"
        leader = story.container.leader
        story.admin.put({"_id": "pkg-reboot", "type": f"{story.macid}_cmd", "cmd": ["reboot"]})
        start = time.monotonic()
        how = wait_for(lambda: story.container.went_down_for_reboot(leader), 90, interval=0.2,
                       message=f"the container to reboot\n{story.daemon_log()}")
        timings[f"{story.suite}: reboot command to the container's end"] = round(time.monotonic() - start, 1)
        assert how in ("exited 133", "restarted"), how
        # Written before the reboot: the container is down (or its new init up) by now.
        doc = story.admin.get("pkg-reboot")
        assert doc["returncode"] == 0 and doc["ret"][0].startswith("reboot: "), doc
        story.container.poweroff()
        story.boot(timings)
        wait_for(lambda: story.daemon()["ActiveState"] == "active", 30, message="the daemon after the reboot")
        assert story.command("pkg-after-reboot", ["echo", "back"])["ret"] == ["back\n", ""]
        time.sleep(2)
        assert story.container.process.poll() is None, "the reboot command ran again"
        assert story.admin.get("pkg-reboot")["_rev"] == doc["_rev"]
        story.set_privileges(None)

    # ---- a cloned card -------------------------------------------------------------------

    def test_cloned_card_gets_new_credentials(self, story, timings):
        story.container.poweroff()
        new_machine_id(story.root)
        console = story.boot(timings)
        lines = firstboot_lines(console)
        assert any(re.search(r"\bnew\b", line, re.IGNORECASE) for line in lines), lines
        password = printed_password(lines)
        assert password != story.password
        assert list(story.var().glob("credentials.json.*.old")), "the old credentials are kept aside"
        assert password in (story.root / "etc" / "issue.d" / "himbeerecouch.issue").read_text()
        story.password = password

    def test_operator_server_file_is_never_overwritten(self, story):
        own = "http://operator.example:5984\n"
        story.container.sh(f"printf '{own}' > /var/rspby/server.new && mv /var/rspby/server.new /var/rspby/server")
        story.container.sh("echo 'himbeerecouch himbeerecouch/server string http://other.example:5984' "
                           "| debconf-set-selections && dpkg-reconfigure -fnoninteractive himbeerecouch")
        assert story.var("server").read_text() == own

    # ---- remove, purge, install again -----------------------------------------------------

    def test_remove_stops_everything_and_keeps_the_state(self, story):
        wait_for(lambda: story.rspby_processes(), 30, message="the daemon running before removal")
        result = story.container.exec("dpkg", "-r", "himbeerecouch")
        assert "warning" not in result.stdout.lower(), result.stdout
        assert story.rspby_processes() == ""
        # The first-boot unit too (a oneshot that remains "active (exited)" unless stopped).
        assert [story.active(unit) for unit in UNITS] == ["inactive"] * len(UNITS)
        assert story.var("credentials.json").exists()
        assert (story.root / "etc" / "himbeerecouch" / "himbeerecouch.conf").exists()
        assert not (story.root / "etc" / "issue.d" / "himbeerecouch.issue").exists()
        assert story.container.exec("test", "-e", "/run/himbeerecouch/root.sock", check=False).returncode != 0

    def test_purge_keeps_the_user_and_nothing_else(self, story):
        story.rspby_uid = story.uid("rspby")
        result = story.container.exec("dpkg", "--purge", "himbeerecouch")
        # Debian 13: "directory '/lib/systemd/system' not empty so not removed" for units under /lib.
        assert "warning" not in result.stdout.lower(), result.stdout
        for unit in UNITS:
            state = story.container.show(unit, "ActiveState", "LoadState")
            assert state == {"ActiveState": "inactive", "LoadState": "not-found"}, (unit, state)
            assert story.active(unit) != "active"
        assert_purged(story)

    def test_install_by_hand_asks_for_the_server(self, story):
        """As a person installs the .deb (debconf's default priority, an interactive frontend): the
        question is asked; a URL with a password gets the error note and the question again."""
        answers = f"http://admin:{SECRET}@typed.invalid:5984\n{TYPED}\n"
        # teletype needs a terminal: script(1) gives it one, and the answers as typed input.
        result = story.install_deb("script", "-qec", "DEBIAN_FRONTEND=teletype dpkg -i {deb}", "/dev/null",
                                   input=answers)
        assert result.returncode == 0, result.stdout[-5000:]
        output = ANSI.sub("", result.stdout)
        assert output.count("CouchDB server URL:") == 2, output[-5000:]
        assert "must not carry user:password@" in output, output[-5000:]
        assert story.var("server").read_text() == TYPED + "\n"
        assert story.holding_the_secret() == []
        # The user kept at the purge is the one used again: same uid.
        assert story.uid("rspby") == story.rspby_uid
        assert story.active("himbeerecouch.service") == "active"

    def test_preseeded_url_with_a_password_is_refused_without_failing(self, story):
        """Noninteractive (an image build, an unattended installation): the preseeded URL with a
        password is refused with a message, not written anywhere, and the installation succeeds."""
        story.container.exec("dpkg", "--purge", "himbeerecouch")
        story.container.exec("debconf-set-selections",
                             input=f"himbeerecouch himbeerecouch/server string http://admin:{SECRET}@preseeded.invalid:5984\n")
        result = story.install_deb("apt-get", "install", "-y", "--no-install-recommends", "{deb}")
        assert result.returncode == 0, result.stdout[-5000:]
        assert "refusing the server URL: it carries user:password@" in result.stdout, result.stdout[-5000:]
        assert not story.var("server").exists()
        assert story.holding_the_secret() == []
        shown = story.container.exec("debconf-show", "himbeerecouch").stdout
        assert re.search(r"himbeerecouch/server:\s*$", shown, re.MULTILINE), shown
        assert story.active("himbeerecouch.service") == "active"

    def test_purge_again_leaves_only_the_user(self, story):
        result = story.container.exec("dpkg", "--purge", "himbeerecouch")
        assert "warning" not in result.stdout.lower(), result.stdout
        assert [story.active(unit) for unit in UNITS] == ["inactive"] * len(UNITS)
        story.container.poweroff()
        assert_purged(story)


def assert_purged(story: Story) -> None:
    """Nothing of the package is left in the root but its system user and group, which Debian keeps."""
    root = story.root
    for path in ["var/rspby", "etc/himbeerecouch", "etc/issue.d", "usr/lib/himbeerecouch",
                 "usr/lib/python3/dist-packages/himbeerecouch", "usr/lib/systemd/system/himbeerecouch.service",
                 "usr/lib/systemd/system/himbeerecouch-firstboot.service", "usr/lib/tmpfiles.d/himbeerecouch.conf",
                 "etc/systemd/system/multi-user.target.wants/himbeerecouch.service",
                 "etc/systemd/system/multi-user.target.wants/himbeerecouch-firstboot.service"]:
        assert not (root / path).exists(), path
    passwd = chroot(root, "getent", "passwd", "rspby").stdout.strip().split(":")
    assert passwd[0] == "rspby" and int(passwd[2]) == story.rspby_uid and passwd[5] == "/var/rspby", passwd
    assert chroot(root, "getent", "group", "rspby").stdout.startswith("rspby:")
    assert chroot(root, "debconf-show", "himbeerecouch").stdout.strip() == ""
    # Any other trace: everything but logs, the journal, dpkg's and apt's own records, the user
    # and group databases (the user is kept) and the backups that shadow's tools (passwd-,
    # group-, ...) and debconf (*.dat-old) keep of the state before their last change.
    leftovers = run(["grep", "-rIl", "-e", "himbeerecouch", "-e", "rspby",
                     "--exclude-dir=log", "--exclude-dir=dpkg", "--exclude-dir=apt",
                     "--exclude=*-", "--exclude=*.dat-old",
                     "--exclude=passwd", "--exclude=group", "--exclude=shadow", "--exclude=gshadow",
                     str(root / "etc"), str(root / "var"), str(root / "usr/lib"), str(root / "lib/systemd")],
                    check=False).stdout.split()
    assert leftovers == []
