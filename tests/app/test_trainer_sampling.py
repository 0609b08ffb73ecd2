"""Sampling: EOS masking, padding, and token log-probabilities that match the sampler's."""

import os

import pytest
import torch

from bv_blend.sampling import completion_mask, sample_completions, token_logprobs
from bv_blend.tiny_model import build_tiny_model, load_model_and_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, tokenizer = load_model_and_tokenizer(
        build_tiny_model(str(tmp_path_factory.mktemp("tiny")), seed=1))
    return model.eval(), tokenizer


def test_completion_mask_keeps_the_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(completion_mask(ids, 2), expected)
    # Several EOS ids (as some generation configs list) end a completion alike.
    assert torch.equal(completion_mask(torch.tensor([[5, 3, 2]]), [2, 3]),
                       torch.tensor([[1, 1, 0]]))


def test_tiny_tokenizer_round_trip(tiny):
    _, tokenizer = tiny
    text = "rev 123:\n 3+5=08 é"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte
    assert tokenizer.decode(ids) == text


def test_groups_are_contiguous_and_padding_is_masked(tiny):
    model, tokenizer = tiny
    torch.manual_seed(0)
    rollout = sample_completions(model, tokenizer, ["1+2=", "rev 123:"], num_generations=3,
                                 max_completion_length=5, temperature=1.0, top_p=1.0)
    assert rollout.prompt_ids.shape[0] == 6
    assert torch.equal(rollout.prompt_ids[0], rollout.prompt_ids[2])
    assert not torch.equal(rollout.prompt_ids[2], rollout.prompt_ids[3])
    assert rollout.prompt_mask[0, 0] == 0  # the shorter prompt is padded on the left
    masked = rollout.completion_mask == 0
    assert (rollout.completion_ids[masked] == tokenizer.pad_token_id).all()


def test_sampling_stops_at_eos(tiny):
    model, tokenizer = tiny
    # Make EOS by far the likeliest next token: every completion is just EOS.
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 100.0
    head = model.get_output_embeddings()
    original = head.forward
    head.forward = lambda x: original(x) + bias
    try:
        rollout = sample_completions(model, tokenizer, ["1+2="], num_generations=4,
                                     max_completion_length=5, temperature=1.0, top_p=1.0)
    finally:
        head.forward = original
    assert rollout.completions == [""] * 4
    assert rollout.completion_mask[:, 0].tolist() == [1] * 4
    assert rollout.completion_mask[:, 1:].sum() == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_the_sampler(tiny, temperature):
    """The loss's log-probabilities of the sampled tokens equal those generate() sampled from
    (same temperature, logits aligned with the tokens they predict), left padding included."""
    model, tokenizer = tiny
    prompts = ["1+2=", "rev 123:"]
    torch.manual_seed(0)
    rollout = sample_completions(model, tokenizer, prompts, num_generations=2,
                                 max_completion_length=6, temperature=temperature, top_p=1.0)
    torch.manual_seed(0)
    enc = tokenizer([p for p in prompts for _ in range(2)], return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                         max_new_tokens=6, output_logits=True, return_dict_in_generate=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sampled = out.sequences[:, enc["input_ids"].shape[1]:]
    mask = rollout.completion_mask.bool()
    assert torch.equal(sampled[mask], rollout.completion_ids[mask])
    reference = torch.log_softmax(torch.stack(out.logits, 1).float() / temperature, -1)
    reference = reference.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ours = token_logprobs(model, rollout.input_ids, rollout.attention_mask,
                              rollout.completion_ids.shape[1], temperature)
    torch.testing.assert_close(ours[mask], reference[mask], rtol=1e-4, atol=1e-4)
