"""What both APIs share on the way in: harmony prompts, reasoning effort, tool choice, sampling."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import tiktoken

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.serve.errors import bad_request

#: The SDK's efforts onto gpt-oss's three: below low is low, above high is high.
EFFORTS: dict[str, harmony.ReasoningEffort] = {
    "none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "high"}


def reasoning_effort(value: str | None, param: str) -> harmony.ReasoningEffort:
    """``low|medium|high`` as given; ``none|minimal`` -> low, ``xhigh`` -> high; unset -> medium."""
    if value is None:
        return "medium"
    if value not in EFFORTS:
        raise bad_request(f"'{param}' must be one of {', '.join(EFFORTS)}, got {value!r}", param)
    return EFFORTS[value]


@dataclass(frozen=True)
class ToolChoice:
    """Which tools the model sees, and the call it is made to start (``forced``) if any."""

    tools: tuple[harmony.ToolDescription, ...]
    mode: str  # none | auto | required | named
    name: str | None = None


def tool_choice(tools: Sequence[harmony.ToolDescription], choice: Any, param: str,
                named: str | None) -> ToolChoice:
    """``none`` renders no tools; ``required`` and a named function force the call header."""
    mode = "auto" if choice is None else choice if isinstance(choice, str) else "named"
    if mode not in ("none", "auto", "required", "named"):
        raise bad_request(f"'{param}' must be none, auto, required or a function, got {choice!r}", param)
    if mode in ("required", "named") and not tools:
        raise bad_request(f"'{param}' is {mode!r} but no tools were given", param)
    if mode == "named" and named not in {t.name for t in tools}:
        raise bad_request(f"'{param}' names the function {named!r}, which is not among the tools", param)
    if mode == "required" and len(tools) == 1:
        mode, named = "named", tools[0].name  # one tool: required is that tool
    return ToolChoice(() if mode == "none" else tuple(tools), mode, named if mode == "named" else None)


def forced_tokens(encoding: tiktoken.Encoding, choice: ToolChoice) -> tuple[int, ...]:
    """The harmony call header the model is made to emit first: the whole of it for a named function,
    ``<|channel|>commentary to=functions.`` for ``required`` (the model picks the function)."""
    if choice.mode == "named":
        return (tok.CHANNEL, *encoding.encode_ordinary(f"commentary to=functions.{choice.name} "), tok.CONSTRAIN,
                *encoding.encode_ordinary("json"), tok.MESSAGE)
    if choice.mode == "required":
        return (tok.CHANNEL, *encoding.encode_ordinary("commentary to=functions."))
    return ()


def response_format_text(kind: str, name: str | None, schema: Any, description: str | None) -> str | None:
    """A ``# Response Formats`` section for the developer message (harmony's structured output)."""
    if kind == "json_schema":
        lines = ["# Response Formats", f"## {name or 'response'}"]
        if description:
            lines.append(f"// {description}")
        return "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:] + [json.dumps(schema or {}, ensure_ascii=False, separators=(",", ":"))])
    if kind == "json_object":
        return "# Response Formats\n\nRespond with a single JSON object, and nothing else."
    return None


def call_message(name: str, arguments: str) -> harmony.Message:
    """An assistant's function call as harmony stores it."""
    return harmony.Message("assistant", arguments, channel="commentary", recipient=f"functions.{name}",
                           content_type="<|constrain|>json")


def drop_finished_analysis(messages: Sequence[harmony.Message]) -> list[harmony.Message]:
    """Chain of thought of turns that ended in a final answer is dropped; the current turn's (after the
    last final answer, e.g. across a tool loop) is kept."""
    finals = [i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"]
    last_final = finals[-1] if finals else -1
    return [m for i, m in enumerate(messages) if not (m.channel == "analysis" and i < last_final)]


def render_prompt(encoding: tiktoken.Encoding, *, effort: harmony.ReasoningEffort,
                  instructions: Sequence[str], tools: Sequence[harmony.ToolDescription],
                  history: Sequence[harmony.Message]) -> list[int]:
    """System (effort, date), developer (instructions, function tools), the history, ``<|start|>assistant``."""
    messages = [harmony.system_message(effort, current_date=time.strftime("%Y-%m-%d"))]
    text = "\n\n".join(i for i in instructions if i) or None
    if text is not None or tools:
        messages.append(harmony.developer_message(text, tools))
    messages += drop_finished_analysis(history)
    return harmony.render_for_completion(harmony.Conversation(messages), encoding, drop_analysis=False)


def settings_kwargs(*, max_tokens: int | None, max_context: int, prompt_length: int, temperature: float | None,
                    top_p: float | None, top_k: int | None, min_p: float | None, seed: int | None,
                    forced: tuple[int, ...], max_param: str) -> dict[str, Any]:
    """The engine's RequestSettings fields: the budget defaults to (and is capped at) what the context has left."""
    room = max_context - prompt_length
    if room < 1:
        raise bad_request(f"the prompt is {prompt_length} tokens; this server's context is {max_context} tokens",
                          "messages" if max_param != "max_output_tokens" else "input", "context_length_exceeded")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"'{max_param}' must be at least 1, got {max_tokens}", max_param)
    budget = room if max_tokens is None else min(max_tokens, room)
    if forced and budget < len(forced) + 1:
        raise bad_request(f"'{max_param}' of {budget} leaves no room for the forced tool call "
                          f"({len(forced)} header tokens)", max_param)
    kwargs: dict[str, Any] = {"max_tokens": budget, "temperature": 1.0 if temperature is None else temperature,
                              "top_p": 1.0 if top_p is None else top_p, "top_k": top_k or 0,
                              "min_p": min_p or 0.0, "seed": seed}
    if forced:
        kwargs["forced_tokens"] = forced
    return kwargs
