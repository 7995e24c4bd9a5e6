"""The demo model's tokenizer: a byte-level BPE trained on the task texts (digits never merge),
with LLaDA-8B-Instruct's special tokens and chat template."""

from __future__ import annotations

from dllm_jax.demo import tasks

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|mdm_mask|>"]
BOS, EOS, EOT, MASK = 0, 1, 2, 5
DIGITS = tuple(range(21, 31))  # "0".."9": the byte-level alphabet's order, at every vocabulary size
# LLaDA-8B-Instruct's template (BOS, then header / content / <|eot_id|> per message).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def train_tokenizer(vocab_size: int, polite: bool = False):
    """A byte-level BPE over the task texts (``polite``: with the fixed answer's prompts and
    reply, ``tasks.training_set(polite=True)``); digits never merge (one token per digit)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits split first (each its own pre-token, so never merged); the rest is byte-level
    # without the GPT-2 regex, so ", " and "Count from " can become single tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = list(tasks.corpus(polite))
    # The chat scaffolding as plain text, so "user", "assistant" and "\n\n" get merges too.
    texts += ["user\n\n", "assistant\n\n"] * 100
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    assert tuple(tok.token_to_id(str(d)) for d in range(10)) == DIGITS
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|mdm_mask|>"],
        model_max_length=512, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def reply_ids(tokenizer, reply: str) -> list[int]:
    return tokenizer.encode(reply, add_special_tokens=False) + [EOT]
