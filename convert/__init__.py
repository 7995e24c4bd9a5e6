"""Checkpoint conversion: HF safetensors or NeMo-RL DCP -> the Orbax directory ``dllm_jax.load`` reads.

``python -m convert.hf_to_orbax --source SRC --dest DIR`` (see ``convert.hf_to_orbax``), or from
Python ``convert.convert(source, dest, base_model=..., dtype=...)``. The import is lazy so that
``python -m convert.hf_to_orbax`` can pick JAX's platform before JAX is imported.
"""

__all__ = ["convert"]


def __getattr__(name):
    if name == "convert":
        from convert.hf_to_orbax import convert

        return convert
    raise AttributeError(f"module 'convert' has no attribute {name!r}")
