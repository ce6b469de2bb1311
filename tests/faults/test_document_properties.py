"""Property-based: random JSON in code and command documents never stops the daemon.

The pure parts (documents.parse, documents.wanted_programs, commands.invalid_reason) are run on
many random documents; a real daemon against the real test server gets batches of them and
must stay up, give every code document a state (and FATAL ones an error), and answer every
command document. HIMBEERECOUCH_SOAK=1 runs many more examples.
"""
from __future__ import annotations

import os
import string
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from himbeerecouch import commands, documents
from support import wait_for

SOAK = os.environ.get("HIMBEERECOUCH_SOAK") == "1"
MACID = 202481596538417

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
MODULE_NAMES = st.one_of(st.sampled_from(["helper", "main", "os", "sys", "json", "x.y", "", "1a", "höhe"]),
                         st.text(max_size=8))
CODE = st.one_of(
    JSON,
    st.text(max_size=60),
    st.sampled_from(["def main(): pass", "def main(:", "main = 1", "import helper\ndef main(): pass",
                     "raise RuntimeError('at import')\ndef main(): pass", "def main():\n    raise SystemExit(7)",
                     "import sys\nsys.exit(3)", "\x00", "def main():\n    log(*range(3))"]),
)
CODE_DOC = st.fixed_dictionaries(
    {"code": CODE},
    optional={"name": JSON, "modules": st.one_of(JSON, st.dictionaries(MODULE_NAMES, CODE, max_size=3)),
              "global_modules": st.one_of(JSON, st.dictionaries(MODULE_NAMES, CODE, max_size=3)),
              "restart": st.one_of(JSON, st.sampled_from(["always", "no", "on-failure", "sometimes"])),
              "enabled": JSON, "colour": JSON})
# A command that is a valid argv runs `echo` with the random arguments: nothing random is executed.
CMD = st.one_of(JSON, st.lists(st.text(max_size=12), max_size=4).map(lambda args: ["echo", *args]))
COMMAND_DOC = st.fixed_dictionaries({"cmd": CMD}, optional={"timeout": JSON, "ret": st.just(None)})


@settings(max_examples=2000 if SOAK else 300, deadline=None)
@given(doc=CODE_DOC, doc_id=st.text(min_size=1, max_size=20), rev=JSON)
def test_parsing_a_code_document_never_raises(doc, doc_id, rev):
    spec = documents.parse({"_id": doc_id, "_rev": rev, "type": MACID, **doc}, 10_000)
    if spec.error is None:
        assert isinstance(spec.code, str) and spec.restart in documents.RESTART_POLICIES
        assert all(isinstance(source, str) for source in spec.modules.values())
    else:
        assert isinstance(spec.error, str) and spec.error
    wanted = documents.wanted_programs({doc_id: {"_id": doc_id, "_rev": rev, "type": MACID, **doc}}, 10_000)
    assert set(wanted) == {doc_id}


@settings(max_examples=2000 if SOAK else 300, deadline=None)
@given(doc=COMMAND_DOC)
def test_judging_a_command_document_never_raises(doc):
    reason = commands.invalid_reason(doc)
    if reason is None:
        assert doc["cmd"] and all(isinstance(arg, str) for arg in doc["cmd"])
    else:
        assert isinstance(reason, str) and reason


# Ids as people write them. (Wilder ids go to the pure tests above: pouchdb-server 4.2 answers
# 201 to an id whose first character takes three or more bytes in UTF-8, "中..." say, and then
# never lists it; Apache CouchDB has no such quirk.)
DOC_ID = st.text(alphabet=string.ascii_letters + string.digits + "-_.:~ äöüßé中", min_size=1,
                 max_size=16).filter(lambda text: not text.startswith(("_", "中")))


@pytest.mark.integration
@settings(max_examples=12 if SOAK else 3, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(code_docs=st.dictionaries(DOC_ID, CODE_DOC, min_size=3, max_size=8),
       command_docs=st.lists(COMMAND_DOC, min_size=2, max_size=5))
def test_a_daemon_fed_random_documents_stays_up_and_answers_each(admin, make_daemon, code_docs, command_docs):
    # Each example gets a database of its own: the admin fixture's is shared by the examples
    # (and removed by it at the end, under its own name).
    fixture_db = admin.db.split('-')[0]
    admin.db = f"{fixture_db}-{time.monotonic_ns()}"
    admin.create_db()
    for doc_id, doc in code_docs.items():
        admin.put({"_id": doc_id, "type": MACID, **doc})
    command_ids = []
    for index, doc in enumerate(command_docs):
        doc = {key: value for key, value in doc.items() if key != "ret"}
        command_ids.append(f"cmd-{index}")
        admin.put({"_id": f"cmd-{index}", "type": f"{MACID}_cmd", **doc})
    daemon = make_daemon(subdir=f"example{time.monotonic_ns()}-")
    daemon.start()
    try:
        listed = admin.http.post(admin.url("_find"), json={"selector": {"type": MACID}, "limit": 100}, timeout=10)
        expected = {doc["_id"] for doc in listed.json()["docs"]}
        assert expected == set(code_docs)

        def every_program_has_a_state():
            programs = (admin.get(f"{MACID}_heartbeat") or {}).get("programs") or {}
            return set(programs) == expected and programs
        programs = wait_for(every_program_has_a_state, timeout=30,
                            message="a state for every code document in the status")
        for doc_id, status in programs.items():
            if status["state"] == "FATAL":
                assert status["last_error"], (doc_id, status)
        for command_id in command_ids:
            done = wait_for(lambda: "ret" in (admin.get(command_id) or {}) and admin.get(command_id),
                            timeout=30, message=f"an answer in {command_id}")
            assert done.get("error") or done.get("returncode") is not None, done
        assert daemon.process.poll() is None, daemon.log()[-3000:]
        assert "unexpected failure" not in daemon.log(), daemon.log()[-3000:]
    finally:
        daemon.stop()
        admin.drop_db()
        admin.db = fixture_db
