"""How rows enter a batch's slots: their host arrays, the state's shardings, the empty state and
the merge of new rows (all derived from ``state``'s field declarations)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax.models.transformer import CACHE_AXES, KVCache
from dllm_jax.sampling import rules
from dllm_jax.sampling.params import MAX_STOP_IDS, ProgramKey, SamplingParams, check_stop_count, lean_head_ok
from dllm_jax.sampling.state import ROW_FIELDS, DecodeState, RowField
from dllm_jax.sharding import named


@dataclasses.dataclass
class Row:
    """One request entering a slot."""

    prompt: Sequence[int]
    params: SamplingParams  # resolved


def seed_key_data(seeds: Sequence[int]) -> np.ndarray:
    """Key data of ``jax.random.key(seed)`` per seed: [n, *key shape] (uint32 for threefry: [n, 2]).

    Seeds are 64-bit: the keys are made with 64-bit integers enabled, since without x64
    ``jax.random.key`` silently keeps only the low 32 bits of a larger seed.
    The keys are made one seed at a time by one jitted scalar program, so admitting any number
    of rows never compiles anything new (a ``vmap`` over the seeds compiled once per count).
    """
    if len(seeds) == 0:
        shape, dtype = key_data_spec()
        return np.zeros((0, *shape), dtype)
    with jax.enable_x64(True):
        return np.stack([np.asarray(_key_data_of_seed(np.int64(s))) for s in seeds])


@jax.jit
def _key_data_of_seed(seed):
    return jax.random.key_data(jax.random.key(seed))


def key_data_spec() -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one key's data under the default PRNG implementation."""
    return _key_data_spec(jax.config.jax_default_prng_impl)


@functools.cache
def _key_data_spec(impl: str) -> tuple[tuple[int, ...], np.dtype]:
    data = jax.random.key_data(jax.random.key(0))
    return tuple(data.shape), np.dtype(data.dtype)


def uses_cache(key: ProgramKey) -> bool:
    return key.decoder.uses_cache


def credit_shape(key: ProgramKey, vocab: int) -> tuple[int, int, int]:
    """[B, Lb, V] for credit programs, [B, 0, 0] otherwise."""
    if key.decoder.fuses_credit:
        return (key.batch, key.block_length, vocab)
    return (key.batch, 0, 0)


def dims(key: ProgramKey, d_model: int) -> dict[str, int]:
    """The sizes of ``RowField.dims`` names for one program key."""
    return {"L": key.canvas_len, "G": key.gen_length, "Lb": key.block_length, "K": key.logprobs,
            "S": MAX_STOP_IDS, "D": d_model}


def empty_rows(key: ProgramKey, *, mask_id: int, d_model: int) -> dict[str, np.ndarray]:
    """Host arrays of B empty slots, from the fields' declarations."""
    sizes, b = dims(key, d_model), key.batch
    out = {}
    for name, (_, spec) in ROW_FIELDS.items():
        if spec.dtype == "key":
            key_shape, key_dtype = key_data_spec()
            out[name] = np.zeros((b,) + key_shape, key_dtype)
        else:
            fill = mask_id if spec.fill == "mask" else spec.fill
            out[name] = np.full((b,) + tuple(sizes[d] for d in spec.dims), fill, spec.dtype)
    # Empty slots still get one valid token so no attention row is fully masked.
    out["valid"][:, key.prompt_len - 1] = True
    return out


def row_arrays(key: ProgramKey, rows: dict[int, Row], *, mask_id: int, default_stops: Sequence[int],
               d_model: int) -> dict[str, np.ndarray]:
    """Host arrays for all B slots (rows not in ``rows`` are empty), plus 'replace' [B]."""
    lp, length = key.prompt_len, key.canvas_len
    out = empty_rows(key, mask_id=mask_id, d_model=d_model)
    out["replace"] = np.zeros(key.batch, bool)
    if rows:
        out["rng"][list(rows)] = seed_key_data([row.params.seed for row in rows.values()])
    for slot, row in rows.items():
        p, n = row.params, len(row.prompt)
        if not 0 < n <= lp:
            raise ValueError(f"prompt of length {n} does not fit the program's prompt bucket {lp}")
        if key.lean_head and not lean_head_ok(p):  # (it has no logits to draw from: docs/sampling.md)
            raise ValueError(f"a lean-head program takes no rows that need the full logits (top_p or top_k > 64 at "
                             f"T > 0, credit fusion): temperature={p.temperature}, top_k={p.top_k}, top_p={p.top_p}, "
                             f"min_p={p.min_p} on {p.algorithm}")
        pad = lp - n
        out["canvas"][slot, pad:lp] = np.asarray(row.prompt, np.int32)
        out["valid"][slot] = False
        out["valid"][slot, pad:] = True
        out["positions"][slot, pad:] = np.arange(length - pad, dtype=np.int32)
        out["prompt"][slot, pad:lp] = True
        out["active"][slot] = True
        out["done"][slot] = False
        out["block"][slot] = key.decoder.initial_position(lp)
        out["temperature"][slot] = p.temperature
        out["threshold"][slot] = 1.0 if p.threshold is None else p.threshold
        out["factor"][slot] = 1.0 if p.factor is None else p.factor
        out["cfg_scale"][slot] = p.cfg_scale
        out["rule"][slot] = p.rule
        out["remasking"][slot] = rules.REMASKING[p.remasking]
        out["early_stop"][slot] = p.early_stop
        out["top_k"][slot], out["top_p"][slot], out["min_p"][slot] = p.top_k, p.top_p, p.min_p
        out["processed_logprobs"][slot] = p.logprobs_mode == "processed"
        out["entropy_bound"][slot] = 0.0 if p.entropy_bound is None else p.entropy_bound
        out["block_add_threshold"][slot] = 1.0 if p.block_add_threshold is None else p.block_add_threshold
        stops = list(p.stop_token_ids if p.stop_token_ids is not None else default_stops)
        check_stop_count(stops, f"{len(stops)} stop tokens")  # (resolve() checks a request's own; this: the model's)
        out["stop_ids"][slot, :len(stops)] = stops
        out["replace"][slot] = True
    return out


def state_shardings(key: ProgramKey, mesh, spec) -> DecodeState:
    """NamedSharding of every field: batch over 'data', kv heads over 'model'."""
    b = key.batch

    def rows(ndim):
        return named(mesh, ("batch",) + (None,) * (ndim - 1), (b,) + (1,) * (ndim - 1))

    def per_row(name: str, field: RowField):  # typed keys: [B] (their key data travels as [B, 2])
        return rows(1 + len(field.dims))

    cache = None
    if uses_cache(key):
        kv = named(mesh, CACHE_AXES, (b, spec.n_kv_heads, key.canvas_len, spec.head_dim))
        cache = KVCache((kv,) * spec.n_layers, (kv,) * spec.n_layers)
    scalar = named(mesh, (), ())
    return DecodeState.build(per_row, cache=cache, credit=rows(3), batch_nfe=scalar, batch_steps=scalar)


def empty_state_fn(key: ProgramKey, spec, dtype, shardings: DecodeState, *, mask_id: int):
    """A function creating the all-empty state (slots done, cache zeroed) on the mesh."""
    arrays = empty_rows(key, mask_id=mask_id, d_model=spec.d_model)
    credit = credit_shape(key, spec.vocab)
    n = spec.n_layers
    kv_shape = (key.batch, spec.n_kv_heads, key.canvas_len, spec.head_dim)

    def zeros():  # the cache and the credit, zeroed on the mesh (one small program)
        cache = None
        if uses_cache(key):
            cache = KVCache(tuple(jnp.zeros(kv_shape, dtype) for _ in range(n)),
                            tuple(jnp.zeros(kv_shape, dtype) for _ in range(n)))
        return cache, jnp.zeros(credit, jnp.float32)

    if uses_cache(key) or credit[1]:
        zeros = jax.jit(zeros, out_shardings=(shardings.cache, shardings.credit))
    else:  # nothing to allocate on the device: no program
        zeros = lambda: (None, jax.device_put(np.zeros(credit, np.float32), shardings.credit))  # noqa: E731

    def make() -> DecodeState:
        cache, credit_zeros = zeros()
        counter = lambda: jax.device_put(np.int32(0), shardings.batch_nfe)  # noqa: E731
        return DecodeState.build(lambda name, _: to_device(name, arrays[name], shardings.get(name)),
                                 cache=cache, credit=credit_zeros, batch_nfe=counter(), batch_steps=counter())

    return make


def to_device(field: str, value: np.ndarray, sharding) -> jax.Array:
    """One host row array onto the mesh (``rng`` key data becomes typed keys)."""
    is_key = field in ROW_FIELDS and ROW_FIELDS[field][1].dtype == "key"
    array = jax.device_put(value, _data_sharding(sharding, value.ndim) if is_key else sharding)
    return jax.random.wrap_key_data(array) if is_key else array


def _data_sharding(sharding, ndim: int):
    """The sharding of key data [B, *key shape] for keys [B] sharded as ``sharding``."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, P(*spec))


def relayout_fn(old: ProgramKey, new: ProgramKey, shardings: DecodeState, *, mask_id: int):
    """A jitted ``state -> state`` moving every slot from ``old``'s prompt bucket to ``new``'s
    (same batch, slots and everything else): the canvas-long fields and the cache lose (or gain)
    ``old.prompt_len - new.prompt_len`` leading left-padding columns (and a position in the canvas,
    the sliding decoder's window start, moves with them). Rows are left-padded, so a
    row whose prompt fits both buckets keeps every real column, its RoPE positions and its cache
    entries as they were; the caller must not move a row whose prompt does not fit ``new``."""
    if dataclasses.replace(old, prompt_len=new.prompt_len) != new:
        raise ValueError(f"a relayout changes the prompt bucket only: {old} -> {new}")
    shift = old.prompt_len - new.prompt_len

    def move(x, axis: int, fill):
        if shift >= 0:
            return jax.lax.slice_in_dim(x, shift, x.shape[axis], axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (-shift, 0)
        return jnp.pad(x, pad, constant_values=fill)

    def run(state: DecodeState) -> DecodeState:
        moved = {}
        for name, (_, spec) in ROW_FIELDS.items():
            if "L" in spec.dims:
                fill = mask_id if spec.fill == "mask" else spec.fill
                moved[name] = move(state.get(name), 1 + spec.dims.index("L"), fill)
        cache = state.cache
        if cache is not None:  # per layer [B, K, L, H]
            cache = KVCache(tuple(move(a, 2, 0) for a in cache.k), tuple(move(a, 2, 0) for a in cache.v))
        block = old.decoder.moved_position(state.progress.block, shift)
        return state.update(cache=cache, block=block, **moved)

    return jax.jit(run, out_shardings=shardings)


def merge_rows(state: DecodeState, new: dict[str, jax.Array]) -> DecodeState:
    """Replace the slots flagged in new['replace'] (jitted by the session)."""
    replace = new["replace"]
    updates = {}
    for f in ROW_FIELDS:
        old, value = state.get(f), new[f]
        sel = replace.reshape((-1,) + (1,) * (old.ndim - 1))
        if not jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
            value = value.astype(old.dtype)
        updates[f] = jax.lax.select(jnp.broadcast_to(sel, old.shape), value, old)
    return state.update(**updates)
