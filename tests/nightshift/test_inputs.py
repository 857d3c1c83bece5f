"""Specification of the input readers: every record comes out once, as a request or an error."""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import chat_request, write_jsonl

from nightshift.config import CorpusOptions
from nightshift.inputs import InputError, read_rows

pytestmark = pytest.mark.fast


def codes(rows):
    return [row.error["code"] if row.error else "ok" for row in rows]


def test_openai_batch_rows_carry_a_request_or_an_error_code(tmp_path):
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            chat_request("a", "hi"),
            b"\xff\xfe not utf-8",
            "{not json",
            "[1, 2]",
            {"method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}]}},
            chat_request("a", "same id again"),
            {**chat_request("m", "x"), "method": "GET"},
            {**chat_request("u", "x"), "url": "/v1/audio/speech"},
            {"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions"},
            {"custom_id": "nomsg", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
            {"custom_id": "noprompt", "method": "POST", "url": "/v1/completions", "body": {"prompt": ""}},
            {"custom_id": "noinput", "method": "POST", "url": "/v1/embeddings", "body": {"input": []}},
            "",
            {"custom_id": 7, "method": "POST", "url": "/v1/chat/completions", "body": {}},
        ],
    )
    rows = list(read_rows(str(path), "openai-batch"))
    assert codes(rows) == [
        "ok",
        "invalid_encoding",
        "invalid_json",
        "invalid_request",
        "missing_custom_id",
        "duplicate_custom_id",
        "unsupported_method",
        "unsupported_url",
        "invalid_request",
        "missing_messages",
        "missing_prompt",
        "missing_input",
        "invalid_custom_id",
    ]
    assert [row.line_no for row in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14]  # blank line 13: no record
    assert all(row.error["line"] == row.line_no for row in rows if row.error)


def test_corpus_parquet_rows_become_chat_requests_through_the_template(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"doc": ["d1", "d2", "d3"], "body": ["alpha", None, "gamma"]}), path)
    options = CorpusOptions(
        id_column="doc", text_column="body", template="Sum: {text}", system="Be brief.", max_tokens=5
    )
    rows = list(read_rows(str(path), "corpus", options))
    assert [r.custom_id for r in rows] == ["d1", "d2", "d3"]
    assert codes(rows) == ["ok", "empty_prompt", "ok"]
    assert rows[0].request["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sum: alpha"},
    ]
    assert rows[0].request["body"]["max_tokens"] == 5


def test_corpus_csv_without_the_text_column_fails_as_a_whole(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id,content\n1,hello\n")
    with pytest.raises(InputError, match="no column 'text'"):
        list(read_rows(str(path), "corpus", CorpusOptions(id_column="id", text_column="text")))


@pytest.mark.parametrize("content", [b"", b"\n\n", b"garbage\nmore garbage\n"])
def test_an_empty_or_non_jsonl_input_fails_as_a_whole(tmp_path, content):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError):
        list(read_rows(str(path), "openai-batch"))


def test_a_missing_input_fails_as_a_whole(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"), "openai-batch")


def test_a_utf8_byte_order_mark_is_read_as_such_in_jsonl_and_csv(tmp_path):
    bom = b"\xef\xbb\xbf"
    batch = tmp_path / "exported.jsonl"
    batch.write_bytes(bom + json.dumps(chat_request("first", "hi")).encode() + b"\n")
    assert [(r.custom_id, r.error) for r in read_rows(str(batch), "openai-batch")] == [("first", None)]
    corpus = tmp_path / "exported.csv"
    corpus.write_bytes(bom + b"id,text\nd1,hello\n")
    rows = list(read_rows(str(corpus), "corpus", CorpusOptions(id_column="id")))
    assert [(r.custom_id, r.error) for r in rows] == [("d1", None)]


@pytest.mark.parametrize(
    "make_input, words",
    [
        (lambda d: d / "missing.jsonl", "does not exist"),
        (lambda d: (d / "other.csv").write_text("id,body\n1,x\n") and d / "other.csv", "has no column 'text'"),
        (lambda d: (d / "junk.jsonl").write_text("not json\n") and d / "junk.jsonl", "line 1: line is not valid JSON"),
    ],
)
def test_an_unusable_input_exits_2_with_one_message_before_anything_starts(tmp_path, capsys, make_input, words):
    from nightshift.cli import main

    path = make_input(tmp_path)
    started = time.monotonic()
    assert main(["run", str(path), "--output", str(tmp_path / "run")]) == 2
    assert time.monotonic() - started < 5  # no engine, no Prefect server: the input alone was read
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and words in message, message
    assert not (tmp_path / "run").exists()
