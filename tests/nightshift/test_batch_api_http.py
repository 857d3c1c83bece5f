"""Specification of the Batch API's HTTP surface, driven by the official `openai` client through
FastAPI's TestClient (no socket, no runner thread, no engine): every 4xx in OpenAI's error shape,
list limits checked, keys that never see each other's objects, cursor pages the client follows."""

import io
import json

import openai
import pytest
from conftest import chat_request
from fastapi.testclient import TestClient

from nightshift.batch_api.routes import create_app
from nightshift.batch_api.server import BatchLifecycle, batch_runs
from nightshift.batch_api.store import Store, owner_of
from nightshift.config import BatchApiConfig

pytestmark = pytest.mark.fast
KEYS = ("key-alice", "key-bob")


@pytest.fixture
def http(tmp_path):
    """The API over a fresh store; its runner never starts, so batches stay as created."""
    config = BatchApiConfig(storage=str(tmp_path / "api"), chat_model="tiny")
    store = Store(config.storage)
    app = create_app(
        config, store, BatchLifecycle(config, store, batch_runs(config, store)), {owner_of(key) for key in KEYS}
    )
    with TestClient(app, base_url="http://nightshift.test") as client:
        yield client


def sdk(http: TestClient, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://nightshift.test/v1", api_key=key, http_client=http, max_retries=0)


def upload(client: openai.OpenAI, rows) -> str:
    content = "\n".join(json.dumps(row) for row in rows).encode()
    return client.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch").id


def assert_openai_error(response, status: int, param: str | None, code: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    return error


def test_an_upload_that_is_not_multipart_is_a_400_in_openais_shape_not_fastapis_422(http):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    response = http.post("/v1/files", json={"purpose": "batch"}, headers=auth)
    error = assert_openai_error(response, 400, "file", "missing_required_parameter")
    assert "file" in error["message"]
    missing_purpose = http.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, headers=auth)
    assert_openai_error(missing_purpose, 400, "purpose", "missing_required_parameter")


def test_list_limits_outside_openais_range_are_refused_naming_the_parameter(http):
    client = sdk(http)
    for limit in (-5, 0, 101):
        with pytest.raises(openai.BadRequestError) as refused:
            client.batches.list(limit=limit)
        assert refused.value.body["param"] == "limit" and refused.value.body["code"] == "invalid_value"
    with pytest.raises(openai.BadRequestError):
        client.files.list(limit=10_001)
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.list(order="sideways")
    assert refused.value.body["param"] == "order"
    assert client.batches.list(limit=100).data == []
    for listing in (client.batches.list, client.files.list):
        with pytest.raises(openai.BadRequestError) as refused:
            listing(after="batch_no_such_cursor")
        assert refused.value.body["param"] == "after" and refused.value.body["code"] == "invalid_value"


def test_an_unknown_url_or_method_is_answered_in_openais_shape(http):
    response = http.get("/v1/nothing-here", headers={"Authorization": f"Bearer {KEYS[0]}"})
    error = assert_openai_error(response, 404, None, "unknown_url")
    assert "/v1/nothing-here" in error["message"]
    wrong_method = http.put("/v1/batches", headers={"Authorization": f"Bearer {KEYS[0]}"})
    assert_openai_error(wrong_method, 405, None, None)
    assert wrong_method.headers["allow"] == "POST", "the method the path takes is still named (Allow)"


def test_keys_see_only_their_own_objects_and_the_client_pages_through_them_all(http):
    alice, bob = sdk(http, KEYS[0]), sdk(http, KEYS[1])
    file_id = upload(alice, [chat_request("a", "hi"), chat_request("b", "hi")])
    made = [
        alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(5)
    ]

    assert [b.id for b in alice.batches.list(limit=2)] == made[::-1]  # auto-pagination, newest first
    first_page = alice.batches.list(limit=2)
    assert first_page.has_more and len(first_page.data) == 2
    assert [f.id for f in alice.files.list(limit=1)] == [file_id]
    assert bob.batches.list().data == [] and bob.files.list().data == []
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(made[0])
    with pytest.raises(openai.NotFoundError):
        bob.files.content(file_id)
    with pytest.raises(openai.BadRequestError):  # another owner's file is no input either
        bob.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.AuthenticationError):
        sdk(http, "key-mallory").batches.list()
    assert http.get("/v1/batches").status_code == 401  # no key at all


def test_a_created_batch_waits_validating_and_can_be_cancelled_by_its_owner_only(http):
    alice, bob = sdk(http, KEYS[0]), sdk(http, KEYS[1])
    batch = alice.batches.create(
        input_file_id=upload(alice, [chat_request("a", "hi")]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"night": "2026-11-27"},
    )
    assert batch.status == "validating" and batch.metadata == {"night": "2026-11-27"}
    assert batch.expires_at - batch.created_at == 24 * 3600
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    assert alice.batches.cancel(batch.id).status == "cancelling"
    assert alice.batches.cancel(batch.id).status == "cancelling"  # cancelling twice is no error


def test_a_batch_request_that_is_not_valid_is_a_400_naming_its_parameter(http):
    file_id = upload(sdk(http), [chat_request("a", "hi")])
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    valid = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    refused = {
        "endpoint": ({**valid, "endpoint": "/v1/images"}, "invalid_value"),
        "completion_window": ({**valid, "completion_window": "soon"}, "invalid_value"),
        "metadata": ({**valid, "metadata": {"k": "v" * 513}}, "invalid_value"),
        "input_file_id": ({k: v for k, v in valid.items() if k != "input_file_id"}, "missing_required_parameter"),
    }
    for param, (body, code) in refused.items():
        assert_openai_error(http.post("/v1/batches", json=body, headers=auth), 400, param, code)
    assert_openai_error(http.post("/v1/batches", json={**valid, "metadata": {"k": 1}}, headers=auth), 400,
                        "metadata", "invalid_value")  # fmt: skip
    assert_openai_error(http.post("/v1/batches", json={**valid, "input_file_id": "file-nope"}, headers=auth), 400,
                        "input_file_id", None)  # fmt: skip
    not_json = http.post("/v1/batches", content=b"{not json", headers={**auth, "Content-Type": "application/json"})
    assert_openai_error(not_json, 400, None, None)
    assert http.post("/v1/batches", json=valid, headers=auth).status_code == 200


@pytest.fixture
def capped(tmp_path):
    """A server allowing each key two batches in progress and small request bodies."""
    config = BatchApiConfig(storage=str(tmp_path / "api"), chat_model="tiny", max_active_batches_per_key=2,
                            max_body_bytes=4096)  # fmt: skip
    store = Store(config.storage)
    lifecycle = BatchLifecycle(config, store, batch_runs(config, store))
    app = create_app(config, store, lifecycle, {owner_of(key) for key in KEYS})
    with TestClient(app, base_url="http://nightshift.test") as client:
        yield client, store


def test_a_key_at_its_cap_of_batches_in_progress_gets_a_429_and_the_others_do_not(capped):
    http, store = capped
    alice, bob = sdk(http, KEYS[0]), sdk(http, KEYS[1])
    file_id = upload(alice, [chat_request("a", "hi")])
    for _ in range(2):
        alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.RateLimitError) as refused:
        alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.code == "batch_limit_exceeded" and "2 batches in progress" in refused.value.message
    bob.batches.create(input_file_id=upload(bob, [chat_request("b", "hi")]), endpoint="/v1/chat/completions",
                       completion_window="24h")  # fmt: skip
    first = alice.batches.list().data[-1]
    alice.batches.cancel(first.id)  # cancelling is in progress still, until the runner closes it
    with pytest.raises(openai.RateLimitError):
        alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    done = store.batch(first.id)
    store.save_batch(done.model_copy(update={"batch": done.batch.model_copy(update={"status": "cancelled"})}))
    alice.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_request_body_past_the_bound_is_refused_before_it_is_read(capped):
    http, _ = capped
    auth = {"Authorization": f"Bearer {KEYS[0]}", "Content-Type": "application/json"}
    huge = json.dumps({"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h",
                       "metadata": {"k": "v" * 10_000}})  # fmt: skip
    assert_openai_error(http.post("/v1/batches", content=huge, headers=auth), 413, None, None)

    def streamed():  # no Content-Length: the bound holds as the body streams in
        yield huge[:3000].encode()
        yield huge[3000:].encode()

    assert_openai_error(http.post("/v1/batches", content=streamed(), headers=auth), 413, None, None)


def test_retention_removes_old_files_and_finished_batches_with_their_run_directories(tmp_path):
    import time

    store = Store(str(tmp_path / "api"), retention_s=3600)
    old, fresh, read_by_a_running_batch = "file-" + "0" * 24, "file-" + "1" * 24, "file-" + "2" * 24
    for file_id in (old, fresh, read_by_a_running_batch):
        store.path(store.upload_path(file_id)).parent.mkdir(parents=True, exist_ok=True)
        store.path(store.upload_path(file_id)).write_text("{}\n")
        stored = store.add_file(file_id, "alice", "in.jsonl", "batch", 3, store.upload_path(file_id))
        assert stored.file.expires_at == stored.file.created_at + 3600
    hour_ago = int(time.time()) - 7200

    def aged(file_id):
        stored = store.file(file_id, "alice")
        aged_file = stored.model_copy(update={"file": stored.file.model_copy(update={"created_at": hour_ago})})
        from nightshift.runtime.rundir import write_json_atomic

        write_json_atomic(store.root / "files" / f"{file_id}.json", aged_file.model_dump())

    aged(old), aged(read_by_a_running_batch)
    from nightshift.batch_api.store import BatchObject, StoredBatch

    def batch(batch_id, status, input_file):
        store.save_batch(StoredBatch(owner="alice", batch=BatchObject(
            id=batch_id, endpoint="/v1/chat/completions", input_file_id=input_file, completion_window="24h",
            created_at=hour_ago, expires_at=hour_ago + 86400, status=status)))  # fmt: skip
        store.run_dir(batch_id).root.mkdir(parents=True, exist_ok=True)
        store.run_dir(batch_id).output.write_text("{}\n")

    batch("batch_" + "a" * 24, "completed", old)
    batch("batch_" + "b" * 24, "in_progress", read_by_a_running_batch)

    batches, files = store.expire(int(time.time()) - 3600, int(time.time()))

    assert batches == ["batch_" + "a" * 24] and files == [old]
    assert not store.run_dir("batch_" + "a" * 24).root.exists() and store.run_dir("batch_" + "b" * 24).root.exists()
    assert store.file(fresh, "alice") and store.file(read_by_a_running_batch, "alice")
    assert not store.path(store.upload_path(old)).exists()


def test_an_upload_that_does_not_fit_the_servers_disk_is_a_507_and_leaves_nothing(tmp_path):
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    try:
        config = BatchApiConfig(storage=str(disk / "api"), chat_model="tiny")
        store = Store(config.storage)
        app = create_app(config, store, BatchLifecycle(config, store, batch_runs(config, store)), {owner_of(KEYS[0])})
        with TestClient(app, base_url="http://nightshift.test") as http:
            content = b"".join(json.dumps(chat_request(f"r{i}", "x" * 200)).encode() + b"\n" for i in range(8000))
            response = http.post("/v1/files", files={"file": ("big.jsonl", content)}, data={"purpose": "batch"},
                                 headers={"Authorization": f"Bearer {KEYS[0]}"})  # fmt: skip
            assert response.status_code == 507 and "storage is full" in response.json()["error"]["message"]
            assert store.files(owner_of(KEYS[0])) == []
            assert not [p for p in disk.rglob("*") if p.is_file()], "no partial upload kept"
            assert sdk(http).files.create(file=("small.jsonl", io.BytesIO(b"{}\n")), purpose="batch").bytes == 3
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_file_expires_as_its_expires_after_says_and_a_policy_outside_openais_bounds_is_a_400(http):
    client = sdk(http)
    content = json.dumps(chat_request("a", "hi")).encode()

    def create(expires_after):
        return client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch", expires_after=expires_after)

    kept = create({"anchor": "created_at", "seconds": 3600})
    assert kept.expires_at == kept.created_at + 3600 and client.files.retrieve(kept.id).expires_at == kept.expires_at
    for refused in ({"anchor": "created_at", "seconds": 60}, {"anchor": "created_at", "seconds": 2_592_001},
                    {"anchor": "last_active_at", "seconds": 3600}):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as error:
            create(refused)
        assert error.value.body["param"] == "expires_after" and error.value.body["code"] == "invalid_value"
    with pytest.raises(openai.BadRequestError) as error:
        client.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions", completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 59})  # fmt: skip
    assert error.value.body["param"] == "output_expires_after"
    batch = client.batches.create(input_file_id=kept.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 86400})  # fmt: skip
    assert batch.status == "validating"
