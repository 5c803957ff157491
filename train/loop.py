"""The finetune command: `gptoss-jax finetune --config configs/finetune-<run>.toml [--resume]`.

A run file (TOML) has sections `[model]` (path: an Orbax checkpoint from `convert`, a Hugging Face
directory, or `random:CONFIG`; dtype), `[data]` (path, format, tokenizer, seq_len, batch_size: the
global micro-batch in rows, accumulation, seed, on_error, packing: several examples per row, see
`data.Batches`), `[lora]` (`LoraConfig`), `[optim]` (`OptimConfig`) and `[train]` (steps, mesh,
remat, loss_chunk, seed, output_dir, checkpoint_every, keep_checkpoints, export). See
`configs/finetune-example.toml`.

In `output_dir`: `checkpoints/` (Orbax CheckpointManager, asynchronous, the last
`keep_checkpoints`: adapters, optimizer state, step, and the data position), `metrics.jsonl` (one
line per step: step, loss, tokens, tokens_per_s, grad_norm, lr), `loss.png` at the end, and the
exports named in `train.export`: `peft` (adapter_config.json + adapter_model.safetensors), `merged`
(an Orbax checkpoint like `convert` writes: `load_model`, `generate`, `export` take it), `hf`
(the merged model in Hugging Face safetensors, through `checkpoint.export_checkpoint`).

`--resume` restores the latest checkpoint and continues; batches are a pure function of the step
(`data.Batches`; with packing, of the step and the checkpointed data position), so a run killed and
resumed logs the same losses as one never interrupted. A NaN
or infinite loss stops the run with its step; the step's update is not applied and no checkpoint
is written after it, so the last good checkpoint stays the latest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gptoss_jax.train import data as data_lib
from gptoss_jax.train import lora as lora_lib
from gptoss_jax.train import step as step_lib



class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    mesh: str = ""
    remat: str | None = "full"
    loss_chunk: int = 128
    seed: int = 0
    output_dir: str = "runs/finetune"
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    export: tuple[str, ...] = ("peft",)
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: dict[str, Any]
    data: dict[str, Any]
    lora: lora_lib.LoraConfig
    optim: step_lib.OptimConfig
    train: TrainSettings
    source: str = ""


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """Parses a finetune TOML file (unknown keys are errors naming the section)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: {err}") from None
    unknown = set(raw) - {"model", "data", "lora", "optim", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}")
    model = dict(raw.get("model", {}))
    if "path" not in model:
        raise ValueError(f"{path}: [model] needs path (checkpoint directory or random:CONFIG)")
    data = dict(raw.get("data", {}))
    known_data = {"path", "format", "tokenizer", "seq_len", "batch_size", "accumulation", "seed", "on_error",
                  "packing"}
    if set(data) - known_data or "path" not in data:
        raise ValueError(f"{path}: [data] needs path; known keys {sorted(known_data)}, got {sorted(data)}")
    if not isinstance(data.get("packing", False), bool):
        raise ValueError(f"{path}: [data] packing must be true or false, got {data['packing']!r}")
    if not Path(data["path"]).exists() and (path.parent / data["path"]).exists():  # relative to the run file
        data["path"] = str(path.parent / data["path"])
    train = dict(raw.get("train", {}))
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    if set(train) - fields:
        raise ValueError(f"{path}: unknown [train] keys {sorted(set(train) - fields)}")
    if "export" in train:
        train["export"] = tuple(train["export"])
    if train.get("remat") in ("none", ""):
        train["remat"] = None
    optim = dict(raw.get("optim", {}))
    optim.setdefault("total_steps", train.get("steps", TrainSettings.steps))
    return RunConfig(model, data, lora_lib.LoraConfig.from_dict(raw.get("lora", {})),
                     step_lib.OptimConfig.from_dict(optim), TrainSettings(**train), str(path))


def _load_model(spec: dict[str, Any], mesh: Any, replicated: bool, seed: int) -> tuple[Any, Any]:
    from gptoss_jax.config import load_config
    from gptoss_jax.params import init_params

    dtype = jnp.dtype(spec.get("dtype", "bfloat16"))
    path = str(spec["path"])
    if path.startswith("random:"):
        config = load_config(path.removeprefix("random:"))
        params = init_params(config, seed=int(spec.get("seed", seed)), dtype=dtype,
                             mesh=None if replicated else mesh)
    else:
        from gptoss_jax.checkpoint import load_model

        config, params = load_model(path, mesh=None if replicated else mesh, dtype=dtype)
    if replicated and mesh is not None:
        params = step_lib.replicate(jax.device_get(params), mesh)
    return config, params


def _checkpoint_manager(directory: Path, keep: int) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "data"))


def _save(manager: Any, step: int, state: Any, position: dict[str, int]) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(position)))


def _restore(manager: Any, abstract_state: Any) -> tuple[int, Any, dict[str, int]]:
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                               data=ocp.args.JsonRestore()))
    return step, restored["state"], dict(restored["data"])


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to_step]


def plot_losses(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """loss.png: loss per step (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def finetune(run: RunConfig | str | os.PathLike, *, resume: bool = False) -> dict[str, Any]:
    """Runs (or resumes) a fine-tuning run; returns {"losses": [...], "step", "output_dir", ...}.

    Raises TrainingDiverged on a NaN / infinite loss (after the last good checkpoint is on disk)."""
    if not isinstance(run, RunConfig):
        run = load_run_config(run)
    t = run.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = None
    if t.mesh:
        from gptoss_jax.sharding import make_mesh

        mesh = make_mesh(t.mesh)
    replicated = mesh is not None and not step_lib._has_model_split(mesh)
    config, params = _load_model(run.model, mesh, replicated, t.seed)

    d = run.data
    if not 1 <= int(d.get("seq_len", 512)) <= config.max_positions:
        raise ValueError(f"[data] seq_len = {d.get('seq_len')}: must be between 1 and the model's context of "
                         f"{config.max_positions} positions")
    dataset = data_lib.Dataset(d["path"], seq_len=int(d.get("seq_len", 512)), vocab_size=config.vocab_size,
                               fmt=d.get("format", "auto"), on_error=d.get("on_error", "skip"),
                               tokenizer=d.get("tokenizer", "harmony"))
    batches = data_lib.Batches(dataset, batch_size=int(d.get("batch_size", 8)),
                               accumulation=int(d.get("accumulation", 1)), seed=int(d.get("seed", 0)),
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               pad_id=config.pad_token_id if config.pad_token_id < config.vocab_size else 0,
                               packing=d.get("packing", False))

    state = step_lib.init_state(config, run.lora, run.optim, t.seed)
    if mesh is not None:  # adapters and optimizer state are small: every device holds them whole
        state = step_lib.replicate(jax.device_get(state), mesh)
    manager = _checkpoint_manager(out / "checkpoints", t.keep_checkpoints)
    metrics_path = out / "metrics.jsonl"
    start = 0
    if manager.latest_step() is not None:
        if not resume:
            raise FileExistsError(f"{out / 'checkpoints'} holds checkpoints (latest step {manager.latest_step()}): "
                                  "pass --resume to continue, or choose another output_dir")
        start, state, position = _restore(manager, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
        if position.get("packing", False) != batches.packing:
            raise ValueError(f"{out / 'checkpoints'}: written with packing = {position.get('packing', False)}, "
                             f"resumed with packing = {batches.packing}: the data order would change")
        batches.seek(start, position["examples_consumed"])
    rows = _read_metrics(metrics_path, start)
    if jax.process_index() == 0:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    train_step = step_lib.make_train_step(config, params, run.lora, run.optim, mesh=mesh, remat=t.remat,
                                          loss_chunk=t.loss_chunk, seed=t.seed)
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=start, desc="finetune", unit="step",
               disable=not t.progress or jax.process_index() != 0)
    last_saved = manager.latest_step()
    try:
        for step in range(start, t.steps):
            tick = time.perf_counter()
            batch = step_lib.shard_batch(batches.batch(step), mesh)
            state, metrics = train_step(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - tick
            if not metrics["finite"]:
                manager.wait_until_finished()
                raise TrainingDiverged(f"loss is {metrics['loss']} at step {step + 1}; stopped. Last good "
                                       f"checkpoint: step {manager.latest_step()} in {out / 'checkpoints'}")
            row = {"step": step + 1, "loss": metrics["loss"], "tokens": int(metrics["tokens"]),
                   "tokens_per_s": float(batches.rows_per_step * dataset.seq_len / elapsed),
                   "grad_norm": metrics["grad_norm"], "lr": metrics["lr"], "truncated": dataset.truncated}
            rows.append(row)
            if jax.process_index() == 0:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps:
                _save(manager, step + 1, state, {"examples_consumed": batches.position(step + 1),
                                                 "packing": batches.packing})
                last_saved = step + 1
    finally:
        bar.close()
        manager.wait_until_finished()
    manager.close()

    summary: dict[str, Any] = {"losses": [r["loss"] for r in rows], "step": t.steps, "output_dir": str(out),
                               "skipped_lines": dataset.skipped, "truncated": dataset.truncated,
                               "last_checkpoint": last_saved}
    if jax.process_index() == 0:
        summary["plot"] = str(plot_losses(rows, out / "loss.png"))
        lora = jax.device_get(state["lora"])
        base = str(run.model["path"])
        if "peft" in t.export:
            summary["peft"] = str(lora_lib.save_peft(out / "peft", config, lora, run.lora, base_model=base))
        if "merged" in t.export or "hf" in t.export:
            merged = lora_lib.merge(config, jax.device_get(params), lora, run.lora)
            summary["merged"] = str(save_merged(out / "merged", config, merged))
            if "hf" in t.export:
                from gptoss_jax.checkpoint import export_checkpoint

                dtype = jnp.dtype(run.model.get("dtype", "bfloat16"))
                summary["hf"] = str(export_checkpoint(out / "merged", out / "hf", force=True, dtype=dtype,
                                                      progress=False))
    return summary


def save_merged(directory: Path, config: Any, params: Any) -> Path:
    """Writes merged params as a converted checkpoint (`params/` Orbax + config.json), like `convert`."""
    import shutil

    import orbax.checkpoint as ocp

    from gptoss_jax.checkpoint import CONFIG_FILE, PARAMS_DIR, converted_config_dict

    directory = Path(directory).absolute()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    dtype = params["layers"]["full"]["attn"]["q"].dtype
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)
    (directory / CONFIG_FILE).write_text(json.dumps(converted_config_dict(config, dtype), indent=2) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------
# command line

def cmd_finetune(args: argparse.Namespace) -> int:
    """`gptoss-jax finetune --config RUN.toml [--resume]`."""
    try:
        summary = finetune(args.config, resume=args.resume)
    except TrainingDiverged as err:
        print(f"gptoss-jax finetune: {err}", file=sys.stderr)
        return 1
    losses = summary["losses"]
    print(f"finetune: {summary['step']} steps, final loss {losses[-1]:.4f}; wrote {summary['output_dir']}"
          + (f" ({len(summary['skipped_lines'])} malformed lines skipped)" if summary["skipped_lines"] else "")
          + (f" ({summary['truncated']} examples truncated)" if summary["truncated"] else ""), file=sys.stderr)
    return 0


def add_finetune_command(commands: Any) -> argparse.ArgumentParser:
    """Adds `finetune` to the CLI's subparsers (`commands` from `parser.add_subparsers`)."""
    parser = commands.add_parser("finetune", help="LoRA fine-tuning on JSONL harmony conversations")
    parser.add_argument("--config", required=True, help="run file (TOML), e.g. configs/finetune-example.toml")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.set_defaults(run=cmd_finetune)
    return parser
