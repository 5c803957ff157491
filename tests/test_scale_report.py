"""benchmarks/scale_report.py: its entries against `eval_shape` arithmetic, its HLO collective count on
a hand-written module, and a tiny serving case compiled end to end (8 devices; training's arithmetic without its compile)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import pytest

import gptoss_jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale_report  # noqa: E402

HLO = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %x = f32[4,4]{1,0} get-tuple-element(%p), index=1
  %all-gather.1 = f32[8,4]{1,0} all-gather(%x), channel_id=1, replica_groups={{0,1},{2,3}}, dimensions={0}
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %all-gather.1)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%small (a: f32[2]) -> f32[2] {
  ROOT %ar = f32[2]{0} all-reduce(%a), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
}

%large (a: f32[2]) -> f32[16] {
  ROOT %ar = f32[16]{0} all-reduce(%a), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
}

ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %w = (s32[], f32[8,4]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %c = f32[16]{0} conditional(%pr, %a, %a), branch_computations={%small, %large}
  %rs = bf16[4]{0} reduce-scatter(%b), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  ROOT %r = f32[8,4]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_of_a_hand_written_module():
    got = scale_report.collective_bytes(HLO, devices=8)
    assert got["all-gather"] == 3 * 8 * 4 * 4 / 2  # 3 trips x 128 bytes x (2 - 1) / 2
    assert got["all-reduce"] == 2 * 16 * 4 * 3 / 4  # the larger branch, twice (g - 1) / g of 64 bytes
    assert got["reduce-scatter"] == 4 * 2 * 3  # the result (8 bytes) from each of the other 3


@pytest.mark.parametrize("model, fmt", [("gpt-oss-20b", "bf16"), ("gpt-oss-120b", "mxfp4")])
def test_weights_per_device_on_expert_8(model, fmt):
    """gpu-8 (expert=8): every weight with an experts axis in eighths, every other one whole."""
    config, mesh, params = scale_report.setup(model, fmt, "expert=8", 8)
    is_axes = lambda a: isinstance(a, tuple) and all(isinstance(n, str) for n in a)
    expected = jax.tree.map(lambda names, leaf: leaf.size * leaf.dtype.itemsize // (8 if "experts" in names else 1),
                            gptoss_jax.logical_axes(config), params, is_leaf=is_axes)
    assert scale_report._local_bytes(params) == sum(jax.tree.leaves(expected))


def test_tiny_cases_compiled():
    args = argparse.Namespace(slots_per_device=2, context=256, rows_per_device=1, seq=64, rank=4, trace_for="cpu")
    config = gptoss_jax.load_config("tiny-ep")
    serve = scale_report.run_case("tiny-ep", "bf16", "serve", 8, args)
    # the cache: batch 16 split 8 ways; one more position adds a full layer's K and V (bf16) and its int32 position
    per_token = 2 * config.num_layer_pairs * config.num_kv_heads * config.head_dim * 2 + 4
    assert serve["slots_local"] == 2 and serve["cache_per_token"] == per_token
    cache = jax.eval_shape(lambda: gptoss_jax.cache.init_cache(config, 16, 256))
    assert serve["cache"] == sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache)) // 8
    assert serve["temporaries"] > 0 and sum(serve["collectives"].values()) > 0

    train = scale_report.run_case("tiny-ep", "bf16", "train", 8, args, compile=False)  # (compiling it: ~30 s)
    from gptoss_jax.train.lora import LoraConfig
    from gptoss_jax.train.step import OptimConfig, init_state

    state = jax.eval_shape(lambda: init_state(config, LoraConfig(rank=4), OptimConfig()))
    nbytes = lambda tree: sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
    assert train["adapters"] == nbytes(state["lora"]) and train["optimizer"] == nbytes(state["opt"])
    assert train["rows"] == 8 and "temporaries" not in train
    train.update(temporaries=1 << 30, arguments=0, collectives={})

    fit = scale_report.fits({**serve, "weights": 0, "temporaries": 0})
    ring = serve["cache"] - per_token * 2 * 256
    assert fit["v5e"] == (16 * (1 << 30) - ring) // per_token
    assert scale_report.fits({**train, "arguments": 200 << 30})["H200"] is False
    assert "| tiny-ep | bf16 | serve | 8 (expert=8) | 16 slots x 256 |" in scale_report.table([serve, train])
