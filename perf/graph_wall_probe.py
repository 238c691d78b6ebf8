"""Why setting_ab's wall (CUDA events around one call after an L2 flush) rises with graph launches
(TRITONKV_GRAPH_LAUNCH=1, H100 at b8676c2 with the graph-launch patch) while perf_counter around sync / call / sync
does not: both measures, with and without the flush, 20 samples each, per value."""
import os
import statistics

import tritonkv as tkv
from perf.test_evict import POLICIES, make_cache
from perf.timing import counter_seconds, event_seconds


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
            events, ev_noflush, counter, counter_noflush = (
                statistics.median(measure(fn, flush=flush) for _ in range(20)) * 1e6
                for measure in (event_seconds, counter_seconds) for flush in (True, False))
            print(f"{name:14s} {value}: events+flush {events:7.1f}  events {ev_noflush:7.1f}  "
                  f"counter+flush {counter:7.1f}  counter {counter_noflush:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
