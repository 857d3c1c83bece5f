"""Specification of the Batch API's objects and store: OpenAI's validation verdicts, cursor
pages, owners that never see each other's objects, ids that never become paths elsewhere."""

import json

import pytest
from conftest import chat_request, write_jsonl

from nightshift.batch_api.store import (
    BatchObject,
    Store,
    StoredBatch,
    check_batch_input,
    new_id,
    owner_of,
    page,
    window_seconds,
)

pytestmark = pytest.mark.fast
CHAT = "/v1/chat/completions"


def verdict(tmp_path, rows, endpoint=CHAT, max_requests=100):
    requests, errors = check_batch_input(write_jsonl(tmp_path / "in.jsonl", rows), endpoint, max_requests)
    return requests, [(e.code, e.line) for e in errors]


def test_a_valid_file_counts_its_requests_and_leaves_bodies_to_the_run(tmp_path):
    rows = [b"\xef\xbb\xbf" + json.dumps(chat_request("a", "hi")).encode(), "", chat_request("b", "hi")]
    rows.append({"custom_id": "c", "method": "POST", "url": CHAT, "body": {"messages": "not a list"}})
    assert verdict(tmp_path, rows) == (3, [])


def test_the_files_openai_fails_whole_are_failed_with_each_line_named(tmp_path):
    assert verdict(tmp_path, [chat_request("a", "hi"), "{oops", "[1, 2]"]) == (
        3, [("invalid_json_line", 2), ("invalid_json_line", 3)]
    )  # fmt: skip
    assert verdict(tmp_path, [chat_request("a", "hi"), dict(chat_request("b", "hi"), url="/v1/embeddings")]) == (
        2, [("url_mismatch", 2)]
    )  # fmt: skip
    assert verdict(tmp_path, [chat_request("a", "hi"), chat_request("a", "hi")]) == (2, [("duplicate_custom_id", 2)])
    assert verdict(tmp_path, ["", "  "]) == (0, [("empty_file", None)])
    assert verdict(tmp_path, [chat_request(f"r{i}", "hi") for i in range(3)], max_requests=2) == (
        3, [("too_many_tasks", None)]
    )  # fmt: skip


def test_completion_windows_are_durations():
    assert [window_seconds(w) for w in ("24h", "90m", "30s", "1d")] == [86400, 5400, 30, 86400]
    for bad in ("", "24", "0h", "1w", "-1h"):
        with pytest.raises(ValueError):
            window_seconds(bad)


def test_pages_follow_the_cursor_newest_first():
    class Item:
        def __init__(self, id):
            self.id = id

    items = [Item(f"b{i}") for i in range(5)]  # oldest first, as stored
    first, more = page(items, 2, None)
    assert [i.id for i in first] == ["b4", "b3"] and more
    second, more = page(items, 2, "b3")
    assert [i.id for i in second] == ["b2", "b1"] and more
    last, more = page(items, 2, "b1")
    assert [i.id for i in last] == ["b0"] and not more


def test_an_owner_sees_only_its_own_objects_and_ids_never_leave_the_store(tmp_path):
    store = Store(str(tmp_path / "store"))
    alice, bob = owner_of("key-a"), owner_of("key-b")
    file_id = new_id("file-")
    store.add_file(file_id, alice, "in.jsonl", "batch", 10, store.upload_path(file_id))
    batch = BatchObject(id=new_id("batch_"), endpoint=CHAT, input_file_id=file_id, completion_window="24h",
                        created_at=1, expires_at=2)  # fmt: skip
    store.save_batch(StoredBatch(batch=batch, owner=alice))

    assert store.file(file_id, alice) is not None and store.file(file_id, bob) is None
    assert store.batch(batch.id, alice) is not None and store.batch(batch.id, bob) is None
    assert store.batches(bob) == [] and store.files(bob) == []
    for hostile in ("../../etc/passwd", "file-../../x", "batch_" + "0" * 23 + "/"):
        assert store.file(hostile, alice) is None and store.batch(hostile) is None
    assert "key-a" not in "".join(p.read_text() for p in (tmp_path / "store").rglob("*.json"))


def test_ids_are_unique_and_of_one_shape():
    ids = [new_id("batch_") for _ in range(3)]
    assert len(set(ids)) == 3 and all(len(i) == len("batch_") + 24 for i in ids)


def test_every_batch_and_file_object_is_what_the_official_client_parses():
    """Objects at each stage of the lifecycle, validated strictly by the `openai` package's own
    models: a field OpenAI's client does not know, or a wrong type, fails here."""
    from openai.types import Batch, FileObject

    from nightshift.batch_api.store import BatchError as OurBatchError
    from nightshift.batch_api.store import BatchErrors, BatchUsage, RequestCounts
    from nightshift.batch_api.store import FileObject as OurFileObject

    created = BatchObject(
        id=new_id("batch_"), endpoint=CHAT, input_file_id=new_id("file-"), completion_window="24h",
        created_at=1, expires_at=86401, metadata={"night": "2026-11-27"}, model="tiny",
    )  # fmt: skip
    finished = created.model_copy(
        update={
            "status": "completed", "in_progress_at": 2, "finalizing_at": 3, "completed_at": 4,
            "output_file_id": new_id("file-"), "error_file_id": new_id("file-"),
            "request_counts": RequestCounts(total=3, completed=2, failed=1),
            "usage": BatchUsage(input_tokens=10, output_tokens=5, total_tokens=15),
        }
    )  # fmt: skip
    failed = created.model_copy(
        update={
            "status": "failed", "failed_at": 2,
            "errors": BatchErrors(data=[OurBatchError(code="invalid_json_line", message="line 2", line=2)]),
        }
    )  # fmt: skip
    for ours in (created, finished, failed):
        written = ours.model_dump()
        assert set(written) <= set(Batch.model_fields), set(written) - set(Batch.model_fields)
        parsed = Batch.model_validate(written, strict=True).model_dump()
        assert {name: parsed[name] for name in written} == written
    uploaded = OurFileObject(id=new_id("file-"), bytes=42, created_at=1, filename="in.jsonl", purpose="batch")
    output = uploaded.model_copy(update={"purpose": "batch_output"})
    for ours in (uploaded, output):
        assert FileObject.model_validate(ours.model_dump(), strict=True).id == ours.id
