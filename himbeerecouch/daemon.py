"""The daemon's main loop: one thread owns the programs; everything else sends it events.

Feed changes and connection states (from the follower thread), child exits and output, signals
and timers all wake one `selectors` loop. Each turn reconciles "programs the documents ask for"
with "processes that run" (see programs.Supervisor), then publishes the status. Signal handlers
only record the signal; the loop acts on it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import queue
import selectors
import signal
import sys
import threading
import time
import traceback
from typing import Any

from . import credentials, documents, logsetup
from .clock import ClockGate
from .config import Config, ConfigError, load
from .commands import CommandRunner, Limits
from .couch import Database, split_credentials, redact
from .discovery import ProvisioningListener
from .faultguard import EXIT_CODE, FaultGuard, RepeatedFault
from .feed import Changed, FeedState, Follower, Snapshot
from .forkserver import ForkServer
from .identity import IdentityError, device_macid
from .notify import Notifier
from .outputtail import OutputTails, OutputWriter
from .privileges import check_privileges, user_name
from .processes import DAEMON_SIGNALS, child_environment, kill_group, now_iso
from .programs import Supervisor
from .state import StateDir, write_atomic
from .status import StatusWriter, heartbeat, summary

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Provisioned:
    url: str


# Programs' exits, output, feed events and signals wake the loop; besides them it wakes only for
# its timers (watchdog, program deadlines) and to check that its threads live, this often:
THREAD_CHECK_SECONDS = 30.0


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None,
                 environ: dict[str, str] | None = None, log_level: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.log_level = log_level           # given on the command line: wins over log_level
        self.guard = FaultGuard()
        self.notifier = Notifier(environ)
        self.events: queue.Queue = queue.Queue()
        self.selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
        self.selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._signals: list[int] = []
        self.stopping = False
        self.started = time.time()
        self.started_iso = now_iso()
        self.docs: dict[str, dict] = {}
        self.feed_connected = False
        self.feed_error: str | None = None
        self._status_dirty = True
        self._pending_seq: Any = None
        self._offline_start_at: float | None = None   # when to run the last-known code unsynced
        self._generation = 0
        self.follower: Follower | None = None
        self.writer: StatusWriter | None = None
        self.output: OutputTails | None = None        # the programs' output; None: output_tail_lines = 0
        self.output_writer: OutputWriter | None = None
        self._output_published: int | None = None     # the tails' version last handed to the writer
        self.commands: CommandRunner | None = None
        self.discovery: ProvisioningListener | None = None
        self._commands_key: tuple = ()
        # Read at start only: once the clock was found synchronised, it stays so.
        self.clock = ClockGate(config.timesync_flag, config.clock_wait_seconds)
        self._setup(config)

    # ---- set-up (also on SIGHUP) ----------------------------------------------------------

    def _setup(self, config: Config) -> None:
        self.config = config
        self.macid = device_macid(config)
        self._device_credentials: tuple[str, str] | None = None
        self.server_url = config.server_url()
        check_privileges(config, self.server_url)
        owner = {"server": redact(self.server_url), "database": config.database, "macid": self.macid}
        self.state = StateDir(config.state_dir, owner)
        try:
            self.state.prepare()
        except OSError as error:
            log.error("cannot use state dir %s: %s; nothing is kept across restarts",
                      config.state_dir, error)
        workdir, self.commands_workdir = self.state.workdir("programs"), self.state.workdir("commands")
        database_settings = None
        if self.server_url:
            database_settings = {"url": self.server_url, "name": config.database,
                                 "credentials": self._credentials(), "ca_file": config.ca_file}
        if not hasattr(self, "supervisor"):
            self.supervisor = Supervisor(
                grace_seconds=config.grace_seconds, start_seconds=config.start_seconds,
                backoff_cap=config.restart_backoff_max_seconds, workdir=workdir,
                database_settings=database_settings, watch_fd=self._watch_fd,
                unwatch_fd=self.selector.unregister, on_change=self._mark_status)
            if config.spawn == "fork-server":
                self._setup_spawn(config)     # started early: its preload overlaps the first connection
        else:
            supervisor = self.supervisor
            supervisor.grace_seconds = config.grace_seconds
            supervisor.start_seconds = config.start_seconds
            supervisor.backoff_cap = config.restart_backoff_max_seconds
            supervisor.workdir = workdir
            supervisor.database_settings = database_settings
        self._setup_output(config)
        self.docs = self.state.load_code()
        if self.docs:
            log.info("last-known code: %d document(s) from %s", len(self.docs), self.state.path)

    def _setup_output(self, config: Config) -> None:
        """output_tail_lines = 0: no tails in memory and no output document; else tails of that
        size, kept across SIGHUP."""
        size = config.output_tail_lines
        if not size:
            self.output = None
        elif self.output is None:
            self.output = OutputTails(size)
        else:
            self.output.resize(size)
        self.supervisor.set_output(self.output)

    def _setup_spawn(self, config: Config) -> None:
        """spawn = fork-server: a fork server for the next program starts, a new one on SIGHUP,
        so that new code on disk (a package upgrade) reaches them; spawn = exec: none."""
        fork_server = self.supervisor.fork_server
        if config.spawn == "fork-server":
            if fork_server is None:
                self.supervisor.fork_server = ForkServer(
                    python=self.supervisor.python, env=child_environment, watch_fd=self._watch_fd,
                    unwatch_fd=self.selector.unregister, on_change=self._mark_status)
                self.supervisor.fork_server.start()
            else:
                fork_server.replace()
        elif fork_server is not None and fork_server.enabled:
            # The server stays while the programs it started run: their exit status comes from it.
            log.info("spawn = exec: programs start as fresh interpreters from now on")
            fork_server.disable()
        self._mark_status()

    def spawn_status(self) -> dict[str, Any]:
        if self.supervisor.fork_server is None:
            return {"mode": "exec", "fork_server_pid": None, "error": None}
        return self.supervisor.fork_server.status()

    def _credentials(self) -> tuple[str, str] | None:
        """The URL's own user:password (admin use, tests), else this device's credentials."""
        _, url_credentials = split_credentials(self.server_url)
        if url_credentials:
            return url_credentials
        if self._device_credentials is None:
            try:
                device, new = credentials.load_or_create(self.config, create=True, macid=self.macid)
            except credentials.CredentialsError as error:
                log.error("connecting without credentials: %s", error)
                return None
            if new:
                log.warning("made new device credentials for MacID %d (himbeerecouch-creds shows them)",
                            device.macid)
            self._device_credentials = (device.user, device.password)
        return self._device_credentials

    def _database(self, name: str) -> Database:
        if self.server_url.startswith("https:"):
            self.clock.wait()                  # certificates need the right date (clock.py)
        return Database(self.server_url, name, credentials=self._credentials(),
                        ca_file=self.config.ca_file, timeout=self.config.request_timeout_seconds)

    def _connect(self) -> Database:
        return self._database(self.config.database)

    def _connect_status(self) -> Database:
        """The status document's database: a write there wakes no device's changes feed when it
        is not the code database (`status_database`)."""
        return self._database(self.config.status_db_name)

    def _start_threads(self) -> None:
        # Events of threads replaced since (SIGHUP, provisioning) are dropped: they end only
        # at their next line.
        self._generation += 1
        self._start_discovery()
        if not self.server_url:
            log.warning("no server configured (server in the config file, or %s): running the "
                        "last-known code only", self.config.server_file)
            return
        log.info("MacID %d, database %s on %s", self.macid, self.config.database, redact(self.server_url))
        if self.config.status_db_name != self.config.database:
            log.info("status document in database %s", self.config.status_db_name)
        generation = self._generation
        self.follower = Follower(connect=self._connect, macid=self.macid, since=self.state.load_seq(),
                                 heartbeat_seconds=self.config.feed_heartbeat_seconds,
                                 backoff_cap=self.config.restart_backoff_max_seconds,
                                 emit=lambda event: self._emit((generation, event)))
        if self.commands is None:
            self.commands = CommandRunner(
                connect=self._connect, macid=self.macid, state=self.state,
                max_parallel=self.config.max_parallel_commands,
                limits=Limits(timeout=self.config.command_timeout_seconds,
                              output_cap=self.config.command_output_cap_bytes, workdir=self.commands_workdir,
                              user=user_name()),
                privileges=self.config.command_privileges, root_helper=self.config.root_helper)
            self.commands.start()
            self._commands_key = self._connection_key()
        self.writer = StatusWriter(connect=self._connect_status, doc_id=f"{self.macid}_heartbeat",
                                   interval=self.config.status_interval_seconds, started=self.started)
        self.follower.start()
        self.writer.start()
        self._mark_status()            # a new writer (SIGHUP, provisioning) has nothing to write yet
        if self.output is not None:
            # Beside the status document: in a status database of its own, it wakes no device's feed.
            self.output_writer = OutputWriter(connect=self._connect_status, macid=self.macid,
                                              interval=self.config.output_interval_seconds)
            self.output_writer.start()
            self._output_published = None

    def _start_discovery(self) -> None:
        """Listen for LAN provisioning while no server is known (or when told to stay open)."""
        mode = self.config.provisioning
        if mode == "off" or (mode == "auto" and self.server_url):
            return
        generation = self._generation
        try:
            self.discovery = ProvisioningListener(
                credentials=self._discovery_credentials,
                on_server=lambda url: self._emit((generation, Provisioned(url))),
                address=self.config.discovery_address, port=self.config.discovery_port,
                led_pin=self.config.led_pin)
        except OSError as error:
            log.error("cannot listen for discovery on port %d: %s", self.config.discovery_port, error)
            return
        self.discovery.start()
        log.info("waiting for a server: listening for discovery on UDP port %d", self.discovery.port)

    def _discovery_credentials(self) -> tuple[int, str]:
        device, _ = credentials.load_or_create(self.config, create=True, macid=self.macid)
        return device.macid, device.password

    def _provisioned(self, url: str) -> None:
        """A discovery request named our server: keep it where the original kept it, follow it."""
        try:
            write_atomic(self.config.server_file, (url + "\n").encode(), mode=0o640)
        except OSError as error:
            log.error("cannot store the server URL in %s: %s", self.config.server_file, error)
            return
        log.info("provisioned by discovery: server %s", redact(url))
        if self.config.server:
            log.warning("the config file names server %s, which takes precedence over %s",
                        redact(self.config.server), self.config.server_file)
        self._restart_threads(self.config)

    def _connection_key(self) -> tuple:
        return (self.server_url, self.config.database, self.macid, self.config.ca_file,
                str(self.config.state_dir), self.config.max_parallel_commands,
                self.config.command_timeout_seconds, self.config.command_output_cap_bytes,
                self.config.command_privileges, self.config.root_helper)

    def _stop_threads(self) -> None:
        if self.discovery:
            self.discovery.stop()
        if self.follower:
            self.follower.stop()
        if self.writer:
            self.writer.stop()
        if self.output_writer:
            self.output_writer.stop()
        self.follower = self.writer = self.output_writer = self.discovery = None

    def _restart_threads(self, config: Config) -> None:
        """New configuration or server: follow it afresh. Running commands go on unless the
        connection they report to changed."""
        self._stop_threads()
        self._setup(config)
        self._offline_start_at = None          # the reconcile below runs what is known now
        if self.commands and self._commands_key != self._connection_key():
            self.commands.stop()
            self.commands = None
        self._reconcile()
        self._start_threads()

    # ---- wake-ups -------------------------------------------------------------------------

    def _emit(self, event: object) -> None:
        """Called from other threads: queue the event and wake the loop."""
        self.events.put(event)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass                        # the pipe is full: the loop is awake anyway

    def _watch_fd(self, fd: int, owner: Any) -> None:
        self.selector.register(fd, selectors.EVENT_READ, owner)

    def _mark_status(self) -> None:
        self._status_dirty = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)     # the loop acts on it; set_wakeup_fd wakes the loop

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in DAEMON_SIGNALS}
        previous_wakeup = signal.set_wakeup_fd(self._wake_write, warn_on_full_buffer=False)
        try:
            if self.docs and self.server_url:
                # The server's current code is usually a moment away: wait for it rather than
                # run, even briefly, code that was changed while this Pi was off.
                self._offline_start_at = time.monotonic() + self.config.offline_start_seconds
            else:
                self._reconcile()
            self.notifier.ready(self._summary())
            self._start_threads()
            self._loop()
        except RepeatedFault as fault:
            log.critical("%s; exiting so that a clean daemon is started", fault)
            self._abort()
            return EXIT_CODE
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.supervisor.close()
            if self.supervisor.fork_server is not None:
                self.supervisor.fork_server.close()
        log.info("stopped")
        return 0

    def _loop(self) -> None:
        """Every turn serves signals, events, timers and the watchdog, whatever the programs do:
        a ready pipe costs one bounded read per turn (see output.py), and a step that fails is
        logged and does not keep the others from running (see faultguard.py)."""
        self._next_deadline: float | None = None
        self._threads_checked = time.monotonic()
        run = self.guard.run
        while True:
            timeout = None
            for due in (self._next_deadline, self.notifier.watchdog_due(), self._offline_start_at,
                        self._threads_checked + THREAD_CHECK_SECONDS):
                if due is not None:
                    left = max(0.0, due - time.monotonic())
                    timeout = left if timeout is None else min(timeout, left)
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    self._drain_wake_pipe()
                else:
                    run(functools.partial(key.data.read, key.fd), "reading a program's output")
            run(self._handle_signals, "signal handling")
            run(self._handle_events, "handling the server's changes")
            run(self._run_last_known_code_if_due, "starting the last-known code")
            run(self._tick, "supervising the programs")
            if self.stopping and not self.supervisor.alive():
                break
            run(self._publish_status, "publishing the status")
            run(self._publish_output, "publishing the programs' output")
            run(self._check_threads, "checking the threads")
            self.notifier.ping_watchdog()
        self._finish()

    def _tick(self) -> None:
        self._next_deadline = None
        self._next_deadline = self.supervisor.tick()

    def _abort(self) -> None:
        """Give up after repeated faults: nothing of this daemon may run on into the next one."""
        for program in self.supervisor.alive():
            kill_group(program.process.pid)
        try:
            if self.supervisor.fork_server is not None:
                self.supervisor.fork_server.kill()
            self._stop_threads()
            if self.commands:
                self.commands.stop(timeout=2.0)     # running commands: killed, reported interrupted
        except Exception:
            log.exception("while giving up")

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.handle_term(signum)
            elif signum == signal.SIGHUP:
                self.handle_hup()
            elif signum == signal.SIGUSR1:
                self.handle_usr1()
            # SIGCHLD only wakes the loop: tick() reaps.

    def handle_term(self, signum: int) -> None:
        if self.stopping:
            log.warning("second %s: killing every program now", signal.Signals(signum).name)
            for program in self.supervisor.alive():
                program.deadline = 0.0
            return
        log.info("%s: stopping every program (grace %.0f s)", signal.Signals(signum).name,
                 self.config.grace_seconds)
        self.stopping = True
        self.notifier.stopping()
        self.supervisor.stop_all("the daemon is stopping")
        if self.follower:
            self.follower.stop()
        if self.discovery:
            self.discovery.stop()
        if self.commands:
            self.commands.stop()     # running commands are killed and reported interrupted

    def handle_hup(self) -> None:
        if self.stopping:
            return
        log.info("SIGHUP: re-reading %s and resynchronising", self.config_path or "the configuration")
        try:
            config = load(self.config_path)
            device_macid(config)
            config.server_url()
        except (ConfigError, IdentityError, OSError, ValueError) as error:
            log.error("keeping the running configuration: %s", error)
            return
        logsetup.set_level(self.log_level or config.log_level)
        self._restart_threads(config)
        self._setup_spawn(config)

    def handle_usr1(self) -> None:
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            stack = "".join(traceback.format_stack(frame))
            log.info("stack of thread %s:\n%s", names.get(ident, ident), stack.rstrip())

    def _handle_events(self) -> None:
        code_changed = False
        while True:
            try:
                generation, event = self.events.get_nowait()
            except queue.Empty:
                break
            if generation != self._generation:
                continue
            if isinstance(event, Snapshot):
                docs = {doc["_id"]: doc for doc in event.docs if documents.is_code_doc(doc, self.macid)}
                code_changed |= docs != self.docs or self._offline_start_at is not None
                self._offline_start_at = None
                self.docs = docs
                self._pending_seq = event.seq
                self._offer_commands(event.docs)
                if self.commands:
                    self.commands.retry_unreported()
            elif isinstance(event, Changed):
                code_changed |= self._apply_change(event.change)
                self._pending_seq = event.change.seq
                if event.change.doc:
                    self._offer_commands([event.change.doc])
            elif isinstance(event, Provisioned):
                if not self.stopping:
                    self._provisioned(event.url)
                return                              # a new connection: its own events follow
            elif isinstance(event, FeedState):
                if (event.connected, event.error) != (self.feed_connected, self.feed_error):
                    self.feed_connected, self.feed_error = event.connected, event.error
                    self._mark_status()
        if self.stopping:
            return
        if code_changed:
            self._reconcile()
            self.state.save_code(self.docs)
        if self._pending_seq is not None:
            # Only after the code it covers is applied and cached: a replay is harmless, a gap is not.
            self.state.save_seq(self._pending_seq)
            self._pending_seq = None

    def _run_last_known_code_if_due(self) -> None:
        if self._offline_start_at is None or self.stopping or time.monotonic() < self._offline_start_at:
            return
        self._offline_start_at = None
        log.warning("no answer from the server within %.0f s: running the last-known code",
                    self.config.offline_start_seconds)
        self._reconcile()

    def _offer_commands(self, docs: list[dict]) -> None:
        if self.commands and not self.stopping:
            for doc in docs:
                if documents.is_command_doc(doc, self.macid) and "ret" not in doc:
                    self.commands.offer(doc)

    def _apply_change(self, change) -> bool:
        doc = change.doc
        if change.deleted or doc is None or not documents.is_code_doc(doc, self.macid):
            return self.docs.pop(change.doc_id, None) is not None
        if self.docs.get(change.doc_id, {}).get("_rev") == doc.get("_rev"):
            return False                  # seen already (a replay after a reconnect)
        self.docs[change.doc_id] = doc
        return True

    def _reconcile(self) -> None:
        self.supervisor.apply(documents.wanted_programs(self.docs, self.config.max_program_bytes))

    def _check_threads(self) -> None:
        self._threads_checked = time.monotonic()
        if self.stopping:
            return                                   # they were told to end
        for thread in (self.follower, self.writer, self.output_writer):
            if thread is not None and not thread.is_alive():
                log.error("%s thread ended unexpectedly; restarting the connection", thread.name)
                self._restart_threads(self.config)
                return

    # ---- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return heartbeat(macid=self.macid, started=self.started, started_iso=self.started_iso,
                         stopping=self.stopping, feed_connected=self.feed_connected,
                         feed_error=self.feed_error, programs=self.supervisor.programs,
                         spawn=self.spawn_status(), command_privileges=self.config.command_privileges)

    def _summary(self) -> str:
        return summary(self.supervisor.programs, self.server_url, self.feed_connected, self.feed_error)

    def _publish_status(self) -> None:
        if not self._status_dirty:
            return
        self._status_dirty = False
        self.notifier.status(self._summary())
        if self.writer:
            self.writer.publish(self.status())

    def _publish_output(self) -> None:
        """Hand the writer the tails when they changed; it writes them when its interval allows."""
        if self.output_writer is None or self.output is None:
            return
        version = self.output.version
        if version != self._output_published:
            self._output_published = version
            self.output_writer.publish(self.output)

    def _finish(self) -> None:
        if self.follower:
            self.follower.stop()
        # The last words: the status says "stopped", the output has what the programs printed
        # while they stopped. Both at once, 3 s at most in all.
        deadline = time.monotonic() + 3.0
        if self.writer:
            final = self.status()
            final["daemon"] = "stopped"
            self.writer.last_word(final)
        if self.output_writer and self.output is not None:
            self.output_writer.last_word(self.output)
        for writer in (self.writer, self.output_writer):
            if writer:
                writer.join(max(0.0, deadline - time.monotonic()))
