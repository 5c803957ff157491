"""Chat Completions: the request as a harmony prompt, parsed parts as a reply or as stream chunks."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

import tiktoken
from pydantic import BaseModel, ConfigDict, Field

from gptoss_jax import harmony
from gptoss_jax.serve import prompting
from gptoss_jax.serve.errors import bad_request
from gptoss_jax.serve.streaming import Event, HarmonyStream, Part


class RequestModel(BaseModel):
    """A request body's model: unknown fields are ignored, never refused."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class SamplingFields(RequestModel):
    """The sampling fields Chat Completions and Responses share (top_k and min_p are extensions)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None


class ContentPart(RequestModel):
    type: str
    text: str | None = None


class FunctionCall(RequestModel):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(RequestModel):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning: str | None = None  # the raw chain of thought of an earlier turn (vLLM, the cookbook)
    reasoning_content: str | None = None  # the older name for it


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(RequestModel):
    include_usage: bool = False


class JSONSchemaFormat(RequestModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatRequest(SamplingFields):
    """The fields of ``POST /v1/chat/completions`` this server reads (the rest are ignored)."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None


@dataclass(frozen=True)
class Prepared:
    """A chat request made ready for the engine."""

    prompt: list[int]
    settings: dict[str, Any]
    stop_strings: tuple[str, ...]
    parallel_tool_calls: bool


def _text(content: str | list[ContentPart] | None, param: str) -> str | None:
    """A message's text: a string, or its text parts joined (other parts are refused)."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in ("text", "input_text", "output_text") or part.text is None:
            raise bad_request(f"only text content is supported, got a part of type {part.type!r}",
                              f"{param}[{j}].type", "unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def _arguments(arguments: str | dict[str, Any]) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def conversation(messages: list[ChatMessage]) -> tuple[list[str], list[harmony.Message]]:
    """(developer instructions, harmony history): system and developer messages become instructions,
    an assistant's reasoning analysis, its tool calls ``functions.NAME`` calls, a tool's reply a
    ``functions.NAME`` message (the name found through ``tool_call_id``)."""
    instructions: list[str] = []
    history: list[harmony.Message] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        text = _text(message.content, f"messages[{i}].content")
        if message.role in ("system", "developer"):
            instructions.append(text or "")
        elif message.role == "user":
            history.append(harmony.Message("user", text or ""))
        elif message.role == "assistant":
            reasoning = message.reasoning or message.reasoning_content
            if reasoning:
                history.append(harmony.Message("assistant", reasoning, channel="analysis"))
            if message.tool_calls:
                if text:  # words said before the calls: a preamble on commentary
                    history.append(harmony.Message("assistant", text, channel="commentary"))
                for call in message.tool_calls:
                    if call.id:
                        call_names[call.id] = call.function.name
                    history.append(prompting.call_message(call.function.name, _arguments(call.function.arguments)))
            elif text is not None:
                history.append(harmony.Message("assistant", text, channel="final"))
        else:
            name = call_names.get(message.tool_call_id or "") or message.name
            if name is None:
                raise bad_request(f"messages[{i}] answers tool call {message.tool_call_id!r}, which no earlier "
                                  "assistant message made", f"messages[{i}].tool_call_id")
            history.append(harmony.tool_result(f"functions.{name}", text or ""))
    return instructions, history


def prepare(request: ChatRequest, encoding: tiktoken.Encoding, max_context: int) -> Prepared:
    """The harmony prompt and engine settings for a request; bad fields raise a 400 naming them."""
    if request.n != 1:
        raise bad_request(f"'n' must be 1 (one choice per request), got {request.n}", "n")
    if request.logprobs:
        raise bad_request("'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")
    instructions, history = conversation(request.messages)
    fmt = request.response_format
    if fmt is not None:
        schema = fmt.json_schema or JSONSchemaFormat()
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise bad_request("'response_format' of type json_schema needs 'json_schema'", "response_format.json_schema")
        section = prompting.response_format_text(fmt.type, schema.name, schema.schema_, schema.description)
        if section:
            instructions.append(section)
    tools = [harmony.ToolDescription(t.function.name, t.function.description or "", t.function.parameters)
             for t in request.tools or ()]
    choice = request.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    chosen = prompting.tool_choice(tools, choice, "tool_choice", named)
    effort = prompting.reasoning_effort(request.reasoning_effort, "reasoning_effort")
    prompt = prompting.render_prompt(encoding, effort=effort, instructions=instructions, tools=chosen.tools,
                                     history=history)
    max_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    settings = prompting.settings_kwargs(
        max_tokens=request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
        max_context=max_context, prompt_length=len(prompt), temperature=request.temperature, top_p=request.top_p,
        top_k=request.top_k, min_p=request.min_p, seed=request.seed,
        forced=prompting.forced_tokens(encoding, chosen), max_param=max_param)
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stops) > 4 or any(not s for s in stops):
        raise bad_request("'stop' takes up to 4 non-empty strings", "stop")
    return Prepared(prompt, settings, stops, request.parallel_tool_calls)


# --------------------------------------------------------------------------- replies


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    """Chat usage, with cached prompt tokens and reasoning tokens."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _kept_calls(parts: list[Part], parallel_tool_calls: bool) -> list[int]:
    """Indices of the tool-call parts returned (only the first without parallel tool calls)."""
    calls = [i for i, p in enumerate(parts) if p.kind == "tool_call"]
    return calls if parallel_tool_calls else calls[:1]


def message(parts: list[Part], parallel_tool_calls: bool = True) -> dict[str, Any]:
    """The assistant message of a finished completion: content, reasoning and tool calls."""
    content = [p.text for p in parts if p.kind == "content"]
    reasoning = [p.text for p in parts if p.kind == "reasoning"]
    calls = [{"id": new_call_id(), "type": "function",
              "function": {"name": parts[i].name, "arguments": parts[i].text}}
             for i in _kept_calls(parts, parallel_tool_calls)]
    out: dict[str, Any] = {"role": "assistant", "content": "".join(content) if content else None}
    if reasoning:
        out["reasoning"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def completion(request_id: str, model: str, created: int, stream: HarmonyStream, finish_reason: str,
               usage_: dict[str, Any], parallel_tool_calls: bool = True) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message(stream.parts, parallel_tool_calls),
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


@dataclass
class ChunkWriter:
    """Parser events -> ``chat.completion.chunk`` objects: role first, then reasoning, content and
    tool-call deltas (a call's first delta carries its id and name, later ones its arguments)."""

    request_id: str
    model: str
    created: int
    parallel_tool_calls: bool = True
    include_usage: bool = False
    _calls: dict[int, tuple[int, str]] = field(default_factory=dict)  # part index -> (call index, id)
    _skipped: set[int] = field(default_factory=set)

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
              usage_: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                               "model": self.model,
                               "choices": [] if delta is None else
                               [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        if self.include_usage:
            out["usage"] = usage_
        return out

    def first(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def events(self, events: list[Event]) -> list[dict[str, Any]]:
        chunks = []
        for event in events:
            delta = self._delta(event)
            if delta is not None:
                chunks.append(self.chunk(delta))
        return chunks

    def _delta(self, event: Event) -> dict[str, Any] | None:
        part = event.part
        if part.kind == "tool_call":
            if event.index in self._skipped:
                return None
            if event.type == "begin":
                if self._calls and not self.parallel_tool_calls:
                    self._skipped.add(event.index)
                    return None
                self._calls[event.index] = (len(self._calls), new_call_id())
                index, call_id = self._calls[event.index]
                return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                        "function": {"name": part.name, "arguments": ""}}]}
            if event.type == "delta":
                return {"tool_calls": [{"index": self._calls[event.index][0], "function": {"arguments": event.text}}]}
            return None
        if event.type != "delta":
            return None
        return {"reasoning": event.text} if part.kind == "reasoning" else {"content": event.text}

    def last(self, finish_reason: str) -> dict[str, Any]:
        return self.chunk({}, finish_reason)

    def usage_chunk(self, usage_: dict[str, Any]) -> dict[str, Any]:
        return self.chunk(None, usage_=usage_)
