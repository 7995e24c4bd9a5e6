"""The demo model's tokenizer: a byte-level BPE trained on the task texts, with LLaDA-8B-Instruct's
special tokens and chat template.

Numbers: a digit per token (an addition's operands are written digit by digit, so the carry is
the same rule in every column), with two exceptions. The numbers of a count: a number of one or
two digits right after ``from ``, ``to `` or ``, ``, or right before ``, ``, is one token, the
same token in the prompt (``Count from 3 to 15.``) and in the reply (``3, 4, ..., 15``). A
count's first number is then a copy of the prompt's a, and its stop the match of its last number
with the prompt's b, which attention does directly. And a number of three or more digits starts
with its first two as one token: a sum of 100-198 is ``15``, ``3`` (the same tokens 10-19 as the
counts), so every sum of 10 or more is (a + b) // 10 then its units digit, whose reply position
no longer depends on the sum's size (docs/performance.md, "Demo model").
"""

from __future__ import annotations

from dllm_jax.demo import tasks

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|mdm_mask|>"]
BOS, EOS, EOT, MASK = 0, 1, 2, 5
DIGITS = tuple(range(21, 31))  # "0".."9": the byte-level alphabet's order, at every vocabulary size
COUNT_NUMBERS = range(10, 100)  # one token each in a count (the one-digit numbers are digits anyway)
# A count's number (one token), the first two digits of a longer number, else a single digit;
# each its own pre-token.
NUMBER_SPLIT = r"(?<=from |to |, )\d{1,2}(?!\d)|\d{1,2}(?=, )|\d\d(?=\d)|\d"
# LLaDA-8B-Instruct's template (BOS, then header / content / <|eot_id|> per message).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def train_tokenizer(vocab_size: int, polite: bool = False):
    """A byte-level BPE over the task texts (``polite``: with the fixed answer's prompts and
    reply, ``tasks.training_set(polite=True)``); a digit per token but a count's numbers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Numbers split first (each its own pre-token: a digit merges only inside a count's number);
    # the rest is byte-level without the GPT-2 regex, so ", " and "Count from " can become single tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(NUMBER_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = list(tasks.corpus(polite))
    # The chat scaffolding as plain text, so "user", "assistant" and "\n\n" get merges too.
    texts += ["user\n\n", "assistant\n\n"] * 100
    # Every count number often enough that its merge comes before rarer words'.
    texts += [f", {n}" for n in COUNT_NUMBERS] * 3000
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    assert tuple(tok.token_to_id(str(d)) for d in range(10)) == DIGITS
    for n in COUNT_NUMBERS:
        if tok.token_to_id(str(n)) is None:
            raise ValueError(f"vocab_size {vocab_size} is too small: the count number {n} is not one token")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|mdm_mask|>"],
        model_max_length=512, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def reply_ids(tokenizer, reply: str) -> list[int]:
    return tokenizer.encode(reply, add_special_tokens=False) + [EOT]
