"""Host side of sampling: a slot-based session over one compiled step program.

A ``DecodeSession`` owns one compiled step program and a device state of B slots. ``admit``
puts requests into free slots, ``step`` runs the program for a few denoising steps (one host
round trip: ``steps_per_call`` steps, or fewer once a row finishes) and reports, per slot, the
tokens that became final and whether the row is done. Every row advances through its own
blocks, so a freed slot takes a waiting request at the next call whatever step the other rows
are at. ``generate`` is a session that admits everything at once and runs until all rows are
done (one call, ``generation.py``); the server drives sessions directly to stream tokens and
refill slots. The compiled programs come from the model's cache (``programs.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from dllm_jax.sampling.params import ProgramKey
from dllm_jax.sampling.slots import Row, relayout_fn, row_arrays, to_device
from dllm_jax.sampling.state import DecodeState


@dataclasses.dataclass
class SlotUpdate:
    """What one ``step`` changed for one slot.

    Attributes:
      slot: slot index.
      tokens: the row's generated tokens that are final so far (prefix of the canvas up to the
        first still-masked position, cut at the first stop token).
      done: the row needs no more steps.
      finish_reason: 'stop' (a stop token ended it) or 'length', when done.
      nfe: forward passes this row took part in.
      logprobs: with a logprobs program: [len(tokens)] log-probability of each final token at
        its commit step; top_ids / top_logprobs: [len(tokens), K] that step's K most probable.
      commit_step, commit_conf: for a row with ``params.trace``: [len(tokens)] the row's forward
        pass (1-based) that committed each final token, and that commit's confidence (only
        traced rows' arrays leave the device).
    """

    slot: int
    tokens: np.ndarray
    done: bool
    finish_reason: str | None
    nfe: int
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    commit_step: np.ndarray | None = None
    commit_conf: np.ndarray | None = None
    # finish_reason 'stop': the stop token that ended the row (it is not in ``tokens``), with
    # its logprob (logprobs programs) and commit step (traced rows) when recorded
    stop_id: int | None = None
    stop_logprob: float | None = None
    stop_commit_step: int | None = None


# Denoising steps per host round trip of ``DecodeSession.step`` (a call also returns as soon as
# a row finishes, so its slot can be refilled). Chosen by measurement: docs/performance.md,
# "Step-level scheduling".
STEPS_PER_CALL = 1
# ``generate``'s budget: everything in one call.
UNBOUNDED = 2**30
# Errors computed from one row's own values while laying it out on the host (a value that does
# not fit its array, a prompt that does not fit the bucket): ``DecodeSession.admit(isolate=True)``
# fails that row alone. Anything else (out of memory, a device error) is not one row's fault and
# fails the whole admission, as it may not happen the same way on every process.
ROW_ERRORS = (ValueError, TypeError, ArithmeticError, LookupError)


class DecodeSession:
    """B slots sharing one compiled step program (see module docstring).

    Attributes:
      steps_per_call: the step budget of one ``step`` call.
      last_steps: denoising steps the last ``step`` call ran.
      last_forwards: model forward passes the batch ran in it (block-start refresh chunks and
        cached calls, each over the rows that need it; twins sharing a refresh count once).
    """

    def __init__(self, model, key: ProgramKey, steps_per_call: int = STEPS_PER_CALL):
        self.model, self.key = model, key
        self.program, self.merge, self.shardings, empty = model.programs.get(key, user=self)
        self.state: DecodeState = empty()
        self.slots: dict[int, Row] = {}
        self.steps_per_call = steps_per_call
        self.last_steps = 0  # denoising steps the last ``step`` call ran
        self.last_forwards = 0  # ... and the batch's forward passes in it
        self._steps = self._forwards = 0
        self._finished: set[int] = set()  # slots whose row is done on the device

    def admit(self, rows: dict[int, Row], *, isolate: bool = False) -> dict[int, Exception]:
        """Put requests into free slots; they start at the next ``step``.

        With ``isolate``, a row whose own values cannot be laid out (``ROW_ERRORS``: e.g. a
        ``top_k`` or stop token id that does not fit the int32 device arrays) is left out and
        returned as {slot: error}; the other rows are admitted and the failed row's slot stays
        free. The session's state changes only once every row is laid out (one merge of the
        good rows), so a failure never leaves it half-updated. Without ``isolate`` any failure raises, as a whole.
        """
        for slot in rows:
            if slot in self.slots:
                raise ValueError(f"slot {slot} is busy")
        try:
            arrays, failed = self._row_arrays(self.key, rows), {}
        except ROW_ERRORS:
            if not isolate:
                raise
            # Which rows? Each alone, in a batch-1 layout (host arrays of one row, its seed's key
            # data from a local program: no collective): a pure function of the row's prompt and
            # params, so under multi-host every process (which replays the same 'admit' command)
            # leaves out the same rows and merges the same rest. (Only on this failure path: the
            # common one lays the rows out once.)
            one = dataclasses.replace(self.key, batch=1)
            failed = {}
            for slot, row in rows.items():
                try:
                    self._row_arrays(one, {0: row})
                except ROW_ERRORS as e:
                    failed[slot] = e
            rows = {slot: row for slot, row in rows.items() if slot not in failed}
            if not failed:  # (only together: not one row's fault)
                raise
            arrays = self._row_arrays(self.key, rows) if rows else None
        if arrays is not None:
            self.state = self.merge(self.state, self._to_device(arrays))
        self.slots.update(rows)
        self._finished.difference_update(rows)
        return failed

    def _row_arrays(self, key: ProgramKey, rows: dict[int, Row]) -> dict[str, np.ndarray]:
        m = self.model
        return row_arrays(key, rows, mask_id=m.mask_token_id, default_stops=m.stop_token_ids, d_model=m.spec.d_model)

    def release(self, slot: int) -> None:
        """Forget a slot (finished or cancelled); its row is frozen until reused.

        A row the device already finished is frozen as it is (no device call); a cancelled
        row is cleared so it stops taking part in steps.
        """
        self.slots.pop(slot, None)
        if slot in self._finished:
            return
        self._finished.add(slot)
        arrays = row_arrays(self.key, {}, mask_id=self.model.mask_token_id, default_stops=(),
                            d_model=self.model.spec.d_model)
        arrays["replace"][slot] = True
        self.state = self.merge(self.state, self._to_device(arrays))

    def _to_device(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        sharding = {f: self.shardings.get(f) for f in arrays if f != "replace"}
        sharding["replace"] = self.shardings.progress.active
        return {name: to_device(name, value, sharding[name]) for name, value in arrays.items()}

    def rebucket(self, prompt_len: int) -> None:
        """Move every row to the program of another prompt bucket (same batch and slots; rows
        keep their place in their blocks): a session whose long prompts left runs its other rows
        at their own bucket from the next ``step`` instead of padded to the old one. A row's
        tokens do not depend on its bucket, so they stay exactly what they would have been.
        Slots without a row are emptied (a finished row frozen in one may not fit).

        Raises ValueError for a row whose prompt does not fit."""
        if prompt_len == self.key.prompt_len:
            return
        too_long = [slot for slot, row in self.slots.items() if len(row.prompt) > prompt_len]
        if too_long:
            raise ValueError(f"slots {too_long} hold prompts longer than the prompt bucket {prompt_len}")
        old, new = self.key, dataclasses.replace(self.key, prompt_len=prompt_len)
        program, merge, shardings, _ = self.model.programs.get(new, user=self)
        move = self.model.programs.get_or_build(
            ("relayout", old, new), lambda: relayout_fn(old, new, shardings, mask_id=self.model.mask_token_id))
        state = move(self.state)
        arrays = self._row_arrays(new, {})
        free = [slot for slot in range(new.batch) if slot not in self.slots]
        arrays["replace"][free] = True
        self.key, self.program, self.merge, self.shardings = new, program, merge, shardings
        self.state = merge(state, self._to_device(arrays)) if free else state
        self._finished.update(free)

    def warmup(self) -> None:
        """Compile this key's programs (runs one step and one admission on empty slots)."""
        self._finished.discard(0)
        self.release(0)
        self.state = self._run(1, True)
        jax.block_until_ready(self.state.progress.done)

    def _run(self, steps: int, exit_on_done: bool) -> DecodeState:
        return self.program(self.model.params, self.state, np.int32(steps), np.bool_(exit_on_done))

    def step(self, steps: int | None = None, exit_on_done: bool = True) -> list[SlotUpdate]:
        """Run up to ``steps`` (default ``steps_per_call``) denoising steps in one host round trip
        (fewer once a row finishes, with ``exit_on_done``) and report every occupied slot."""
        self.state = self._run(self.steps_per_call if steps is None else steps, exit_on_done)
        st = self.state
        wanted = {"canvas": st.tokens.canvas, "done": st.progress.done, "nfe": st.progress.nfe,
                  "batch_steps": st.batch_steps, "batch_nfe": st.batch_nfe}
        if self.key.logprobs:
            wanted.update(commit_logprob=st.records.commit_logprob, top_ids=st.records.top_ids,
                          top_logprobs=st.records.top_logprobs)
        traced = [slot for slot in sorted(self.slots) if self.slots[slot].params.trace]
        if traced:  # only the rows that asked (a gather on the device, then their rows)
            rows = np.asarray(traced, np.int32)
            wanted.update(trace_step=st.records.commit_step[rows], trace_conf=st.records.commit_conf[rows])
        host = fetch(wanted)
        trace_row = {slot: j for j, slot in enumerate(traced)}
        updates = [self._update(slot, host, trace_row.get(slot)) for slot in sorted(self.slots)]
        self._finished.update(u.slot for u in updates if u.done)
        steps = int(host["batch_steps"])
        forwards = int(host["batch_nfe"])
        self.last_steps, self._steps = steps - self._steps, steps
        self.last_forwards, self._forwards = forwards - self._forwards, forwards
        return updates

    def _update(self, slot: int, host, trace_row: int | None = None) -> SlotUpdate:
        lp, g = self.key.prompt_len, self.key.gen_length
        gen = host["canvas"][slot, lp:lp + g]
        row = self.slots[slot]
        stops = row.params.stop_token_ids if row.params.stop_token_ids is not None else self.model.stop_token_ids
        final, reason = final_prefix(gen, self.model.mask_token_id, stops)
        done = bool(host["done"][slot])
        if done and reason is None:
            reason = "length"
        update = SlotUpdate(slot, final, done, reason if done else None, int(host["nfe"][slot]))
        n = len(final)
        stopped = reason == "stop" and n < len(gen)
        if stopped:
            update.stop_id = int(gen[n])
        if self.key.logprobs:
            update.logprobs = host["commit_logprob"][slot, :n]
            update.top_ids, update.top_logprobs = host["top_ids"][slot, :n], host["top_logprobs"][slot, :n]
            if stopped:
                update.stop_logprob = float(host["commit_logprob"][slot, n])
        if trace_row is not None:  # its row in the traced rows' arrays
            update.commit_step = host["trace_step"][trace_row, :n]
            update.commit_conf = host["trace_conf"][trace_row, :n]
            if stopped:
                update.stop_commit_step = int(host["trace_step"][trace_row, n])
        return update

    @property
    def busy(self) -> bool:
        return bool(self.slots)


def fetch(tree):
    """Device -> host; under multi-process JAX every process gets the full arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.device_get(tree)


def final_prefix(gen: np.ndarray, mask_id: int, stop_ids: Sequence[int]) -> tuple[np.ndarray, str | None]:
    """Tokens before the first still-masked position, cut at the first stop token."""
    masked = np.flatnonzero(gen == mask_id)
    end = int(masked[0]) if masked.size else len(gen)
    stop = np.flatnonzero(np.isin(gen[:end], np.asarray(stop_ids, np.int64)))
    if stop.size:
        return gen[: int(stop[0])], "stop"
    return gen[:end], None
