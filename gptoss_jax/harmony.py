"""The harmony chat format of gpt-oss: render conversations to tokens, parse tokens back.

A message is ``<|start|>{author}[ to={recipient}][<|channel|>{channel}][ {content_type}]
<|message|>{content}<|end|>``; an assistant message with a recipient (a tool call) ends in
``<|call|>`` instead, and a finished answer may end in ``<|return|>``. The output is
token-for-token what the ``openai-harmony`` package renders for the ``HarmonyGptOss`` encoding.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import tiktoken

from gptoss_jax import tokenizer as tok

Role = Literal["system", "developer", "user", "assistant", "tool"]
ReasoningEffort = Literal["low", "medium", "high"]
ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
CHANNELS: tuple[str, ...] = ("analysis", "commentary", "final")
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
CONSTRAIN_MARKER = "<|constrain|>"
CHANNEL_MARKER = "<|channel|>"


class HarmonyParseError(ValueError):
    """The tokens are not a well-formed harmony message sequence."""


@dataclass(frozen=True)
class ToolDescription:
    """One callable tool: its name, description and JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class ToolNamespace:
    """A group of tools rendered as ``## {name}`` (e.g. ``functions``, ``browser``)."""

    name: str
    description: str | None = None
    tools: tuple[ToolDescription, ...] = ()


@dataclass(frozen=True)
class SystemContent:
    """Structured system message: identity, dates, reasoning effort, tools, channels."""

    model_identity: str | None = DEFAULT_MODEL_IDENTITY
    reasoning_effort: ReasoningEffort | None = "medium"
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF
    current_date: str | None = None
    tools: tuple[ToolNamespace, ...] = ()
    valid_channels: tuple[str, ...] = CHANNELS
    channel_required: bool = True


@dataclass(frozen=True)
class DeveloperContent:
    """Structured developer message: instructions and tool namespaces."""

    instructions: str | None = None
    tools: tuple[ToolNamespace, ...] = ()


Content = str | SystemContent | DeveloperContent


@dataclass
class Message:
    """One harmony message.

    A tool's message carries the tool's name (``functions.get_weather``) in ``name``; for other
    roles a name renders as ``role:name``. A constrained format is written as the content type
    ``"<|constrain|>json"``. An assistant message with a recipient is a tool call.
    """

    role: Role
    content: Content
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None


@dataclass
class Conversation:
    """An ordered list of messages."""

    messages: list[Message] = field(default_factory=list)


# --------------------------------------------------------------------------- builders


def system_message(
    reasoning_effort: ReasoningEffort | None = "medium",
    *,
    current_date: str | None = None,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    tools: Sequence[ToolNamespace] = (),
    valid_channels: Sequence[str] = CHANNELS,
    channel_required: bool = True,
) -> Message:
    """The system message gpt-oss expects (built-in tools such as ``browser`` go in ``tools``)."""
    content = SystemContent(
        model_identity=model_identity,
        reasoning_effort=reasoning_effort,
        knowledge_cutoff=knowledge_cutoff,
        current_date=current_date,
        tools=tuple(tools),
        valid_channels=tuple(valid_channels),
        channel_required=channel_required,
    )
    return Message("system", content)


def developer_message(
    instructions: str | None = None,
    function_tools: Sequence[ToolDescription] = (),
    tools: Sequence[ToolNamespace] = (),
) -> Message:
    """The developer message: instructions plus ``functions`` (and other) tool namespaces."""
    namespaces = tuple(tools)
    if function_tools:
        namespaces += (ToolNamespace("functions", None, tuple(function_tools)),)
    return Message("developer", DeveloperContent(instructions, namespaces))


def tool_result(tool_name: str, content: str, channel: str | None = "commentary") -> Message:
    """A tool's reply to the assistant, e.g. ``tool_result("functions.get_weather", "{...}")``."""
    return Message("tool", content, channel=channel, recipient="assistant", name=tool_name)


# --------------------------------------------------------------------------- tools as text


def _json_compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _lines(text: str) -> list[str]:
    """Split into lines like Rust's ``str::lines`` (CR stripped, no empty last line)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _is_enum(schema: dict[str, Any]) -> bool:
    return isinstance(schema.get("enum"), list) and len(schema["enum"]) > 0


def _default_comment(schema: dict[str, Any], enum_default_as_json: bool) -> str:
    """``default: ...``: plain strings quoted, enum strings bare (or JSON), the rest as JSON."""
    default = schema["default"]
    if isinstance(default, str) and not _is_enum(schema):
        return f'default: "{default}"'
    if isinstance(default, str) and not enum_default_as_json:
        return f"default: {default}"
    return f"default: {_json_compact(default)}"


def _description(schema: dict[str, Any]) -> str | None:
    desc = schema.get("description")
    return desc if isinstance(desc, str) else None


def _one_of_variants(variants: list[Any], indent: str, *, first_desc_shown_above: bool,
                     parent_desc: str | None, enum_default_as_json: bool) -> str:
    """``oneOf`` variants as `` | type // comments`` lines."""
    lines = []
    for i, variant in enumerate(variants):
        variant = variant if isinstance(variant, dict) else {}
        rendered = schema_to_typescript(variant, indent + "   ")
        if variant.get("nullable") is True and "null" not in rendered:
            rendered += " | null"
        comments = []
        desc = _description(variant)
        if desc is not None and not (i == 0 and first_desc_shown_above) and desc != parent_desc:
            comments.append(desc)
        if "default" in variant:
            comments.append(_default_comment(variant, enum_default_as_json))
        lines.append(f"{indent} | {rendered}" + (f" // {' '.join(comments)}" if comments else ""))
    return "\n".join(lines)


def _property_to_typescript(key: str, prop: dict[str, Any], optional: str, indent: str) -> str:
    out = ""
    if isinstance(prop.get("title"), str):
        out += f"{indent}// {prop['title']}\n{indent}//\n"
    desc = _description(prop)
    variants = prop.get("oneOf")
    if variants is None and desc is not None:
        out += f"{indent}// {desc}\n"
    examples = prop.get("examples")
    if isinstance(examples, list) and examples:
        out += f"{indent}// Examples:\n"
        out += "".join(f'{indent}// - "{e}"\n' for e in examples if isinstance(e, str))
    if isinstance(variants, list):
        first_desc = _description(variants[0]) if variants else None
        desc_above = desc is not None and desc != first_desc
        if desc_above:
            out += f"{indent}// {desc}\n"
        if "default" in prop:
            out += f"{indent}// {_default_comment(prop, False)}\n"
        out += f"{indent}{key}{optional}:\n"
        body = _one_of_variants(variants, indent, first_desc_shown_above=desc_above,
                                parent_desc=desc, enum_default_as_json=False)
        return out + (body + "\n" if variants else "") + f"{indent},\n"
    rendered = schema_to_typescript(prop, indent + "    ")
    if prop.get("nullable") is True and "null" not in rendered:
        rendered += " | null"
    out += f"{indent}{key}{optional}: {rendered},"
    if variants is None and "default" in prop:
        out += f" // {_default_comment(prop, False)}"
    return out + "\n"


def schema_to_typescript(schema: Any, indent: str = "") -> str:
    """A JSON schema as the TypeScript-like type that harmony shows the model."""
    if not isinstance(schema, dict):
        return "any"
    if isinstance(schema.get("oneOf"), list):
        variants = schema["oneOf"]
        body = _one_of_variants(variants, indent, first_desc_shown_above=False,
                                parent_desc=None, enum_default_as_json=True)
        return "\n" + body if variants else ""
    kind = schema.get("type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        return " | ".join(names) if names else "any"
    if kind == "object":
        desc = _description(schema)
        out = (f"{indent}// {desc}\n" if desc is not None else "") + "{\n"
        required = schema.get("required")
        required = set(required) if isinstance(required, list) else set()
        properties = schema.get("properties")
        for key, prop in properties.items() if isinstance(properties, dict) else ():
            prop = prop if isinstance(prop, dict) else {}
            out += _property_to_typescript(key, prop, "" if key in required else "?", indent)
        return out + f"{indent}}}"
    if kind == "string":
        values = [f'"{v}"' for v in schema.get("enum") or [] if isinstance(v, str)]
        return " | ".join(values) if values else "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        if "items" not in schema:
            return "Array<any>"
        return f"{schema_to_typescript(schema['items'], indent)}[]"
    return "any"


def tools_section(namespaces: Sequence[ToolNamespace]) -> str:
    """The ``# Tools`` section; namespaces sorted by name (the last of a name wins)."""
    by_name = {ns.name: ns for ns in namespaces}
    sections = ["# Tools"]
    for name in sorted(by_name):
        ns = by_name[name]
        lines = [f"## {ns.name}\n"]
        lines += [f"// {line}" if ns.tools else line for line in _lines(ns.description or "")]
        if ns.tools:
            lines.append(f"namespace {ns.name} {{\n")
            for tool in ns.tools:
                lines += [f"// {line}" for line in _lines(tool.description)]
                params = tool.parameters
                params = "" if params is None else f"_: {schema_to_typescript(params)}"
                lines.append(f"type {tool.name} = ({params}) => any;\n")
            lines.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def system_text(content: SystemContent, has_function_tools: bool = False) -> str:
    """The text of a system message."""
    sections = []
    header = [content.model_identity] if content.model_identity is not None else []
    if content.knowledge_cutoff is not None:
        header.append(f"Knowledge cutoff: {content.knowledge_cutoff}")
    if content.current_date is not None:
        header.append(f"Current date: {content.current_date}")
    if header:
        sections.append("\n".join(header))
    if content.reasoning_effort is not None:
        sections.append(f"Reasoning: {content.reasoning_effort}")
    if content.tools:
        sections.append(tools_section(content.tools))
    if content.valid_channels:
        channels = f"# Valid channels: {', '.join(content.valid_channels)}."
        if content.channel_required:
            channels += " Channel must be included for every message."
        if has_function_tools:
            channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(channels)
    return "\n\n".join(sections)


def developer_text(content: DeveloperContent) -> str:
    """The text of a developer message."""
    sections = ["# Instructions", content.instructions] if content.instructions is not None else []
    if content.tools:
        sections.append(tools_section(content.tools))
    return "\n\n".join(sections)


# --------------------------------------------------------------------------- rendering


def _has_function_tools(messages: Sequence[Message]) -> bool:
    return any(
        isinstance(m.content, DeveloperContent)
        and any(ns.name == "functions" and ns.tools for ns in m.content.tools)
        for m in messages
    )


def render_message(
    message: Message,
    encoding: tiktoken.Encoding | None = None,
    has_function_tools: bool = False,
) -> list[int]:
    """Tokens of one message, header pieces encoded separately as harmony does."""
    enc = encoding or tok.get_encoding()
    if message.role == "tool":
        if message.name is None:
            raise ValueError("a tool message needs the tool's name, e.g. name='functions.x'")
        tokens = [tok.START, *enc.encode_ordinary(message.name)]
    else:
        tokens = [tok.START, *enc.encode_ordinary(message.role)]
        if message.name is not None:
            tokens += enc.encode_ordinary(f":{message.name}")
    if message.recipient is not None and message.recipient != "all":
        tokens += enc.encode_ordinary(f" to={message.recipient}")
    if message.channel is not None:
        tokens += [tok.CHANNEL, *enc.encode_ordinary(message.channel)]
    if message.content_type is not None:
        if message.content_type.startswith(CONSTRAIN_MARKER):
            rest = message.content_type[len(CONSTRAIN_MARKER):]
            tokens += [*enc.encode_ordinary(" "), tok.CONSTRAIN, *enc.encode_ordinary(rest)]
        else:
            tokens += enc.encode_ordinary(f" {message.content_type}")
    tokens.append(tok.MESSAGE)
    content = message.content
    if isinstance(content, SystemContent):
        content = system_text(content, has_function_tools)
    elif isinstance(content, DeveloperContent):
        content = developer_text(content)
    tokens += enc.encode_ordinary(content)
    is_tool_call = message.role == "assistant" and message.recipient is not None
    tokens.append(tok.CALL if is_tool_call else tok.END)
    return tokens


def _kept_messages(messages: Sequence[Message], drop_analysis: bool) -> list[Message]:
    """Drop analysis before the first final answer when the last assistant turn is final."""
    last_assistant = next((m for m in reversed(messages) if m.role == "assistant"), None)
    if not (drop_analysis and last_assistant is not None and last_assistant.channel == "final"):
        return list(messages)
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), len(messages))
    return [m for i, m in enumerate(messages) if not (i < first_final and m.channel == "analysis")]


def render_conversation(conversation: Conversation, encoding: tiktoken.Encoding | None = None,
                        *, drop_analysis: bool = True) -> list[int]:
    """Tokens of all messages (harmony's ``render_conversation``)."""
    enc = encoding or tok.get_encoding()
    has_functions = _has_function_tools(conversation.messages)
    tokens: list[int] = []
    for message in _kept_messages(conversation.messages, drop_analysis):
        tokens += render_message(message, enc, has_functions)
    return tokens


def render_for_completion(
    conversation: Conversation,
    encoding: tiktoken.Encoding | None = None,
    *,
    next_role: Role = "assistant",
    drop_analysis: bool = True,
) -> list[int]:
    """The prompt for sampling the next turn: the conversation then ``<|start|>{next_role}``."""
    enc = encoding or tok.get_encoding()
    tokens = render_conversation(conversation, enc, drop_analysis=drop_analysis)
    return tokens + [tok.START, *enc.encode_ordinary(next_role)]


def render_for_training(conversation: Conversation, encoding: tiktoken.Encoding | None = None,
                        *, drop_analysis: bool = True) -> list[int]:
    """Like :func:`render_conversation`, but a closing final answer ends in ``<|return|>``."""
    tokens = render_conversation(conversation, encoding, drop_analysis=drop_analysis)
    messages = conversation.messages
    if messages and messages[-1].role == "assistant" and messages[-1].channel == "final":
        tokens[-1] = tok.RETURN
    return tokens


# --------------------------------------------------------------------------- parsing

_ASCII_WHITESPACE = re.compile(r"[ \t\n\x0c\r]+")
_PARSER_STOPS = frozenset({tok.END, tok.RETURN, tok.CALL})


def parse_header(header: str, role: str | None = None) -> Message:
    """Header text (between ``<|start|>`` and ``<|message|>``) -> a message with empty content."""
    channel = None
    at = header.find(CHANNEL_MARKER)
    if at >= 0:
        after = header[at + len(CHANNEL_MARKER):]
        end = next((i for i, c in enumerate(after) if c.isspace() or c == "<"), len(after))
        if end == 0:
            raise HarmonyParseError(f"channel marker without a channel in header {header!r}")
        channel = after[:end]
        header = header[:at] + after[end:]
    header = header.strip()
    if CONSTRAIN_MARKER in header:
        header = header.replace(CONSTRAIN_MARKER, " " + CONSTRAIN_MARKER).strip()
    parts = [p for p in _ASCII_WHITESPACE.split(header) if p]
    name = None
    if role is None:
        if not parts:
            raise HarmonyParseError("message header has no role")
        author = parts[0]
        known_role, _, user_name = author.partition(":")
        if author in ROLES:
            role, name = author, (author if author == "tool" else None)
        elif known_role in ROLES and user_name:
            role, name = known_role, user_name
            parts.pop(0)
        else:  # any other author is a tool, e.g. "functions.get_weather"
            role, name = "tool", parts.pop(0)
    if parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif not parts:
            recipient = last
        else:
            content_type = last
            raw = parts.pop()
            recipient = raw[3:] if raw.startswith("to=") else raw
    if parts:
        raise HarmonyParseError(f"unexpected text {' '.join(parts)!r} in message header")
    return Message(role, "", channel, recipient, content_type, name)  # type: ignore[arg-type]


def parse_completion(tokens: Sequence[int], encoding: tiktoken.Encoding | None = None,
                     *, role: Role = "assistant", strict: bool = True) -> list[Message]:
    """Parse rendered or generated tokens back into messages.

    ``tokens`` may start with ``<|start|>`` (a full rendering) or, as sampled after a
    :func:`render_for_completion` prompt, inside the header of a ``role`` message. Messages
    end at ``<|end|>``, ``<|call|>`` or ``<|return|>``; a trailing message with no end token
    is kept, and ``<|endoftext|>`` ends the stream. A header cut off before ``<|message|>``
    raises unless ``strict=False``, which drops it.
    """
    enc = encoding or tok.get_encoding()
    messages: list[Message] = []
    header: list[int] | None = None if (tokens and tokens[0] == tok.START) else []
    next_role: str | None = None if header is None else role
    current: Message | None = None  # the message whose content is being read
    content: list[int] = []

    def close(message: Message) -> None:
        message.content = enc.decode(content)
        messages.append(message)
        content.clear()

    for position, token in enumerate(tokens):
        if token == tok.ENDOFTEXT:
            break
        if current is not None:
            if token in _PARSER_STOPS:
                close(current)
                current = None
            else:
                content.append(token)
        elif header is not None:
            if token == tok.MESSAGE:
                current = parse_header(enc.decode(header), next_role)
                header, next_role = None, None
            else:
                header.append(token)
        elif token == tok.START:
            header = []
        else:
            raise HarmonyParseError(f"token {token} at position {position}: expected <|start|>")
    if current is not None:
        close(current)
    elif header is not None and (header or next_role is None):
        if strict:
            raise HarmonyParseError(f"tokens end inside a message header {enc.decode(header)!r} (before <|message|>)")
    return messages
