"""`gptoss-jax serve` on 2 processes (jax.distributed on 127.0.0.1): process 0 serves HTTP and leads
the engine's schedule, process 1 follows it; both hold the same tokens, a cancelled stream included,
and the follower returns when the leader shuts down."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("fastapi")
# Two processes compiling (the follower's programs are its own: its devices differ) cost ~25 s on 2 cores,
# more than this project gives the server's tests; run with GPTOSS_JAX_SLOW_TESTS=1.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("GPTOSS_JAX_SLOW_TESTS"),
                                                   reason="2-process serve test (~25 s): set GPTOSS_JAX_SLOW_TESTS=1")]

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--slots", "4", "--max-context", "512", "--prefill-chunk", "128", "--steps-per-dispatch", "2"]  # as in
# tests/test_serve_engine.py, so the programs come from the compilation cache when it has run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(process_id: int, port: int, out: str, config_path: str) -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["SERVE_TEST_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    import httpx
    import openai

    from gptoss_jax import cli
    from gptoss_jax.engine.multihost import MultihostEngine
    from gptoss_jax.serve.server import BackgroundServer

    sys.path.insert(0, str(REPO / "tests"))
    from test_serve_engine import random_params

    cli._load = lambda args: (config := cli._model_config(args), random_params(config))
    result: dict = {}
    follow = MultihostEngine.follow

    def follow_and_record(engine):  # the follower's handles, once the leader has shut the schedule down
        follow(engine)
        result["handles"] = {k: [h.generated, h.finish_reason] for k, h in engine.handles.items()}

    def serve(app, host, port):  # the leader: a background server, two requests, then back to cmd_serve
        engine = app.state.engine
        with BackgroundServer(app) as server, httpx.Client(base_url=server.base_url, timeout=60) as http:
            deadline = time.monotonic() + 120
            while http.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)
            messages = [{"role": "user", "content": "Hi"}]
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, seed=7)
            body = {"model": "tiny", "messages": messages, "max_tokens": 300, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as stream:
                for _ in stream.iter_lines():
                    break  # hang up: the cancellation goes through the schedule too
            while engine.stats()["slots_in_use"]:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            result["usage"] = reply.usage.completion_tokens
        result["handles"] = {k: [h.generated, h.finish_reason] for k, h in engine.handles.items()}

    MultihostEngine.follow = follow_and_record
    warmup = MultihostEngine.warmup

    def warmup_in_turn(engine):  # the leader compiles first, the follower then reads its programs from the cache
        from gptoss_jax.engine.multihost import distributed

        client = distributed.global_state.client
        if process_id == 1:
            client.blocking_key_value_get("test/warm", 300_000)
        warmup(engine)
        if process_id == 0:
            client.key_value_set("test/warm", "1")

    MultihostEngine.warmup = warmup_in_turn
    import gptoss_jax.serve.server

    gptoss_jax.serve.server.serve = serve
    code = cli.main(["serve", f"random:{config_path}", "--model-name", "tiny", "--coordinator", f"127.0.0.1:{port}",
                     "--num-processes", "2", "--process-id", str(process_id), *ARGS])
    Path(out).write_text(json.dumps({"code": code, **result}))


def test_two_processes_serve_one_schedule(tmp_path):
    import jax

    from test_serve_engine import TINY_HARMONY

    config_path = tmp_path / "tiny-harmony.json"
    config_path.write_text(json.dumps(TINY_HARMONY))
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SERVE_TEST_CACHE": jax.config.jax_compilation_cache_dir}
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path / f"{i}.json"),
                               str(config_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    leader, follower = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert leader["code"] == follower["code"] == 0 and leader["usage"] == 3
    assert leader["handles"] == follower["handles"] and len(leader["handles"]) == 2
    assert sorted(reason for _, reason in leader["handles"].values()) == ["cancelled", "length"]


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
