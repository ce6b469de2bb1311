"""Code documents: validation and what makes a program restart."""
from himbeerecouch import documents

MACID = 202481596538417


def doc(**fields):
    return {"_id": "prog", "_rev": "1-a", "type": MACID, **fields}


def test_a_valid_document_becomes_a_runnable_spec():
    spec = documents.parse(doc(code="def main(): pass", name="thermo", modules={"h": "x = 1"}), 1000)
    assert spec.runnable and spec.error is None
    assert (spec.name, spec.modules, spec.restart) == ("thermo", {"h": "x = 1"}, "on-failure")


def test_name_defaults_to_the_id():
    assert documents.parse(doc(code="def main(): pass"), 1000).name == "prog"


def test_both_integer_and_string_macid_address_this_pi():
    assert documents.is_code_doc(doc(), MACID)
    assert documents.is_code_doc({**doc(), "type": str(MACID)}, MACID)
    assert not documents.is_code_doc({**doc(), "type": f"{MACID}_cmd"}, MACID)
    assert not documents.is_code_doc({**doc(), "type": 5}, MACID)


def test_bad_documents_get_a_clear_error_and_do_not_run():
    cases = {
        "'code' must be a string": doc(code=42),
        "no 'code'": doc(),
        "'modules' must be an object": doc(code="", modules=["x"]),
        "'modules.h' must be a string": doc(code="", modules={"h": 1}),
        "cannot import": doc(code="", modules={"not a name": "x"}),
        "'restart' must be one of": doc(code="", restart="sometimes"),
        "'enabled' must be true or false": doc(code="", enabled="yes"),
        "too large": doc(code="x" * 2000),
    }
    for expected, bad in cases.items():
        spec = documents.parse(bad, 1000)
        assert not spec.runnable
        assert expected in spec.error, (expected, spec.error)


def test_unknown_fields_are_ignored():
    assert documents.parse(doc(code="def main(): pass", colour="blue"), 1000).runnable


def test_a_disabled_document_does_not_run():
    spec = documents.parse(doc(code="def main(): pass", enabled=False), 1000)
    assert spec.error is None and not spec.runnable


def test_a_document_with_only_global_modules_is_a_library():
    spec = documents.parse(doc(global_modules={"calib": "K = 1"}), 1000)
    assert spec.error is None and not spec.runnable


def test_fingerprint_follows_the_revision_and_the_global_modules():
    a = documents.parse(doc(code="def main(): pass"), 1000)
    b = documents.parse({**doc(code="def main(): pass"), "_rev": "2-b"}, 1000)
    assert documents.fingerprint(a, {}) == documents.fingerprint(a, {})
    assert documents.fingerprint(a, {}) != documents.fingerprint(b, {})
    assert documents.fingerprint(a, {}) != documents.fingerprint(a, {"calib": "K = 2"})


def test_global_modules_of_all_documents_are_merged():
    one = documents.parse({**doc(code="", global_modules={"a": "A = 1"}), "_id": "one"}, 1000)
    two = documents.parse({**doc(code="", global_modules={"b": "B = 1"}), "_id": "two"}, 1000)
    broken = documents.parse({**doc(code=1, global_modules={"c": "C = 1"}), "_id": "three"}, 1000)
    assert documents.merged_global_modules([one, two, broken]) == {"a": "A = 1", "b": "B = 1"}


def test_the_feed_selector_also_follows_known_documents():
    assert documents.feed_selector(MACID, []) == {"type": {"$in": [MACID, str(MACID), f"{MACID}_cmd"]}}
    selector = documents.feed_selector(MACID, ["b", "a"])
    assert selector["$or"][1] == {"_id": {"$in": ["a", "b"]}}
