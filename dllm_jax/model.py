"""``Model``: config + tokenizer + params on a mesh, with ``logits`` and ``generate``.

Also the abstract parameter tree (``abstract_params``: shapes and each parameter's
``NamedSharding`` on a mesh) that ``Model.random`` and ``dllm_jax.checkpoint.load`` fill.
Dependencies point one way: ``checkpoint`` imports this module, never the reverse.
"""

from __future__ import annotations

import copy
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dllm_jax import sampling
from dllm_jax.configs import LLaDAConfig, ModelConfig
from dllm_jax.models import nemotron
from dllm_jax.models.transformer import Transformer
from dllm_jax.sampling.programs import Programs
from dllm_jax.sharding import batch_sharding, mesh_or_default, named


def abstract_params(config: ModelConfig, dtype, mesh):
    """(graphdef, abstract nnx.State whose leaves carry their NamedSharding on ``mesh``)."""
    spec = config.spec()
    abstract = nnx.eval_shape(lambda: Transformer(spec, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def attach(var):
        sds = var.get_value()
        sharding = named(mesh, var.get_metadata()["axes"], sds.shape)
        return var.replace(jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding))

    state = jax.tree.map(attach, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, state


def param_shardings(state) -> dict:
    """Pure dict of the NamedSharding of every (abstract or concrete) parameter."""
    return jax.tree.map(lambda v: v.get_value().sharding, state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()


def _param_name(path) -> str:
    """('layers', 0, 'q_proj', .value) key path -> 'layers/0/q_proj'."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path
                    if not isinstance(k, jax.tree_util.GetAttrKey))


def _conform(x, like):
    """``x`` (of ``like``'s shape) with the dtype and sharding of ``like``: a copy where they
    differ, ``x`` itself where they match."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x)  # (a host array: cast on the host, then one transfer)
    if x.dtype != like.dtype:
        x = x.astype(like.dtype)
    if not isinstance(x, jax.Array) or x.sharding != like.sharding:
        x = jax.device_put(x, like.sharding)
    return x


def padded_positions(attention_mask):
    """RoPE positions of a left-padded batch: real tokens count from 0 in every row."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Model:
    """A loaded diffusion LM. Build with ``dllm_jax.load`` (or ``Model.random`` for demos).

    Attributes:
      config: the family config (``LLaDAConfig`` or ``NemotronDiffusionConfig``).
      tokenizer: a transformers tokenizer with the checkpoint's chat template (or None).
      mesh: the ``("data", "model")`` mesh the params live on (Auto axis types; a mesh given
        with Explicit axes is re-typed, see ``dllm_jax.sharding.as_mesh``).
      params: the parameters as an ``nnx.State`` (pass to jitted functions with ``graphdef``).
      graphdef: the static half of the Flax NNX module.
      programs: the compiled sampling programs of this model, one per program key.
    """

    def __init__(self, config: ModelConfig, graphdef, params, *, tokenizer=None, mesh=None, source=None):
        self.config = config
        self.spec = config.spec()
        self.graphdef = graphdef
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh_or_default(mesh)
        self.source = source
        self.programs = Programs(self)

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def random(cls, config: ModelConfig, *, seed: int = 0, dtype=jnp.float32, mesh=None, tokenizer=None):
        """Random weights of the given shape, created directly in their shardings."""
        mesh = mesh_or_default(mesh)
        graphdef, abstract = abstract_params(config, dtype, mesh)
        shardings = jax.tree.map(lambda v: v.get_value().sharding, abstract,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))

        @functools.partial(jax.jit, out_shardings=shardings)
        def init():
            return nnx.state(Transformer(config.spec(), dtype=dtype, rngs=nnx.Rngs(seed)))

        return cls(config, graphdef, init(), tokenizer=tokenizer, mesh=mesh, source=f"random(seed={seed})")

    def with_params(self, params, *, convert: bool = False) -> "Model":
        """This model with other weights of the same architecture (a newer checkpoint, a trainer's
        step).

        The copy shares config, tokenizer, mesh and compiled programs with this model: the
        programs take the params as an argument, so weights of equal shapes, dtypes and
        shardings run without a recompile.

        Args:
          params: this model's parameters as a pytree: an ``nnx.State`` like ``self.params``
            (e.g. ``jax.tree.map(f, m.params)``, or from ``dllm_jax.checkpoint.read_params``) or
            its pure dict (``m.params.to_pure_dict()``, what an optax loop often holds). Leaves
            are matched by parameter name ('layers/0/q_proj') and put into this model's tree.
          convert: False (the default): every leaf must already have this model's dtype and
            sharding; the arrays are used as they are, no copy (the new model shares them with
            the caller). True: a leaf of another dtype is cast (``astype``) and one on another
            sharding or device, or a host (numpy) array, is put onto this model's sharding
            (``jax.device_put``); those leaves are copies, the others are still shared. Shapes
            must match either way.

        Raises:
          ValueError: naming the first parameter that is missing, extra, or differs in shape
            (or, without ``convert``, in dtype or sharding).
        """
        mine, treedef = jax.tree_util.tree_flatten_with_path(self.params)
        theirs = {_param_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        pairs = []
        for path, have in mine:  # (every check before any copy)
            name = _param_name(path)
            new = theirs.pop(name, None)
            if new is None:
                raise ValueError(f"parameter {name} is missing")
            for what in ("shape",) if convert else ("shape", "dtype", "sharding"):
                a, b = getattr(have, what), getattr(new, what, None)
                if a != b:
                    raise ValueError(f"parameter {name}: {what} {b} where this model has {a}")
            pairs.append((new, have))
        if theirs:
            raise ValueError(f"parameter {next(iter(theirs))} is not part of this model")
        leaves = [_conform(new, have) if convert else new for new, have in pairs]
        model = copy.copy(self)
        model.params = jax.tree_util.tree_unflatten(treedef, leaves)
        return model

    # ---- properties ------------------------------------------------------------------

    @property
    def family(self) -> str:
        return self.config.family

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def dtype(self):
        return self.params["embed"].get_value().dtype

    @property
    def max_length(self) -> int:
        return self.config.max_sequence_length

    @functools.cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a reply: EOS plus the chat template's end-of-turn token."""
        ids = {self.config.eos_token_id}
        tok = self.tokenizer
        if tok is not None:
            if tok.eos_token_id is not None:
                ids.add(tok.eos_token_id)
            vocab = tok.get_vocab()
            for name in ("<|eot_id|>", "<|im_end|>", "<|endoftext|>"):
                if name in vocab:
                    ids.add(vocab[name])
        ids.discard(self.config.mask_token_id)
        return tuple(sorted(i for i in ids if i is not None and 0 <= i < self.spec.vocab))

    def module(self) -> Transformer:
        """The NNX module with the params bound (for interactive use)."""
        return nnx.merge(self.graphdef, self.params)

    # ---- forward ---------------------------------------------------------------------

    @functools.cached_property
    def _logits_fn(self):
        graphdef = self.graphdef

        @jax.jit
        def fn(params, tokens, positions, mask):
            return nnx.merge(graphdef, params)(tokens, positions, mask)

        return fn

    def logits(self, input_ids, attention_mask=None, *, layout: str | None = None,
               block_size: int | None = None, split_len: int | None = None) -> np.ndarray:
        """Logits of a (left-padded) batch: [B, L, V] float32.

        Args:
          input_ids: [B, L] int.
          attention_mask: [B, L] 1 = real token, 0 = padding (keys at pads are masked; real
            tokens get RoPE positions counting from 0, so padding does not shift them).
          layout: Nemotron attention layout ('bidirectional', 'efficient_block_diff',
            'prefix_bidirectional'); default bidirectional.
          block_size / split_len: parameters of those layouts.
        """
        tokens = jnp.asarray(np.asarray(input_ids), jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tokens.shape}")
        b, length = tokens.shape
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds the model's context {self.max_length}")
        valid = (jnp.ones((b, length), bool) if attention_mask is None
                 else jnp.asarray(np.asarray(attention_mask)).astype(bool))
        pattern = nemotron.layout_mask(layout or "bidirectional", length, block_size=block_size, split_len=split_len)
        if layout not in (None, "bidirectional") and isinstance(self.config, LLaDAConfig):
            raise ValueError(f"layout {layout!r} is a Nemotron-Diffusion attention layout; LLaDA is bidirectional")
        mask = pattern[None] & valid[:, None, :]
        positions = padded_positions(valid)
        sharding = batch_sharding(self.mesh, 2, b)
        tokens, positions = jax.device_put(tokens, sharding), jax.device_put(positions, sharding)
        mask = jax.device_put(mask, batch_sharding(self.mesh, 3, b))
        return np.asarray(self._logits_fn(self.params, tokens, positions, mask))

    def chat_prompt(self, messages, *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat rendered with the checkpoint's template (no extra special tokens).

        Args:
          messages: [{"role": ..., "content": ...}, ...] or a single user message as a string.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---- sampling --------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], **kwargs):
        """Diffusion generation; see ``dllm_jax.sampling.generate`` for the keywords."""
        return sampling.generate(self, prompts, **kwargs)

    def score(self, sequences: Sequence[Sequence[int]], *, top_k: int = 0, shift_logits: bool | None = None):
        """Chain-rule log p(x_i | x_<i) of every position (lm-eval loglikelihood); see
        ``dllm_jax.sampling.score``. Returns one ``ScoreOutput`` per sequence."""
        return sampling.score(self, sequences, top_k=top_k, shift_logits=shift_logits)

    def __repr__(self):
        return (f"Model({self.family}, {self.spec.param_count() / 1e6:.1f}M params, dtype={self.dtype}, "
                f"mesh={dict(self.mesh.shape)}, source={self.source!r})")
