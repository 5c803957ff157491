"""gptoss-jax: OpenAI's gpt-oss models in JAX / Flax NNX.

    import gptoss_jax
    config = gptoss_jax.load_config("tiny-a")
    params = gptoss_jax.init_params(config, seed=0)
    logits = gptoss_jax.forward(config, params, tokens)   # int32 [batch, seq] -> float32 [batch, seq, vocab]
"""

from gptoss_jax.checkpoint import CheckpointError, convert_checkpoint, export_checkpoint, load_model
from gptoss_jax.config import Config, load_config
from gptoss_jax.generate import generate, stream_generate
from gptoss_jax.model import forward
from gptoss_jax.params import abstract_params, init_params, logical_axes
from gptoss_jax import sharding  # noqa: E402,F401  (plugs the mesh rules into gptoss_jax.ops.parallel)

__all__ = ["CheckpointError", "Config", "abstract_params", "convert_checkpoint", "export_checkpoint", "load_model", "forward", "generate", "init_params", "load_config", "logical_axes",
           "stream_generate"]
