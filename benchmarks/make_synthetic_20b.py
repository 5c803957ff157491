"""Writes a synthetic gpt-oss-20b checkpoint: the release's tensor names, shapes and dtypes, random values.

    python benchmarks/make_synthetic_20b.py DIR [--config gpt-oss-20b] [--max-shard-gb 4.5] [--seed 0]

Layout as on the Hub (openai/gpt-oss-20b): config.json with `quantization_config` (mxfp4), experts as
MXFP4 `*_blocks` / `*_scales` uint8, everything else bfloat16, ~13 GB sharded into several
`model-0000i-of-0000n.safetensors` files with `model.safetensors.index.json`. Written tensor by tensor,
one expert (or <= 64 MiB of rows) at a time: memory stays at a few tens of MB whatever the model.
Values: random bytes for blocks, e8m0 scales around 2**-6 (weights of realistic magnitude), normal
bfloat16 with std 0.02 for other weights, ~1 for norm scales. For benchmarks (conversion speed and
memory), not for checking numerics.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss_jax import checkpoint as ck
from gptoss_jax.config import load_config

ROW_CHUNK_BYTES = 64 << 20


def random_chunks(rng: np.random.Generator, name: str, shape: tuple[int, ...], kind: str) -> Iterator[np.ndarray]:
    """The tensor's values in chunks along its first axis (<= ROW_CHUNK_BYTES each)."""
    itemsize = 1 if kind == "uint8" else 2
    rows = max(1, ROW_CHUNK_BYTES // (math.prod(shape[1:]) * itemsize)) if len(shape) > 1 else shape[0]
    for start in range(0, shape[0], rows):
        part = (min(rows, shape[0] - start), *shape[1:])
        if name.endswith("_blocks"):
            yield rng.integers(0, 256, part, dtype=np.uint8)
        elif name.endswith("_scales"):
            yield rng.integers(119, 124, part, dtype=np.uint8)
        elif name.endswith(("layernorm.weight", "norm.weight")):
            yield (1 + 0.1 * rng.standard_normal(part, dtype=np.float32)).astype(ml_dtypes.bfloat16)
        else:
            yield (0.02 * rng.standard_normal(part, dtype=np.float32)).astype(ml_dtypes.bfloat16)


def synthetic_plan(config_name: str, seed: int) -> tuple[list[ck.OutTensor], dict]:
    config = load_config(config_name)
    rng = np.random.default_rng(seed)
    plan = []
    for name, (shape, kind) in ck.stored_tensor_specs(config, quantized=True).items():
        dtype = np.dtype(np.uint8) if kind == "uint8" else np.dtype(ml_dtypes.bfloat16)
        plan.append(ck.OutTensor(name, dtype, shape, functools.partial(random_chunks, rng, name, shape, kind)))
    return plan, ck.exported_config_dict(config, ml_dtypes.bfloat16, quantized=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--config", default="gpt-oss-20b")
    parser.add_argument("--max-shard-gb", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dir.exists() and any(args.dir.iterdir()):
        sys.exit(f"{args.dir} exists and is not empty")
    args.dir.mkdir(parents=True, exist_ok=True)
    plan, config = synthetic_plan(args.config, args.seed)
    total = sum(t.nbytes for t in plan)
    start = time.perf_counter()
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="synthetic") as bar:
        files = ck.write_sharded_safetensors(args.dir, plan, int(args.max_shard_gb * 1e9), bar.update)
    (args.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {len(plan)} tensors, {total / 1e9:.2f} GB in {len(files)} files to {args.dir} "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
