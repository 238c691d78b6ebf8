"""Where a kernel's warps stall, per source line, from Nsight Compute's source page.

`ncu --import REPORT.ncu-rep --page source --print-source sass,cuda --csv > SOURCE.csv` writes one
section per source file (a "File Path" row, a header row, then a row per line with its stall
samples and executed instructions). This sums them per (file, line) and prints the lines that
hold the most stall samples, each with its share of the samples and of the instructions:

    python perf/ncu_lines.py SOURCE.csv --top 30
"""

import argparse
import collections
import csv
from pathlib import Path
from typing import Dict, List, Tuple

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"

Line = Tuple[str, int]


def _number(text: str) -> float:
    try:
        return float(text.replace(",", "")) if text else 0.0
    except ValueError:
        return 0.0


def per_line(rows: List[List[str]]) -> Tuple[Dict[Line, float], Dict[Line, float], Dict[Line, str]]:
    """(stall samples, instructions executed, source text) per (file name, line number)."""
    samples: Dict[Line, float] = collections.Counter()
    executed: Dict[Line, float] = collections.Counter()
    text: Dict[Line, str] = {}
    file, header = None, None
    for row in rows:
        if not row:
            continue
        if row[0] == "File Path":
            file, header = Path(row[1]).name, None
        elif row[0] == "Line No":
            header = row
        elif header and file and row[0].isdigit():
            key = (file, int(row[0]))
            samples[key] += _number(row[header.index(SAMPLES)])
            executed[key] += _number(row[header.index(EXECUTED)])
            text[key] = row[1].strip()
    return samples, executed, text


def report(path: str, top: int) -> List[str]:
    with open(path, newline="") as f:
        samples, executed, text = per_line(list(csv.reader(f)))
    total, total_exec = sum(samples.values()) or 1.0, sum(executed.values()) or 1.0
    by_file = collections.Counter()
    for (file, _), s in samples.items():
        by_file[file] += s
    lines = [f"{path}: {total:.0f} stall samples, {total_exec:.0f} warp instructions executed",
             "by file: " + ", ".join(f"{f} {s / total:.1%}" for f, s in by_file.most_common()),
             "samples  instructions  line"]
    for key, s in sorted(samples.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{s / total:7.1%}  {executed[key] / total_exec:12.1%}  {key[0]}:{key[1]}  {text[key][:100]}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    for path in args.csv:
        print("\n".join(report(path, args.top)))


if __name__ == "__main__":
    main()
