"""kernels/batch_launch: a planned call's launches packed once and launched from one call into C.
On CPU: the parameter packing against Triton's launcher's types, the C module's patching, and
every preset's real launches (their sm_90 signatures) packing; on a GPU the planned-call tests
(test_runtime.py, test_threads.py) run through it."""

import os
import shutil
import struct
import subprocess
import sys

import pytest

from tritonkv.kernels import batch_launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CC = shutil.which("gcc") is not None or shutil.which("cc") is not None


def words(slots: bytes):
    return struct.unpack(f"<{len(slots) // 8}Q", slots)


def test_parameters_pack_as_tritons_launcher_reads_them():
    """Constexprs take no slot; floats their storage type's bits (bf16: float32's upper half, as
    Triton's pack_bf16); negative ints two's complement (the driver reads the low bytes); None
    pointers null; the two scratch pointers last; patches move from argument positions to slots."""
    signature = ["*bf16", "i32", "constexpr", "fp32", "i64", "bf16", "fp16", "*fp32", "u64", "i1"]
    template = [None, -2, 64, 1.5, -3, 1.0, 0.5, None, 2 ** 64 - 1, True]
    slots, patches = batch_launch.pack(signature, template, [(0, 0, 16), (7, 3, 0), (4, 7, 0)])
    assert words(slots) == (0, 2 ** 64 - 2, 0x3FC00000, 2 ** 64 - 3, 0x3F80, 0x3800, 0, 2 ** 64 - 1, 1, 0, 0)
    assert patches == ((0, 0, 16), (6, 3, 0), (3, 7, 0))


def test_packing_refusals():
    with pytest.raises(ValueError, match="2 arguments for a signature of 3"):
        batch_launch.pack(["i32", "i32", "i32"], [1, 2], [])
    with pytest.raises(TypeError, match="no parameter packing for Triton type 'nvTmaDesc'"):
        batch_launch.pack(["nvTmaDesc"], [object()], [])


@pytest.mark.skipif(not HAS_CC, reason="the C module needs a C compiler")
def test_the_module_patches_pointers_and_the_seed():
    """values[role] + offset lands in each patched slot (a 64-bit seed kept whole), the other
    slots keep their packed values, and the batch is unchanged by a call (threads share it)."""
    mod = batch_launch.module()
    assert mod is not None
    first, p1 = batch_launch.pack(["*bf16", "i32", "*fp32"], [None, 9, None], [(0, 0, 0), (2, 1, 4096)])
    second, p2 = batch_launch.pack(["*i64", "i64"], [None, None], [(0, 2, 8), (1, 3, 0)])
    handle = mod.build(0, 4, [(1, 2, 1, 1, 128, 0, False, False, first, p1),
                              (2, 1, 1, 1, 256, 1024, False, False, second, p2)])
    seed = 2 ** 63 + 5
    for base in (0x7F0000000000, 0x7F0000100000):
        got = [words(s) for s in mod.patched(handle, [base, base + 256, base + 512, seed])]
        assert got == [(base, 9, base + 256 + 4096, 0, 0), (base + 512 + 8, seed, 0, 0)]
    with pytest.raises(TypeError, match="at least 4 ints"):
        mod.patched(handle, [1, 2, 3])
    with pytest.raises(ValueError, match="patch 0 out of range"):
        mod.build(0, 1, [(1, 1, 1, 1, 32, 0, False, False, first, ((0, 1, 0),))])


def test_batching_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TRITONKV_BATCH_LAUNCH", "0")
    assert batch_launch.batch([object()], 0, 1) is None


_PACK_EVERY_PRESET = """
import torch
from tritonkv import dsl
from tritonkv.adaptive import prepare_adaptive
from tritonkv.aot import all_policies, specialized
from tritonkv.budget import allocate
from tritonkv.compiler import compile_policy, prepare
from tritonkv.kernels.batch_launch import pack
from tritonkv.lowering import lower

meta = dict(device="meta", dtype=torch.bfloat16)
keys, queries = torch.empty(2, 8, 4096, 128, **meta), torch.empty(2, 32, 64, 128, **meta)
checked = 0
for name, policy in all_policies().items():
    if policy.signals or policy.directions:
        continue
    policy, alloc = lower(policy, allocate(policy, 4096, 409))
    compiled = compile_policy(policy)
    call = prepare_adaptive(compiled, policy, alloc, keys, keys, queries, 5) if policy.heads == "adaptive" \
        else prepare(compiled, alloc, keys, keys, queries, 5, ())
    for launch in call.launches:
        source, _ = specialized(launch.fn, launch.args, launch.constexprs, launch.num_warps)
        constexprs = [launch.constexprs[p.name] for p in launch.fn.params if p.is_constexpr]
        template = [None if isinstance(a, torch.Tensor) else a for a in launch.args] + constexprs
        tensors = [i for i, a in enumerate(launch.args) if isinstance(a, torch.Tensor)]
        signature = list(source.signature.values())
        slots, patches = pack(signature, template, [(i, 0, 0) for i in tensors])
        params = [i for i, ty in enumerate(signature) if ty != "constexpr"]
        assert len(slots) == 8 * (len(params) + 2), (name, launch.fn)
        assert all(signature[i].startswith("*") for i in tensors), (name, launch.fn, signature)
        assert [slot for slot, _, _ in patches] == [params.index(i) for i in tensors], (name, launch.fn)
        checked += 1
print(checked)
"""


def test_every_presets_launches_pack_against_their_hopper_signatures():
    """The argument lists evict() launches with line up with the signatures Triton's JIT builds
    for them on sm_90 (its own binder, tritonkv.aot.specialized): each tensor is a pointer
    parameter, and each launch packs into one slot per parameter plus the two scratch pointers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PACK_EVERY_PRESET], capture_output=True, text=True, timeout=600,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) >= 30, out.stdout


class _Kernel:
    """What planned.Step and batch_launch read of a compiled Triton kernel."""

    def __init__(self, signature, function):
        from types import SimpleNamespace
        self.src = SimpleNamespace(signature=dict(enumerate(signature)))
        self.function = function
        self.packed_metadata = (4, 1, 0)
        self.run = SimpleNamespace(global_scratch_size=0, profile_scratch_size=0, num_ctas=1, launch_pdl=False,
                                   launch_cooperative_grid=False, launch=lambda *args: None)


@pytest.mark.skipif(not HAS_CC, reason="the C module needs a C compiler")
def test_a_plan_batches_its_launches(monkeypatch):
    """planned.Plan packs its steps as one graphed batch (a CUDA graph built on the first
    launch); each step patches the call's values by role (keys, scratch and seed for the score;
    scratch, indices and kept keys for select). Split (TRITONKV_GRAPH_SPLIT=1) or without graphs it
    cuts them where the outputs are first written and packs each group as one batch, graphed or
    not; off, it keeps Triton's launcher per step."""
    import torch

    from tritonkv import planned
    score = planned.Step(_Kernel(["*bf16", "*fp32", "i32", "constexpr", "u64"], 11), (3, 2),
                         [None, None, 4096, 128, None], [(0, planned.KEYS, 0), (1, planned.SCRATCH, 64),
                                                         (4, planned.SEED, 0)])
    select = planned.Step(_Kernel(["*fp32", "*i64", "*bf16", "i32"], 12), (5,), [None, None, None, 7],
                          [(0, planned.SCRATCH, 0), (1, planned.INDICES, 0), (2, planned.OUT_KEYS, 256)])
    device = torch.device("cuda", 0)   # only its index is read: nothing runs
    shapes = ((1, 2, 3), (1, 2, 3, 4), (1, 2, 3, 4))
    mod = batch_launch.module()
    values = [1000, 2000, 0, 3000, 4000, 5000, 6000, 2 ** 40 + 1]
    want_score, want_select = (1000, 3064, 4096, 2 ** 40 + 1, 0, 0), (3000, 4000, 5256, 7, 0, 0)
    plan = planned.Plan([score, select], device, shapes, 100)
    launch, whole = plan.whole
    assert launch is mod.launch and mod.graph_state(whole) == 0   # built on its first launch
    assert [words(s) for s in mod.patched(whole, values)] == [want_score, want_select]
    assert plan.graph_status()[0] == 0   # not launched yet
    for split, state in (("1", 0), ("0", -1)):   # two graphs (TRITONKV_GRAPH_SPLIT), or no graph
        monkeypatch.setenv("TRITONKV_GRAPH_SPLIT" if split == "1" else "TRITONKV_GRAPH_LAUNCH", split)
        plan = planned.Plan([score, select], device, shapes, 100)
        assert plan.whole is None
        (launch_early, early), (launch_late, late) = plan.early, plan.late
        assert launch_early is mod.launch and launch_late is mod.launch
        assert mod.graph_state(early) == mod.graph_state(late) == state
        assert [words(s) for s in mod.patched(early, values)] == [want_score]
        assert [words(s) for s in mod.patched(late, values)] == [want_select]
        assert (plan.graph_status() is None) == (state < 0)
    monkeypatch.setenv("TRITONKV_GRAPH_SPLIT", "yes")
    with pytest.raises(ValueError, match="TRITONKV_GRAPH_SPLIT: expected 0 or 1"):
        planned.Plan([score, select], device, shapes, 100)
    monkeypatch.delenv("TRITONKV_GRAPH_SPLIT")
    monkeypatch.setenv("TRITONKV_BATCH_LAUNCH", "0")
    monkeypatch.delenv("TRITONKV_GRAPH_LAUNCH")
    plan = planned.Plan([score, select], device, shapes, 100)
    assert plan.whole is None
    assert plan.early == (planned._launch, [score]) and plan.late == (planned._launch, [select])


@pytest.mark.skipif(not HAS_CC, reason="the C module needs a C compiler")
def test_launch_attributes_keep_a_batch_off_graphs():
    """A step with a launch attribute (programmatic serialization, cooperative) has no plain
    kernel node: its batch launches plainly."""
    mod = batch_launch.module()
    slots, patches = batch_launch.pack(["*fp32"], [None], [(0, 0, 0)])
    plain = (1, 1, 1, 1, 32, 0, False, False, slots, patches)
    assert mod.graph_state(mod.build(0, 1, [plain], True)) == 0
    assert mod.graph_state(mod.build(0, 1, [plain])) == -1
    for pdl, cooperative in ((True, False), (False, True)):
        attributed = (1, 1, 1, 1, 32, 0, pdl, cooperative, slots, patches)
        assert mod.graph_state(mod.build(0, 1, [plain, attributed], True)) == -1


@pytest.mark.skipif(not HAS_CC, reason="the C module needs a C compiler")
def test_graph_path_against_a_stub_driver(tmp_path):
    """A graphed batch's path through the driver, on any machine: the C module against a stub
    libcuda that records its calls (tests/stub_libcuda). The graph is built and instantiated on the
    first launch; later launches re-point only the nodes whose patched values changed since the
    graph last ran; a capturing stream gets plain launches and leaves the graph as it was; a failed
    update or build drops the graph for good (its CUresult and step kept), that call launching
    plainly; a batch built without ``graphed`` never builds one."""
    import json

    stub = tmp_path / "libcuda.so.1"
    cc = shutil.which("gcc") or shutil.which("cc")
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub),
                    os.path.join(ROOT, "tests", "stub_libcuda", "libcuda.c")], check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path), PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "stub_libcuda", "run_graph_path.py"),
                           str(stub)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows[0] == dict(label="found", found=True)
    seen = {row["label"]: row for row in rows[1:]}

    def check(label, state, error, **counts):
        row = seen[label]
        assert (row["state"], row["error"][0]) == (state, error), row
        assert {k: row[k] for k in counts} == counts, row

    check("first", 1, 0, launches=0, nodes_added=2, instantiations=1, node_updates=0, graph_launches=1,
          last_param0=20)
    check("same", 1, 0, launches=0, node_updates=0, graph_launches=2)
    check("second changed", 1, 0, node_updates=1, graph_launches=3, last_param0=21)
    check("capturing", 1, 0, launches=2, node_updates=1, graph_launches=3, last_param0=21)
    check("after capture", 1, 0, launches=2, node_updates=2, graph_launches=4, last_param0=11)
    check("update fails", -1, 700, launches=4, node_updates=2, graph_launches=4, last_param0=21)
    assert seen["update fails"]["error"][1] == 0   # the first node's update failed
    check("after failure", -1, 700, launches=6, graph_launches=4, last_param0=22)
    check("build fails", -1, 999, launches=8, nodes_added=2, instantiations=1, graph_launches=4, last_param0=40)
    check("not graphed", -1, 0, launches=10, nodes_added=2, graph_launches=4, last_param0=60)
