"""The loop skeleton both step-program kinds share (``blocks.BlockProgram``, ``sliding.SlidingProgram``):
``step_loop`` runs denoising steps under a ``lax.while_loop`` until a budget, all rows done or a
row finished; ``when`` runs a phase only when some row needs it, without copying the state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from dllm_jax.sampling.state import DecodeState


@struct.dataclass
class StepLoop:
    """Carry of a step program's loop.

    Attributes:
      state: the decode state.
      steps: [] int32 steps run in this call.
      finished: [] bool some row finished in this call.
    """

    state: DecodeState
    steps: jax.Array
    finished: jax.Array


def step_loop(step, st: DecodeState, budget, exit_on_done) -> DecodeState:
    """Run ``step`` up to ``budget`` times, while some row runs (and, with ``exit_on_done``, until one finishes)."""
    done_before = st.progress.done  # [B]

    def cond(loop: StepLoop):
        running = loop.state.progress.active & ~loop.state.progress.done  # [B]
        return (loop.steps < budget) & jnp.any(running) & ~(exit_on_done & loop.finished)

    def body(loop: StepLoop) -> StepLoop:
        new = step(loop.state)
        new = new.replace(batch_steps=new.batch_steps + 1)
        return StepLoop(new, loop.steps + 1, jnp.any(new.progress.done & ~done_before))

    return jax.lax.while_loop(cond, body, StepLoop(st, jnp.int32(0), jnp.bool_(False))).state


def when(pred, fn, st):
    """``fn(st)`` if ``pred`` else ``st``, as a while loop of zero or one iteration: XLA:CPU keeps a
    while loop's carry (the KV cache) in place, where a ``lax.cond`` returning the state copied
    it on every step (measured: docs/performance.md, "Step-level scheduling")."""
    def body(carry):
        _, st = carry
        return jnp.bool_(False), fn(st)

    return jax.lax.while_loop(lambda carry: carry[0], body, (pred, st))[1]
