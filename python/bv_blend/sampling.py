"""Sampling completions from the policy and scoring tokens under a model.

Prompts are left-padded, each repeated `num_generations` times in a row so that every group is
a contiguous run. A completion ends at its first EOS (kept and trained on, so that the model
learns when to stop); the tokens generated after it are padding and masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C): 1 up to and including the first EOS
    completions: list[str]  # decoded text without special tokens

    # Cached: the trainer slices them for every micro-batch of every update.
    @cached_property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @cached_property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int | list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS of each row, 0 after it."""
    eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos_ids)
    # Count of EOS strictly before each position: a token is kept while that count is zero.
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (eos_before == 0).long()


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], *, num_generations: int,
                       max_completion_length: int, temperature: float, top_p: float,
                       autocast_dtype: torch.dtype | None = None) -> Rollout:
    """Sample `num_generations` completions for every prompt with the global torch RNG."""
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(num_generations)]
    enc = tokenizer(repeated, return_tensors="pt", padding=True, padding_side="left").to(device)
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        # top_k=0 and the neutral penalty keep sampling at softmax(logits / T), cut only by
        # top_p: the distribution the loss recomputes. A checkpoint's generation_config could
        # otherwise add its own top_k or repetition penalty.
        output = model.generate(
            **enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=max_completion_length, min_new_tokens=0, repetition_penalty=1.0,
            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    completion_ids = output[:, enc["input_ids"].shape[1]:]
    mask = completion_mask(completion_ids, eos)
    # Pad the rows that stopped early so that text after the EOS can never leak into decoding.
    completion_ids = torch.where(mask.bool(), completion_ids, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(enc["input_ids"], enc["attention_mask"], completion_ids, mask, texts)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   num_completion_tokens: int, temperature: float = 1.0,
                   autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Log-probabilities (B, C) of the last C tokens of `input_ids` under `model`, at the sampling
    temperature so that they match the distribution the tokens were drawn from."""
    # Positions count real tokens only, as generate() numbers them for left-padded prompts.
    # Rotary models are blind to the shift, but with absolute position embeddings the default
    # 0..L-1 would change every padded row's log-probabilities.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    device_type = input_ids.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, logits_to_keep=num_completion_tokens + 1,
                       use_cache=False).logits
    # The logits at position t predict token t + 1: drop the last, align with the completion.
    logits = logits[:, :-1].float() / temperature
    targets = input_ids[:, -num_completion_tokens:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
