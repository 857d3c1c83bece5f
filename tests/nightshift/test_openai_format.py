"""Specification of the OpenAI Batch wire format, without an engine: a body means here what it
means to vLLM's server; what a batch cannot honour is refused per row with an OpenAI code."""

import pytest

from nightshift.wire.openai_format import RequestRejected, ServedModels, duplicate_key, prepare_request

pytestmark = pytest.mark.fast

CHAT = "/v1/chat/completions"

TINY = ServedModels("tiny", frozenset({"tiny"}))
MINILM = ServedModels("minilm", frozenset({"minilm"}))


def prepare(body: dict, url: str = CHAT, max_model_len: int = 2048):
    request = {"url": url, "body": body}
    return prepare_request(0, "row-0", request, TINY, {}, max_model_len), request


def chat(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hello"}], **fields}


def rejected(body: dict, url: str = CHAT) -> str:
    with pytest.raises(RequestRejected) as refusal:
        prepare(body, url)
    return refusal.value.code


def test_sampling_fields_map_onto_vllms_sampling_params():
    ready, _ = prepare(chat(max_completion_tokens=7, temperature=0.3, top_p=0.9, seed=4, stop=["\n"], n=2))
    params = ready.sampling_params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop, params.n) == (
        7,
        0.3,
        0.9,
        4,
        ["\n"],
        2,
    )
    assert ready.kind == "chat" and ready.prompt == [{"role": "user", "content": "Hello"}]


def test_a_completion_body_keeps_its_prompt():
    ready, _ = prepare({"prompt": "Once upon", "max_tokens": 3}, url="/v1/completions")
    assert ready.kind == "completion" and ready.prompt == "Once upon" and ready.sampling_params.max_tokens == 3


@pytest.mark.parametrize(
    "body, code",
    [
        (chat(stream=True), "unsupported_parameter"),
        (chat(functions=[{"name": "f", "parameters": {}}]), "unsupported_parameter"),
        (chat(frobnicate=1), "unsupported_parameter"),
        (chat(model="gpt-4o-mini"), "model_not_found"),
        (chat(temperature="hot"), "invalid_request"),
        (chat(max_tokens=0), "invalid_request"),
        (chat(max_tokens=4096), "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "   "}]}, "empty_prompt"),
    ],
)
def test_what_a_batch_cannot_honour_is_refused_with_an_openai_code(body, code):
    assert rejected(body) == code


def test_only_rows_whose_output_is_not_left_to_chance_share_a_duplicate_key():
    greedy, greedy_request = prepare(chat(temperature=0, max_tokens=5))
    twin, twin_request = prepare(chat(max_tokens=5, temperature=0))  # same body, other key order
    seeded, seeded_request = prepare(chat(temperature=0.8, seed=3))
    sampled, sampled_request = prepare(chat(temperature=0.8))
    longer, longer_request = prepare(chat(temperature=0, max_tokens=6))
    assert duplicate_key(greedy_request, greedy) == duplicate_key(twin_request, twin) is not None
    assert duplicate_key(seeded_request, seeded) is not None
    assert duplicate_key(sampled_request, sampled) is None
    assert duplicate_key(longer_request, longer) != duplicate_key(greedy_request, greedy)


EMBEDDINGS = "/v1/embeddings"


def embed(body: dict, max_model_len: int = 512):
    request = {"url": EMBEDDINGS, "body": body}
    return prepare_request(0, "row-0", request, MINILM, {}, max_model_len, "pooling")


def test_an_embeddings_body_becomes_one_engine_input_per_text_or_token_list():
    one = embed({"input": "a text"})
    assert one.kind == "embedding" and one.prompt == ["a text"] and one.encoding_format == "float"
    assert one.tokenization_kwargs is None  # no truncation asked: too long is an error, not a cut
    several = embed({"input": ["one", "two"], "encoding_format": "base64"})
    assert several.prompt == ["one", "two"] and several.encoding_format == "base64"
    assert embed({"input": [1, 2, 3]}).prompt == [{"prompt_token_ids": [1, 2, 3]}]
    assert embed({"input": [[1, 2], [3]]}).prompt == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    cut = embed({"input": list(range(600)), "truncate_prompt_tokens": -1})
    assert cut.prompt == [{"prompt_token_ids": list(range(512))}] and cut.tokenization_kwargs["max_length"] == 512
    assert embed({"input": "x"}).sampling_params.task == "embed"
    assert duplicate_key({"url": EMBEDDINGS, "body": {"input": "x"}}, embed({"input": "x"})) is not None


def test_an_embedding_job_refuses_other_endpoints_and_bad_inputs_per_row():
    def code(body: dict, url: str = EMBEDDINGS, serves: str = "pooling") -> str:
        with pytest.raises(RequestRejected) as refusal:
            prepare_request(0, "r", {"url": url, "body": body}, MINILM, {}, 512, serves)
        return refusal.value.code

    assert code(chat(), url=CHAT) == "unsupported_url"
    assert code({"input": "text"}, serves="generate") == "unsupported_url"
    assert code({"input": list(range(513))}) == "context_length_exceeded"
    assert code({"input": ["fine", " "]}) == "empty_input"
    assert code({"input": "x", "stream": True}) == "unsupported_parameter"
    assert code({"input": "x", "temperature": 0}) == "unsupported_parameter"
