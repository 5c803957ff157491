"""Generated harmony tokens, one at a time, into parts (reasoning, content, tool calls) and deltas.

The parser never raises: whatever the model emits becomes a well-formed sequence of parts. A
header that does not parse, or one that runs on for more than ``MAX_HEADER_TOKENS``, and any
text outside a message, become plain content, so that a random model's tokens still give a
valid response.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Iterable, Literal

import tiktoken

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok

PartKind = Literal["reasoning", "content", "tool_call"]
MAX_HEADER_TOKENS = 48
_MESSAGE_ENDS = frozenset({tok.END, tok.RETURN, tok.CALL})
FUNCTIONS = "functions."


@dataclass
class Part:
    """One harmony message as the APIs see it: chain of thought, visible text, or a function call."""

    kind: PartKind
    channel: str | None = None
    name: str | None = None  # a tool call's function name
    text: str = ""
    done: bool = False
    end_token: int | None = None  # <|end|>, <|call|>, <|return|> or None (cut off)


@dataclass(frozen=True)
class Event:
    """``begin`` / ``delta`` (with ``text``) / ``end`` of the part at ``index``."""

    type: Literal["begin", "delta", "end"]
    index: int
    part: Part
    text: str = ""


@dataclass
class StopMatcher:
    """Finds stop strings in streamed text, holding back a tail that may begin one."""

    stops: tuple[str, ...] = ()
    held: str = ""
    hit: bool = False

    def feed(self, text: str) -> str:
        """The text that is safe to emit now; sets ``hit`` and drops the rest at a stop string."""
        if not self.stops or self.hit:
            return "" if self.hit else text
        buffer = self.held + text
        found = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self.held = True, ""
            return buffer[:min(found)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if buffer.endswith(s[:k])), default=0)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """The held-back tail (no stop string can begin in it any more)."""
        held, self.held = self.held, ""
        return held


def _kind(message: harmony.Message) -> tuple[PartKind, str | None]:
    """A parsed header's part kind (and function name): vLLM's mapping of harmony to the APIs."""
    recipient = message.recipient or ""
    if message.role == "assistant" and recipient.startswith(FUNCTIONS) and len(recipient) > len(FUNCTIONS):
        return "tool_call", recipient[len(FUNCTIONS):]
    if message.role == "assistant" and message.channel == "analysis" and not recipient:
        return "reasoning", None
    return "content", None


@dataclass
class HarmonyStream:
    """Feeds on the tokens sampled after a prompt ending in ``<|start|>assistant``; yields events."""

    encoding: tiktoken.Encoding
    stop_strings: tuple[str, ...] = ()
    parts: list[Part] = field(default_factory=list)
    reasoning_tokens: int = 0
    tokens_seen: int = 0
    stopped: bool = False  # a stop string was found in the content: nothing more is read
    finished: bool = False  # <|endoftext|>, a stop string, or close()
    _state: Literal["header", "content", "between"] = "header"
    _header: list[int] = field(default_factory=list)
    _role: str | None = "assistant"
    _decoder: codecs.IncrementalDecoder | None = None
    _matcher: StopMatcher = field(init=False)

    def __post_init__(self) -> None:
        self._matcher = StopMatcher(tuple(s for s in self.stop_strings if s))

    @property
    def current(self) -> Part | None:
        """The part being read, if any."""
        return self.parts[-1] if self.parts and not self.parts[-1].done else None

    def feed(self, tokens: Iterable[int]) -> list[Event]:
        """Reads tokens; returns the events they complete."""
        events: list[Event] = []
        for token in tokens:
            if self.finished:
                break
            self.tokens_seen += 1
            self._token(int(token), events)
        return events

    def close(self) -> list[Event]:
        """Ends the stream: a header cut off becomes content, an open part ends."""
        events: list[Event] = []
        if not self.finished:
            if self._state == "header" and self._header:
                self._plain_header(events, keep_open=False)
            elif self.current is not None:
                self._end(None, events)
            self.finished = True
        return events

    # ------------------------------------------------------------------ states

    def _token(self, token: int, events: list[Event]) -> None:
        if token == tok.ENDOFTEXT:
            events.extend(self.close())
        elif self._state == "header":
            self._header_token(token, events)
        elif self._state == "content":
            if token in _MESSAGE_ENDS:
                self._end(token, events)
            elif token == tok.START:  # a new message without <|end|>: end this one
                self._end(None, events)
                self._state, self._role = "header", None
            else:
                self._delta(self.encoding.decode_single_token_bytes(token), events, counted=True)
        elif token == tok.START:
            self._state, self._role, self._header = "header", None, []
        elif token not in _MESSAGE_ENDS:  # text outside any message: plain content
            self._begin("content", None, None, events)
            self._delta(self.encoding.decode_single_token_bytes(token), events, counted=True)

    def _header_token(self, token: int, events: list[Event]) -> None:
        if token == tok.MESSAGE:
            text = self.encoding.decode(self._header)
            try:
                message = harmony.parse_header(text, self._role)
            except harmony.HarmonyParseError:
                self._header.append(token)
                self._plain_header(events, keep_open=True)
                return
            kind, name = _kind(message)
            self._begin(kind, message.channel, name, events, header_tokens=len(self._header) + 1)
            self._header = []
        elif token == tok.START:
            if self._header:
                self._plain_header(events, keep_open=False)
            self._state, self._role, self._header = "header", None, []
        elif token in _MESSAGE_ENDS:
            if self._header:
                self._plain_header(events, keep_open=False)
            self._state, self._header = "between", []
        else:
            self._header.append(token)
            if len(self._header) > MAX_HEADER_TOKENS or not self._may_be_header():
                self._plain_header(events, keep_open=True)

    def _may_be_header(self) -> bool:
        """Whether the tokens after a known role can still begin a header (`<|channel|>`,
        `<|constrain|>` or ` to=`); if not they are content at once, not held back for
        MAX_HEADER_TOKENS tokens (a stream without headers would arrive in one late burst)."""
        if self._role is None or self._header[0] in (tok.CHANNEL, tok.CONSTRAIN):
            return True
        text = self.encoding.decode(self._header).lstrip()
        return text.startswith("to=") or "to=".startswith(text)

    def _plain_header(self, events: list[Event], keep_open: bool) -> None:
        """A header that is not one: its text becomes content (left open to take what follows)."""
        header, self._header = self._header, []
        self._begin("content", None, None, events)
        for token in header:
            self._delta(self.encoding.decode_single_token_bytes(token), events, counted=False)
        if not keep_open:
            self._end(None, events)
            self._state = "between"

    # ------------------------------------------------------------------ parts

    def _begin(self, kind: PartKind, channel: str | None, name: str | None, events: list[Event],
               header_tokens: int = 0) -> None:
        part = Part(kind, channel, name)
        self.parts.append(part)
        self._state = "content"
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if kind == "reasoning":
            self.reasoning_tokens += header_tokens
        events.append(Event("begin", len(self.parts) - 1, part))

    def _delta(self, data: bytes, events: list[Event], counted: bool) -> None:
        part = self.parts[-1]
        if counted and part.kind == "reasoning":
            self.reasoning_tokens += 1
        assert self._decoder is not None
        self._emit(part, self._decoder.decode(data), events)

    def _emit(self, part: Part, text: str, events: list[Event]) -> None:
        if part.kind == "content":
            text = self._matcher.feed(text)
        if text:
            part.text += text
            events.append(Event("delta", len(self.parts) - 1, part, text))
        if self._matcher.hit:
            self.stopped = True
            self._finish_part(None, events)
            self.finished = True

    def _end(self, token: int | None, events: list[Event]) -> None:
        part = self.parts[-1]
        if part.kind == "reasoning" and token is not None:
            self.reasoning_tokens += 1
        assert self._decoder is not None
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self._emit(part, tail, events)
        if self.finished:
            return
        if part.kind == "content" and (held := self._matcher.flush()):
            part.text += held
            events.append(Event("delta", len(self.parts) - 1, part, held))
        self._finish_part(token, events)
        self._state = "between"

    def _finish_part(self, token: int | None, events: list[Event]) -> None:
        part = self.parts[-1]
        if not part.done:
            part.done, part.end_token = True, token
            events.append(Event("end", len(self.parts) - 1, part))


def completion_parts(encoding: tiktoken.Encoding, tokens: Iterable[int],
                     stop_strings: tuple[str, ...] = ()) -> HarmonyStream:
    """The whole completion parsed at once (what a non-streamed reply is built from)."""
    stream = HarmonyStream(encoding, stop_strings)
    stream.feed(tokens)
    stream.close()
    return stream


def finish_reason(stream: HarmonyStream, engine_reason: str | None) -> Literal["stop", "length", "tool_calls"]:
    """A stop string or stop token -> stop, the token budget -> length, else a call made -> tool_calls."""
    if stream.stopped:
        return "stop"
    if engine_reason == "length":
        return "length"
    return "tool_calls" if any(p.kind == "tool_call" for p in stream.parts) else "stop"
