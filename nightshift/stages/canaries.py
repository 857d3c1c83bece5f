"""Canary rows: requests with known expectations that ride inside the real shards.

A canary file is JSONL; each line is an OpenAI batch line plus an `expect` object:

    {"custom_id": "invoice-total", "method": "POST", "url": "/v1/chat/completions",
     "body": {"messages": [...], "max_tokens": 32, "temperature": 0},
     "expect": {"regex": "\\\\$1,250", "max_length": 400}}

Expectations (all given must hold): `exact` (the text equals), `regex` (re.search finds it),
`json_schema` (the text is JSON valid against the schema), `one_of` (the stripped text is one of
the labels), `min_length` / `max_length` (characters).
"""

from __future__ import annotations

import json
import re

from nightshift.errors import ExitStatus, NightshiftError
from nightshift.inputs import InputError, InputRow, parse_batch_line

CANARY_PREFIX = "nightshift-canary:"
EXPECTATIONS = ("exact", "regex", "json_schema", "one_of", "min_length", "max_length")


class CanaryFailure(NightshiftError, RuntimeError):
    """The run's outputs did not pass validation; they are on disk, marked not validated."""

    exit_status = ExitStatus.VALIDATION_FAILED
    retryable = False


def load_canaries(path: str) -> list[tuple[InputRow, dict]]:
    """Parse a canary file; any malformed line fails the whole run before GPU time."""
    import fsspec

    canaries = []
    try:
        with fsspec.open(path, "rb") as handle:
            lines = handle.read().splitlines()
    except Exception as exc:
        raise InputError(f"cannot read canary file {path!r}: {exc}") from exc
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            expect = obj.pop("expect")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise InputError(f"canary file {path!r} line {line_no}: not a JSON object with an 'expect' field") from None
        unknown = set(expect) - set(EXPECTATIONS) if isinstance(expect, dict) else {"(not an object)"}
        if unknown or not expect:
            raise InputError(
                f"canary file {path!r} line {line_no}: expect needs some of {EXPECTATIONS}, "
                f"got {sorted(unknown) or 'nothing'}"
            )
        row = parse_batch_line(json.dumps(obj).encode(), line_no)
        if row.error:
            raise InputError(f"canary file {path!r} line {line_no}: {row.error['message']}")
        canaries.append((InputRow(0, CANARY_PREFIX + row.custom_id, row.request_json, None), expect))
    if not canaries:
        raise InputError(f"canary file {path!r} holds no canaries")
    return canaries


def check_expectations(text: str | None, expect: dict) -> list[str]:
    """The expectations `text` fails, in words (empty: it passes)."""
    if text is None:
        return ["the canary row failed to generate"]
    failures = []
    if "exact" in expect and text != expect["exact"]:
        failures.append(f"text is not exactly {expect['exact']!r}")
    if "regex" in expect and not re.search(expect["regex"], text):
        failures.append(f"text does not match /{expect['regex']}/")
    if "one_of" in expect and text.strip() not in expect["one_of"]:
        failures.append(f"text {text.strip()[:40]!r} is not one of {expect['one_of']}")
    if "min_length" in expect and len(text) < expect["min_length"]:
        failures.append(f"text is shorter than {expect['min_length']} characters")
    if "max_length" in expect and len(text) > expect["max_length"]:
        failures.append(f"text is longer than {expect['max_length']} characters")
    if "json_schema" in expect:
        import jsonschema

        try:
            jsonschema.validate(json.loads(text), expect["json_schema"])
        except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
            failures.append(f"text is not JSON valid against the schema: {str(exc).splitlines()[0]}")
    return failures
