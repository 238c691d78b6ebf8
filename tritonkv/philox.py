"""Triton's Philox 4x32-10 generator, written in plain PyTorch integer arithmetic.

Every random number in tritonkv is a function of (seed, batch, head, token, stream)
only, so it does not depend on block sizes, launch order or device:

    c0, c1, c2, c3 = token, batch, head, stream          (the counter, uint32 each)
    k0, k1         = seed & 0xffffffff, seed >> 32       (the key)
    x              = first word of philox_4x32_10(counter, key)
    u              = uniform float in [0, 1) from x, as triton.language.rand converts it

This is exactly what ``tl.philox(seed, token, batch, head, stream)`` followed by
``tl.uint_to_uniform_float`` computes inside a kernel, so the reference and the compiled
path draw the same numbers bit for bit (tests/test_philox.py checks it against the
Triton interpreter). Products of two 32-bit words are formed from 16-bit halves so no
int64 product can overflow.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
N_ROUNDS = 10
# what tl.uint_to_uniform_float multiplies by: the largest float with MAX_INT * scale < 1
UNIFORM_SCALE = 4.6566127342e-10


def _mulhilo32(a: int, b: torch.Tensor):
    """(high, low) 32-bit words of the 64-bit product a * b, a a constant, b uint32 in int64."""
    a0, a1 = a & 0xFFFF, a >> 16
    b0, b1 = b & 0xFFFF, b >> 16
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (p00 & 0xFFFF)
    hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
    return hi & MASK32, lo & MASK32


def philox_4x32(c0, c1, c2, c3, seed: int, n_rounds: int = N_ROUNDS):
    """Philox 4x32 on int64 tensors holding uint32 values (broadcast together)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c).to(torch.int64) for c in (c0, c1, c2, c3)))
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 in [0, 1), as triton.language.random does it."""
    signed = torch.where(x >= (1 << 31), x - (1 << 32), x)
    signed = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32, device=x.device)


def uniform(seed: int, batch: torch.Tensor, head: torch.Tensor, token: torch.Tensor,
            stream: int) -> torch.Tensor:
    """Uniform [0, 1) float32 for every (batch, head, token) of the broadcast inputs."""
    x, _, _, _ = philox_4x32(token, batch, head, torch.tensor(stream, device=token.device), seed)
    return uint_to_uniform(x)


def uniform_grid(seed: int, batch: int, heads: int, n: int, stream: int, device=None) -> torch.Tensor:
    """Uniform [0, 1) float32 of shape [batch, heads, n]."""
    b = torch.arange(batch, device=device).view(-1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1)
    t = torch.arange(n, device=device).view(1, 1, -1)
    return uniform(seed, b, h, t, stream)
