"""The OpenAI Batch wire format: request bodies in, output and error lines out.

Request bodies are validated with vLLM's own OpenAI protocol models, so a body means here
exactly what it means to vLLM's server and to `vllm.entrypoints.openai.run_batch`:
max_tokens / max_completion_tokens, temperature, top_p, seed, stop, n, presence and
frequency penalties, logprobs / top_logprobs and `response_format` (JSON schema →
structured output) all map onto SamplingParams the same way; `tools` and `tool_choice` as
nightshift.engine.tool_calls says; a body's `model` picks the base model or one of the job's LoRA
adapters. What the batch path cannot honour (streaming, legacy function calls, unknown
fields) is rejected per row, never ignored.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from nightshift.errors import RequestRejected
from nightshift.inputs import CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL
from nightshift.wire.lines import BatchLine
from nightshift.wire.responses import response_body

# Accepted by vLLM's server but meaningless or unsupported in an offline batch.
UNSUPPORTED_FIELDS = {
    "stream": "streaming has no meaning in a batch",
    "stream_options": "streaming has no meaning in a batch",
    "functions": "the legacy `functions` are not supported: give them as `tools`",
    "function_call": "the legacy `function_call` is not supported: give it as `tool_choice`",
    "use_beam_search": "beam search is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
}


@dataclass(frozen=True)
class ServedModels:
    """The model names a job answers to: the base model's (under any of its aliases) and each LoRA
    adapter's; `mismatch` says what a row naming none of them gets ("error": model_not_found)."""

    name: str  # the base model's served name, written into its rows' responses
    aliases: frozenset[str]
    adapters: frozenset[str] = frozenset()
    mismatch: str = "error"

    @classmethod
    def of_job(cls, job) -> ServedModels:
        """A JobSpec's: its served name, model path and the path's last part; its adapters."""
        import os

        model = job.engine.model
        return cls(
            job.served_model_name,
            frozenset({job.served_model_name, model, os.path.basename(model.rstrip("/"))}),
            frozenset(job.adapter_names()),
            job.model_mismatch,
        )

    def adapter_for(self, requested: str | None) -> str | None:
        """The adapter a row's `model` names (None: the base model); RequestRejected for a name
        the job does not serve, unless the job runs such rows on the base model."""
        if requested in self.adapters:
            return requested
        if requested is None or requested in self.aliases or self.mismatch != "error":
            return None
        served = ", ".join(repr(n) for n in [self.name, *sorted(self.adapters)])
        raise RequestRejected("model_not_found", f"body asks for model {requested!r} but this job serves {served}")


@dataclass
class PreparedRequest:
    """A validated row, ready for the engine."""

    key: int  # row_index
    custom_id: str
    kind: str  # "chat", "completion" or "embedding"
    prompt: Any  # messages (chat), prompt text / token ids (completion), a list of inputs (embedding)
    sampling_params: Any  # vllm.SamplingParams, or vllm.PoolingParams for an embedding
    chat_template_kwargs: dict | None = None
    tokenization_kwargs: dict | None = None  # an embedding's truncation
    encoding_format: str = "float"  # an embedding's: "float" or "base64"
    vector_only: bool = False  # a corpus row: the vector goes to embeddings.parquet, not into a JSON line
    body: dict | None = None  # the validated body, its model the served one: what an engine server is sent
    adapter: str | None = None  # the LoRA adapter the row's `model` names; None: the base model
    model_name: str = ""  # what its response says it was answered by: the adapter's name or the base's
    tools: list | None = None  # a chat row's tools, for the chat template
    parsed: Any = None  # a chat row with tools: its validated request, to take the calls out of the answer
    images: int = 0  # a chat row's image parts: checked, read when admitted (nightshift.wire.images)
    media: Any = None  # the run's nightshift.wire.media.MediaPolicy, which its images are read under
    responses: dict | None = None  # a /v1/responses row's echoed fields: its answer is a Response object


def _protocol(url: str):
    from nightshift.engine.vllm_adapter import protocol_model

    return protocol_model("embedding" if url == EMBEDDINGS_URL else "chat" if url == CHAT_URL else "completion")


def _known_fields(model) -> set[str]:
    names = set(model.model_fields)
    names.update(f.alias for f in model.model_fields.values() if f.alias)
    return names


def _checked_media(url: str, body: dict, model_config, media) -> tuple[Any, int]:
    """A chat row's image parts checked under `media` (a MediaPolicy; data: URLs only if None),
    each read whole when the engine admits the row: the policy and how many images there are."""
    if url != CHAT_URL or not isinstance(body.get("messages"), list):
        return media, 0
    from nightshift.wire.images import TENANT, checked_images, image_parts

    if image_parts(body["messages"]) and model_config is not None and not model_config.is_multimodal_model:
        raise RequestRejected(
            "unsupported_content", "image_url parts need a vision-language model: this job's model reads text only"
        )
    media = media or TENANT
    return media, checked_images(body["messages"], media)


def prepare_request(
    key: int,
    custom_id: str,
    request: dict,
    models: ServedModels,
    default_sampling_params: dict,
    max_model_len: int | None = None,
    serves: str = "generate",
    model_config=None,
    tool_calling=None,
    media=None,
) -> PreparedRequest:
    """Turn one request into engine arguments, or raise RequestRejected with an OpenAI code.
    `serves` is the engine's runner: "generate" answers chat and completions, "pooling"
    embeddings; a job serves one endpoint, as an OpenAI batch does. With `tool_calling` (an
    in-process engine's), a forced tool call is decoded under its schema; without, the row's
    tools go to the engine server as they are. `media` (a nightshift.wire.media.MediaPolicy) says
    which sources a row's images may name: data: URLs only unless given."""
    url, body = request["url"], dict(request["body"])
    _check_endpoint(url, serves)
    protocol = _protocol(url)
    _check_fields(protocol, body)
    media, images = _checked_media(url, body, model_config, media)
    adapter = models.adapter_for(body.get("model"))
    if adapter is not None and url == EMBEDDINGS_URL:
        raise RequestRejected("model_not_found", f"LoRA adapter {adapter!r} serves chat and completions rows only")
    body["model"] = adapter or models.name  # an engine server serves the adapter under its name too
    parsed = _parsed(protocol, body, tool_calling if url == CHAT_URL else None)
    if url == EMBEDDINGS_URL:
        return _prepare_embedding(key, custom_id, parsed, request, max_model_len, model_config, body, models.name)
    max_tokens = _checked_max_tokens(parsed, max_model_len)
    if (
        url == CHAT_URL
        and not images
        and not any(_has_text(m.get("content")) for m in body["messages"] if isinstance(m, dict))
    ):
        raise RequestRejected("empty_prompt", "every message of the conversation is empty")
    try:
        params = parsed.to_sampling_params(max_tokens, default_sampling_params)
    except (ValueError, TypeError) as exc:
        raise RequestRejected("invalid_request", str(exc)) from None
    named = {"adapter": adapter, "model_name": adapter or models.name, "images": images, "media": media}
    if url == CHAT_URL:
        tools = body.get("tools") or None
        return PreparedRequest(key, custom_id, "chat", body["messages"], params, parsed.chat_template_kwargs,
                               body=body, tools=tools, parsed=parsed if tools else None,
                               responses=request.get("responses"), **named)  # fmt: skip
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        raise RequestRejected("invalid_request", "one prompt per batch line: a list of prompts is not supported")
    return PreparedRequest(key, custom_id, "completion", prompt, params, body=body, **named)


def _check_endpoint(url: str, serves: str) -> None:
    """A job serves one endpoint, as an OpenAI batch does."""
    wanted = "pooling" if url == EMBEDDINGS_URL else "generate"
    if wanted != serves:
        endpoints = EMBEDDINGS_URL if serves == "pooling" else f"{CHAT_URL} and {COMPLETIONS_URL}"
        raise RequestRejected(
            "unsupported_url", f"this job's model serves {endpoints}; a {url} line needs a job with another model"
        )


def _check_fields(protocol, body: dict) -> None:
    """No field Nightshift refuses by design, none the endpoint does not know."""
    for name, why in UNSUPPORTED_FIELDS.items():
        if body.get(name) not in (None, False, [], {}):
            raise RequestRejected("unsupported_parameter", f"{name}: {why}")
    unknown = sorted(set(body) - _known_fields(protocol))
    if unknown:
        raise RequestRejected("unsupported_parameter", f"unknown field(s) in body: {', '.join(unknown)}")


def _parsed(protocol, body: dict, tool_calling):
    """The body as vLLM's own request model; a forced tool call prepared under its schema."""
    from pydantic import ValidationError

    from nightshift.engine.vllm_adapter import client_errors

    try:
        parsed = protocol.model_validate(body)
        if tool_calling is not None:
            tool_calling.prepare(parsed)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise RequestRejected("invalid_request", f"{where}: {first.get('msg')}") from None
    except (ValueError, *client_errors()) as exc:  # vLLM's own checks (a tool_choice naming no tool...)
        message = str(exc).splitlines()[0]
        raise RequestRejected("invalid_request", f"{getattr(exc, 'parameter', None) or 'body'}: {message}") from None
    return parsed


def _checked_max_tokens(parsed, max_model_len: int | None) -> int | None:
    # vars(): reading the deprecated `max_tokens` attribute warns once per row
    max_tokens = getattr(parsed, "max_completion_tokens", None) or vars(parsed).get("max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise RequestRejected("invalid_request", "max_tokens must be at least 1")
    if max_tokens is not None and max_model_len is not None and max_tokens >= max_model_len:
        raise RequestRejected(
            "context_length_exceeded",
            f"max_tokens {max_tokens} does not fit the model's context of {max_model_len} tokens with any prompt",
        )
    return max_tokens


def _prepare_embedding(
    key, custom_id, parsed, request: dict, max_model_len, model_config, body, model_name: str
) -> PreparedRequest:
    inputs = parsed.input
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
        inputs = [inputs]  # one text, or one list of token ids
    if any(isinstance(i, str) and not i.strip() for i in inputs) or any(i == [] for i in inputs):
        raise RequestRejected("empty_input", "an input of the embeddings body is empty")
    truncate = parsed.truncate_prompt_tokens
    limit = None if truncate is None else max_model_len if truncate == -1 else min(truncate, max_model_len or truncate)
    prompts = []
    for item in inputs:
        if isinstance(item, str):
            prompts.append(item)
        else:
            ids = list(item)
            if limit is None and max_model_len is not None and len(ids) > max_model_len:
                raise RequestRejected(
                    "context_length_exceeded",
                    f"input of {len(ids)} tokens is longer than the model's context of {max_model_len} tokens",
                )
            prompts.append({"prompt_token_ids": ids[:limit] if limit else ids})
    try:
        params = parsed.to_pooling_params()
        if model_config is not None:
            params.verify(model_config)
    except (ValueError, TypeError) as exc:
        raise RequestRejected("invalid_request", str(exc)) from None
    return PreparedRequest(
        key,
        custom_id,
        "embedding",
        prompts,
        params,
        tokenization_kwargs={"truncation": True, "max_length": limit} if limit else None,
        encoding_format=parsed.encoding_format or "float",
        vector_only=bool(request.get("vector_only")),
        body=body,
        model_name=model_name,
    )


def duplicate_key(request: dict, prepared: PreparedRequest) -> str | None:
    """Rows with the same key get the same output: the same url and body, and an output that
    does not depend on chance (greedy, or sampled with a fixed seed; every embedding), images
    inline. None for any other row."""
    params = prepared.sampling_params
    if prepared.kind != "embedding" and params.temperature != 0 and params.seed is None:
        return None
    if prepared.images:
        from nightshift.wire.images import all_inline

        if not all_inline(prepared.prompt):  # an image named by path or URL may change under that name
            return None
    # a /v1/responses row's answer is written as a Response object: never a chat row's twin
    shape = [request["responses"]] if request.get("responses") is not None else []
    canonical = json.dumps([request["url"], request["body"], *shape], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _has_text(content) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):  # OpenAI content parts
        return any(isinstance(p, dict) and _has_text(p.get("text")) for p in content)
    return False


def batch_request_id(custom_id: str, cache_key: str) -> str:
    """Stable ids: the same row in the same job gets the same id on every re-run."""
    return hashlib.sha256(f"{cache_key}:{custom_id}".encode()).hexdigest()[:24]


def output_line(
    custom_id: str, kind: str, output, model_name: str, cache_key: str, tokenizer=None, tool_calling=None, parsed=None
) -> BatchLine:
    """An OpenAI Batch output line for one finished vLLM RequestOutput; with `tool_calling` and a
    row with tools (`parsed`), its calls taken out of the text (nightshift.engine.tool_calls)."""
    rid = batch_request_id(custom_id, cache_key)
    prompt_tokens = len(output.prompt_token_ids or [])
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    choices = []
    for choice in output.outputs:
        logprobs = _logprobs(choice, tokenizer, kind) if choice.logprobs else None
        if kind == "chat":
            message, finish_reason = {"role": "assistant", "content": choice.text}, choice.finish_reason
            if tool_calling is not None and parsed is not None:
                message, finish_reason = tool_calling.message(
                    choice.text, parsed, f"{rid}-{choice.index}", finish_reason
                )
            choices.append(
                {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
            )
        else:
            choices.append(
                {
                    "index": choice.index,
                    "text": choice.text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
            )
    body = {
        "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            **_prompt_tokens_details(output),
        },
    }
    return BatchLine.answered(custom_id, rid, body)


def _prompt_tokens_details(output) -> dict:
    """OpenAI's `prompt_tokens_details.cached_tokens`: the prompt tokens vLLM's prefix cache served
    for this request (its RequestOutput's own count); nothing where the engine did not say."""
    cached = getattr(output, "num_cached_tokens", None)
    return {} if cached is None else {"prompt_tokens_details": {"cached_tokens": int(cached)}}


class RemoteChoice:
    """One choice of an engine server's response, read as the chunk writer and the canary stage
    read a vLLM CompletionOutput: its text and why it ended (no token ids: a server does not say)."""

    def __init__(self, choice: dict, kind: str) -> None:
        message = choice.get("message") or {}
        self.index = choice.get("index", 0)
        self.text = (message.get("content") if kind == "chat" else choice.get("text")) or ""
        self.finish_reason = choice.get("finish_reason")
        self.token_ids = choice.get("token_ids")  # vLLM's server, asked for them; None elsewhere


class RemoteCompletion:
    """An engine server's answer to one row: its OpenAI response body, as the server wrote it."""

    def __init__(self, body: dict, kind: str) -> None:
        usage = body.get("usage") or {}
        choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
        self.outputs = [RemoteChoice(c, kind) for c in choices]
        self.prompt_token_ids = body.get("prompt_token_ids")
        # OpenAI's shape: the token ids a vLLM server was asked for stay out of the output line
        self.body = {
            **{k: v for k, v in body.items() if k != "prompt_token_ids"},
            "choices": [{k: v for k, v in c.items() if k != "token_ids"} for c in choices],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, **usage},
        }
        # what the server's prefix cache served (vLLM's with --enable-prompt-tokens-details); None: not said
        self.num_cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


class RemoteEmbedding:
    """An engine server's answer to one embeddings row: its vectors (asked as floats, whatever
    the row's encoding_format: the run encodes them itself) and the prompt tokens it counted."""

    def __init__(self, body: dict) -> None:
        data = sorted(body.get("data") or [], key=lambda d: d.get("index", 0))
        self.vectors = [[float(x) for x in d["embedding"]] for d in data]
        self.prompt_tokens = int((body.get("usage") or {}).get("prompt_tokens") or 0)


def remote_output_line(
    custom_id: str, kind: str, output: RemoteCompletion, model_name: str, cache_key: str
) -> BatchLine:
    """An OpenAI Batch output line for a row an engine server answered: its body as the server
    wrote it (choices, usage, logprobs), under this run's stable ids and served model name."""
    rid = batch_request_id(custom_id, cache_key)
    body = {**output.body, "id": ("chatcmpl-" if kind == "chat" else "cmpl-") + rid, "model": model_name}
    return BatchLine.answered(custom_id, rid, body)


def as_response(line: BatchLine, echo: dict) -> BatchLine:
    """A chat output line of a /v1/responses row, its body the Response object."""
    response = line.response
    return BatchLine.answered(
        line.custom_id, response.request_id, response_body(response.body, echo, response.request_id)
    )


def error_line(custom_id: str | None, error: dict, cache_key: str) -> BatchLine:
    """An errors.jsonl line: OpenAI's shape, with the input line number added."""
    rid = batch_request_id(str(custom_id) if custom_id is not None else f"line-{error.get('line')}", cache_key)
    return BatchLine.failed(custom_id, rid, error)


def _logprobs(choice, tokenizer, kind: str) -> dict | None:
    def token_text(token_id: int, lp) -> str:
        if lp.decoded_token is not None:
            return lp.decoded_token
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

    entries = []
    for token_id, position in zip(choice.token_ids, choice.logprobs):
        chosen = position.get(token_id)
        top = sorted(position.items(), key=lambda kv: kv[1].rank or 0)
        text = token_text(token_id, chosen) if chosen else str(token_id)
        entries.append(
            {
                "token": text,
                "logprob": chosen.logprob if chosen else None,
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {"token": token_text(t, lp), "logprob": lp.logprob, "bytes": list(token_text(t, lp).encode())}
                    for t, lp in top
                    if t != token_id or lp.rank is not None
                ],
            }
        )
    if kind == "chat":
        return {"content": entries}
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
    }


def embedding_vectors(outputs) -> list[list[float]]:
    """The vectors of an embedding row's engine outputs (one per input), as Python floats."""
    return [output.outputs.data.float().tolist() for output in outputs]


def embedding_output_line(
    custom_id: str,
    vectors: list[list[float]],
    prompt_tokens: int,
    encoding_format: str,
    model_name: str,
    cache_key: str,
) -> BatchLine:
    """An OpenAI Batch output line for an embeddings request: OpenAI's `list` of `embedding`s."""
    import base64

    import numpy as np

    rid = batch_request_id(custom_id, cache_key)
    data = []
    for index, vector in enumerate(vectors):
        encoded = (
            base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()
            if encoding_format == "base64"
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    body = {
        "id": f"embd-{rid}",
        "object": "list",
        "created": int(time.time()),
        "model": model_name,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
    return BatchLine.answered(custom_id, rid, body)
