"""What the "start" of a timed call is (perf/launches.py: ~18 us on an H100 for a graph of one
one-element fill): the same graph timed as graph_times times it, after L2 is flushed by writing a
256 MB buffer (timing.flush_l2: L2 left full of dirty lines, written back during the timed call),
by reading one (L2 left clean), and not flushed; also with the graph queued behind a GPU sleep
(the host's launch hidden). One process, medians of 50.

    python perf/flush_probe.py [--json OUT.json]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--replays", type=int, default=50)
    args = ap.parse_args()
    buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    one = torch.empty(1, device="cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        one.fill_(1.0)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            one.fill_(1.0)
    flushes = {"write": buf.zero_, "read": lambda: buf.view(torch.int32).sum(), "none": lambda: None}
    results = {"device": torch.cuda.get_device_name()}
    for name, flush in flushes.items():
        for lead in (0.0, 1e-4):
            times = []
            for _ in range(args.replays):
                flush()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if lead:
                    torch.cuda._sleep(int(lead * 2e9))
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            key = f"{name}{'-queued' if lead else ''}"
            results[key] = statistics.median(times)
            print(f"flush {key:14s} {results[key]:7.2f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
