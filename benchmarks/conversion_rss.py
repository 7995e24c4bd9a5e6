"""Peak memory of ``convert.hf_to_orbax`` on a synthetic float32 checkpoint (safetensors and DCP).

The converter's promise is "peak RSS near the output size plus one source tensor", so that a
float32 8B checkpoint (32 GB) converts to bf16 (16 GB) on a 24 GiB machine. This script builds
a mid-size random LLaDA checkpoint (>= 1 GB of float32) twice: as HF safetensors and as a NeMo-RL
style DCP (``torch.distributed.checkpoint.save({"model": state_dict})`` into
``step_1/policy/weights``). Each is converted to bf16 in a fresh subprocess that reports its own
peak RSS (``VmHWM``; ``ru_maxrss`` would include the parent's RSS at fork time) and its RSS
right after imports; the parent also polls
``/proc/<pid>/status`` for the anonymous / file-backed split. ``--compare-standard`` adds a run that saves with ``ocp.StandardCheckpointer()`` defaults instead
(what the converter avoids). Temp files are removed at the end.

    python -m benchmarks.conversion_rss [--d-model 2048 --layers 8 --mlp 3072 --vocab 32768] [--workdir /tmp]
                                        [--compare-standard]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the children run here, so `convert` imports

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, orbax.checkpoint, torch  # the converter's full import footprint
import convert.hf_to_orbax as mod
from convert.hf_to_orbax import convert
if sys.argv[5] == "standard":  # for comparison: Orbax defaults (deep copy + zstd)
    def standard_save(path, params):
        ckptr = orbax.checkpoint.StandardCheckpointer()
        ckptr.save(path.absolute(), params)
        ckptr.wait_until_finished()
    mod.save_params = standard_save
def status_mb(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
base = status_mb("VmRSS")
t0 = time.perf_counter()
manifest = convert(sys.argv[1], sys.argv[2], base_model=sys.argv[3] if sys.argv[3] != "-" else None,
                   dtype=sys.argv[4], progress=False)
# VmHWM, not ru_maxrss: after fork+exec ru_maxrss still includes the parent's RSS at fork time.
print(json.dumps({"baseline_mb": base, "peak_mb": status_mb("VmHWM"),
                  "seconds": time.perf_counter() - t0, "out_bytes": manifest["bytes"],
                  "layout": manifest["source_layout"]}))
"""


def _status(pid: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            out[key] = int(value.split()[0]) // 1024
    return out


def run_child(source: Path, dest: Path, base: Path | None, dtype: str, saver: str = "converter") -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(dest), str(base or "-"), dtype, saver],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            for key, value in _status(proc.pid).items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)
            time.sleep(0.02)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"conversion failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_anon_mb=peaks["RssAnon"], peak_file_mb=peaks["RssFile"])
    return result


def build(workdir: Path, config) -> tuple[Path, Path, int, int]:
    """(hf dir, DCP step dir, source bytes, largest tensor bytes): float32, random."""
    import torch
    import torch.distributed.checkpoint as dcp

    from dllm_jax.checkpoint import save_safetensors
    from dllm_jax.models.keymap import source_shape
    from dllm_jax.models.llada import hf_key_map

    spec, rng = config.spec(), np.random.default_rng(0)
    weights = {}
    for key, target in hf_key_map(config).items():
        shape = source_shape(target.kind, spec)
        weights[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    hf = workdir / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config.to_hf_config()))
    save_safetensors(weights, hf / "model.safetensors")
    step = workdir / "step_1"
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=str(step / "policy/weights"), no_dist=True)
    total = sum(v.nbytes for v in weights.values())
    largest = max(v.nbytes for v in weights.values())
    return hf, step, total, largest


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--compare-standard", action="store_true",
                        help="also convert once with ocp.StandardCheckpointer defaults (deep copy + zstd)")
    args = parser.parse_args()

    from dllm_jax.configs import LLaDAConfig

    config = LLaDAConfig(d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers,
                         mlp_hidden_size=args.mlp, vocab_size=args.vocab, embedding_size=args.vocab,
                         max_sequence_length=1024, mask_token_id=args.vocab - 3, eos_token_id=args.vocab - 2,
                         pad_token_id=args.vocab - 1)
    workdir = Path(tempfile.mkdtemp(prefix="conversion_rss-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        hf, step, src_bytes, largest = build(workdir, config)
        print(f"built {src_bytes / 1e9:.2f} GB float32 checkpoint ({config.spec().param_count() / 1e6:.0f}M params, "
              f"largest tensor {largest / 1e6:.0f} MB) as safetensors and DCP in {time.perf_counter() - t0:.0f}s",
              flush=True)
        rows = []
        runs = [("safetensors", hf, None, "converter"), ("DCP", step, hf, "converter")]
        if args.compare_standard:
            runs.append(("safetensors", hf, None, "standard"))
        for name, source, base, saver in runs:
            dest = workdir / f"out-{name}-{saver}"
            r = run_child(source, dest, base, args.dtype, saver)
            r.update(name=name if saver == "converter" else f"{name}, Orbax defaults",
                     src_bytes=_du(source if name == "safetensors" else step / "policy/weights"), disk_bytes=_du(dest))
            rows.append(r)
            shutil.rmtree(dest)
        print(f"\nsettings: LLaDA d_model={args.d_model} layers={args.layers} heads={args.heads} mlp={args.mlp} "
              f"vocab={args.vocab}; float32 -> {args.dtype}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
        head = ("source", "layout", "src GB", "out GB", "orbax GB", "base MB", "peak MB", "peak-base MB",
                "anon MB", "file MB", "(peak-base)/out", "s")
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for r in rows:
            extra = r["peak_mb"] - r["baseline_mb"]
            cells = (r["name"], r["layout"], f"{r['src_bytes'] / 1e9:.2f}", f"{r['out_bytes'] / 1e9:.2f}",
                     f"{r['disk_bytes'] / 1e9:.2f}", f"{r['baseline_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{extra:.0f}",
                     f"{r['peak_anon_mb']}", f"{r['peak_file_mb']}", f"{extra * 2**20 / r['out_bytes']:.2f}",
                     f"{r['seconds']:.1f}")
            print("| " + " | ".join(cells) + " |")
        print(f"\nlargest source tensor: {largest / 2**20:.0f} MB; output + largest tensor = "
              f"{(rows[0]['out_bytes'] + largest) / 2**20:.0f} MB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
