"""The randomly initialized tiny Llama (no weights needed) that the Hugging Face tests run."""

import torch


def tiny_llama():
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(b: int, n: int, seed: int = 1, low: int = 1) -> torch.Tensor:
    """[b, n] token ids in [low, 101); low = 1 leaves out the pad token 0."""
    return torch.randint(low, 101, (b, n), generator=torch.Generator().manual_seed(seed))
