"""One generation path (engine.generation): the stop rules and finish reasons of a sequence, stats as
values, and the server's scheduler giving the very text, finish reason and token count of LLM.stream."""
from __future__ import annotations

import asyncio

import pytest

from perfx.engine import load_model
from perfx.engine.generation import Piece, Sequence, Stats
from perfx.engine.sampler import Sampling
from perfx.engine.serving.scheduler import Delta, Done, Request, Scheduler, SchedulerConfig

GREEDY = Sampling(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    path, *_ = tiny_gguf
    return load_model(path, device="numpy", ctx=48)


def ids(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(text, special=False)


# ---------------------------------------------------------------------- the rules of one sequence


def test_end_of_turn_stops_and_is_not_part_of_the_reply(tiny):
    tok = tiny.tokenizer
    seq = Sequence(ids(tiny, "a"), GREEDY, tok, ctx=48)
    euro = ids(tiny, "€")                                # three byte tokens: two leave a character pending
    assert len(euro) == 3
    texts = [seq.push(t).text for t in ids(tiny, "the ") + euro[:2]]
    assert "".join(texts) == "the " and texts[-2:] == ["", ""]
    end = seq.push(min(tok.eot_ids))
    assert end == Piece(None, "\ufffd") and seq.finish == "stop"   # the pending bytes come out, replaced
    assert seq.reply == ids(tiny, "the ") + euro[:2]


def test_max_tokens_and_a_full_context_are_both_length(tiny):
    tokens = ids(tiny, "in the thin hen")
    seq = Sequence(tokens[:2], GREEDY.with_(max_tokens=3), tiny.tokenizer, ctx=48)
    assert [seq.push(t).token for t in tokens[2:5]] == tokens[2:5] and seq.finish == "length"
    full = Sequence(tokens[:2], GREEDY.with_(max_tokens=100), tiny.tokenizer, ctx=4)
    for t in tokens[2:5]:
        assert full.finish is None
        full.push(t)
    assert full.finish == "length" and len(full.tokens) == 5        # ctx 4 holds the 4 tokens before the last


def test_a_stop_string_ends_the_text_before_it(tiny):
    seq = Sequence(ids(tiny, "a"), GREEDY, tiny.tokenizer, ctx=48, stop=("hen",))
    text, reply = "", ids(tiny, "the thin hen is")
    for t in reply:
        text += seq.push(t).text
        if seq.finish:
            break
    assert text == "the thin " and seq.finish == "stop" and seq.generated < len(reply)


def test_max_tokens_zero_reads_the_prompt_only(tiny):
    tiny.reset()
    prompt = ids(tiny, "the thin hen")
    gen = tiny.stream(prompt, GREEDY.with_(max_tokens=0))
    assert list(gen) == [] and gen.stats.finish == "length" and gen.stats.prompt_tokens == len(prompt)
    assert tiny.cached == prompt


# ---------------------------------------------------------------------- stats are values


def test_generate_returns_its_stats_and_leaves_the_model_alone(tiny):
    tiny.reset()
    prompt = ids(tiny, "the thin hen")
    tokens, stats = tiny.generate(prompt, GREEDY)
    again, later = tiny.generate(prompt + tokens, GREEDY.with_(max_tokens=2))
    assert isinstance(stats, Stats) and "stats" not in vars(tiny)
    assert stats.gen_tokens == len(tokens) and stats.prompt_tokens == len(prompt) and stats.finish == "length"
    assert later.gen_tokens == len(again) == 2 and later.prompt_tokens < len(prompt)   # the cache was reused


def test_a_closed_stream_is_cancelled(tiny):
    gen = tiny.stream(ids(tiny, "the thin hen"), GREEDY)
    first = next(iter(gen))
    gen.close()
    assert gen.stats.finish == "cancelled" and gen.tokens == [first.token] and gen.stats.gen_tokens == 1
    unstarted = tiny.stream(ids(tiny, "the"), GREEDY)
    unstarted.close()
    assert unstarted.stats.finish == "cancelled"


# ---------------------------------------------------------------------- the server's scheduler follows the same rules


def served(llm, requests: list[Request]) -> list[tuple[str, Done]]:
    """Each request's text and Done, all of them run at once through a scheduler on llm."""
    scheduler = Scheduler(llm, SchedulerConfig(max_batch=4, block_size=8))

    async def one(request):
        text, done = "", None
        async for event in scheduler.submit(request).events():
            if isinstance(event, Delta):
                text += event.text
            else:
                done = event
        return text, done

    async def all_of_them():
        return await asyncio.gather(*(one(r) for r in requests))

    scheduler.start()
    try:
        return asyncio.run(all_of_them())
    finally:
        scheduler.stop()


def alone(llm, request: Request) -> tuple[str, Stats]:
    llm.reset()
    gen = llm.stream(request.prompt, request.sampling, request.stop)
    return "".join(piece.text for piece in gen), gen.stats


def test_served_replies_equal_stream_with_the_same_finish(tiny):
    prompts = [ids(tiny, text) for text in ("the thin hen", "in the", "hen in the thin")]
    text, _ = alone(tiny, Request(prompts[0], GREEDY.with_(max_tokens=30)))
    stop = text[8:10]                        # a stop string the greedy reply is known to contain
    assert stop and text.find(stop) < len(text) - len(stop)
    requests = [Request(prompts[0], GREEDY.with_(max_tokens=30), (stop,)),             # stop: a stop string
                Request(prompts[1], GREEDY.with_(max_tokens=5)),                       # length: max_tokens
                Request(prompts[2], GREEDY.with_(max_tokens=100)),                     # length: the context
                Request(prompts[1], Sampling(temperature=0.8, seed=3, max_tokens=9))]  # sampled
    expected = [alone(tiny, r) for r in requests]
    assert expected[0][1].finish == "stop" and expected[0][0] == text[:text.find(stop)]
    assert [stats.finish for _, stats in expected[1:3]] == ["length", "length"]
    assert len(prompts[2]) + expected[2][1].gen_tokens == 48 + 1           # the last token needs no position
    got = served(tiny, requests)
    for (text, stats), (served_text, done), request in zip(expected, got, requests):
        assert served_text == text
        assert (done.finish, done.completion_tokens, done.prompt_tokens) == \
            (stats.finish, stats.gen_tokens, len(request.prompt))


def test_a_failed_step_ends_with_error(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(tiny.transformer, "next_token", broken)
    gen = tiny.stream(ids(tiny, "the thin hen"), GREEDY)
    with pytest.raises(RuntimeError):
        list(gen)
    assert gen.stats.finish == "error"
