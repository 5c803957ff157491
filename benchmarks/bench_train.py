"""LoRA training step, gptoss-jax vs transformers + peft, side by side in one run.

    python benchmarks/bench_train.py [--steps 3] [--seq 512] [--config configs/bench.json]

Both sides: the same config (configs/bench.json), float32, CPU, batch 1 x SEQ tokens, loss on every
token, LoRA rank 8 (alpha 16) on q/k/v/o and on every layer's experts (peft: `target_modules` +
`target_parameters` mlp.experts.gate_up_proj / down_proj; ours: per-expert adapters inside the
grouped matmul), AdamW. Each side runs in its own process, so that its peak RSS is its own.

Reported per side: tokens/s (median step after a warm-up step), GFLOP/s counted as 6 x active
non-embedding parameters x tokens (the convention of the issue's figures), RSS after the weights
are in memory, RSS just before the first step (after XLA's compilation), peak RSS during the
steps, and activations = peak - that RSS. For gptoss-jax also XLA's own figure for
the step's temporary buffers (`memory_analysis().temp_size_in_bytes`). Then the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import common
from common import REPO

RANK, ALPHA = 8, 16


def gb(nbytes: int) -> float:
    """The table's unit: kB of /proc/self/status / 1e6 (as these figures have always been reported)."""
    return nbytes / 1024 / 1e6


def timed_steps(step: Callable[[], float], steps: int) -> tuple[float, list[float]]:
    """Runs `step()` (returns the loss) `steps` + 1 times: the median seconds after the first (with
    `steps` 0: the one step's, compilation excluded either way), the losses."""
    times, losses = [], []
    for _ in range(steps + 1):
        tick = time.perf_counter()
        losses.append(float(step()))
        times.append(time.perf_counter() - tick)
    return common.median(times[1:] or times), losses


def run_jax(config_path: str, seq: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gptoss_jax
    from gptoss_jax.train import lora as lora_lib
    from gptoss_jax.train import step as step_lib

    config = gptoss_jax.load_config(config_path)
    params = gptoss_jax.init_params(config, seed=0, dtype=jnp.float32)
    jax.block_until_ready(params)
    lc = lora_lib.LoraConfig(rank=RANK, alpha=ALPHA)
    oc = step_lib.OptimConfig(learning_rate=1e-4, warmup_steps=0, total_steps=100)
    state = step_lib.init_state(config, lc, oc)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (1, 1, seq + 1)).astype(np.int32)
    batch = {"inputs": jnp.asarray(tokens[..., :-1]), "targets": jnp.asarray(tokens[..., 1:]),
             "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (1, 1, seq)),
             "weights": jnp.ones((1, 1, seq), jnp.float32)}
    jax.block_until_ready((state, batch))
    weights_gb = gb(common.rss())
    train_step = step_lib.make_train_step(config, params, lc, oc, remat="full", loss_chunk=128)
    compiled = train_step.jitted.lower(params, state, batch).compile()
    temp_gb = compiled.memory_analysis().temp_size_in_bytes / 1e9
    before_gb = gb(common.reset_high_water_rss())

    def step() -> float:
        nonlocal state
        state, metrics = train_step(state, batch)
        return metrics["loss"]

    step_s, losses = timed_steps(step, steps)
    return {"step_s": step_s, "weights_gb": weights_gb, "before_gb": before_gb,
            "peak_gb": gb(common.high_water_rss()), "xla_temp_gb": temp_gb, "losses": losses}


def run_torch(config_path: str, seq: int, steps: int) -> dict:
    import peft
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    hf = json.loads(Path(config_path).read_text())
    rope = dict(hf.pop("rope_scaling"), rope_theta=hf.pop("rope_theta"))
    config = transformers.GptOssConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")},
                                       rope_parameters=rope, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).float()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    model.train()
    weights_gb = gb(common.rss())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    before_gb = gb(common.reset_high_water_rss())

    def step() -> float:
        loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step_s, losses = timed_steps(step, steps)
    return {"step_s": step_s, "weights_gb": weights_gb, "before_gb": before_gb,
            "peak_gb": gb(common.high_water_rss()), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "bench.json"))
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--side", choices=["both", "jax", "torch"], default="both")
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side != "both":  # one side: its figures as JSON to --result, else a RESULT line on stdout
        common.write_result(args.result, (run_jax if args.side == "jax" else run_torch)(args.config, args.seq,
                                                                                        args.steps))
        return

    import gptoss_jax
    from gptoss_jax.params import count_params

    config = gptoss_jax.load_config(args.config)
    flop_per_token = 6 * count_params(config)["active"]
    results = {}
    for side in ("torch", "jax"):
        results[side] = common.run_worker(__file__, ["--side", side, "--config", args.config, "--seq", str(args.seq),
                                                     "--steps", str(args.steps)], side, quiet=True)
        if "error" in results[side]:
            sys.exit(f"{side} side failed: {results[side]['error']}")
        results[side].pop("worker_seconds")
    print(f"config {Path(args.config).name}, float32, CPU, batch 1 x {args.seq}, LoRA rank {RANK} on q/k/v/o + "
          f"every layer's experts; {flop_per_token / 1e9:.2f} GFLOP per token (6 x active params)")
    names, rows = {"torch": "transformers + peft", "jax": "gptoss-jax"}, []
    for side, r in results.items():
        tps = args.seq / r["step_s"]
        r["tokens_per_s"], r["activations_gb"] = tps, r["peak_gb"] - r["before_gb"]
        rows.append((names[side], *(f"{v:.{2 if i > 1 else 1}f}" for i, v in enumerate(
            (tps, tps * flop_per_token / 1e9, r["weights_gb"], r["before_gb"], r["peak_gb"], r["activations_gb"])))))
    common.print_table(rows, (10, 10, 12, 11, 10, 11), first=22, header=(
        "", "tokens/s", "GFLOP/s", "weights GB", "before GB", "peak GB", "activ. GB"))
    j, t = results["jax"], results["torch"]
    print(f"gptoss-jax / transformers+peft: {j['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s (bar >= 1.3x); "
          f"activations {j['activations_gb'] / t['activations_gb']:.2f}x (bar <= 0.33x); XLA temp buffers "
          f"{j['xla_temp_gb']:.2f} GB; first-step losses {t['losses'][0]:.3f} / {j['losses'][0]:.3f}")


if __name__ == "__main__":
    main()
