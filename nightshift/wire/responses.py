"""OpenAI's Responses API in batch lines (`"url": "/v1/responses"`), answered as chat completions
where the two say the same thing — and refused per row where they do not.

In: `input` (a string, or message items with `input_text` / `input_image` / `output_text` parts,
`function_call` and `function_call_output` items), `instructions` (a system message first),
`max_output_tokens`, `temperature`, `top_p`, function `tools` and `tool_choice`,
`parallel_tool_calls`, structured output as `text.format` (json_schema, json_object, text).
Anything else of the Responses API — built-in tools (web search, file search, code interpreter),
`previous_response_id`, `background`, `stream`, reasoning settings — is the row's error
(`unsupported_parameter`), never the file's.

Out: the line's body is a Response object (`"object": "response"`, `output` items of type
`message` with `output_text` parts and `function_call`, `usage.input_tokens`,
`input_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens`), which the
official client's `Response` model reads, `output_text` included.

The translation happens when the line is read (nightshift.inputs): from there on the row is a chat
row (planned, estimated, generated, validated as one), carrying `responses` — the fields its
Response object echoes — for the output line.
"""

from __future__ import annotations

from nightshift.errors import RequestRejected

RESPONSES_URL = "/v1/responses"
# the Response object's fields that repeat the request's
ECHOED = ("instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice", "text",
          "parallel_tool_calls", "metadata")  # fmt: skip
# what is translated or echoed; any other field (previous_response_id, background, stream,
# reasoning, conversation, include, truncation, …) is the row's error
PASSED = ("model", "temperature", "top_p", "parallel_tool_calls", "user", "seed", "service_tier")
IGNORED = ("metadata", "store", "safety_identifier", "prompt_cache_key")


def chat_body(body: dict) -> dict:
    """The chat completions body that asks what the Responses body asks. A tenant's line: a field
    of the wrong shape (`"text": "x"`, `"tools": 5`) is the row's error, never the run's crash."""
    for name in body:
        if name not in (*PASSED, *IGNORED, *ECHOED, "input"):
            raise RequestRejected("unsupported_parameter", f"{name!r} of the Responses API is not supported here")
    try:
        return _translated(body)
    except (AttributeError, TypeError) as exc:
        raise RequestRejected("invalid_request", f"a field of the Responses body has the wrong type: {exc}") from None


def _translated(body: dict) -> dict:
    chat = {name: body[name] for name in PASSED if name in body}
    instructions = body.get("instructions")
    messages = [{"role": "system", "content": instructions}] if instructions else []
    chat["messages"] = messages + _messages(body.get("input"))
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    if body.get("tools"):
        chat["tools"] = [_tool(tool) for tool in body["tools"]]
    if "tool_choice" in body:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    chat.update(_response_format((body.get("text") or {}).get("format")))
    return chat


def _messages(given) -> list[dict]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise RequestRejected("missing_input", "a Responses body needs an input: a string or a list of items")
    messages: list[dict] = []
    for item in given:
        if not isinstance(item, dict):
            raise RequestRejected("invalid_request", "each input item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestRejected("invalid_request", f"an input message's role cannot be {role!r}")
            content = _content(item.get("content"))
            messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}  # fmt: skip
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = str(item.get("output", ""))
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        else:
            raise RequestRejected("unsupported_parameter", f"input items of type {kind!r} are not supported here")
    return messages


def _content(content):
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestRejected("invalid_request", "a message's content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"], **({"detail": part["detail"]} if part.get("detail") else {})}
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise RequestRejected("unsupported_parameter", f"content parts of type {kind!r} are not supported here")
    return parts


def _tool(tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise RequestRejected("unsupported_parameter", f"tools of type {kind!r} are not supported here: functions only")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _tool_choice(choice):
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise RequestRejected("unsupported_parameter", f"tool_choice {choice!r} is not supported here")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(fmt) -> dict:
    if fmt is None or fmt.get("type") == "text":
        return {}
    if fmt.get("type") == "json_object":
        return {"response_format": {"type": "json_object"}}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    raise RequestRejected("unsupported_parameter", f"text.format {fmt.get('type')!r} is not supported here")


def echoed(body: dict) -> dict:
    return {name: body[name] for name in ECHOED if name in body}


def response_body(chat: dict, echo: dict, rid: str) -> dict:
    """The Response object for a chat completion body (its first choice) and the request's echo."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    usage = chat.get("usage") or {}
    cut = choice.get("finish_reason") == "length"
    return {
        "id": f"resp_{rid}",
        "object": "response",
        "created_at": chat.get("created"),
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "model": chat.get("model"),
        "output": _output_items(message, rid),
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        **echo,
        "usage": _usage(usage),
    }


def _output_items(message: dict, rid: str) -> list[dict]:
    items = []
    if message.get("content"):
        text = {"type": "output_text", "text": message["content"], "annotations": []}
        items.append({"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
                      "content": [text]})  # fmt: skip
    for n, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        items.append({"type": "function_call", "id": f"fc_{rid}_{n}", "call_id": call.get("id"),
                      "name": function.get("name"), "arguments": function.get("arguments", ""),
                      "status": "completed"})  # fmt: skip
    return items


def _usage(usage: dict) -> dict:
    """The Responses API's usage: input and output tokens; the input tokens the engine's prefix
    cache served (its own count); `cache_write_tokens` 0 — OpenAI bills writes to its prompt
    cache, a self-hosted prefix cache bills none; reasoning tokens none — no reasoning parser
    runs, so a reasoning model's thinking is in the text and counted in `output_tokens`."""
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
