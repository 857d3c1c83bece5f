"""Tool calls in chat rows: `tools` reach the chat template, and the answer's calls come back in
OpenAI's shape (`message.tool_calls`, `finish_reason: "tool_calls"`).

* `tool_choice` naming a function, or "required": the row is decoded under the JSON schema of
  the call (vLLM's `get_json_schema_from_tools`: the function's `parameters`, or an array of
  `{name, parameters}`) with no free whitespace, so its arguments parse even on a small model —
  and follow the schema: what vLLM's server does for a JSON-native tool parser, and stricter
  than its default for the others (which constrain the call's envelope, not its arguments).
* "auto" (or none given with tools): the model writes calls in its family's own format and vLLM's
  tool parser for that family takes them out (`tool_call_parser`; "auto" reads the family off the
  chat template). Finish reasons as OpenAI's and vLLM's: "tool_calls" when auto or required calls
  were made, the engine's own ("stop") for a named function.

Tool call ids are derived from the row's stable request id, so a resumed run writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

log = logging.getLogger("nightshift.tools")

# The tool-call parser of a chat template that shows the model this format (first match wins).
TEMPLATE_PARSERS = (
    ("<|python_tag|>", "llama3_json"),
    ("[TOOL_CALLS]", "mistral"),
    ("<tool_call>", "hermes"),
    ("<|tool_call_start|>", "lfm2"),
)
FALLBACK_PARSER = "hermes"


def parser_for(setting: str | None, chat_template: str | None) -> str | None:
    """The parser a job's `tool_call_parser` setting means for a model of this chat template."""
    if setting != "auto":
        return setting
    template = chat_template or ""
    return next((parser for marker, parser in TEMPLATE_PARSERS if marker in template), FALLBACK_PARSER)


def is_forced(tool_choice: Any) -> bool:
    return tool_choice == "required" or _named(tool_choice) is not None


def _named(tool_choice: Any) -> str | None:
    """The function a validated `tool_choice` names (vLLM's ChatCompletionNamedToolChoiceParam)."""
    return getattr(getattr(tool_choice, "function", None), "name", None)


def constrain(parsed) -> None:
    """A forced call's structured decoding, set on the validated ChatCompletionRequest."""
    from nightshift.engine.vllm_adapter import forced_tool_call_outputs

    if not parsed.tools or not is_forced(parsed.tool_choice):
        return
    forced_tool_call_outputs(parsed, compact_json_grammar)


def compact_json_grammar(schema: dict) -> str:
    """The schema as a grammar of JSON without free whitespace. vLLM's own switch for that
    (`disable_any_whitespace`) is engine-wide — it would change every response_format row too —
    and a small model given free whitespace can spend its whole max_tokens on blanks."""
    import xgrammar

    return str(xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":")))


class ToolCalling:
    """One engine's tool-call parsing: vLLM's parser for its model family, built once."""

    def __init__(self, parser_name: str | None, tokenizer, model_config=None) -> None:
        from nightshift.engine.vllm_adapter import tool_parser_class

        self.parser_name = parser_name
        self.tokenizer, self.model_config = tokenizer, model_config
        model_name = getattr(model_config, "model", None)
        self._parser_cls = tool_parser_class(parser_name, model_name, tokenizer) if parser_name else None

    @classmethod
    def for_engine(cls, engine, setting: str | None) -> ToolCalling | None:
        """The engine's (kept on it: one per engine and setting); None for an engine server, which
        parses its own answers."""
        if engine.tokenizer is None:
            return None
        cache = engine.tool_calling
        if setting not in cache:
            name = parser_for(setting, getattr(engine.tokenizer, "chat_template", None))
            cache[setting] = cls(name, engine.tokenizer, engine.model_config)
            log.info("tool calls in chat rows parsed with vLLM's %r tool parser", name)
        return cache[setting]

    def prepare(self, parsed) -> None:
        """A row with tools, before its sampling parameters are made: a forced call's grammar;
        otherwise what the model family's parser asks of the request on vLLM's server (hermes,
        say, keeps special tokens in the text, so that its <tool_call> tags can be found)."""
        if not parsed.tools or parsed.tool_choice == "none":
            return
        if is_forced(parsed.tool_choice):
            constrain(parsed)
        elif self._parser_cls is not None:
            self._parser(parsed).adjust_request(parsed)

    def _parser(self, parsed):
        return self._parser_cls(self.tokenizer, parsed.tools, chat_template_kwargs=None, model_config=self.model_config)

    def message(self, text: str, parsed, request_id: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of a row with tools, and its finish reason."""
        choice = parsed.tool_choice
        calls: list[tuple[str, str]] = []  # (name, arguments as JSON text)
        content: str | None = text
        if choice == "none":
            pass
        elif (name := _named(choice)) is not None:
            calls, content = ([(name, text)] if text.strip() else []), None
        elif choice == "required":  # an answer cut short keeps its text: nothing is lost
            calls = _listed_calls(text)
            content = None if calls else text
        elif self._parser_cls is not None:
            _, content, found = self._parser(parsed).parse(text, parsed, enable_auto_tools=True)
            calls = [(call.name, call.arguments) for call in found or []]
        message: dict = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [
                {"id": call_id(request_id, index), "type": "function", "function": {"name": n, "arguments": arguments}}
                for index, (n, arguments) in enumerate(calls)
            ]
            if _named(choice) is None and finish_reason == "stop":
                finish_reason = "tool_calls"
        return message, finish_reason


def _listed_calls(text: str) -> list[tuple[str, str]]:
    """The calls of a "required" answer: a JSON array of {name, parameters}."""
    try:
        listed = json.loads(text)
    except ValueError:
        return []
    return [
        (item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
        for item in listed if isinstance(item, dict) and isinstance(item.get("name"), str)
    ] if isinstance(listed, list) else []  # fmt: skip


def call_id(request_id: str, index: int) -> str:
    return "call_" + hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:24]
