"""Budgets across heads (AdaKV, arXiv 2407.11550) and layers (PyramidKV, arXiv 2406.02069)."""

from .. import dsl
from .snapkv import snapkv


def adakv(base: dsl.Policy = None, floor: float = 0.2) -> dsl.Policy:
    """AdaKV: a layer's budget spread across its KV heads by score, each head keeping at
    least ``floor`` of its uniform share. Default base: SnapKV, as in the paper."""
    return (base if base is not None else snapkv()).adaptive(floor)


def pyramidkv(base: dsl.Policy = None, beta: float = 20.0) -> dsl.Policy:
    """PyramidKV: more budget for lower layers, falling linearly to 1/beta of the mean at
    the top layer (see tritonkv.budget.pyramid_budgets). Default base: SnapKV."""
    return (base if base is not None else snapkv()).pyramid(beta)
