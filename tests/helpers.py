"""Small deterministic models and problems for the core tests (explicit generators, no global seed)."""
from __future__ import annotations

import torch


def fill_(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with seeded Gaussian values (deterministic, global RNG untouched)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return module


def mlp(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    return fill_(m.to(dtype), seed)


def classification_batch(seed: int = 1, n: int = 32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def mlp_loss(model, x, y):
    return lambda: torch.nn.functional.cross_entropy(model(x), y)


def tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        model = LlamaForCausalLM(config)
    fill_(model, seed, scale=0.1)
    for name, p in model.named_parameters():
        if "norm" in name:
            with torch.no_grad():
                p.fill_(1.0)
    return model.to(dtype).eval()


def lm_batch(seed: int = 2, n: int = 4, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (n, length), generator=g)


def lm_loss(model, ids):
    return lambda: model(input_ids=ids, labels=ids).loss
