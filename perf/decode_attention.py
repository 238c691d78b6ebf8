"""Decode attention over a StaticEvictingCache layer's slots: tritonkv's split-KV kernel
(tritonkv.kernels.decode) against SDPA with a mask over every slot (what the cache ran before,
and what transformers' StaticCache runs: its keys repeated per query head, then the
memory-efficient kernel), and FlashAttention over exactly the occupied keys
(no mask; a shape that changes every step, so not what a fixed-shape cache can call), as
multiples of the HBM floor (reading the occupied K and V once). Graph-replay times, one
process; the wide model's layer shape (32 query heads on 8 KV heads of 128) by default.

    python perf/decode_attention.py [--slots 2048 13171 131072] [--batch 1] [--json FILE]
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf.floor import copy_bandwidth  # noqa: E402
from perf.timing import DEVICE, graph_seconds  # noqa: E402
from tritonkv.kernels.decode import decode_attention  # noqa: E402


def case(batch, hq, h, c, d, dtype, bandwidth, fill=0.9):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(batch, hq, 1, d, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(batch, h, c, d, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(batch, h, c, d, device=DEVICE, dtype=dtype, generator=g)
    length = torch.tensor(int(c * fill), device=DEVICE)
    start = torch.zeros(batch, dtype=torch.long, device=DEVICE)
    n = int(length)
    mask = (torch.arange(c, device=DEVICE) < length)[None, None, None, :].expand(batch, 1, 1, c)
    scale = d ** -0.5
    group = hq // h
    kr, vr = (x[:, :, :n].repeat_interleave(group, 1) for x in (k, v))   # flash's GQA heads, made untimed

    def masked():   # as transformers' sdpa_attention_forward does with a mask: repeat_kv, then SDPA
        kx, vx = (x[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, hq, c, d) for x in (k, v))
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask, scale=scale)

    def flash():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, kr, vr, scale=scale)

    floor = 2 * batch * h * n * d * k.element_size() / bandwidth
    times = dict(triton=graph_seconds(lambda: decode_attention(q, k, v, start, length, scale), 20),
                 sdpa_masked=graph_seconds(masked, 20), flash_occupied=graph_seconds(flash, 20))
    ref = flash().transpose(1, 2).float()
    err = (decode_attention(q, k, v, start, length, scale).float() - ref).abs().max().item()
    return dict(batch=batch, heads_q=hq, heads_kv=h, slots=c, occupied=n, d=d, dtype=str(dtype).split(".")[-1],
                floor_us=floor * 1e6, max_abs_diff_vs_flash=err,
                **{f"{name}_us": t * 1e6 for name, t in times.items()},
                **{f"{name}_x_floor": t / floor for name, t in times.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, nargs="+", default=[2048, 13171, 131072])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bw = copy_bandwidth()
    rows = [case(b, 32, 8, c, 128, torch.bfloat16, bw) for b in args.batch for c in args.slots]
    print(f"{'B':>3}{'slots':>8}{'floor us':>10}{'triton':>10}{'x':>6}{'sdpa mask':>11}{'x':>7}"
          f"{'flash':>9}{'x':>6}{'diff':>9}")
    for r in rows:
        print(f"{r['batch']:>3}{r['slots']:>8}{r['floor_us']:>10.1f}{r['triton_us']:>10.1f}{r['triton_x_floor']:>6.2f}"
              f"{r['sdpa_masked_us']:>11.1f}{r['sdpa_masked_x_floor']:>7.1f}{r['flash_occupied_us']:>9.1f}"
              f"{r['flash_occupied_x_floor']:>6.2f}{r['max_abs_diff_vs_flash']:>9.1e}")
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), bandwidth=bw, rows=rows), indent=1))


if __name__ == "__main__":
    main()
