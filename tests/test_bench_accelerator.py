"""benchmarks/bench_accelerator.py --quick runs on CPU (tiny sizes): both expert formats, decode and
prefill, each with a roofline fraction, so the one-shot device run is known to work before a device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_accelerator  # noqa: E402


@pytest.mark.slow
def test_quick_run_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    result = bench_accelerator.main(["--quick", "--config", "tiny-mxfp4", "--batches", "1", "--prefill", "32",
                                     "--context", "64", "--steps", "2", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(result["results"]))
    kinds = {(r["format"], r["kind"], r.get("batch", r.get("tokens"))) for r in result["results"]}
    assert kinds == {(f, "decode", 1) for f in ("bf16", "mxfp4")} \
        | {(f, "prefill", 32) for f in ("bf16", "mxfp4")}, kinds
    assert not result["skipped"] and result["copy_bandwidth"] > 0 and result["matmul_peak"] > 0
    for r in result["results"]:
        assert r["tokens_per_second"] > 0 and 0 < r["roofline"] and r["bytes_per_step"] > 0 and r["flops_per_step"] > 0


def test_flops_per_token_counts_top_k_experts():
    import dataclasses

    import gptoss_jax

    config = gptoss_jax.load_config("gpt-oss-20b")
    flops = bench_accelerator.flops_per_token(config, 0, logits=False)
    # ~3.6 B active parameters without the embedding and unembedding (the release: 3.6 B active with them: 4.2 B)
    assert 2 * 2.9e9 < flops < 2 * 3.7e9, flops / 2
    mxfp4 = dataclasses.replace(config, expert_format="mxfp4")
    assert bench_accelerator.flops_per_token(mxfp4, 0, logits=False) == flops
    more = bench_accelerator.flops_per_token(config, 1000, logits=True) - flops
    window = min(config.sliding_window, 1000)
    attention = 4 * config.num_heads * config.head_dim * (12 * window + 12 * 1000)
    assert more == 2 * config.vocab_size * config.hidden + attention
