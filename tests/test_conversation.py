"""Conversations without a UI: JSON files, fitting the context, and turns that reuse the KV cache."""
from __future__ import annotations

import json

import pytest

from perfx.engine import load_model
from perfx.engine.text.chat_template import ChatTemplate
from perfx.engine.conversation import ChatSession, Conversation, Turn
from perfx.engine.errors import PerfxError
from perfx.engine.sampler import Sampling
from tests.conftest import TinySpec, write_tiny_gguf

GREEDY = Sampling(temperature=0, max_tokens=6)


@pytest.fixture
def tiny_llm(tiny_gguf):
    path, *_ = tiny_gguf
    return load_model(path, device="numpy")


def reply_to(session: ChatSession, text: str):
    with session.send(text) as reply:
        for _ in reply:
            pass
    return reply


# ---------------------------------------------------------------------- the conversation and its file


def sample_conversation() -> Conversation:
    return Conversation("Be brief.", [Turn("Hi!", "Hello."), Turn("2+2?", "4\n")])


def test_messages_put_the_system_prompt_first():
    messages = sample_conversation().messages(pending="And 3+3?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"] == "And 3+3?"
    assert Conversation(turns=[Turn("a", "b")]).messages()[0] == {"role": "user", "content": "a"}


def test_save_and_load_round_trip(tmp_path):
    path = sample_conversation().save(tmp_path / "chat.json")
    assert json.loads(path.read_text())["format"] == "perfx-chat"
    assert Conversation.load(path) == sample_conversation()
    assert list(tmp_path.iterdir()) == [path]          # no temporary file left behind


def test_load_accepts_a_bare_message_list(tmp_path):
    path = tmp_path / "openai.json"
    path.write_text(json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]))
    assert Conversation.load(path) == Conversation(None, [Turn("Hi", "Yo")])


def test_save_is_atomic(tmp_path, monkeypatch):
    path = sample_conversation().save(tmp_path / "chat.json")
    before = path.read_text()

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("perfx.engine.conversation.os.replace", fail)
    with pytest.raises(PerfxError, match="No space left"):
        Conversation(turns=[Turn("new", "text")]).save(path)
    assert path.read_text() == before
    assert list(tmp_path.iterdir()) == [path]


def test_save_into_a_missing_directory(tmp_path):
    with pytest.raises(PerfxError, match="cannot save the conversation"):
        sample_conversation().save(tmp_path / "nowhere" / "chat.json")


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON"),
    ('"a string"', "'messages' list"),
    ('{"format": "other", "messages": []}', "format"),
    ('{"version": 9, "messages": []}', "version 9"),
    ('{"messages": [{"role": "user"}]}', "string 'content'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "role 'user'"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no reply"),
])
def test_broken_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(PerfxError, match=message) as e:
        Conversation.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(PerfxError, match="cannot read"):
        Conversation.load(tmp_path / "absent.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PerfxError, match="not a saved conversation"):
        Conversation.load(tmp_path / "bin.json")


# ---------------------------------------------------------------------- turns on the tiny model


def test_second_turn_prefills_only_the_new_message(tiny_llm):
    session = ChatSession(tiny_llm, Conversation("sys"), GREEDY)
    first = reply_to(session, "the thin hen")
    assert first.tokens and session.conversation.turns == [Turn("the thin hen", first.text)]
    assert tiny_llm.cached[: len(first.prompt_ids)] == first.prompt_ids

    second = reply_to(session, "in the")
    new = tiny_llm.tokenizer.encode("<|im_end|>\n<|im_start|>user\nin the<|im_end|>\n<|im_start|>assistant\n")
    uncached = first.finish == "length"            # a reply cut at max_tokens leaves its last token uncomputed
    assert second.prompt_ids == first.prompt_ids + first.tokens + new
    assert second.stats.prompt_tokens == len(new) + uncached
    assert len(session.conversation.turns) == 2


def test_reuse_survives_a_template_that_rewrites_replies(tiny_llm):
    """A template may render an earlier reply differently from the tokens generated (here: trimmed
    and upper-cased); the previous prompt is still reused, and only that reply is computed again."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] | trim | upper if m['role'] == 'assistant' else m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tiny_llm.chat_template = ChatTemplate(template)
    session = ChatSession(tiny_llm, sampling=Sampling(temperature=0, max_tokens=8))
    first = reply_to(session, "the")
    second = reply_to(session, "hen")
    assert second.reused_tokens >= len(first.prompt_ids)
    assert second.prompt_ids[: len(first.prompt_ids)] == first.prompt_ids


def test_oldest_turns_are_dropped_and_the_system_prompt_stays(tmp_path):
    path = tmp_path / "small.gguf"
    write_tiny_gguf(path, TinySpec(ctx_len=96))
    llm = load_model(path, device="numpy")
    session = ChatSession(llm, Conversation("SYSTEM"), Sampling(temperature=0, max_tokens=4))
    dropped = []
    for i in range(12):
        reply = reply_to(session, f"message {i} the thin hen")
        dropped += reply.dropped
        assert len(reply.prompt_ids) + session.reply_room <= llm.ctx
    assert dropped and dropped[0].user == "message 0 the thin hen"
    assert session.conversation.system == "SYSTEM"
    assert session.render("next").startswith("<|im_start|>system\nSYSTEM<|im_end|>\n<|im_start|>user\nmessage")
    assert len(session.conversation.turns) + len(dropped) == 12


def test_a_reply_that_fills_the_context_makes_room_next_turn(tmp_path):
    path = tmp_path / "small.gguf"
    write_tiny_gguf(path, TinySpec(ctx_len=96))
    llm = load_model(path, device="numpy")
    session = ChatSession(llm, Conversation("SYSTEM"), Sampling(temperature=0, max_tokens=1000))
    first = reply_to(session, "the thin hen")
    assert first.finish == "length" and len(first.tokens) < 1000 and len(llm.cached) == llm.ctx
    second = reply_to(session, "in the")
    assert second.dropped == [Turn("the thin hen", first.text)]
    assert session.conversation.turns == [Turn("in the", second.text)]


def test_a_message_too_long_for_the_context_changes_nothing(tiny_llm):
    session = ChatSession(tiny_llm, Conversation("sys"), GREEDY)
    reply_to(session, "hi")
    before = list(session.conversation.turns)
    with pytest.raises(PerfxError, match="too long"):
        session.send("the " * 200)
    assert session.conversation.turns == before


def test_a_stopped_reply_keeps_what_was_shown(tiny_llm):
    session = ChatSession(tiny_llm, sampling=Sampling(temperature=0, max_tokens=20))
    reply = session.send("the thin")
    with reply:
        shown = next(iter(reply))
    assert reply.interrupted and reply.finish == "cancelled"
    assert session.conversation.turns == [Turn("the thin", reply.text)]
    assert reply.text.startswith(shown)
    following = reply_to(session, "hen")                 # the cache is consistent: the next turn reuses it
    assert following.reused_tokens >= len(reply.prompt_ids)


def test_ctrl_c_inside_generation(tiny_llm, monkeypatch):
    session = ChatSession(tiny_llm, sampling=Sampling(temperature=0, max_tokens=20))
    real = tiny_llm.transformer.next_token
    calls = []

    def interrupted_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_llm.transformer, "next_token", interrupted_after_three)
    reply = session.send("the thin")
    with pytest.raises(KeyboardInterrupt):
        for _ in reply:
            pass
    assert reply.interrupted and len(reply.tokens) == 3
    assert session.conversation.turns == [Turn("the thin", reply.text)]
    assert tiny_llm.cached == reply.prompt_ids + reply.tokens[:-1]
    monkeypatch.undo()
    assert reply_to(session, "hen").reused_tokens == len(reply.prompt_ids) + 2


def test_a_reply_closed_before_it_began_drops_the_message(tiny_llm):
    session = ChatSession(tiny_llm, sampling=GREEDY)
    with session.send("the thin") as reply:
        pass
    assert reply.interrupted and reply.finish == "cancelled" and session.conversation.turns == []


def test_ctrl_c_before_the_first_token_drops_the_message(tiny_llm, monkeypatch):
    session = ChatSession(tiny_llm, sampling=GREEDY)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_llm.transformer, "next_token", interrupted)
    reply = session.send("the thin")
    with pytest.raises(KeyboardInterrupt):
        list(reply)
    assert reply.interrupted and not reply.tokens and session.conversation.turns == []


# ---------------------------------------------------------------------- the real model


@pytest.mark.model
def test_second_turn_prefill_is_proportional_to_the_new_message(default_model_path, capsys):
    """Turn 2 prefills the new message only: its token count is the message plus the template's
    few markers, and its time stays flat as the history grows, unlike a prefill from a cold cache."""
    question = "Now summarise that in one sentence, please."
    seconds = {}                                           # label -> (model, turn 2's reply)
    for label, sentences in (("short", 1), ("long", 30)):
        llm = load_model(default_model_path, device="numpy", ctx=1024)
        tok = llm.tokenizer
        markers = len(tok.encode("<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"))
        session = ChatSession(llm, sampling=Sampling(temperature=0, max_tokens=8))
        reply_to(session, "Read this: " + "The quick brown fox jumps over the lazy dog. " * sentences)
        second = reply_to(session, question)
        assert second.stats.prompt_tokens <= len(tok.encode(question)) + markers + 1
        seconds[label] = (llm, second)
    runs = {label: [] for label in seconds}                # timed in turn, so a busy machine slows both alike
    for _ in range(3):
        for label, (llm, second) in seconds.items():
            runs[label].append((_prefill_s(llm, second.prompt_ids, 0),
                                _prefill_s(llm, second.prompt_ids, second.reused_tokens)))
    measured = {}
    for label, (_, second) in seconds.items():
        cold, warm = min(cold for cold, _ in runs[label]), min(warm for _, warm in runs[label])
        measured[label] = (len(second.prompt_ids), second.stats.prompt_tokens, warm, cold)
    with capsys.disabled():
        for label, (total, new, warm, cold) in measured.items():
            print(f"\n  {label} history: turn 2 prompt {total} tokens, {new} prefilled in {warm * 1e3:.0f} ms; "
                  f"all {total} from a cold cache in {cold * 1e3:.0f} ms")
    (_, _, warm_short, _), (total_long, _, warm_long, cold_long) = measured["short"], measured["long"]
    assert total_long > 300
    assert warm_long < cold_long / 2                       # far less than prefilling the history (~1/10 unloaded)
    assert warm_long < 3 * warm_short + 0.05               # about the same whatever the history


def _prefill_s(llm, ids: list[int], cached: int) -> float:
    """Prefill time of `ids` with their first `cached` tokens' keys and values already in the cache."""
    llm.cached = llm.cached[:cached]
    return llm.generate(ids, Sampling(temperature=0, max_tokens=1))[1].prompt_s
