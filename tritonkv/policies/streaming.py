"""StreamingLLM (Xiao et al., arXiv 2309.17453)."""

from .. import dsl


def streaming_llm(sinks: int = 4) -> dsl.Policy:
    """StreamingLLM: the first ``sinks`` tokens (attention sinks, 4 in the paper) plus the
    most recent tokens that fill the rest of the budget."""
    return dsl.sink(sinks) | dsl.recent()
