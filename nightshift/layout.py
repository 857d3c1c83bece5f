"""The order a shard's rows go to the engine: rows that share a prompt prefix, together.

vLLM's prefix cache only saves a shared prefix's prefill when the rows sharing it run while its
KV blocks are still cached; a batch file in its export's order (many questions about one
document, scattered) evicts them between uses. Sorting the rows by their prompt, as the chat
template lays it out (messages in order, each role then content), visits them in a prefix
tree's depth-first order: every group of rows sharing a prefix is contiguous, the longest
shared prefixes innermost. Outputs keep the input order (chunks are sorted by row on the way
out); only the engine's admission order changes, so resume and checkpoints are untouched.

`PrefixCacheModel` replays an order against a least-recently-used cache of full KV blocks —
what `nightshift plan` reports for the layout and for the input order.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

# Between the fields of a key: below every printable character, so "ab" + more sorts after "ab".
_FIELD = "\x00"
_MESSAGE = "\x01"


def prompt_key(prompt: Any) -> str:
    """A string whose order is the order of the rendered prompts' prefixes: chat messages (each
    role, then its text), a completion's text, or its token ids (one character each)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(token, int) for token in prompt):
        return "".join(chr(token % 0x110000) for token in prompt)
    if isinstance(prompt, list):
        return _MESSAGE.join(_message_key(message) for message in prompt)
    return json.dumps(prompt, sort_keys=True, default=str)


def _message_key(message: Any) -> str:
    if not isinstance(message, dict):
        return json.dumps(message, sort_keys=True, default=str)
    content = message.get("content")
    if isinstance(content, list):  # content parts: text as the template joins it, the rest as JSON
        content = "\n".join(
            part.get("text", "") if isinstance(part, dict) and part.get("type") == "text" else json.dumps(part)
            for part in content
        )
    return f"{message.get('role', '')}{_FIELD}{content if isinstance(content, str) else json.dumps(content)}"


def prefix_order(requests: Sequence, prompt_of=lambda request: request.prompt) -> list:
    """`requests` with every group sharing a prompt prefix contiguous; ties keep their order, so
    the same rows always give the same order."""
    return sorted(requests, key=lambda request: prompt_key(prompt_of(request)))


class PrefixCacheModel:
    """The share of prompt tokens the prefix cache would serve for rows run in the order they
    are fed: a least-recently-used cache of `capacity_tokens` (None: unbounded) in full blocks of
    `block_size`. A row hits on the leading blocks of its prompt that are cached, never on its
    last token (vLLM always computes one); the blocks of what it generates are its own and only
    push shared ones out."""

    def __init__(self, capacity_tokens: int | None, block_size: int) -> None:
        self.block_size = block_size
        self.capacity = None if capacity_tokens is None else max(1, capacity_tokens // block_size)
        self._cached: OrderedDict[object, None] = OrderedDict()
        self._rows = self.prompt_tokens = self.hit_tokens = 0

    def run(self, ids: Sequence[int], completion: int) -> None:
        size, cached = self.block_size, self._cached
        blocks, parent = [], None
        for start in range(0, len(ids) - size + 1, size):
            parent = hash((parent, tuple(ids[start : start + size])))
            blocks.append(parent)
        leading = 0
        while leading < len(blocks) and blocks[leading] in cached:
            leading += 1
        self.prompt_tokens += len(ids)
        self.hit_tokens += min(leading * size, max(len(ids) - 1, 0))
        for block in blocks:
            cached[block] = None
            cached.move_to_end(block)
        for private in range(-(-(len(ids) % size + completion) // size)):
            cached[(self._rows, private)] = None
        self._rows += 1
        while self.capacity is not None and len(cached) > self.capacity:
            cached.popitem(last=False)

    @property
    def hit_rate(self) -> float | None:
        return round(self.hit_tokens / self.prompt_tokens, 4) if self.prompt_tokens else None
