"""docs/policies.md cannot rot: every ```python block runs, and every policy it defines
evicts the same tokens on the reference and the Triton backends (the reference on the CPU; the
kernels on CUDA where present, else in the interpreter).

Each block runs with the prelude ``import tritonkv as tkv; from tritonkv import policies``;
the variables it binds whose names start with ``policy`` and hold a Policy or a clause are
the policies under test. ``text`` blocks (primitives tritonkv lacks) are not run.
"""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import tritonkv as tkv
from tritonkv import dsl
from tritonkv.budget import allocate, resolve_budget

from .devices import DEVICE, to_device

DOC = Path(__file__).resolve().parent.parent / "docs" / "policies.md"
PRELUDE = "import tritonkv as tkv\nfrom tritonkv import policies\n"
BUDGET = 0.25
B, H_KV, H_Q, D = 1, 2, 4, 64
MIN_QUERIES = 16
# cache lengths tried in turn (odd, so no chunk or pool lines up by accident): the first one
# longer than twice the policy's proxy window that leaves its selective clauses >= MIN_SELECTED tokens
LENGTHS = (97, 193, 289, 385, 513, 769, 1089)
MIN_SELECTED = 4

# Expressions that fail because of a library bug: "section-variable" id -> one-line reason.
KNOWN_BUGS = {}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def sections(text):
    """(title, body) of every ``### `` section."""
    parts = re.split(r"^### (.+)$", text, flags=re.M)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts), 2)]


def python_blocks(body):
    return [code for lang, code in FENCE.findall(body) if lang == "python"]


def summary_rows(text):
    """Rows of the table under '## Summary': lists of cell texts."""
    table = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def slug(title):
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def collect():
    """(id, policy or the exception its block raised) for every policy* variable of the doc."""
    out = []
    for title, body in sections(DOC.read_text()):
        for number, code in enumerate(python_blocks(body)):
            namespace = {}
            try:
                exec(compile(PRELUDE + code, f"{DOC.name}:{title}", "exec"), namespace)
            except Exception as e:  # reported by the test of this block, not at collection
                out.append((f"{slug(title)}-block{number}", e))
                continue
            found = [(name, value) for name, value in namespace.items()
                     if name.startswith("policy") and isinstance(value, (dsl.Policy, dsl.Clause))]
            if not found:
                out.append((f"{slug(title)}-block{number}",
                            AssertionError(f"{title}: a python block binds no policy* variable")))
            out += [(f"{slug(title)}-{name}", dsl.as_policy(value)) for name, value in found]
    return out


CASES = collect()

# A division by 1 - position() divides 0 by 0 in the masked lanes past N of the last tile
# (Triton interpreter warning; those lanes are never read).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")


def proxy_windows(policy, n):
    """The number of proxy queries each proxy_attention node of the policy uses at length n."""
    out = []
    for score in policy.scores:
        for node in dsl.walk(score):
            if isinstance(node, dsl.ProxyAttention):
                w = node.window
                out.append(MIN_QUERIES if w is None else
                           w if isinstance(w, int) else max(1, min(n, int(w * n + 0.5))))
    return out


def cache_length(policy):
    for n in LENGTHS:
        alloc = allocate(policy, n, resolve_budget(BUDGET, n))
        room = not policy.selective or sum(alloc.clause_counts) >= MIN_SELECTED
        if room and all(2 * w < n for w in proxy_windows(policy, n)):
            return n
    return LENGTHS[-1]


def inputs_for(policy, n, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H_KV, n, D, generator=g)
    values = torch.randn(B, H_KV, n, D, generator=g)
    kwargs = {}
    if policy.needs_queries:
        w = max([MIN_QUERIES] + proxy_windows(policy, n))
        kwargs["queries"] = torch.randn(B, H_Q, w, D, generator=g)
    if policy.signals:
        kwargs["signals"] = {name: torch.randn(B, H_KV, n, generator=g) for name in policy.signals}
    if policy.directions:
        kwargs["directions"] = {name: torch.randn(H_KV, D, generator=g) for name in policy.directions}
    return keys, values, kwargs


def kwargs_on_device(kwargs):
    """evict's tensor arguments (queries; dicts of signals, directions) on the kernels' device."""
    return {arg: {name: t.to(DEVICE) for name, t in value.items()} if isinstance(value, dict) else value.to(DEVICE)
            for arg, value in kwargs.items()}


def on_cpu(result):
    """An Evicted / EvictedVarlen with every tensor on the CPU, beside the reference's."""
    return dataclasses.replace(result, **{f.name: getattr(result, f.name).cpu() for f in dataclasses.fields(result)})


def params():
    for case_id, policy in CASES:
        marks = [pytest.mark.xfail(reason=KNOWN_BUGS[case_id], strict=True)] if case_id in KNOWN_BUGS else []
        yield pytest.param(policy, id=case_id, marks=marks)


@pytest.mark.parametrize("policy", list(params()))
def test_catalogue_policy_runs_alike_on_both_backends(policy):
    if isinstance(policy, Exception):
        raise policy
    n = cache_length(policy)
    keys, values, kwargs = inputs_for(policy, n, seed=n)
    k = resolve_budget(BUDGET, n)
    expected = allocate(policy, n, k).total
    ref = tkv.evict(keys, values, policy, budget=BUDGET, backend="reference", **kwargs)
    out = on_cpu(tkv.evict(*to_device(keys, values), policy, budget=BUDGET, backend="triton",
                           **kwargs_on_device(kwargs)))
    assert type(ref) is type(out)
    if isinstance(ref, tkv.EvictedVarlen):      # adaptive: ragged heads, one budget per row
        assert torch.equal(ref.lengths, out.lengths)
        assert torch.equal(ref.indices, out.indices)
        assert ref.lengths.sum(-1).tolist() == [H_KV * expected] * B
    else:
        assert torch.equal(ref.indices, out.indices), f"{policy!r}: the backends keep different tokens"
        assert ref.indices.shape == (B, H_KV, expected)
        assert bool((ref.indices.diff(dim=-1) > 0).all())
    assert torch.equal(ref.keys, out.keys) and torch.equal(ref.values, out.values)


def test_doc_has_enough_executed_methods():
    executed = [title for title, body in sections(DOC.read_text()) if python_blocks(body)]
    assert len(executed) >= 15, executed


def test_summary_table_matches_the_sections():
    text = DOC.read_text()
    rows = summary_rows(text)
    assert len(rows) >= 20, f"the summary table lists {len(rows)} methods"
    by_title = dict(sections(text))
    assert [row[0] for row in rows] == list(by_title), "table rows and ### sections differ (names or order)"
    for row in rows:
        method, verdict, body = row[0], row[3], by_title[row[0]]
        if verdict == "cannot":
            assert not python_blocks(body) and "Cannot be expressed" in body, method
        else:
            assert python_blocks(body), f"{method}: the table gives {verdict} but the section has no python block"
