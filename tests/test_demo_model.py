"""The trained demo model: its training script still runs, what ships loads, and every
sampling algorithm answers the held-out tasks correctly (a sampler bug that keeps parity on
random weights but writes plausible wrong tokens fails here)."""

import dataclasses
import platform
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm_jax
from benchmarks.demo_add_misses import kinds
from benchmarks.demo_counts import outcome
from dllm_jax.demo import evaluate, tasks
from dllm_jax.demo import train as demo_train
from dllm_jax.demo.score import subkind
from dllm_jax.demo.tokenizer import EOT


@pytest.fixture(scope="module")
def demo():
    return dllm_jax.load(dllm_jax.DEMO_MODEL)


def test_tasks_split():
    # additions: a+b and b+a on the same side, every units- and tens-digit pair on both sides
    held = tasks.additions(held_out=True)
    pairs = {tuple(int(x) for x in e.prompt[8:-1].split("+")) for e in held}
    assert len(pairs) == 948 and all((b, a) in pairs and tasks.add_held_out(a, b) for a, b in pairs)
    for digits in (lambda a, b: (a % 10, b % 10), lambda a, b: (a // 10, b // 10)):
        assert len({digits(a, b) for a, b in pairs}) == 100
        assert len({digits(a, b) for a in range(100) for b in range(100) if (a, b) not in pairs}) == 100
    train = tasks.training_set()
    assert not {e.prompt for e in held} & {e.prompt for e in train["add"]}
    # counts: 0 <= a < b <= 99, b - a <= 30, one pair in ten held out
    assert len(tasks.counts(True)) + len(tasks.counts(False)) == 2535 and len(tasks.counts(True)) == 255
    assert not {e.prompt for e in tasks.counts(True)} & {e.prompt for e in train["count"]}
    assert tasks.count_reply(3, 6) == "3, 4, 5, 6"
    assert all(tasks.count_bounds(tasks.count_prompt(a, b)) == (a, b) for a in range(100) for b in range(100))
    # the polite answer: held out by rule (and issue 25's examples), never an in-range task
    helps = tasks.help_prompts()
    assert not {e.prompt for e in tasks.helps(True)} & {e.prompt for e in train["help"]}
    assert set(tasks.ISSUE_PROBES) <= {e.prompt for e in tasks.helps(True)}
    in_range = {e.prompt for e in tasks.additions(True) + tasks.additions(False) + tasks.counts(True)
                + tasks.counts(False)}
    assert not set(helps) & in_range and len(helps) == len(set(helps))
    assert all(e.reply == tasks.SORRY for e in train["help"])
    backwards = {tasks.count_prompt(a, b) for a in range(100) for b in range(a + 1)}  # b <= a: out of range
    too_long = {tasks.count_prompt(a, b) for a in range(100) for b in range(a + 31, 100)}
    assert len(backwards & set(helps)) > 300 and len(too_long & set(helps)) > 300
    # what a polite-answer prompt looks like (the second phase cuts some kinds at 0)
    assert [tasks.help_kind(p) for p in ("What is 100+250?", "Count from 5 to 80.", "Count from 9 to 3.",
                                         "Count from 90 to 120.", "What is 7*8?", "Tell me a joke", "What is a+b?")] \
        == ["sum", "count", "count", "count_big", "op", "other", "other"]
    assert {tasks.help_kind(p) for p in helps} == {"sum", "count", "count_big", "op", "other"}
    assert [subkind(p) for p in ("Count from 5 to 80.", "Count from 9 to 3.", "Count from 7 to 7.", "Hi")] \
        == ["count_long", "count_back", "count_back", "other"]


def test_shipped_demo_model(demo):
    path = Path(dllm_jax.DEMO_MODEL)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 20 * 2 ** 20, f"demo model is {size / 2 ** 20:.1f} MiB"
    assert demo.family == "llada" and demo.config.mask_token_id == demo.tokenizer.convert_tokens_to_ids("<|mdm_mask|>")
    # a digit per token, but a count's numbers: one token each, the same in the prompt and the reply
    def pieces(text):
        return [demo.tokenizer.decode([i]) for i in demo.tokenizer.encode(text, add_special_tokens=False)]

    assert pieces("What is 47+35?") == ["What is ", "4", "7", "+", "3", "5", "?"] and pieces("82") == ["8", "2"]
    assert pieces("Count from 3 to 15.") == ["Count from ", "3", " to ", "15", "."]
    assert pieces("3, 4, 99") == ["3", ", ", "4", ", ", "99"]
    # a longer number starts with its first two digits as one token: a sum >= 100 is (a+b)//10, units
    assert pieces("153") == ["15", "3"] and pieces("100") == ["10", "0"] and pieces("7") == ["7"]
    assert pieces("1234567890") == ["12", "34", "56", "78", "9", "0"]
    # the LLaDA chat template
    text = demo.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                              add_generation_prompt=True)
    assert text == "<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_training_runs_and_round_trips(tmp_path):
    """A few steps of the real training script on a tiny shape: deterministic from the seed,
    and the written HF dir loads back to the same function."""
    cfg = demo_train.TrainConfig(steps=3, batch=4, short_batch=4, add_batch=4, d_model=32, n_layers=1, n_heads=2,
                                 mlp_hidden_size=64, warmup=1, global_start=16, finetune_steps=2)
    tok = demo_train.train_tokenizer(cfg.vocab_size)
    assert tok.decode(tok.encode(tasks.SORRY, add_special_tokens=False)) == tasks.SORRY
    batches = demo_train.Batches(tok, cfg)
    assert "help" in batches.mix["long"] and "count" in batches.mix["short"] and batches.mix["add"] == {"add": 1.0}
    decisions, kinds, starts = set(), set(), 0
    for step in range(64):  # every row: prompt + reply (with <|eot_id|>) + at least one <|endoftext|>
        kind, tokens, plen, rlen, cut = batches.next()
        kinds.add(kind)
        assert tokens.shape[1] == batches.length(kind) and rlen.min() >= 2
        assert kind != "add" or (cut == 0).all()  # an additions-lane row: the whole response masked
        assert all(row[n - 1] == EOT and row[n] == demo_train.EOS for row, n in zip(tokens, plen + rlen))
        if kind != "add":  # a count cut at 0 (the first-step state): only from cfg.global_start on
            starts += int(np.sum(cut == 0))
            assert step >= cfg.global_start or not (cut == 0).any()
        for row, p, c in zip(tokens, plen, cut):  # a cut row is cut right after one of its count's numbers
            if c > 0:
                shown, decided = tok.decode(row[p + c - 1:p + c]), tok.decode(row[p + c:p + c + 1])
                assert shown[-1:].isdigit() and not decided[:1].isdigit()
                decisions.add(int(row[p + c] == EOT))
    assert decisions == {0, 1} and kinds == {"long", "short", "add"} and starts > 0  # stop at b, go on before it
    config, module, history = demo_train.train(cfg, tok, log_every=1)
    assert [h[0] for h in history] == [1, 2, 3, 4, 5] and all(np.isfinite(loss) for _, loss, _ in history)
    _, again, _ = demo_train.train(cfg, demo_train.train_tokenizer(cfg.vocab_size), log_every=3)
    a, b = nnx.state(module, nnx.Param).to_pure_dict(), nnx.state(again, nnx.Param).to_pure_dict()
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    out = demo_train.write(tmp_path / "m", config, module, tok, {"test": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dir left behind
    loaded = dllm_jax.load(out)
    ids = evaluate.chat_ids(loaded.tokenizer, "What is 1+2?") + [demo_train.MASK] * 8
    tokens = jnp.asarray([ids])
    pos = jnp.arange(len(ids))[None]
    mask = jnp.ones((1, len(ids), len(ids)), bool)
    want = module(tokens, pos, mask)
    got = loaded.logits(np.asarray([ids]))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="too small"):
        demo_train.train_tokenizer(300)  # not room for every count number 10-99 as one token


def test_second_phase(tmp_path):
    """The second phase's batches cut some other-lane addition rows at 0 and leave the rest i.i.d.,
    cut polite-answer rows at 0 by kind, and put in the addition lane out-of-range sums and counts
    with the polite answer's first tokens and training counts with theirs; the two phases in one run
    equal the first phase written, loaded back and given as ``init`` (``--init``: how the second
    phase of the shipped model was checked on its own), and the command line writes the same
    bytes, the first phase too with ``--first-out``."""
    cfg = demo_train.TrainConfig(steps=2, batch=8, short_batch=4, add_batch=4, d_model=32, n_layers=1, n_heads=2,
                                 mlp_hidden_size=64, warmup=1, finetune_steps=2, finetune_warmup=1)
    tok = demo_train.train_tokenizer(cfg.vocab_size, polite=True)  # as the command line trains it
    fine = dataclasses.replace(cfg, seed=cfg.finetune_seed, global_start=0)
    help_cut0 = {"sum": 0.5, "count_big": 0.5, "count": 0.5, "op": 0.5, "other": 0.5}
    first = demo_train.Batches(tok, cfg)
    later = demo_train.Batches(tok, fine, add_cut0=cfg.finetune_add_cut0, help_cut0=help_cut0, add_help=0.25,
                               count_help=0.25, count_in=0.25)
    seen = {True: set(), False: set()}
    polite = {True: set(), False: set()}  # (lane is "add", the prompt's kind, cut)
    counted = {True: 0, False: 0}  # training counts in the addition lane
    for batches, phase2 in ((first, False), (later, True)):
        for _ in range(96):
            kind, tokens, plen, _, cut = batches.next()
            for row, p, c in zip(tokens, plen, cut):
                prompt = tok.decode(row[:p]).split("\n\n")[1].split("<|eot_id|>")[0]
                reply = tok.decode(row[p:], skip_special_tokens=True)
                if tok.decode(row[p:p + 1]).startswith("Sorry"):
                    polite[phase2].add((kind == "add", tasks.help_kind(prompt), int(c)))
                    assert kind != "add" or tok.decode(row[p:]) == tasks.SORRY[:len(tok.decode(row[p:]))]
                elif "+" in prompt and kind != "add":  # an addition row of another lane
                    seen[phase2].add(int(c))
                elif prompt.startswith("Count") and kind == "add":
                    assert c == 0 and tasks.count_in_range(*tasks.count_bounds(prompt))
                    assert reply == tasks.count_reply(*tasks.count_bounds(prompt)), (prompt, reply)
                    counted[phase2] += 1
    assert seen[False] == {-1} and seen[True] == {-1, 0}
    assert {(lane, c) for lane, _, c in polite[False]} == {(False, -1)}
    assert {k for lane, k, _ in polite[True] if lane} == {"sum", "count"}
    assert counted[False] == 0 and counted[True] > 0
    assert {(k, c) for lane, k, c in polite[True] if not lane} == {(k, c) for k in help_cut0 for c in (-1, 0)}
    _, both, _ = demo_train.train(cfg, tok)
    config, one, _ = demo_train.train(dataclasses.replace(cfg, finetune_steps=0), tok)
    loaded = dllm_jax.load(demo_train.write(tmp_path / "first", config, one, tok, {}))
    _, resumed, history = demo_train.train(cfg, loaded.tokenizer, init=loaded.module(), log_every=1)
    assert [h[0] for h in history] == [1, 2]
    a, b = nnx.state(both, nnx.Param).to_pure_dict(), nnx.state(resumed, nnx.Param).to_pure_dict()
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the command line: --first-out writes the first phase's model on the way, the same bytes
    demo_train.write(tmp_path / "both", config, both, tok, {})
    demo_train.main(["--out", str(tmp_path / "cli"), "--first-out", str(tmp_path / "cli_first"), "--steps", "2",
                     "--batch", "8", "--short-batch", "4", "--add-batch", "4", "--d-model", "32", "--n-layers", "1",
                     "--n-heads", "2", "--mlp-hidden-size", "64", "--warmup", "1", "--finetune-steps", "2",
                     "--finetune-warmup", "1"])
    for cli, ours in (("cli_first", "first"), ("cli", "both")):
        got, want = ((tmp_path / d / "model.safetensors").read_bytes() for d in (cli, ours))
        assert got == want, cli


def test_first_phase_count_rows():
    """The first phase's ``count_help`` and ``count_cut0`` apply from ``global_start`` on: before it
    the addition lane holds only additions and no polite row is cut at 0; after it, counts out of
    range within 0-99 with the polite answer's first tokens, and their other rows cut at 0 too. Off
    (the shipped recipe), the batches are the plain ones, draw for draw."""
    cfg = demo_train.TrainConfig(batch=8, short_batch=4, add_batch=8, global_start=40)
    tok = demo_train.train_tokenizer(cfg.vocab_size, polite=True)
    on = demo_train.Batches(tok, cfg, help_cut0={"count": 1.0}, count_help=0.5, extra_from=cfg.global_start)
    found = {False: set(), True: set()}  # (lane is "add", cut) of the polite count rows, before / after
    for step in range(80):
        kind, tokens, plen, _, cut = on.next()
        for row, p, c in zip(tokens, plen, cut):
            prompt = tok.decode(row[:p]).split("\n\n")[1].split("<|eot_id|>")[0]
            if kind == "add" and step < cfg.global_start:
                assert "+" in prompt, prompt
            if tasks.help_kind(prompt) == "count" and tok.decode(row[p:p + 1]).startswith("Sorry"):
                found[step >= cfg.global_start].add((kind == "add", int(c)))
    assert found[False] == {(False, -1)} and found[True] == {(True, 0), (False, 0)}
    off = [demo_train.Batches(tok, cfg), demo_train.Batches(tok, cfg, help_cut0={"count": 0.0}, extra_from=40)]
    for _ in range(60):
        a, b = (x.next() for x in off)
        assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:]))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory():
    """The command line's allocator settings take (in a child process: this one keeps its own)."""
    code = "import sys; from dllm_jax.demo.train import keep_freed_memory; sys.exit(0 if keep_freed_memory() else 1)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=300).returncode == 0


def jax_leaves(tree):
    return jax.tree.leaves(tree)


# Held-out slices: 16 additions, 16 counts and 16 prompts for the polite answer, in one batch of
# 48 (the server's defaults otherwise: canvas 128, block 32, T=0, early stop), each scored by exact
# match (a count must stop at b). Bounds: (additions, counts, polite answer) out of 16, what each
# setting got on the shipped model (docs/performance.md, "Demo model") less two misses.
CASES = [
    ("basic", {"threshold": None}, (14, 14, 12)),
    ("no_cache", {"threshold": 0.9}, (14, 14, 11)),
    ("prefix_cache", {"threshold": 0.9}, (14, 14, 11)),
    ("dual_cache", {"threshold": None}, (13, 14, 9)),
    ("dual_cache", {"threshold": 0.9}, (14, 14, 11)),
    ("dual_cache", {"threshold": None, "factor": 2.0}, (14, 14, 11)),
    ("dinfer_blockwise", {}, (14, 14, 11)),
    ("dinfer_hierarchy", {}, (14, 14, 11)),
    ("dinfer_credit", {}, (14, 13, 11)),
]


@pytest.mark.parametrize("algorithm,kwargs,bounds", CASES, ids=[f"{a}-{k}" for a, k, _ in CASES])
def test_accuracy_per_algorithm(demo, algorithm, kwargs, bounds):
    sets = (tasks.held_out_additions(16, seed=2), tasks.held_out_counts(16, seed=2), tasks.held_out_helps(16, seed=2))
    r = evaluate.run(demo, [e for s in sets for e in s], batch=48, warmup=False, algorithm=algorithm, **kwargs)
    for k, (examples, bound) in enumerate(zip(sets, bounds, strict=True)):
        replies, correct = r.replies[16 * k:16 * (k + 1)], r.correct[16 * k:16 * (k + 1)]
        wrong = [(e.prompt, rep) for e, rep, ok in zip(examples, replies, correct) if not ok]
        assert sum(correct) >= bound, (examples[0].task, wrong)


def test_count_outcomes():
    """benchmarks/demo_counts' classification of a decoded count."""
    assert outcome("3, 4, 5, 6", 3, 6) == "exact"
    assert outcome("3, 4, 5, 6, 7, 8", 3, 6) == "late"
    assert outcome("3, 4, 5", 3, 6) == "early"
    assert outcome("3, 4, 9, 6", 3, 6) == "content" and outcome("", 3, 6) == "content"


def test_add_miss_kinds():
    """benchmarks/demo_add_misses' classification of an addition."""
    assert kinds(3, 4) == ("1-digit + 1-digit", "no units carry", "sum < 100")
    assert kinds(9, 94) == ("1-digit + 2-digit", "units carry", "sum >= 100")
    assert kinds(47, 35) == ("2-digit + 2-digit", "units carry", "sum < 100")
    assert kinds(50, 50) == ("2-digit + 2-digit", "no units carry", "sum >= 100")
