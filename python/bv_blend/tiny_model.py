"""A tiny randomly initialised causal LM with a character-level tokenizer, for CPU runs and tests.

Nothing is downloaded: the model comes from a transformers config, the tokenizer is built with the
`tokenizers` library, and both are written with `save_pretrained` so that every consumer loads
them the same way a real checkpoint is loaded (`from_pretrained`).
"""

from __future__ import annotations

import os

import torch

ARCHES = ("llama", "qwen2")

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # One token per byte (so one per ASCII character), in the byte-level alphabet with no merges.
    # That layout is what transformers' Qwen2 tokenizer class rebuilds from tokenizer.json when
    # AutoTokenizer loads a qwen2 checkpoint, so Llama and Qwen2 checkpoints tokenize alike; a
    # WordLevel vocabulary would be silently replaced there.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # UNK is never produced (every byte is in the vocabulary) but is declared so that the Qwen2
    # class does not append a token of its own past the model's vocabulary.
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    # Plain prompt format: no chat template and no BOS added, the prompt text is the whole input.
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS,
                                   eos_token=EOS, unk_token=UNK, padding_side="left")


def _build_config(arch: str, tokenizer, hidden_size: int, num_layers: int, num_heads: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    if arch == "llama":
        return LlamaConfig(**common)
    return Qwen2Config(**common)


def build_tiny_model(output_dir: str, arch: str = "llama", seed: int = 0, *,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4) -> str:
    """Create and save a small random Llama/Qwen2 causal LM plus its character tokenizer.

    Returns `output_dir`, ready for `from_pretrained`. The same (arch, seed, sizes) always gives
    the same weights; the caller's global RNG state is left untouched.
    """
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {ARCHES}, got {arch!r}")
    from transformers import AutoModelForCausalLM

    tokenizer = _build_tokenizer()
    config = _build_config(arch, tokenizer, hidden_size, num_layers, num_heads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def load_model_and_tokenizer(path_or_name: str, *, dtype: torch.dtype | None = None,
                             device: str | torch.device | None = None):
    """Load a causal LM and its tokenizer with `from_pretrained`, from local files only.

    `path_or_name` is a directory or a name already in the local Hugging Face cache. The tokenizer
    pads on the left (prompts are generated from) and falls back to EOS as its pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path_or_name, local_files_only=True,
                                                     dtype=dtype)
    except (OSError, ValueError) as err:  # ValueError: huggingface_hub rejects the name as a repo id
        raise FileNotFoundError(
            f"model {path_or_name!r} is neither a local directory with a saved model nor in the "
            f"local Hugging Face cache (downloads are disabled)") from err
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    return model, tokenizer
