"""The train step: masked, chunked cross-entropy; LoRA gradients; optax AdamW; one `jax.jit`.

    state = init_state(config, lora_config, optim_config, seed)      # {"step", "lora", "opt"}
    train_step = make_train_step(config, params, lora_config, optim_config, mesh=mesh)
    state, metrics = train_step(state, batch)                        # state donated

A batch is a dict of arrays with a leading gradient-accumulation axis:
`inputs`, `targets`, `positions` int32 and `weights` float32, each [accum, batch, seq], and with
packed rows `segments` int32 (1, 2, ... per example in a row, 0 on padding; see `data.fill_rows`).
`weights` is 1 on the tokens the loss counts (assistant tokens), 0 elsewhere; `positions` is -1 on
padding (and restarts at 0 for each packed example). The
loss is sum(weights * cross-entropy) / sum(weights) over the whole global batch (all micro-batches,
all hosts), so accumulation and the number of hosts change nothing but rounding.

Base weights are an argument of the jitted step (never a constant, never donated), outside `state`:
no gradient, no optimizer state. The adapters are float32 whatever the base dtype.

Memory: each layer pair is rematerialized in the backward pass (`remat="full"`: only the residual
stream between pairs is kept), and the cross-entropy runs over chunks of `loss_chunk` token rows
under `jax.checkpoint`, so the [tokens, vocab] logits never exist at once (gpt-oss's vocabulary is
201088: 512 tokens' float32 logits alone are 412 MB).

On a mesh: the batch is split over the mesh's batch axes (`gptoss_jax.sharding.rules.RULES["batch"]`).
When the mesh has no expert / tensor split, the whole loss runs inside `jax.shard_map`, one model
replica per device (pure data parallelism; gradients summed with one psum), which is also what
multi-host runs use.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gptoss_jax import adapted, model as model_lib
from gptoss_jax.config import Config
from gptoss_jax.ops import bits
from gptoss_jax.params import Params
from gptoss_jax.sharding import axis_sizes, rules
from gptoss_jax.train.lora import LoraConfig, check_settings, init_lora, model_adapters

Batch = dict[str, jax.Array]
State = dict[str, Any]
BATCH_KEYS = ("inputs", "targets", "positions", "weights")  # and optionally "segments" (packed rows)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `end_lr_ratio * learning_rate`, and global-norm
    gradient clipping."""

    learning_rate: float = 1e-4
    warmup_steps: int = 10
    total_steps: int = 1000
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> OptimConfig:
        check_settings(cls, raw, "optimizer")
        return cls(**raw)


def schedule(oc: OptimConfig) -> optax.Schedule:
    warmup = max(0, min(oc.warmup_steps, oc.total_steps - 1))
    return optax.warmup_cosine_decay_schedule(0.0 if warmup else oc.learning_rate, oc.learning_rate, warmup,
                                              max(oc.total_steps, warmup + 1), oc.learning_rate * oc.end_lr_ratio)


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(oc.clip_norm),
                       optax.adamw(schedule(oc), oc.b1, oc.b2, oc.eps, weight_decay=oc.weight_decay))


def init_state(config: Config, lc: LoraConfig, oc: OptimConfig, seed: int = 0) -> State:
    """{"step": int32 scalar, "lora": fresh adapters, "opt": AdamW state for the adapters only},
    committed to this process's first device, as the step's outputs are (an uncommitted first state
    compiled the step a second time at step 2: 5 s for tiny-a, the longest compile of a run)."""
    lora = init_lora(config, lc, seed)
    state = {"step": jnp.zeros((), jnp.int32), "lora": lora, "opt": make_optimizer(oc).init(lora)}
    return jax.device_put(state, jax.local_devices()[0])


# ---------------------------------------------------------------------------------------------
# loss

def chunked_cross_entropy(hidden: jax.Array, unembed: jax.Array, targets: jax.Array, weights: jax.Array,
                          chunk: int = 128) -> jax.Array:
    """sum(weights * (logsumexp(logits) - logits[target])) for hidden [..., d], unembed [v, d],
    targets / weights [...], without materializing more than [chunk, v] logits (each chunk's logits
    are recomputed in the backward pass). Float32."""
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t, w = targets.reshape(-1), weights.reshape(-1).astype(jnp.float32)
    rows = h.shape[0]
    chunk = max(1, min(chunk, rows))
    pad = -rows % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t, w = jnp.pad(t, (0, pad)), jnp.pad(w, (0, pad))
    n = h.shape[0] // chunk

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(total: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        h_c, t_c, w_c = xs
        logits = jnp.einsum("nd,vd->nv", h_c.astype(unembed.dtype), unembed, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return total + jnp.sum((lse - picked) * w_c), None

    total, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32),
                            (h.reshape(n, chunk, d), t.reshape(n, chunk), w.reshape(n, chunk)))
    return total


def loss_sums(config: Config, params: Params, adapters: Params | None, micro: Batch, *,
              remat: str | None = "full", loss_chunk: int = 128) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights) of one micro-batch [b, t]; `adapters` as
    `forward(..., lora=)` takes them (`lora.model_adapters`); packed rows' `segments` go to attention."""
    model = model_lib.build(config, adapted.attach(params, adapters))
    x, _, _ = model(micro["inputs"], micro["positions"], remat=remat, segments=micro.get("segments"))
    total = chunked_cross_entropy(x, bits.read(params["unembed"]), micro["targets"], micro["weights"], loss_chunk)
    return total, jnp.sum(micro["weights"].astype(jnp.float32))


def loss_fn(config: Config, params: Params, lora: Params, lc: LoraConfig, micro: Batch, **kwargs: Any) -> jax.Array:
    """Mean weighted cross-entropy of one micro-batch [b, t] (no dropout)."""
    total, count = loss_sums(config, params, model_adapters(lora, lc), micro, **kwargs)
    return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------------
# the step

def _batch_axes(mesh: jax.sharding.Mesh | None) -> tuple[str, ...]:
    if mesh is None:
        return ()
    sizes = axis_sizes(mesh)
    return tuple(a for a in rules.RULES["batch"] if sizes.get(a, 1) > 1)


def make_train_step(config: Config, params: Params, lc: LoraConfig, oc: OptimConfig, *,
                    mesh: jax.sharding.Mesh | None = None, remat: str | None = "full", loss_chunk: int = 128,
                    seed: int = 0, donate: bool = True) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """`train_step(state, batch) -> (state, metrics)`, one jitted program (params passed as an argument).

    metrics: `loss` (mean over the global batch's weighted tokens), `tokens` (their count),
    `grad_norm` (before clipping), `lr`, `finite` (False: the loss or gradients were NaN/inf and the
    state was left unchanged, step included)."""
    jitted = _jitted_step(config, lc, oc, mesh, remat, loss_chunk, seed, donate)
    per_device = mesh is not None and not _has_model_split(mesh)
    base = bits.as_bits(params)  # no copy; see `gptoss_jax.ops.bits`

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        if mesh is not None and not per_device:
            with jax.set_mesh(mesh):
                return jitted(base, state, batch)
        return jitted(base, state, batch)

    train_step.jitted = jitted  # type: ignore[attr-defined]
    return train_step


@functools.lru_cache(maxsize=16)
def _jitted_step(config: Config, lc: LoraConfig, oc: OptimConfig, mesh: jax.sharding.Mesh | None,
                 remat: str | None, loss_chunk: int, seed: int, donate: bool) -> Callable:
    """The jitted `step(params, state, batch)`, one per setting: runs with the same settings (a run
    and its resumption, in one process) share its traces and compilations."""
    optimizer = make_optimizer(oc)
    lr_schedule = schedule(oc)
    batch_axes = _batch_axes(mesh)
    per_device = mesh is not None and not _has_model_split(mesh)

    def grads_and_sums(params: Params, lora: Params, batch: Batch, key: jax.Array):
        def micro_step(carry, micro_and_index):
            micro, index = micro_and_index
            def objective(lora):
                adapters = model_adapters(lora, lc, jax.random.fold_in(key, index) if lc.dropout else None)
                return loss_sums(config, params, adapters, micro, remat=remat, loss_chunk=loss_chunk)
            (total, count), grads = jax.value_and_grad(objective, has_aux=True)(lora)
            g_acc, t_acc, c_acc = carry
            return (jax.tree.map(jnp.add, g_acc, grads), t_acc + total, c_acc + count), None

        zeros = jax.tree.map(jnp.zeros_like, lora)
        accum = batch["inputs"].shape[0]
        (grads, total, count), _ = jax.lax.scan(micro_step, (zeros, jnp.zeros(()), jnp.zeros(())),
                                                (batch, jnp.arange(accum)))
        if per_device and batch_axes:
            grads, total, count = jax.lax.psum((grads, total, count), batch_axes)
        return grads, total, count

    if per_device:
        batch_spec = P(None, batch_axes if len(batch_axes) > 1 else batch_axes[0]) if batch_axes else P()
        grads_and_sums = jax.shard_map(grads_and_sums, mesh=mesh, in_specs=(P(), P(), batch_spec, P()),
                                       out_specs=(P(), P(), P()), check_vma=False)

    def step(params: Params, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        key = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
        grads, total, count = grads_and_sums(params, state["lora"], batch, key)
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss = total / denominator
        grad_norm = optax.tree.norm(grads)
        updates, opt = optimizer.update(grads, state["opt"], state["lora"])
        new = {"step": state["step"] + 1, "lora": optax.apply_updates(state["lora"], updates), "opt": opt}
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "lr": lr_schedule(state["step"]),
                   "finite": finite}
        return new, metrics

    return jax.jit(step, donate_argnums=(1,) if donate else ())


def _has_model_split(mesh: jax.sharding.Mesh) -> bool:
    """Whether the mesh splits weights (expert or tensor axes > 1) rather than only the batch."""
    sizes = axis_sizes(mesh)
    model_axes = {a for name in ("experts", "expert_mlp", "q_heads") for a in rules.RULES[name]}
    return any(sizes.get(a, 1) > 1 for a in model_axes)


# ---------------------------------------------------------------------------------------------
# placing arrays on a (possibly multi-host) mesh

def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Every leaf replicated on every device of `mesh` (each process passes the same host values)."""
    sharding = NamedSharding(mesh, P())

    def put(x: Any) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh | None) -> Batch:
    """This process's rows of the global batch ([accum, local batch, seq] each) -> global arrays
    split over the mesh's batch axes (axis 1). Without a mesh: device arrays as they are."""
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in local.items()}
    axes = _batch_axes(mesh)
    spec = P(None, axes if len(axes) > 1 else axes[0]) if axes else P()
    sharding = NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
