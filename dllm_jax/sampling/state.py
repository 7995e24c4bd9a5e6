"""The decode state: a named pytree carried through and between step programs, grouped by role.

A batch has B *slots*. Each slot holds one request (or nothing): its left-padded prompt,
its canvas of masks, its own block position and phase in that block, knobs and RNG. Slots
are filled from the host (``slots.row_arrays``) and merged into the device state between
program calls, so a finished row's slot can take a waiting request at any denoising step.

Every per-row field is declared once, below, with its dtype, the value an empty slot holds and
its shape after the batch axis (``row``); the host layout, the shardings and the merge of new
rows are derived from these declarations (``ROW_FIELDS``).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import struct

from dllm_jax.models.transformer import KVCache


@dataclasses.dataclass(frozen=True)
class RowField:
    """A per-row field's declaration.

    Attributes:
      dtype: numpy dtype name, or 'key' (typed PRNG keys; the host carries their key data).
      fill: what an empty slot holds ('mask' = the model's mask id).
      dims: the shape after the batch axis, by name: 'L' canvas, 'G' generated region, 'Lb' block,
        'K' top logprobs, 'S' stop ids, 'D' d_model (``slots.dims``).
    """

    dtype: str
    fill: object
    dims: tuple[str, ...] = ()


def row(dtype: str, fill, *dims: str):
    """A per-row field of a state group (see ``RowField``)."""
    return struct.field(metadata={"row": RowField(dtype, fill, dims)})


@struct.dataclass
class Tokens:
    """The row's sequence.

    Attributes:
      canvas: [B, L] tokens: left padding, prompt, generated region (mask ids until committed).
      valid: [B, L] key validity (False at left padding).
      positions: [B, L] RoPE positions (real tokens count from 0 in every row).
      prompt: [B, L] real prompt positions (classifier-free guidance masks them).
    """

    canvas: jax.Array = row("int32", "mask", "L")
    valid: jax.Array = row("bool", False, "L")
    positions: jax.Array = row("int32", 0, "L")
    prompt: jax.Array = row("bool", False, "L")


@struct.dataclass
class Progress:
    """Where the row is.

    Attributes:
      active: [B] the slot holds a request.
      done: [B] the row is finished (always True for empty slots).
      block: [B] block index (block algorithms) or window start in the canvas (sliding).
      call: [B] model calls the row made in its current block (0: it has just entered it; the
        cached algorithms then run its block-start refresh forward).
      block_masks: [B] masks in the row's block when it entered it (the static schedule's n).
      nfe: [B] forward passes this row took part in.
    """

    active: jax.Array = row("bool", False)
    done: jax.Array = row("bool", True)
    block: jax.Array = row("int32", 0)
    call: jax.Array = row("int32", 0)
    block_masks: jax.Array = row("int32", 0)
    nfe: jax.Array = row("int32", 0)


@struct.dataclass
class Knobs:
    """The request's settings: set when the row enters, never changed while it decodes.

    Attributes:
      rng: [B] typed PRNG keys (``jax.random.key(seed)``, the default implementation); step keys
        are fold_in(rng, nfe). The host carries them as key data (``slots.row_arrays``).
      temperature, threshold, factor, cfg_scale: [B] float32.
      rule: [B] int32 transfer rule code (``rules.Code``) where the algorithm lets rows choose.
      remasking: [B] int32 selection policy (``rules.REMASKING`` codes: low_confidence, random,
        leftmost).
      early_stop: [B] bool.
      stop_ids: [B, MAX_STOP_IDS] int32 stop tokens (-1 = unused).
      top_k, top_p, min_p: [B] sampling filters (0 / 1 / 0 = off).
      processed_logprobs: [B] bool ``logprobs_mode == 'processed'`` (``proposal.token_logprobs``).
      entropy_bound: [B] float32 the EB-Sampler's gamma (ENTROPY_BOUND rows).
      block_add_threshold: [B] float32 the committed share of a row's block from which its next
        block decodes too (look-ahead programs, ``lookahead.active``; 1 = only once filled).
    """

    rng: jax.Array = row("key", 0)
    temperature: jax.Array = row("float32", 0.0)
    threshold: jax.Array = row("float32", 1.0)
    factor: jax.Array = row("float32", 1.0)
    cfg_scale: jax.Array = row("float32", 0.0)
    rule: jax.Array = row("int32", 0)
    remasking: jax.Array = row("int32", 0)
    early_stop: jax.Array = row("bool", False)
    stop_ids: jax.Array = row("int32", -1, "S")
    top_k: jax.Array = row("int32", 0)
    top_p: jax.Array = row("float32", 1.0)
    min_p: jax.Array = row("float32", 0.0)
    processed_logprobs: jax.Array = row("bool", False)
    entropy_bound: jax.Array = row("float32", 0.0)
    block_add_threshold: jax.Array = row("float32", 1.0)


@struct.dataclass
class Records:
    """What each committed position records at its commit step.

    Attributes:
      commit_step: [B, G] the row's forward pass (1-based) that committed each position; -1 never.
      commit_conf: [B, G] confidence of that commit.
      commit_logprob: [B, G] log-probability of the committed token at its commit step (0 where
        never committed): the log-softmax of the unfiltered logits ('raw'), or of the tempered,
        filtered distribution it was drawn from ('processed' rows at T > 0).
      top_ids, top_logprobs: [B, G, K] the K = key.logprobs most probable tokens of that same
        distribution (K = 0 when the program tracks no logprobs).
    """

    commit_step: jax.Array = row("int32", -1, "G")
    commit_conf: jax.Array = row("float32", 0.0, "G")
    commit_logprob: jax.Array = row("float32", 0.0, "G")
    top_ids: jax.Array = row("int32", 0, "G", "K")
    top_logprobs: jax.Array = row("float32", 0.0, "G", "K")


@struct.dataclass
class Window:
    """The sliding decoder's own per-row state (unused by the block decoders).

    Attributes:
      prefix: [B] pending committed-prefix length.
      mblock: [B, Lb] tracked mask of the current window.
      ctx: [B, D] hidden state that predicts the window's first position.
    """

    prefix: jax.Array = row("int32", 0)
    mblock: jax.Array = row("bool", True, "Lb")
    ctx: jax.Array = row("float32", 0.0, "D")


# The per-row groups of ``DecodeState``: attribute -> class.
GROUPS = {"tokens": Tokens, "progress": Progress, "knobs": Knobs, "records": Records, "window": Window}
# Every per-row field: name -> (group, declaration). Field names are unique across groups.
ROW_FIELDS: dict[str, tuple[str, RowField]] = {
    f.name: (group, f.metadata["row"]) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@struct.dataclass
class DecodeState:
    """Everything a step program reads and writes.

    Attributes:
      tokens, progress, knobs, records, window: the per-row groups (classes above).
      cache: KVCache (per layer [B, K, L, H]) for cached algorithms, else None.
      credit: [B, Lb, V] dInfer credit of the row's block (credit programs; else [B, 0, 0]).
        Reset on the device when a row enters a block, so it never travels from the host.
      batch_nfe: [] forward passes of the batch program.
      batch_steps: [] denoising steps of the batch program (one step advances every live row).
    """

    tokens: Tokens
    progress: Progress
    knobs: Knobs
    records: Records
    window: Window
    cache: KVCache | None
    credit: jax.Array
    batch_nfe: jax.Array
    batch_steps: jax.Array

    @classmethod
    def build(cls, per_row, **rest) -> DecodeState:
        """A state whose per-row fields are ``per_row(name, declaration)`` (arrays or shardings);
        ``rest``: cache, credit, batch_nfe, batch_steps."""
        groups = {group: klass(**{f.name: per_row(f.name, f.metadata["row"]) for f in dataclasses.fields(klass)})
                  for group, klass in GROUPS.items()}
        return cls(**groups, **rest)

    def get(self, name: str):
        """A per-row field by name."""
        return getattr(getattr(self, ROW_FIELDS[name][0]), name)

    def update(self, **changes) -> DecodeState:
        """A copy with per-row fields (by name, whatever their group) and top-level fields replaced."""
        by_group: dict[str, dict] = {}
        top = {}
        for name, value in changes.items():
            if name in ROW_FIELDS:
                by_group.setdefault(ROW_FIELDS[name][0], {})[name] = value
            else:
                top[name] = value
        groups = {group: getattr(self, group).replace(**fields) for group, fields in by_group.items()}
        return self.replace(**groups, **top)
