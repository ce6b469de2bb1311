"""The fleet page in a browser, against the real test server and real daemons: log in, the fleet
with its states, live updates, a Pi's programs, output and errors, a command run from the page,
what a viewer may not do, log out."""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
import requests
from selenium.webdriver.common.by import By

from fleetsetup import screenshot, setup_db
from pagedriver import FleetPage
from support import ADMIN, marker_program, starts, wait_for
from test_operator import OTHER, PI, fleet_daemon

pytestmark = pytest.mark.integration


def iso(ago: float = 0.0) -> str:
    moment = datetime.now(timezone.utc) - timedelta(seconds=ago)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def program(tmp_path, macid: int, doc_id: str, name: str, body: str = "") -> dict:
    return {"_id": doc_id, "type": macid, "name": name, "code": marker_program(tmp_path, name, body)}


def quiet_pis(db) -> None:
    """Three Pis that are not running now: one long gone, one stale, one stopped cleanly."""
    db.put({"_id": "111_heartbeat", "type": "heartbeat", "macid": 111, "timestamp": iso(2 * 86400),
            "ip": "10.0.0.11", "hostname": "attic", "version": "0.0.9", "status_interval": 30, "programs": {}})
    db.put({"_id": "112_heartbeat", "type": "heartbeat", "macid": 112, "timestamp": iso(10), "daemon": "stopped",
            "ip": "10.0.0.12", "hostname": "cellar", "version": "0.1.0", "status_interval": 300,
            "programs": {"p": {"name": "logger", "state": "STOPPED", "restarts": 0}}})
    db.put({"_id": "113_heartbeat", "type": "heartbeat", "macid": 113, "timestamp": iso(1200),
            "ip": "10.0.0.13", "hostname": "shed", "version": "0.1.0", "status_interval": 300,
            "programs": {"p": {"name": "weather", "state": "RUNNING", "restarts": 4}}})


def compact(text: str) -> str:
    return " ".join(text.split())


def test_log_in_see_the_fleet_live_sort_filter_and_log_out(fleet, browser, couch, make_daemon, tmp_path):
    admin = fleet.admin
    admin.put(program(tmp_path, PI, "thermo-doc", "thermo"))
    admin.put(program(tmp_path, OTHER, "pump-doc", "pump"))
    for macid in (PI, OTHER):
        fleet_daemon(couch, admin, make_daemon, macid).start()
    wait_for(lambda: starts(tmp_path, "thermo") and starts(tmp_path, "pump"), message="both programs")
    quiet_pis(fleet.heartbeat_db())

    page = FleetPage(browser, fleet.login_url)
    page.open()
    page.log_in(*fleet.deployer)
    assert page.session_user() == fleet.deployer[0]
    rows = page.wait_rows(lambda r: all(compact(r.get(str(m), {}).get("programs", "")) == "RUNNING 1"
                                        for m in (PI, OTHER)), "both daemons with their program RUNNING")
    assert {macid: row["_state"] for macid, row in rows.items()} == {
        str(PI): "alive", str(OTHER): "alive", "111": "gone", "112": "stopped", "113": "stale"}
    assert rows[str(PI)]["ip"] == "127.0.0.1" and rows["113"]["restarts"] == "4"
    assert rows["111"]["seen"] == "2 d ago" and rows["113"]["seen"] == "20 min ago"
    assert page.text("summary") == "5 Pis: 2 alive, 1 stale, 1 stopped, 1 gone"

    # Live: a program pushed to one Pi shows up without a reload.
    admin.put(program(tmp_path, OTHER, "valve-doc", "valve"))
    page.wait_rows(lambda r: compact(r[str(OTHER)]["programs"]) == "RUNNING 2", "the second program of OTHER")

    # Sorting by a column (again: the other way round), filtering by any text of a row.
    assert page.order() == ["111", "112", "113", str(PI), str(OTHER)]
    page.sort_by("macid")
    assert page.order() == [str(OTHER), str(PI), "113", "112", "111"]
    page.sort_by("state")
    assert page.order()[2:] == ["113", "112", "111"]
    page.filter("valve")
    assert page.order() == [str(OTHER)] and "1 shown" in page.text("summary")
    page.filter("10.0.0.1")
    assert sorted(page.order()) == ["111", "112", "113"]
    page.filter("")
    page.sort_by("macid")
    screenshot(browser, couch, "fleet", "fleet-page.png")

    # The session ends under the page (cookie gone): it asks to log in again, and goes on.
    browser.delete_all_cookies()
    admin.put(program(tmp_path, PI, "thermo-doc", "thermo", body="    pass"))   # wakes the feed
    page.wait_visible("login")
    assert "session has ended" in page.text("login-error")
    page.log_in(*fleet.deployer)
    page.wait_rows(lambda r: str(PI) in r, "the fleet again")

    # The copy in the code database works as well, given a session; it logs out in place.
    page.url = fleet.page_url
    page.open()
    page.wait_rows(lambda r: str(PI) in r, "the fleet from the code database's page")
    assert page.text("dbname") == fleet.admin.db

    page.log_out()
    assert page.session_user() is None
    page.url = fleet.login_url
    page.open()
    page.wait_visible("login")


def test_a_pi_its_programs_output_error_and_commands(fleet, browser, couch, make_daemon, tmp_path):
    admin = fleet.admin
    admin.put(program(tmp_path, PI, "thermo-doc", "thermo"))
    admin.put({"_id": "broken-doc", "type": PI, "name": "broken",
               "code": "def main():\n    raise RuntimeError('sensor unplugged')\n"})
    fleet_daemon(couch, admin, make_daemon, PI).start()

    page = FleetPage(browser, fleet.login_url)
    page.open()
    page.log_in(*fleet.deployer)
    page.wait_rows(lambda r: str(PI) in r, "the Pi")
    page.open_pi(PI)
    assert browser.current_url.endswith(f"#pi={PI}")
    programs = page.until(lambda d: (lambda p: p if p.get("thermo", [""])[0] == "RUNNING"
                                     and "sensor unplugged" in p.get("broken", ["", "", "", "", ""])[4] else False)
                          (page.programs()), "thermo RUNNING and broken's error")
    assert programs["broken"][0] in ("BACKOFF", "STARTING") and int(programs["broken"][2]) >= 1
    assert "IP" in page.text("pi-facts") and "127.0.0.1" in page.text("pi-facts")
    assert "Command privileges\nnone" in page.text("pi-facts") or "Command privileges none" in page.text("pi-facts")

    # The output tail (written here as the device side will write it), live and as text only.
    output = {"_id": f"{PI}_output", "type": "output", "macid": PI, "timestamp": iso(), "output_tail_lines": 100,
              "programs": {
                  "thermo-doc": {"name": "thermo", "lines_seen": 3, "dropped_lines": 0, "cut_lines": 0, "last_error": None,
                                 "lines": [[iso(3), "stdout", "21.5 °C"],
                                           [iso(2), "stderr", "<img src=x onerror=alert(1)><script>alert(2)</script>"]]},
                  "broken-doc": {"name": "broken", "lines_seen": 0, "dropped_lines": 0, "cut_lines": 0, "lines": [],
                                 "last_error": {"time": iso(1), "text": "main() raised RuntimeError: sensor unplugged",
                                                "traceback": "Traceback (most recent call last):\n  File \"main\", "
                                                             "line 2, in main\nRuntimeError: sensor unplugged\n"}}}}
    stored = fleet.heartbeat_db().put(output)
    page.until(lambda d: "21.5 °C" in page.output("thermo-doc"), "the output lines")
    assert "<script>alert(2)</script>" in page.output("thermo-doc")
    assert not browser.find_elements(By.CSS_SELECTOR, "#pi-output img, #pi-output script")
    assert "1 seen" not in page.output("thermo-doc") and "3 seen" in page.output("thermo-doc")
    trace = page.until(lambda d: page.output("broken-doc") if "Traceback" in page.output("broken-doc") else False,
                       "the traceback")
    assert "RuntimeError: sensor unplugged" in trace and "line 2, in main" in trace
    lines = stored["programs"]["thermo-doc"]["lines"]
    lines[:] = [line for line in lines if "alert" not in line[2]] + [[iso(), "stdout", "22.0 °C"]]
    fleet.heartbeat_db().put({**stored, "timestamp": iso()})
    page.until(lambda d: "22.0 °C" in page.output("thermo-doc"), "a new line, live")
    assert "alert" not in page.output("thermo-doc")

    # A command, in the shell's words: its document is what `himbeerecouch cmd` writes.
    assert page.visible("cmd-form")
    page.run_command("sh -c 'echo hello from the page; echo oops >&2; exit 3'")
    done = page.until(lambda d: (lambda c: c if c and c[0]["state"] == "done" else False)(page.commands()),
                      "the command's result")
    assert done[0]["outcome"] == "exit 3"
    assert done[0]["stdout"] == "hello from the page\n" and done[0]["stderr"] == "oops\n"
    docs = requests.post(admin.url("_find"), json={"selector": {"type": f"{PI}_cmd"}}, auth=ADMIN, timeout=10).json()["docs"]
    assert len(docs) == 1
    doc = docs[0]
    assert re.fullmatch(rf"cmd:{PI}:[0-9a-f]{{12}}", doc["_id"]) and doc["_id"] == done[0]["id"]
    assert doc["type"] == f"{PI}_cmd"
    assert doc["cmd"] == ["sh", "-c", "echo hello from the page; echo oops >&2; exit 3"]
    assert set(doc) - {"claimed", "ret", "returncode", "started", "finished", "error", "truncated"} == {"_id", "_rev", "type", "cmd"}

    # A JSON array as argv, with a timeout; the newest command is listed first.
    page.run_command('["printf", "%s|", "a  b", "c"]', timeout="20")
    newest = page.until(lambda d: (lambda c: c if len(c) == 2 and c[0]["state"] == "done" else False)(page.commands()),
                        "the second command's result")
    assert newest[0]["stdout"] == "a  b|c|" and newest[0]["outcome"] == "exit 0"
    assert newest[1]["stdout"] == "hello from the page\n"
    assert admin.get(newest[0]["id"])["timeout"] == 20
    # The page's own report of what it will send.
    box = page.driver.find_element(By.ID, "cmd-argv")
    box.clear()
    box.send_keys("dmesg | grep x")
    assert '"|"' in page.text("cmd-preview") and "no shell runs this" in page.text("cmd-preview")
    screenshot(browser, couch, "pi", "fleet-page-pi.png")

    # Opening the link of a Pi directly (#pi=) shows the same, commands included.
    page.open(f"pi={PI}")
    page.wait_visible("pi")
    page.until(lambda d: len(page.commands()) == 2, "both commands after a reload")


def test_a_viewer_sees_the_fleet_and_no_command_form(fleet, browser, couch, make_daemon, tmp_path):
    admin = fleet.admin
    admin.put(program(tmp_path, PI, "thermo-doc", "thermo"))
    fleet_daemon(couch, admin, make_daemon, PI).start()
    page = FleetPage(browser, fleet.login_url)
    page.open()
    page.log_in(*fleet.viewer)
    page.wait_rows(lambda r: compact(r.get(str(PI), {}).get("programs", "")) == "RUNNING 1", "the Pi")
    page.open_pi(PI)
    page.until(lambda d: "thermo" in page.programs(), "the Pi's programs")
    assert not page.visible("cmd-form")
    # Nor could the viewer write a command document by hand: the server refuses it.
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'PUT', credentials: 'same-origin', "
        "headers: {'Content-Type': 'application/json'}, body: JSON.stringify({type: '1_cmd', cmd: ['true']})})"
        ".then(r => done(r.status), e => done(String(e)));",
        f"/{quote(fleet.admin.db, safe='')}/cmd%3A1%3Aabc")
    assert status in (401, 403)


def test_the_status_database_named_by_setup_db(status_fleet, browser, couch, make_daemon, tmp_path):
    fleet = status_fleet
    fleet.admin.put(program(tmp_path, PI, "thermo-doc", "thermo"))
    fleet_daemon(couch, fleet.admin, make_daemon, PI, status_database=fleet.status_db).start()
    wait_for(lambda: fleet.heartbeat_db().get(f"{PI}_heartbeat"), message="the heartbeat in the status database")
    assert fleet.admin.get(f"{PI}_heartbeat") is None
    fleet.heartbeat_db().put({"_id": f"{PI}_output", "type": "output", "macid": PI, "timestamp": iso(),
                              "output_tail_lines": 100, "programs": {"thermo-doc": {
                                  "name": "thermo", "lines": [[iso(), "stdout", "from the status database"]],
                                  "lines_seen": 1, "dropped_lines": 0, "cut_lines": 0, "last_error": None}}})
    page = FleetPage(browser, fleet.login_url)
    page.open(f"pi={PI}")
    page.log_in(*fleet.deployer)
    page.wait_visible("pi")
    page.until(lambda d: "from the status database" in page.output("thermo-doc"), "the output tail")
    page.wait_text("pi-facts", fleet.status_db)


def test_the_output_tail_the_daemon_writes(fleet, browser, couch, make_daemon, tmp_path):
    fleet.admin.put({"_id": "talker-doc", "type": PI, "name": "talker", "code": (
        "import sys, time\n"
        "def main():\n"
        "    print('hello on stdout')\n"
        "    print('trouble on stderr', file=sys.stderr)\n"
        "    time.sleep(1.5)\n"
        "    raise ValueError('talked enough')\n")})
    fleet_daemon(couch, fleet.admin, make_daemon, PI).start()
    page = FleetPage(browser, fleet.login_url)
    page.open(f"pi={PI}")
    page.log_in(*fleet.deployer)
    page.wait_visible("pi")
    text = page.until(lambda d: (lambda t: t if "hello on stdout" in t and "talked enough" in t
                                 and "Traceback" in t else False)(page.output("talker-doc")),
                      "the daemon's output tail with the error's traceback", timeout=60)
    assert "trouble on stderr" in text
    screenshot(browser, couch, "pi-real-output")


def test_the_page_helpers(fleet, browser):
    """argv splitting and the heartbeat states, in the browser's own JavaScript."""
    page = FleetPage(browser, fleet.login_url)
    page.open()
    page.log_in(*fleet.viewer)
    split = lambda text: browser.execute_script(  # noqa: E731
        "try { return window.HimbeereFleet.splitArgv(arguments[0]); } catch (e) { return 'error: ' + e.message; }", text)
    assert split("uname -a") == ["uname", "-a"]
    assert split("  sh -c 'echo \"$HOME\" | wc -c'  ") == ["sh", "-c", 'echo "$HOME" | wc -c']
    assert split(r'printf "%s\n" a\ b "" \"') == ["printf", "%s\\n", "a b", "", '"']
    assert split("echo 'it'\\''s'") == ["echo", "it's"]
    assert split('["ls", "-l", "a b"]') == ["ls", "-l", "a b"]
    assert split('["ls", 1]').startswith("error: ")
    assert split("echo 'open").startswith("error: ")
    assert split("   ").startswith("error: ")
    states = browser.execute_script("""
        const now = Date.parse('2026-11-28T12:00:00Z');
        const at = (s) => new Date(now - s * 1000).toISOString();
        const f = window.HimbeereFleet;
        return [
          f.piState({timestamp: at(100)}, now).state,                              // 30 s interval: 120 s
          f.piState({timestamp: at(130)}, now).state,
          f.piState({timestamp: at(600), status_interval: 300}, now).state,         // 660 s
          f.piState({timestamp: at(700), status_interval: 300}, now).state,
          f.piState({timestamp: at(10), daemon: 'stopped'}, now).state,
          f.piState({timestamp: at(90000), daemon: 'stopped'}, now).state,
          f.piState({timestamp: 'yesterday'}, now).state,
          f.staleAfter({status_interval: 2}),
        ];""")
    assert states == ["alive", "stale", "alive", "stale", "stopped", "gone", "gone", 120]


@pytest.mark.only_on("couchdb", reason="CouchDB 3 sends 'Content-Security-Policy: sandbox' with attachments")
@pytest.mark.expect_blocked_scripts
def test_under_couchdbs_default_policy_the_page_says_what_to_do(fleet, browser, couch, attachment_csp):
    attachment_csp(None)                            # CouchDB's default: sandbox
    assert requests.get(fleet.page_url, auth=ADMIN, timeout=10).headers["Content-Security-Policy"] == "sandbox"
    page = FleetPage(browser, fleet.login_url)
    page.open()
    notice = page.wait_visible("noscript")
    assert "setup-db --page-csp" in notice.text
    assert not page.visible("login") and not page.visible("fleet")
    setup_db(couch, fleet.admin.db)                 # --page-csp: the page's policy again
    # CouchDB's 304 for a cached copy carries no policy, so the browser keeps the old one: a
    # reload that bypasses the cache (as the notice says) gets the new one.
    browser.execute_cdp_cmd("Network.clearBrowserCache", {})
    page.open()
    page.wait_visible("login")
    assert not page.visible("noscript")
