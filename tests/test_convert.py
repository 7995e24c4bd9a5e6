"""``convert.hf_to_orbax``: golden logits through the converter, every NeMo-RL layout, an HF round
trip against an independent torch forward, bf16, and bad input leaving nothing behind."""

import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import dllm_jax
from convert.hf_to_orbax import convert, main
from dllm_jax.checkpoint import save_safetensors
from dllm_jax.configs import LLaDAConfig, NemotronDiffusionConfig
from helpers import LLADA_DIR, NEMOTRON_DIR

torch = pytest.importorskip("torch")

ATOL = 1e-4
LLADA_DCP = LLADA_DIR / "dcp/policy"
NEMOTRON_DCP = NEMOTRON_DIR / "dcp/step_1"
NEMOTRON_CASES = {"fwd0_bidirectional": {},
                  "fwd1_efficient_block_diff": {"layout": "efficient_block_diff", "block_size": 8},
                  "fwd3_prefix_bidirectional": {"layout": "prefix_bidirectional", "split_len": 12}}


def _err(got, want, mask=None):
    diff = np.abs(np.asarray(got, np.float64) - want)
    return float(diff[mask].max() if mask is not None else diff.max())


def golden_errors(m) -> dict[str, float]:
    """Max |logits - golden| per golden case (padded batch: real positions only)."""
    if m.family == "llada":
        g = np.load(LLADA_DIR / "golden_forward.npz")
        errs = {f"logits_{i}": _err(m.logits(g[f"input_ids_{i}"]), g[f"logits_{i}"]) for i in range(3)}
        mask = g["padded_attention_mask"].astype(bool)
        errs["padded"] = _err(m.logits(g["padded_input_ids"], g["padded_attention_mask"]), g["padded_logits"], mask)
        return errs
    g = np.load(NEMOTRON_DIR / "golden_forward.npz")
    return {k: _err(m.logits(g[f"{k}/input_ids"], **kw), g[f"{k}/logits"]) for k, kw in NEMOTRON_CASES.items()}


def _params(m) -> dict:
    flat = {}
    for name, value in m.params.flat_state():
        flat["/".join(map(str, name))] = np.asarray(value.get_value())
    return flat


def _assert_clean(dest: Path):
    """Nothing at dest and no temporary siblings."""
    assert not dest.exists()
    assert not [p.name for p in dest.parent.glob(f"{dest.name}.*")]


@pytest.fixture(scope="module")
def reference():
    """HF-loaded params of both fixtures (what every conversion must reproduce bit for bit)."""
    return {"llada": _params(dllm_jax.load(LLADA_DIR / "model")),
            "nemotron": _params(dllm_jax.load(NEMOTRON_DIR / "model"))}


# ---- golden logits ----------------------------------------------------------------------

GOLDEN_SOURCES = {"llada/hf": (LLADA_DIR / "model", None), "llada/dcp": (LLADA_DCP, LLADA_DIR / "model"),
                  "nemotron/hf": (NEMOTRON_DIR / "model", None), "nemotron/dcp": (NEMOTRON_DCP, NEMOTRON_DIR / "model")}


@pytest.mark.parametrize("name", list(GOLDEN_SOURCES))
def test_golden_logits_through_converter(tmp_path, name):
    source, base = GOLDEN_SOURCES[name]
    manifest = convert(source, tmp_path / "out", base_model=base, dtype="float32")
    m = dllm_jax.load(tmp_path / "out")
    errs = golden_errors(m)
    print(f"\n[{name}] max |logits - golden| (float32): " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) < ATOL, errs
    assert manifest["dtype"] == "float32" and manifest["family"] == name.split("/")[0]
    assert manifest["param_count"] == m.spec.param_count()
    assert m.tokenizer is not None and not (tmp_path / "out/tokenizer/config.json").exists()
    if name.endswith("dcp"):  # NeMo-RL saved policy/tokenizer: that one wins over the base model's
        assert manifest["tokenizer_from"].endswith("tokenizer") and manifest["key_prefix"] == "model."


# ---- every NeMo-RL layout ---------------------------------------------------------------

def _link(target: Path, at: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(target.absolute(), target_is_directory=True)
    return at


def _save_dcp(state_dict: dict, directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.distributed.checkpoint.save(state_dict, checkpoint_id=str(directory), no_dist=True)


def _hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(directory / "model.safetensors")


def _flat_dcp(tmp: Path, family: str, prefixed: bool, extra: dict | None = None) -> Path:
    """step_3/policy/weights/model/ written as DTensor v2 does: one flat state dict."""
    fixture = LLADA_DIR if family == "llada" else NEMOTRON_DIR
    sd = {k: torch.from_numpy(v.copy()) for k, v in _hf_tensors(fixture / "model").items()}
    sd.update(extra or {})
    _save_dcp({"model": sd} if prefixed else sd, tmp / "step_3/policy/weights/model")
    tokenizer = LLADA_DCP / "tokenizer" if family == "llada" else NEMOTRON_DCP / "policy/tokenizer"
    _link(tokenizer, tmp / "step_3/policy/tokenizer")
    return tmp / "step_3"


def _layout(tmp: Path, case: str) -> tuple[str, Path, str]:
    """(family, source dir, expected manifest source_layout)."""
    llada_w, nemo_w = LLADA_DCP / "weights", NEMOTRON_DCP / "policy/weights"
    if case == "step_N":
        _link(llada_w, tmp / "step_7/policy/weights")
        _link(LLADA_DCP / "tokenizer", tmp / "step_7/policy/tokenizer")
        return "llada", tmp / "step_7", "dcp:step_N/policy/weights"
    if case == "step_N/policy":
        return "nemotron", NEMOTRON_DCP / "policy", "dcp:policy/weights"
    if case == "weights":
        return "nemotron", nemo_w, "dcp:weights"
    if case == "weights-alone":  # a bare copy of weights/: no tokenizer next to it
        return "llada", _link(llada_w, tmp / "ckpt/weights"), "dcp:weights"
    if case == "weights/model-flat":  # no "model." prefix; LLaDA's own names start with "model."
        extra = {"optimizer.state.0.exp_avg": torch.zeros(3)}
        return "llada", _flat_dcp(tmp, "llada", False, extra), "dcp:step_N/policy/weights/model"
    if case == "weights/model-prefixed":
        return "nemotron", _flat_dcp(tmp, "nemotron", True) / "policy/weights/model", "dcp:weights/model"
    if case == "weights/model-consolidated":  # automodel safetensors with a consolidated HF copy
        _link(LLADA_DIR / "model", tmp / "step_2/policy/weights/model/consolidated")
        return "llada", tmp / "step_2/policy", "safetensors:policy/weights/model/consolidated"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["step_N", "step_N/policy", "weights", "weights-alone", "weights/model-flat",
                                  "weights/model-prefixed", "weights/model-consolidated"])
def test_dcp_layouts(tmp_path, reference, case):
    family, source, kind = _layout(tmp_path, case)
    base = (LLADA_DIR if family == "llada" else NEMOTRON_DIR) / "model"
    manifest = convert(source, tmp_path / "out", base_model=base, dtype="float32")
    assert manifest["source_layout"] == kind
    m = dllm_jax.load(tmp_path / "out")
    got, want = _params(m), reference[family]
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    own_tokenizer = case not in ("weights-alone", "weights/model-consolidated")
    assert (Path(manifest["tokenizer_from"]) != base.resolve()) == own_tokenizer
    assert m.tokenizer is not None
    if case == "weights/model-flat":
        assert manifest["ignored_keys"] == ["optimizer.state.0.exp_avg"] and manifest["key_prefix"] == ""


# ---- an HF round trip against an independent torch forward ------------------------------

_NAMES = {
    "llada": dict(embed="model.transformer.wte.weight", final="model.transformer.ln_f.weight",
                  head="model.transformer.ff_out.weight", layer="model.transformer.blocks.{i}.",
                  attn_norm="attn_norm.weight", q="q_proj.weight", k="k_proj.weight", v="v_proj.weight",
                  o="attn_out.weight", mlp_norm="ff_norm.weight", gate="ff_proj.weight", up="up_proj.weight",
                  down="ff_out.weight"),
    "nemotron": dict(embed="encoder.embed_tokens.weight", final="encoder.norm.weight", head="diffusion_head.weight",
                     layer="encoder.layers.{i}.", attn_norm="input_layernorm.weight", q="self_attn.q_proj.weight",
                     k="self_attn.k_proj.weight", v="self_attn.v_proj.weight", o="self_attn.o_proj.weight",
                     q_norm="self_attn.q_norm.weight", k_norm="self_attn.k_norm.weight",
                     mlp_norm="post_attention_layernorm.weight", gate="mlp.gate_proj.weight",
                     up="mlp.up_proj.weight", down="mlp.down_proj.weight"),
}


def _random_hf_weights(config, seed=0) -> dict[str, np.ndarray]:
    """Upstream PyTorch layout ([out, in] Linear weights) under the hand-written names above."""
    s, names, rng = config.spec(), _NAMES[config.family], np.random.default_rng(seed)
    d, n, k, h, f, v = s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.mlp_dim, s.vocab
    shapes = {"embed": (v, d), "final": (d,), "head": (v, d)}
    layer = {"attn_norm": (d,), "q": (n * h, d), "k": (k * h, d), "v": (k * h, d), "o": (d, n * h),
             "mlp_norm": (d,), "gate": (f, d), "up": (f, d), "down": (d, f)}
    if s.qk_norm:
        layer.update(q_norm=(h,), k_norm=(h,))
    out = {}

    def draw(shape, scale=1.0):  # norm gains around 1; matrices N(0, scale^2 / fan_in)
        if len(shape) == 1:
            return (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        return (scale * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    for key, shape in shapes.items():
        out[names[key]] = rng.standard_normal(shape).astype(np.float32) if key == "embed" else draw(shape, 3.0)
    for i in range(s.n_layers):
        for key, shape in layer.items():
            out[names["layer"].format(i=i) + names[key]] = draw(shape, 2.0 if key in ("q", "k") else 1.0)
    return out


def torch_reference(config, w: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """The block written from the upstream description, in float64: RMSNorm, rotate-half RoPE,
    per-head q/k norm (Nemotron), GQA by repeat_interleave, SwiGLU (gate through SiLU)."""
    s, names = config.spec(), _NAMES[config.family]
    t = {key: torch.from_numpy(val).double() for key, val in w.items()}
    n, k, h = s.n_heads, s.n_kv_heads, s.head_dim
    b, length = ids.shape

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.norm_eps) * weight

    inv = 1.0 / (s.rope_theta ** (torch.arange(0, h, 2, dtype=torch.float64) / h))
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # [B, N, L, H]
        return x * cos + torch.cat([-x[..., h // 2:], x[..., : h // 2]], -1) * sin

    x = t[names["embed"]][torch.from_numpy(ids)]
    for i in range(s.n_layers):
        p = {key: t.get(names["layer"].format(i=i) + val) for key, val in names.items()}
        a = rms(x, p["attn_norm"])
        q, kk, v = (a @ p["q"].T).view(b, length, n, h), (a @ p["k"].T).view(b, length, k, h), (a @ p["v"].T).view(b, length, k, h)
        if s.qk_norm:
            q, kk = rms(q, p["q_norm"]), rms(kk, p["k_norm"])
        q, kk, v = rope(q.transpose(1, 2)), rope(kk.transpose(1, 2)), v.transpose(1, 2)
        kk, v = kk.repeat_interleave(n // k, dim=1), v.repeat_interleave(n // k, dim=1)
        att = torch.softmax(q @ kk.transpose(-1, -2) / h ** 0.5, -1)
        x = x + (att @ v).transpose(1, 2).reshape(b, length, n * h) @ p["o"].T
        m = rms(x, p["mlp_norm"])
        x = x + (torch.nn.functional.silu(m @ p["gate"].T) * (m @ p["up"].T)) @ p["down"].T
    return (rms(x, t[names["final"]]) @ t[names["head"]].T).numpy()


def _write_hf(directory: Path, config, weights, shards: int = 1) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_config()))
    if shards == 1:
        save_safetensors(weights, directory / "model.safetensors")
        return directory
    keys, weight_map = sorted(weights), {}
    for j in range(shards):
        name = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[j::shards]
        save_safetensors({key: weights[key] for key in part}, directory / name)
        weight_map.update({key: name for key in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


ROUND_TRIPS = {"llada-mha": (LLaDAConfig.tiny(), 1), "llada-gqa": (LLaDAConfig.tiny(n_kv_heads=2), 1),
               "nemotron": (NemotronDiffusionConfig.tiny(), 1), "llada-gqa-sharded": (LLaDAConfig.tiny(n_kv_heads=2), 3)}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_hf_round_trip_matches_torch_reference(tmp_path, name):
    config, shards = ROUND_TRIPS[name]
    weights = _random_hf_weights(config)
    source = _write_hf(tmp_path / "hf", config, weights, shards)
    manifest = convert(source, tmp_path / "out", dtype="float32")
    assert manifest["source_layout"] == ("hf-sharded" if shards > 1 else "hf")
    ids = np.random.default_rng(1).integers(0, config.spec().vocab, (2, 13))
    want = torch_reference(config, weights, ids)
    got = dllm_jax.load(tmp_path / "out").logits(ids)
    err = _err(got, want)
    print(f"\n[round trip {name}] max |logits - torch float64| = {err:.2e} (|logits| up to {np.abs(want).max():.1f})")
    assert err < ATOL


# ---- bfloat16 ---------------------------------------------------------------------------

# max |bf16 - f32 logits| / max |f32 logits|. Observed 0.0205 (0.43 at |logits| <= 20.9) on the
# deliberately peaky LLaDA fixture: bf16 params also make the forward compute in bf16.
BF16_REL = 0.04


def test_bfloat16_conversion(tmp_path):
    convert(LLADA_DCP, tmp_path / "f32", base_model=LLADA_DIR / "model", dtype="float32", progress=True)
    manifest = convert(LLADA_DCP, tmp_path / "bf16", base_model=LLADA_DIR / "model")
    assert manifest["dtype"] == "bfloat16" and manifest["bytes"] == manifest["param_count"] * 2
    m16, m32 = dllm_jax.load(tmp_path / "bf16"), dllm_jax.load(tmp_path / "f32")
    p16, p32 = _params(m16), _params(m32)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in p16.values())
    for key in p32:  # stored values are exactly the f32 weights rounded to bf16
        np.testing.assert_array_equal(p16[key], p32[key].astype(ml_dtypes.bfloat16), err_msg=key)
    g = np.load(LLADA_DIR / "golden_forward.npz")
    ids = g["input_ids_1"]
    ref = m32.logits(ids)
    got = m16.logits(ids)
    rel = _err(got, ref) / np.abs(ref).max()
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"\n[bf16] max |bf16 - f32 logits| / max|f32 logits| = {rel:.4f} (|logits| up to {np.abs(ref).max():.1f}); "
          f"argmax agreement {agree:.3f}")
    assert rel < BF16_REL


# ---- bad input leaves nothing behind ----------------------------------------------------

def _hf_copy(tmp: Path, edit=None) -> Path:
    src = tmp / "src"
    shutil.copytree(LLADA_DIR / "model", src)
    if edit is not None:
        weights = _hf_tensors(src)
        edit(weights)
        save_safetensors(weights, src / "model.safetensors")
    return src


def _truncate(src: Path):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-1000])


def _config(src: Path, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


BAD_INPUT = {
    "truncated safetensors": (lambda t: _truncate(_hf_copy(t)) or t / "src", None,
                              ["truncated safetensors file", "model.safetensors", "needs bytes up to"]),
    "missing tensor": (lambda t: _hf_copy(t, lambda w: w.pop("model.transformer.blocks.1.up_proj.weight")), None,
                       ["missing tensors", "model.transformer.blocks.1.up_proj.weight", "model.safetensors"]),
    "wrong shape": (lambda t: _hf_copy(t, lambda w: w.update({"model.transformer.blocks.0.k_proj.weight":
                                                              np.zeros((32, 64), np.float32)})), None,
                    ["model.transformer.blocks.0.k_proj.weight", "[64, 64]", "[32, 64]", "model.safetensors"]),
    "extra tensor": (lambda t: _hf_copy(t, lambda w: w.update({"model.transformer.blocks.0.extra.weight":
                                                               np.zeros(3, np.float32)})), None,
                     ["unexpected tensors", "model.transformer.blocks.0.extra.weight", "model.safetensors"]),
    "unknown model_type": (lambda t: _config(_hf_copy(t), model_type="gpt2") or t / "src", None,
                           ["unknown model_type 'gpt2'", "config.json"]),
    "dcp without .metadata": (lambda t: shutil.copytree(LLADA_DCP / "weights", t / "w", ignore=shutil.ignore_patterns(
                              ".metadata")), LLADA_DIR / "model", ["no .metadata", "DCP directory"]),
    "truncated distcp": (lambda t: _truncate_distcp(t), LLADA_DIR / "model", ["truncated DCP file", "__0_0.distcp"]),
    "dcp without base model": (lambda t: LLADA_DCP, None, ["--base-model", "dcp:policy/weights"]),
}


def _truncate_distcp(tmp: Path) -> Path:
    shutil.copytree(LLADA_DCP / "weights", tmp / "w")
    data = (tmp / "w/__0_0.distcp").read_bytes()
    (tmp / "w/__0_0.distcp").write_bytes(data[: len(data) // 2])
    return tmp / "w"


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_leaves_nothing(tmp_path, case):
    make, base, needles = BAD_INPUT[case]
    source, dest = make(tmp_path), tmp_path / "out"
    with pytest.raises(ValueError) as info:
        convert(source, dest, base_model=base)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    _assert_clean(dest)


def test_existing_dest_and_overwrite(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep").write_text("x")
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        convert(LLADA_DIR / "model", dest)
    assert (dest / "keep").exists()
    # a failing conversion with --overwrite leaves the old dest untouched
    with pytest.raises(ValueError, match="--base-model"):
        convert(LLADA_DCP, dest, overwrite=True)
    assert (dest / "keep").exists()
    convert(LLADA_DIR / "model", dest, overwrite=True)
    assert not (dest / "keep").exists() and (dest / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupt_during_save_leaves_nothing(tmp_path, monkeypatch):
    import convert.hf_to_orbax as mod

    def interrupted(path, params):
        path.mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(mod, "save_params", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(LLADA_DIR / "model", tmp_path / "out")
    _assert_clean(tmp_path / "out")


# ---- the CLI ----------------------------------------------------------------------------

def test_cli_in_process(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="convert")
    assert main(["--source", str(NEMOTRON_DCP), "--base-model", str(NEMOTRON_DIR / "model"),
                 "--dest", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("converted ") and str(tmp_path / "out") in out.out
    assert "layout dcp:step_N/policy/weights" in caplog.text
    assert json.loads((tmp_path / "out/manifest.json").read_text())["dtype"] == "bfloat16"
    assert main(["--source", str(NEMOTRON_DCP), "--dest", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: destination")


def test_cli_subprocess_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "convert.hf_to_orbax", "--source", str(LLADA_DCP),
                           "--dest", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--base-model" in lines[-1]
    assert "Traceback" not in proc.stderr
    _assert_clean(tmp_path / "out")
