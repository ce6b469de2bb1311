"""Who may do what in the database: the `_security` object and the validation function.

- Devices log in as CouchDB users named after their MacID, with the role `raspberry`.
  They may write their own heartbeat, output and data documents (ids starting with `<MacID>_`, never
  of a code or command type) and add results to their own command documents; nothing else:
  no code documents, no new commands, nothing of another device.
- Users with the role `deployer` (and server admins) may write anything but design documents,
  which CouchDB reserves to database admins.
- Anonymous clients can read nothing: the database has members.
"""
from __future__ import annotations

DEVICE_ROLE = "raspberry"
DEPLOYER_ROLE = "deployer"
DESIGN_DOC_ID = "_design/himbeerecouch"
INDEX_NAME = "himbeerecouch-type"
INDEX_DDOC = "himbeerecouch-index"

SECURITY = {
    "admins": {"names": [], "roles": []},
    "members": {"names": [], "roles": [DEVICE_ROLE, DEPLOYER_ROLE]},
}

# Fields the daemon writes into a command document (see commands.py).
COMMAND_RESULT_FIELDS = ("claimed", "ret", "returncode", "started", "finished", "error", "truncated")

VALIDATE_DOC_UPDATE = """function (newDoc, oldDoc, userCtx, secObj) {
  var roles = userCtx.roles || [];
  function has(role) { return roles.indexOf(role) !== -1; }
  if (has('_admin') || has('%(deployer)s')) { return; }
  if (!has('%(device)s')) {
    throw({forbidden: 'only deployers and devices may write to this database'});
  }
  var me = String(userCtx.name);
  function isCode(doc) {
    return !!doc && (typeof doc.type === 'number' ||
                     (typeof doc.type === 'string' && /^[0-9]+$/.test(doc.type)));
  }
  function isCommand(doc) {
    return !!doc && typeof doc.type === 'string' && /_cmd$/.test(doc.type);
  }
  if (oldDoc && oldDoc.type === me + '_cmd' && newDoc.type === oldDoc.type && !newDoc._deleted) {
    var results = {%(results)s, _rev: 1, _revisions: 1};
    var keys = {}, key;
    for (key in oldDoc) { keys[key] = 1; }
    for (key in newDoc) { keys[key] = 1; }
    for (key in keys) {
      if (!results[key] && JSON.stringify(oldDoc[key]) !== JSON.stringify(newDoc[key])) {
        throw({forbidden: 'a device may only add results to its commands, not change ' + key});
      }
    }
    if (oldDoc.ret !== undefined && JSON.stringify(oldDoc.ret) !== JSON.stringify(newDoc.ret)) {
      throw({forbidden: 'the result of this command is written already'});
    }
    return;
  }
  if (newDoc._id.indexOf(me + '_') !== 0 || isCode(newDoc) || isCommand(newDoc) ||
      isCode(oldDoc) || isCommand(oldDoc)) {
    throw({forbidden: 'a device may write only its own heartbeat and data documents (ids starting ' +
                      'with ' + me + '_) and the results of its own commands'});
  }
}""" % {"deployer": DEPLOYER_ROLE, "device": DEVICE_ROLE,
        "results": ", ".join(f"{field}: 1" for field in COMMAND_RESULT_FIELDS)}

DESIGN_DOC = {"_id": DESIGN_DOC_ID, "language": "javascript", "validate_doc_update": VALIDATE_DOC_UPDATE}
