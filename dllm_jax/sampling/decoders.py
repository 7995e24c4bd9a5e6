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
from dllm_jax.sampling import blocks, rules, sliding
from dllm_jax.sampling.errors import SamplingError


@dataclasses.dataclass(frozen=True)
class Decoder:
    """Base: what a program kind decides (see module docstring).

    Attributes:
      cache: 'none' (full canvas every step), 'prefix' or 'dual' (Fast-dLLM caches), 'sliding'
        (Nemotron's window).
      rule: the transfer rule code the decoder fixes for every row (``rules.Code``), or None
        when each row picks one of the ``per_row`` rules by its own knobs.
    """

    cache: str = "none"
    rule: int | None = None

    @property
    def fuses_credit(self) -> bool:
        """The state holds a per-block credit (dInfer's credit rule)."""
        return self.rule is not None and rules.RULES[self.rule].fuses_credit

    @property
    def uses_cache(self) -> bool:
        """The state holds a KV cache."""
        return True

    @property
    def rows_pick_rule(self) -> bool:
        """Each row picks its transfer rule by its knobs (``rules.row_rule``): no fixed rule, or a
        fixed threshold rule whose rows may take the EB-Sampler instead (``entropy_bound_rows``)."""
        return self.rule is None or rules.RULES[self.rule].entropy_bound_rows

    def extra_length(self, block_length: int) -> int:
        """Canvas positions a row needs after prompt + gen_length."""
        return 0

    def initial_position(self, prompt_len: int) -> int:
        """A fresh row's ``DecodeState.block``."""
        return 0

    def moved_position(self, block, shift: int):
        """A row's ``DecodeState.block`` once its canvas lost ``shift`` leading columns (a move to
        another prompt bucket, ``slots.relayout_fn``)."""
        return block

    def steps_per_block(self, steps: int, num_blocks: int) -> int:
        """The schedule length the program is keyed on."""
        return steps // num_blocks

    def check(self, params, family: str) -> dict:
        """Decoder-specific request checks of ``params`` (its ``algorithm`` and ``steps`` resolved;
        raise SamplingError); returns the fields it resolves (threshold / factor)."""
        return {}

    def build(self, key, graphdef, *, mask_id: int, fill_id: int, refresh_rows: int | None = None,
              share: bool = True):
        """The step program of ``key`` (``refresh_rows``: rows per refresh chunk; ``share``: rows
        with identical inputs share a block-start forward; see ``blocks.make_step_program``)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class BlockDecoder(Decoder):
    """Semi-autoregressive blocks (LLaDA, Fast-dLLM, dInfer).

    Attributes:
      run_empty_steps: run every scheduled step even when it commits nothing (the original
        LLaDA ``generate``); Fast-dLLM leaves a block as soon as it is filled.
      default_threshold: what the decoder's fixed rule uses when a request gives no threshold.
    """

    run_empty_steps: bool = False
    default_threshold: float | None = None

    @property
    def uses_cache(self) -> bool:
        return self.cache != "none"

    def check(self, params, family: str) -> dict:
        steps, threshold, factor = params.steps, params.threshold, params.factor
        num_blocks = params.gen_length // params.block_length
        if steps % num_blocks:
            raise SamplingError(f"steps={steps} must be a multiple of the number of blocks "
                                f"(gen_length/block_length = {num_blocks})", "steps")
        if threshold is not None and factor is not None:
            raise SamplingError("give either threshold or factor, not both", "factor")
        if factor is not None and factor == 0 and self.rule is None:
            raise SamplingError("factor must be > 0 for the Fast-dLLM factor rule", "factor")
        if self.rule is not None and factor is not None:
            raise SamplingError(f"factor is not used by algorithm {params.algorithm!r}", "factor")
        if params.entropy_bound is not None and (threshold is not None or factor is not None):
            raise SamplingError("give entropy_bound or a threshold / factor, not both", "entropy_bound")
        if params.entropy_bound is not None and not self.rows_pick_rule:
            raise SamplingError(f"entropy_bound is not used by algorithm {params.algorithm!r} (its transfer rule "
                                "is fixed)", "entropy_bound")
        if self.rule is not None and threshold is None and params.entropy_bound is None:
            threshold = self.default_threshold
        self._check_lookahead(params, threshold, factor)
        if params.cfg_scale > 0 and self.uses_cache:
            raise SamplingError(f"cfg_scale > 0 needs a full-canvas algorithm ('basic' or 'no_cache'), "
                                f"not {params.algorithm!r}", "cfg_scale")
        if self.uses_cache and self.rule is None and threshold is None and factor is None \
                and params.entropy_bound is None and steps // num_blocks < 2:
            raise SamplingError(f"{params.algorithm} with a fixed schedule needs at least 2 steps per block "
                                f"(got steps={steps} for {num_blocks} blocks); upstream Fast-dLLM fails "
                                "with IndexError here", "steps")
        return {"threshold": threshold, "factor": factor}

    def _check_lookahead(self, params, threshold, factor) -> None:
        """Multi-block decoding (``block_add_threshold``): a per-row rule that accepts tokens on their
        own merit (threshold, factor, entropy_bound), ranked by confidence (``lookahead.select``)."""
        if params.block_add_threshold is None:
            return
        if self.rule is not None:
            raise SamplingError(f"block_add_threshold (multi-block decoding) is not available with algorithm "
                                f"{params.algorithm!r}; use basic, no_cache, prefix_cache or dual_cache",
                                "block_add_threshold")
        if threshold is None and factor is None and params.entropy_bound is None:
            raise SamplingError("block_add_threshold (multi-block decoding) needs a threshold, factor or "
                                "entropy_bound rule: the static schedule has nothing to commit ahead",
                                "block_add_threshold")
        if params.remasking != "low_confidence":
            raise SamplingError("block_add_threshold (multi-block decoding) needs remasking='low_confidence'",
                                "block_add_threshold")

    def build(self, key, graphdef, *, mask_id: int, fill_id: int, refresh_rows: int | None = None,
              share: bool = True):
        return blocks.make_step_program(key, self, graphdef, mask_id=mask_id, fill_id=fill_id,
                                        refresh_rows=refresh_rows, share=share)


@dataclasses.dataclass(frozen=True)
class SlidingDecoder(Decoder):
    """NeMo-RL's static-block sliding window (Nemotron-Diffusion): greedy, factor acceptance."""

    cache: str = "sliding"
    rule: int | None = rules.NEMOTRON

    def extra_length(self, block_length: int) -> int:
        return 2 * block_length  # the window may run up to two blocks past the canvas

    def initial_position(self, prompt_len: int) -> int:
        return prompt_len  # the window starts at the first generated position

    def moved_position(self, block, shift: int):
        return block - shift  # a canvas position

    def steps_per_block(self, steps: int, num_blocks: int) -> int:
        return 0  # no schedule: one program serves every ``steps``

    def check(self, params, family: str) -> dict:
        if not FAMILY_CONFIGS[family].sliding_decoder:
            raise SamplingError(f"algorithm {params.algorithm!r} is the Nemotron-Diffusion decoder; this is a "
                                f"{family} model", "algorithm")
        for name, bad in (("threshold", params.threshold is not None), ("entropy_bound", params.entropy_bound is not None),
                          ("block_add_threshold", params.block_add_threshold is not None),
                          ("temperature", params.temperature > 0),
                          ("remasking", params.remasking != "low_confidence"), ("cfg_scale", params.cfg_scale > 0)):
            if bad:
                raise SamplingError(f"{name} is not supported by algorithm 'static_block' (greedy, "
                                    "confidence-factor acceptance only)", name)
        if params.shift_logits is False:
            raise SamplingError("static_block always reads shifted predictions (shift_logits=False is not "
                                "possible with it)", "shift_logits")
        return {"threshold": None, "factor": 1.0 if params.factor is None else params.factor}

    def build(self, key, graphdef, *, mask_id: int, fill_id: int, refresh_rows: int | None = None,
              share: bool = True):
        return sliding.make_step_program(key, graphdef, mask_id=mask_id, refresh_rows=refresh_rows, share=share)
