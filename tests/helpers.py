"""Small builders shared by several test files (import as `from helpers import ...`)."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel  # test-only oracle

# A few lines of English text, repeated: enough for a tiny BPE tokenizer and a tiny corpus.
DOCS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun all day long.",
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer.",
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    "All the world's a stage, and all the men and women merely players; they have exits.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
] * 6


def hf_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """A tiny random Hugging Face GPT-2 (no dropout), weights spread so outputs are clear-cut."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf
