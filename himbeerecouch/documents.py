"""Code documents: which ones belong to this Pi, and what program each one asks for.

Validation happens here, before any process starts, so a bad document becomes a clear error
in the log and the status document instead of a crash somewhere else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RESTART_POLICIES = ("on-failure", "always", "no")


def code_types(macid: int) -> list:
    """The `type` values that address code to this Pi (the original used the integer)."""
    return [macid, str(macid)]


def command_type(macid: int) -> str:
    return f"{macid}_cmd"


def is_code_doc(doc: dict, macid: int) -> bool:
    return doc.get("type") in code_types(macid) and not doc.get("_deleted")


def is_command_doc(doc: dict, macid: int) -> bool:
    return doc.get("type") == command_type(macid) and not doc.get("_deleted")


def feed_selector(macid: int, known_ids: list[str]) -> dict:
    """What the changes feed must deliver: this Pi's code and command documents, and every
    change (a deletion, a move to another Pi) of a document this Pi runs, which no longer
    carries our `type`."""
    mine = {"type": {"$in": code_types(macid) + [command_type(macid)]}}
    if not known_ids:
        return mine
    return {"$or": [mine, {"_id": {"$in": sorted(known_ids)}}]}


def find_selector(macid: int) -> dict:
    """This Pi's code documents and its commands that have no result yet."""
    return {"$or": [{"type": {"$in": code_types(macid)}},
                    {"type": command_type(macid), "ret": {"$exists": False}}]}


@dataclass(frozen=True)
class ProgramSpec:
    """What one code document asks for. `error` set means it cannot run, and says why."""
    doc_id: str
    rev: str
    name: str
    code: str = ""
    modules: dict[str, str] = field(default_factory=dict)
    global_modules: dict[str, str] = field(default_factory=dict)
    restart: str = "on-failure"
    enabled: bool = True
    error: str | None = None

    @property
    def runnable(self) -> bool:
        return self.enabled and self.error is None and bool(self.code)


def _string_dict(doc: dict, key: str) -> dict[str, str]:
    value = doc.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'{key}' must be an object of module name to source, not {type(value).__name__}")
    for name, source in value.items():
        if not isinstance(source, str):
            raise ValueError(f"'{key}.{name}' must be a string of Python source, not {type(source).__name__}")
        if not name.isidentifier():
            raise ValueError(f"'{key}' has a module name that Python cannot import: {name!r}")
    return dict(value)


def parse(doc: dict, max_bytes: int) -> ProgramSpec:
    """The ProgramSpec of one of this Pi's code documents (never raises)."""
    doc_id = doc["_id"]
    rev = str(doc.get("_rev", ""))
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        name = doc_id
    try:
        code = doc.get("code")
        modules = _string_dict(doc, "modules")
        global_modules = _string_dict(doc, "global_modules")
        if code is None and not global_modules:
            raise ValueError("no 'code': a code document needs 'code' (a module defining main())")
        if code is not None and not isinstance(code, str):
            raise ValueError(f"'code' must be a string of Python source, not {type(code).__name__}")
        restart = doc.get("restart", "on-failure")
        if restart not in RESTART_POLICIES:
            raise ValueError(f"'restart' must be one of {', '.join(RESTART_POLICIES)}, not {restart!r}")
        enabled = doc.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"'enabled' must be true or false, not {enabled!r}")
        size = _size(code or "", modules, global_modules)
        if size > max_bytes:
            raise ValueError(f"program is too large: {size} bytes of code, the limit is {max_bytes} "
                             "(max_program_bytes)")
    except ValueError as error:
        return ProgramSpec(doc_id=doc_id, rev=rev, name=name, error=str(error))
    return ProgramSpec(doc_id=doc_id, rev=rev, name=name, code=code or "", modules=modules,
                       global_modules=global_modules, restart=restart, enabled=enabled)


def _size(code: str, *module_sets: dict[str, str]) -> int:
    return len(code.encode()) + sum(len(source.encode()) for modules in module_sets
                                    for source in modules.values())


def merged_global_modules(specs: list[ProgramSpec]) -> dict[str, str]:
    """Every program on a Pi sees the global modules of all of that Pi's documents."""
    merged: dict[str, str] = {}
    for spec in sorted(specs, key=lambda s: s.doc_id):
        if spec.error:
            continue
        for name, source in spec.global_modules.items():
            if name in merged and merged[name] != source:
                log.warning("global module %r is defined differently by several documents; "
                            "the one of %s is used", name, spec.doc_id)
            merged[name] = source
    return merged


def fingerprint(spec: ProgramSpec, global_modules: dict[str, str]) -> str:
    """Changes exactly when the program must restart: its document, or the global modules."""
    digest = hashlib.sha256(json.dumps([spec.doc_id, spec.rev, global_modules], sort_keys=True).encode())
    return digest.hexdigest()


def wanted_programs(docs: dict[str, dict], max_bytes: int) -> dict[str, tuple[ProgramSpec, str]]:
    """What the documents ask to run: doc id -> (spec, fingerprint), each spec carrying the
    merged global modules it sees. Pure: the same documents always give the same answer."""
    specs = [parse(doc, max_bytes) for doc in docs.values()]
    global_modules = merged_global_modules(specs)
    wanted = {}
    for spec in specs:
        if not spec.error:
            size = _size(spec.code, spec.modules, global_modules)
            if spec.code and size > max_bytes:
                spec = ProgramSpec(doc_id=spec.doc_id, rev=spec.rev, name=spec.name, error=(
                    f"program is too large with the global modules it sees: {size} bytes of code, "
                    f"the limit is {max_bytes} (max_program_bytes)"))
            else:
                spec = dataclasses.replace(spec, global_modules=global_modules)
        wanted[spec.doc_id] = (spec, fingerprint(spec, global_modules))
    return wanted
