"""A chat conversation without a UI: its messages, their tokens fitted into the context, JSON
files, and the turn loop that streams replies while reusing the KV cache across turns.

    session = ChatSession(llm, Conversation(system="Be brief."))
    with session.send("Hi!") as reply:
        for text in reply:
            print(text, end="")
    reply.stats.prompt_tokens      # the second message prefills only its own tokens

Each turn is rendered through the model's chat template from the whole conversation. The token
ids of the previous prompt and of the reply as generated are kept as anchors: when the new
rendering starts with their text, those exact ids are reused and only the rest is tokenized, so
the KV cache covers the history even where a fresh tokenization would split it differently.

A reply that is stopped (Ctrl-C, or the stream closed early) keeps the part already generated in
the conversation, as the user saw it; a reply stopped before its first token drops the message.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PerfxError
from .generation import Stats
from .sampler import Sampling

if TYPE_CHECKING:
    from .llm import LLM

FORMAT = "perfx-chat"
VERSION = 1


@dataclass
class Turn:
    """A user message and the assistant's reply to it."""

    user: str
    assistant: str = ""


@dataclass
class Conversation:
    """A system prompt (optional) and the turns since."""

    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def messages(self, pending: str | None = None) -> list[dict[str, str]]:
        """The chat-template messages, with `pending` as a last user message awaiting a reply."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            out.append({"role": "user", "content": turn.user})
            out.append({"role": "assistant", "content": turn.assistant})
        if pending is not None:
            out.append({"role": "user", "content": pending})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "messages": self.messages()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "conversation") -> Conversation:
        """Parse `to_dict`'s form (a bare list of messages is accepted too); PerfxError if malformed."""
        if isinstance(data, dict):
            if data.get("format", FORMAT) != FORMAT:
                raise PerfxError(f"{where}: format is {data.get('format')!r}, not {FORMAT!r}")
            if data.get("version", VERSION) != VERSION:
                raise PerfxError(f"{where}: version {data.get('version')!r} is not supported (expected {VERSION})")
            data = data.get("messages")
        if not isinstance(data, list):
            raise PerfxError(f"{where}: expected an object with a 'messages' list")
        conversation = cls()
        expected = "user"
        for i, message in enumerate(data, 1):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise PerfxError(f"{where}: message {i} must be an object with a string 'content'")
            role = message.get("role")
            if role == "system" and i == 1:
                conversation.system = message["content"]
            elif role != expected:
                raise PerfxError(f"{where}: message {i} has role {role!r} where {expected!r} was expected "
                                 "(a system message first, then user and assistant in turn)")
            elif role == "user":
                conversation.turns.append(Turn(message["content"]))
                expected = "assistant"
            else:
                conversation.turns[-1].assistant = message["content"]
                expected = "user"
        if expected == "assistant":
            raise PerfxError(f"{where}: the last user message has no reply")
        return conversation

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the conversation as JSON, atomically: the file is complete or not replaced."""
        path = Path(path).expanduser()
        text = json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise PerfxError(f"cannot save the conversation to {path}: {e.strerror or e}") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Conversation:
        """Read a conversation saved by `save`; PerfxError if the file is missing or broken."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise PerfxError(f"cannot read {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise PerfxError(f"{path} is not a saved conversation (not UTF-8 text)") from None
        except json.JSONDecodeError as e:
            raise PerfxError(f"{path} is not a saved conversation (invalid JSON at line {e.lineno} "
                             f"column {e.colno})") from None
        return cls.from_dict(data, where=str(path))


@dataclass
class Reply:
    """One reply as it streams: iterate it for pieces of text. The turn enters the conversation
    when the stream ends or is closed (`close`, or leaving a `with` block)."""

    user: str
    prompt_ids: list[int]
    dropped: list[Turn]                     # the oldest turns dropped to fit this one in
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    interrupted: bool = False
    stats: Stats | None = None
    _stream: Generator[str, None, None] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        assert self._stream is not None
        return self._stream

    def close(self) -> None:
        """Stop the reply where it is (a no-op once it has ended)."""
        if self._stream is not None:
            self._stream.close()
        if self.stats is None:              # closed before it began: nothing to keep
            self.interrupted = True

    def __enter__(self) -> Reply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def finish(self) -> str:
        """'stop', 'length' or 'cancelled' (engine.generation's finish reasons)."""
        if self.interrupted:
            return "cancelled"
        return self.stats.finish if self.stats else ""

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the cache."""
        return len(self.prompt_ids) - self.stats.prompt_tokens if self.stats else 0


@dataclass
class ChatSession:
    """The turn loop: a conversation on a model, with replies that continue its KV cache."""

    llm: LLM
    conversation: Conversation = field(default_factory=Conversation)
    sampling: Sampling = field(default_factory=Sampling)
    reserve: int | None = None              # tokens kept free for a reply (default: a quarter of ctx)
    last: Reply | None = None
    _anchors: list[tuple[str, list[int]]] = field(default_factory=list, repr=False)
    _used: tuple[str, int] = field(default=("", 0), repr=False)

    @property
    def reply_room(self) -> int:
        """How many tokens a prompt leaves free for the reply, at least."""
        room = self.reserve if self.reserve is not None else self.llm.ctx // 4
        return max(1, min(room, self.sampling.max_tokens, self.llm.ctx - 1))

    def render(self, pending: str, turns: list[Turn] | None = None) -> str:
        """The prompt text for `pending` after `turns` (default: all of them)."""
        history = Conversation(self.conversation.system, self.conversation.turns if turns is None else turns)
        return self.llm.chat_template.render(history.messages(pending), add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, keeping the ids of the previous turn where the text starts with it."""
        tokenizer = self.llm.tokenizer
        for anchor_text, anchor_ids in self._anchors:
            if text.startswith(anchor_text):
                return anchor_ids + tokenizer.encode(text[len(anchor_text):], special=True, add_bos=False)
        return tokenizer.encode(text, special=True)

    def fit(self, pending: str) -> tuple[str, list[int], int]:
        """The prompt for `pending` with as many of the latest turns as leave `reply_room` free:
        (text, ids, how many of the oldest turns it leaves out). PerfxError if even the system
        prompt and `pending` alone do not fit."""
        turns = self.conversation.turns
        limit = self.llm.ctx - self.reply_room
        for skip in range(len(turns) + 1):
            text = self.render(pending, turns[skip:])
            ids = self.encode(text)
            if len(ids) <= limit:
                return text, ids, skip
        raise PerfxError(
            f"the message is too long: with the system prompt it takes {len(ids)} tokens, and the "
            f"context of {self.llm.ctx} must keep {self.reply_room} free for the reply; shorten it or raise --ctx"
        )

    def send(self, user: str) -> Reply:
        """Start the reply to `user`. The oldest turns that no longer fit are dropped now (the
        system prompt stays) and listed in `Reply.dropped`; the reply runs as it is iterated."""
        text, ids, skip = self.fit(user)
        dropped = self.conversation.turns[:skip]
        del self.conversation.turns[:skip]
        reply = Reply(user, ids, dropped)
        reply._stream = self._stream(reply, text)
        self.last = reply
        return reply

    def _stream(self, reply: Reply, prompt_text: str) -> Generator[str, None, None]:
        gen = self.llm.stream(reply.prompt_ids, self.sampling)
        completed = False
        try:
            for piece in gen:
                if piece.token is not None:
                    reply.tokens.append(piece.token)
                if piece.text:
                    yield piece.text
            completed = True
        finally:
            gen.close()
            reply.interrupted = not completed
            reply.stats = gen.stats
            self._record(reply, prompt_text)

    def _record(self, reply: Reply, prompt_text: str) -> None:
        reply.text = self.llm.tokenizer.decode(reply.tokens)
        if reply.interrupted and not reply.tokens:
            return
        self.conversation.turns.append(Turn(reply.user, reply.text))
        self._anchors = [(prompt_text + reply.text, reply.prompt_ids + reply.tokens),
                         (prompt_text, reply.prompt_ids)]

    def reset(self) -> None:
        """Forget the turns; the system prompt stays (and so does its cached prefix)."""
        self.conversation.turns.clear()

    @property
    def context_used(self) -> int:
        """Tokens the conversation takes in the context, before the next message."""
        messages = self.conversation.messages()
        if not messages:
            return 0
        text = self.llm.chat_template.render(messages, add_generation_prompt=False)
        if text != self._used[0]:
            self._used = (text, len(self.encode(text)))
        return self._used[1]
