"""Where the compiled kernels run in the tests: on CUDA where a GPU is present (the real
kernels), else on the CPU in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 there).
Every test that exercises backend="triton" puts its inputs on DEVICE, so on a GPU machine
it checks the kernels the users run, and on CPU (CI) the same kernels interpreted."""

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def to_device(*tensors):
    """The tensors on DEVICE (None stays None), as a list."""
    return [None if t is None else t.to(DEVICE) for t in tensors]
