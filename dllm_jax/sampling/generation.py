"""``generate``: a batch of ragged prompts through one ``DecodeSession``, admitted at once and
run in one call until every row is done."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dllm_jax.sampling.params import SamplingError, SamplingParams, lean_head_ok
from dllm_jax.sampling.programs import program_key
from dllm_jax.sampling.session import UNBOUNDED, DecodeSession, fetch
from dllm_jax.sampling.slots import Row


@dataclasses.dataclass
class GenerateOutput:
    """Result of ``Model.generate``.

    Attributes:
      tokens: [B, gen_length] int32, the generated canvas (prompt excluded).
      nfe: forward passes of the batch program (the batch's model calls).
      nfe_per_row: [B] forward passes each row took part in (equals upstream's NFE for it).
      lengths: [B] tokens generated before the first stop token (or still-masked position).
      finish_reasons: per row 'stop' or 'length'.
      trace: with return_trace: {'commit_step': [B, G] (1-based forward pass that committed
        each position, -1 = never), 'commit_conf': [B, G] its confidence}.
      settings: the batch-wide settings the run used (algorithm, gen_length, block_length,
        steps, shift_logits), e.g. to lay out a trace by blocks.
      logprobs: with ``logprobs=k``: {'token_logprobs': [B, G] log-probability of each canvas
        token at the step it was committed (``logprobs_mode`` 'raw': log-softmax of the
        unfiltered logits, before temperature; 'processed': of the distribution it was drawn
        from), 'top_ids': [B, G, k], 'top_logprobs': [B, G, k] that step's k most probable
        tokens of the same distribution}.
    """

    tokens: np.ndarray
    nfe: int
    nfe_per_row: np.ndarray
    lengths: np.ndarray
    finish_reasons: list[str]
    trace: dict | None = None
    settings: dict | None = None
    logprobs: dict | None = None


_PER_ROW = ("temperature", "threshold", "factor", "entropy_bound", "block_add_threshold", "seed", "remasking",
            "cfg_scale", "early_stop", "stop_token_ids", "top_k", "top_p", "min_p", "logprobs_mode")


def generate(model, prompts: Sequence[Sequence[int]], *, return_trace: bool = False, **sampling) -> GenerateOutput:
    """Generate for a batch of (ragged) prompts.

    Args:
      prompts: list of token-id lists.
      return_trace: include per-position commit step and confidence.
      **sampling: ``SamplingParams`` fields. ``temperature``, ``threshold``, ``factor``,
        ``block_add_threshold``, ``seed``, ``remasking``, ``cfg_scale``, ``early_stop``, ``stop_token_ids``, ``top_k``,
        ``top_p``, ``min_p`` and ``logprobs_mode`` may also be given per row as a list of len(prompts);
        ``logprobs=k`` (batch-wide) returns each token's log-probability and top k. ``eos_token_id`` (int) is accepted as
        upstream's name for a single stop token.

    Returns:
      GenerateOutput.
    """
    prompts, per_row = _rows(model, prompts, sampling)
    n = len(prompts)
    key = program_key(model, max(map(len, prompts)), per_row[0], n)
    key = dataclasses.replace(key, cfg=any(p.cfg_scale > 0 for p in per_row),
                              lean_head=all(lean_head_ok(p) for p in per_row),  # no [B, Lb, V] logits
                              lookahead=any(p.block_add_threshold is not None for p in per_row)
                              and key.gen_length > key.block_length)
    session = DecodeSession(model, key)
    session.admit({i: Row(prompts[i], per_row[i]) for i in range(n)})
    while True:
        updates = session.step(UNBOUNDED, exit_on_done=False)
        if all(u.done for u in updates):
            break
    st = session.state
    wanted = {"canvas": st.tokens.canvas, "batch_nfe": st.batch_nfe, "nfe": st.progress.nfe}
    if return_trace:
        wanted.update(commit_step=st.records.commit_step, commit_conf=st.records.commit_conf)
    if key.logprobs:
        wanted.update(commit_logprob=st.records.commit_logprob, top_ids=st.records.top_ids,
                      top_logprobs=st.records.top_logprobs)
    st = fetch(wanted)
    lp, g = key.prompt_len, key.gen_length
    tokens = np.asarray(st["canvas"][:n, lp:lp + g], np.int32)
    lengths = np.array([len(u.tokens) for u in updates])
    trace = None
    if return_trace:
        trace = {"commit_step": np.asarray(st["commit_step"][:n]), "commit_conf": np.asarray(st["commit_conf"][:n])}
    logprobs = None
    if per_row[0].logprobs is not None:
        k = per_row[0].logprobs
        logprobs = {"token_logprobs": np.asarray(st["commit_logprob"][:n]),
                    "top_ids": np.asarray(st["top_ids"][:n, :, :k]), "top_logprobs": np.asarray(st["top_logprobs"][:n, :, :k])}
    return GenerateOutput(tokens=tokens, nfe=int(st["batch_nfe"]), nfe_per_row=np.asarray(st["nfe"][:n]),
                          lengths=lengths, finish_reasons=[u.finish_reason for u in updates], trace=trace,
                          logprobs=logprobs,
                          settings={name: getattr(per_row[0], name) for name in
                                    ("algorithm", "gen_length", "block_length", "steps", "shift_logits")})


def _rows(model, prompts, sampling: dict) -> tuple[list[list[int]], list[SamplingParams]]:
    """The prompts as int lists and each row's resolved ``SamplingParams`` (per-row lists split)."""
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SamplingError("prompts must be a non-empty list of non-empty token lists", "prompts")
    if "eos_token_id" in sampling:
        eos = sampling.pop("eos_token_id")
        sampling.setdefault("stop_token_ids", None if eos is None else (eos,))
    unknown = set(sampling) - {f.name for f in dataclasses.fields(SamplingParams)}
    if unknown:
        raise SamplingError(f"unknown sampling arguments {sorted(unknown)}", sorted(unknown)[0])
    n = len(prompts)
    per_row = []
    for i in range(n):
        kwargs = {}
        for name, value in sampling.items():
            if name in _PER_ROW and isinstance(value, (list, tuple, np.ndarray)) and not (
                    name == "stop_token_ids" and (len(value) == 0 or not isinstance(value[0], (list, tuple)))):
                if len(value) != n:
                    raise SamplingError(f"{name} has {len(value)} entries for {n} prompts", name)
                value = value[i]
            kwargs[name] = value
        per_row.append(SamplingParams(**kwargs).resolve(model.family))
    vocab = model.spec.vocab
    for p in prompts:
        if min(p) < 0 or max(p) >= vocab:
            raise SamplingError(f"prompt token ids must be in [0, {vocab})", "prompts")
        if model.mask_token_id in p:
            raise SamplingError(f"prompt contains the mask token id {model.mask_token_id}", "prompts")
    return prompts, per_row
