from .. import dsl


def with_windows(sinks, recent, *clauses: dsl.Clause) -> dsl.Policy:
    """A policy of optional sink / recent windows (left out when 0) followed by clauses."""
    forced = ([dsl.sink(sinks)] if sinks else []) + ([dsl.recent(recent)] if recent else [])
    return dsl.Policy(tuple(forced) + clauses)
