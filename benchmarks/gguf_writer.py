"""Writes a gpt-oss checkpoint in the released Hugging Face layout as a GGUF file that llama.cpp runs.

    python benchmarks/gguf_writer.py SRC OUT.gguf [--dtype bf16|q8_0|f32]

SRC: config.json + safetensors, experts MXFP4 (`*_blocks` / `*_scales`, as released and as
`make_synthetic_20b.py` and `gptoss-jax export --mxfp4` write them) or dense (quantized here with
`gptoss_jax.mxfp4.quantize`, as `convert --keep-mxfp4` does). Needs the `bench` extra:

    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
      -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" pip install -e '.[bench]'

The file (llama.cpp `src/models/openai-moe.cpp`, architecture `gpt-oss`; numpy shapes, ggml's reversed):
- `token_embd` / `output` [V, H], `output_norm` [H]; per layer `blk.N.attn_norm`, `post_attention_norm` [H],
  `attn_q` [n*h, H], `attn_k` / `attn_v` [k*h, H], `attn_output` [H, n*h] (each + `.bias`),
  `attn_sinks` [n], `ffn_gate_inp` [E, H] + bias [E], `ffn_gate_exps` / `ffn_up_exps` [E, I, H] + bias
  [E, I], `ffn_down_exps` [E, H, I] + bias [E, H]: the torch [out, in] layout throughout.
- Types as llama.cpp's own converter picks them: 1-D tensors, norms, biases and the router float32,
  experts MXFP4, the other matrices `dtype` (bf16, or q8_0). `f32`, for checks: every weight float32,
  the experts dequantized (exactly); llama.cpp then rounds no matmul input (it quantizes the input of
  an MXFP4 matmul to Q8_0 blocks, and rounds that of a bf16 one to bf16).
- GGUF MXFP4 block: the e8m0 scale byte (the release's, unchanged), then 16 bytes holding value j in
  byte j's low nibble and value j + 16 in its high nibble (the release: 2j low, 2j + 1 high).
- gate and up: the even rows (outputs) of the interleaved `gate_up` are gate, the odd ones up.
- No vocabulary: `tokenizer.ggml.model = "none"` and `gpt-oss.vocab_size` (llama.cpp loads it so;
  token ids in, logits out).

llama.cpp runs gpt-oss with swiglu alpha 1.702 / limit 7 and YaRN beta 32 / 1 hard-coded (other values
are refused here) and always floors / ceils the YaRN correction range (transformers' `truncate: true`):
with gpt-oss's `truncate: false` 9 of gpt-oss-20b's 32 rotary frequencies (9-17) differ by up to 76%,
so llama.cpp agrees exactly only with a `truncate: true` config (tests/test_gguf.py).

Streamed: every tensor's info first, then the data one tensor at a time (the largest is the 1.2 GB
embedding of gpt-oss-20b), into `.OUT.tmp-*` renamed to OUT when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

from gptoss_jax.checkpoint import CheckpointError, SourceCheckpoint, open_source
from gptoss_jax.config import Config

if TYPE_CHECKING:
    import gguf

DTYPES = ("bf16", "q8_0", "f32")
ROW_CHUNK = 1 << 14  # rows of a matrix read and converted per pass (gpt-oss: 94 MB of bfloat16)
_FIXED = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0, "rope_beta_fast": 32.0, "rope_beta_slow": 1.0}


@dataclasses.dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its values' numpy `shape`, ggml type and `read()` giving its bytes (any array)."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # a gguf.GGMLQuantizationType member's name: F32, BF16, Q8_0, MXFP4
    read: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.qtype]]
        return int(np.prod(self.shape)) // block * size


def mxfp4_blocks(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Released MXFP4 blocks uint8 [..., G, 16] + scales uint8 [..., G] -> GGUF MXFP4 bytes [..., G * 17]."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)  # value order
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([scales[..., None], packed], axis=-1).reshape(*blocks.shape[:-2], -1)


def check_config(config: Config, where: Path) -> None:
    """CheckpointError naming the config.json field that llama.cpp's gpt-oss cannot run."""
    for field, value in _FIXED.items():
        if getattr(config, field) != value:
            raise CheckpointError(f"{where / 'config.json'}: {field} = {getattr(config, field)}, but llama.cpp's "
                                  f"gpt-oss hard-codes {value}")
    for field in ("hidden", "intermediate"):
        if getattr(config, field) % 32:
            raise CheckpointError(f"{where / 'config.json'}: {field} = {getattr(config, field)} is not a multiple of "
                                  "32 (the MXFP4 block)")


def _convert(value: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "q8_0":
        from gguf import GGMLQuantizationType, quants

        return quants.quantize(value.astype(np.float32), GGMLQuantizationType.Q8_0)
    return value.astype(ml_dtypes.bfloat16 if dtype == "bf16" else np.float32, copy=False)


def _matrix(source: SourceCheckpoint, name: str, rows: int, dtype: str) -> Callable[[], np.ndarray]:
    """Matrix `name` [rows, ...] in `dtype`, read and converted ROW_CHUNK rows at a time (embeddings: 1.2 GB)."""
    def read() -> np.ndarray:
        out = None
        for i in range(0, rows, ROW_CHUNK):
            chunk = _convert(source.read(name, slice(i, i + ROW_CHUNK)), dtype)
            out = np.empty((rows, *chunk.shape[1:]), chunk.dtype) if out is None else out
            out[i:i + len(chunk)] = chunk
        return out
    return read


def _float32(source: SourceCheckpoint, name: str, cols: slice = slice(None)) -> Callable[[], np.ndarray]:
    return lambda: np.ascontiguousarray(source.read(name)[..., cols], dtype=np.float32)


def _experts(source: SourceCheckpoint, name: str, rows: slice, dtype: str) -> Callable[[], np.ndarray]:
    """Expert matrix `name` [E, out, in] (outputs `rows`), one expert at a time: GGUF MXFP4 bytes
    [E, out, in/32 * 17], or with `dtype` f32 its values (MXFP4 dequantized exactly)."""
    def one(e: int) -> np.ndarray:
        experts = slice(e, e + 1)
        if dtype == "f32":
            return np.swapaxes(source.read(name, experts, np.float32), 1, 2)[:, rows].astype(np.float32)
        return mxfp4_blocks(*(source.read_mxfp4(name, part, experts)[:, rows] for part in ("blocks", "scales")))
    return lambda: np.concatenate([one(e) for e in range(source.config.num_experts)])


def plan(source: SourceCheckpoint, dtype: str = "bf16") -> list[Planned]:
    """Every GGUF tensor of `source`'s model, in file order."""
    c = source.config
    h, q, kv, e, i = c.hidden, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_experts, c.intermediate
    qtype, experts = dtype.upper(), "F32" if dtype == "f32" else "MXFP4"
    out = [Planned("token_embd.weight", (c.vocab_size, h), qtype,
                   _matrix(source, "model.embed_tokens.weight", c.vocab_size, dtype))]
    for layer in range(c.num_layers):
        hf, blk = f"model.layers.{layer}.", f"blk.{layer}."

        def add(name: str, shape: tuple[int, ...], qtype: str, read: Callable[[], np.ndarray]) -> None:
            out.append(Planned(blk + name, shape, qtype, read))

        def vector(name: str, shape: tuple[int, ...], hf_name: str, cols: slice = slice(None)) -> None:
            add(name, shape, "F32", _float32(source, hf + hf_name, cols))

        vector("attn_norm.weight", (h,), "input_layernorm.weight")
        for proj, rows in (("q", q), ("k", kv), ("v", kv), ("output", h)):
            hf_proj = f"self_attn.{'o' if proj == 'output' else proj}_proj"
            add(f"attn_{proj}.weight", (rows, q if proj == "output" else h), qtype,
                _matrix(source, hf + hf_proj + ".weight", rows, dtype))
            vector(f"attn_{proj}.bias", (rows,), hf_proj + ".bias")
        vector("attn_sinks.weight", (c.num_heads,), "self_attn.sinks")
        vector("post_attention_norm.weight", (h,), "post_attention_layernorm.weight")
        vector("ffn_gate_inp.weight", (e, h), "mlp.router.weight")  # float32, as llama.cpp's converter
        vector("ffn_gate_inp.bias", (e,), "mlp.router.bias")
        for kind, rows in (("gate", slice(0, None, 2)), ("up", slice(1, None, 2))):  # interleaved in gate_up
            add(f"ffn_{kind}_exps.weight", (e, i, h), experts,
                _experts(source, hf + "mlp.experts.gate_up_proj", rows, dtype))
            vector(f"ffn_{kind}_exps.bias", (e, i), "mlp.experts.gate_up_proj_bias", rows)
        add("ffn_down_exps.weight", (e, h, i), experts,
            _experts(source, hf + "mlp.experts.down_proj", slice(None), dtype))
        vector("ffn_down_exps.bias", (e, h), "mlp.experts.down_proj_bias")
    out.append(Planned("output_norm.weight", (h,), "F32", _float32(source, "model.norm.weight")))
    out.append(Planned("output.weight", (c.vocab_size, h), qtype,
                       _matrix(source, "lm_head.weight", c.vocab_size, dtype)))
    return out


def add_metadata(w: gguf.GGUFWriter, config: Config) -> None:
    """The gpt-oss keys llama.cpp reads (`gpt-oss.*`), no vocabulary."""
    import gguf

    w.add_name(config.name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_context_length(config.max_positions)
    w.add_embedding_length(config.hidden)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate)
    w.add_expert_feed_forward_length(config.intermediate)
    w.add_expert_count(config.num_experts)
    w.add_expert_used_count(config.experts_per_token)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_key_length(config.head_dim)  # else llama.cpp takes hidden / heads (45 for gpt-oss)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_eps)
    w.add_sliding_window(config.sliding_window)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(config.rope_factor)
    w.add_rope_scaling_orig_ctx_len(config.rope_original_max_positions)
    w.add_rope_scaling_yarn_beta_fast(config.rope_beta_fast)
    w.add_rope_scaling_yarn_beta_slow(config.rope_beta_slow)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("none")


def _read(tensor: Planned) -> np.ndarray:
    value = np.ascontiguousarray(tensor.read())
    if value.nbytes != tensor.nbytes:  # a bug here, not bad input: the source was validated
        raise AssertionError(f"GGUF tensor {tensor.name}: {value.nbytes} bytes for {tensor.qtype} {tensor.shape}")
    return value


def write_gguf(src: str | os.PathLike, out: str | os.PathLike, dtype: str = "bf16",
               progress: Callable[[str], None] | None = None) -> Path:
    """Writes checkpoint `src` (released HF layout) to the GGUF file `out` (see the module's docstring);
    `dtype` for the non-expert matrices. Returns `out`'s path."""
    import gguf

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    source = open_source(src)
    check_config(source.config, source.directory)
    tensors = plan(source, dtype)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    writer = gguf.GGUFWriter(None, "gpt-oss")
    try:
        add_metadata(writer, source.config)
        for t in tensors:  # (a non-uint8 dtype: `shape` is taken as the values' shape)
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, gguf.GGMLQuantizationType[t.qtype])
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            if progress:
                progress(t.name)
            writer.write_tensor_data(_read(t))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="non-expert matrices (default bf16)")
    args = parser.parse_args(argv)
    print(write_gguf(args.src, args.out, args.dtype, progress=lambda name: print(name, flush=True)))


if __name__ == "__main__":
    main()
