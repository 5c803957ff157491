"""Multi-host engine: 2 processes (jax.distributed on 127.0.0.1), process 0 taking the requests and
publishing each step's events through the key-value store, process 1 replaying them: both make the
same tokens, cancellations and prefix reuse included, and the greedy ones are `generate`'s."""

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HOT = dict(temperature=0.9, top_k=40, top_p=0.9, seed=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)  # the prompts of tests/test_engine.py (so `generate` reuses its programs)
    return [rng.integers(0, vocab, n).tolist() for n in (25, 32, 29, 27, 31, 26)]


def worker(process_id: int, port: int, out: str, params_file: str) -> None:
    jax.config.update("jax_compilation_cache_dir", os.environ["ENGINE_TEST_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    import gptoss_jax
    from gptoss_jax.engine import RequestSettings
    from gptoss_jax.engine.multihost import MultihostEngine, distributed

    config = gptoss_jax.load_config("tiny-ep")
    params = jax.device_put(pickle.loads(Path(params_file).read_bytes()))  # the test's init_params: no compiling
    engine = MultihostEngine(config, params, slots=2, max_context=64, prefill_chunk=16, steps_per_dispatch=4,
                             prefill_rows=1)  # one prefill program (multi-row prefill: tests/test_engine.py)
    client = distributed.global_state.client
    if process_id == 0:
        engine.warmup()  # compiles first; process 1 then reads the programs from the disk cache
        client.key_value_set("test/warm", "1")
        prompts = _prompts(config.vocab_size)
        first = prompts[5][:18]
        a = engine.submit(first, RequestSettings(max_tokens=8, stop_tokens=()), request_id="a")
        engine.step()
        engine.submit(prompts[1], RequestSettings(max_tokens=10, stop_tokens=(), **HOT), request_id="hot")
        engine.submit(prompts[2], RequestSettings(max_tokens=30, stop_tokens=()), request_id="cancelled")
        engine.step()
        engine.step()
        engine.cancel("cancelled")
        engine.run_until_idle()
        engine.submit(first + a.generated + [11, 12, 13, 14], RequestSettings(max_tokens=20, stop_tokens=()),
                      request_id="next-turn")
        engine.run_until_idle()
        engine.shutdown()
    else:
        client.blocking_key_value_get("test/warm", 300_000)
        engine.warmup()
        engine.follow()
    stats = engine.stats()
    Path(out).write_text(json.dumps({
        "handles": {k: [h.generated, h.finish_reason, h.cached_tokens, h.prompt_tokens] for k, h in engine.handles.items()},
        "stats": {k: stats[k] for k in ("finished", "cancelled", "prefilled_tokens", "cached_tokens", "steps",
                                        "compilations_after_warmup", "slots_in_use")}}))


def _spawn(process_id: int, port: int, out: Path, params_file: Path) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ENGINE_TEST_CACHE": jax.config.jax_compilation_cache_dir,
           "XLA_FLAGS": os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")}
    return subprocess.Popen([sys.executable, __file__, str(process_id), str(port), str(out), str(params_file)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_run_one_schedule(tmp_path):
    import gptoss_jax

    config = gptoss_jax.load_config("tiny-ep")
    params = gptoss_jax.init_params(config, 0, jnp.float32)
    (tmp_path / "params.pkl").write_bytes(pickle.dumps(jax.device_get(params)))
    port = _free_port()
    procs = [_spawn(i, port, tmp_path / f"{i}.json", tmp_path / "params.pkl") for i in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    leader, follower = (json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2))
    assert leader == follower  # the same handles, tokens and counters in both processes
    handles = leader["handles"]
    assert set(handles) == {"a", "hot", "cancelled", "next-turn"}
    assert handles["cancelled"][1] == "cancelled" and handles["hot"][1] == "length"
    assert leader["stats"]["cancelled"] == 1 and leader["stats"]["finished"] == 3
    assert leader["stats"]["compilations_after_warmup"] == 0 and leader["stats"]["slots_in_use"] == 0
    prompts = _prompts(config.vocab_size)
    first = prompts[5][:18]
    turn = first + handles["a"][0] + [11, 12, 13, 14]
    assert handles["next-turn"][2] == len(first) + 8 - 1  # prefix reuse: only the 5 new tokens prefilled
    for prompt, (tokens, *_) in ((first, handles["a"]), (turn, handles["next-turn"])):
        assert tokens == gptoss_jax.generate(config, params, [prompt], 30, stop_tokens=[])[0][: len(tokens)]
    assert len(handles["hot"][0]) == 10  # (seeded sampling equals generate's: tests/test_engine.py)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
