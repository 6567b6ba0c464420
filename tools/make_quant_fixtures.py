#!/usr/bin/env python3
"""Writes tests/fixtures/quant/<TYPE>.bin: random ggml blocks and their f32 values as the `gguf`
PyPI package's numpy dequantizer (gguf.quants.dequantize) computes them. kernels-ref's quant tests
(kernels-ref/src/quant/tests.rs) check that kernels-ref dequantizes the same bytes to the same
f32 bit patterns.

File layout (all little-endian):
  bytes 0..4    magic b"PTQF"
  bytes 4..8    u32 ggml type id (GGML_TYPE_*)
  bytes 8..12   u32 n, the number of elements
  then          the n elements' storage (n / block_elems blocks of block_bytes each)
  then          n f32, the dequantized values

The blocks are made here, independently of kernels-ref's random_blocks: every byte uniformly
random, then the f16 scale fields overwritten with finite values spread over many binades (f16
subnormals, a zero and negative scales included, as real files have them), so every quant bit
pattern occurs. The float types get random finite values including signed zeros, subnormals
and the largest finite value.

numpy computes in float32 with one rounding per multiply or add, in the same order as ggml's
dequantize_row_* (scale * quant, then + min or - min), so the comparison is exact (0 ulp).

Usage: /work/fixvenv/bin/pip install -r tools/requirements.txt   (numpy, gguf)
       python3 tools/make_quant_fixtures.py
"""
import os
import struct

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "quant")
SEED = 20240609

# type -> (number of blocks, [(byte offset of an f16 scale field, may it be negative)])
TYPES = {
    T.F32: (64, []),
    T.F16: (64, []),
    T.BF16: (64, []),
    T.Q4_0: (8, [(0, True)]),
    T.Q4_1: (8, [(0, False), (2, True)]),
    T.Q5_0: (8, [(0, True)]),
    T.Q5_1: (8, [(0, False), (2, True)]),
    T.Q8_0: (8, [(0, True)]),
    T.Q4_K: (3, [(0, False), (2, False)]),
    T.Q5_K: (3, [(0, False), (2, False)]),
    T.Q6_K: (3, [(208, True)]),
}


def f16_scales(rng, n, signed):
    """n finite f16 scales, magnitudes 2^-20 .. 2^-2 (subnormal f16 below 2^-14); the first is
    0 and the second a tiny subnormal, so both edge cases are always in the file."""
    mag = np.exp2(rng.uniform(-20.0, -2.0, n))
    if signed:
        mag = np.where(rng.integers(0, 2, n) == 1, -mag, mag)
    mag[0] = 0.0
    if n > 1:
        mag[1] = 2.0 ** -23
    return mag.astype(np.float16)


def float_values(rng, qtype, n):
    if qtype == T.F32:
        v = (rng.standard_normal(n) * 0.05).astype(np.float32)
        v[:4] = [0.0, -0.0, 1e-45, -3.4028235e38]
        return v.view(np.uint8)
    if qtype == T.F16:
        bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits)  # no inf/nan: clear exponent
        bits[:5] = [0x0000, 0x8000, 0x0001, 0x7BFF, 0xFBFF]
        return bits.astype("<u2").view(np.uint8)
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)  # BF16
    bits = np.where((bits & 0x7F80) == 0x7F80, bits & 0x807F, bits)
    bits[:5] = [0x0000, 0x8000, 0x0001, 0x7F7F, 0xFF7F]
    return bits.astype("<u2").view(np.uint8)


def make(qtype, n_blocks, scale_fields, rng):
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    n = n_blocks * block_elems
    if block_elems == 1:
        raw = float_values(rng, qtype, n)
    else:
        blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
        for at, signed in scale_fields:
            blocks[:, at:at + 2] = f16_scales(rng, n_blocks, signed).astype("<f2").view(np.uint8).reshape(n_blocks, 2)
        raw = blocks.reshape(-1)
    values = np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(-1)
    assert values.size == n and np.all(np.isfinite(values)), qtype.name
    return n, raw, values


def main():
    os.makedirs(OUT, exist_ok=True)
    for qtype, (n_blocks, scale_fields) in TYPES.items():
        rng = np.random.default_rng([SEED, int(qtype)])
        n, raw, values = make(qtype, n_blocks, scale_fields, rng)
        path = os.path.join(OUT, f"{qtype.name}.bin")
        with open(path, "wb") as f:
            f.write(b"PTQF" + struct.pack("<II", int(qtype), n))
            f.write(raw.tobytes())
            f.write(values.astype("<f4").tobytes())
        print(f"{path}: {n} elements, {raw.size} bytes of {qtype.name}")


if __name__ == "__main__":
    main()
