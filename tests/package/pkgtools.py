"""Plumbing of the package tier: build the .deb, make Debian roots, boot them with nspawn."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("HIMBEERECOUCH_PACKAGE_MIRROR", "http://deb.debian.org/debian")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"),
             "LC_ALL": "C.UTF-8"}
FILE_MIRROR_HOOK = "/usr/share/mmdebstrap/hooks/file-mirror-automount"
# What a Pi image has and the tier needs: systemd as init, man-db for the Documentation=
# check of systemd-analyze verify.
ROOT_PACKAGES = ["systemd", "systemd-sysv", "man-db"]
# Debian 12, and Debian 13 when its archive is reachable.
SUITES = os.environ.get("HIMBEERECOUCH_PACKAGE_SUITES", "bookworm trixie").split()


def run(cmd: list[str], *, check: bool = True, timeout: float = 900, env: dict | None = None,
        cwd: Path | str | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command; output is captured as text (stderr merged into stdout)."""
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout, env=env, cwd=cwd, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout[-5000:]}")
    return result


def timed(label: str, timings: dict, function, *args, **kwargs):
    start = time.monotonic()
    try:
        return function(*args, **kwargs)
    finally:
        timings[label] = round(time.monotonic() - start, 1)


# ---- the build ------------------------------------------------------------------------------

def export_checkout(ref: str, dest: Path) -> None:
    """The files of a commit (git archive), as a clean checkout without .git, build/ or dist/."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref],
                             stdout=subprocess.PIPE, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


class Build:
    """`make deb` on a clean checkout (git archive of a commit, HEAD by default)."""

    def __init__(self, workdir: Path, ref: str) -> None:
        self.workdir = workdir
        self.ref = ref
        self.src = workdir / "src"
        self.version = ""
        self.deb: Path | None = None
        self.dsc: Path | None = None
        self.changes: Path | None = None
        self.log = ""

    def run(self) -> None:
        export_checkout(self.ref, self.src)
        # Nothing from the host's caches: the source tree is all the build may use.
        result = run(["make", "deb"], cwd=self.src, env=dict(CLEAN_ENV))
        self.log = result.stdout
        self.version = run(["dpkg-parsechangelog", "-l", "debian/changelog", "-S", "Version"],
                           cwd=self.src).stdout.strip()
        self.deb = self.src / "dist" / f"himbeerecouch_{self.version}_all.deb"
        self.dsc = self.src / "dist" / f"himbeerecouch_{self.version}.dsc"
        self.changes = next((self.src / "build" / "deb").glob(f"himbeerecouch_{self.version}_*.changes"))

    def upgraded_deb(self, suffix: str = "+pkgtest1") -> Path:
        """The same package under a higher version, to exercise the upgrade path (made once)."""
        version = self.version + suffix
        out = self.workdir / f"himbeerecouch_{version}_all.deb"
        if out.exists():
            return out
        unpacked = self.workdir / "upgrade"
        run(["dpkg-deb", "-R", str(self.deb), str(unpacked)])
        control = unpacked / "DEBIAN" / "control"
        control.write_text(control.read_text().replace(f"Version: {self.version}\n", f"Version: {version}\n"))
        run(["dpkg-deb", "--root-owner-group", "-b", str(unpacked), str(out)])
        return out


# ---- Debian roots ---------------------------------------------------------------------------

def reachable(suite: str) -> bool:
    return run(["curl", "-sfI", "--max-time", "20", f"{MIRROR}/dists/{suite}/InRelease"],
               check=False).returncode == 0


def mmdebstrap(suite: str, target: Path, include: list[str], *, variant: str = "apt",
               hooks: list[str] = (), essential_hooks: list[str] = ()) -> str:
    """A clean root (directory or tarball, by target's name); local .debs go in by path."""
    cmd = ["mmdebstrap", f"--variant={variant}", "--include=" + ",".join(include)]
    if any(item.startswith("/") for item in include):
        cmd.append(f"--hook-dir={FILE_MIRROR_HOOK}")
    cmd += [f"--customize-hook={hook}" for hook in hooks]
    cmd += [f"--essential-hook={hook}" for hook in essential_hooks]
    cmd += [suite, str(target), MIRROR]
    return run(cmd, env=CLEAN_ENV, timeout=1800).stdout


def chroot(root: Path, *cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    env = dict(CLEAN_ENV, DEBIAN_FRONTEND="noninteractive")
    return run(["chroot", str(root), *cmd], check=check, env=env, input=input)


# ---- a booted container ---------------------------------------------------------------------

class Container:
    """`systemd-nspawn --boot` of a root, sharing the host's network (its 127.0.0.1 included).

    Commands run inside through nsenter into the container's init (no machined here). Its
    console (what StandardOutput=tty TTYPath=/dev/console writes) lands in `console_log`.
    """

    def __init__(self, root: Path, name: str, console_log: Path) -> None:
        self.root = root
        self.name = name
        self.console_log = console_log
        self.process: subprocess.Popen | None = None
        self.leader: int | None = None

    def _own_cgroups(self) -> list[Path]:
        """Without systemd as the host's init, every `nspawn --keep-unit` container lands in the
        same cgroups (<caller's cgroup>/payload/...): two containers at once (or one left over)
        then see each other's processes as pid 0, and systemd inside fails to list or kill the
        processes of a unit (EIO). Each container gets cgroups of its own here."""
        if Path("/run/systemd/system").exists():
            return []                       # a systemd host: the caller's own unit
        base = Path("/sys/fs/cgroup")
        hierarchies = [base / name for name in ("unified", "systemd") if (base / name / "cgroup.procs").exists()]
        if not hierarchies and (base / "cgroup.procs").exists():
            hierarchies = [base]            # pure cgroup v2
        # The v1 memory controller too (hybrid or legacy host): nspawn gives the container a cgroup
        # namespace, so its part of that hierarchy is this cgroup, and what its systemd makes there
        # (enable_memory_limits) is removed with it at poweroff.
        memory = _v1_cgroup("memory")
        if memory is not None:
            hierarchies.append(memory)
        own = []
        for hierarchy in hierarchies:
            path = hierarchy / f"himbeerecouch-{self.name}-{os.getpid()}"
            path.mkdir(exist_ok=True)
            own.append(path)
        return own

    def _find_leader(self) -> int | None:
        """nspawn's first child is a helper that forks the container's init and goes away: the
        leader is the child that has become systemd."""
        if self.process is None:
            return None
        for child in run(["pgrep", "-P", str(self.process.pid)], check=False).stdout.split():
            try:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
            except OSError:
                pass
        return None

    def boot(self, timeout: float = 120) -> float:
        """Boot and wait until the system is up; returns the seconds it took."""
        start = time.monotonic()
        self._console = open(self.console_log, "wb")
        self._cgroups = self._own_cgroups()
        cgroups = list(self._cgroups)

        def enter_cgroups():
            for path in cgroups:
                (path / "cgroup.procs").write_text("0")
        self.process = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--console=read-only",
             f"--machine={self.name}", "-D", str(self.root)],
            stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT, env=CLEAN_ENV,
            preexec_fn=enter_cgroups)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.process.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.process.returncode}:\n{self.console()}")
            self.leader = self._find_leader()
            if self.leader is None:
                if time.monotonic() > deadline:
                    raise AssertionError("systemd-nspawn started no container")
                time.sleep(0.05)
        while True:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"container not up after {timeout} s (state {state!r}):\n"
                                     f"{self.sh('systemctl --failed --no-pager', check=False).stdout}\n"
                                     f"{self.console()[-3000:]}")
            time.sleep(0.1)
        return time.monotonic() - start

    def went_down_for_reboot(self, leader: int) -> str | None:
        """Whether the container rebooted since `leader` was its init: with --keep-unit,
        systemd-nspawn ends with 133 and leaves the restart to its caller ("exited 133");
        without, it starts the container's init again itself ("restarted")."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is not None:
            return f"exited {code}"
        current = self._find_leader()
        return "restarted" if current not in (None, leader) else None
    def console(self) -> str:
        return self.console_log.read_text(errors="replace") if self.console_log.exists() else ""

    def exec(self, *cmd: str, check: bool = True, timeout: float = 300,
             input: str | None = None) -> subprocess.CompletedProcess:
        assert self.leader, "container not booted"
        return run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--",
                    "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8",
                    "DEBIAN_FRONTEND=noninteractive", *cmd], check=check, timeout=timeout, input=input)

    def sh(self, script: str, check: bool = True, timeout: float = 300,
           input: str | None = None) -> subprocess.CompletedProcess:
        return self.exec("/bin/sh", "-c", script, check=check, timeout=timeout, input=input)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.exec("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.exec("journalctl", "-u", unit, "--no-pager", "-o", "short-monotonic",
                         check=False).stdout

    # ---- memory limits of units ------------------------------------------------------------

    def enable_memory_limits(self) -> str | None:
        """Let the container's systemd apply MemoryMax= to its units; returns why it cannot, or None.

        On a host with v1 controllers (the hybrid or legacy cgroup hierarchy) nspawn mounts each
        of them read-only in the container (only name=systemd is writable): the container's
        systemd then leaves the memory controller out of what it manages and applies no
        memory limit at all. Remounting the container's memory hierarchy writable (it is the
        container's own cgroup, see _own_cgroups) and re-executing its systemd, which looks at the
        controllers again when it starts, makes MemoryMax= apply as memory.limit_in_bytes, as
        systemd does on such a hierarchy. It lasts until the container powers off. On a cgroup v2
        host the memory controller is there only when the host delegates it to the container."""
        if self.exec("test", "-e", "/sys/fs/cgroup/memory/cgroup.procs", check=False).returncode != 0:
            controllers = self.exec("cat", "/sys/fs/cgroup/cgroup.controllers", check=False).stdout.split()
            if "memory" in controllers:
                return None
            return ("the container's cgroup (v2) has no memory controller: the host does not delegate it "
                    f"(controllers: {' '.join(controllers) or 'none'})")
        if _swap_total() > 0:
            return ("a cgroup v1 host with swap: systemd's MemoryMax= there limits RAM only "
                    "(memory.limit_in_bytes), so a program that eats memory is swapped out, not killed")
        self.exec("mount", "-o", "remount,bind,rw,nosuid,nodev,noexec", "/sys/fs/cgroup/memory")
        self.exec("systemctl", "daemon-reexec", check=False)
        deadline = time.monotonic() + 60
        while self.sh("systemctl is-system-running", check=False).stdout.strip() not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise AssertionError("the container's systemd did not come back after daemon-reexec")
            time.sleep(0.1)
        return None

    def _memory_file(self, unit: str, v1: str, v2: str) -> str | None:
        """A file of the memory controller in a unit's cgroup (v1 name, v2 name), None if missing."""
        cgroup = self.show(unit, "ControlGroup").get("ControlGroup", "")
        if not cgroup:
            return None
        for path in (f"/sys/fs/cgroup/memory{cgroup}/{v1}", f"/sys/fs/cgroup{cgroup}/{v2}"):
            result = self.exec("cat", path, check=False)
            if result.returncode == 0:
                return result.stdout
        return None

    def memory_limit(self, unit: str) -> int | None:
        """The memory limit the kernel enforces on a running unit's cgroup (None: none applies)."""
        text = self._memory_file(unit, "memory.limit_in_bytes", "memory.max")
        if text is None or text.strip() == "max":
            return None
        value = int(text.strip())
        return value if value < 2 ** 62 else None      # v1 says "unlimited" with a huge number

    def oom_kills(self, unit: str) -> int:
        """How many processes the kernel's OOM killer has killed in a unit's cgroup."""
        text = self._memory_file(unit, "memory.oom_control", "memory.events") or ""
        counts = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
        return int(counts.get("oom_kill", 0))

    def poweroff(self, timeout: float = 90) -> None:
        if self.process is None:
            return
        leader = self._find_leader() or self.leader
        try:
            if self.process.poll() is None and leader:
                # What `systemctl poweroff` asks of PID 1, without needing D-Bus.
                try:
                    os.kill(leader, signal.SIGRTMIN + 4)
                except ProcessLookupError:
                    pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # A container that cannot shut down: end its init from outside (SIGKILL from
                # the parent namespace ends every process in it), then nspawn.
                if leader:
                    try:
                        os.kill(leader, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=30)
        finally:
            self._console.close()
            self.process = None
            self.leader = None
            for path in getattr(self, "_cgroups", []):
                for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
                try:
                    path.rmdir()
                except OSError:
                    pass


def _v1_cgroup(controller: str) -> Path | None:
    """This process's cgroup in a v1 controller's hierarchy, if that hierarchy is mounted."""
    base = Path("/sys/fs/cgroup") / controller
    if not (base / "cgroup.procs").exists():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return base / path.lstrip("/")
    return None


def _swap_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("SwapTotal:"):
            return int(line.split()[1])
    return 0


def nspawn(root: Path, *cmd: str, network: bool = True, chdir: str = "/", check: bool = True,
           timeout: float = 1800) -> subprocess.CompletedProcess:
    """One command in a root with systemd-nspawn (not booted): /proc, /dev and a pty device as on a
    machine; the host's network, or none (--private-network: loopback only)."""
    return run(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--pipe", f"--directory={root}",
                f"--chdir={chdir}", *([] if network else ["--private-network"]), "/usr/bin/env", "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LC_ALL=C.UTF-8", *cmd],
               check=check, timeout=timeout, env=CLEAN_ENV)


def new_machine_id(root: Path) -> str:
    """What a cloned card in another Pi looks like off a Pi: another machine (and serial)."""
    machine_id = uuid.uuid4().hex
    (root / "etc" / "machine-id").write_text(machine_id + "\n")
    return machine_id


def in_use(path: Path) -> bool:
    """Whether a container still runs on a root inside `path` (never delete it under it)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"systemd-nspawn") and any(str(path).encode() in arg for arg in args):
            return True
    return False


def remove_tree(path: Path) -> None:
    if path.exists():
        run(["rm", "-rf", "--one-file-system", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)
