"""Operator commands: setup-db, add-device, add-user, push, cmd, status (subcommands of `himbeerecouch`).

Where the server and the operator's credentials come from, first found wins:
  options (--server, --database, --status-database, --user, --ca-file, --password-file),
  environment (COUCHDB_URL, COUCHDB_DATABASE, COUCHDB_STATUS_DATABASE, COUCHDB_USER,
  COUCHDB_PASSWORD, COUCHDB_CA_FILE),
  the operator's config file (--admin-config, HIMBEERECOUCH_ADMIN_CONFIG, or
  ~/.config/himbeerecouch/admin.conf; INI section [himbeerecouch-admin] with keys server,
  database, status_database, user, password, ca_file), and the URL's own user:password.
A password is never taken from an option (it would show in process listings); without one, an
interactive terminal is asked for it.
"""
from __future__ import annotations

import argparse
import configparser
import getpass
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import unquote, urlsplit, urlunsplit

from . import page, pagecsp, security
from .command_client import EXIT_NOT_RUN, EXIT_STATUS_HELP, EXIT_WITHDRAWN, run_remote

if TYPE_CHECKING:
    from .couch import Database
# The CouchDB client is imported when a command runs, so that `himbeerecouch-creds` and the
# daemon's argument parsing do not load it.

DEFAULT_ADMIN_CONFIG = Path("~/.config/himbeerecouch/admin.conf")
ADMIN_SECTION = "himbeerecouch-admin"
DEFAULT_DATABASE = "nedm/raspberries"
DEFAULT_WAIT = 60.0             # seconds `cmd` waits for a result


class OperatorError(Exception):
    """Something the operator must fix; the message says what."""


def read_text(file: str, what: str, stdin: TextIO | None = None) -> str:
    """A text file the operator named (`-`: stdin when given), or an OperatorError that names
    the file once and says what is wrong with it."""
    try:
        if file == "-" and stdin is not None:
            return stdin.read()
        return Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        name = "stdin" if file == "-" else file
        raise OperatorError(f"{what} {name} is not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        name = "stdin" if file == "-" else file
        raise OperatorError(f"cannot read {what} {name}: {error.strerror or error}") from None


@dataclass(frozen=True)
class Connection:
    server: str
    database: str
    user: str | None
    password: str | None
    ca_file: str
    status_database: str | None = None     # the devices' status documents; None: `database`

    def open_status(self) -> Database:
        return self.open(self.status_database or self.database)

    def separate_status(self) -> Database | None:
        """The status database when it is not the code database, else None."""
        if self.status_database in (None, self.database):
            return None
        return self.open(self.status_database)

    def open(self, name: str | None = None) -> Database:
        from .couch import Database
        credentials = (self.user, self.password) if self.user and self.password is not None else None
        return Database(self.server, name or self.database, credentials=credentials, ca_file=self.ca_file)


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (see also COUCHDB_URL, COUCHDB_USER, COUCHDB_PASSWORD)")
    group.add_argument("--server", metavar="URL", help="CouchDB server URL (COUCHDB_URL)")
    group.add_argument("--database", metavar="NAME", help=f"database (COUCHDB_DATABASE; default {DEFAULT_DATABASE})")
    group.add_argument("--status-database", metavar="NAME",
                       help="database of the devices' status documents, when the devices' "
                            "status_database names one (COUCHDB_STATUS_DATABASE; default: --database)")
    group.add_argument("--user", metavar="NAME", help="operator's CouchDB user (COUCHDB_USER)")
    group.add_argument("--password-file", metavar="FILE", help="read the operator's password from FILE")
    group.add_argument("--ca-file", metavar="FILE", help="CA bundle for the server's TLS certificate (COUCHDB_CA_FILE)")
    group.add_argument("--admin-config", metavar="FILE",
                       help=f"operator config file (HIMBEERECOUCH_ADMIN_CONFIG; default {DEFAULT_ADMIN_CONFIG})")


def _admin_config(args: argparse.Namespace, environ) -> dict[str, str]:
    explicit = args.admin_config or environ.get("HIMBEERECOUCH_ADMIN_CONFIG")
    path = Path(explicit) if explicit else DEFAULT_ADMIN_CONFIG.expanduser()
    if not path.exists():
        if explicit:
            raise OperatorError(f"the operator config file {path} does not exist")
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    text = read_text(str(path), "the operator config file")
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as error:
        raise OperatorError(f"the operator config file {path} is not valid INI: {_ini_problem(error)}") from None
    return dict(parser.items(ADMIN_SECTION)) if parser.has_section(ADMIN_SECTION) else {}


def _ini_problem(error: configparser.Error) -> str:
    """configparser's own text repeats the file name and spans lines; this is the gist."""
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"line {error.lineno}: a key before any [section] header"
    if isinstance(error, configparser.ParsingError) and error.errors:
        return "; ".join(f"line {lineno}: cannot parse {line.strip()}" for lineno, line in error.errors)
    if isinstance(error, (configparser.DuplicateSectionError, configparser.DuplicateOptionError)):
        where = f"line {error.lineno}: " if error.lineno else ""
        return where + (f"section [{error.section}] again" if isinstance(error, configparser.DuplicateSectionError)
                        else f"key {error.option} twice in [{error.section}]")
    return error.message if hasattr(error, "message") else str(error)


def resolve_connection(args: argparse.Namespace, environ=os.environ, stdin: TextIO = sys.stdin) -> Connection:
    stored = _admin_config(args, environ)
    url = args.server or environ.get("COUCHDB_URL") or stored.get("server")
    if not url:
        raise OperatorError("no server: give --server URL, set COUCHDB_URL, or write server = URL in "
                            f"[{ADMIN_SECTION}] of {DEFAULT_ADMIN_CONFIG}")
    server, url_credentials = _split_credentials(url)
    user = args.user or environ.get("COUCHDB_USER") or stored.get("user") or \
        (url_credentials[0] if url_credentials else None)
    password = None
    if args.password_file:
        password = read_text(args.password_file, "the password file").rstrip("\n")
    password = password or environ.get("COUCHDB_PASSWORD") or stored.get("password") or \
        (url_credentials[1] if url_credentials else None)
    if user and password is None:
        if not stdin.isatty():
            raise OperatorError(f"no password for user {user}: set COUCHDB_PASSWORD or use --password-file")
        password = _prompt(f"CouchDB password for {user}: ")
    ca_file = args.ca_file or environ.get("COUCHDB_CA_FILE") or stored.get("ca_file", "")
    if ca_file and urlsplit(server).scheme == "https":
        try:                                        # requests would raise a bare OSError for it
            with open(ca_file, "rb"):
                pass
        except OSError as error:
            raise OperatorError(f"cannot read the CA file {ca_file}: {error.strerror or error}") from None
    return Connection(server=server, database=args.database or environ.get("COUCHDB_DATABASE")
                      or stored.get("database") or DEFAULT_DATABASE,
                      user=user, password=password, ca_file=ca_file,
                      status_database=args.status_database or environ.get("COUCHDB_STATUS_DATABASE")
                      or stored.get("status_database") or None)


def _prompt(question: str) -> str:
    """A password from the terminal; Ctrl-D is a refusal, not a traceback."""
    try:
        return getpass.getpass(question)
    except EOFError:
        raise OperatorError("no password given") from None


def _split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return (urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)),
            (unquote(parts.username), unquote(parts.password or "")))


# ---- setup-db -------------------------------------------------------------------------------

def setup_db(db: Database, status_db: Database | None = None) -> list[str]:
    """Bring the database (and the status database, when the devices have one of their own) to
    what the daemon and the rights model need; lists what changed."""
    changes = _setup_one(db)
    if status_db is not None and status_db.name != db.name:
        changes += [f"{change} (status database)" if status_db.name not in change else change
                    for change in _setup_one(status_db)]
    return changes


def _setup_one(db: Database) -> list[str]:
    """The same rules in either database: a device writes only its own `<MacID>_` documents."""
    changes = []
    if not db.exists():
        db.create()
        changes.append(f"created database {db.name}")
    if db.ensure_index(["type"], security.INDEX_NAME, security.INDEX_DDOC):
        changes.append("created the index on 'type'")
    current = db.security()
    wanted = _merged_security(current)
    if current != wanted:
        db.set_security(wanted)
        changes.append("set the security object (members: roles raspberry, deployer)")
    design = db.get(security.DESIGN_DOC_ID)
    if design is None or design.get("validate_doc_update") != security.VALIDATE_DOC_UPDATE:
        doc = {**(design or {}), **security.DESIGN_DOC}
        db.put(doc)
        changes.append("installed the validation function (_design/himbeerecouch)")
    return changes


def _merged_security(current: dict) -> dict:
    """Our roles added to whatever the site has already; nothing of theirs is removed."""
    merged = json.loads(json.dumps(current or {}))
    for section, rules in security.SECURITY.items():
        target = merged.setdefault(section, {})
        for kind, values in rules.items():
            existing = target.setdefault(kind, [])
            existing.extend(value for value in values if value not in existing)
    return merged


# ---- add-device -----------------------------------------------------------------------------

def read_device_credentials(args: argparse.Namespace, stdin: TextIO) -> tuple[int, str]:
    if args.macid is not None and args.password is not None:
        return args.macid, args.password
    source = args.from_file
    if source is None and args.macid is not None:
        if stdin.isatty():
            return args.macid, _prompt(f"password of device {args.macid}: ")
        source = "-"
    if source is None:
        raise OperatorError("give MACID PASSWORD, or --from FILE (- for stdin) with the output of "
                            "himbeerecouch-creds --json")
    text = read_text(source, "the credentials file", stdin)
    try:
        data = json.loads(text)
        macid, password = int(data["MacID"]), data["password"]
    except (ValueError, KeyError, TypeError, OverflowError):
        if args.macid is not None and text.strip() and "\n" not in text.strip():
            return args.macid, text.strip()          # a bare password on stdin
        name = "stdin" if source == "-" else source
        raise OperatorError(f'{name} does not hold {{"MacID": ..., "password": ...}} as '
                            "himbeerecouch-creds --json prints it") from None
    if args.macid is not None and args.macid != macid:
        raise OperatorError(f"the credentials are for MacID {macid}, not {args.macid}")
    if not isinstance(password, str) or not password:
        raise OperatorError("the password must be a string that is not empty")
    return macid, password


def add_device(users: Database, macid: int, password: str) -> str:
    from .couch import Conflict
    doc_id = f"org.couchdb.user:{macid}"
    for _ in range(3):
        current = users.get(doc_id)
        doc = {**(current or {}), "_id": doc_id, "name": str(macid), "type": "user", "password": password}
        roles = list(doc.get("roles", []))
        if security.DEVICE_ROLE not in roles:
            roles.append(security.DEVICE_ROLE)
        doc["roles"] = roles
        try:
            users.put(doc)
        except Conflict:
            continue
        return "updated" if current else "created"
    raise OperatorError(f"the user {macid} keeps changing on the server; try again")


# ---- add-user -------------------------------------------------------------------------------

def check_roles(roles: list[str]) -> list[str]:
    """The roles of a person or tool: deployer (writes code and commands) or the site's own
    (read only, through the database's members); never a device's or CouchDB's own."""
    checked: list[str] = []
    for role in roles:
        if not role or role != role.strip():
            raise OperatorError(f"{role!r} is not a role name")
        if role.startswith("_"):
            raise OperatorError(f"role {role}: names starting with _ are CouchDB's own")
        if role == security.DEVICE_ROLE:
            raise OperatorError(f"role {role} is for devices: use himbeerecouch add-device MACID")
        if role not in checked:
            checked.append(role)
    return checked


def read_new_password(args: argparse.Namespace, stdin: TextIO) -> str | None:
    """The new user's password, never from argv: generated (printed once), from stdin
    (--password-stdin) or asked twice on a terminal; None with --keep-password."""
    if args.keep_password:
        return None
    if args.generate_password:
        from .credentials import random_password
        return random_password()
    if args.password_stdin:
        text = read_text("-", "the password on", stdin)
        password = text[:-1] if text.endswith("\n") else text
        password = password[:-1] if password.endswith("\r") else password
        if "\n" in password:
            raise OperatorError("--password-stdin reads one line; stdin holds several")
    elif stdin.isatty():
        password = _prompt(f"new password for {args.name}: ")
        if password and _prompt("the same password again: ") != password:
            raise OperatorError("the two passwords differ; nothing changed")
    else:
        raise OperatorError("no password: stdin is not a terminal; give --password-stdin (the "
                            "password as one line on stdin) or --generate-password")
    if not password:
        raise OperatorError("the password is empty; nothing changed")
    return password


def add_user(users: Database, db: Database, name: str, roles: list[str],
             password: str | None, status_db: Database | None = None) -> list[str]:
    """Create or update the CouchDB user `name` with `roles` added to those it has, and make
    each role a member of `db` (which exists: cmd_add_user checks, before asking for the password);
    lists what was done. password None: keep the user's own."""
    from .couch import Conflict
    doc_id = f"org.couchdb.user:{name}"
    for _ in range(3):
        current = users.get(doc_id)
        if current is None and password is None:
            raise OperatorError(f"there is no user {name} whose password could be kept")
        had = [role for role in (current or {}).get("roles", []) if isinstance(role, str)]
        doc = {**(current or {}), "_id": doc_id, "name": name, "type": "user",
               "roles": had + [role for role in roles if role not in had]}
        if password is not None:
            doc["password"] = password
        try:
            users.put(doc)
        except Conflict:
            continue
        break
    else:
        raise OperatorError(f"the user {name} keeps changing on the server; try again")
    added = [role for role in roles if role not in had]
    done = [f"{'updated' if current else 'created'} CouchDB user {name} with role"
            f"{'s' if len(doc['roles']) != 1 else ''} {', '.join(doc['roles']) or '(none)'}"
            + (f" ({', '.join(added)} added)" if current and added else "")
            + ("; password kept" if password is None else "")]
    done += _grant(db, roles)
    if status_db is not None and status_db.name != db.name:
        if status_db.exists():
            done += _grant(status_db, roles)
        else:
            done.append(f"there is no status database {status_db.name}: himbeerecouch setup-db "
                        "--status-database makes it (and its members)")
    return done


def _grant(db: Database, roles: list[str]) -> list[str]:
    """Make each role a member of the database (nothing of the site's is removed)."""
    current = db.security()
    members = (current or {}).get("members") or {}
    if not members.get("names") and not members.get("roles"):
        # No members: the database is open to every user. A member role would close it to all
        # others, which is setup-db's decision to make, not this command's.
        return [f"database {db.name} has no members, so every user may read it; "
                "himbeerecouch setup-db restricts it"]
    missing = [role for role in roles if role not in (members.get("roles") or [])]
    if not missing:
        return []
    wanted = json.loads(json.dumps(current))
    wanted["members"].setdefault("roles", []).extend(missing)
    db.set_security(wanted)
    return [f"added role{'s' if len(missing) > 1 else ''} {', '.join(missing)} to the members of "
            f"database {db.name}"]


# ---- push -----------------------------------------------------------------------------------

def _modules(pairs: list[str], option: str) -> dict[str, str]:
    modules = {}
    for pair in pairs or []:
        name, sep, file = pair.partition("=")
        if not sep or not name.isidentifier():
            raise OperatorError(f"{option} wants NAME=FILE with NAME a Python module name, not {pair!r}")
        modules[name] = _read_source(file, "the module file")
    return modules


def _read_source(file: str, what: str = "the program file") -> str:
    source = read_text(file, what)
    try:
        compile(source, file, "exec")
    except SyntaxError as error:
        raise OperatorError(f"{file} line {error.lineno}: {error.msg}") from None
    except ValueError as error:                     # a NUL byte: compile() refuses the source
        raise OperatorError(f"{file} is not Python source: {error}") from None
    return source


def push(db: Database, macid: int, file: str, name: str | None, doc_id: str | None,
         modules: list[str], global_modules: list[str]) -> tuple[str, dict]:
    from .couch import Conflict
    code = _read_source(file)
    name = name or Path(file).stem
    doc_id = doc_id or f"code:{macid}:{name}"
    managed = {"type": macid, "name": name, "code": code}
    if modules:
        managed["modules"] = _modules(modules, "--module")
    if global_modules:
        managed["global_modules"] = _modules(global_modules, "--global-module")
    for _ in range(3):
        current = db.get(doc_id)
        try:
            stored = db.put({**(current or {}), "_id": doc_id, **managed})
        except Conflict:
            continue
        return ("updated" if current else "created"), stored
    raise OperatorError(f"{doc_id} keeps changing on the server; try again")


# ---- status ---------------------------------------------------------------------------------

def _age(timestamp: str | None, now: datetime) -> float | None:
    if not timestamp:
        return None
    try:
        seen = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (now - seen).total_seconds()


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(0, seconds):.0f}s ago"


DEFAULT_STALE_AFTER = 120.0     # at least; and two of the device's own keep-alive intervals + 60 s


def stale_after_for(doc: dict, stale_after: float | None = None) -> float:
    """When a status document is stale: `stale_after` when the operator gives it, else two of
    the keep-alive intervals the document states (`status_interval`; 30 s for daemons that do
    not say, as the original and older versions rewrote it that often) and a minute, at
    least DEFAULT_STALE_AFTER."""
    if stale_after is not None:
        return stale_after
    interval = doc.get("status_interval")
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
        interval = 30.0
    return max(DEFAULT_STALE_AFTER, 2 * interval + 60)


def status_table(heartbeats: list[dict], stale_after: float | None, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    rows = [("MACID", "LAST SEEN", "IP", "VERSION", "PROGRAMS", "LAST ERROR")]
    for doc in sorted(heartbeats, key=lambda d: str(d.get("macid") or d.get("_id"))):
        age = _age(doc.get("timestamp"), now)
        seen = _human(age)
        if age is None or age > stale_after_for(doc, stale_after):
            seen += " STALE"
        elif doc.get("daemon") == "stopped":
            seen += " (stopped)"
        programs, errors = [], []
        for doc_id, program in sorted((doc.get("programs") or {}).items()):
            restarts = program.get("restarts") or 0
            programs.append(f"{program.get('name', doc_id)}:{program.get('state', '?')}"
                            + (f"({restarts} restarts)" if restarts else ""))
            if program.get("last_error"):
                errors.append(f"{program.get('name', doc_id)}: {program['last_error']}")
        macid = doc.get("macid") or str(doc.get("_id", "")).removesuffix("_heartbeat")
        rows.append((str(macid), seen, str(doc.get("ip") or "-"), str(doc.get("version") or "-"),
                     " ".join(programs) or "-", "; ".join(errors) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]
                     for row in rows).rstrip() + "\n"


def heartbeats(db: Database, macid: int | None, *also: Database) -> list[dict]:
    """The status documents in `db`, and in the databases `also` (a fleet moving to a status
    database: some devices still write into the code database); per device the newest one."""
    newest: dict[str, dict] = {}
    for each in (db, *also):
        if macid is not None:
            doc = each.get(f"{macid}_heartbeat")
            docs = [doc] if doc else []
        else:
            docs = each.find({"type": "heartbeat"})
        for doc in docs:
            kept = newest.get(doc["_id"])
            if kept is None or str(doc.get("timestamp") or "") > str(kept.get("timestamp") or ""):
                newest[doc["_id"]] = doc
    return list(newest.values())


# ---- the subcommands ------------------------------------------------------------------------

def cmd_setup_db(args: argparse.Namespace, connection: Connection) -> int:
    db = connection.open()
    changes = setup_db(db, connection.separate_status())
    warnings: list[str] = []
    if not args.no_page:
        page_changes = page.install_fleet_page(db, connection.status_database) + page.install_login_page(db)
        csp_changes, warnings = pagecsp.ensure_csp(db, allow=args.page_csp)
        changes += page_changes + csp_changes
        if page_changes:
            changes.append(f"the fleet page: {page.page_url(connection.server, page.login_database(db.name))}")
    elif args.page_csp:
        raise OperatorError("--page-csp is for the page, which --no-page leaves out")
    if changes:
        for change in changes:
            print(change)
    else:
        print(f"database {connection.database} is set up already: nothing changed")
    for warning in warnings:
        print(f"himbeerecouch setup-db: warning: {warning}", file=sys.stderr)
    return 0


def cmd_add_device(args: argparse.Namespace, connection: Connection) -> int:
    macid, password = read_device_credentials(args, sys.stdin)
    outcome = add_device(connection.open("_users"), macid, password)
    print(f"{outcome} CouchDB user {macid} with role {security.DEVICE_ROLE}")
    return 0


def cmd_push(args: argparse.Namespace, connection: Connection) -> int:
    outcome, stored = push(connection.open(), args.macid, args.file, args.name, args.id,
                           args.module, args.global_module)
    print(f"{outcome} {stored['_id']} (rev {stored['_rev']}) for {args.macid}")
    return 0


def cmd_add_user(args: argparse.Namespace, connection: Connection) -> int:
    if not args.name or args.name.startswith("_") or ":" in args.name:
        raise OperatorError(f"{args.name!r} cannot be a CouchDB user name (empty, a leading _, or a colon)")
    roles = check_roles(args.role or [security.DEPLOYER_ROLE])
    db = connection.open()
    if not db.exists():                             # before the password is asked for
        raise OperatorError(f"there is no database {db.name}: run himbeerecouch setup-db first")
    password = read_new_password(args, sys.stdin)
    for line in add_user(db.sibling("_users"), db, args.name, roles, password, connection.separate_status()):
        print(line)
    if args.generate_password:
        print(f"password: {password}")
    return 0


def cmd_cmd(args: argparse.Namespace, connection: Connection) -> int:
    if not args.argv:
        raise OperatorError("give the command after --, e.g. himbeerecouch cmd 123 -- uname -a")
    if args.timeout is not None and not args.timeout > 0:
        raise OperatorError(f"--timeout must be more than 0 seconds, not {args.timeout:g}")
    if args.cancel_after is not None and not args.cancel_after >= 0:
        raise OperatorError(f"--cancel-after must be 0 seconds or more, not {args.cancel_after:g}")
    wait = args.wait
    if wait is None:
        wait = max(DEFAULT_WAIT, args.cancel_after or 0)
    elif not wait >= 0:
        raise OperatorError(f"--wait must be 0 seconds or more, not {wait:g}")
    elif args.cancel_after is not None and args.cancel_after > wait:
        raise OperatorError(f"--cancel-after {args.cancel_after:g} is longer than --wait {wait:g}: "
                            "the command would be left pending; wait at least as long")
    return run_remote(connection.open(), args.macid, args.argv, args.timeout, wait,
                      sys.stderr, sys.stdout, sys.stderr, cancel_after=args.cancel_after, user=connection.user)


def cmd_status(args: argparse.Namespace, connection: Connection) -> int:
    also = [connection.open()] if connection.separate_status() is not None else []
    docs = heartbeats(connection.open_status(), args.macid, *also)
    if args.json:
        print(json.dumps(docs, indent=1))
    elif not docs:
        print("no device has written a status yet" if args.macid is None
              else f"no status from {args.macid}", file=sys.stderr)
        return 1
    else:
        sys.stdout.write(status_table(docs, args.stale_after))
    return 0


def add_subcommands(commands) -> None:
    def command(name: str, func, help_text: str, description: str, **kwargs) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=description, **kwargs)
        add_connection_options(parser)
        parser.set_defaults(func=func, operator=True)
        return parser

    setup = command("setup-db", cmd_setup_db, "create and secure the database, install the fleet page (idempotent)",
                    "Create the database if missing, the index the daemon's first read uses, the security "
                    "object (devices are members through the role raspberry, deployers through deployer), "
                    "the validation function that limits what a device may write, and the fleet page "
                    "(<server>/<database>/_design/himbeerecouch/index.html, and a copy in the database "
                    "<database>_login that anyone may read, where a browser can log in). Needs a server "
                    "admin. Running it again changes nothing and says so.")
    setup.add_argument("--no-page", action="store_true",
                       help="leave the fleet page and its login database out (neither install nor update them)")
    setup.add_argument("--page-csp", action="store_true",
                       help="when the server's Content-Security-Policy for attachments keeps the page "
                            "from running (CouchDB 3's default: sandbox), set [csp] "
                            "attachments_header_value to a policy that allows same-server scripts, "
                            "styles and requests; it applies to every attachment of the server")
    device = command("add-device", cmd_add_device, "create or update a device's CouchDB user",
                     "Create or update the CouchDB user of a device (user name: its MacID) with the "
                     "role raspberry. Give MACID PASSWORD, or pipe the output of "
                     "`himbeerecouch-creds --json` (--from -), which keeps the password out of "
                     "process listings.")
    device.add_argument("macid", type=int, nargs="?", help="the device's MacID")
    device.add_argument("password", nargs="?", help="the device's password (visible in process listings)")
    device.add_argument("--from", dest="from_file", metavar="FILE",
                        help="read himbeerecouch-creds --json output from FILE (- for stdin)")
    user = command("add-user", cmd_add_user, "create or update the CouchDB user of a person or tool",
                   "Create or update a CouchDB user for a person or a tool, add the roles given to "
                   "those it has (none is removed), and make each role a member of the database. "
                   "Role deployer (the default) may write code and command documents (push, cmd); "
                   "any other role of the site (e.g. viewer) may read the database (status) and write "
                   "nothing. The password never is an argument: it is asked twice on a terminal, "
                   "read from stdin (--password-stdin) or made up (--generate-password). Needs a "
                   "server admin.")
    user.add_argument("name", help="the CouchDB user name")
    user.add_argument("--role", action="append", metavar="ROLE",
                      help=f"a role to add (repeatable; default {security.DEPLOYER_ROLE})")
    source = user.add_mutually_exclusive_group()
    source.add_argument("--password-stdin", action="store_true",
                        help="read the password from stdin (one line)")
    source.add_argument("--generate-password", action="store_true",
                        help="make up a password (20 characters) and print it, once")
    source.add_argument("--keep-password", action="store_true",
                        help="an existing user keeps its password; only roles are added")
    push_parser = command("push", cmd_push, "store a program for a device",
                          "Create or update the code document of a program for a device. The "
                          "document keeps its _rev and every field this command does not manage.")
    push_parser.add_argument("macid", type=int)
    push_parser.add_argument("file", help="the program: a Python file defining main()")
    push_parser.add_argument("--name", help="program name (default: the file name without .py)")
    push_parser.add_argument("--id", help="document id (default code:MACID:NAME)")
    push_parser.add_argument("--module", action="append", metavar="NAME=FILE", help="a module of this program")
    push_parser.add_argument("--global-module", action="append", metavar="NAME=FILE",
                             help="a module every program of this device can import")
    cmd_parser = command("cmd", cmd_cmd, "run a command on a device (after --) and print its output",
                         textwrap.fill(
                             "Write a command document, wait for the device's result, print its "
                             "stdout and stderr to the same streams and exit with its exit status "
                             "(see below). A command no device has claimed when --wait ends stays "
                             "pending, and the device runs it whenever it next sees it, possibly "
                             "hours later; --cancel-after withdraws it instead.", 78),
                         epilog="The command follows `--`: himbeerecouch cmd 202481596538417 -- uname -a\n\n"
                                + EXIT_STATUS_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd_parser.set_defaults(failure_exit=EXIT_NOT_RUN)
    cmd_parser.add_argument("macid", type=int)
    cmd_parser.add_argument("--timeout", type=float, metavar="S",
                            help="seconds the command may run on the device (then it is killed: 137)")
    cmd_parser.add_argument("--wait", type=float, metavar="S",
                            help=f"seconds to wait for the result ({DEFAULT_WAIT:g}, or --cancel-after "
                                 "when longer); then exit 124, and an unclaimed command stays pending")
    cmd_parser.add_argument("--cancel-after", type=float, metavar="S",
                            help="withdraw the command if no device has claimed it within S seconds "
                                 f"(exit {EXIT_WITHDRAWN}); one that is claimed runs, and is waited for")
    status = command("status", cmd_status, "show the fleet's status",
                     "A table of the devices' status documents (with --status-database, from there and "
                     "from the database, the newest of each device): last seen (STALE when older than "
                     "--stale-after), IP, version, programs with state and restarts, last errors.")
    status.add_argument("macid", type=int, nargs="?")
    status.add_argument("--stale-after", type=float, metavar="S",
                        help="seconds after which a device is STALE (default: two of the device's own "
                             "keep-alive intervals, status_interval_seconds, and a minute; at least 120)")
    status.add_argument("--json", action="store_true", help="the status documents as JSON")


def run_operator_command(args: argparse.Namespace) -> int:
    from .couch import CONNECTION_ERRORS, redact, server_error
    # `cmd` passes on the command's own exit status, so its own failures get one of their own.
    usage, trouble = (args.failure_exit, args.failure_exit) if getattr(args, "failure_exit", None) else (2, 1)
    connection = None
    try:
        connection = resolve_connection(args)
        return args.func(args, connection)
    except OperatorError as error:
        print(f"himbeerecouch {args.command}: {error}", file=sys.stderr)
        return usage
    except CONNECTION_ERRORS as error:
        if connection is None:                      # before any request: the URL itself
            print(f"himbeerecouch {args.command}: the server URL is not valid: {error}", file=sys.stderr)
            return usage
        message = server_error(error, redact(connection.server), connection.user)
        print(f"himbeerecouch {args.command}: {message}", file=sys.stderr)
        return trouble
    except KeyboardInterrupt:
        print(f"\nhimbeerecouch {args.command}: interrupted", file=sys.stderr)
        return 130
