"""Property: whatever bytes an OpenAI batch file holds, the reader never crashes and accounts
for every non-blank line exactly once — as a request or as an error naming that line."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nightshift.inputs import InputError, read_rows

pytestmark = pytest.mark.fast

good_line = st.builds(
    lambda cid, text: json.dumps(
        {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": text}]},
        }
    ).encode(),
    st.text(min_size=1, max_size=8),
    st.text(max_size=20),
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
any_line = st.one_of(
    good_line,
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["custom_id", "method", "url", "body"]), json_value).map(
        lambda d: json.dumps(d).encode()
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(any_line, max_size=30))
def test_every_non_blank_line_is_accounted_for_once(tmp_path, lines):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines))
    content = b"\n".join(lines).removeprefix(b"\xef\xbb\xbf")  # a byte-order mark is not content
    expected = [n for n, line in enumerate(content.split(b"\n"), 1) if line.strip()]
    try:
        rows = list(read_rows(str(path), "openai-batch"))
    except InputError:
        # only allowed when nothing in the file is a usable request
        assert not any(line.startswith(b'{"custom_id"') and b'"messages": [{' in line for line in lines)
        return
    assert [row.line_no for row in rows] == expected
    for row in rows:
        assert (row.request is None) != (row.error is None)
        if row.error:
            assert row.error["code"] and row.error["message"] and row.error["line"] == row.line_no
