"""TLS: certificates are verified by default, by the daemon, its programs and the CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import marker_program, starts
from himbeerecouch.couch import Database
from support import ADMIN, userinfo, wait_for
from tlsfront import TlsFront, make_pki

pytestmark = pytest.mark.integration
MACID = 202481596538417


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def front(couch, pki):
    server = TlsFront(couch.port, pki["good"], pki["good_key"], couch.host)
    yield server
    server.close()


@pytest.fixture
def wrong_front(couch, pki):
    server = TlsFront(couch.port, pki["wrong"], pki["wrong_key"], couch.host)
    yield server
    server.close()


def test_verification_survives_pycouchdb_sub_resources(pki):
    # pycouchdb 1.17 resets session.verify to False for every sub-resource; ours must not.
    db = Database("https://127.0.0.1:1", "nedm/raspberries", ca_file=str(pki["ca"]))
    deeper = db.resource("a")("b")
    assert deeper.session.verify == str(pki["ca"]) and db.resource.session.verify == str(pki["ca"])
    assert Database("https://127.0.0.1:1", "x").resource("y").session.verify is True


def test_the_daemon_refuses_an_untrusted_certificate(admin, make_daemon, front, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon = make_daemon(server=front.url(userinfo()))
    daemon.start()
    daemon.wait_log("TLS certificate verification failed")
    assert not starts(tmp_path, "p")


def test_the_daemon_and_its_programs_trust_the_ca_file(admin, make_daemon, front, pki, tmp_path):
    code = marker_program(tmp_path, "p", f'    get_database().put({{"_id": "{MACID}_data", "via": "tls"}})')
    admin.put({"_id": "p", "type": MACID, "code": code})
    daemon = make_daemon(server=front.url(userinfo()), ca_file=pki["ca"])
    # requests would let this variable override the ca_file; it must not.
    daemon.start(env={"REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"})
    wait_for(lambda: starts(tmp_path, "p"), message="the program over TLS")
    wait_for(lambda: admin.get(f"{MACID}_data"), message="the program's write through get_database()")


def test_a_certificate_for_another_host_is_refused(admin, make_daemon, wrong_front, pki, tmp_path):
    admin.put({"_id": "p", "type": MACID, "code": marker_program(tmp_path, "p")})
    daemon = make_daemon(server=wrong_front.url(userinfo()), ca_file=pki["ca"])
    daemon.start()
    daemon.wait_log("TLS certificate verification failed")
    assert not starts(tmp_path, "p")


def cli_status(url: str, *extra: str):
    env = {**os.environ, "COUCHDB_URL": url, "COUCHDB_USER": ADMIN[0], "COUCHDB_PASSWORD": ADMIN[1]}
    return subprocess.run([sys.executable, "-m", "himbeerecouch", "status", "--json", *extra],
                          capture_output=True, text=True, env=env, timeout=60)


def test_the_cli_verifies_too(admin, front, wrong_front, pki):
    untrusted = cli_status(front.url(), "--database", admin.db)
    assert untrusted.returncode == 1 and "TLS certificate verification failed" in untrusted.stderr
    trusted = cli_status(front.url(), "--database", admin.db, "--ca-file", str(pki["ca"]))
    assert trusted.returncode == 0, trusted.stderr
    wrong_host = cli_status(wrong_front.url(), "--database", admin.db, "--ca-file", str(pki["ca"]))
    assert wrong_host.returncode == 1 and "TLS certificate verification failed" in wrong_host.stderr
