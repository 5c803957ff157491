"""benchmarks/gguf_writer.py: llama.cpp runs the GGUF it writes as the same model as `gptoss_jax.forward`.

Skipped unless the `bench` extra (gguf, llama-cpp-python) is installed. A small config whose dimensions
llama.cpp takes (head_dim 64, multiples of 32 for MXFP4), YaRN truncated as llama.cpp always does it,
random weights with every part strong enough to show (sinks, biases, norm scales; gate_up large
enough that the swiglu clamp bites), exported by `export_checkpoint(..., mxfp4=True)` (experts MXFP4,
the rest bfloat16) and converted by the writer.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

import gptoss_jax  # noqa: E402
from gptoss_jax import checkpoint as ck  # noqa: E402
from gptoss_jax.checkpoint.layout import dense_hf_shapes  # noqa: E402
from gptoss_jax.config import FULL, SLIDING, Config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gguf_writer  # noqa: E402

pytestmark = pytest.mark.reference

CONFIG = Config(name="gguf-small", num_layers=4, hidden=128, num_heads=4, num_kv_heads=2, head_dim=64,
                num_experts=4, experts_per_token=2, intermediate=128, vocab_size=512, sliding_window=8,
                layer_types=(SLIDING, FULL) * 2, rope_truncate=True, max_positions=4096)
TOKENS = np.random.default_rng(1).integers(0, CONFIG.vocab_size, 5 * CONFIG.sliding_window).tolist()


def random_hf_tensors(config: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 HF tensors: matrices N(0, 1/hidden) (gate_up 9x that), biases N(0, 0.01), sinks and the
    embedding N(0, 1), norm scales N(1, 0.09)."""
    rng = np.random.default_rng(seed)
    special = {"gate_up_proj": 3 / config.hidden ** 0.5, "sinks": 1.0, "embed_tokens": 1.0}
    tensors = {}
    for name, shape in dense_hf_shapes(config).items():
        std = next((s for key, s in special.items() if key in name),
                   0.1 if "bias" in name else 0.3 if "norm" in name else 1 / config.hidden ** 0.5)
        tensors[name] = (("norm" in name) + std * rng.standard_normal(shape)).astype(np.float32)
    return tensors


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The small model in the released layout (MXFP4 experts, the rest bfloat16)."""
    tmp = tmp_path_factory.mktemp("gguf")
    (tmp / "dense").mkdir()
    ck.save_safetensors(tmp / "dense" / "model.safetensors", random_hf_tensors(CONFIG))
    (tmp / "dense" / "config.json").write_text(json.dumps(ck.exported_config_dict(CONFIG, np.float32, False)))
    return ck.export_checkpoint(tmp / "dense", tmp / "mxfp4", mxfp4=True, progress=False)


@pytest.fixture(scope="module")
def ours(exported) -> np.ndarray:
    config, params = ck.load_model(exported, dtype=jnp.float32)  # the experts' MXFP4 values, exactly
    assert dataclasses.replace(config, name=CONFIG.name) == CONFIG
    return np.asarray(gptoss_jax.forward(config, params, jnp.asarray([TOKENS], jnp.int32)))[0]


def llama_cpp_logits(path: Path, **context: object) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), use_mmap=False, logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                          **context)
    llm.eval(TOKENS)
    return np.asarray(llm.scores[: len(TOKENS)])


def test_float32_gguf_runs_our_model(exported, ours, tmp_path):
    """Every weight float32 (the same values) and a float32 KV cache: llama.cpp rounds nothing, so its
    logits at all 40 positions (5 sliding windows) are ours within the project's parity bound (measured:
    2.5e-6 of the largest; a sliding window one too wide gives 1.1, gate / up swapped 1.1, zero sinks
    0.9, YaRN untruncated 7e-4). Pins names, shapes, transposes, biases, sinks, window, YaRN, clamp."""
    path = gguf_writer.write_gguf(exported, tmp_path / "f32.gguf", dtype="f32")
    theirs = llama_cpp_logits(path, type_k=0, type_v=0)  # GGML_TYPE_F32
    assert np.abs(theirs - ours).max() <= 1e-4 * max(1.0, np.abs(ours).max())


def test_benchmarked_gguf_holds_the_same_experts(exported, ours, tmp_path):
    """The benchmark's file (MXFP4 experts, bfloat16 matrices): its MXFP4 blocks decode (gguf's
    dequantizer: llama.cpp's dequantize_row_mxfp4 in numpy) to exactly our expert matrices, and
    llama.cpp's logits stay near ours. It quantizes each expert input to Q8_0 (8 bits, a scale per
    32 values) and rounds other matmuls' inputs to bfloat16: measured, a median over positions of 1.9%
    of the largest logit (up to 27% where that noise flips a near tie between experts); the
    release's nibble order gives a median of 103%, gate / up swapped 83%."""
    path = gguf_writer.write_gguf(exported, tmp_path / "bf16.gguf")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    source = ck.open_source(exported)
    for layer in range(CONFIG.num_layers):
        for kind, hf, start, step in (("gate", "gate_up_proj", 0, 2), ("up", "gate_up_proj", 1, 2),
                                      ("down", "down_proj", 0, 1)):
            tensor = stored[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert tensor.tensor_type == gguf.GGMLQuantizationType.MXFP4
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [E, out, in]
            dense = source.read(f"model.layers.{layer}.mlp.experts.{hf}", dtype=np.float32)  # [E, in, out]
            np.testing.assert_array_equal(values, dense[..., start::step].swapaxes(1, 2))
    error = np.abs(llama_cpp_logits(path) - ours).max(axis=-1) / np.abs(ours).max()
    assert np.median(error) < 0.05, error


def test_config_llama_cpp_cannot_run_is_refused(exported, tmp_path):
    raw = json.loads((exported / "config.json").read_text())
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({**raw, "swiglu_limit": 5.0}))
    (tmp_path / "src" / "model.safetensors").symlink_to(exported / "model.safetensors")
    with pytest.raises(ck.CheckpointError, match="swiglu_limit"):
        gguf_writer.write_gguf(tmp_path / "src", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*gguf*"))
