"""Tolerances for compiled priorities against reference.py, and why.

Both paths compute in float32 from the same input values (the kernels upcast the stored
fp16 / bf16 / fp32 elements exactly as reference.py does; proxy-attention dot products of
16-bit inputs are exact in float32, and float32 caches use IEEE rather than TF32 products).
What differs is summation order (tile-wise and split reductions, tensor-core accumulation)
and, on the GPU, the hardware approximations of exp2 / log / sqrt (<= 2 ulp). Each costs a
relative error near 1e-7 per operation; expressions are at most a few dozen operations
deep, and softmax / normalize can amplify by the spread of their input. 1e-4 relative
leaves two orders of magnitude of headroom over the errors seen (max ~5e-7 relative, see
the closing notes); ATOL covers priorities that are sums of terms cancelling to ~0.

Selections are compared exactly: the select kernel on the compiled priorities must equal
reference.select_by_priority on those same priorities (identical tie-breaking), and the
end-to-end kept set must equal the reference's wherever no boundary priority is within
the tolerance of the next candidate.
"""

RTOL = 1e-4
ATOL = 1e-5


def tolerance(reference_values):
    """Absolute tolerance per element for a reference priority tensor."""
    return ATOL + RTOL * reference_values.abs().nan_to_num(0.0, 0.0, 0.0)
