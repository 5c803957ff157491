"""Continuous batching: requests join and leave a fixed set of decode slots while others decode.

    engine = Engine(config, params, slots=8, max_context=4096)
    engine.warmup()
    handle = engine.submit(prompt_tokens, RequestSettings(max_tokens=256, temperature=0.7, seed=1))
    engine.run_until_idle()        # or engine.start() for a background loop (servers)
    handle.result()                # or: for tokens in handle.stream(): ...

`engine.py` holds the host-side scheduler, `state.py` the device state and its jitted slot
operations, `sampling.py` per-row sampling, `request.py` the request types, `multihost.py` the
schedule shared by several processes.
"""

from gptoss_jax.engine.engine import Engine
from gptoss_jax.engine.request import Handle, Refused, RequestSettings

__all__ = ["Engine", "Handle", "Refused", "RequestSettings"]
