"""Checkpoints: convert (HF dense / HF MXFP4 / OpenAI original -> Orbax), load_model, export, bad input.

References: tiny-a (saved by transformers' save_pretrained, dense, float32) and tiny-mxfp4 (released
MXFP4 layout, sharded, bfloat16 + uint8), each with transformers' logits in golden.npz. MXFP4-native
experts (convert --keep-mxfp4, load_model(keep_mxfp4=True), export --mxfp4 of them) at the end.
"""

import dataclasses
import errno
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import FIXTURES, assert_close_to_reference
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gptoss_jax
from gptoss_jax import checkpoint as ck
from gptoss_jax.checkpoint import convert as ck_convert
from gptoss_jax import cli, mxfp4
from gptoss_jax.ops import parallel
from gptoss_jax.mxfp4 import dequantize
from gptoss_jax.params import abstract_params, flatten, params_from_hf, unflatten

TINY_A = FIXTURES / "tiny-a"
TINY_M = FIXTURES / "tiny-mxfp4"
EXPERT_HF = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """converted(source dir, dtype, keep_mxfp4) -> DST, converted once per module."""
    cache = {}

    def get(src, dtype=np.float32, keep_mxfp4=False):
        key = (src.name, np.dtype(dtype).name, *(["keep-mxfp4"] if keep_mxfp4 else []))
        if key not in cache:
            cache[key] = ck.convert_checkpoint(src, tmp_path_factory.mktemp("converted") / "-".join(key),
                                               dtype=dtype, progress=False, keep_mxfp4=keep_mxfp4)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def run_forward():
    """jitted forward per config (compiled once per module and params dtypes)."""
    compiled = {}

    def run(config, params, tokens):
        if config not in compiled:
            compiled[config] = jax.jit(lambda p, t: gptoss_jax.forward(config, p, t))
        return np.asarray(compiled[config](params, tokens))

    return run


def reference_params(directory, dtype=np.float32):
    """Params from a fixture's tensors, in memory, independently of checkpoint.py's reader: MXFP4
    experts dequantized and transposed to the dense [E, in, out] here."""
    config = gptoss_jax.load_config(directory.name)
    tensors = ck.load_safetensors(directory)
    for name in [n for n in tensors if n.endswith("_blocks")]:
        dense = name[: -len("_blocks")]
        values = dequantize(tensors.pop(name), tensors.pop(f"{dense}_scales"), np.float32)  # [E, out, in]
        tensors[dense] = values.transpose(0, 2, 1)
    return params_from_hf(config, {n: np.asarray(t, np.float32) for n, t in tensors.items()}, dtype)


def mxfp4_params(dense_params, config, released):
    """`dense_params` with each expert matrix replaced by MXFP4 params: `released(layer, hf_name, part)`
    gives one layer's blocks [E, out, G, 16] / scales [E, out, G] in the released layout; blocks are
    moved to the in-memory layout [E, out, 16, G] here, and layers stacked in pairs."""
    flat = {path: value for path, value in flatten(dense_params).items() if path[-1] not in ("gate_up", "down")}
    for kind, first in (("sliding", 0), ("full", 1)):
        for matrix, hf_name in (("gate_up", "mlp.experts.gate_up_proj"), ("down", "mlp.experts.down_proj")):
            for part in ("blocks", "scales"):
                layers = [released(layer, hf_name, part) for layer in range(first, config.num_layers, 2)]
                if part == "blocks":
                    layers = [np.ascontiguousarray(b.swapaxes(-1, -2)) for b in layers]
                flat[("layers", kind, "mlp", matrix, part)] = np.stack(layers)
    return unflatten(flat)


def mxfp4_reference_params(dtype=np.float32):
    """tiny-mxfp4's params with MXFP4 experts: the fixture's bytes, relaid out independently of checkpoint.py."""
    tensors = ck.load_safetensors(TINY_M)
    return mxfp4_params(reference_params(TINY_M, dtype), gptoss_jax.load_config("tiny-mxfp4"),
                        lambda layer, name, part: tensors[f"model.layers.{layer}.{name}_{part}"])


def assert_params_equal(actual, expected):
    actual, expected = flatten(actual), flatten(expected)
    assert actual.keys() == expected.keys()
    for path, value in expected.items():
        assert actual[path].dtype == value.dtype, path
        np.testing.assert_array_equal(np.asarray(actual[path]), np.asarray(value), err_msg=str(path))


def leftovers(directory, keep=()):
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------------------------
# Reading exports independently of checkpoint.py: the safetensors library, the raw config.json


def read_with_safetensors(directory):
    """(tensors, {file: metadata}, {tensor: file}) of every *.safetensors file in `directory`, read with
    the safetensors library (framework "flax": bfloat16 too, no torch), as numpy arrays."""
    from safetensors import safe_open

    tensors, metadata, where = {}, {}, {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="flax") as f:
            metadata[path.name] = f.metadata()
            for name in f.keys():
                assert name not in tensors, f"{name} in {path.name} and {where[name]}"
                tensors[name], where[name] = np.asarray(f.get_tensor(name)), path.name
    return tensors, metadata, where


def read_export(out, fixture):
    """An export's tensors, read with the safetensors library, after checking what transformers' loader
    reads besides them: each file's metadata is the transformers-written fixture's ({"format": "pt"});
    several files come with an index ({"metadata": {"total_size"}, "weight_map"}) that places every
    tensor in the file holding it and counts their bytes; a single file comes without one."""
    from safetensors import safe_open

    tensors, metadata, where = read_with_safetensors(out)
    for path in fixture.glob("*.safetensors"):
        with safe_open(path, framework="flax") as f:
            assert f.metadata() == {"format": "pt"}, path
    assert metadata and all(m == {"format": "pt"} for m in metadata.values()), metadata
    index_path = out / ck.INDEX_FILE
    if len(metadata) == 1:
        assert not index_path.exists()
    else:
        index = json.loads(index_path.read_text())
        reference = json.loads((TINY_M / ck.INDEX_FILE).read_text())  # the released layout of an index
        assert index.keys() == reference.keys() == {"metadata", "weight_map"}
        assert index["metadata"] == {"total_size": sum(t.nbytes for t in tensors.values())}
        assert index["weight_map"] == where
    return tensors


CONFIG_KEYS_AN_EXPORT_MAY_LACK = {
    # transformers' GptOssConfig defaults that describe no weight: left out, they read back as the same
    # values (test_keys_an_export_may_lack_are_transformers_defaults)
    "bos_token_id", "initializer_range", "use_cache", "attention_dropout", "output_router_logits",
    "router_aux_loss_coef",
    "transformers_version",  # the version of transformers that wrote the file
}


def assert_config_like_transformers(out, fixture, dtype, quantized):
    """The raw config.json of an export, key by key, equals the fixture's (written by transformers'
    save_pretrained) but for: CONFIG_KEYS_AN_EXPORT_MAY_LACK; "dtype", the export's; quantization_config,
    present exactly when exported as MXFP4 (then tiny-mxfp4's, as released); the keys an export adds:
    rope_theta and rope_scaling (how transformers < 5 spells rope_parameters; they must agree with it)
    and architectures (which tiny-mxfp4's config.save_pretrained did not write; it must be gpt-oss')."""
    raw = json.loads((out / "config.json").read_text())
    expected = {k: v for k, v in json.loads((fixture / "config.json").read_text()).items()
                if k not in CONFIG_KEYS_AN_EXPORT_MAY_LACK}
    expected["dtype"] = np.dtype(dtype).name
    expected.pop("quantization_config", None)
    if quantized:
        expected["quantization_config"] = json.loads((TINY_M / "config.json").read_text())["quantization_config"]
    rope = dict(raw.get("rope_parameters", {}))
    assert raw.pop("rope_theta") == rope.pop("rope_theta", None) and raw.pop("rope_scaling") == rope
    assert raw.pop("architectures") == expected.pop("architectures", ["GptOssForCausalLM"]) == ["GptOssForCausalLM"]
    differences = {k: (raw.get(k, "<absent>"), expected.get(k, "<absent>")) for k in raw.keys() | expected.keys()
                   if raw.get(k, "<absent>") != expected.get(k, "<absent>")}
    assert differences == {}, f"config.json of {out.name}: (exported, transformers') differ"


def test_keys_an_export_may_lack_are_transformers_defaults():
    """What a config.json without CONFIG_KEYS_AN_EXPORT_MAY_LACK reads back as, in transformers (no torch
    needed): the fixtures' values."""
    transformers = pytest.importorskip("transformers")
    defaults = transformers.GptOssConfig().to_dict()
    for fixture in (TINY_A, TINY_M):
        raw = json.loads((fixture / "config.json").read_text())
        for key in CONFIG_KEYS_AN_EXPORT_MAY_LACK - {"transformers_version"}:
            assert defaults[key] == raw[key], (fixture.name, key)


# --------------------------------------------------------------------------------------------
# convert + load


@pytest.mark.parametrize("fixture", [TINY_A, TINY_M], ids=["dense", "mxfp4"])
def test_convert_load_matches_reference_logits(fixture, converted, run_forward):
    """float32 conversion: params bit-equal to the in-memory reference; logits within the project bound
    of transformers' (tiny-mxfp4: transformers dequantizing the MXFP4 checkpoint itself)."""
    dst = converted(fixture)
    config, params = ck.load_model(dst)
    assert config.to_hf_dict() == gptoss_jax.load_config(fixture).to_hf_dict()
    assert_params_equal(params, reference_params(fixture))
    golden = np.load(fixture / "golden.npz")
    assert golden["tokens"].shape[0] >= 2 and golden["tokens"].shape[1] >= 2.5 * config.sliding_window
    assert_close_to_reference(run_forward(config, params, golden["tokens"]), golden["logits"], f"{fixture.name} logits")


def test_converted_checkpoint_is_plain_orbax(converted):
    """DST = config.json (HF keys + dtype) + params/, which plain Orbax restores; bfloat16 storage keeps
    norm scales in float32; load_model(dtype=...) casts on restore."""
    dst = converted(TINY_M, jnp.bfloat16)
    raw = json.loads((dst / "config.json").read_text())
    config = gptoss_jax.load_config(dst)
    assert raw == {**config.to_hf_dict(), "dtype": "bfloat16"}
    abstract = abstract_params(config, jnp.bfloat16)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(dst / "params", abstract)
    assert restored["layers"]["full"]["attn_norm"]["scale"].dtype == jnp.float32
    assert restored["layers"]["full"]["mlp"]["gate_up"].dtype == jnp.bfloat16
    _, params = ck.load_model(dst)
    assert_params_equal(params, restored)
    _, as_float = ck.load_model(dst, dtype=jnp.float32)
    assert_params_equal(as_float, reference_params(TINY_M))  # the fixture's values are exact in bfloat16
    assert flatten(as_float)[("embed",)].dtype == jnp.float32


def mesh_shardings(abstract, mesh):
    """'a' (2) on the first axis it divides, 'b' (4) on the next one."""

    def sharding(leaf):
        axes, free = [None] * leaf.ndim, {"a": 2, "b": 4}
        for i, size in enumerate(leaf.shape):
            name = next((n for n, k in free.items() if size % k == 0), None)
            if name:
                axes[i] = name
                del free[name]
        return NamedSharding(mesh, P(*axes))

    return jax.tree.map(sharding, abstract)


@pytest.mark.parametrize("keep_mxfp4", [False, True], ids=["dense", "keep-mxfp4"])
@pytest.mark.parametrize("source", ["converted", "huggingface"])
def test_load_model_into_mesh_shardings(source, keep_mxfp4, converted):
    """Restores straight into NamedShardings on a 2 x 4 mesh, from Orbax or from the HF files directly;
    MXFP4 experts too (one of them split along both the 16 bytes and the blocks of a row)."""
    config = dataclasses.replace(gptoss_jax.load_config("tiny-mxfp4"), expert_format="mxfp4" if keep_mxfp4 else "dense")
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    shardings = mesh_shardings(abstract_params(config, jnp.float32), mesh)
    if keep_mxfp4:
        down = shardings["layers"]["full"]["mlp"]["down"]
        shardings["layers"]["full"]["mlp"]["down"] = dataclasses.replace(down, blocks=NamedSharding(mesh, P(None, None, None, "b", "a")))
    path = converted(TINY_M, keep_mxfp4=keep_mxfp4) if source == "converted" else TINY_M
    loaded_config, params = ck.load_model(path, dtype=jnp.float32, shardings=shardings, keep_mxfp4=keep_mxfp4)
    assert loaded_config.expert_format == config.expert_format
    for leaf_path, leaf in flatten(params).items():
        assert leaf.sharding == flatten(shardings)[leaf_path], leaf_path
    if keep_mxfp4:
        gate_up = params["layers"]["sliding"]["mlp"]["gate_up"].blocks
        assert gate_up.sharding.spec == P("a", None, "b", None, None) and len(gate_up.addressable_shards) == 8
        assert_params_equal(params, mxfp4_reference_params())
    else:
        gate_up = params["layers"]["sliding"]["mlp"]["gate_up"]
        assert gate_up.sharding.spec == P("a", None, "b", None) and len(gate_up.addressable_shards) == 8
        assert_params_equal(params, reference_params(TINY_M))


def test_load_model_with_mesh_asks_the_sharding_rules(converted, monkeypatch):
    """mesh= goes through the sharding rules' param_shardings(config, mesh) (which gptoss_jax.sharding
    registers into gptoss_jax.ops.parallel: the checkpoint code never imports it)."""
    calls = []

    def param_shardings(config, mesh):
        calls.append((config.name, mesh.shape))
        return mesh_shardings(abstract_params(config), mesh)

    monkeypatch.setattr(parallel, "_param_shardings", param_shardings)
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    config, params = ck.load_model(converted(TINY_M, jnp.bfloat16), mesh=mesh)
    assert calls == [(config.name, mesh.shape)]
    assert params["embed"].sharding.mesh.shape == mesh.shape


def test_load_model_reads_huggingface_directory_directly(converted):
    config, params = ck.load_model(TINY_A)  # default dtype for HF sources: bfloat16
    assert config == gptoss_jax.load_config(TINY_A)
    assert params["embed"].dtype == jnp.bfloat16 and params["norm"]["scale"].dtype == jnp.float32
    assert_params_equal(params, reference_params(TINY_A, jnp.bfloat16))


OPENAI_LAYOUT = json.loads((FIXTURES / "openai_original_layout.json").read_text())
"""OpenAI's original/ layout as derived from openai/gpt-oss's loader and the published files (each fact's
source is in the file), independently of checkpoint.py."""


def hf_config_value(hf, key):
    """`hf`'s value at a transformers config key, "rope_parameters.factor" reading into the dict."""
    for part in key.split("."):
        hf = hf[part]
    return hf


def openai_config(hf):
    """OpenAI's config.json for the model of transformers config.json `hf`: the published keys
    (OPENAI_LAYOUT), each read from its transformers key, with the published JSON types (int / float)."""
    published = OPENAI_LAYOUT["config"]["gpt-oss-20b"]
    return {key: type(published[key])(hf_config_value(hf, hf_key))
            for key, hf_key in OPENAI_LAYOUT["config"]["hf_key"].items()}


def openai_original(tensors, openai):
    """Hugging Face `tensors` as OpenAI's original/ checkpoint for config.json `openai`, built from
    OPENAI_LAYOUT alone: each name, its dtype, its shape (checked against the layout's formula) and
    the HF tensor(s) holding its values (rows concatenated in the order listed)."""
    dtypes = {"BF16": ml_dtypes.bfloat16, "U8": np.uint8}
    out = {}
    for pattern, spec in OPENAI_LAYOUT["tensors"].items():
        for n in range(openai["num_hidden_layers"]) if "{n}" in pattern else [None]:
            sources = spec["hf"] if isinstance(spec["hf"], list) else [spec["hf"]]
            value = np.concatenate([tensors[name.format(n=n)] for name in sources])
            assert value.dtype == dtypes[spec["dtype"]], (pattern, value.dtype)  # tiny-mxfp4 is stored as released
            assert value.shape == tuple(eval(f, {"__builtins__": {}}, dict(openai)) for f in spec["shape"]), pattern
            out[pattern.format(n=n)] = value
    return out


def test_openai_layout_fixture_matches_the_released_config():
    """The published gpt-oss-20b original/config.json, read through the layout's transformers keys, is
    the released HF config (configs/gpt-oss-20b.json); checkpoint.py reads each of its keys (a key read
    under another name, or not read, falls back to a default: every key is changed once here)."""
    published = OPENAI_LAYOUT["config"]["gpt-oss-20b"]
    hf_keys = OPENAI_LAYOUT["config"]["hf_key"]
    assert published.keys() == hf_keys.keys()
    released = ck.exported_config_dict(gptoss_jax.load_config("gpt-oss-20b"), np.float32, quantized=False)
    assert {k: hf_config_value(released, hf_keys[k]) for k in published} == published
    assert openai_config(released) == published and [type(v) for v in openai_config(released).values()] == [
        type(v) for v in published.values()]
    for key, value in published.items():
        changed = {**published, key: type(value)(2 * value)}
        hf = ck.exported_config_dict(ck.config_from_openai_dict(changed), np.float32, quantized=False)
        assert hf_config_value(hf, hf_keys[key]) == 2 * value, key
        assert len(hf["layer_types"]) == changed["num_hidden_layers"]
        assert hf["layer_types"][::2] == ["sliding_attention"] * len(hf["layer_types"][::2])  # even layers slide
        assert set(hf["layer_types"][1::2]) == {"full_attention"}


def test_openai_original_layout_and_preference_for_hf_files(tmp_path, converted):
    """An original/ checkpoint of tiny-mxfp4 built from OPENAI_LAYOUT (names, dtypes, shapes, qkv row
    order, MXFP4 bytes, config keys: openai/gpt-oss's loader and published files) converts to
    tiny-mxfp4's params; so a converter assumption that differs from OpenAI's fails here."""
    config = gptoss_jax.load_config("tiny-mxfp4")
    original = tmp_path / "release" / "original"
    original.mkdir(parents=True)
    openai = openai_config(json.loads((TINY_M / "config.json").read_text()))
    ck.save_safetensors(original / "model.safetensors", openai_original(ck.load_safetensors(TINY_M), openai))
    (original / "config.json").write_text(json.dumps(openai))
    # Only original/ (as in a download of original/ alone): read from there.
    dst = ck.convert_checkpoint(tmp_path / "release", tmp_path / "from-original", progress=False, dtype=np.float32)
    loaded_config, params = ck.load_model(dst)
    # OpenAI's config has no token ids nor max positions: those are the released model's defaults.
    assert dataclasses.replace(loaded_config, name=config.name, eos_token_id=config.eos_token_id,
                               pad_token_id=config.pad_token_id, max_positions=config.max_positions) == config
    assert_params_equal(params, reference_params(TINY_M))
    # MXFP4 kept: the same bytes as from the HF files.
    _, kept = ck.load_model(tmp_path / "release", dtype=np.float32, keep_mxfp4=True)
    assert_params_equal(kept, mxfp4_reference_params())
    # HF files beside original/: the HF files win (a broken original/ is never read).
    release = tmp_path / "release"
    for f in TINY_M.iterdir():
        shutil.copy(f, release / f.name)
    (original / "model.safetensors").write_bytes(b"garbage")
    _, params = ck.load_model(release, dtype=np.float32)
    assert_params_equal(params, reference_params(TINY_M))


# --------------------------------------------------------------------------------------------
# export


def test_export_round_trip_is_identical_in_bfloat16(tmp_path, converted):
    """HF -> Orbax -> HF (bfloat16, sharded with an index) gives the original tensors cast to bfloat16,
    and converting the export again gives the same params (norm scales, float32 in params, rounded)."""
    dst = converted(TINY_A, jnp.bfloat16)
    out = ck.export_checkpoint(dst, tmp_path / "exported", max_shard_bytes=300_000, progress=False)
    index = json.loads((out / ck.INDEX_FILE).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    exported, original = read_export(out, TINY_A), read_with_safetensors(TINY_A)[0]
    assert exported.keys() == original.keys()
    for name, value in original.items():
        assert exported[name].dtype == ml_dtypes.bfloat16 and exported[name].shape == value.shape, name
        np.testing.assert_array_equal(exported[name], value.astype(ml_dtypes.bfloat16), err_msg=name)
    assert gptoss_jax.load_config(out).to_hf_dict() == gptoss_jax.load_config(TINY_A).to_hf_dict()
    assert_config_like_transformers(out, TINY_A, ml_dtypes.bfloat16, quantized=False)
    again = ck.convert_checkpoint(out, tmp_path / "again", progress=False)
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), ck.load_model(dst)[1])  # norm scales
    assert_params_equal(ck.load_model(again)[1], rounded)


def test_export_mxfp4_requantizes_experts(tmp_path, converted):
    """--mxfp4: experts as *_blocks/*_scales decoding to the same values, the rest bfloat16 as released,
    quantization_config in config.json; the export converts back to the same params."""
    dst = converted(TINY_M, jnp.float32)
    out = ck.export_checkpoint(dst, tmp_path / "exported", mxfp4=True, progress=False)
    exported, original = read_export(out, TINY_M), read_with_safetensors(TINY_M)[0]
    assert exported.keys() == original.keys()
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and exported[name].shape == value.shape, name
        if name.endswith("_blocks"):
            scales = name[: -len("_blocks")] + "_scales"
            np.testing.assert_array_equal(dequantize(exported[name], exported[scales], np.float32),
                                          dequantize(value, original[scales], np.float32), err_msg=name)
        elif not name.endswith("_scales"):
            np.testing.assert_array_equal(exported[name], value, err_msg=name)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    assert_config_like_transformers(out, TINY_M, ml_dtypes.bfloat16, quantized=True)
    again = ck.convert_checkpoint(out, tmp_path / "again", dtype=np.float32, progress=False)
    assert_params_equal(ck.load_model(again)[1], reference_params(TINY_M))


@pytest.mark.reference
@pytest.mark.parametrize("fixture", [TINY_A, TINY_M], ids=["float32", "mxfp4"])
def test_transformers_loads_the_export(fixture, tmp_path, converted):
    """transformers' GptOssForCausalLM loads the exported directory and reproduces the golden logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    quantized = fixture == TINY_M
    out = ck.export_checkpoint(converted(fixture), tmp_path / "exported", mxfp4=quantized,
                               dtype=jnp.bfloat16 if quantized else jnp.float32, progress=False)
    extra = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if quantized else {}
    model = transformers.GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                           **extra).eval()
    golden = np.load(fixture / "golden.npz")
    with torch.no_grad():
        logits = model(torch.from_numpy(golden["tokens"]).long()).logits.numpy()
    assert_close_to_reference(logits, golden["logits"], f"transformers on exported {fixture.name}")


# --------------------------------------------------------------------------------------------
# atomicity and bad input


def test_refuses_to_overwrite_unless_forced(tmp_path, converted):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious").write_text("keep")
    with pytest.raises(FileExistsError, match="force"):
        ck.convert_checkpoint(TINY_A, dst, progress=False)
    with pytest.raises(FileExistsError, match="force"):
        ck.export_checkpoint(converted(TINY_A), dst, progress=False)
    assert leftovers(dst) == ["precious"]
    ck.convert_checkpoint(TINY_A, dst, force=True, progress=False)
    assert leftovers(dst) == ["config.json", "params"] and leftovers(tmp_path) == ["dst"]


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing-dst"])
def test_full_disk_leaves_nothing_behind(existing, tmp_path, monkeypatch, converted):
    """A write failing with ENOSPC mid-conversion: a clear error, no DST and no temporary files, and
    an existing DST (replaced with force) left exactly as it was."""
    dst = tmp_path / "dst"
    if existing:
        shutil.copytree(converted(TINY_A), dst)
    before = {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} if existing else None
    calls = []
    real_write = ck_convert._write_chunk

    def write_until_full(store, box, value):
        calls.append(box)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(store, box, value)

    monkeypatch.setattr(ck_convert, "_write_chunk", write_until_full)
    with pytest.raises(ck.CheckpointError, match="no space left on device") as failure:
        ck.convert_checkpoint(TINY_A, dst, force=True, progress=False)
    assert str(dst) in str(failure.value)
    assert leftovers(tmp_path) == (["dst"] if existing else [])
    if existing:
        assert {p.relative_to(dst): p.read_bytes() for p in dst.rglob("*") if p.is_file()} == before


def copy_fixture(fixture, tmp_path):
    copy = tmp_path / fixture.name
    shutil.copytree(fixture, copy)
    return copy


def edit_tensors(directory, edit, file="model.safetensors"):
    """Edits the tensors of one file in place (and the index, when there is one, to match)."""
    tensors = ck.load_safetensors(directory / file)
    edit(tensors)
    ck.save_safetensors(directory / file, tensors)
    index_path = directory / ck.INDEX_FILE
    if index_path.exists():
        index = json.loads(index_path.read_text())
        index["weight_map"] = {n: f for n, f in index["weight_map"].items() if f != file} | dict.fromkeys(tensors, file)
        index_path.write_text(json.dumps(index))


def edit_config(directory, edit):
    raw = json.loads((directory / "config.json").read_text())
    edit(raw)
    (directory / "config.json").write_text(json.dumps(raw))


def truncate(path, nbytes):
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


BAD_SOURCES = {
    "missing tensor": (TINY_A, lambda d: edit_tensors(d, lambda t: t.pop("model.layers.3.self_attn.sinks")),
                       r"missing tensor 'model\.layers\.3\.self_attn\.sinks'"),
    "unexpected tensor": (TINY_A, lambda d: edit_tensors(d, lambda t: t.update(
        {"model.layers.4.self_attn.sinks": np.zeros(6, np.float32)})),
        r"model\.safetensors: unexpected tensor 'model\.layers\.4\.self_attn\.sinks'"),
    "wrong shape": (TINY_A, lambda d: edit_tensors(d, lambda t: t.update(
        {"model.layers.1.self_attn.k_proj.weight": np.zeros((30, 72), np.float32)})),
        r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[30, 72\], "
        r"but config .* needs \[20, 72\]"),
    "wrong dtype": (TINY_A, lambda d: edit_tensors(d, lambda t: t.update(
        {"lm_head.weight": t["lm_head.weight"].astype(np.int32)})),
        r"tensor 'lm_head\.weight' has dtype I32, expected a float dtype"),
    "mxfp4 scales not uint8": (TINY_M, lambda d: edit_tensors(d, lambda t: t.update(
        {"model.layers.3.mlp.experts.down_proj_scales":
         t["model.layers.3.mlp.experts.down_proj_scales"].astype(np.float32)}), "model-00002-of-00002.safetensors"),
        r"model-00002-of-00002\.safetensors: tensor 'model\.layers\.3\.mlp\.experts\.down_proj_scales' "
        r"has dtype F32, expected U8"),
    "dense and mxfp4 mixed": (TINY_M, lambda d: edit_tensors(d, lambda t: t.update(
        {"model.layers.3.mlp.experts.down_proj": np.zeros((5, 64, 96), np.float32)}),
        "model-00002-of-00002.safetensors"), r"unexpected tensor 'model\.layers\.3\.mlp\.experts\.down_proj'"),
    "truncated file": (TINY_A, lambda d: truncate(d / "model.safetensors", 1000),
                       r"model\.safetensors: truncated: tensor '.*' ends at byte"),
    "corrupt header": (TINY_A, lambda d: (d / "model.safetensors").write_bytes(
        (200).to_bytes(8, "little") + b"{not json" + bytes(300)), r"model\.safetensors: corrupt safetensors header"),
    "shard missing": (TINY_M, lambda d: (d / "model-00002-of-00002.safetensors").unlink(),
                      r"index\.json: lists file 'model-00002-of-00002\.safetensors', which does not exist"),
    "not gpt-oss": (TINY_A, lambda d: edit_config(d, lambda c: c.update(model_type="llama")),
                    r"config\.json: not a gpt-oss config \(model_type='llama'"),
    "config not json": (TINY_A, lambda d: (d / "config.json").write_text("{oops"), r"config\.json: not valid JSON"),
    "config disagrees": (TINY_A, lambda d: edit_config(d, lambda c: c.update(num_local_experts=8)),
                         r"has shape \[7, .*\], but config .* needs \[8, "),
    "no weights": (TINY_A, lambda d: (d / "model.safetensors").unlink(), r"no \*\.safetensors files"),
}


@pytest.mark.parametrize("case", BAD_SOURCES, ids=list(BAD_SOURCES))
def test_bad_source_is_refused_clearly(case, tmp_path):
    fixture, damage, message = BAD_SOURCES[case]
    source = copy_fixture(fixture, tmp_path / "src")
    damage(source)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.convert_checkpoint(source, tmp_path / "dst", progress=False)
    assert leftovers(tmp_path) == ["src"]


def test_missing_directory_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(ck.CheckpointError, match="no such directory"):
        ck.convert_checkpoint(tmp_path / "absent" / "dir" / "x", tmp_path / "dst", progress=False)
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kwargs):
        raise ConnectionError(f"cannot reach the Hub for {repo_id}")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ck.CheckpointError, match=r"openai/gpt-oss-20b: no such directory, and downloading it .* "
                                                 r"failed \(ConnectionError"):
        ck.convert_checkpoint("openai/gpt-oss-20b", tmp_path / "dst", progress=False)
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# MXFP4-native experts: convert --keep-mxfp4, load_model(keep_mxfp4=True), export of such checkpoints


def test_keep_mxfp4_copies_the_bytes_and_gives_the_reference_logits(converted, run_forward):
    """--keep-mxfp4 of an MXFP4 source: config.json says expert_format mxfp4, the experts are the uint8
    blocks/scales (the source's bytes, relaid out), the rest as a plain conversion; logits within the
    project bound of transformers'. uint8 params are never cast to load_model's dtype."""
    dst = converted(TINY_M, np.float32, keep_mxfp4=True)
    raw = json.loads((dst / "config.json").read_text())
    config = gptoss_jax.load_config(dst)
    assert raw == {**config.to_hf_dict(), "dtype": "float32", "expert_format": "mxfp4"}
    assert config.expert_format == "mxfp4"
    loaded_config, params = ck.load_model(dst)
    assert loaded_config == config
    assert_params_equal(params, mxfp4_reference_params())
    golden = np.load(TINY_M / "golden.npz")
    assert_close_to_reference(run_forward(config, params, golden["tokens"]), golden["logits"],
                              "tiny-mxfp4 logits, MXFP4 experts")
    _, as_bf16 = ck.load_model(dst, dtype=jnp.bfloat16)
    mlp = as_bf16["layers"]["full"]["mlp"]
    assert mlp["gate_up"].blocks.dtype == jnp.uint8 and mlp["down"].scales.dtype == jnp.uint8
    assert mlp["down_bias"].dtype == jnp.bfloat16


def test_mxfp4_experts_run_like_dequantized_ones_in_bfloat16(converted, run_forward):
    """bfloat16 weights: MXFP4 experts (dequantized tile by tile in the model) vs the same experts
    dequantized at load: logits equal within bfloat16 rounding of the largest, greedy tokens identical."""
    config, kept = ck.load_model(converted(TINY_M, jnp.bfloat16, keep_mxfp4=True))
    dense_config, dense = ck.load_model(TINY_M)  # bfloat16, MXFP4 dequantized on load
    assert (config.expert_format, dense_config.expert_format) == ("mxfp4", "dense")
    assert dense["layers"]["full"]["mlp"]["gate_up"].dtype == jnp.bfloat16
    tokens = np.load(TINY_M / "golden.npz")["tokens"]
    logits, reference = run_forward(config, kept, tokens), run_forward(dense_config, dense, tokens)
    bound = 2.0 ** -8 * max(1.0, np.abs(reference).max())
    assert np.abs(logits - reference).max() <= bound
    prompts = [tokens[0, :5].tolist(), tokens[1, :3].tolist()]
    generated = gptoss_jax.generate(config, kept, prompts, max_new_tokens=24, stop_tokens=[])
    assert [len(row) for row in generated] == [24, 24]
    assert generated == gptoss_jax.generate(dense_config, dense, prompts, max_new_tokens=24, stop_tokens=[])


def test_keep_mxfp4_direct_load_equals_convert_then_load(converted):
    """load_model(HF source, keep_mxfp4=True) gives what convert --keep-mxfp4 + load_model gives, and
    load_model(.., keep_mxfp4=False) of the MXFP4 checkpoint the plain dense conversion."""
    config, direct = ck.load_model(TINY_M, dtype=np.float32, keep_mxfp4=True)
    converted_config, loaded = ck.load_model(converted(TINY_M, np.float32, keep_mxfp4=True))
    assert config.expert_format == "mxfp4" and config.to_hf_dict() == converted_config.to_hf_dict()
    assert_params_equal(direct, loaded)
    dense_config, dequantized = ck.load_model(converted(TINY_M, np.float32, keep_mxfp4=True), keep_mxfp4=False)
    assert dense_config.expert_format == "dense"
    assert_params_equal(dequantized, ck.load_model(converted(TINY_M, np.float32))[1])


def dense_source(tmp_path):
    """A dense HF checkpoint with tiny-mxfp4's shapes (hidden 96, intermediate 64), float32 experts off
    the e2m1 grid (the fixture's values times random factors), the other weights bfloat16."""
    tensors = ck.load_safetensors(TINY_M)
    rng = np.random.default_rng(0)
    for name in [n for n in tensors if n.endswith("_blocks")]:
        dense = name[: -len("_blocks")]
        values = dequantize(tensors.pop(name), tensors.pop(f"{dense}_scales"), np.float32).transpose(0, 2, 1)
        tensors[dense] = values * rng.uniform(0.7, 1.3, values.shape).astype(np.float32)
    directory = tmp_path / "dense-source"
    directory.mkdir()
    ck.save_safetensors(directory / "model.safetensors", tensors)
    edit = json.loads((TINY_M / "config.json").read_text())
    del edit["quantization_config"]
    (directory / "config.json").write_text(json.dumps(edit))
    return directory, tensors


def test_keep_mxfp4_quantizes_a_dense_source(tmp_path):
    """From dense experts, --keep-mxfp4 stores mxfp4.quantize of each [E, out, in] matrix; so do a direct
    load_model(keep_mxfp4=True) and loading a dense conversion with keep_mxfp4=True."""
    source, tensors = dense_source(tmp_path)
    config = gptoss_jax.load_config(source)

    def quantized(layer, name, part):
        blocks, scales = mxfp4.quantize(tensors[f"model.layers.{layer}.{name}"].transpose(0, 2, 1))
        return blocks if part == "blocks" else scales

    expected = mxfp4_params(ck.load_model(source, dtype=np.float32)[1], config, quantized)
    dst = ck.convert_checkpoint(source, tmp_path / "kept", dtype=np.float32, progress=False, keep_mxfp4=True)
    assert_params_equal(ck.load_model(dst)[1], expected)
    assert_params_equal(ck.load_model(source, dtype=np.float32, keep_mxfp4=True)[1], expected)
    dense_dst = ck.convert_checkpoint(source, tmp_path / "dense", dtype=np.float32, progress=False)
    assert_params_equal(ck.load_model(dense_dst, keep_mxfp4=True)[1], expected)


def test_keep_mxfp4_export_round_trip_is_byte_identical(tmp_path, converted, capsys):
    """HF MXFP4 -> convert --keep-mxfp4 -> export --mxfp4 (the CLI, bfloat16 as released): every tensor
    byte-identical, blocks and scales included. Without --mxfp4 the experts are dequantized to dense."""
    dst, out = tmp_path / "kept", tmp_path / "exported"
    assert cli.main(["convert", str(TINY_M), str(dst), "--keep-mxfp4"]) == 0
    assert gptoss_jax.load_config(dst).expert_format == "mxfp4"
    assert cli.main(["export", str(dst), str(out), "--mxfp4"]) == 0
    exported, original = read_export(out, TINY_M), read_with_safetensors(TINY_M)[0]
    assert exported.keys() == original.keys()
    for name, value in original.items():
        assert exported[name].dtype == value.dtype and exported[name].shape == value.shape, name
        assert exported[name].tobytes() == value.tobytes(), name
    raw = json.loads((out / "config.json").read_text())
    assert raw["quantization_config"]["quant_method"] == "mxfp4" and "expert_format" not in raw
    assert_config_like_transformers(out, TINY_M, ml_dtypes.bfloat16, quantized=True)
    # Exporting the MXFP4 source directly with --mxfp4 copies its bytes too.
    direct_out = ck.export_checkpoint(TINY_M, tmp_path / "direct", mxfp4=True, progress=False)
    direct = read_export(direct_out, TINY_M)
    assert direct.keys() == original.keys()
    assert all(direct[name].dtype == value.dtype and direct[name].tobytes() == value.tobytes()
               for name, value in original.items())
    assert_config_like_transformers(direct_out, TINY_M, ml_dtypes.bfloat16, quantized=True)
    # Dense export: the experts dequantized, [E, in, out], as transformers dequantizes them.
    dense_out = ck.export_checkpoint(converted(TINY_M, np.float32, keep_mxfp4=True), tmp_path / "dense",
                                     dtype=np.float32, progress=False)
    dense = read_export(dense_out, TINY_M)
    assert_config_like_transformers(dense_out, TINY_M, np.float32, quantized=False)
    for name in [n for n in original if n.endswith("_blocks")]:
        matrix = name[: -len("_blocks")]
        expected = dequantize(original[name], original[f"{matrix}_scales"], np.float32).transpose(0, 2, 1)
        assert dense[matrix].dtype == np.float32
        np.testing.assert_array_equal(dense[matrix], expected, err_msg=matrix)
    assert not any(n.endswith(("_blocks", "_scales")) for n in dense)
    plain = [n for n in original if not n.endswith(("_blocks", "_scales"))]
    assert dense.keys() == set(plain) | {n[: -len("_blocks")] for n in original if n.endswith("_blocks")}
    for name in plain:
        assert dense[name].dtype == np.float32, name
        np.testing.assert_array_equal(dense[name], original[name].astype(np.float32), err_msg=name)


def test_keep_mxfp4_needs_sizes_in_whole_blocks(tmp_path, capsys):
    """tiny-a (hidden 72, intermediate 56) cannot hold MXFP4 experts: a clear error, nothing written."""
    message = r"keep_mxfp4 \(--keep-mxfp4\) needs hidden_size \(72\) and intermediate_size \(56\) to be multiples of 32"
    with pytest.raises(ck.CheckpointError, match=message):
        ck.convert_checkpoint(TINY_A, tmp_path / "dst", progress=False, keep_mxfp4=True)
    with pytest.raises(ck.CheckpointError, match=message):
        ck.load_model(TINY_A, keep_mxfp4=True)
    assert cli.main(["convert", str(TINY_A), str(tmp_path / "dst"), "--keep-mxfp4"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_load_of_a_converted_checkpoint_that_its_config_does_not_describe(tmp_path, converted):
    """A converted checkpoint whose config.json disagrees with its params (edited, or another
    model's params) fails with a CheckpointError naming the param, not a tensorstore traceback."""
    dst = tmp_path / "edited"
    shutil.copytree(converted(TINY_M), dst)
    config_file = dst / ck.CONFIG_FILE
    original = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**original, "intermediate_size": 32}))
    with pytest.raises(ck.CheckpointError, match=r"param layers/\w+/mlp/\w+ is stored with shape \[2, 5, "):
        gptoss_jax.load_model(dst)
    config_file.write_text(json.dumps({**original, "expert_format": "mxfp4"}))
    with pytest.raises(ck.CheckpointError, match=r"cannot open param layers/\w+/mlp/\w+/blocks \(missing"):
        gptoss_jax.load_model(dst)
