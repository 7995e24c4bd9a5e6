"""The demo model's tokenizer: a byte-level BPE trained on the task texts, with LLaDA-8B-Instruct's
special tokens and chat template.

Numbers: every number from 0 to 198 is one token (as in the number tokens of GPT-4's and Llama 3's
tokenizers, which merge up to three digits), the same token in a prompt and in a reply. A count's
stop is then the match of its last number with the prompt's b, its first number a copy of the
prompt's a, and a sum one token: its place in the reply never depends on how many digits it has.
A longer digit run splits into those tokens.
"""

from __future__ import annotations

from dllm_jax.demo import tasks

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|mdm_mask|>"]
BOS, EOS, EOT, MASK = 0, 1, 2, 5
DIGITS = tuple(range(21, 31))  # "0".."9": the byte-level alphabet's order, at every vocabulary size
NUMBERS = range(199)  # one token each: every operand, sum and count number of the tasks
# LLaDA-8B-Instruct's template (BOS, then header / content / <|eot_id|> per message).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def train_tokenizer(vocab_size: int, polite: bool = True):
    """A byte-level BPE over the task texts (``polite``: with the fixed answer's prompts and
    reply, ``tasks.training_set(polite=True)``); every number 0-198 one token (a ``vocab_size``
    too small to hold them all fails)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digit runs split first (each its own pre-token: a digit merges only with digits); the rest
    # is byte-level without the GPT-2 regex, so ", " and "Count from " can become single tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = list(tasks.corpus(polite))
    # The chat scaffolding as plain text, so "user", "assistant" and "\n\n" get merges too.
    texts += ["user\n\n", "assistant\n\n"] * 100
    # Every task number often enough that its merges come before rarer words'.
    texts += [str(n) for n in NUMBERS] * 3000
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    assert tuple(tok.token_to_id(str(d)) for d in range(10)) == DIGITS
    for n in NUMBERS:
        if tok.token_to_id(str(n)) is None:
            raise ValueError(f"vocab_size {vocab_size} is too small: the number {n} is not one token")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|mdm_mask|>"],
        model_max_length=512, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def reply_ids(tokenizer, reply: str) -> list[int]:
    return tokenizer.encode(reply, add_special_tokens=False) + [EOT]
