"""MXFP4 decode/encode: bit equality with transformers (golden npz, and live when torch is installed),
hand-computed values, and the quantize -> dequantize round trip."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from gptoss_jax.mxfp4 import FP4_VALUES, dequantize, quantize

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "mxfp4_golden.npz"
GOLDEN_CASES = ("all_scales", "experts", "wide", "extreme", "five_dim")
BF16 = ml_dtypes.bfloat16


def bits(values: np.ndarray) -> np.ndarray:
    """Raw bits of a float array (uint16 for 2-byte floats, uint32 for float32)."""
    return values.view(np.uint16 if values.dtype.itemsize == 2 else np.uint32)


def transformers_layout(values: np.ndarray) -> np.ndarray:
    """transformers' `convert_moe_packed_tensors` returns our [..., out, in] result with axes 1 and 2
    swapped: for experts [E, out, in] -> [E, in, out], the dense HF layout."""
    return np.ascontiguousarray(values.swapaxes(1, 2))


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as archive:
        return dict(archive)


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_dequantize_matches_transformers_golden_bits(golden, case):
    decoded = dequantize(golden[f"{case}_blocks"], golden[f"{case}_scales"])
    assert decoded.dtype == BF16
    assert decoded.shape == (*golden[f"{case}_scales"].shape[:-1], golden[f"{case}_scales"].shape[-1] * 32)
    np.testing.assert_array_equal(bits(transformers_layout(decoded)), golden[f"{case}_bf16_bits"])


def test_dequantize_float32_matches_transformers_golden_bits(golden):
    decoded = dequantize(golden["extreme_blocks"], golden["extreme_scales"], np.float32)
    np.testing.assert_array_equal(bits(transformers_layout(decoded)), golden["extreme_f32_bits"])


def test_dequantize_known_values():
    cases = {  # (byte, scale): [value of low nibble, value of high nibble]
        (0x21, 127): [0.5, 1.0],
        (0x7F, 126): [-3.0, 3.0],  # low 0xF = -6, high 7 = 6, times 1/2
        (0x9A, 130): [-8.0, -4.0],  # low 0xA = -1, high 9 = -0.5, times 8
        (0xF8, 128): [-0.0, -12.0],
        (0x80, 127): [0.0, -0.0],
        (0x01, 0): [2.0**-128, 0.0],  # bfloat16 subnormal, kept exactly
        (0x07, 254): [np.inf, 0.0],  # 6 * 2**127 overflows
        (0x08, 255): [-0.0, 0.0],  # e8m0's NaN code decodes as 2**128, no NaN
        (0x31, 255): [2.0**127, np.inf],
    }
    for (byte, scale), expected in cases.items():
        blocks = np.full((1, 16), byte, np.uint8)
        decoded = dequantize(blocks, np.array([scale], np.uint8), np.float32)
        np.testing.assert_array_equal(bits(decoded), bits(np.tile(np.array(expected, np.float32), 16)))
    assert FP4_VALUES.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert np.signbit(FP4_VALUES[8])


def test_dequantize_layout_low_nibble_first_blocks_along_last_axis():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2, 3, 4, 16), dtype=np.uint8)
    scales = rng.integers(120, 135, (2, 3, 4), dtype=np.uint8)
    nibbles = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(2, 3, 4, 32)
    expected = FP4_VALUES[nibbles] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    np.testing.assert_array_equal(dequantize(blocks, scales, np.float32), expected.reshape(2, 3, 128))
    np.testing.assert_array_equal(dequantize(blocks, scales).astype(np.float32), expected.reshape(2, 3, 128))


def test_dequantize_rejects_bad_inputs():
    """Each error names the argument at fault and its shape or dtype."""
    with pytest.raises(ValueError, match=r"blocks must be \[\.\.\., G, 16\] .*got shape \(3, 8\)"):
        dequantize(np.zeros((3, 8), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"scales must be \[\.\.\., G\] = \(3,\) for blocks of shape \(3, 16\), "
                                         r"got shape \(4,\)"):
        dequantize(np.zeros((3, 16), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(TypeError, match=r"^blocks must be uint8, got int32"):
        dequantize(np.zeros((3, 16), np.int32), np.zeros(3, np.uint8))
    with pytest.raises(TypeError, match=r"^scales must be uint8, got float32"):
        dequantize(np.zeros((3, 16), np.uint8), np.zeros(3, np.float32))


def random_mxfp4(rng, shape, low=1, high=252):
    """Random blocks [*shape, 16] and scales [*shape] in [low, high]; including both scale ends."""
    blocks = rng.integers(0, 256, (*shape, 16), dtype=np.uint8)
    scales = rng.integers(low, high + 1, shape, dtype=np.uint8)
    scales.flat[:2] = (low, high)
    return blocks, scales


def max_magnitude_code(blocks: np.ndarray) -> np.ndarray:
    """Largest |code| (0..7) in each block: blocks [..., 16] -> [...]."""
    return np.maximum(blocks & 7, (blocks >> 4) & 7).max(axis=-1)


@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_quantize_round_trip(dtype):
    rng = np.random.default_rng(1)
    blocks, scales = random_mxfp4(rng, (6, 50, 9))
    blocks[1, 0, 0] = 0x21  # a block whose largest value is 1.0: re-encoded with a smaller scale
    blocks[0, 0, 1] = 0x88  # all -0: scale 0
    blocks[0, 0, 2] = 0x00  # all +0: scale 0
    values = dequantize(blocks, scales, dtype)
    blocks2, scales2 = quantize(values)
    # Values always come back bit for bit (signed zeros included).
    np.testing.assert_array_equal(bits(dequantize(blocks2, scales2, dtype)), bits(values))
    # Bytes come back exactly where a block holds a 4 or a 6 (code 6 or 7); elsewhere the scale may shrink.
    exact = max_magnitude_code(blocks) >= 6
    assert exact.mean() > 0.99
    np.testing.assert_array_equal(blocks2[exact], blocks[exact])
    np.testing.assert_array_equal(scales2[exact], scales[exact])
    assert (scales2[~exact] <= scales[~exact]).all()  # equal only where the scale was already 1
    assert scales2[1, 0, 0] == scales[1, 0, 0] - 2  # max 1.0 at s re-encoded as max 4.0 at s - 2
    assert (blocks2[0, 0, 1] == 0x88).all() and scales2[0, 0, 1] == 0
    assert (blocks2[0, 0, 2] == 0x00).all() and scales2[0, 0, 2] == 0


def test_quantize_round_trip_bytes_exact_with_negative_zero():
    rng = np.random.default_rng(2)
    blocks, scales = random_mxfp4(rng, (40, 30))
    blocks[..., 0] = rng.choice(np.array([0x87, 0x8F, 0x76, 0xE8], np.uint8), blocks.shape[:-1])  # a 4/6, a -0
    assert ((blocks & 15) == 8).sum() > 1000
    values = dequantize(blocks, scales)
    blocks2, scales2 = quantize(values)
    np.testing.assert_array_equal(blocks2, blocks)
    np.testing.assert_array_equal(scales2, scales)
    # If something on the way canonicalizes -0 to +0 (x + 0.0 does), only nibble 8 -> 0 changes.
    blocks3, scales3 = quantize(values.astype(np.float32) + np.float32(0.0))
    np.testing.assert_array_equal(scales3, scales)
    low, high = blocks & 15, blocks >> 4
    expected = np.where(low == 8, 0, low) | (np.where(high == 8, 0, high) << 4)
    np.testing.assert_array_equal(blocks3, expected.astype(np.uint8))


def test_quantize_scale_rule():
    """scale = 127 + ceil(log2(amax / 6)): the smallest power of two that brings amax within 6."""
    base = np.full(32, 0.1, np.float32)
    for amax, expected in [(6.0, 127), (6.0 * 2**-10, 117), (6.0000005, 128), (4.0, 127), (3.0, 126),
                           (3.0000002, 127), (1e-40, 1), (3.0e38, 253)]:
        values = base * np.float32(min(amax, 1.0))
        values[7] = -amax
        assert quantize(values)[1].item() == expected, amax
    blocks, scales = quantize(np.zeros(32, np.float32))
    assert scales.item() == 0 and not blocks.any()
    with pytest.raises(ValueError, match=r"needs finite values, got inf at index \(0,\) of values with shape \(32,\)"):
        quantize(np.full(32, np.inf, np.float32))
    late = np.zeros((3, 2, 64), np.float32)
    late[2, 1, 40] = np.nan  # past the first block of the last row: the first bad value is named
    with pytest.raises(ValueError, match=r"got nan at index \(2, 1, 40\) of values with shape \(3, 2, 64\)"):
        quantize(late)
    with pytest.raises(ValueError, match=r"last dimension must be a multiple of 32, got shape \(48,\)"):
        quantize(np.zeros(48, np.float32))


@pytest.mark.parametrize(
    "ties, expected",
    [
        ("even", [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]),
        ("away", [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]),
    ],
)
def test_quantize_ties(ties, expected):
    midpoints = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    values = np.concatenate([midpoints, -midpoints, np.full(18, 0.0, np.float32)])
    values[-1] = 6.0  # pins the scale at 127
    blocks, scales = quantize(values, ties=ties)
    decoded = dequantize(blocks, scales, np.float32)
    np.testing.assert_array_equal(decoded[:7], expected)
    np.testing.assert_array_equal(decoded[7:14], -np.array(expected, np.float32))
    if ties == "even":  # -0.25 rounds to zero and keeps its sign
        assert bits(decoded[7:8]).item() == 0x80000000


def test_quantize_matches_ml_dtypes_e2m1_rounding():
    rng = np.random.default_rng(3)
    values = rng.standard_normal((64, 256), dtype=np.float32) * np.exp2(rng.integers(-30, 30, (64, 1)))
    values = values.astype(np.float32)
    blocks, scales = quantize(values)
    unit = np.exp2(scales.astype(np.float64) - 127).repeat(32, axis=-1)
    rounded = (values / unit).astype(ml_dtypes.float4_e2m1fn).astype(np.float64) * unit
    np.testing.assert_array_equal(bits(dequantize(blocks, scales, np.float32)), bits(rounded.astype(np.float32)))
    assert blocks.shape == (64, 8, 16) and scales.shape == (64, 8)


@pytest.mark.parametrize("ties", ["even", "away"])
def test_quantize_picks_nearest_grid_value(ties):
    """Against brute force: the nearest of the 8 magnitudes; ties to the even code or the larger one."""
    rng = np.random.default_rng(6)
    y = np.concatenate([rng.uniform(0, 6, 4000), np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])])
    y = np.concatenate([y, np.zeros(-len(y) % 32 + 32)]).astype(np.float32).reshape(-1, 32)
    y[:, -1] = 6.0  # every block's scale is 127, so the codes are the e2m1 roundings of y itself
    distance = np.abs(y[..., None] - FP4_VALUES[:8])  # [blocks, 32, 8 codes]
    is_nearest = distance == distance.min(axis=-1, keepdims=True)
    is_tie = is_nearest.sum(axis=-1) > 1  # two neighbouring codes, one even, one odd
    if ties == "even":
        tie_code = (is_nearest & (np.arange(8) % 2 == 0)).argmax(axis=-1)
    else:
        tie_code = 7 - is_nearest[..., ::-1].argmax(axis=-1)  # the larger magnitude
    expected = np.where(is_tie, tie_code, is_nearest.argmax(axis=-1))
    assert is_tie.sum() == 7
    blocks, scales = quantize(y, ties=ties)
    assert (scales == 127).all()
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(y.shape)
    np.testing.assert_array_equal(codes, expected)


@pytest.mark.reference
def test_dequantize_matches_transformers_live():
    torch = pytest.importorskip("torch")
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    rng = np.random.default_rng(4)
    blocks, scales = random_mxfp4(rng, (3, 70, 11), low=0, high=255)
    for dtype, torch_dtype, torch_int in [
        (BF16, torch.bfloat16, torch.int16),
        (np.float32, torch.float32, torch.int32),
    ]:
        theirs = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch_dtype)
        ours = bits(transformers_layout(dequantize(blocks, scales, dtype)))
        np.testing.assert_array_equal(ours, theirs.contiguous().view(torch_int).numpy().view(ours.dtype))
