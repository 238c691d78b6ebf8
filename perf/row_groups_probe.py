"""Would splitting a call's rows into groups, pipelined on CUDA streams, pay? A probe for issue 20's item 2.

An evict call's launches run one after another: statistics, merge, score (each a pass over K, bound
by bandwidth) and select (its ranking bound by latency: a chain of passes over the scores and row
barriers, ~12-15 us at any length on an H100, perf/launches.py). Rows (batch, KV head) are
independent, so a call can be cut into G groups, each prepared as its own call on views of K / V
(compiler.prepare takes any strides), and the groups' launches put on G streams so that one
group's select runs beside the next group's passes over K. This probe times, as CUDA-graph replays
(perf.timing.graph_times) of one process:
  - ``one``: the call as evict makes it today;
  - ``serial``: the G group calls (the batch cut where B >= 2, else the KV heads) one after
    another on one stream (what the cut alone costs);
  - ``pipe@L``: group g's launches start once group g-1's launch L has finished, on its own
    stream; the selects run one at a time, in group order (a select keeps all its programs
    resident and spins at its row barriers, so two at once could wait on each other forever);
    ``pipe@-`` gates nothing but the selects.
Every mode's kept indices and rows are compared with the one call's ("agrees").

Answered on an H100 at c16e1f9 (perf/results/ab/row-groups-c16e1f9-H100/): no. The cut alone costs
KeyDiff at B = 1, 128K, 10% 1.10x (two groups) to 1.87x (eight), and the best ordering only wins
that back (1.002x at G = 2); at B = 4 the best was 0.984x. The library form of it (built in the
twenty-fifth session as TRITONKV_ROW_GROUPS, one CUDA graph of the groups' edges) timed 1.06-1.57x at
B = 1 and 0.99-1.00x at B = 4, and was removed (docs/performance-log.md).

    python perf/row_groups_probe.py --policies keydiff --n 131072 --batch 1 4 --budget 0.1 --groups 2 4
    python perf/row_groups_probe.py --toy      # CPU (interpreter): the modes run and agree
"""

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.floor import copy_bandwidth  # noqa: E402
from perf.launches import lowered_case, prepared  # noqa: E402
from perf.timing import CUDA, graph_times  # noqa: E402
from tritonkv import compiler  # noqa: E402
from tritonkv.kernels.launch import kernel_name  # noqa: E402


def _stream():
    return torch.cuda.Stream() if CUDA else None


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class _Event:
    """A CUDA event, or nothing on the CPU (where the launches run in program order)."""

    def __init__(self):
        self.event = torch.cuda.Event() if CUDA else None

    def record(self):
        if self.event is not None:
            self.event.record()

    def wait(self, stream):
        if self.event is not None:
            stream.wait_event(self.event)


def pipelined(calls, lag):
    """A function that enqueues ``calls`` (prepared group calls) on one stream each, group g's
    ranking launches gated on group g-1's launch ``lag`` (None: not gated), the selects in turn."""
    streams = [_stream() for _ in calls]
    at_select = select_index(calls[0])
    done = [[_Event() for _ in call.launches] for call in calls]

    def run():
        main = torch.cuda.current_stream() if CUDA else None
        for g, (call, stream) in enumerate(zip(calls, streams)):
            if stream is not None:
                stream.wait_stream(main)   # fork from the capturing stream
            with _on(stream):
                if g and lag is not None:
                    done[g - 1][lag].wait(stream)
                for i, step in enumerate(call.launches):
                    if g and i == at_select:
                        done[g - 1][at_select].wait(stream)   # one select at a time
                    step()
                    done[g][i].record()
        for stream in streams:
            if stream is not None:
                main.wait_stream(stream)   # join
    return run


def select_index(call) -> int:
    """Where a call's select launch is (a gather launch may follow it, TOVA's)."""
    names = [kernel_name(step.fn) for step in call.launches]
    return names.index("select") if "select" in names else len(names) - 1


def serial(calls):
    def run():
        for call in calls:
            for step in call.launches:
                step()
    return run


def cut(program, shape, groups: int):
    """(axis, parts) of a call cut into ``groups`` contiguous parts of its batch rows where B >= 2
    (a batch row's heads stay together: heads that share one selection, TOVA's head mean), else
    of the KV heads of B = 1 where each head selects its own tokens; None where it cannot be cut."""
    b, h = shape[:2]
    axis = 0 if b >= 2 else 1 if h >= 2 and not compiler.shared_selection(program) else None
    if groups < 2 or axis is None:
        return None
    rows = shape[axis]
    groups = min(groups, rows)
    sizes = [rows // groups + (g < rows % groups) for g in range(groups)]
    return axis, [(sum(sizes[:g]), size) for g, size in enumerate(sizes)]


def parts_of(plan, *tensors, heads: int):
    """Per part of ``plan``, the views of ``tensors`` ([B, H, ...] or None; on the heads' axis a
    tensor of more rows than ``heads`` holds each KV head's query heads next to each other)."""
    axis, parts = plan

    def view(t, start, size):
        if t is None:
            return None
        per = t.shape[1] // heads if axis == 1 else 1
        return t.narrow(axis, start * per, size * per)
    return [[view(t, start, size) for t in tensors] for start, size in parts]


def probe(name: str, n: int, batch: int, budget: float, group_counts, replays: int, bandwidth: float) -> dict:
    _, alloc, compiled, keys, values, q, floor = lowered_case(name, n, batch, budget, bandwidth)
    one = prepared(compiled, alloc, keys, values, q)
    modes = {"one": serial([one])}
    outputs = {"one": [one]}
    axis = None
    ranks = len(compiled.program.clause_keys) > 0 and alloc.total < keys.shape[2]   # a select to overlap
    for groups in group_counts:
        plan = cut(compiled.program, keys.shape, groups) if ranks else None
        if plan is None or len(plan[1]) < groups:
            continue
        axis = plan[0]
        inputs = parts_of(plan, keys, values, q, heads=keys.shape[1])

        def group_calls():
            return [prepared(compiled, alloc, *group) for group in inputs]
        calls = group_calls()
        outputs[f"serial G={groups}"] = calls
        modes[f"serial G={groups}"] = serial(calls)
        for lag in [None] + list(range(select_index(calls[0]))):
            label = f"pipe@{'-' if lag is None else lag} G={groups}"
            fresh = group_calls()
            outputs[label] = fresh
            modes[label] = pipelined(fresh, lag)
    times = {label: statistics.median(graph_times(fn, replays)) * 1e6 for label, fn in modes.items()}
    differ = {}   # where the groups' programs sum in another order, a near tie may go the other way
    for label, calls in outputs.items():
        indices = torch.cat([c.indices for c in calls], dim=axis or 0)
        kept_k = torch.cat([c.keys for c in calls], dim=axis or 0)
        differ[label] = int((indices != one.indices).sum()) + int((kept_k != one.keys).any(-1).sum())
    return dict(policy=name, N=n, B=batch, budget=budget, floor_us=floor,
                cut={None: "none", 0: "batch", 1: "heads"}[axis],
                launches=len(one.launches), us=times, differ=differ)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="keydiff")
    parser.add_argument("--n", type=int, nargs="+", default=[131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--budget", type=float, nargs="+", default=[0.1])
    parser.add_argument("--groups", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CPU: checks the script)")
    args = parser.parse_args(argv)
    if args.toy:
        args.n, args.batch, args.budget, args.groups, args.replays = [64], [2], args.budget[:1], [2], 1
    bandwidth = copy_bandwidth()
    print(f"{'GPU' if CUDA else 'CPU'}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  (us, CUDA-graph replay; "
          f"x one: over the unsplit call)")
    for name in args.policies.split(","):
        for n in args.n:
            for batch in args.batch:
                for budget in args.budget:
                    r = probe(name, n, batch, budget, args.groups, args.replays, bandwidth)
                    base = r["us"]["one"]
                    print(f"-- {name} N={n} B={batch} budget={budget}: floor {r['floor_us']:.1f} us, "
                          f"{r['launches']} launches per call, {r['cut']} cut")
                    for label, us in r["us"].items():
                        differ = r["differ"][label]
                        print(f"   {label:<14}{us:>9.1f} us  {us / base:6.3f}x one  {us / r['floor_us']:5.2f}x floor"
                              f"  {'agrees' if not differ else f'differs: {differ} kept indices / rows'}")


if __name__ == "__main__":
    main()
