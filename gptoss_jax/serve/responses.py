"""The Responses API: input items as harmony, parts as output items and stream events, a bounded store."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import tiktoken
from pydantic import Field

from gptoss_jax import harmony
from gptoss_jax.serve import prompting
from gptoss_jax.serve.chat import RequestModel, SamplingFields
from gptoss_jax.serve.errors import APIError, bad_request
from gptoss_jax.serve.streaming import Event, HarmonyStream, Part


class ContentItem(RequestModel):
    type: str
    text: str | None = None


class InputItem(RequestModel):
    type: str | None = None  # "message" when absent and a role is given
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[ContentItem] | None = None
    id: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentItem] | None = None
    summary: list[ContentItem] | None = None


class FunctionTool(RequestModel):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class FunctionToolChoice(RequestModel):
    type: Literal["function"]
    name: str


class ReasoningConfig(RequestModel):
    effort: str | None = None


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class TextConfig(RequestModel):
    format: TextFormat | None = None


class ResponsesRequest(SamplingFields):
    """The fields of ``POST /v1/responses`` this server reads (the rest are ignored; seed is an extension)."""

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None


@dataclass
class Stored:
    """A finished response, with the harmony history a follow-up continues from."""

    response: dict[str, Any]
    history: list[harmony.Message]
    call_names: dict[str, str]


class ResponseStore:
    """The last ``capacity`` stored responses, in memory; the oldest is evicted first."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, stored: Stored) -> None:
        with self._lock:
            self._items[stored.response["id"]] = stored
            self._items.move_to_end(stored.response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            return self._items.get(response_id)

    def __len__(self) -> int:
        return len(self._items)


def not_found(response_id: str) -> APIError:
    return APIError(404, f"no response with id {response_id!r} (never stored, or evicted)", param="previous_response_id",
                    type="invalid_request_error", code="response_not_found")


def _text(content: str | list[ContentItem] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.text is None or part.type not in ("input_text", "output_text", "text", "reasoning_text",
                                                  "summary_text"):
            raise bad_request(f"only text content is supported, got {part.type!r}", f"{param}[{j}].type",
                              "unsupported_content")
        texts.append(part.text)
    return "".join(texts)


def input_history(items: str | list[InputItem], call_names: dict[str, str]) -> tuple[list[str], list[harmony.Message]]:
    """(instructions from system/developer items, harmony messages); ``call_names`` gains the calls seen."""
    if isinstance(items, str):
        return [], [harmony.Message("user", items)]
    instructions: list[str] = []
    history: list[harmony.Message] = []
    for i, item in enumerate(items):
        kind = item.type or ("message" if item.role else None)
        if kind == "message":
            text = _text(item.content, f"input[{i}].content")
            if item.role in ("system", "developer"):
                instructions.append(text)
            elif item.role == "assistant":
                before_call = i + 1 < len(items) and items[i + 1].type == "function_call"
                history.append(harmony.Message("assistant", text, channel="commentary" if before_call else "final"))
            elif item.role == "user":
                history.append(harmony.Message("user", text))
            else:
                raise bad_request("a message item needs a role", f"input[{i}].role")
        elif kind == "function_call":
            if not item.name or item.call_id is None:
                raise bad_request("a function_call item needs name and call_id", f"input[{i}]")
            call_names[item.call_id] = item.name
            history.append(prompting.call_message(item.name, item.arguments or ""))
        elif kind == "function_call_output":
            name = call_names.get(item.call_id or "")
            if name is None:
                raise bad_request(f"input[{i}] answers call {item.call_id!r}, which no function_call made",
                                  f"input[{i}].call_id")
            history.append(harmony.tool_result(f"functions.{name}", _text(item.output, f"input[{i}].output")))
        elif kind == "reasoning":
            text = _text(item.content, f"input[{i}].content") or _text(item.summary, f"input[{i}].summary")
            history.append(harmony.Message("assistant", text, channel="analysis"))
        else:
            raise bad_request(f"input items of type {kind!r} are not supported (message, function_call, "
                              "function_call_output, reasoning)", f"input[{i}].type", "unsupported_item")
    return instructions, history


@dataclass(frozen=True)
class Prepared:
    """A responses request made ready for the engine."""

    prompt: list[int]
    settings: dict[str, Any]
    history: list[harmony.Message]  # without system and developer messages: what a follow-up continues
    call_names: dict[str, str]
    effort: str


def prepare(request: ResponsesRequest, encoding: tiktoken.Encoding, max_context: int,
            store: ResponseStore) -> Prepared:
    """The harmony prompt (after the stored history of ``previous_response_id``) and engine settings."""
    history: list[harmony.Message] = []
    call_names: dict[str, str] = {}
    if request.previous_response_id is not None:
        previous = store.get(request.previous_response_id)
        if previous is None:
            raise not_found(request.previous_response_id)
        history, call_names = list(previous.history), dict(previous.call_names)
    instructions, new = input_history(request.input, call_names)
    history += new
    instructions = [request.instructions or ""] + instructions
    fmt = request.text.format if request.text is not None else None
    if fmt is not None:
        section = prompting.response_format_text(fmt.type, fmt.name, fmt.schema_, fmt.description)
        if section:
            instructions.append(section)
    tools = [harmony.ToolDescription(t.name, t.description or "", t.parameters) for t in request.tools or ()]
    choice = request.tool_choice
    named = choice.name if isinstance(choice, FunctionToolChoice) else None
    chosen = prompting.tool_choice(tools, choice, "tool_choice", named)
    effort = prompting.reasoning_effort(request.reasoning.effort if request.reasoning else None, "reasoning.effort")
    prompt = prompting.render_prompt(encoding, effort=effort, instructions=instructions, tools=chosen.tools,
                                     history=history)
    settings = prompting.settings_kwargs(
        max_tokens=request.max_output_tokens, max_context=max_context, prompt_length=len(prompt),
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
        seed=request.seed, forced=prompting.forced_tokens(encoding, chosen), max_param="max_output_tokens")
    return Prepared(prompt, settings, history, call_names, effort)


# --------------------------------------------------------------------------- output


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Output:
    """Parts -> output items with stable ids (the same ids in stream events and the final response)."""

    parallel_tool_calls: bool = True
    _ids: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # part index -> (item id, call id)
    _skipped: set[int] = field(default_factory=set)

    def index(self, part_index: int, part: Part) -> int | None:
        """The part's output index (None for a tool call dropped without parallel tool calls)."""
        if part_index not in self._ids and part_index not in self._skipped:
            if part.kind == "tool_call" and not self.parallel_tool_calls and any(
                    c is not None for _, c in self._ids.values()):
                self._skipped.add(part_index)
            else:
                prefix = {"reasoning": "rs", "content": "msg", "tool_call": "fc"}[part.kind]
                self._ids[part_index] = (_id(prefix), _id("call") if part.kind == "tool_call" else None)
        if part_index in self._skipped:
            return None
        return list(self._ids).index(part_index)

    def call_id(self, part_index: int) -> str | None:
        """The ``call_id`` given to a tool-call part."""
        return self._ids[part_index][1]

    def item(self, part_index: int, part: Part, status: str | None = None) -> dict[str, Any]:
        """The output item of a part, ``in_progress`` until it is done."""
        item_id, call_id = self._ids[part_index]
        status = status or ("completed" if part.done else "in_progress")
        if part.kind == "reasoning":
            content = [{"type": "reasoning_text", "text": part.text}] if part.done else []
            return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}
        if part.kind == "tool_call":
            return {"id": item_id, "type": "function_call", "call_id": call_id, "name": part.name,
                    "arguments": part.text if part.done else "", "status": status}
        content = [text_part(part.text)] if part.done else []
        return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def items(self, parts: list[Part], incomplete: bool) -> list[dict[str, Any]]:
        items = []
        for i, part in enumerate(parts):
            if self.index(i, part) is not None:
                cut = incomplete and part.end_token is None
                items.append(self.item(i, part, "incomplete" if cut else None))
        return items


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + output_tokens}


def response_object(response_id: str, created_at: int, model: str, request: ResponsesRequest, effort: str, *,
                    status: str, output: list[dict[str, Any]], usage_: dict[str, Any] | None,
                    incomplete_reason: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``response`` object with every field the SDK's type requires."""
    choice = request.tool_choice
    fmt = request.text.format if request.text is not None and request.text.format is not None else None
    return {
        "id": response_id, "object": "response", "created_at": created_at, "model": model, "status": status,
        "error": error, "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
        "output": output, "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id, "reasoning": {"effort": effort, "summary": None},
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        "tool_choice": choice.model_dump() if isinstance(choice, FunctionToolChoice) else (choice or "auto"),
        "tools": [{**t.model_dump(), "strict": False} for t in request.tools or ()],
        "truncation": "disabled", "usage": usage_, "metadata": request.metadata or {}, "store": request.store,
    }


def stored_history(prepared: Prepared, parts: list[Part], output: Output) -> tuple[list[harmony.Message], dict[str, str]]:
    """The conversation so far as harmony, for ``previous_response_id``: input history then this output."""
    history, names = list(prepared.history), dict(prepared.call_names)
    for i, part in enumerate(parts):
        if output.index(i, part) is None:
            continue
        if part.kind == "reasoning":
            history.append(harmony.Message("assistant", part.text, channel="analysis"))
        elif part.kind == "tool_call":
            names[output.call_id(i) or ""] = part.name or ""
            history.append(prompting.call_message(part.name or "", part.text))
        else:
            history.append(harmony.Message("assistant", part.text, channel=part.channel or "final"))
    return history, names


@dataclass
class EventWriter:
    """Parser events -> Responses stream events in the order the SDK's ``responses.stream()`` needs:
    each item added, its content part added, deltas, text done, part done, item done."""

    output: Output
    sequence_number: int = 0

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        out = {"type": type_, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return out

    def events(self, events: list[Event], incomplete: bool = False) -> list[dict[str, Any]]:
        """The stream events for parser events (``incomplete``: the token budget ran out)."""
        out: list[dict[str, Any]] = []
        for event in events:
            index = self.output.index(event.index, event.part)
            if index is not None:
                cut = incomplete and event.part.done and event.part.end_token is None
                out += self._one(event, index, self.output.item(event.index, event.part, "incomplete" if cut else None))
        return out

    def _one(self, event: Event, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        part = event.part
        where = {"item_id": item["id"], "output_index": index}
        if event.type == "begin":
            added = [self.event("response.output_item.added", output_index=index, item=item)]
            if part.kind == "reasoning":
                added.append(self.event("response.content_part.added", **where, content_index=0,
                                        part={"type": "reasoning_text", "text": ""}))
            elif part.kind == "content":
                added.append(self.event("response.content_part.added", **where, content_index=0, part=text_part("")))
            return added
        if event.type == "delta":
            if part.kind == "reasoning":
                return [self.event("response.reasoning_text.delta", **where, content_index=0, delta=event.text)]
            if part.kind == "content":
                return [self.event("response.output_text.delta", **where, content_index=0, delta=event.text,
                                   logprobs=[])]
            return [self.event("response.function_call_arguments.delta", **where, delta=event.text)]
        if part.kind == "reasoning":
            done = [self.event("response.reasoning_text.done", **where, content_index=0, text=part.text),
                    self.event("response.content_part.done", **where, content_index=0,
                               part={"type": "reasoning_text", "text": part.text})]
        elif part.kind == "content":
            done = [self.event("response.output_text.done", **where, content_index=0, text=part.text, logprobs=[]),
                    self.event("response.content_part.done", **where, content_index=0, part=text_part(part.text))]
        else:
            done = [self.event("response.function_call_arguments.done", **where, name=part.name,
                               arguments=part.text)]
        return done + [self.event("response.output_item.done", output_index=index, item=item)]
