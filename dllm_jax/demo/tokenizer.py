"""The demo model's tokenizer: a byte-level BPE trained on the task texts, with LLaDA-8B-Instruct's
special tokens and chat template.

Numbers: a number of one or two digits after ``", "``, ``" from "`` or ``" to "`` is one token with
that prefix (``", 15"``, ``" to 15"``), so a count is one token per number and its stop is a match
between the last token and the prompt's ``" to b"`` token; every other digit is its own token (the
additions, the first number of a count, anything of three digits or more), so a sum is written
digit by digit and held-out additions rest on digit sums the model has seen.
"""

from __future__ import annotations

from dllm_jax.demo import tasks

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|mdm_mask|>"]
BOS, EOS, EOT, MASK = 0, 1, 2, 5
DIGITS = tuple(range(21, 31))  # "0".."9": the byte-level alphabet's order, at every vocabulary size
# A 1-2 digit number after one of these is one token with it (the numbers a count can have there).
PREFIXES = {", ": range(1, 100), " from ": range(99), " to ": range(1, 100)}
NUMBER = r"(?:, | from | to )\d{1,2}(?!\d)|\d"  # the pre-tokenizer's isolated pieces
# LLaDA-8B-Instruct's template (BOS, then header / content / <|eot_id|> per message).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def train_tokenizer(vocab_size: int):
    """A byte-level BPE over the task texts; the numbers as in the module docstring (a
    ``vocab_size`` too small to hold every prefixed number fails)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Prefixed numbers and single digits split first (each its own pre-token: a digit never
    # merges with anything else); the rest is byte-level without the GPT-2 regex, so ", " and
    # "Count" can become single tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(NUMBER), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = list(tasks.corpus())
    # The chat scaffolding as plain text, so "user", "assistant" and "\n\n" get merges too.
    texts += ["user\n\n", "assistant\n\n"] * 100
    # Every prefixed number often enough that its merges come before rarer words'.
    texts += [prefix + str(n) for prefix, numbers in PREFIXES.items() for n in numbers] * 1000
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    assert tuple(tok.token_to_id(str(d)) for d in range(10)) == DIGITS
    for prefix, numbers in PREFIXES.items():
        for n in numbers:
            ids = tok.encode(f"{prefix}{n}", add_special_tokens=False).ids
            if len(ids) != 1:
                raise ValueError(f"vocab_size {vocab_size} is too small: {prefix + str(n)!r} is {len(ids)} tokens")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|mdm_mask|>"],
        model_max_length=512, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def reply_ids(tokenizer, reply: str) -> list[int]:
    return tokenizer.encode(reply, add_special_tokens=False) + [EOT]
