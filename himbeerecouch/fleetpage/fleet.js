/* himbeerecouch fleet page.
 *
 * Served by CouchDB as an attachment of _design/himbeerecouch in the code database; talks to
 * the same server with relative URLs and CouchDB's cookie session. Shows every Pi from its
 * status document (<MacID>_heartbeat), a Pi's programs, their output (<MacID>_output) and
 * commands, and lets deployers run commands. Live through _changes longpoll feeds.
 *
 * Text from documents is untrusted: it only ever reaches the page as textContent.
 */
"use strict";

(function () {
  const LONGPOLL_MS = 25000;           // below the usual proxy timeouts of 60 s
  const GONE_AFTER_S = 24 * 3600;
  const COMMANDS_SHOWN = 20;
  const OUTPUT_SHOWN_CHARS = 65536;    // per stream of a command; the rest is in the document
  const WRITERS = ["_admin", "deployer"];  // may write command documents (security.py)

  // ---- where the page is ----------------------------------------------------------------

  /** The server root (a path prefix, "" when none) and the database, from the page's own path
   *  `<root>/<db, URL-encoded>/_design/himbeerecouch/index.html`. */
  function locate(pathname) {
    const parts = pathname.split("/");
    const at = parts.lastIndexOf("_design");
    if (at < 2 || parts[at + 1] !== "himbeerecouch") {
      throw new Error("the page is not at <database>/_design/himbeerecouch/index.html: " + pathname);
    }
    return {root: parts.slice(0, at - 1).join("/"), db: decodeURIComponent(parts[at - 1])};
  }

  // ---- pure helpers (exposed for the tests as window.HimbeereFleet) -----------------------

  /** An argv from the command box: a JSON array of strings, or words split as a POSIX shell
   *  splits them (whitespace; '...' literal; "..." with \" \\ \$ \` escapes; \x outside
   *  quotes). No expansion of any kind: no shell runs the command. */
  function splitArgv(text) {
    const trimmed = text.trim();
    if (trimmed.startsWith("[")) {
      let value;
      try {
        value = JSON.parse(trimmed);
      } catch (error) {
        throw new Error("not a JSON array: " + error.message);
      }
      if (!Array.isArray(value) || !value.every((word) => typeof word === "string")) {
        throw new Error("a JSON array must hold strings only");
      }
      if (!value.length) throw new Error("the array is empty");
      return value;
    }
    const words = [];
    let word = null;                   // null: between words ('' is an empty word)
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "'") {
        const end = text.indexOf("'", i + 1);
        if (end < 0) throw new Error("a ' is not closed");
        word = (word ?? "") + text.slice(i + 1, end);
        i = end + 1;
      } else if (c === '"') {
        word = word ?? "";
        i += 1;
        for (;;) {
          if (i >= text.length) throw new Error('a " is not closed');
          const d = text[i];
          if (d === '"') { i += 1; break; }
          if (d === "\\" && i + 1 < text.length && '"\\$`\n'.includes(text[i + 1])) {
            if (text[i + 1] !== "\n") word += text[i + 1];
            i += 2;
          } else {
            word += d;
            i += 1;
          }
        }
      } else if (c === "\\") {
        if (i + 1 >= text.length) throw new Error("a \\ at the end escapes nothing");
        if (text[i + 1] !== "\n") word = (word ?? "") + text[i + 1];
        i += 2;
      } else if (/\s/.test(c)) {
        if (word !== null) { words.push(word); word = null; }
        i += 1;
      } else {
        word = (word ?? "") + c;
        i += 1;
      }
    }
    if (word !== null) words.push(word);
    if (!words.length) throw new Error("no command");
    return words;
  }

  const SHELL_WORDS = new Set(["|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"]);

  /** Words a user may have meant for a shell (none runs): shown as a hint, not refused. */
  function shellLookalikes(argv) {
    return argv.filter((word) => SHELL_WORDS.has(word));
  }

  /** Seconds after which a status document is stale: as `himbeerecouch status` decides
   *  (two keep-alive intervals and a minute, at least 120 s; 30 s when the Pi does not say). */
  function staleAfter(doc) {
    let interval = doc.status_interval;
    if (typeof interval !== "number" || !(interval > 0)) interval = 30;
    return Math.max(120, 2 * interval + 60);
  }

  function parseTime(iso) {
    const ms = typeof iso === "string" ? Date.parse(iso) : NaN;
    return Number.isNaN(ms) ? null : ms;
  }

  /** alive | stale | stopped | gone, and the heartbeat's age in seconds (null: no time).
   *  A Pi whose daemon said it stopped shows as stopped, not stale: that is why it is silent. */
  function piState(doc, nowMs) {
    const seen = parseTime(doc.timestamp);
    const age = seen === null ? null : Math.max(0, (nowMs - seen) / 1000);
    if (age === null || age > GONE_AFTER_S) return {state: "gone", age};
    if (doc.daemon === "stopped") return {state: "stopped", age};
    if (age > staleAfter(doc)) return {state: "stale", age};
    return {state: "alive", age};
  }

  const STATE_RANK = {alive: 0, stale: 1, stopped: 2, gone: 3};

  function human(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["min", 60]]) {
      if (seconds >= size) return Math.round(seconds / size) + " " + unit + " ago";
    }
    return Math.round(seconds) + " s ago";
  }

  function macidOf(doc) {
    if (doc.macid !== undefined && doc.macid !== null) return String(doc.macid);
    return String(doc._id).replace(/_(heartbeat|output)$/, "");
  }

  function programsOf(doc) {
    const programs = doc && typeof doc.programs === "object" && doc.programs ? doc.programs : {};
    return Object.entries(programs).filter(([, p]) => p && typeof p === "object");
  }

  /** Programs by state ({RUNNING: 3, BACKOFF: 1}) and their restarts in all. */
  function programCounts(doc) {
    const byState = {};
    let restarts = 0;
    for (const [, program] of programsOf(doc)) {
      const state = String(program.state || "?");
      byState[state] = (byState[state] || 0) + 1;
      if (typeof program.restarts === "number") restarts += program.restarts;
    }
    return {byState, total: programsOf(doc).length, restarts};
  }

  function text(value) {
    if (value === null || value === undefined) return "";
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  function shellQuote(argv) {
    return argv.map((word) => (/^[\w@%+=:,./-]+$/.test(word) ? word : "'" + word.replace(/'/g, "'\\''") + "'"))
      .join(" ");
  }

  window.HimbeereFleet = Object.freeze({locate, splitArgv, shellLookalikes, staleAfter, piState, human,
                                        programCounts});

  // ---- DOM helpers: elements with text, never markup ---------------------------------------

  const $ = (id) => document.getElementById(id);

  /** el("td", {className: "num"}, "text", child, ...): children are strings (as text) or nodes. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "title" || key === "href" || key === "className" || key === "hidden" ||
               key === "open" || key === "type" || key === "tabIndex") node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function badge(word) {
    // The class picks a colour from a fixed list in fleet.css; other words get none.
    return el("span", {className: "badge " + String(word).replace(/[^A-Za-z]/g, "")}, word);
  }

  function when(iso) {
    const ms = parseTime(iso);
    if (ms === null) return el("span", {}, text(iso) || "-");
    const date = new Date(ms);
    const pad = (n) => String(n).padStart(2, "0");
    const local = date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) + " " +
                  pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
    return el("time", {dateTime: iso, title: iso + " (" + human((now() - ms) / 1000) + ")"}, local);
  }

  function show(section) {
    for (const id of ["login", "fleet", "pi"]) $(id).hidden = id !== section;
  }

  function problem(message) {
    $("problem").textContent = message || "";
    $("problem").hidden = !message;
  }

  // ---- HTTP --------------------------------------------------------------------------------

  let where = null;                    // {root, db}
  let clockOffset = 0;                 // the server's clock minus ours, from its Date headers

  function now() {
    return Date.now() + clockOffset;
  }

  class SessionLost extends Error {}

  function dbPath(name) {
    return where.root + "/" + encodeURIComponent(name);
  }

  function docPath(dbName, id) {
    return dbPath(dbName) + "/" + encodeURIComponent(id);
  }

  /** One request to the server; resolves to {status, ok, body} (body: parsed JSON or null). */
  async function request(method, path, {query, body, signal} = {}) {
    const url = path + (query ? "?" + new URLSearchParams(query).toString() : "");
    const init = {method, credentials: "same-origin", cache: "no-store", signal,
                  headers: {"Accept": "application/json"}};
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url, init);
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date)) clockOffset = date - Date.now();
    const raw = await response.text();
    let parsed = null;
    try {
      parsed = raw ? JSON.parse(raw) : null;
    } catch (error) {
      parsed = null;
    }
    return {status: response.status, ok: response.ok, body: parsed};
  }

  function reason(response) {
    const body = response.body || {};
    return "HTTP " + response.status + (body.reason ? ": " + text(body.reason) : body.error ? ": " + text(body.error) : "");
  }

  /** A request that must succeed: a 401 means the session ended, anything else is an Error. */
  async function expect(method, path, options) {
    const response = await request(method, path, options);
    if (response.status === 401) throw new SessionLost(reason(response));
    if (!response.ok) throw new Error(method + " " + decodeURIComponent(path) + ": " + reason(response));
    return response.body;
  }

  // ---- changes feeds -----------------------------------------------------------------------

  /** One longpoll loop on one database's _changes: one request outstanding at a time, from the
   *  last seq seen; errors back off (1 s doubling to 30 s, jittered). `describe()` gives the
   *  filter ({query, body}) each time, so a changed filter applies with refresh(). */
  class Feed {
    constructor(dbName, describe, onResults) {
      this.db = dbName;
      this.describe = describe;
      this.onResults = onResults;
      this.since = "now";
      this.running = false;
      this.controller = null;
      this.wakeUp = null;
      this.refreshing = false;
      this.failures = 0;
      this.status = "connecting";
    }

    start(since) {
      this.since = since;
      this.running = true;
      this.loop();
      return this;
    }

    stop() {
      this.running = false;
      this.interrupt();
    }

    /** The filter changed: end the outstanding request and go on from the same seq. */
    refresh() {
      this.refreshing = true;
      this.interrupt();
    }

    interrupt() {
      if (this.controller) this.controller.abort();
      if (this.wakeUp) this.wakeUp();
    }

    sleep(ms) {
      return new Promise((resolve) => {
        const timer = setTimeout(resolve, ms);
        this.wakeUp = () => { clearTimeout(timer); resolve(); };
      }).finally(() => { this.wakeUp = null; });
    }

    async loop() {
      while (this.running) {
        this.refreshing = false;
        const {query, body} = this.describe();
        const controller = new AbortController();
        this.controller = controller;
        // A connection that went silent (half-open) counts as failed after this long.
        const watchdog = setTimeout(() => controller.abort(), LONGPOLL_MS + 20000);
        const started = Date.now();
        try {
          const response = await request("POST", dbPath(this.db) + "/_changes", {
            signal: controller.signal, body,
            query: {feed: "longpoll", since: this.since, timeout: LONGPOLL_MS, include_docs: "true",
                    limit: 500, ...query}});
          if (response.status === 401) throw new SessionLost(reason(response));
          if (!response.ok || !response.body || !Array.isArray(response.body.results)) {
            throw new Error(reason(response));
          }
          this.since = response.body.last_seq;
          this.failures = 0;
          this.setStatus("live");
          const results = response.body.results;
          if (results.length) this.onResults(results);
          // A server that answers at once with nothing (no longpoll) is not asked again at once.
          if (!results.length && Date.now() - started < 1000 && this.running && !this.refreshing) {
            await this.sleep(2000);
          }
        } catch (error) {
          if (!this.running) break;
          if (this.refreshing) continue;
          if (error instanceof SessionLost) {
            this.running = false;
            sessionLost();
            break;
          }
          this.failures += 1;
          const delay = Math.min(30000, 1000 * 2 ** (this.failures - 1)) * (0.75 + Math.random() / 2);
          this.setStatus("reconnecting in " + Math.round(delay / 1000) + " s (" + (error.message || error) + ")");
          await this.sleep(delay);
        } finally {
          clearTimeout(watchdog);
          if (this.controller === controller) this.controller = null;
        }
      }
    }

    setStatus(status) {
      this.status = status;
      showFeedState();
    }
  }

  // ---- the application's state ---------------------------------------------------------------

  const app = {
    user: null,                        // {name, roles}
    statusDb: null,                    // from the design document; null: the code database
    version: "",
    pis: new Map(),                    // macid -> {doc, db}: the newest heartbeat of each Pi
    outputs: new Map(),                // macid -> {db -> output document}
    feeds: [],                         // one per database with heartbeats
    sort: {key: "macid", dir: 1},
    view: {kind: "fleet"},
    commands: new Map(),               // command document id -> document (the Pi view's Pi)
    commandWatch: null,                // Feed of the Pi's unfinished commands (_doc_ids)
    commandsFor: null,
    renderQueued: false,
  };

  function heartbeatDbs() {
    const first = app.statusDb || where.db;
    return first === where.db ? [first] : [first, where.db];
  }

  function mayRunCommands() {
    return !!app.user && (app.user.roles || []).some((role) => WRITERS.includes(role));
  }

  function showFeedState() {
    const states = app.feeds.map((feed) => feed.status);
    const bad = states.find((state) => state !== "live");
    $("feed-state").textContent = !states.length ? "" : bad ? "updates: " + bad : "live updates";
  }

  function scheduleRender() {
    if (app.renderQueued) return;
    app.renderQueued = true;
    requestAnimationFrame(() => {
      app.renderQueued = false;
      render();
    });
  }

  /** Redraw what data changed; output and commands only when theirs did (a redraw would lose
   *  the reader's selection and scroll position). */
  function render() {
    if (!app.user) return;
    if (app.view.kind !== "pi") { renderFleet(); return; }
    renderPi(app.view.macid);
    renderOutput(app.view.macid, app.pis.get(app.view.macid));
  }

  // ---- session -------------------------------------------------------------------------------

  async function checkSession() {
    const session = await expect("GET", where.root + "/_session");
    const ctx = (session && session.userCtx) || {};
    return ctx.name ? {name: String(ctx.name), roles: (ctx.roles || []).map(String)} : null;
  }

  function showLogin(message) {
    stopAll();
    app.user = null;
    $("who").textContent = "";
    $("logout").hidden = true;
    $("login-error").textContent = message || "";
    show("login");
    $("login-name").focus();
  }

  function sessionLost() {
    if (!app.user) return;
    showLogin("Your session has ended (or your rights changed): log in again.");
  }

  async function logIn(event) {
    event.preventDefault();
    const name = $("login-name").value;
    const password = $("login-password").value;
    $("login-submit").disabled = true;
    $("login-error").textContent = "";
    try {
      const response = await request("POST", where.root + "/_session", {body: {name, password}});
      if (!response.ok) {
        $("login-error").textContent = response.status === 401 ? "Name or password is incorrect." : reason(response);
        return;
      }
      $("login-password").value = "";
      const user = await checkSession();
      if (!user) {
        // The server took the password but does not keep the cookie (blocked cookies?).
        $("login-error").textContent = "Logged in, but the browser does not send the session cookie back.";
        return;
      }
      await begin(user);
    } catch (error) {
      $("login-error").textContent = error.message || String(error);
    } finally {
      $("login-submit").disabled = false;
    }
  }

  async function logOut() {
    stopAll();
    try {
      await request("DELETE", where.root + "/_session");
    } finally {
      app.pis.clear();
      app.outputs.clear();
      outputShown = null;
      showLogin("Logged out.");
    }
  }

  function stopAll() {
    for (const feed of app.feeds) feed.stop();
    app.feeds = [];
    stopCommandWatch();
    showFeedState();
  }

  // ---- start: settings, heartbeats, feeds ----------------------------------------------------

  async function begin(user) {
    app.user = user;
    // Whatever was on view before (a session that ended) is read afresh: route() below.
    app.view = {kind: "none"};
    app.commandsFor = null;
    outputShown = null;
    problem("");
    $("who").textContent = user.name + (user.roles.length ? " (" + user.roles.join(", ") + ")" : "");
    $("logout").hidden = false;
    $("cmd-form").hidden = !mayRunCommands();
    try {
      const design = await expect("GET", dbPath(where.db) + "/_design/himbeerecouch");
      const settings = (design && design.himbeerecouch) || {};
      app.statusDb = typeof settings.status_database === "string" && settings.status_database ? settings.status_database : null;
      app.version = text(settings.version);
      $("version").textContent = app.version ? "himbeerecouch " + app.version : "";
      app.pis.clear();
      app.outputs.clear();
      for (const dbName of heartbeatDbs()) {
        // The seq first, then the documents: a write in between comes again through the feed.
        const info = await expect("GET", dbPath(dbName));
        const found = await expect("POST", dbPath(dbName) + "/_find",
                                   {body: {selector: {type: "heartbeat"}, limit: 100000}});
        for (const doc of found.docs || []) takeHeartbeat(doc, dbName);
        app.feeds.push(new Feed(dbName, () => feedFilter(), (results) => takeChanges(results, dbName))
          .start(info.update_seq));
      }
    } catch (error) {
      if (error instanceof SessionLost) { sessionLost(); return; }
      problem("Cannot read the fleet as " + user.name + ": " + (error.message || error) +
              (/HTTP 403/.test(error.message) ? " (is the user a member of the database? himbeerecouch add-user NAME --role ROLE)" : ""));
    }
    route();
  }

  /** The feeds' filter: every heartbeat, and the output document of the Pi on view. */
  function feedFilter() {
    let selector = {type: "heartbeat"};
    if (app.view.kind === "pi") {
      selector = {"$or": [selector, {_id: app.view.macid + "_output"}]};
    }
    return {query: {filter: "_selector"}, body: {selector}};
  }

  function takeHeartbeat(doc, dbName) {
    if (!doc || doc.type !== "heartbeat") return;
    const macid = macidOf(doc);
    const kept = app.pis.get(macid);
    // A fleet moving to a status database has Pis in both: the newest document wins.
    if (kept && kept.db !== dbName && text(kept.doc.timestamp) > text(doc.timestamp)) return;
    app.pis.set(macid, {doc, db: dbName});
  }

  function takeOutput(doc, dbName) {
    const macid = macidOf(doc);
    if (!app.outputs.has(macid)) app.outputs.set(macid, new Map());
    app.outputs.get(macid).set(dbName, doc);
  }

  function takeChanges(results, dbName) {
    for (const change of results) {
      const doc = change.doc;
      if (!doc || change.deleted) continue;
      if (doc.type === "heartbeat") takeHeartbeat(doc, dbName);
      else if (doc.type === "output" || /_output$/.test(String(doc._id))) takeOutput(doc, dbName);
    }
    scheduleRender();
  }

  // ---- routing: #pi=<macid> ------------------------------------------------------------------

  function route() {
    if (!app.user) return;
    const match = /^#pi=([^&]+)/.exec(location.hash);
    const previous = app.view;
    app.view = match ? {kind: "pi", macid: decodeURIComponent(match[1])} : {kind: "fleet"};
    const changed = previous.kind !== app.view.kind || previous.macid !== app.view.macid;
    if (app.view.kind === "pi") {
      show("pi");
      if (changed || app.commandsFor !== app.view.macid) openPi(app.view.macid);
    } else {
      show("fleet");
      stopCommandWatch();
      app.commandsFor = null;
    }
    if (changed) for (const feed of app.feeds) feed.refresh();
    render();
  }

  // ---- the fleet view ------------------------------------------------------------------------

  const COLUMNS = [
    {key: "macid", label: "MacID"},
    {key: "state", label: "State"},
    {key: "seen", label: "Last heartbeat"},
    {key: "ip", label: "IP"},
    {key: "hostname", label: "Hostname", wide: true},
    {key: "version", label: "Version", wide: true},
    {key: "programs", label: "Programs"},
    {key: "restarts", label: "Restarts"},
  ];

  function row(macid, entry, nowMs) {
    const doc = entry.doc;
    const {state, age} = piState(doc, nowMs);
    const counts = programCounts(doc);
    return {macid, doc, db: entry.db, state, age, counts,
            ip: text(doc.ip), hostname: text(doc.hostname), version: text(doc.version)};
  }

  function compareIp(a, b) {
    const parts = (ip) => ip.split(".").map((n) => n.padStart(3, "0")).join(".");
    return parts(a).localeCompare(parts(b));
  }

  function sortKey(key) {
    switch (key) {
      case "macid": return (a, b) => (a.macid.length - b.macid.length) || a.macid.localeCompare(b.macid);
      case "state": return (a, b) => (STATE_RANK[a.state] - STATE_RANK[b.state]) || ((a.age ?? Infinity) - (b.age ?? Infinity));
      case "seen": return (a, b) => (a.age ?? Infinity) - (b.age ?? Infinity);
      case "ip": return (a, b) => compareIp(a.ip, b.ip);
      case "programs": return (a, b) => a.counts.total - b.counts.total;
      case "restarts": return (a, b) => a.counts.restarts - b.counts.restarts;
      default: return (a, b) => a[key].localeCompare(b[key], undefined, {numeric: true});
    }
  }

  function matches(item, needle) {
    if (!needle) return true;
    const haystack = [item.macid, item.state, item.ip, item.hostname, item.version,
                      ...programsOf(item.doc).flatMap(([id, p]) => [id, text(p.name), text(p.state)])];
    return haystack.some((value) => value.toLowerCase().includes(needle));
  }

  function buildFleetHead() {
    const head = $("fleet-head");
    for (const column of COLUMNS) {
      const button = el("button", {type: "button"}, column.label);
      button.addEventListener("click", () => {
        app.sort = {key: column.key, dir: app.sort.key === column.key ? -app.sort.dir : 1};
        renderFleet();
      });
      head.append(el("th", {className: column.wide ? "wide" : "", dataset: {key: column.key}}, button));
    }
  }

  function renderFleet() {
    const nowMs = now();
    const needle = $("filter").value.trim().toLowerCase();
    const items = [...app.pis.entries()].map(([macid, entry]) => row(macid, entry, nowMs));
    const compare = sortKey(app.sort.key);
    const shown = items.filter((item) => matches(item, needle))
      .sort((a, b) => app.sort.dir * compare(a, b) || a.macid.localeCompare(b.macid));
    for (const th of $("fleet-head").children) {
      th.setAttribute("aria-sort", th.dataset.key === app.sort.key ? (app.sort.dir > 0 ? "ascending" : "descending") : "none");
    }
    const body = $("fleet-body");
    body.replaceChildren(...shown.map(fleetRow));
    const byState = {};
    for (const item of items) byState[item.state] = (byState[item.state] || 0) + 1;
    $("summary").textContent = items.length + " Pi" + (items.length === 1 ? "" : "s") +
      (Object.keys(byState).length ? ": " + Object.entries(byState).sort(([a], [b]) => STATE_RANK[a] - STATE_RANK[b])
        .map(([s, n]) => n + " " + s).join(", ") : "") +
      (shown.length !== items.length ? " (" + shown.length + " shown)" : "");
    $("fleet-empty").hidden = items.length > 0;
  }

  function fleetRow(item) {
    const link = el("a", {href: "#pi=" + encodeURIComponent(item.macid)}, item.macid);
    const counts = el("td", {className: "counts"});
    for (const [state, n] of Object.entries(item.counts.byState).sort()) counts.append(badge(state), " " + n + " ");
    if (!item.counts.total) counts.append("-");
    const tr = el("tr", {dataset: {macid: item.macid, state: item.state}},
      el("td", {className: "mono"}, link),
      el("td", {}, badge(item.state)),
      el("td", {className: "nowrap", title: text(item.doc.timestamp)}, human(item.age)),
      el("td", {className: "mono"}, item.ip || "-"),
      el("td", {className: "wide"}, item.hostname || "-"),
      el("td", {className: "wide"}, item.version || "-"),
      counts,
      el("td", {className: "num"}, String(item.counts.restarts)));
    tr.addEventListener("click", (event) => {
      if (event.target.closest("a")) return;
      location.hash = "pi=" + encodeURIComponent(item.macid);
    });
    return tr;
  }

  // ---- the Pi view ---------------------------------------------------------------------------

  async function openPi(macid) {
    app.commandsFor = macid;
    app.commands.clear();
    stopCommandWatch();
    $("pi-commands").replaceChildren();
    $("pi-commands-note").textContent = "loading commands ...";
    $("cmd-error").textContent = "";
    try {
      for (const dbName of heartbeatDbs()) {
        const response = await request("GET", docPath(dbName, macid + "_output"));
        if (response.status === 401) throw new SessionLost(reason(response));
        if (response.ok && response.body) takeOutput(response.body, dbName);
      }
      await loadCommands(macid);
    } catch (error) {
      if (error instanceof SessionLost) { sessionLost(); return; }
      $("pi-commands-note").textContent = "Cannot read: " + (error.message || error);
    }
    scheduleRender();
  }

  function fact(list, term, ...value) {
    list.append(el("dt", {}, term), el("dd", {}, ...value));
  }

  function renderPi(macid) {
    const entry = app.pis.get(macid);
    $("pi-title").textContent = "Pi " + macid + (entry && entry.doc.hostname ? " (" + text(entry.doc.hostname) + ")" : "");
    const facts = $("pi-facts");
    facts.replaceChildren();
    const body = $("pi-programs-body");
    if (!entry) {
      fact(facts, "Status", "no status document from this Pi");
      body.replaceChildren();
    } else {
      const doc = entry.doc;
      const {state, age} = piState(doc, now());
      fact(facts, "State", badge(state), " heartbeat " + human(age) + " (stale after " + staleAfter(doc) + " s)");
      fact(facts, "IP", text(doc.ip) || "-");
      fact(facts, "Hostname", text(doc.hostname) || "-");
      fact(facts, "Version", text(doc.version) || "-");
      fact(facts, "Daemon", text(doc.daemon) || "-", doc.started ? ", started " : "", doc.started ? when(doc.started) : "");
      const server = doc.server_connected === undefined ? "-" : doc.server_connected ? "connected" : "not connected";
      fact(facts, "Server", server, doc.server_error ? ": " + text(doc.server_error) : "");
      if (doc.spawn) fact(facts, "Spawn", text(doc.spawn.mode), doc.spawn.error ? " (" + text(doc.spawn.error) + ")" : "");
      // What commands may do there beyond the daemon's user (command_privileges): none, power, root.
      if (doc.command_privileges) fact(facts, "Command privileges", text(doc.command_privileges));
      fact(facts, "Status document", when(doc.timestamp), " in " + entry.db);
      body.replaceChildren(...programsOf(doc).sort(byName).map(([id, program]) => el("tr", {dataset: {program: id}},
        el("td", {title: id}, text(program.name) || id),
        el("td", {}, badge(text(program.state) || "?")),
        el("td", {className: "nowrap"}, program.since ? when(program.since) : "-"),
        el("td", {className: "num"}, text(program.restarts) || "0"),
        el("td", {}, text(program.last_exit) || "-"),
        el("td", {className: "error"}, text(program.last_error)))));
      if (!body.children.length) body.append(el("tr", {}, el("td", {colSpan: 6, className: "muted"}, "no programs")));
    }
  }

  function byName([idA, a], [idB, b]) {
    return (text(a.name) || idA).localeCompare(text(b.name) || idB);
  }

  /** The newest output document of the Pi (the heartbeat's database first). */
  function outputOf(macid, entry) {
    const docs = app.outputs.get(macid);
    if (!docs) return null;
    let best = entry ? docs.get(entry.db) || null : null;
    for (const doc of docs.values()) {
      if (!best || text(doc.timestamp) > text(best.timestamp)) best = doc;
    }
    return best;
  }

  const outputOpen = new Map();        // program id -> open? (kept across updates)
  let outputShown = null;              // what the output part shows now: "<macid> <_rev>"

  function renderOutput(macid, entry) {
    const box = $("pi-output");
    const doc = outputOf(macid, entry);
    const shown = macid + " " + (doc ? doc._rev : "-");
    if (shown === outputShown) return;
    outputShown = shown;
    // Keep each program's scroll position, or its end when it was at the end.
    const scrolls = new Map();
    for (const lines of box.querySelectorAll(".lines")) {
      scrolls.set(lines.dataset.program, lines.scrollHeight - lines.scrollTop - lines.clientHeight < 4 ? "end" : lines.scrollTop);
    }
    if (!doc) {
      $("pi-output-note").textContent = "No output document (" + macid + "_output) from this Pi.";
      box.replaceChildren();
      return;
    }
    $("pi-output-note").replaceChildren("As of ", when(doc.timestamp),
      doc.output_tail_lines ? "; the last " + text(doc.output_tail_lines) + " lines of each program" : "");
    const parts = programsOf(doc).sort(byName).map(([id, program]) => outputPart(id, program));
    box.replaceChildren(...parts);
    for (const lines of box.querySelectorAll(".lines")) {
      const kept = scrolls.get(lines.dataset.program);
      lines.scrollTop = kept === undefined || kept === "end" ? lines.scrollHeight : kept;
    }
  }

  function outputPart(id, program) {
    const lines = Array.isArray(program.lines) ? program.lines : [];
    const counts = [lines.length + " line" + (lines.length === 1 ? "" : "s")];
    if (typeof program.lines_seen === "number") counts.push(program.lines_seen + " seen");
    if (program.dropped_lines) counts.push(text(program.dropped_lines) + " dropped");
    if (program.cut_lines) counts.push(text(program.cut_lines) + " cut");
    const details = el("details", {className: "program-output", open: outputOpen.get(id) ?? true, dataset: {program: id}},
      el("summary", {}, el("strong", {}, text(program.name) || id), " ", el("span", {className: "muted"}, counts.join(", "))));
    details.addEventListener("toggle", () => outputOpen.set(id, details.open));
    const box = el("div", {className: "lines mono", dataset: {program: id}});
    for (const line of lines) {
      const [time, stream, words] = Array.isArray(line) ? line : [null, "stdout", line];
      const ms = parseTime(time);
      box.append(el("div", {className: stream === "stderr" ? "stderr" : "stdout", title: text(time) + " " + text(stream)},
        el("span", {className: "t"}, ms === null ? "" : new Date(ms).toTimeString().slice(0, 8) + " "),
        text(words)));
    }
    if (!lines.length) box.append(el("span", {className: "muted"}, "no output yet"));
    details.append(box);
    const error = program.last_error;
    if (error) {
      const part = el("div", {className: "last-error"},
        el("strong", {className: "error"}, "Last error"), " ",
        typeof error === "object" && error.time ? when(error.time) : "", ": ",
        el("span", {className: "error"}, typeof error === "object" ? text(error.text) : text(error)));
      if (typeof error === "object" && error.traceback) part.append(el("pre", {className: "traceback"}, text(error.traceback)));
      details.append(part);
    }
    return details;
  }

  // ---- commands --------------------------------------------------------------------------------

  /** The Pi's last commands: ids and times of all of them (small), then the newest in full. */
  async function loadCommands(macid) {
    const found = await expect("POST", dbPath(where.db) + "/_find", {body: {
      selector: {type: macid + "_cmd"}, fields: ["_id", "started", "finished"], limit: 100000}});
    const newest = (found.docs || []).sort(newestFirst).slice(0, COMMANDS_SHOWN).map((doc) => doc._id);
    if (newest.length) {
      const full = await expect("POST", dbPath(where.db) + "/_all_docs",
                                {query: {include_docs: "true"}, body: {keys: newest}});
      if (app.commandsFor !== macid) return;          // another Pi is on view by now
      for (const item of full.rows || []) if (item.doc) app.commands.set(item.doc._id, item.doc);
    }
    if (app.commandsFor !== macid) return;
    $("pi-commands-note").textContent = newest.length ? "" : "No commands for this Pi yet.";
    renderCommands();
    watchUnfinished();
  }

  /** Unstarted (pending) first, then by start time, newest first; the id breaks ties. */
  function newestFirst(a, b) {
    const sa = text(a.started), sb = text(b.started);
    if (!sa !== !sb) return sa ? 1 : -1;
    return sb.localeCompare(sa) || String(b._id).localeCompare(String(a._id));
  }

  function unfinished(doc) {
    return doc.ret === undefined || doc.ret === null;
  }

  /** Follow the unfinished commands shown (_doc_ids filter), until each has its result. */
  function watchUnfinished() {
    const ids = [...app.commands.values()].filter(unfinished).map((doc) => doc._id);
    if (!ids.length) { stopCommandWatch(); return; }
    if (app.commandWatch) { app.commandWatch.refresh(); return; }
    const macid = app.commandsFor;
    app.commandWatch = new Feed(where.db, () => ({
      query: {filter: "_doc_ids"},
      body: {doc_ids: [...app.commands.values()].filter(unfinished).map((doc) => doc._id)},
    }), (results) => {
      if (app.commandsFor !== macid) return;
      for (const change of results) if (change.doc && !change.deleted) app.commands.set(change.doc._id, change.doc);
      renderCommands();
      if (![...app.commands.values()].some(unfinished)) stopCommandWatch();
    });
    // From the start: the feed's first answer is each document as it is now (a result written
    // before the feed began is not missed), then it waits for the next change.
    app.commandWatch.start(0);
  }

  function stopCommandWatch() {
    if (app.commandWatch) app.commandWatch.stop();
    app.commandWatch = null;
  }

  function renderCommands() {
    const docs = [...app.commands.values()].sort(newestFirst).slice(0, COMMANDS_SHOWN);
    $("pi-commands").replaceChildren(...docs.map(commandItem));
  }

  function outcome(doc) {
    if (unfinished(doc)) return doc.claimed ? "running" : "pending (no Pi has claimed it yet)";
    const code = doc.returncode;
    const parts = [];
    if (typeof code === "number") parts.push(code < 0 ? "killed by signal " + -code : "exit " + code);
    if (doc.error) parts.push(text(doc.error));
    return parts.join(": ") || "not run";
  }

  function tail(value) {
    const s = text(value);
    return s.length > OUTPUT_SHOWN_CHARS ? "[... " + (s.length - OUTPUT_SHOWN_CHARS) + " characters before]\n" + s.slice(-OUTPUT_SHOWN_CHARS) : s;
  }

  function commandItem(doc) {
    const argv = Array.isArray(doc.cmd) ? doc.cmd.map(text) : null;
    const ok = doc.returncode === 0 && !doc.error;
    const li = el("li", {dataset: {id: doc._id, state: unfinished(doc) ? "unfinished" : "done"}},
      el("div", {className: "head"},
        el("code", {className: "argv", title: JSON.stringify(doc.cmd)}, argv ? shellQuote(argv) : text(doc.cmd)),
        el("span", {className: "outcome " + (unfinished(doc) ? "muted" : ok ? "" : "error")}, outcome(doc)),
        el("span", {className: "muted"}, doc.started ? when(doc.started) : "", doc.finished && doc.started ? " (" +
          Math.max(0, ((parseTime(doc.finished) ?? 0) - (parseTime(doc.started) ?? 0)) / 1000).toFixed(1) + " s)" : "")));
    const ret = Array.isArray(doc.ret) ? doc.ret : [];
    if (ret[0]) li.append(el("pre", {className: "out stdout"}, tail(ret[0])));
    if (ret[1]) li.append(el("pre", {className: "out err stderr"}, tail(ret[1])));
    return li;
  }

  function previewArgv() {
    const value = $("cmd-argv").value;
    $("cmd-error").textContent = "";
    if (!value.trim()) { $("cmd-preview").textContent = ""; return; }
    try {
      const argv = splitArgv(value);
      const odd = shellLookalikes(argv);
      $("cmd-preview").textContent = JSON.stringify(argv) +
        (odd.length ? "  (no shell runs this: " + odd.join(" ") + " is passed as a word; use sh -c '...')" : "");
    } catch (error) {
      $("cmd-preview").textContent = "(" + error.message + ")";
    }
  }

  function randomHex(bytes) {
    return [...crypto.getRandomValues(new Uint8Array(bytes))].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  /** Write a command document as `himbeerecouch cmd` does, and follow it to its result. */
  async function runCommand(event) {
    event.preventDefault();
    const macid = app.commandsFor;
    let argv;
    try {
      argv = splitArgv($("cmd-argv").value);
    } catch (error) {
      $("cmd-error").textContent = error.message;
      return;
    }
    const doc = {_id: "cmd:" + macid + ":" + randomHex(6), type: macid + "_cmd", cmd: argv};
    const timeout = $("cmd-timeout").value.trim();
    if (timeout) {
      const seconds = Number(timeout);
      if (!(seconds > 0)) { $("cmd-error").textContent = "the timeout must be a number of seconds above 0"; return; }
      doc.timeout = seconds;
    }
    $("cmd-run").disabled = true;
    try {
      const response = await request("PUT", docPath(where.db, doc._id), {body: doc});
      if (response.status === 401) { sessionLost(); return; }
      if (!response.ok) { $("cmd-error").textContent = "not sent: " + reason(response); return; }
      app.commands.set(doc._id, {...doc, _rev: response.body.rev});
      $("pi-commands-note").textContent = "";
      renderCommands();
      watchUnfinished();
    } catch (error) {
      $("cmd-error").textContent = "not sent: " + (error.message || error);
    } finally {
      $("cmd-run").disabled = false;
    }
  }

  // ---- wiring --------------------------------------------------------------------------------

  /** In the login database (`<database>_login`, readable by anyone) the design document names
   *  the fleet's database, and the page works on that one. In the code database itself the
   *  design document answers members only: there the page works on its own database. */
  async function findFleet() {
    const response = await request("GET", dbPath(where.db) + "/_design/himbeerecouch");
    const settings = response.ok && response.body && response.body.himbeerecouch;
    const fleet = settings && settings.fleet_database;
    if (typeof fleet === "string" && fleet) where = {...where, login: where.db, db: fleet};
  }

  async function main() {
    $("noscript").hidden = true;
    try {
      where = locate(location.pathname);
    } catch (error) {
      problem(error.message);
      return;
    }
    try {
      await findFleet();
    } catch (error) {
      problem("The server does not answer: " + (error.message || error));
      return;
    }
    $("dbname").textContent = where.db;
    document.title = where.db + " - himbeerecouch fleet";
    buildFleetHead();
    $("login-form").addEventListener("submit", logIn);
    $("logout").addEventListener("click", logOut);
    $("filter").addEventListener("input", renderFleet);
    $("cmd-form").addEventListener("submit", runCommand);
    $("cmd-argv").addEventListener("input", previewArgv);
    window.addEventListener("hashchange", route);
    // Ages move on without any request.
    setInterval(() => {
      if (!app.user) return;
      if (app.view.kind === "pi") renderPi(app.view.macid);
      else renderFleet();
    }, 5000);
    let user = null;
    try {
      user = await checkSession();
    } catch (error) {
      if (!(error instanceof SessionLost)) problem("The server does not answer: " + (error.message || error));
    }
    if (user) await begin(user);
    else showLogin("");
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
