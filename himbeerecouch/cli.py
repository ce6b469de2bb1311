"""Command line: `himbeerecouch run` (the daemon) and `himbeerecouch-creds`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pathlib import Path

from . import __version__, admin, credentials
from .config import ConfigError, load
from .identity import IdentityError

ISSUE_FILE = Path("/etc/issue.d/himbeerecouch.issue")

log = logging.getLogger("himbeerecouch")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="configuration file (default /etc/himbeerecouch/himbeerecouch.conf)")


def cmd_run(args: argparse.Namespace) -> int:
    from . import logsetup
    from .daemon import Daemon
    # Logging first: what is wrong in the configuration is logged, not a reason to stop.
    logsetup.setup(args.log_level or "INFO")
    config = load(args.config)
    logsetup.set_level(args.log_level or config.log_level)
    log.info("himbeerecouch %s starting", __version__)
    return Daemon(config, args.config, log_level=args.log_level).run()


def cmd_broadcast(args: argparse.Namespace) -> int:
    from .discovery import broadcast_message, has_userinfo
    if has_userinfo(args.url):
        print("himbeerecouch broadcast: the URL carries user:password@, which Pis refuse (it would go "
              "over the LAN in the clear); give the URL alone: each Pi logs in with its own "
              "credentials (himbeerecouch-creds)", file=sys.stderr)
        return 2
    print(f"asking unprovisioned Pis on {args.address}:{args.port} for {args.timeout:g} s ...", file=sys.stderr)
    try:
        replies = broadcast_message(args.url, timeout=args.timeout, address=args.address, port=args.port)
    except OSError as error:
        print(f"himbeerecouch broadcast: cannot send: {error}", file=sys.stderr)
        return 1
    for (ip, port), reply in sorted(replies.items()):
        if args.json:
            print(json.dumps({"address": ip, "port": port, **reply}))
        else:
            print(f"{ip}  MacID {reply.get('MacID')}  password {reply.get('password')}")
    if not replies:
        print("no answer: every Pi on this network is provisioned, or broadcasts do not reach them "
              "(use himbeerecouch-creds at the Pi's console instead)", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="himbeerecouch",
        description="Run the Python programs stored in a CouchDB database for this Raspberry Pi.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground",
                              description="Run the daemon in the foreground (what the systemd unit runs).")
    _add_config(run)
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                     help="override log_level of the config file")
    run.set_defaults(func=cmd_run)
    broadcast = commands.add_parser(
        "broadcast", help="provision Pis on this network with a server URL (UDP discovery)",
        description="Send the server URL to every unprovisioned Pi on the local network (UDP port "
                    "53000) and print the MacID and password each one answers with.")
    broadcast.add_argument("url", help="CouchDB server URL the Pis are to follow")
    broadcast.add_argument("--timeout", type=float, default=10, help="seconds to wait for answers (10)")
    broadcast.add_argument("--address", default="<broadcast>", help="where to send (default: broadcast)")
    broadcast.add_argument("--port", type=int, default=53000, help="UDP port (53000)")
    broadcast.add_argument("--json", action="store_true", help="one JSON object per answer")
    broadcast.set_defaults(func=cmd_broadcast)
    admin.add_subcommands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after `--` is a command line for a device (himbeerecouch cmd MACID -- ARGV...).
    remote = None
    if "--" in argv:
        split = argv.index("--")
        argv, remote = argv[:split], argv[split + 1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        # `cmd` exits with the remote command's status; its own usage errors have one of their own.
        if exit.code == 2 and argv[:1] == ["cmd"]:
            raise SystemExit(admin.EXIT_NOT_RUN) from None
        raise
    args.argv = remote
    if getattr(args, "operator", False):
        return admin.run_operator_command(args)
    try:
        return args.func(args)
    except (ConfigError, IdentityError) as error:
        print(f"himbeerecouch: {error}", file=sys.stderr)
        return 2


def creds_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="himbeerecouch-creds",
        description="Print this device's MacID and CouchDB password (the CouchDB user to create "
                    "for it). Run as root, or as the service user, to read them.")
    _add_config(parser)
    parser.add_argument("--json", action="store_true", help='print {"MacID": ..., "password": ...}')
    parser.add_argument("--firstboot", action="store_true",
                        help="make the credentials when missing or when the identity changed, print "
                             "them for the console and update the login prompt (the first-boot unit)")
    parser.add_argument("--issue-file", default=str(ISSUE_FILE), metavar="PATH",
                        help=f"login prompt snippet written by --firstboot (default {ISSUE_FILE})")
    args = parser.parse_args(argv)
    # Mistakes in the configuration go to stderr (the journal under the first-boot unit), and
    # the credentials are shown all the same.
    logging.basicConfig(level=logging.WARNING, format="himbeerecouch-creds: %(message)s")
    try:
        config = load(args.config)
        create = args.firstboot or credentials.can_create(config)
        creds, new = credentials.load_or_create(config, create=create)
        if args.firstboot:
            _write_issue(Path(args.issue_file), creds)
    except (ConfigError, IdentityError, credentials.CredentialsError) as error:
        print(f"himbeerecouch-creds: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"himbeerecouch-creds: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"MacID": creds.macid, "password": creds.password}))
    elif args.firstboot:
        headline = ("NEW device credentials: create this CouchDB user" if new
                    else "device credentials")
        print(f"himbeerecouch: {headline}")
        print(f"himbeerecouch:   MacID (user name): {creds.macid}")
        print(f"himbeerecouch:   password:          {creds.password}")
    else:
        print(f"MacID:    {creds.macid}")
        print(f"password: {creds.password}")
        if new:
            print("(new: made just now)", file=sys.stderr)
    return 0


def _write_issue(path: Path, creds) -> None:
    """The console's login prompt shows the credentials (agetty reads /etc/issue.d as root)."""
    from .state import write_atomic
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"himbeerecouch: MacID {creds.macid}  password {creds.password}\n\n"
    write_atomic(path, text.encode(), mode=0o600)
