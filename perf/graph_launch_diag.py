"""Whether planned calls end on their re-pointed CUDA graph (TRITONKV_GRAPH_LAUNCH=1), and if
not why: libcuda's graph functions found, each plan's graph_state and the CUresult that dropped it.

    PYTHONPATH=. python perf/graph_launch_diag.py
"""
import ctypes
import sys

import torch

import tritonkv as tkv
from tritonkv import planned, policies
from tritonkv.kernels import batch_launch


def main():
    mod = batch_launch.module()
    print("module", mod, "graphs_enabled", batch_launch.graphs_enabled(), "graphs_found", mod.graphs_found())
    cu = ctypes.CDLL("libcuda.so.1")
    names = ("cuStreamIsCapturing", "cuGraphCreate", "cuGraphAddKernelNode_v2", "cuGraphInstantiateWithFlags",
             "cuGraphExecKernelNodeSetParams_v2", "cuGraphLaunch", "cuGraphExecDestroy", "cuGraphDestroy")
    print("libcuda lacks", [n for n in names if not hasattr(cu, n)])
    keys = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    queries = torch.randn(1, 32, 64, 128, device="cuda", dtype=torch.bfloat16)
    status = ctypes.c_int(-1)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    print("cuStreamIsCapturing(current stream)", cu.cuStreamIsCapturing(stream, ctypes.byref(status)), status.value)
    bad = 0
    for name, policy in (("windows", tkv.sink(4) | tkv.recent()), ("knorm", policies.knorm()),
                         ("snapkv", policies.snapkv())):
        ev = tkv.Evictor(policy, 0.25)
        q = queries if policy.needs_queries else None
        for _ in range(3):
            ev(keys, values, queries=q)
        torch.cuda.synchronize()
        for plan in ev._plans.values():
            if isinstance(plan, planned.Plan):
                state = plan.graph_status()
                bad += not state or state[0] != 1 or state[1][0] != 0
                print(name, "whole" if plan.whole is not None else "split", state, flush=True)
                if state and state[1][0]:
                    for i, step in enumerate(plan.steps):
                        k = step.kernel
                        print("   step", i, getattr(k, "name", "?"), "grid", step.grid, "warps/ctas/shared",
                              k.packed_metadata, "pdl", k.run.launch_pdl, "coop", k.run.launch_cooperative_grid,
                              flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
