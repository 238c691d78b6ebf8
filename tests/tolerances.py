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
# normalize() divides rounding noise by the row's spread: an operand computed to a relative
# error d (both paths, different summation orders) comes out with an absolute error near
# d * max|x| / std. The condition number kappa = max|x| / std of each normalize operand is
# measured per row on the reference values; d = 1e-6 is ~16 float32 ulps, over 10x the
# error seen (KNorm of two fp16 keys with std / mean = 4e-4: kappa 2400, error 1.3e-4).
# Near normalize's degenerate threshold (std <= 1e-6 |mean|) kappa ~ 1e6 and the allowance
# reaches O(1): the two paths may fall on either side of the threshold.
NORMALIZE_REL_ERROR = 1e-6


def tolerance(reference_values, conditioning=0.0):
    """Absolute tolerance per element for a reference priority tensor; ``conditioning`` is
    the absolute error that normalize nodes can add (see normalize_allowance)."""
    return ATOL + RTOL * reference_values.abs().nan_to_num(0.0, 0.0, 0.0) + conditioning


def normalize_allowance(clause, inputs):
    """Per-row [B, H, 1] absolute error allowance for the clause's priority from the
    normalize nodes in its score (summed; scaled by 1 / temperature for a sample clause).
    Operands that enter only through further nonlinear nodes get no special treatment."""
    import torch

    from tritonkv import dsl, reference

    total = 0.0
    memo = {}
    for node in dsl.walk(clause.score):
        if isinstance(node, dsl.Normalize):
            x = reference.score(node.operand, inputs, memo).double()
            x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
            std = (x - x.mean(-1, keepdim=True)).square().mean(-1, keepdim=True).sqrt()
            kappa = x.abs().amax(-1, keepdim=True) / std.clamp_min(1e-300)
            total = total + NORMALIZE_REL_ERROR * kappa.clamp_max(1e6).float()
    if isinstance(clause, dsl.Sample):
        total = total / clause.temperature
    return total


# A top clause's chunk / head reduce (reference.clause_transform) sums up to C (or H) float32
# terms in another order than torch does: an absolute error up to ~C ulps of the largest term.
TRANSFORM_REL_ERROR = 1e-6


def transform_allowance(clause, clause_score):
    """Per-row [B, H, 1] absolute error allowance of a transformed clause's priority, from its
    float32 pre-transform reference score."""
    import torch

    from tritonkv import dsl

    if not isinstance(clause, dsl.Top) or not clause.transformed:
        return 0.0
    terms = clause.chunk * (clause_score.shape[1] if clause.head_reduce else 1)
    x = torch.where(torch.isfinite(clause_score), clause_score, torch.zeros_like(clause_score)).abs()
    largest = x.amax(dim=(1, 2), keepdim=True) if clause.head_reduce else x.amax(-1, keepdim=True)
    return TRANSFORM_REL_ERROR * terms * largest
