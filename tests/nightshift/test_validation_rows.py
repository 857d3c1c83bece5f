"""Specification of how validation picks its rows: which check may judge which row, and a
reproducible uniform sample of the run, read as a stream, holding only the sample however many
rows the run has; and of the oracle's plausibility score for sampled rows."""

import pytest

from nightshift.validation.rows import Pools, _Sample, roles

pytestmark = pytest.mark.fast


def sample_of(stream, size: int) -> list:
    sample = _Sample(size)
    for item in stream:
        if (slot := sample.slot()) is not None:
            sample.items[slot] = item
    return sample.chosen()


def test_the_same_run_gives_the_same_sample():
    assert sample_of(range(100_000), 8) == sample_of(range(100_000), 8)


def test_a_short_run_is_sampled_whole_in_random_order():
    chosen = sample_of(range(5), 8)
    assert sorted(chosen) == [0, 1, 2, 3, 4]
    assert chosen != [0, 1, 2, 3, 4]


def test_a_long_run_is_sampled_from_end_to_end_not_from_its_first_rows():
    chosen = sample_of(range(100_000), 200)
    assert len(set(chosen)) == 200
    assert sum(item < 50_000 for item in chosen) in range(70, 131)  # half, within a wide margin
    assert max(chosen) > 90_000


def test_an_item_is_only_built_when_chosen():
    sample, built = _Sample(10), 0
    for item in range(100_000):
        if (slot := sample.slot()) is not None:
            sample.items[slot] = item
            built += 1
    assert built < 200  # ~ size × (1 + ln(stream / size)) = 93, not 100,000


def chat(**body) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], **body}


@pytest.mark.parametrize(
    ("body", "checks"),
    [
        (chat(temperature=0), {"oracle", "determinism", "settings_gate"}),
        ({"prompt": "Once", "temperature": 0}, {"oracle", "determinism", "settings_gate"}),
        (chat(temperature=0, tools=[{"type": "function"}], tool_choice="required"), {"determinism"}),
        (chat(temperature=0, response_format={"type": "json_object"}), {"determinism"}),
        (chat(temperature=0, repetition_penalty=1.3), {"determinism"}),
        (chat(temperature=0, repetition_penalty=1.0, presence_penalty=0), {"oracle", "determinism", "settings_gate"}),
        (chat(temperature=0.8, seed=7), {"determinism"}),
        (chat(temperature=0.8), {"oracle"}),  # scored for plausibility
        (chat(temperature=0.8, top_p=0.9), {"oracle"}),
        (chat(temperature=0.8, logit_bias={"5": 10}), set()),
        (chat(), set()),  # the model's default temperature: unknown here
        (chat(temperature=0, n=2), set()),
        (
            chat(
                temperature=0,
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}],
                    }
                ],
            ),
            {"determinism"},
        ),
    ],
)
def test_each_check_judges_the_rows_it_can(body, checks):
    assert roles(body, "messages" in body) == checks


def test_a_sampled_rows_tokens_are_plausible_when_drawn_from_the_reference_and_not_when_from_another_model():
    import torch

    from nightshift.validation.oracle import excess_surprisal

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 500, generator=generator) * 3
    logprobs = torch.log_softmax(logits, dim=-1)
    own = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1).tolist()
    other = torch.multinomial(torch.log_softmax(torch.randn(64, 500, generator=generator) * 3, -1).exp(), 1,
                              generator=generator).squeeze(1).tolist()  # fmt: skip
    assert abs(excess_surprisal(logprobs, own)) < 1.0
    assert excess_surprisal(logprobs, other) > 2.0  # the oracle's default tolerance, in nats per token


def test_sampled_rows_take_no_place_of_the_greedy_rows_the_settings_gate_scores():
    """The gate's rows are a sample of their own: a run of mostly sampled rows still gates its few
    greedy ones, rather than saying it has none."""
    pools = Pools(3)
    for i in range(200):
        body = chat(temperature=0.7) if i % 50 else chat(temperature=0)
        pools.offer({"custom_id": f"r{i}", "adapter": None, "body": body}, roles(body, chat=True))
    greedy = {f"r{i}" for i in range(0, 200, 50)}
    assert {row["custom_id"] for row in pools.of("settings_gate", 3)} <= greedy
    assert len(pools.of("settings_gate", 3)) == 3
