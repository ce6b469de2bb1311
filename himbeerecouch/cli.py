"""Command line: `himbeerecouch run` (the daemon) and `himbeerecouch-creds`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .config import ConfigError, load
from .identity import IdentityError, device_macid

log = logging.getLogger("himbeerecouch")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="configuration file (default /etc/himbeerecouch/himbeerecouch.conf)")


def cmd_run(args: argparse.Namespace) -> int:
    from . import logsetup
    from .daemon import Daemon
    config = load(args.config)
    logsetup.setup(args.log_level or config.log_level)
    log.info("himbeerecouch %s starting", __version__)
    return Daemon(config, args.config).run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="himbeerecouch",
        description="Run the Python programs stored in a CouchDB database for this Raspberry Pi.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="run the daemon in the foreground",
                              description="Run the daemon in the foreground (what the systemd unit runs).")
    _add_config(run)
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="override log_level of the config file")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, IdentityError) as error:
        print(f"himbeerecouch: {error}", file=sys.stderr)
        return 2


def creds_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="himbeerecouch-creds",
                                     description="Print this device's MacID and CouchDB password.")
    _add_config(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    try:
        macid = device_macid(load(args.config))
    except (ConfigError, IdentityError) as error:
        print(f"himbeerecouch-creds: {error}", file=sys.stderr)
        return 2
    # Device passwords arrive with the identity work; until then say so instead of inventing one.
    if args.json:
        print(json.dumps({"MacID": macid, "password": None}))
    else:
        print(f"MacID:    {macid}")
        print("password: (not available: this version makes no device password yet)")
    return 0
