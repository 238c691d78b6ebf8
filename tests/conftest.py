"""Shared test setup.

On a machine without CUDA the Triton kernels run in the interpreter; TRITON_INTERPRET
must be set before triton is first imported, hence here. Hypothesis profiles:
  ci        (default) quick enough for CI on 2 cores
  thorough  2500 examples per property test, >= 10k in all, over all policies, shapes and
            dtypes: TKV_PROFILE=thorough ./run test -k "properties or shapes or policies_match or exact"
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist with a worker per core: one thread per worker (and for the scripts the tests
# run), so PyTorch's intra-op threads do not contend with the other workers for the cores
# (8% of test_hf_static_cache's time on 2 cores)
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) >= (os.cpu_count() or 1):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=2500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# replay: a few examples, but first the failures saved in .hypothesis/ by earlier runs
settings.register_profile("replay", max_examples=5, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("TKV_PROFILE", "ci"))
