"""The two program kinds: LLaDA-style block decoders and Nemotron's sliding window.

A ``Decoder`` owns everything that differs between them: its request checks, how much canvas a
request needs beyond prompt + gen_length, where a row starts, how a schedule is keyed, which
state fields it uses and how its step program is built. Code outside this module asks the
decoder instead of comparing cache names.

Both build a *step program* ``run(params, state, budget, exit_on_done) -> state``: a
``lax.while_loop`` in which one iteration advances every live row by one denoising step of its
own block (or window). It runs ``budget`` steps, or until every row is done, or (with
``exit_on_done``) until some row finishes, so the host can free its slot and admit a waiting
request at any step.
"""

from __future__ import annotations

import dataclasses

from dllm_jax.configs import FAMILY_CONFIGS
from dllm_jax.sampling import blocks, sliding
from dllm_jax.sampling.errors import SamplingError


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Base: what a program kind decides (see module docstring)."""

    @property
    def uses_cache(self) -> bool:
        """The state holds a KV cache."""
        return True

    def extra_length(self, block_length: int) -> int:
        """Canvas positions a row needs after prompt + gen_length."""
        return 0

    def initial_position(self, prompt_len: int) -> int:
        """A fresh row's ``DecodeState.block``."""
        return 0

    def steps_per_block(self, steps: int, num_blocks: int) -> int:
        """The schedule length the program is keyed on."""
        return steps // num_blocks

    def check(self, params, family: str) -> dict:
        """Decoder-specific request checks (raise SamplingError); returns resolved overrides."""
        return {}

    def build(self, key, graphdef, *, mask_id: int, fill_id: int, refresh_rows: int | None = None):
        """The step program of ``key`` (``refresh_rows``: rows per refresh chunk, see ``blocks.make_step_program``)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class BlockDecoder(Decoder):
    """Semi-autoregressive blocks (LLaDA, Fast-dLLM, dInfer).

    Attributes:
      cache: 'none' (full canvas every step), 'prefix' or 'dual' (Fast-dLLM caches).
      rule: the transfer rule fixed by the algorithm (rules.HIERARCHY / CREDIT / THRESHOLD), or
        None when each row picks FIXED / THRESHOLD / FACTOR.
      run_empty_steps: run every scheduled step even when it commits nothing (LLaDA's generate).
    """

    cache: str = "none"
    rule: int | None = None
    run_empty_steps: bool = False

    @property
    def uses_cache(self) -> bool:
        return self.cache != "none"

    def check(self, params, family: str) -> dict:
        num_blocks = params.gen_length // params.block_length
        if params.steps % num_blocks:
            raise SamplingError(f"steps={params.steps} must be a multiple of the number of blocks "
                                f"(gen_length/block_length = {num_blocks})", "steps")
        return {}

    def build(self, key, graphdef, *, mask_id: int, fill_id: int, refresh_rows: int | None = None):
        return blocks.make_step_program(key, self, graphdef, mask_id=mask_id, fill_id=fill_id,
                                        refresh_rows=refresh_rows)


@dataclasses.dataclass(frozen=True)
class SlidingDecoder(Decoder):
    """NeMo-RL's static-block sliding window (Nemotron-Diffusion): greedy, factor acceptance."""

    def extra_length(self, block_length: int) -> int:
        return 2 * block_length  # the window may run up to two blocks past the canvas

    def initial_position(self, prompt_len: int) -> int:
        return prompt_len  # the window starts at the first generated position

    def steps_per_block(self, steps: int, num_blocks: int) -> int:
        return 0  # no schedule: one program serves every ``steps``

    def check(self, params, family: str) -> dict:
        if not FAMILY_CONFIGS[family].sliding_decoder:
            raise SamplingError(f"algorithm {params.algorithm!r} is the Nemotron-Diffusion decoder; this is a "
                                f"{family} model", "algorithm")
        for name, bad in (("threshold", params.threshold is not None), ("temperature", params.temperature > 0),
                          ("remasking", params.remasking != "low_confidence"), ("cfg_scale", params.cfg_scale > 0)):
            if bad:
                raise SamplingError(f"{name} is not supported by algorithm 'static_block' (greedy, "
                                    "confidence-factor acceptance only)", name)
        if params.shift_logits is False:
            raise SamplingError("static_block always reads shifted predictions (shift_logits=False is not "
                                "possible with it)", "shift_logits")
        return {"factor": 1.0 if params.factor is None else params.factor}

    def build(self, key, graphdef, *, mask_id: int, fill_id: int, refresh_rows: int | None = None):
        return sliding.make_step_program(key, graphdef, mask_id=mask_id)
