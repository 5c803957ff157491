"""The house rules, checked on the source: imports point one way, platform choices live in `ops/`,
mesh axis names in `sharding/` only, and a mesh the rules do not know is an error."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import gptoss_jax

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gptoss_jax"
MESH_AXIS_NAMES = {"data", "fsdp", "expert", "tensor"}
TEXT_MODULES = {"tokenizer", "harmony", "textstream"}  # no model code in them

LAYERS: dict[str, int] = {
    # module (relative to gptoss_jax) -> its layer; a module may import only from layers <= its own
    "axes": 0, "config": 0, "mxfp4": 0,
    "ops": 1, "ops.bits": 1, "ops.parallel": 1, "ops.attention": 1, "ops.blockwise": 1, "ops.splash": 1, "ops.mxfp4": 1, "ops.collectives": 1,
    "ops.platform": 1,
    "quant": 2, "adapted": 2,
    "ops.matmul": 3,
    "moe": 4, "cache": 4, "tokenizer": 4, "harmony": 4, "textstream": 4,
    "model": 5,
    "params": 6,
    "generate": 7, "checkpoint": 7,
    "sharding": 8,
    "train": 9, "engine": 9,
    "serve": 10,
    "cli": 11, "__init__": 11,
}
"""Bottom to top: config and axis tables, kernels, typed weights, ops, the model, generate / checkpoint,
sharding (which reads the model's declarations), train and the engine, the server on the engine, and
the entry points."""


def _module_name(path: Path) -> str:
    if path.is_relative_to(ROOT / "sharding"):
        return "sharding"
    if path.is_relative_to(ROOT / "train"):
        return "train"
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
    return ".".join(parts)


def _layer(module: str) -> int:
    for name in (module, module.split(".")[0]):
        if name in LAYERS:
            return LAYERS[name]
    raise AssertionError(f"module gptoss_jax.{module} has no layer in tests/test_house.py's LAYERS: add it")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(gptoss_jax module imported, line), function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptoss_jax"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("gptoss_jax")]
        for name in names:
            rest = name.split(".")[1:]
            while rest and ".".join(rest) not in LAYERS and rest[0] not in LAYERS:
                rest = rest[:-1]  # `from gptoss_jax.ops import matmul` -> ops.matmul; names of a module -> it
            if rest:
                found.append((".".join(rest), node.lineno))
    return found


def _sources() -> list[Path]:
    return sorted(p for d in (PACKAGE, ROOT / "sharding", ROOT / "train") for p in d.rglob("*.py"))


def test_imports_point_one_way():
    wrong = []
    for path in _sources():
        module = _module_name(path)
        for imported, line in _imports(path):
            if imported.split(".")[0] == module.split(".")[0] and module in ("sharding", "train"):
                continue  # inside one package
            if _layer(imported) > _layer(module):
                wrong.append(f"{path.relative_to(ROOT)}:{line} (gptoss_jax.{module}, layer {_layer(module)}) "
                             f"imports gptoss_jax.{imported} (layer {_layer(imported)})")
    assert not wrong, "imports pointing up:\n" + "\n".join(wrong)


def test_platform_choices_and_mesh_axes_stay_in_their_layer():
    """Only ops/ chooses by platform; only sharding/ names mesh axes (as string constants)."""
    for path in _sources():
        source = path.read_text()
        module = _module_name(path)
        if not module.startswith("ops"):
            assert "platform_dependent" not in source, f"{path.relative_to(ROOT)} chooses by platform"
        if _layer(module) <= LAYERS["generate"] and module not in TEXT_MODULES:
            constants = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)}
            named = constants & MESH_AXIS_NAMES
            assert not named, f"{path.relative_to(ROOT)} names mesh axes {sorted(named)}"


def test_no_source_file_over_600_lines():
    kernels = sorted(p for suffix in ("*.cc", "*.h") for p in (PACKAGE / "ops").glob(suffix))
    long = {str(p.relative_to(ROOT)): n for p in _sources() + kernels if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"source files over 600 lines: {long}"


def test_a_mesh_the_rules_do_not_know_is_an_error():
    config = gptoss_jax.load_config("tiny-a")
    params = gptoss_jax.init_params(config, seed=0, dtype=jnp.float32)
    mesh = jax.make_mesh((2, 4), ("rows", "columns"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"mesh has axes \['columns', 'rows'\] that "
                                                             r"gptoss_jax.sharding does not know"):
        gptoss_jax.forward(config, params, jnp.zeros((2, 4), jnp.int32))
