"""Test setup: 8 simulated CPU devices, quick compiles, the persistent compilation cache, and shared fixtures."""

import os

# The tests' programs are tiny: compiling them is most of the suite's time, running them little.
# LLVM at -O0 without its expensive passes halves the compile time (a generate test and a parity
# test: 34 s -> 17 s from an empty cache). The HLO, its fusions and buffers (every memory figure)
# are the same; results differ by float32 rounding only (tiny-a's logits and gradients: at most
# 2e-7 of their largest value), inside every tolerance. XLA:CPU's older loop emitters instead of its
# MLIR fusion emitters compile a quarter faster again (test_generate.py + test_model.py from an empty
# cache: user CPU 250 s -> 190 s; a tiny-a train step 5.5 s -> 3.5 s). Subprocesses inherit these flags.
QUICK_COMPILES = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                  " --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    + ([QUICK_COMPILES] if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "") else [])).strip()

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

TEST_CACHE = os.environ.get("GPTOSS_JAX_TEST_CACHE", str(Path.home() / ".cache" / "gptoss-jax-tests" / "xla"))
jax.config.update("jax_compilation_cache_dir", TEST_CACHE)
os.environ.setdefault("GPTOSS_JAX_NATIVE_CACHE", TEST_CACHE + "-native")  # the CPU kernels' build (ops/native.py)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # subprocess tests reuse it all

FIXTURES = Path(__file__).parent / "fixtures"


def subprocess_env(devices: int = 8) -> dict[str, str]:
    """The environment of a test's child Python process: this run's XLA flags (quick compiles) with
    `devices` simulated CPU devices, and this run's persistent compilation cache, read and written
    (children that compile what another already did then only load it)."""
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
            "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked slow (20 s and more, none sharing a module-scoped fixture) run first: xdist hands
    each worker a contiguous half of this order and steals from their ends, so a long test left for
    the end would hold one worker while the other idles (the 2-process training test: 40 s)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


TINY_CONFIGS = ("tiny-a", "tiny-b")


class Golden:
    """One tiny config's reference: its config, HF tensors and transformers' outputs."""

    def __init__(self, name: str):
        import gptoss_jax

        self.name = name
        self.dir = FIXTURES / name
        self.config = gptoss_jax.load_config(name)
        self.hf_tensors = load_file(self.dir / "model.safetensors")
        self.outputs = dict(np.load(self.dir / "golden.npz"))

    def params(self, dtype=np.float32):
        from gptoss_jax.params import params_from_hf

        return params_from_hf(self.config, self.hf_tensors, dtype, source=str(self.dir))


@pytest.fixture(scope="session", params=TINY_CONFIGS)
def golden(request) -> Golden:
    return Golden(request.param)


def assert_close_to_reference(actual, reference, what: str) -> None:
    """The project's parity bound: max |actual - reference| <= 1e-4 * max(1, max |reference|)."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
    error = np.max(np.abs(actual - reference))
    bound = 1e-4 * max(1.0, np.max(np.abs(reference)))
    assert error <= bound, f"{what}: max error {error:.3g} > bound {bound:.3g}"
