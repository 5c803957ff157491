"""The server end to end on the real engine: a tiny random model with the real vocabulary (so harmony
tokens fit), one live uvicorn server for the module, driven by the official openai client. A random
model's words are gibberish, so the protocol is checked where it is deterministic: forced tool calls,
token budgets, seeded streams against the same request alone, cancellation freeing slots."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[1]
TINY_HARMONY = {**json.loads((REPO / "configs" / "tiny-a.json").read_text()), "vocab_size": 201088, "hidden_size": 32,
                "eos_token_id": 200002, "pad_token_id": 199999}  # as tests/test_train.py's TINY_HARMONY_CONFIG
MODEL = "tiny-harmony"
MAX_CONTEXT = 512
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def random_params(config):
    """Random float32 weights made on the host (init_params' compile would cost this file 8 s)."""
    import jax
    import jax.numpy as jnp

    from gptoss_jax.params import abstract_params

    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[-1] if len(s.shape) > 1 else 4))
                        .astype(s.dtype), abstract_params(config, jnp.float32))


@pytest.fixture(scope="module")
def live():
    import jax

    from gptoss_jax.config import from_hf_dict
    from gptoss_jax.engine import Engine
    from gptoss_jax.serve import create_app
    from gptoss_jax.serve.server import BackgroundServer

    config = from_hf_dict(TINY_HARMONY, MODEL)
    params = jax.device_put(random_params(config), jax.devices()[0])  # committed, as `load_model` gives them
    engine = Engine(config, params, slots=4, max_context=MAX_CONTEXT, prefill_chunk=128,
                    steps_per_dispatch=2, max_queue=64)
    with BackgroundServer(create_app(engine, model_id=MODEL, max_context=MAX_CONTEXT)) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            assert http.get("/health").status_code == 503  # not compiled yet
            refused = http.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
            assert refused.status_code == 503 and "retry-after" in refused.headers
            engine.warmup()
            engine.start()
            assert http.get("/health").status_code == 200
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)
            try:
                yield engine, client, http
            finally:
                engine.stop()


def _wait_idle(engine, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (stats := engine.stats())["slots_in_use"] or stats["queue_length"]:
        assert time.monotonic() < deadline, f"the engine is still busy: {stats}"
        time.sleep(0.05)
    return stats


def test_named_tool_choice_forces_the_call_and_the_budget_gives_length(live):
    engine, client, _ = live
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = dict(model=MODEL, messages=USER, tools=[WEATHER], max_completion_tokens=13, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    responses = dict(model=MODEL, input="Weather?", tools=[{"type": "function", **WEATHER["function"]}],
                     tool_choice="required", max_output_tokens=13, temperature=0)
    with ThreadPoolExecutor(2) as pool:  # together: they share the engine's steps
        reply = pool.submit(client.chat.completions.create, **chat)
        forced = pool.submit(client.responses.create, **responses)
        reply, forced = reply.result(timeout=60), forced.result(timeout=60)
    choice = reply.choices[0]
    assert choice.message.tool_calls[0].function.name == "get_weather" and choice.message.tool_calls[0].id
    assert choice.finish_reason in ("length", "tool_calls")  # a random model hardly ever closes the call
    assert reply.usage.completion_tokens == 13 or choice.finish_reason == "tool_calls"
    assert reply.usage.prompt_tokens > 50 and reply.usage.total_tokens == reply.usage.prompt_tokens + 13
    assert forced.output[0].type == "function_call" and forced.output[0].name == "get_weather"
    assert forced.status == "incomplete" and forced.incomplete_details.reason == "max_output_tokens"


def _text(message) -> str:
    """Everything a reply carries: reasoning, content, tool calls' names and arguments."""
    calls = "".join(f"{c.function.name}({c.function.arguments})" for c in message.tool_calls or ())
    return (getattr(message, "reasoning", None) or "") + "|" + (message.content or "") + "|" + calls


def _streamed(client, seed: int) -> tuple[str, int]:
    reasoning, content, calls = "", "", {}
    usage = None
    for chunk in client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=1.0, seed=seed,
                                                stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta
            reasoning += getattr(delta, "reasoning", None) or ""
            content += delta.content or ""
            for call in delta.tool_calls or ():
                name, args = calls.get(call.index, ("", ""))
                calls[call.index] = (name + (call.function.name or ""), args + (call.function.arguments or ""))
    return reasoning + "|" + content + "|" + "".join(f"{n}({a})" for n, a in calls.values()), usage.completion_tokens


def test_sixteen_concurrent_streams_complete_and_equal_each_request_alone(live):
    engine, client, _ = live
    generated = engine.stats()["generated_tokens"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda seed: _streamed(client, seed), range(16)))
    # every token the engine made reached its stream (counted by the usage chunks)
    assert sum(count for _, count in together) == engine.stats()["generated_tokens"] - generated
    assert len({text for text, _ in together}) > 1  # the seeds differ, so do the outputs
    for seed in (0, 5, 10, 15):  # a spread of them alone (the engine's tests check every slot and mix)
        alone = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=1.0, seed=seed)
        assert together[seed] == (_text(alone.choices[0].message), alone.usage.completion_tokens), seed
    stats = _wait_idle(engine)
    assert stats["slots_in_use"] == 0
    assert stats["compilations_after_warmup"] == 0  # an engine without a mesh: warm-up compiled it all


def test_responses_stream_store_and_prefix_cache(live):
    engine, client, http = live
    with client.responses.stream(model=MODEL, input="Hello there", max_output_tokens=6, temperature=0) as stream:
        events = list(stream)  # the helper checks order and indices as it goes
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    final = events[-1].response  # a token budget ends the stream with response.incomplete, as OpenAI's does
    assert final.id.startswith("resp_") and final.model == MODEL and final.object == "response"
    assert final.status == "incomplete" and final.usage.output_tokens == 6
    assert client.responses.retrieve(final.id).usage.output_tokens == 6
    follow = client.responses.create(model=MODEL, input="And again", previous_response_id=final.id,
                                     max_output_tokens=1, temperature=0)
    assert follow.usage.input_tokens > final.usage.input_tokens  # the first turn is in the prompt
    again = client.responses.create(model=MODEL, input="And again", previous_response_id=final.id,
                                    max_output_tokens=1, temperature=0)
    # the same prompt again: all of it but the last token comes from the engine's prefix cache
    assert again.usage.input_tokens_details.cached_tokens == again.usage.input_tokens - 1
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/responses", json=body) as reply:
        frames = [json.loads(line[5:]) for line in reply.iter_lines() if line.startswith("data:")]
    numbers = [f["sequence_number"] for f in frames]
    assert numbers == list(range(len(frames))) and frames[-1]["type"] == "response.incomplete"
    added = [f for f in frames if f["type"] == "response.output_item.added"]
    done = [f for f in frames if f["type"] == "response.output_item.done"]
    assert [f["item"]["id"] for f in added] == [f["item"]["id"] for f in done]
    assert [i["id"] for i in frames[-1]["response"]["output"]] == [f["item"]["id"] for f in done]


def test_disconnects_cancel_and_free_their_slots(live):
    engine, _, http = live
    before = engine.stats()["cancelled"]
    body = {"model": MODEL, "messages": USER, "max_tokens": 400, "stream": True}
    for _ in range(3):
        with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            assert reply.status_code == 200
            for _line in reply.iter_lines():
                break  # the first chunk, then hang up
    stats = _wait_idle(engine)
    assert stats["slots_in_use"] == 0 and stats["cancelled"] >= before + 3
    metrics = http.get("/metrics").text
    assert 'outcome="cancelled"' in metrics and "gptoss_slots_in_use 0.0" in metrics


def test_an_over_long_prompt_is_a_400_and_the_server_keeps_serving(live):
    _, client, _ = live
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    assert err.value.body["code"] == "context_length_exceeded"
    ok = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert ok.usage.completion_tokens <= 2 and ok.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_the_serve_command_compiles_in_the_background_then_serves(live, tmp_path, monkeypatch, capsys):
    from gptoss_jax import cli
    import jax

    from gptoss_jax.config import from_hf_dict
    from gptoss_jax.serve.server import BackgroundServer

    assert cli.main(["serve", "random:no-such-config"]) == 2
    assert cli.main(["serve", "random:tiny-a", "--slots", "0"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and errors[1] == "gptoss-jax serve: error: --slots must be >= 1, got 0; fix: pass --slots 1 or more"
    config_path = tmp_path / "tiny-harmony.json"
    config_path.write_text(json.dumps(TINY_HARMONY))
    params = random_params(from_hf_dict(TINY_HARMONY, MODEL))
    monkeypatch.setattr(cli, "_load", lambda args: (cli._model_config(args), params))  # the fixture's weights
    seen = {}

    def serve(app, host, port):  # instead of uvicorn in the foreground: a background server, one request
        with BackgroundServer(app) as server, httpx.Client(base_url=server.base_url, timeout=30) as http:
            deadline = time.monotonic() + 60
            while (health := http.get("/health")).status_code != 200:
                assert health.status_code == 503 and time.monotonic() < deadline
                time.sleep(0.1)
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)
            seen["models"] = [m.id for m in client.models.list().data]
            seen["reply"] = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)

    monkeypatch.setattr("gptoss_jax.serve.server.serve", serve)
    argv = ["serve", f"random:{config_path}", "--slots", "4", "--max-context", str(MAX_CONTEXT), "--prefill-chunk",
            "128", "--steps-per-dispatch", "2", "--model-name", "tiny", "--port", "1"]  # the live fixture's programs
    assert cli.main(argv) == 0
    assert seen["models"] == ["tiny"] and seen["reply"].usage.completion_tokens == 2
    assert "ready after" in capsys.readouterr().err
