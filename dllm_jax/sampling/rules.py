"""Per-step decisions on one block: which proposed tokens to commit (the proposals themselves,
their confidence and log-probabilities are ``proposal``'s).

Everything here works on the active block only: confidences [B, Lb], a mask of still-masked
positions [B, Lb], and per-row knobs [B]. No Python loop runs over rows or positions;
"commit the k best of each row" is sort -> rank -> compare.

Transfer rules: each is an object (``Rule``: a name, the request knobs it reads, its ``select``),
listed once in ``RULES``; the per-row ``rule`` codes dispatched on the device are their indices
(``Code``, derived from ``RULES``). Adding a rule is a class here and an entry in ``RULES``.

* FIXED: the static schedule; the ``k`` most confident masked positions (LLaDA, Fast-dLLM).
* THRESHOLD: the most confident masked position, plus every masked position whose
  confidence is >= ``threshold`` (Fast-dLLM ``get_transfer_index``).
* FACTOR: sort by confidence; rank r (0-based) is accepted while its confidence is
  >= 1 - factor / (r + 2); at least one (Fast-dLLM ``get_transfer_index_dynamic``).
* HIERARCHY (dInfer): per contiguous run of masked positions, its most confident one when
  above ``low_threshold``; plus every position above ``threshold``; plus the global top-1.
* CREDIT (dInfer): THRESHOLD on logits fused with a per-block credit (see ``credit_fuse``).
* ENTROPY_BOUND: the EB-Sampler (Ben-Hamu et al. 2025, arXiv 2505.24857): in rank order, the
  longest prefix whose summed entropy minus its largest entropy is <= ``entropy_bound`` (gamma);
  rank 0 always (see ``transfer_entropy_bound``, docs/sampling.md).
* NEMOTRON: NeMo-RL's ``get_transfer_index_optimized``: rank 0 always, rank r >= 1 iff
  conf >= 0.95 or (conf >= 1 - factor / (r + 2) and conf >= 0.5).

Selection policies (``remasking`` codes, per row): how the masked positions are *ranked*.

* LOW_CONFIDENCE: by the model's confidence (LLaDA's default).
* RANDOM: by uniform noise (the noise also stands in for the confidence the rules compare).
* LEFTMOST: by position, leftmost first; the rules' tests keep the model's real confidence, and
  the committed set is cut to its leading run in that order (``leading_run``), so a row commits
  a left-to-right prefix of its block's masks every step (docs/sampling.md, "Selection policies").
"""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar

import jax
import jax.numpy as jnp

from dllm_jax.models.transformer import softmax

LOW_CONFIDENCE, RANDOM, LEFTMOST = range(3)
# ``remasking`` names (LLaDA upstream's parameter) -> per-row policy codes
REMASKING = {"low_confidence": LOW_CONFIDENCE, "random": RANDOM, "leftmost": LEFTMOST}

NEG_INF = -jnp.inf

# dInfer defaults (as the PyTorch server configured its decoders)
HIERARCHY_LOW_THRESHOLD = 0.4
CREDIT_ALPHA = 0.7
CREDIT_DECAY = 0.8
CREDIT_BOOST = 0.2
# NeMo-RL static-block acceptance constants
NEMOTRON_HIGH = 0.95
NEMOTRON_FLOOR = 0.5


def ranks(score, masked):
    """Rank of each masked position by ``score`` (0 = highest; ties: the leftmost first); unmasked -> Lb."""
    lb = score.shape[-1]
    score = jnp.where(masked, score, NEG_INF)
    order = jnp.argsort(-score, axis=-1, stable=True)  # positions by descending score
    rank = jnp.argsort(order, axis=-1, stable=True)
    return jnp.where(masked, rank, lb)


def ranking_score(conf, remasking):
    """What ``ranks`` orders by: the confidence, or -position for LEFTMOST rows (leftmost first)."""
    position = jnp.arange(conf.shape[-1], dtype=conf.dtype)
    return jnp.where((remasking == LEFTMOST)[:, None], -position[None, :], conf)


def leading_run(sel, masked, rank):
    """``sel`` cut to its leading run in rank order: the positions ranked before the first masked
    position ``sel`` leaves out (a LEFTMOST row's commits are a left-to-right prefix of its masks)."""
    lb = sel.shape[-1]
    first_out = jnp.min(jnp.where(masked & ~sel, rank, lb), axis=-1)  # [B]
    return sel & (rank < first_out[:, None])


def _by_rank(conf, masked, rank):
    """[B, Lb]: at r, the confidence of the masked position of rank r (-inf past the masked count)."""
    b, lb = conf.shape
    out = jnp.full((b, lb), NEG_INF, conf.dtype)
    return out.at[jnp.arange(b)[:, None], rank].set(jnp.where(masked, conf, NEG_INF), mode="drop")


# Every rule below takes ``rank`` (``ranks`` of the row's ranking score; default: of ``conf``) for
# its order and compares the confidence ``conf`` in its tests.

def transfer_fixed(conf, masked, k, rank=None):
    """The k[b] best-ranked (most confident) masked positions of each row."""
    rank = ranks(conf, masked) if rank is None else rank
    return masked & (rank < k[:, None])


def transfer_threshold(conf, masked, threshold, rank=None):
    rank = ranks(conf, masked) if rank is None else rank
    return masked & ((rank == 0) | (conf >= threshold[:, None]))


def transfer_factor(conf, masked, factor, rank=None, forced=True):
    """Accept ranks 0..n-1 where n = 1 + the leading run of ranks r >= 1 with c_r >= 1 - f/(r+2)
    (``forced`` False: rank 0 too must pass, n = the leading run from rank 0)."""
    lb = conf.shape[-1]
    rank = ranks(conf, masked) if rank is None else rank
    c = _by_rank(conf, masked, rank)  # [B, Lb] by rank (descending under confidence ranking)
    r = jnp.arange(lb)
    ok = (c >= 1.0 - factor[:, None] / (r + 2.0)) & jnp.isfinite(c)
    if forced:
        ok = ok.at[:, 0].set(True)
    count = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1)
    return masked & (rank < count[:, None])


def transfer_nemotron(conf, masked, factor, rank=None):
    rank = ranks(conf, masked) if rank is None else rank
    above = (conf >= 1.0 - factor[:, None] / (rank + 2.0)) & (conf >= NEMOTRON_FLOOR)
    return masked & ((rank == 0) | (conf >= NEMOTRON_HIGH) | above)


def transfer_hierarchy(conf, masked, threshold, low_threshold=HIERARCHY_LOW_THRESHOLD, rank=None):
    """dInfer's hierarchy decoder on one block (see module docstring)."""
    lb = conf.shape[-1]
    rank = ranks(conf, masked) if rank is None else rank
    start = masked & ~jnp.pad(masked, ((0, 0), (1, 0)))[:, :lb]  # first position of each run
    run = jnp.cumsum(start, axis=-1)  # run id (valid where masked)
    same = masked[:, :, None] & masked[:, None, :] & (run[:, :, None] == run[:, None, :])  # [B, Lb, Lb]
    score = jnp.where(masked, conf, NEG_INF)
    run_max = jnp.max(jnp.where(same, score[:, None, :], NEG_INF), axis=-1)
    # the first position attaining its run's maximum
    idx = jnp.arange(lb)
    first_best = jnp.min(jnp.where(same & (score[:, None, :] == run_max[:, :, None]), idx[None, None, :], lb), axis=-1)
    run_best = masked & (first_best == idx[None, :]) & (conf >= low_threshold)
    return masked & ((rank == 0) | (conf >= threshold[:, None]) | run_best)


def transfer_entropy_bound(entropy, masked, bound, rank=None, forced=True):
    """EB-Sampler: accept ranks 0..n-1, n the most with sum(H) - max(H) <= bound over ranks 0..n-1.

    ``entropy`` [B, Lb] of each position's predictive distribution; ``bound`` [B] (gamma >= 0).
    The spent budget sum - max never decreases along the ranks, so the accepted ranks are a
    prefix; rank 0 spends nothing and is always accepted. Ranked by entropy (ascending) this is
    ``cumsum(H)[r - 1] <= gamma`` for rank r (SGLang's ``eb_sampling``). ``forced`` False: the
    summed entropy itself (rank 0's included) must stay <= bound, and nothing may be accepted."""
    b, lb = entropy.shape
    rank = ranks(-entropy, masked) if rank is None else rank
    h = jnp.zeros((b, lb), jnp.float32).at[jnp.arange(b)[:, None], rank].set(
        jnp.where(masked, entropy, 0.0).astype(jnp.float32), mode="drop")  # [B, Lb] by rank
    # (a scan of elementwise adds: its order depends on Lb only, so a row's sums are batch-invariant)
    spent = jax.lax.associative_scan(jnp.add, h, axis=1)
    if forced:
        spent = spent - jax.lax.cummax(h, axis=1)
    count = jnp.sum((spent <= bound[:, None]) & (jnp.arange(lb)[None, :] < jnp.sum(masked, -1)[:, None]), -1)
    return masked & (rank < (jnp.maximum(count, 1) if forced else count)[:, None])


def credit_fuse(logits, credit, masked, first_iter):
    """dInfer credit decoding: decay, accumulate p_top1^gamma at each masked position's top-1,
    fuse ``logits + alpha * log(1 + credit)``. credit: [B, Lb, V] float32 (reset per block).
    """
    credit = jnp.where(first_iter, credit, credit * CREDIT_DECAY)
    probs = softmax(logits)
    top = jnp.argmax(probs, axis=-1)
    boost = jnp.max(probs, axis=-1) ** CREDIT_BOOST * masked
    credit = credit + jax.nn.one_hot(top, logits.shape[-1], dtype=jnp.float32) * boost[..., None]
    return logits + CREDIT_ALPHA * jnp.log1p(credit), credit


@dataclasses.dataclass(frozen=True)
class Ranked:
    """What a rule decides on in one step: every row's block, its masked positions ranked.

    Attributes:
      conf: [B, Lb] confidence of each position's proposal (what the rules' tests compare).
      masked: [B, Lb] still-masked positions the step may commit.
      rank: [B, Lb] ``ranks`` of the row's ranking score (0 = first; unmasked -> Lb).
      k: [B] the static schedule's share of this step (``Fixed``).
      threshold, factor: [B] the rows' knobs.
      entropy: [B, Lb] entropy of each position's predictive distribution (``EntropyBound``;
        None when no row uses it), entropy_bound: [B] its knob.
    """

    conf: jax.Array
    masked: jax.Array
    rank: jax.Array
    k: jax.Array
    threshold: jax.Array
    factor: jax.Array
    entropy: jax.Array | None = None
    entropy_bound: jax.Array | None = None


class Rule:
    """A transfer rule: which masked positions of a block one step commits.

    Attributes:
      name: the rule's name (its ``Code`` member is the name upper-cased).
      knobs: the request fields it reads.
      per_row: a row picks it by its own knobs when its algorithm fixes no rule (``row_rule``).
      fuses_credit: the step fuses the logits with a per-block credit first (``credit_fuse``).
      needs_entropy: its ``select`` reads ``Ranked.entropy`` (computed only when a row uses it).
      entropy_bound_rows: where an algorithm fixes this rule, a row that gives ``entropy_bound``
        commits by the EB-Sampler instead (the threshold rules: same candidates and confidences,
        only the stopping test differs; docs/sampling.md, "EB-Sampler").
    """

    name: ClassVar[str]
    knobs: ClassVar[tuple[str, ...]] = ()
    per_row: ClassVar[bool] = False
    fuses_credit: ClassVar[bool] = False
    needs_entropy: ClassVar[bool] = False
    entropy_bound_rows: ClassVar[bool] = False

    @property
    def code(self) -> int:
        return Code[self.name.upper()]

    def select(self, r: Ranked) -> jax.Array:
        """[B, Lb] bool: the positions to commit (a subset of ``r.masked``)."""
        raise NotImplementedError


class Fixed(Rule):
    """LLaDA's static schedule: the ``k`` best-ranked masked positions (LLaDA, Fast-dLLM)."""

    name, knobs, per_row = "fixed", ("steps",), True

    def select(self, r: Ranked) -> jax.Array:
        return transfer_fixed(r.conf, r.masked, r.k, r.rank)


class Threshold(Rule):
    """The first-ranked masked position plus every one with confidence >= ``threshold``
    (Fast-dLLM ``get_transfer_index``; dInfer's blockwise decoder)."""

    name, knobs, per_row, entropy_bound_rows = "threshold", ("threshold",), True, True

    def select(self, r: Ranked) -> jax.Array:
        return transfer_threshold(r.conf, r.masked, r.threshold, r.rank)


class Factor(Rule):
    """Fast-dLLM ``get_transfer_index_dynamic`` (``transfer_factor``)."""

    name, knobs, per_row = "factor", ("factor",), True

    def select(self, r: Ranked) -> jax.Array:
        return transfer_factor(r.conf, r.masked, r.factor, r.rank)


class EntropyBound(Rule):
    """The EB-Sampler's entropy-bounded unmasking (``transfer_entropy_bound``)."""

    name, knobs, per_row, needs_entropy = "entropy_bound", ("entropy_bound",), True, True

    def select(self, r: Ranked) -> jax.Array:
        return transfer_entropy_bound(r.entropy, r.masked, r.entropy_bound, r.rank)


class Hierarchy(Rule):
    """dInfer's hierarchy decoder (``transfer_hierarchy``)."""

    name, knobs = "hierarchy", ("threshold",)

    def select(self, r: Ranked) -> jax.Array:
        return transfer_hierarchy(r.conf, r.masked, r.threshold, rank=r.rank)


class Credit(Threshold):
    """dInfer's credit decoder: ``Threshold`` on logits fused with a per-block credit."""

    name, per_row, fuses_credit = "credit", False, True


class Nemotron(Rule):
    """NeMo-RL's ``get_transfer_index_optimized`` (``transfer_nemotron``)."""

    name, knobs = "nemotron", ("factor",)

    def select(self, r: Ranked) -> jax.Array:
        return transfer_nemotron(r.conf, r.masked, r.factor, r.rank)


# Every rule, once; a rule's code is its index here.
RULES: tuple[Rule, ...] = (Fixed(), Threshold(), Factor(), Hierarchy(), Credit(), Nemotron(), EntropyBound())
Code = enum.IntEnum("Code", [(rule.name.upper(), i) for i, rule in enumerate(RULES)])
FIXED, THRESHOLD, FACTOR, HIERARCHY, CREDIT, NEMOTRON, ENTROPY_BOUND = Code


def row_rule(threshold, factor, entropy_bound=None) -> Code:
    """The rule a row picks by its own knobs where the algorithm fixes none: a threshold, a
    factor, an entropy bound, or else the static schedule."""
    if threshold is not None:
        return THRESHOLD
    if factor is not None:
        return FACTOR
    return ENTROPY_BOUND if entropy_bound is not None else FIXED


def select(rule_static, rule, conf, masked, k, threshold, factor, remasking=None, entropy=None, entropy_bound=None):
    """The positions one step commits [B, Lb].

    ``rule_static``: the algorithm's rule code (every row uses it), or None: each row's ``rule``
    code [B] picks one of the ``per_row`` rules. ``remasking`` [B] (policy codes; None = by
    confidence): LEFTMOST rows rank by position and keep only the leading run of what their rule
    accepts (see the module docstring). ``entropy`` [B, Lb] / ``entropy_bound`` [B]: for
    ENTROPY_BOUND rows (None: no row uses that rule)."""
    score = conf if remasking is None else ranking_score(conf, remasking)
    rank = ranks(score, masked)  # [B, Lb]
    view = Ranked(conf, masked, rank, k, threshold, factor, entropy, entropy_bound)
    if rule_static is not None:
        sel = RULES[rule_static].select(view)
    else:
        choices = [r for r in RULES if r.per_row and (entropy is not None or not r.needs_entropy)]
        sel = choices[-1].select(view)
        for r in reversed(choices[:-1]):
            sel = jnp.where((rule == r.code)[:, None], r.select(view), sel)
    if remasking is None:
        return sel
    return jnp.where((remasking == LEFTMOST)[:, None], leading_run(sel, masked, rank), sel)


def schedule(n_masked, steps: int):
    """LLaDA's get_num_transfer_tokens: n masks over ``steps`` steps, the first n % steps
    steps take one more. n_masked: [B] -> [B, steps] int32."""
    base = n_masked // steps
    rem = n_masked % steps
    return (base[:, None] + (jnp.arange(steps)[None, :] < rem[:, None])).astype(jnp.int32)
