"""Shared test setup.

On a machine without CUDA the Triton kernels run in the interpreter; TRITON_INTERPRET
must be set before triton is first imported, hence here. Hypothesis profiles:
  ci        (default) quick enough for CI on 2 cores
  thorough  2500 examples per property test, >= 10k in all, over all policies, shapes and
            dtypes: TKV_PROFILE=thorough ./run test -k "properties or shapes or policies_match or exact"
"""

import os

# pytest-xdist with a worker per core: one thread per worker (and for the scripts the tests
# run), so PyTorch's intra-op threads do not contend with the other workers for the cores
# (8% of test_hf_static_cache's time on 2 cores). Set before torch is imported: importing it
# loads NumPy, whose OpenBLAS reads OMP_NUM_THREADS once, when it loads; set after, each
# worker's interpreted tl.dot (np.matmul) ran two BLAS threads, spinning against the other
# worker's (a third of the suite's CPU time was system time on 2 cores)
_ONE_THREAD = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")) >= (os.cpu_count() or 1)
if _ONE_THREAD:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if _ONE_THREAD:
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
