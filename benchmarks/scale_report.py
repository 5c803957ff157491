"""Scale report: what gpt-oss-20b / 120b need per device on 8, 64 and 256 devices, from compiles alone.

    python benchmarks/scale_report.py                       # everything (one child process per device count)
    python benchmarks/scale_report.py --devices 8 --models gpt-oss-20b --formats bf16 --workloads serve

Each case is compiled on the CPU backend from abstract inputs (nothing allocated) on simulated devices
(`--xla_force_host_platform_device_count`, set before jax is imported: a child process per device
count), under the layouts below (the README presets at 8 devices, more replicas / FSDP shards above):

- serve: the engine's decode dispatch (`gptoss_jax.engine.state.decode`, one step) over S slots of a
  C-position KV cache (`--slots-per-device`, `--context`);
- train: the LoRA train step (`gptoss_jax.train.step.make_train_step`) on a global batch of
  rows x sequence (`--rows-per-device`, `--seq`), one micro-batch.

Per device it prints: weights, KV cache, LoRA adapters + optimizer state (from the shardings of the
abstract inputs: `eval_shape` arithmetic), temporaries (`memory_analysis().temp_size_in_bytes`), and
collective bytes per step (from the compiled HLO: every all-gather / all-reduce / reduce-scatter /
all-to-all / collective-permute, times the trip counts of the loops around it, as bytes one device
sends: (g-1)/g of the gathered / reduced array for a group of g, twice that for an all-reduce).
Serving also gets the largest slots x context (cached tokens) that fits one chip of each kind in
`CHIPS`: (memory - weights - temporaries) / cache bytes per token per device (temporaries as measured
at S x C; the sliding layers' ring, fixed per slot, at S); training gets whether the step fits.

Caveats: this is XLA:CPU's program (traced for the CPU: its tiled grouped matmul and, with
`--trace-for cpu`, the all-gather exchange; `--trace-for tpu` traces the TPU choices, whose ragged
all-to-all then compiles as the CPU's stand-in of worst-case slots). The bfloat16 weights enter as
their bits (as the jitted steps get them on CPU): the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30

DEVICE_COUNTS = (8, 64, 256)
MODELS = ("gpt-oss-20b", "gpt-oss-120b")
FORMATS = ("bf16", "mxfp4")
WORKLOADS = ("serve", "train")
LAYOUTS = {
    ("serve", 8): "expert=8",  # the gpu-8 preset
    ("serve", 64): "data=8,expert=8",
    ("serve", 256): "data=32,expert=8",
    ("train", 8): "fsdp=2,expert=4",  # the gpu-8-train preset
    ("train", 64): "data=8,fsdp=2,expert=4",  # (MXFP4 blocks of hidden: 90, so fsdp divides 90)
    ("train", 256): "data=32,fsdp=2,expert=4",
}
CHIPS = {"v5e": 16 * GIB, "v5p": 95 * GIB, "H100": 81559 << 20, "H200": 143771 << 20}
"""Memory per chip (TPU: the HBM as Google gives it; GPU: nvidia-smi's total)."""

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "f4e2m1fn": 1, "f8e8m0fnu": 1}


# ---------------------------------------------------------------------------------------------
# HLO: collective bytes per step

def _shape_bytes(text: str) -> int:
    """Bytes of an HLO shape (an array `f32[4,40]{1,0}` or a tuple of them)."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z\d]*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _group_size(line: str, devices: int) -> int:
    """Devices in one replica group of a collective's HLO line."""
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('[\w]+')=(\d+)", m.group(1)))
        return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(",") if a.strip())
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):
        return int(m.group(2))
    return devices


def collective_bytes(hlo: str, devices: int) -> dict[str, float]:
    """{collective kind: bytes one device sends per execution of the module's entry}, loops unrolled
    by their known trip counts, a conditional counted as its largest branch."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        if m := re.match(r"(ENTRY )?%?([\w.\-]+) .*\{\s*$", line):
            current = m.group(2)
            computations[current] = []
            if m.group(1):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            computations[current].append(line)
    memo: dict[str, dict[str, float]] = {}

    def add(into: dict[str, float], other: dict[str, float], times: float = 1.0) -> None:
        for k, v in other.items():
            into[k] = into.get(k, 0.0) + v * times

    def visit(name: str) -> dict[str, float]:
        if name in memo:
            return memo[name]
        memo[name] = {}
        out: dict[str, float] = {}
        for line in computations.get(name, []):
            m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z\-]+)\(", line)
            if not m:
                continue
            shape, op = m.groups()
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind in COLLECTIVES:
                g = _group_size(line, devices)
                size = _shape_bytes(shape)
                if op.endswith("-start") and shape.startswith("("):  # (operand, result) pairs of async ops
                    size //= 2
                sent = {"all-gather": size * (g - 1) / g, "all-reduce": 2 * size * (g - 1) / g,
                        "reduce-scatter": size * (g - 1), "all-to-all": size * (g - 1) / g,
                        "collective-permute": size}[kind] if g > 1 else 0.0
                add(out, {kind: sent})
            elif op == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                add(out, visit(body), int(trips.group(1)) if trips else 1)
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", line)
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else []
                costs = [visit(b) for b in names]
                if costs:
                    add(out, max(costs, key=lambda c: sum(c.values())))
            else:
                for called in re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line):
                    if op in ("call", "fusion", "async-start", "custom-call"):
                        add(out, visit(called))
        memo[name] = out
        return out

    return visit(entry) if entry else {}


# ---------------------------------------------------------------------------------------------
# One device count's cases (a worker process)

def _local_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    import jax

    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def setup(model: str, fmt: str, spec: str, devices: int):
    """(config, mesh, abstract params placed by the rules, bfloat16 as bits) for a case."""
    import jax
    import jax.numpy as jnp

    import gptoss_jax
    from gptoss_jax import sharding
    from gptoss_jax.ops import bits

    config = gptoss_jax.load_config(model)
    if fmt == "mxfp4":
        config = dataclasses.replace(config, expert_format="mxfp4")
    mesh = sharding.make_mesh(spec, devices=jax.devices()[:devices])
    shardings = sharding.param_shardings(config, mesh)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, bits.BITS if s.dtype == jnp.bfloat16 else s.dtype,
                                                             sharding=sh),
                          gptoss_jax.abstract_params(config, jnp.bfloat16), shardings)
    return config, mesh, params


def serve_inputs(config, mesh, params, slots: int, context: int):
    """(jitted one-step decode, abstract state placed as the engine pins it)."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gptoss_jax import sharding
    from gptoss_jax.engine import state as slot_ops
    from gptoss_jax.ops import bits

    with jax.set_mesh(mesh):
        state = jax.eval_shape(functools.partial(slot_ops.init_state, config, slots, context, jnp.bfloat16, 4, 4))
    cache_specs = sharding.cache_specs(state["cache"], mesh)
    placed = {name: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())),
                                 value) for name, value in state.items() if name != "cache"}
    placed["cache"] = jax.tree.map(
        lambda s, spec: jax.ShapeDtypeStruct(s.shape, bits.BITS if s.dtype == jnp.bfloat16 else s.dtype,
                                             sharding=NamedSharding(mesh, spec)), state["cache"], cache_specs)
    return jax.jit(functools.partial(slot_ops.decode, config, 1), donate_argnums=1), placed


def train_inputs(config, mesh, params, rows: int, seq: int, rank: int):
    """(jitted LoRA train step, abstract state replicated, abstract batch split over the batch axes)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gptoss_jax import sharding
    from gptoss_jax.train.lora import LoraConfig
    from gptoss_jax.train.step import OptimConfig, init_state, make_train_step

    lc, oc = LoraConfig(rank=rank), OptimConfig()
    step = make_train_step(config, params, lc, oc, mesh=mesh).jitted
    replicated = NamedSharding(mesh, P())
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                         jax.eval_shape(lambda: init_state(config, lc, oc)))
    sizes = sharding.axis_sizes(mesh)
    axes = tuple(a for a in sharding.RULES["batch"] if sizes[a] > 1)
    split = NamedSharding(mesh, P(None, axes if len(axes) > 1 else axes[0]) if axes else P())
    batch = {name: jax.ShapeDtypeStruct((1, rows, seq), jnp.float32 if name == "weights" else jnp.int32, sharding=split)
             for name in ("inputs", "targets", "positions", "weights")}
    return step, state, batch


def run_case(model: str, fmt: str, workload: str, devices: int, args: argparse.Namespace,
             compile: bool = True) -> dict[str, Any]:
    """One entry; `compile=False`: the `eval_shape` arithmetic only (no temporaries, no collectives)."""
    import jax

    from gptoss_jax.ops import platform

    spec = LAYOUTS[(workload, devices)]
    config, mesh, params = setup(model, fmt, spec, devices)
    entry: dict[str, Any] = {"model": model, "format": fmt, "workload": workload, "devices": devices, "mesh": spec,
                             "weights": _local_bytes(params)}
    start = time.perf_counter()
    with jax.set_mesh(mesh), platform.lowering_for(args.trace_for):
        if workload == "serve":
            slots = args.slots_per_device * devices
            step, state = serve_inputs(config, mesh, params, slots, args.context)
            entry.update(slots=slots, context=args.context, cache=_local_bytes(state["cache"]))
            # bytes of one more cached token per device: one more position of every full-attention layer
            longer = serve_inputs(config, mesh, params, slots, args.context + 1)[1]["cache"]
            k = state["cache"]["full"]["k"]
            entry["slots_local"] = k.sharding.shard_shape(k.shape)[1]
            entry["cache_per_token"] = (_local_bytes(longer) - entry["cache"]) / entry["slots_local"]
            lowered = step.lower(params, state) if compile else None
        else:
            rows = args.rows_per_device * devices
            step, state, batch = train_inputs(config, mesh, params, rows, args.seq, args.rank)
            entry.update(rows=rows, seq=args.seq, adapters=_local_bytes(state["lora"]),
                         optimizer=_local_bytes(state["opt"]))
            lowered = step.lower(params, state, batch) if compile else None
        if lowered is None:
            return entry
        compiled = lowered.compile()
    entry["compile_seconds"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    entry["temporaries"] = int(memory.temp_size_in_bytes)
    entry["arguments"] = int(memory.argument_size_in_bytes)
    entry["collectives"] = collective_bytes(compiled.as_text(), devices)
    return entry


def fits(entry: dict[str, Any]) -> dict[str, Any]:
    """Serving: the largest cached tokens (slots x context) per chip; training: whether the step fits."""
    out = {}
    for chip, memory in CHIPS.items():
        if entry["workload"] == "serve":
            # the sliding layers' rings (and slot positions): fixed per slot, taken at the measured slots
            ring = entry["cache"] - entry["cache_per_token"] * entry["slots_local"] * entry["context"]
            free = memory - entry["weights"] - entry["temporaries"] - max(0, ring)
            out[chip] = max(0, int(free // entry["cache_per_token"]))
        else:  # every input (weights, adapters, optimizer state, batch) and the temporaries
            out[chip] = entry["arguments"] + entry["temporaries"] <= memory
    return out


def worker(args: argparse.Namespace) -> None:
    results = []
    for model in args.models:
        for fmt in args.formats:
            for workload in args.workloads:
                try:
                    entry = run_case(model, fmt, workload, args.worker, args)
                except Exception as error:  # noqa: BLE001 - a case that fails is reported, the rest still run
                    entry = {"model": model, "format": fmt, "workload": workload, "devices": args.worker,
                             "error": f"{type(error).__name__}: {str(error)[:300]}"}
                print(json.dumps(entry), flush=True)
                results.append(entry)
    Path(args.result).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------------
# The report

def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    entries = []
    for devices in args.devices:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])}
        result = Path(args.json or "/tmp/scale_report.json").with_suffix(f".{devices}.json")
        command = [sys.executable, __file__, "--worker", str(devices), "--result", str(result),
                   *_case_flags(args)]
        proc = subprocess.run(command, env=env, stderr=subprocess.PIPE, text=True, timeout=args.timeout)
        if proc.returncode:
            entries.append({"devices": devices, "error": proc.stderr[-2000:]})
            continue
        entries += json.loads(result.read_text())
    return entries


def _case_flags(args: argparse.Namespace) -> list[str]:
    return ["--models", ",".join(args.models), "--formats", ",".join(args.formats),
            "--workloads", ",".join(args.workloads), "--slots-per-device", str(args.slots_per_device),
            "--context", str(args.context), "--rows-per-device", str(args.rows_per_device), "--seq", str(args.seq),
            "--rank", str(args.rank), "--trace-for", args.trace_for]


def table(entries: list[dict[str, Any]]) -> str:
    """A markdown table of the entries."""
    g = lambda n: f"{n / GIB:.2f}"
    lines = ["| model | experts | workload | devices (mesh) | shape | weights GiB | cache GiB | adapters+opt GiB "
             "| temp GiB | collectives MiB/step | " + " | ".join(CHIPS) + " |",
             "|" + "---|" * (10 + len(CHIPS))]
    for e in entries:
        if "error" in e:
            lines.append(f"| {e.get('model', '')} | {e.get('format', '')} | {e.get('workload', '')} | "
                         f"{e.get('devices')} | error: {e['error'][:80]} |")
            continue
        fit = fits(e)
        comm = sum(e["collectives"].values()) / (1 << 20)
        if e["workload"] == "serve":
            shape = f"{e['slots']} slots x {e['context']}"
            cache, state = g(e["cache"]), "-"
            chips = [f"{fit[c] / 1000:.0f}k" for c in CHIPS]
        else:
            shape = f"{e['rows']} x {e['seq']}"
            cache, state = "-", g(e["adapters"] + e["optimizer"])
            chips = ["fits" if fit[c] else "no" for c in CHIPS]
        lines.append(f"| {e['model']} | {e['format']} | {e['workload']} | {e['devices']} ({e['mesh']}) | {shape} | "
                     f"{g(e['weights'])} | {cache} | {state} | {g(e['temporaries'])} | {comm:.1f} | "
                     + " | ".join(chips) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    split = lambda s: [x for x in s.split(",") if x]
    parser.add_argument("--devices", type=lambda s: [int(x) for x in split(s)], default=list(DEVICE_COUNTS))
    parser.add_argument("--models", type=split, default=list(MODELS))
    parser.add_argument("--formats", type=split, default=list(FORMATS))
    parser.add_argument("--workloads", type=split, default=list(WORKLOADS))
    parser.add_argument("--slots-per-device", type=int, default=4)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--rows-per-device", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--trace-for", default="cpu", choices=("cpu", "tpu", "cuda"))
    parser.add_argument("--json", help="write the entries here")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    entries = run_all(args)
    if args.json:
        Path(args.json).write_text(json.dumps(entries, indent=1))
    print(table(entries))


if __name__ == "__main__":
    main()
