"""Why setting_ab's wall (CUDA events around one call after an L2 flush) rises with graph launches
(TRITONKV_GRAPH_LAUNCH=1, H100 at b8676c2 with the graph-launch patch) while perf_counter around sync / call / sync
does not: both measures, with and without the flush, 20 samples each, per value."""
import os
import statistics
import time

import torch

import tritonkv as tkv
from perf.test_evict import POLICIES, make_cache
from perf.timing import event_seconds, flush_l2


def main():
    for name in ("keydiff", "streaming_llm"):
        keys, values, queries = make_cache(1, 32768)
        q = queries if POLICIES[name].needs_queries else None
        for value in ("0", "1"):
            os.environ["TRITONKV_GRAPH_LAUNCH"] = value
            ev = tkv.Evictor(POLICIES[name], 0.1)
            fn = lambda: ev(keys, values, queries=q)  # noqa: E731
            for _ in range(5):
                fn()
            events = statistics.median(event_seconds(fn) for _ in range(20)) * 1e6
            counter = []
            for flush in (True, False):
                times = []
                for _ in range(20):
                    if flush:
                        flush_l2()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                counter.append(statistics.median(times) * 1e6)
            ev_noflush = []
            for _ in range(20):
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                ev_noflush.append(s.elapsed_time(e) * 1e3)
            print(f"{name:14s} {value}: events+flush {events:7.1f}  events {statistics.median(ev_noflush):7.1f}  "
                  f"counter+flush {counter[0]:7.1f}  counter {counter[1]:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
