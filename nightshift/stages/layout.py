"""The order a shard's rows go to the engine: rows that share a prompt prefix, together.

vLLM's prefix cache only saves a shared prefix's prefill when the rows sharing it run while its
KV blocks are still cached; a batch file in its export's order (many questions about one
document, scattered) evicts them between uses. Sorting the rows by their prompt, as the chat
template lays it out (messages in order, each role then content), visits them in a prefix
tree's depth-first order: every group of rows sharing a prefix is contiguous, the longest
shared prefixes innermost. Outputs keep the input order (chunks are sorted by row on the way
out); only the engine's admission order changes, so resume and checkpoints are untouched.

`PrefixCacheModel` replays an order against a least-recently-used cache of full KV blocks —
what `nightshift plan` reports for the layout and for the input order. No order helps rows
whose shared text comes after their own content: `misplaced_shared_text` says so (the lint).
"""

from __future__ import annotations

import json
import math
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nightshift.records import MisplacedSharedText

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


# What a row with no max_tokens is assumed to write: for its place in the layout, and for the
# prefix-cache prediction (its blocks crowd the cache while it runs; the bound, the rest of the
# context, would overstate it).
UNBOUNDED_ROW_GUESS = 256


# Rows whose prompts share fewer characters than this beyond their branch's prefix (some 16 tokens,
# a GPU engine's KV block) share no cache block worth keeping them together for.
MIN_BRANCH_CHARS = 64


def expected_work(max_tokens: int | None) -> int:
    """The tokens a row is expected to write: what decides how long it runs once admitted."""
    return max_tokens or UNBOUNDED_ROW_GUESS


def prefix_order(requests: Sequence, prompt_of=lambda request: request.prompt, work_of=None) -> list:
    """`requests` with every group sharing a prompt prefix contiguous; the same rows always give
    the same order.

    Without `work_of`, the prefix tree's depth-first order in lexicographic order (ties keep
    their order). With it, at every branching of the tree the branch holding the longest
    expected work goes first — longest processing time first, so that a shard's last minutes
    are not one long row running alone — while every shared prefix stays contiguous: the cache
    sees the same groups, in another order."""
    keyed = sorted(((prompt_key(prompt_of(request)), request) for request in requests), key=lambda kr: kr[0])
    if work_of is None:
        return [request for _, request in keyed]
    keys, works = [key for key, _ in keyed], [work_of(request) for _, request in keyed]
    return [keyed[index][1] for index in _longest_branch_first(keys, works)]


def _longest_branch_first(keys: list[str], works: list[int]) -> list[int]:
    """Indices of sorted `keys`, depth first over their prefix tree — compressed, and with
    branches that share under MIN_BRANCH_CHARS more merged into their parent — each node's
    branches ordered by the most work any of their rows holds, ties in key order."""
    order: list[int] = []
    stack = [(0, len(keys))]  # ranges of keys sharing a prefix, to visit (last first)
    while stack:
        low, high = stack.pop()
        shared = _common_prefix_length(keys[low], keys[high - 1])  # sorted: the range's common prefix
        if high - low == 1 or (len(keys[low]) == shared == len(keys[high - 1])):
            order.extend(range(low, high))  # one row, or identical prompts: in their order
            continue
        branches, start = [], low
        for index in range(low + 1, high + 1):  # the branches: runs sharing more than a few tokens more
            if index == high or _common_prefix_length(keys[index - 1], keys[index]) < shared + MIN_BRANCH_CHARS:
                branches.append((start, index))
                start = index
        branches.sort(key=lambda branch: -max(works[branch[0] : branch[1]]))  # stable: ties in key order
        stack.extend(reversed(branches))
    return order


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


# The template lint. A shared ending this long (some 50 tokens and more) is worth saying; rows are
# sampled from the head of the input, which is enough to see how a file's prompts are laid out.
MIN_SHARED_END_CHARS = 200
LINT_SAMPLE_ROWS = 2000
LINT_MIN_SHARE = 0.2  # of the sampled rows
LINT_MIN_ROWS = 8
_SNIPPET_CHARS = 60


def misplaced_shared_text(prompts: Sequence, template: str | None = None) -> MisplacedSharedText | None:
    """Whether many rows share a long ending but not their beginning — the instruction every row
    shares placed after each row's own content, the commonest way to leave vLLM's prefix cache
    nothing to serve. `prompts` are chat messages or completion texts (token ids are skipped);
    `template` is a corpus's `--template`, named in the advice when given."""
    prompts = [p for p in prompts if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], dict))]
    keys = [prompt_key(p) for p in prompts]
    if len(keys) < LINT_MIN_ROWS:
        return None
    starts = _shared_with_a_neighbour(keys)
    ends = _shared_with_a_neighbour([key[::-1] for key in keys])
    affected = sorted(
        (i for i, key in enumerate(keys) if MIN_SHARED_END_CHARS <= ends[i] and starts[i] < ends[i]
         and starts[i] + ends[i] <= len(key)),
        key=ends.__getitem__,
    )  # fmt: skip
    if len(affected) < max(LINT_MIN_ROWS, LINT_MIN_SHARE * len(keys)):
        return None
    typical = affected[len(affected) // 2]
    key = keys[typical]
    # What every affected row ends with (one template's instruction), else what a typical one shares.
    reversed_ends = sorted(keys[i][::-1] for i in affected)
    common = _common_prefix_length(reversed_ends[0], reversed_ends[-1])
    shared_end = common if common >= MIN_SHARED_END_CHARS else ends[typical]
    begins = len(key) - shared_end
    if template is not None and "{text}" in template:
        advice = "in --template, put the shared instruction before {text}, each record's text last"
    else:
        advice = (
            "put the text every row shares first (in the system message, or at the start of the user message) "
            "and each row's own content last"
        )
    return MisplacedSharedText(
        rows_sampled=len(keys),
        rows_affected=len(affected),
        shared_end_chars=shared_end,
        shared_start_chars=sorted(starts[i] for i in affected)[len(affected) // 2],
        where=_where(prompts[typical], key, begins),
        snippet=" ".join(key[begins : begins + _SNIPPET_CHARS].replace(_FIELD, ": ").replace(_MESSAGE, " / ").split()),
        advice=advice,
    )


def _where(prompt, key: str, begins: int) -> str:
    if isinstance(prompt, str):
        return "in the prompt"
    index = key[:begins].count(_MESSAGE)
    role = prompt[index].get("role", "?") if isinstance(prompt[index], dict) else "?"
    return f"from message {index + 1} of {len(prompt)} ({role})"


def _shared_with_a_neighbour(keys: list[str]) -> list[int]:
    """For each key, the longest prefix it shares with any other: one of its neighbours in
    sorted order has it."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    shared = [0] * len(keys)
    for left, right in zip(order, order[1:]):
        length = _common_prefix_length(keys[left], keys[right])
        shared[left], shared[right] = max(shared[left], length), max(shared[right], length)
    return shared


def _common_prefix_length(a: str, b: str) -> int:
    """A binary search over slice comparisons: each comparison runs at C speed on long prompts."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


# The shard cut. A shard is one engine's cache: rows sharing a prefix only help each other inside
# one shard. Across the input, rows are compared by hashes of their prompt's first 64, 128, …,
# 65,536 bytes (as `prompt_key` lays it out): rows equal on the first k hashes share at least that
# many bytes — a prefix tree eleven levels deep, in fixed memory per row.
PREFIX_CUTS = tuple(64 << level for level in range(11))
# Rows are regrouped across shards only when that makes this much more of the prompts' text
# shareable inside a shard than the input's own order does: elsewhere shards stay input slices.
REGROUP_MIN_GAIN = 0.05
# A regrouped shard ends on the strongest group boundary among its last tenth of rows.
SHARD_FILL_MIN = 0.9


def prefix_hashes(prompt: Any) -> tuple[list[int], int]:
    """The prompt's hashes at each of PREFIX_CUTS (a prompt shorter than a cut repeats its whole
    hash there) and its length in bytes; no prompt (a rejected or an embedding row): zeros.

    CRC-32 and Adler-32 run on over the prompt, side by side, make a 64-bit hash of each prefix
    at C speed, the same in every process (Python's own hash() is salted per process)."""
    if prompt is None:
        return [0] * len(PREFIX_CUTS), 0
    data = prompt_key(prompt).encode("utf-8", "surrogatepass")
    hashes, start, crc, adler = [], 0, 0, 1
    for cut in PREFIX_CUTS:
        piece = data[start:cut]
        crc, adler = zlib.crc32(piece, crc), zlib.adler32(piece, adler)
        hashes.append(crc << 32 | adler)
        start = cut
        if cut >= len(data):
            hashes += hashes[-1:] * (len(PREFIX_CUTS) - len(hashes))
            break
    return hashes, len(data)


@dataclass(frozen=True)
class ShardCut:
    """Which input rows each shard holds (positions in input order, ascending in each shard),
    and the share of the prompts' bytes a shard-local prefix cache could serve either way."""

    shards: list[np.ndarray]
    regrouped: bool
    shareable_input_order: float
    shareable_regrouped: float


def cut_shards(hashes: np.ndarray, lengths: np.ndarray, shard_size: int) -> ShardCut:
    """Shards of at most `shard_size` rows: input slices, unless rows sharing prompt prefixes are
    scattered over the input (a document's questions exported apart) — then rows are sorted by
    their prefix hashes and cut on the strongest group boundary near each shard's end, so that each
    group runs inside one shard. Deterministic: the same rows give the same cut."""
    rows = len(lengths)
    in_input_order = np.arange(rows) // shard_size
    slices = [np.arange(start, min(start + shard_size, rows)) for start in range(0, rows, shard_size)]
    if rows <= shard_size:
        return ShardCut(slices, False, 1.0, 1.0)
    order = np.lexsort((np.arange(rows), *hashes.T[::-1]))  # primary key: the first cut's hash
    # levels[i]: how many leading cuts rows order[i] and order[i + 1] agree on (a column at a time:
    # memory a few bytes a row)
    levels, agreeing = np.zeros(rows - 1, dtype=np.int8), np.ones(rows - 1, dtype=bool)
    for column in range(hashes.shape[1]):
        sorted_column = hashes[order, column]
        agreeing &= sorted_column[1:] == sorted_column[:-1]
        levels += agreeing
    del sorted_column, agreeing
    starts, start, fill = [0], 0, max(1, math.ceil(SHARD_FILL_MIN * shard_size))
    while rows - start > shard_size:
        window = levels[start + fill - 1 : start + shard_size]  # boundaries before rows start+fill … start+size
        start = start + shard_size - int(np.argmin(window[::-1]))  # the weakest link, latest on ties
        starts.append(start)
    regrouped = np.empty(rows, dtype=np.int64)
    for shard, (low, high) in enumerate(zip(starts, starts[1:] + [rows])):
        regrouped[order[low:high]] = shard
    total = int(lengths.sum())
    before = _shareable(order, levels, lengths, in_input_order) / total if total else 0.0
    after = _shareable(order, levels, lengths, regrouped) / total if total else 0.0
    if after - before < REGROUP_MIN_GAIN:
        return ShardCut(slices, False, round(before, 4), round(after, 4))
    shards = [np.sort(order[low:high]) for low, high in zip(starts, starts[1:] + [rows])]
    return ShardCut(shards, True, round(before, 4), round(after, 4))


def _shareable(order: np.ndarray, levels: np.ndarray, lengths: np.ndarray, shard_of: np.ndarray) -> int:
    """Prompt bytes a shard-local prefix cache could serve: at each cut, every row of a group
    (rows agreeing up to that cut) but the group's first in each shard finds those bytes cached."""
    served, shards = 0, int(shard_of.max()) + 1
    sorted_lengths, sorted_shards = lengths[order], shard_of[order]
    previous = 0
    for level, cut in enumerate(PREFIX_CUTS):
        group = np.concatenate(([0], np.cumsum(levels < level + 1)))
        reaching = sorted_lengths > previous
        if not reaching.any():
            break
        weight = np.minimum(sorted_lengths[reaching], cut) - previous
        _, first = np.unique(group[reaching] * shards + sorted_shards[reaching], return_index=True)
        served += int(weight.sum() - weight[first].sum())
        previous = cut
    return served
