"""Hand-written kernels against their references: exact selection, bit-exact random streams,
and every generated kernel compiling for Hopper."""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from tritonkv import philox, reference
from tritonkv.budget import Allocation
from tritonkv.kernels.primitives import uniform
from tritonkv.kernels.gather import gather_rows
from tritonkv.kernels.select import select_indices

from .devices import DEVICE, to_device
from .strategies import examples


@st.composite
def adversarial_priorities(draw):
    """Priorities full of ties, NaN, infinities and signed zeros, with a random allocation."""
    rows = draw(st.integers(1, 4))
    n = draw(st.one_of(st.integers(1, 40), st.integers(1000, 2600)))
    clauses = draw(st.integers(0, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    levels = draw(st.sampled_from([2, 5, 1000]))
    prios = (torch.randint(0, levels, (max(clauses, 1), rows, n), generator=gen).float() - levels / 2) / 3
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-40])
    hit = torch.rand(prios.shape, generator=gen) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    prios[hit] = specials[torch.randint(0, len(specials), (int(hit.sum()),), generator=gen)]
    n_sink = draw(st.integers(0, n))
    n_recent = draw(st.integers(0, n - n_sink))
    left = n - n_sink - n_recent
    counts = []
    for _ in range(clauses):
        c = draw(st.integers(0, left))
        counts.append(c)
        left -= c
    return prios, Allocation(n_sink, n_recent, tuple(counts))


# parameters, not drawn: xdist spreads them over the cores. own_slots: the last clause's keys are stored in its
# slot; sparse (TRITONKV_SPARSE_BINS): digit blocks counted by atomics when at most 64 keys match, always, never
@pytest.mark.parametrize("d, own_slots, sparse", [
    (64, False, "64"), (80, False, "64"), (128, False, "64"),
    (64, True, "64"), (80, True, "100000"), (128, True, "0")])
@given(case=adversarial_priorities())
@settings(max_examples=examples(7))
def test_select_and_gather_are_exact(case, d, own_slots, sparse):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITONKV_SPARSE_BINS", sparse)
        check_select_and_gather(case, d, own_slots)


LONG_ROWS = [(131072, 0), (70001, 50), (40001, 0)]
# the untimed switches at one shape each (the suite's time): ties across chunks, and chunks of odd ends
SELECT_SWITCHES = [(70001, 50, {"TRITONKV_SELECT_CHUNK": "16"}), (40001, 0, {"TRITONKV_SELECT_CHUNK": "16"}),
                   (70001, 50, {"TRITONKV_SELECT_WARPS": "8"}),
                   (70001, 50, {"TRITONKV_COPY_PAIRED": "0"})]


@pytest.mark.skipif(DEVICE != "cuda", reason="many programs per row run at once only on a GPU")
@pytest.mark.parametrize("n, levels, switches", [(n, levels, {}) for n, levels in LONG_ROWS] + SELECT_SWITCHES)
def test_select_of_long_rows_is_exact_on_the_gpu(n, levels, switches):
    """Rows over SHORT_ROW, each shared by many programs that meet at row barriers (the
    interpreter runs one per row), with chunks of any
    multiple of 16 tokens (TRITONKV_SELECT_CHUNK: chunks that end inside a scan block), in
    programs of 8 warps and with K's rows copied before V's (TRITONKV_COPY_PAIRED=0); ``levels``: priorities of few
    distinct values, so ties span many programs' chunks (with the last clause's keys stored), 0
    for floats."""
    g = torch.Generator().manual_seed(n)
    rows, counts = 6, (n // 10, n // 7, 1)
    prios = torch.rand(len(counts), rows, n, generator=g)
    if levels:
        prios = (prios * levels).floor()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in switches.items():
            patch.setenv(name, value)
        check_select_and_gather((prios, Allocation(5, 64, counts)), 64, own_slots=bool(levels))


def test_select_chunks_of_a_finer_unit(monkeypatch):
    """TRITONKV_SELECT_CHUNK: chunks are multiples of it instead of the scan block, so the programs
    that fit are used (TOVA's 4 shared rows at 128K with 99 resident per row: 64 programs of
    2,048 tokens by blocks, 86 of 1,536 by 256, 99 of 1,328 by 16), and a row gets more programs
    than blocks; a unit that is not a positive multiple of 16 is refused by name."""
    from tritonkv.kernels.select import chunking, chunk_unit
    assert chunking(131072, 99) == (2048, 64)
    for unit, want in (("256", (1536, 86)), ("16", (1328, 99)), ("512", (1536, 86))):
        monkeypatch.setenv("TRITONKV_SELECT_CHUNK", unit)
        assert chunk_unit(131072) == int(unit) and chunking(131072, 99) == want
    assert chunking(131072, 256) == (512, 256)   # 256 programs for 128 scan blocks
    for bad in ("0", "100", "x"):
        monkeypatch.setenv("TRITONKV_SELECT_CHUNK", bad)
        with pytest.raises(ValueError, match="TRITONKV_SELECT_CHUNK: expected a positive multiple of 16"):
            chunk_unit(131072)


def check_select_and_gather(case, d, own_slots):
    prios, alloc = case
    rows, n = prios.shape[1:]
    keys = torch.randn(1, rows, n, d).to(torch.float16)
    values = torch.randn(1, rows, n, 32).to(torch.float16)
    clauses = len(alloc.clause_counts)
    slots = list(range(clauses))
    out_i = select_indices(prios.clone().to(DEVICE), slots, alloc.clause_counts, alloc.n_sink, alloc.n_recent, rows,
                           n, alloc.total, torch.device(DEVICE), own_slots=own_slots).view(1, rows, alloc.total)
    out_k, out_v = gather_rows(out_i, keys.to(DEVICE), values.to(DEVICE))
    kept = reference.select_by_priority(alloc, [prios[j].view(1, rows, n) for j in range(clauses)], (1, rows, n))
    want = reference.kept_indices(kept)
    got = out_i.cpu()
    if not torch.equal(got, want):
        row = int((got != want).any(-1).nonzero()[0, 1])
        first = int((got[0, row] != want[0, row]).nonzero()[0])
        pytest.fail(f"row {row}: first difference at output {first}: got token {got[0, row, first]}, "
                    f"want {want[0, row, first]}")
    assert torch.equal(out_k.cpu(), reference.gather_rows(keys, want))
    assert torch.equal(out_v.cpu(), reference.gather_rows(values, want))


@pytest.mark.parametrize("d, dv", [(64, 64), (80, 32), (128, 128), (256, 64)])
@given(rows=st.integers(1, 5), heads=st.sampled_from([1, 2, 4]), n=st.one_of(st.just(1), st.integers(2, 3000)),
       density=st.sampled_from([0.0, 0.03, 0.5, 1.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       chunks=st.integers(1, 4), seed=st.integers(0, 2 ** 31))
@settings(max_examples=examples(4), deadline=None)
def test_pack_is_the_masked_rows_head_major(d, dv, rows, heads, n, density, dtype, chunks, seed):
    """kernels/pack.py (AdaKV's output): the tokens set in a mask, head after head in token order,
    with their K / V rows and each head's count, equal to results.pack_varlen (a boolean-mask
    index in PyTorch); empty and full rows, N = 1 and one to four chunks per row included.
    Copies of rows: exact."""
    from tritonkv.kernels.launch import launch
    from tritonkv.kernels.pack import pack_launches
    from tritonkv.results import pack_varlen, varlen_from
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(rows, heads, n, d, generator=g).to(dtype)
    values = torch.randn(rows, heads, n, dv, generator=g).to(dtype)
    kept = torch.rand(rows, heads, n, generator=g) < density
    want = pack_varlen(keys, values, kept)
    total = int(kept.sum())
    k, v, mask = to_device(keys, values, kept.to(torch.uint8).view(rows * heads, n))
    packed = torch.full((total + rows * heads,), -1, dtype=torch.int64, device=DEVICE)
    out_k, out_v = k.new_empty(total, d), v.new_empty(total, dv)
    counts = torch.full((rows * heads * chunks,), -7, dtype=torch.int32, device=DEVICE)   # no zeroing needed
    for fn, grid, args, constexprs, warps in pack_launches(mask, counts, packed, k, v, out_k, out_v, chunks):
        launch(fn, grid, args, constexprs, warps)
    got = varlen_from(out_k, out_v, packed, heads)
    assert torch.equal(got.lengths.cpu(), want.lengths) and torch.equal(got.indices.cpu(), want.indices)
    assert torch.equal(got.keys.cpu(), want.keys) and torch.equal(got.values.cpu(), want.values)


def test_pack_refuses_a_short_counts_buffer():
    from tritonkv.kernels.pack import pack_launches
    mask = torch.zeros(4, 10, dtype=torch.uint8)
    keys = torch.zeros(2, 2, 10, 8)
    with pytest.raises(ValueError, match="counts: expected at least 12 int32"):
        pack_launches(mask, torch.zeros(11, dtype=torch.int32), torch.zeros(4, dtype=torch.int64), keys, keys,
                      keys[0, 0, :0], keys[0, 0, :0], 3)


@triton.jit
def _uniform_kernel(out_ptr, seed, i_b, i_h, n, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    o_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    zero = o_n * 0
    tl.store(out_ptr + o_n, uniform(seed, o_n, zero + i_b, zero + i_h, STREAM), mask=o_n < n)


@pytest.mark.parametrize("seed", [0, 1, 2 ** 31 + 5, 2 ** 63 + 12345])
@pytest.mark.parametrize("stream", [0, 3, 65536])
def test_random_stream_is_bit_exact(seed, stream):
    n = 3000
    out = torch.empty(n, device=DEVICE)
    _uniform_kernel[(triton.cdiv(n, 1024),)](out, seed, 2, 5, n, STREAM=stream, BLOCK=1024)
    want = philox.uniform(seed, torch.tensor(2), torch.tensor(5), torch.arange(n), stream)
    assert torch.equal(out.cpu(), want)
    assert 0.0 <= float(want.min()) and float(want.max()) < 1.0
    assert abs(float(want.mean()) - 0.5) < 0.02


@pytest.mark.parametrize("config", range(4))   # tritonkv.aot.CONFIGS, one process each (xdist spreads them)
def test_every_kernel_compiles_for_hopper(config):
    """triton.compile for sm_90 (no GPU needed) of every kernel of every preset and composite,
    in several dtype / head-dim / GQA configurations; fails on a build error or on a kernel
    that needs more shared memory than an H100 block has."""
    from tritonkv.aot import CONFIGS
    assert len(CONFIGS) == 4
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tritonkv.aot", "--config", str(config)], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ", 0 failures" in result.stdout
    if config == 0:   # built as the JIT builds it: SnapKV's K tiles stream through shared memory (cp.async)
        rows = {(line[:16].strip(), line[16:31].strip()): line.split() for line in result.stdout.splitlines()
                if len(line.split()) > 8}   # policy and kernel: columns of 16 and 15 characters
        cp_async, registers, per_sm = (int(x) for x in rows["snapkv", "stats_0"][-3:])
        assert cp_async > 0 and 0 < registers <= 255 and per_sm >= 1, rows["snapkv", "stats_0"]
        # the cubin's register count (Nsight Compute read 58 on an H100 before the loop was pipelined):
        # KeyDiff's anchor pass, its K tiles loaded a tile ahead (geometry.loop_stages), 64 and 4 per SM
        assert rows["keydiff", "stats_0"][-3:] == ["12", "64", "4"], rows["keydiff", "stats_0"]
        # the proxy score pass forms probabilities with no per-logit mask or division (kernels/proxy.py):
        # SnapKV's and NACL's fit two programs per SM (224 and 203 registers, one, before)
        assert rows["snapkv", "score"][-1] == "2" and rows["nacl", "score"][-1] == "2", (rows["snapkv", "score"],
                                                                                       rows["nacl", "score"])


def test_select_switches_compile_for_hopper():
    """sm_90 builds of select with its switches off their defaults (32-row copy steps, 8 warps;
    CI's builds of every policy take the defaults), per head with the fused copy (KeyDiff) and
    once per batch row (TOVA): a path the interpreter runs may still fail Triton's compiler (a
    jit helper's tuple default of ints did, in a removed candidate list that took a bracket)."""
    code = ("import torch, tritonkv.aot as aot, tritonkv.policies as P\n"
            "from tritonkv.budget import allocate\n"
            "from tritonkv.compiler import compile_policy, shared_selection\n"
            "from tritonkv.kernels.select import select_launch, _select_kernel, select_warps\n"
            "meta = dict(device='meta', dtype=torch.bfloat16)\n"
            "b, h, n, d = 1, 8, 131072, 128\n"
            "for name in ('keydiff', 'tova'):\n"
            "    policy = getattr(P, name)()\n"
            "    program = compile_policy(policy).program\n"
            "    alloc = allocate(policy, n, n // 10)\n"
            "    kv = [torch.empty(b, h, m, d, **meta) for m in (n, n, alloc.total, alloc.total)]\n"
            "    slots = torch.empty(1, b * h, n, device='meta', dtype=torch.float32)\n"
            "    _, args, constexprs, _ = select_launch(slots, program.clause_keys, alloc.clause_counts, alloc.n_sink,\n"
            "        alloc.n_recent, b * h, n, alloc.total, torch.device('meta'), programs=16, heads=h,\n"
            "        moments=(slots, [0], 8), shared=shared_selection(program), own_slots=True, gather=tuple(kv))\n"
            "    built = aot.build_checked(name, 'select', '', _select_kernel, args, constexprs, select_warps())\n"
            "    print(name, constexprs['GATHER_T'], constexprs['PAIRED'], built.registers)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITONKV_COPY_PAIRED="1", TRITONKV_SELECT_COPY_ROWS="32", TRITONKV_SELECT_WARPS="8")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line.split()[:3] for line in result.stdout.splitlines()] == [["keydiff", "32", "True"],
                                                                         ["tova", "32", "True"]], \
        result.stdout


def _score_builds(cases: str) -> subprocess.CompletedProcess:
    """sm_90 builds (tritonkv.aot.build_checked, which refuses a kernel over the shared-memory limit)
    of the score kernels of ``cases``, a Python tuple of (name, policy expression, N, query rows) at
    bf16, D = 128, 8 KV heads of 4 query heads; each printed as name, query rows, shared bytes."""
    code = ("import torch, tritonkv.aot as aot, tritonkv.policies as P\n"
            "from tritonkv.compiler import compile_policy, launch_args\n"
            "meta = dict(device='meta', dtype=torch.bfloat16)\n"
            f"for name, policy, n, rows in {cases}:\n"
            "    keys, queries = torch.empty(1, 8, n, 128, **meta), torch.empty(1, 32, rows, 128, **meta)\n"
            "    compiled = compile_policy(policy)\n"
            "    slots = torch.empty(len(compiled.program.slots), 8, n, device='meta', dtype=torch.float32)\n"
            "    geo, args = launch_args(compiled, keys, keys, queries, 0, slots)\n"
            "    b = aot.build_checked(name, 'score', '', compiled.kernel('score'), args, geo.constexprs, "
            "geo.num_warps)\n"
            "    print(name, rows, b.shared_bytes)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)


def test_long_proxy_windows_fit_hopper_shared_memory():
    """A proxy attention whose query rows span several 256-row chunks of bf16 D = 128 (64 KB each,
    one query head's window each: NACL's 1% window from N = 16K on, SnapKV or H2O with a window of
    129-256) reloads chunks 1.. per tile; pipelined 3 deep those loads needed 279,552 B of shared
    memory (sm_90 has 232,448), so such a call failed to launch. Their loop is not pipelined now
    (kernels/proxy.py)."""
    result = _score_builds("(('nacl', P.nacl(), 16384, 164), ('snapkv', P.snapkv(window=164), 4096, 164), "
                           "('h2o', P.h2o(), 4096, 164))")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["nacl", "164"], ["snapkv", "164"],
                                                                         ["h2o", "164"]], result.stdout


def test_windows_of_65_to_128_rows_fit_hopper_shared_memory():
    """Two query heads' windows of 65-128 rows in one 256-row bf16 chunk of several built to 312,320 B
    of shared memory on sm_90; a group that spans several chunks has one head's window per chunk
    (geometry.proxy_tiling)."""
    result = _score_builds("(('snapkv', P.snapkv(window=128), 4096, 128), ('h2o', P.h2o(), 4096, 100))")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["snapkv", "128"], ["h2o", "100"]], \
        result.stdout


def test_fast_launcher_reuses_the_compiled_kernel():
    """After the first launch of a specialization, launches skip Triton's dispatch and give
    the same results; a new specialization (another dtype) compiles anew."""
    from tritonkv.kernels import launch as L
    if L.interpreting():
        pytest.skip("the interpreter has no compiled kernels")
    from tritonkv.kernels.gather import _gather_kernel
    keys = torch.randn(1, 2, 100, 64, device=DEVICE)
    idx = torch.arange(0, 100, 3, device=DEVICE).expand(1, 2, -1).contiguous()
    sizes = []
    for _ in range(3):
        out_k, _ = gather_rows(idx, keys, keys)
        assert torch.equal(out_k, keys[:, :, ::3])
        launcher = L._LAUNCHERS[id(_gather_kernel)]
        sizes.append(len(launcher.compiled))
    assert sizes[0] >= 1 and sizes[0] == sizes[1] == sizes[2]   # later launches reuse the first
    # another dtype is another specialization (other tests may have compiled it already)
    out_k, _ = gather_rows(idx, keys.half(), keys.half())
    assert torch.equal(out_k, keys.half()[:, :, ::3])
    has_half = [k for k in launcher.compiled if any(torch.float16 in part for part in k[1] if isinstance(part, tuple))]
    assert has_half
    count = len(launcher.compiled)
    gather_rows(idx, keys.half(), keys.half())
    assert len(launcher.compiled) == count


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's helper fast path: CPU only")
def test_interpreted_helpers_skip_repatching_with_the_same_results(monkeypatch):
    """kernels/interpreted.py: helpers called from an interpreted kernel skip Triton's
    re-patching of triton.language. A policy whose kernels call helpers in loops (SnapKV's
    proxy attention, select, gather) and the decode kernel give the same bits both ways, and
    the fast path is taken (fewer language patches)."""
    import tritonkv as tkv
    from triton.runtime import interpreter
    from tritonkv.kernels import interpreted
    from tritonkv.kernels.decode import decode_attention
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 301, 64, generator=g), torch.randn(1, 2, 301, 64, generator=g)
    queries = torch.randn(1, 4, 8, 64, generator=g)
    start, length = torch.tensor([3]), torch.tensor(290)
    patches = []
    patch_lang = interpreter._patch_lang
    monkeypatch.setattr(interpreter, "_patch_lang", lambda fn: patches.append(fn) or patch_lang(fn))

    def run():
        patches.clear()
        out = tkv.evict(keys, values, tkv.policies.snapkv(window=8), 0.3, queries=queries, backend="triton")
        attention = decode_attention(queries[:, :, :1], keys, values, start, length, 0.125)
        return (out.indices, out.keys, out.values, attention), len(patches)

    fast, fast_patches = run()
    monkeypatch.setattr(interpreted, "_fast_helpers_supported", lambda: False)
    slow, slow_patches = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert fast_patches < slow_patches
