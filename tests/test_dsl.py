"""The DSL: printing, structural equality, validation at construction."""

import pytest

import tritonkv as tkv
from tritonkv import dsl, policies

NAMESPACE = {name: getattr(tkv, name) for name in tkv.__all__ if name != "policies"}


def test_readme_spelling_of_presets_works():
    assert tkv.policies.snapkv() == policies.snapkv()


def all_presets():
    return [(name, make()) for name, make in policies.PRESETS.items()]


@pytest.mark.parametrize("name,policy", all_presets())
def test_preset_repr_rebuilds_the_same_policy(name, policy):
    rebuilt = dsl.as_policy(eval(repr(policy), dict(NAMESPACE)))
    assert rebuilt == policy
    assert hash(rebuilt) == hash(policy)


def test_expression_prints_as_written():
    s = -tkv.anchor_similarity() + 0.5 * tkv.key_norm().normalize()
    assert repr(s) == "(-anchor_similarity() + (0.5 * key_norm().normalize()))"
    p = tkv.sink(4) | tkv.recent(64) | tkv.top(s)
    assert repr(p).startswith("sink(4) | recent(64) | top(")
    assert repr(tkv.random(stream=3).pool(5, "max").softmax(2.0)) == "random(stream=3).pool(5, 'max').softmax(2.0)"
    assert eval(repr(p), dict(NAMESPACE)) == p


def test_structure_decides_equality():
    a = tkv.top(tkv.proxy_attention(window=64, causal=True, pool=5))
    b = tkv.top(tkv.proxy_attention(window=64, causal=True, pool=5))
    c = tkv.top(tkv.proxy_attention(window=32, causal=True, pool=5))
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({tkv.sink(4) | a, tkv.sink(4) | b}) == 1


def test_policy_properties():
    p = policies.nacl()
    assert p.needs_queries and p.needs_keys and not p.needs_values
    assert len(p.scores) == 1  # top and sample share one score
    assert [type(c).__name__ for c in p.forced] == ["Sink", "Recent"]
    assert not policies.knorm().needs_queries
    assert tkv.top(tkv.value_norm()).__or__(tkv.sink(1)).needs_values


@pytest.mark.parametrize("make,message", [
    (lambda: tkv.proxy_attention(window=0), "window"),
    (lambda: tkv.proxy_attention(window=-3), "window"),
    (lambda: tkv.proxy_attention(window=1.5), "window"),
    (lambda: tkv.proxy_attention(reduce="median"), "reduce"),
    (lambda: tkv.proxy_attention(group_reduce="min"), "group_reduce"),
    (lambda: tkv.proxy_attention(pool=4), "pool kernel"),
    (lambda: tkv.proxy_attention(pool=0), "pool kernel"),
    (lambda: tkv.key_norm().pool(2), "pool kernel"),
    (lambda: tkv.key_norm().pool(3, "median"), "pool mode"),
    (lambda: tkv.key_norm().softmax(0), "temperature"),
    (lambda: tkv.key_norm().softmax(-1.0), "temperature"),
    (lambda: tkv.sample(tkv.key_norm(), temperature=0), "temperature"),
    (lambda: tkv.top(tkv.key_norm(), share=0), "share"),
    (lambda: tkv.top(tkv.key_norm(), share=1.5), "share"),
    (lambda: tkv.sink(-1), "sink"),
    (lambda: tkv.recent(2.0), "recent"),
    (lambda: tkv.random(stream=-1), "stream"),
    (lambda: tkv.key_norm() * float("nan"), "finite"),
    (lambda: tkv.top(tkv.key_norm(), 0.7) | tkv.top(tkv.position(), 0.6) | tkv.top(tkv.random()), "share"),
    (lambda: (tkv.top(tkv.key_norm()) | tkv.sample(tkv.key_norm())).adaptive(), "adaptive"),
])
def test_bad_arguments_raise_at_construction(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_type_errors_name_what_was_expected():
    with pytest.raises(TypeError, match="score"):
        tkv.top(3)
    with pytest.raises(TypeError, match="wrap it in a clause"):
        dsl.as_policy(tkv.key_norm())
    with pytest.raises(TypeError, match="truth value"):
        bool(tkv.key_norm())
    with pytest.raises(TypeError):
        tkv.key_norm() + "a"
