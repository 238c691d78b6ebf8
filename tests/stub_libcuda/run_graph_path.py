"""Drives kernels/batch_launch.c's graph path against the stub libcuda (argv[1], loaded before the
module opens "libcuda.so.1") and prints what the driver saw after each launch, as JSON lines.
Run by tests/test_batch_launch.py in a subprocess (the module keeps the driver it loaded)."""
import ctypes
import json
import sys

stub = ctypes.CDLL(sys.argv[1], mode=ctypes.RTLD_GLOBAL)

from tritonkv.kernels import batch_launch  # noqa: E402

COUNTERS = ("launches", "nodes_added", "node_updates", "graph_launches", "instantiations")
mod = batch_launch.module()


def set_stub(**values):
    for name, value in values.items():
        ctypes.c_int.in_dll(stub, name).value = value


def launch(batch, values, label):
    mod.launch(batch, 0, values)
    seen = {name: ctypes.c_int.in_dll(stub, name).value for name in COUNTERS}
    seen["last_param0"] = ctypes.c_uint64.in_dll(stub, "last_param0").value
    print(json.dumps(dict(label=label, state=mod.graph_state(batch), error=list(mod.graph_error(batch)), **seen)))


def steps():
    """Two steps: the first patches role 0 into its pointer, the second role 1."""
    out = []
    for role in (0, 1):
        slots, patches = batch_launch.pack(["*fp32", "i32"], [None, 3], [(0, role, 0)])
        out.append((1 + role, 2, 1, 1, 128, 0, False, False, slots, patches))
    return out


print(json.dumps(dict(label="found", found=mod.graphs_found())))
graphed = mod.build(0, 2, steps(), True)
launch(graphed, [10, 20], "first")              # built and instantiated, launched as a graph
launch(graphed, [10, 20], "same")               # nothing re-pointed
launch(graphed, [10, 21], "second changed")     # the second node only
set_stub(capturing=1)
launch(graphed, [11, 21], "capturing")          # plain launches; the graph keeps [10, 21]
set_stub(capturing=0)
launch(graphed, [11, 21], "after capture")      # the first node re-pointed (10 -> 11)
set_stub(fail_update=700)
launch(graphed, [12, 21], "update fails")       # graph dropped, this call launched plainly
set_stub(fail_update=0)
launch(graphed, [13, 22], "after failure")      # plain from now on
set_stub(fail_add_node=999)
failing = mod.build(0, 2, steps(), True)
launch(failing, [30, 40], "build fails")
set_stub(fail_add_node=0)
launch(mod.build(0, 2, steps()), [50, 60], "not graphed")
