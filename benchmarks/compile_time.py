"""Start-up cost of a decode program: trace/lower and XLA compile times from abstract parameters.

    python -m benchmarks.compile_time                              # LLaDA-8B shape, dual cache, batch 8, bf16
    python -m benchmarks.compile_time --shape nemotron_4b --algorithm static_block

Nothing is allocated: the parameters and the decode state are ``jax.ShapeDtypeStruct`` with their
shardings, and the program is built exactly as ``Programs`` builds it, then
``jit(...).lower(...)`` and ``.compile()`` are timed separately (one process per measurement is
cleanest: JAX caches traces). Prints one table row with the settings.
"""

from __future__ import annotations

import argparse
import time


def abstract_state(key, spec, dtype, mesh, mask_id):
    import jax
    import numpy as np

    from dllm_jax.models.transformer import KVCache
    from dllm_jax.sampling import slots
    from dllm_jax.sampling.state import DecodeState

    shardings = slots.state_shardings(key, mesh, spec)
    host = slots.empty_rows(key, mask_id=mask_id, d_model=spec.d_model)

    def per_row(name, field):
        if field.dtype == "key":
            return jax.ShapeDtypeStruct((key.batch,), jax.random.key(0).dtype, sharding=shardings.get(name))
        return jax.ShapeDtypeStruct(host[name].shape, host[name].dtype, sharding=shardings.get(name))

    cache = None
    if shardings.cache is not None:
        kv = jax.ShapeDtypeStruct((key.batch, spec.n_kv_heads, key.canvas_len, spec.head_dim), dtype,
                                  sharding=shardings.cache.k[0])
        cache = KVCache((kv,) * spec.n_layers, (kv,) * spec.n_layers)
    credit = jax.ShapeDtypeStruct(slots.credit_shape(key, spec.vocab), np.float32, sharding=shardings.credit)
    counter = jax.ShapeDtypeStruct((), np.int32, sharding=shardings.batch_nfe)
    return DecodeState.build(per_row, cache=cache, credit=credit, batch_nfe=counter, batch_steps=counter), shardings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=["llada_8b", "nemotron_4b", "tiny"], default="llada_8b")
    p.add_argument("--algorithm", default="dual_cache")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import dllm_jax
    from benchmarks.common import device_description
    from dllm_jax.model import abstract_params
    from dllm_jax.sampling import ProgramKey

    config = {"llada_8b": dllm_jax.LLaDAConfig.llada_8b, "nemotron_4b": dllm_jax.NemotronDiffusionConfig.nemotron_4b,
              "tiny": dllm_jax.LLaDAConfig.tiny}[args.shape]()
    dtype = getattr(jnp, args.dtype)
    mesh = dllm_jax.make_mesh("1")
    graphdef, params = abstract_params(config, dtype, mesh)
    spec = config.spec()
    family = "nemotron" if args.algorithm == "static_block" else "llada"
    key = ProgramKey(algorithm=args.algorithm, batch=args.batch, prompt_len=args.prompt, gen_length=args.gen,
                     block_length=args.block, steps_per_block=0 if family == "nemotron" else args.block, cfg=False,
                     shift=family == "nemotron")
    st, shardings = abstract_state(key, spec, dtype, mesh, config.mask_token_id)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    fn = key.decoder.build(key, graphdef, mask_id=config.mask_token_id, fill_id=config.eos_token_id)
    scalar = shardings.batch_nfe
    program = jax.jit(fn, in_shardings=(param_shardings, shardings, scalar, scalar), out_shardings=shardings,
                      donate_argnums=(1,))
    t0 = time.perf_counter()
    lowered = program.lower(params, st, jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_))
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered.compile()
    t_compile = time.perf_counter() - t0
    print(f"# {device_description()}")
    print("| shape | layers | dtype | algorithm | batch | prompt | gen | block | lower s | compile s | total s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.shape} | {spec.n_layers} | {args.dtype} | {args.algorithm} | {args.batch} | {args.prompt} | {args.gen} | "
          f"{args.block} | {t_lower:.1f} | {t_compile:.1f} | "
          f"{t_lower + t_compile:.1f} |")


if __name__ == "__main__":
    main()
