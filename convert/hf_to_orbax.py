"""Convert an HF checkpoint or a NeMo-RL DCP checkpoint to the Orbax directory ``dllm_jax.load`` reads.

Usage::

    python -m convert.hf_to_orbax --source SRC --dest DIR [--base-model HF] [--dtype bfloat16|float32] [--overwrite]

Output (kept in sync with ``dllm_jax/checkpoint/load.py``)::

    DIR/params/         Orbax PyTree of the nested parameter dict, as ``assemble`` yields it
    DIR/config.json     the source's config.json, verbatim (DCP: the base model's)
    DIR/tokenizer/      tokenizer files (the checkpoint's own, else the base model's)
    DIR/manifest.json   source, layout, family, dtype, sizes, ignored keys, timing, versions

The converter is the key map plus bookkeeping (``check_source`` / ``assemble``): names and
shapes of every tensor are checked before any data is read, each parameter is filled exactly
once, and every source key is used or explicitly ignored. Memory stays near the output size
plus one source tensor: tensors are streamed one at a time, and Orbax writes the numpy arrays
in place (no defensive deep copy, no compression buffers; see ``save_params``). Everything is
written to a temporary sibling of DIR and renamed at the end, so DIR is either complete or
untouched.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # conversion needs no accelerator: keep JAX off the GPUs
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dllm_jax import UnsupportedConfigError  # noqa: E402
from dllm_jax.checkpoint import (  # noqa: E402
    MANIFEST, ORBAX_PARAMS_DIR, TOKENIZER_DIR, TOKENIZER_FILES, CheckpointError, assemble, check_source, detect_layout,
    dtypes, file_in, has_tokenizer, is_ignorable, key_map, nest_params, open_weights, read_hf_config, resolve_source,
)

log = logging.getLogger("convert")

OUTPUT_DTYPES = dtypes.CONVERT_DTYPES
_CONFIG_PATTERNS = ["config.json", *TOKENIZER_FILES, "*.tiktoken"]
PROGRESS_MIN_BYTES = 64 << 20  # show a progress bar for sources at least this large (by default)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("dllm-jax")
    except Exception:  # not installed: a source checkout
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"] + "+src"
        except Exception:
            return "unknown"


def save_params(path: Path, params: dict) -> None:
    """Write the nested dict of numpy arrays as an Orbax PyTree checkpoint at ``path``.

    Same on-disk format as ``ocp.StandardCheckpointer().save`` (which ``dllm_jax.load``
    restores), with two settings that keep peak memory at the size of ``params``:
    ``NumpyHandler(deepcopy_host_arrays=False)`` (the default deep-copies every array first)
    and ``use_compression=False`` (zstd output buffers grew to ~0.7x the tree in our
    measurements, see docs/conversion.md). Uncompressed bf16 is as large as a bf16 safetensors.
    """
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.get_type_handler(jax.Array)),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    checkpointer = ocp.Checkpointer(handler)
    try:
        checkpointer.save(path.absolute(), args=ocp.args.PyTreeSave(params))
    finally:
        checkpointer.close()


def _read_config(directory: Path):
    try:
        return read_hf_config(directory)
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{directory / 'config.json'}: {e}") from None


def _copy_tokenizer(candidates: list[Path | None], dest: Path) -> Path | None:
    for directory in candidates:
        if has_tokenizer(directory):
            dest.mkdir()
            for name in TOKENIZER_FILES:
                if (directory / name).exists() or (directory / name).is_symlink():
                    shutil.copy2(file_in(directory, name), dest / name)  # (kept inside the directory)
            return directory
    log.warning("no tokenizer files in %s: the converted model will have no tokenizer",
                ", ".join(str(c) for c in candidates if c is not None) or "the source")
    return None


def _check_dest(dest: Path, source: Path, overwrite: bool) -> None:
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise CheckpointError(f"destination {dest} already exists; pass --overwrite (overwrite=True) to replace it")
        if not dest.is_dir():
            raise CheckpointError(f"destination {dest} exists and is not a directory; refusing to replace it")
    src, dst = source.resolve(), dest.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise CheckpointError(f"destination {dest} overlaps the source {source}; choose a separate directory")


def _install(tmp: Path, dest: Path) -> None:
    """Rename the finished ``tmp`` to ``dest``; an old ``dest`` is removed only after that worked."""
    if not dest.exists():
        tmp.rename(dest)
        return
    old = dest.with_name(f"{dest.name}.old-{secrets.token_hex(4)}")
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def convert(source, dest, *, base_model=None, dtype: str = "bfloat16", overwrite: bool = False,
            progress: bool | None = None) -> dict:
    """Convert a checkpoint to an Orbax directory that ``dllm_jax.load`` reads.

    Args:
      source: an HF directory (config.json + model.safetensors or a sharded index), a hub id,
        or a NeMo-RL checkpoint (``step_N/``, ``step_N/policy/``, a DCP ``weights/`` dir or
        ``weights/model/``).
      dest: output directory; must not exist unless ``overwrite``.
      base_model: HF directory or hub id supplying config.json (required for DCP, which has
        none) and the tokenizer when the checkpoint has none of its own.
      dtype: stored parameter dtype, "bfloat16" or "float32".
      overwrite: replace an existing ``dest`` (only once the new one is complete).
      progress: show a tqdm bar on stderr; default: when the source is >= 64 MiB.

    Returns:
      The manifest written to ``dest/manifest.json``.

    Raises:
      CheckpointError / UnsupportedConfigError: bad input; nothing is left at ``dest``.
    """
    # (Over 60 lines with its docstring: the steps read top to bottom and the manifest is one flat
    # record of this conversion's values; a helper taking those 15 values read worse than the dict.)
    start = time.perf_counter()
    if dtype not in OUTPUT_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} not supported; use one of {list(OUTPUT_DTYPES)}")
    dest = Path(dest).expanduser().absolute()
    src = resolve_source(source)
    _check_dest(dest, src, overwrite)
    layout = detect_layout(src)
    log.info("source %s: layout %s (%s reader, weights in %s)", source, layout.kind, layout.format, layout.weights)
    base, config_dir = _config_dir(src, layout, base_model)
    config = _read_config(config_dir)  # validated before any tensor is read
    spec, keys = config.spec(), key_map(config)
    # (one safetensors memory map at a time: RSS stays near the output size plus one tensor)
    tensor_source, prefix = open_weights(layout, config, one_map_at_a_time=True)
    infos = tensor_source.tensors()
    ignored = check_source(tensor_source, keys, spec, ignore=is_ignorable, key_prefix=prefix)
    if ignored:
        log.info("ignoring %d non-weight entries (e.g. %s)", len(ignored), ignored[0])
    total = sum(int(np.prod(infos[prefix + k].shape)) * dtypes.itemsize(infos[prefix + k].dtype) for k in keys)
    log.info("%s model, %s parameters, %.2f GB of source tensors -> %s", config.family,
             f"{spec.param_count():,}", total / 1e9, dtype)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        params = _read_all(tensor_source, keys, spec, dtypes.param_dtype(dtype), prefix, total, progress)
        tensor_source.close()
        n_params = sum(a.size for a in params.values())
        n_bytes = sum(a.nbytes for a in params.values())
        log.info("writing %.2f GB of Orbax params to %s", n_bytes / 1e9, dest / ORBAX_PARAMS_DIR)
        save_params(tmp / ORBAX_PARAMS_DIR, nest_params(params))
        del params
        shutil.copy2(file_in(config_dir, "config.json"), tmp / "config.json")
        tokenizer_from = _copy_tokenizer([layout.tokenizer_dir, base], tmp / TOKENIZER_DIR)
        manifest = {
            "format": "dllm-jax-orbax/1",
            "source": str(source),
            "source_path": str(src.resolve()),
            "source_layout": layout.kind,
            "base_model": None if base_model is None else str(base_model),
            "config_from": str(config_dir.resolve() / "config.json"),
            "tokenizer_from": None if tokenizer_from is None else str(tokenizer_from.resolve()),
            "family": config.family,
            "dtype": dtype,
            "source_dtypes": sorted({infos[prefix + k].dtype for k in keys}),
            "param_count": int(n_params),
            "bytes": int(n_bytes),
            "tensors_converted": len(keys),
            "key_prefix": prefix,
            "ignored_keys": ignored,
            "conversion_seconds": round(time.perf_counter() - start, 3),
            "dllm_jax_version": _version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _config_dir(src: Path, layout, base_model) -> tuple[Path | None, Path]:
    """(the --base-model directory or None, the directory whose config.json applies)."""
    # a hub id is fetched WITHOUT its weights: only config and tokenizer are used
    base = (resolve_source(base_model, patterns=_CONFIG_PATTERNS, what="--base-model")
            if base_model is not None else None)
    config_dir = layout.config_dir or base
    if config_dir is None:
        what = "a NeMo-RL DCP checkpoint" if layout.format == "dcp" else "a checkpoint without config.json"
        raise CheckpointError(f"{src} is {what} (layout {layout.kind}) and has no config.json; pass --base-model "
                              f"<HF dir or hub id of the model it was trained from> to supply it")
    return base, config_dir


def _read_all(tensor_source, keys, spec, out_dtype, prefix: str, total: int, progress: bool | None) -> dict:
    """Every parameter, assembled and cast (a tqdm bar on stderr when ``progress``; default: when
    the source is >= PROGRESS_MIN_BYTES)."""
    from tqdm import tqdm

    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="reading",
               file=sys.stderr, disable=not show)
    done = [0]

    def on_tensor(key, nbytes):
        done[0] += 1
        bar.set_postfix_str(f"{done[0]}/{len(keys)} tensors", refresh=False)
        bar.update(nbytes)

    params = {}
    with bar:
        for name, array in assemble(tensor_source, keys, spec, out_dtype, key_prefix=prefix, on_tensor=on_tensor):
            params[name] = array
    return params


def summary(manifest: dict, dest) -> str:
    return (f"converted {manifest['param_count']:,} params ({manifest['family']}, {manifest['dtype']}, "
            f"{manifest['bytes'] / 1e9:.2f} GB) from {manifest['source_layout']} in "
            f"{manifest['conversion_seconds']:.1f}s -> {dest}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.hf_to_orbax", description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="HF dir, hub id, or NeMo-RL checkpoint dir")
    parser.add_argument("--dest", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--base-model", help="HF dir or hub id giving config.json (and tokenizer) for DCP")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="bfloat16", help="stored dtype (default bfloat16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dest once the new one is done")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-step INFO lines
    try:
        manifest = convert(args.source, args.dest, base_model=args.base_model, dtype=args.dtype,
                           overwrite=args.overwrite, progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.dest}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # CheckpointError, UnsupportedConfigError, bad paths
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    print(summary(manifest, args.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
