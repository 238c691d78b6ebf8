"""Host cost of K kernel launches against K kernel-node updates of an instantiated CUDA graph
plus one graph launch: whether a planned call (tritonkv/planned.py, 16.5 us + ~3.3 us per
launch on an H100) could launch its kernels as a graph whose nodes it re-points every call.

    python perf/graph_update_probe.py [--json OUT.json]

One trivial Triton kernel (a store per program), launched through the driver by ctypes:
  launch:  K x cuLaunchKernel
  graph:   K x cuGraphExecKernelNodeSetParams + cuGraphLaunch (a chain of K kernel nodes)
us per call of each, K in 1, 4, 7 (a KNorm, SnapKV, AdaKV call), medians of rounds of calls
enqueued back to back; ``ctypes_us``: one trivial driver call (cuCtxGetCurrent) through ctypes, the
overhead in each of the K (launch) or K + 1 (graph) calls that C code would not pay. Correctness: every graph launch's K kernels write the values of their
last update (checked after the timing).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import torch
import triton
import triton.language as tl

CALLS, ROUNDS = 300, 7


@triton.jit
def _touch(ptr, value):
    tl.store(ptr + tl.program_id(0), value)


class KernelParams(ctypes.Structure):   # CUDA_KERNEL_NODE_PARAMS_v2
    _fields_ = [("func", ctypes.c_void_p), ("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint),
                ("gridDimZ", ctypes.c_uint), ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint),
                ("blockDimZ", ctypes.c_uint), ("sharedMemBytes", ctypes.c_uint),
                ("kernelParams", ctypes.POINTER(ctypes.c_void_p)), ("extra", ctypes.POINTER(ctypes.c_void_p)),
                ("kern", ctypes.c_void_p), ("ctx", ctypes.c_void_p)]


def _check(result, what):
    if result != 0:
        raise RuntimeError(f"{what}: CUresult {result}")


class Driver:
    def __init__(self):
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.set_params = self.cu.cuGraphExecKernelNodeSetParams_v2
        self.add_node = self.cu.cuGraphAddKernelNode_v2
        for fn in (self.cu.cuLaunchKernel, self.cu.cuGraphLaunch, self.set_params):
            fn.restype = ctypes.c_int


def _args(buffer: torch.Tensor, value: int):
    """kernelParams of _touch(buffer, value) as Triton 3.6 compiles it: its two parameters, then
    the global and profile scratch pointers (null)."""
    words = (ctypes.c_uint64 * 4)(buffer.data_ptr(), value, 0, 0)
    params = (ctypes.c_void_p * 4)(*[ctypes.addressof(words) + 8 * i for i in range(4)])
    return words, params


def measure(k: int, driver: Driver):
    buffers = [torch.zeros(64, dtype=torch.int32, device="cuda") for _ in range(k)]
    compiled = _touch[(1,)](buffers[0], 0)
    func = ctypes.c_void_p(compiled.function)
    block = 32 * compiled.metadata.num_warps
    shared = compiled.metadata.shared
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    held = [_args(b, 1) for b in buffers]

    def launches():
        for _, params in held:
            _check(driver.cu.cuLaunchKernel(func, 1, 1, 1, block, 1, 1, shared, stream, params, None), "launch")

    graph, exec_ = ctypes.c_void_p(), ctypes.c_void_p()
    _check(driver.cu.cuGraphCreate(ctypes.byref(graph), 0), "cuGraphCreate")
    nodes, previous = [], None
    for _, params in held:
        node = ctypes.c_void_p()
        p = KernelParams(func.value, 1, 1, 1, block, 1, 1, shared, params, None, None, None)
        deps = (ctypes.c_void_p * 1)(previous.value) if previous is not None else None
        _check(driver.add_node(ctypes.byref(node), graph, deps, 0 if previous is None else 1, ctypes.byref(p)),
               "cuGraphAddKernelNode")
        nodes.append((node, p))
        previous = node
    _check(driver.cu.cuGraphInstantiateWithFlags(ctypes.byref(exec_), graph, ctypes.c_ulonglong(0)),
           "cuGraphInstantiate")
    value = [1]

    def graph_call():
        value[0] += 1
        for (words, _), (node, p) in zip(held, nodes):
            words[1] = value[0]   # a new argument every call, as a planned call's pointers are
            _check(driver.set_params(exec_, node, ctypes.byref(p)), "SetParams")
        _check(driver.cu.cuGraphLaunch(exec_, stream), "cuGraphLaunch")

    current = ctypes.c_void_p()

    def trivial():
        driver.cu.cuCtxGetCurrent(ctypes.byref(current))

    out = {}
    for name, fn in (("ctypes", trivial), ("launch", launches), ("graph", graph_call)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        rounds = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            rounds.append((time.perf_counter() - start) / CALLS * 1e6)
            torch.cuda.synchronize()
        out[f"{name}_us"] = statistics.median(rounds)
    torch.cuda.synchronize()
    out["graph_correct"] = all(int(b[0]) == value[0] for b in buffers)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    driver = Driver()
    rows = []
    for k in (1, 4, 7):
        row = dict(kernels=k, device=torch.cuda.get_device_name(), **measure(k, driver))
        rows.append(row)
        print(f"K={k}: {k} launches {row['launch_us']:.2f} us, {k} node updates + graph launch "
              f"{row['graph_us']:.2f} us (one ctypes call {row['ctypes_us']:.2f} us), graph results correct: "
              f"{row['graph_correct']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
