"""``dllm_jax.load``: an Orbax dir written by ``convert``, an HF dir, or a hub id -> Model.

Parameters are created abstract-first: ``nnx.eval_shape`` gives shapes, the logical axis
names give each one a ``NamedSharding`` on the mesh, and Orbax (or the safetensors stream)
fills them straight into those shardings, one parameter at a time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dllm_jax import models
from dllm_jax.checkpoint import dtypes
from dllm_jax.checkpoint.safetensors_io import SafetensorsSource
from dllm_jax.checkpoint.tensors import (
    CheckpointError, TensorSource, assemble, check_source, file_in, is_ignorable, read_json,
)
from dllm_jax.configs import ModelConfig, config_from_hf
from dllm_jax.model import Model, abstract_params, param_shardings
from dllm_jax.sharding import mesh_or_default

log = logging.getLogger(__name__)

ORBAX_PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
MANIFEST = "manifest.json"
MAX_CONFIG_BYTES = 16 << 20  # config.json / manifest.json: a few KB in practice
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]

def read_hf_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"no config.json in {directory}")
    raw = read_json(file_in(directory, "config.json"), "config", limit=MAX_CONFIG_BYTES)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config_from_hf(raw)


def resolve_source(source: str | os.PathLike, *, patterns=_HUB_PATTERNS, what: str = "checkpoint") -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded (only the files
    matching ``patterns``: by default config, weights and tokenizer)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(repo_id=text, allow_patterns=list(patterns)))
        except Exception as e:  # offline, unknown repo, no access ...
            raise CheckpointError(f"{what} {text!r} is not a local path and could not be fetched from the "
                                  f"Hugging Face hub: {type(e).__name__}: {e}") from None
    raise CheckpointError(f"{what} {text!r} does not exist (expected a directory or a hub id 'org/name')")


def load_tokenizer(directory: str | os.PathLike | None):
    """The checkpoint's tokenizer with its chat template, or None when the dir has none."""
    if directory is None:
        return None
    directory = Path(directory)
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _place(name: str, array, shardings: dict, out: dict) -> None:
    """Put one checkpoint parameter (stacked for block params) into the runtime tree on device."""
    if name.startswith("layers/"):
        param = name.split("/", 1)[1]
        for i in range(array.shape[0]):
            out.setdefault("layers", {}).setdefault(i, {})[param] = jax.device_put(
                array[i], shardings["layers"][i][param])
    else:
        out[name] = jax.device_put(array, shardings[name])


def _from_source(source: TensorSource, config: ModelConfig, dtype, mesh, key_prefix: str = ""):
    key_map = models.key_map(config)
    check_source(source, key_map, config.spec(), ignore=is_ignorable, key_prefix=key_prefix)
    if dtype is None:  # the checkpoint's own (of its embedding), when it is a parameter dtype
        first = dtypes.from_code(source.tensors()[key_prefix + next(iter(key_map))].dtype)
        dtype = first if first.name in dtypes.PARAM_DTYPES else dtypes.param_dtype("float32")
    graphdef, state = abstract_params(config, dtype, mesh)
    shardings = param_shardings(state)
    params: dict = {}
    for name, array in assemble(source, key_map, config.spec(), dtype, key_prefix=key_prefix):
        _place(name, array, shardings, params)
        del array
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def _from_safetensors(directory: Path, config: ModelConfig, dtype, mesh):
    source = SafetensorsSource(directory)
    try:
        return _from_source(source, config, dtype, mesh)
    finally:
        source.close()


def _stacked_target(shardings: dict, state, mesh) -> dict:
    """Abstract checkpoint tree (layers stacked) whose leaves carry a NamedSharding."""
    leaves = jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable)).to_pure_dict()
    target = {k: v for k, v in leaves.items() if k != "layers"}
    layers = leaves["layers"]
    n = len(layers)
    target["layers"] = {}
    for name, sds in layers[0].items():
        spec = shardings["layers"][0][name].spec
        target["layers"][name] = jax.ShapeDtypeStruct((n,) + sds.shape, sds.dtype,
                                                      sharding=NamedSharding(mesh, P(None, *spec)))
    return target


def _from_orbax(directory: Path, config: ModelConfig, dtype, mesh):
    import orbax.checkpoint as ocp

    manifest = read_json(file_in(directory, MANIFEST), "manifest", limit=MAX_CONFIG_BYTES) \
        if (directory / MANIFEST).exists() else {}
    manifest = manifest if isinstance(manifest, dict) else {}
    dtype = dtype or dtypes.param_dtype(manifest.get("dtype", "float32"))
    graphdef, state = abstract_params(config, dtype, mesh)
    shardings = param_shardings(state)
    target = _stacked_target(shardings, state, mesh)
    try:
        restored = ocp.StandardCheckpointer().restore((directory / ORBAX_PARAMS_DIR).absolute(), target)
    except Exception as e:
        raise CheckpointError(f"could not restore Orbax params from {directory / ORBAX_PARAMS_DIR}: "
                              f"{type(e).__name__}: {e}") from None
    params: dict = {}
    for name in list(restored):
        if name == "layers":
            for param in list(restored["layers"]):
                _place(f"layers/{param}", restored["layers"].pop(param), shardings, params)
        else:
            _place(name, restored.pop(name), shardings, params)
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state


def read_params(path: str | os.PathLike | None, config: ModelConfig, *, dtype, mesh,
                source: TensorSource | None = None, key_prefix: str = ""):
    """The parameters of ``config`` from a checkpoint, built as ``load`` builds them.

    The same abstract-first tree (``abstract_params``), restored straight into each
    parameter's sharding on ``mesh``, so a running ``Model`` of that config can take them
    (``Model.with_params``) without a recompile. Nothing is returned until every parameter
    was read: a failure part way leaves no half-filled tree behind.

    Args:
      path: a local Orbax directory (``params/``) or a directory of safetensors (ignored when
        ``source`` is given). Its config.json is not read: check it against ``config`` first.
      config: the architecture the tensors must have (names and shapes are checked first).
      dtype: parameter dtype (None: the checkpoint's own, as in ``load``).
      mesh: the mesh to place the parameters on.
      source: read these tensors instead (any ``TensorSource``, e.g. convert's DCP reader).
      key_prefix: a prefix on every source key (NeMo-RL's DCP: ``"model."``).

    Returns:
      An ``nnx.State`` with the structure of ``abstract_params(config, dtype, mesh)``.

    Raises:
      CheckpointError: missing, truncated or mismatching tensors (names the key and file).
    """
    if source is not None:
        return _from_source(source, config, dtypes.param_dtype(dtype), mesh, key_prefix)[1]
    directory = Path(path)
    if (directory / ORBAX_PARAMS_DIR).is_dir():
        return _from_orbax(directory, config, dtypes.param_dtype(dtype), mesh)[1]
    return _from_safetensors(directory, config, dtypes.param_dtype(dtype), mesh)[1]


def load(path: str | os.PathLike, *, mesh=None, dtype=None):
    """Load a model for inference.

    Args:
      path: an Orbax directory written by ``python -m convert.hf_to_orbax``, a Hugging Face
        directory (config.json + model.safetensors or a sharded index), or a hub id.
      mesh: a ``("data", "model")`` mesh (``dllm_jax.make_mesh``, or one from ``jax.make_mesh``
        / ``Mesh(...)`` with Auto or Explicit axis types); default: one device.
      dtype: parameter dtype ("float32", "bfloat16" or a numpy/jax dtype); default: the
        checkpoint's own.

    Returns:
      dllm_jax.Model
    """
    directory = resolve_source(path)
    mesh = mesh_or_default(mesh)
    dtype = dtypes.param_dtype(dtype)
    config = read_hf_config(directory)
    if (directory / ORBAX_PARAMS_DIR).is_dir():
        graphdef, state = _from_orbax(directory, config, dtype, mesh)
        tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
    else:
        graphdef, state = _from_safetensors(directory, config, dtype, mesh)
        tokenizer = load_tokenizer(directory)
    return Model(config, graphdef, state, tokenizer=tokenizer, mesh=mesh, source=str(path))
