"""Forward parity with the upstream PyTorch logits (golden_forward.npz), float32."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm_jax
from dllm_jax.configs import LLaDAConfig, NemotronDiffusionConfig, UnsupportedConfigError, config_from_hf
from helpers import LLADA_DIR, NEMOTRON_DIR

ATOL = 1e-4


def _max_err(got, want, mask=None):
    diff = np.abs(np.asarray(got, np.float64) - want)
    return float(diff[mask].max() if mask is not None else diff.max())


@pytest.mark.parametrize("i", [0, 1, 2])
def test_llada_logits(llada_model, i):
    g = np.load(LLADA_DIR / "golden_forward.npz")
    assert _max_err(llada_model.logits(g[f"input_ids_{i}"]), g[f"logits_{i}"]) < ATOL


def test_llada_left_padded_batch(llada_model):
    g = np.load(LLADA_DIR / "golden_forward.npz")
    mask = g["padded_attention_mask"].astype(bool)
    got = llada_model.logits(g["padded_input_ids"], g["padded_attention_mask"])
    assert _max_err(got, g["padded_logits"], mask) < ATOL
    # real tokens of the padded row equal the row run alone
    alone = g["padded_row0_unpadded_logits"][0]
    assert _max_err(got[0][mask[0]], alone) < ATOL


def test_llada_all_ones_mask_equals_no_mask(llada_model):
    g = np.load(LLADA_DIR / "golden_forward.npz")
    ids = g["input_ids_1"]
    np.testing.assert_array_equal(llada_model.logits(ids), llada_model.logits(ids, np.ones_like(ids)))


@pytest.mark.parametrize("name,kwargs", [
    ("fwd0_bidirectional", {}),
    ("fwd1_efficient_block_diff", {"layout": "efficient_block_diff", "block_size": 8}),
    ("fwd3_prefix_bidirectional", {"layout": "prefix_bidirectional", "split_len": 12}),
])
def test_nemotron_layouts(nemotron_model, name, kwargs):
    g = np.load(NEMOTRON_DIR / "golden_forward.npz")
    assert _max_err(nemotron_model.logits(g[f"{name}/input_ids"], **kwargs), g[f"{name}/logits"]) < ATOL


def test_nemotron_left_padding_matches_unpadded(nemotron_model):
    g = np.load(NEMOTRON_DIR / "golden_forward.npz")
    ids = g["fwd0_bidirectional/input_ids"]
    pad = np.full((2, 5), 317)
    padded = np.concatenate([pad, ids], 1)
    mask = np.concatenate([np.zeros_like(pad), np.ones_like(ids)], 1)
    got = nemotron_model.logits(padded, mask)[:, 5:]
    assert _max_err(got, g["fwd0_bidirectional/logits"]) < ATOL


def test_layout_errors(llada_model, nemotron_model):
    ids = np.zeros((1, 8), np.int32)
    with pytest.raises(ValueError, match="block_size"):
        nemotron_model.logits(ids, layout="efficient_block_diff")
    with pytest.raises(ValueError, match="unknown attention layout"):
        nemotron_model.logits(ids, layout="sideways")
    with pytest.raises(ValueError, match="LLaDA"):
        llada_model.logits(ids, layout="efficient_block_diff", block_size=4)
    with pytest.raises(ValueError, match="context"):
        llada_model.logits(np.zeros((1, 513), np.int32))


def test_configs_from_fixtures():
    llada = config_from_hf(json.loads((LLADA_DIR / "model/config.json").read_text()))
    assert llada == LLaDAConfig.tiny()
    nemo = config_from_hf(json.loads((NEMOTRON_DIR / "model/config.json").read_text()))
    assert nemo == NemotronDiffusionConfig.tiny()
    assert LLaDAConfig.llada_8b().spec().param_count() == pytest.approx(8.02e9, rel=0.01)
    assert NemotronDiffusionConfig.nemotron_4b().spec().param_count() == pytest.approx(4.41e9, rel=0.01)
    # presets round-trip through their HF form
    for cfg in (LLaDAConfig.llada_8b(), NemotronDiffusionConfig.nemotron_4b()):
        assert config_from_hf(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("field,value", [
    ("include_bias", True), ("weight_tying", True), ("layer_norm_type", "default"),
    ("activation_type", "gelu"), ("alibi", True), ("rope", False), ("scale_logits", True),
    ("some_new_field", 1),
])
def test_llada_config_rejects_math_changes(field, value):
    raw = json.loads((LLADA_DIR / "model/config.json").read_text())
    raw[field] = value
    with pytest.raises(UnsupportedConfigError, match=field):
        config_from_hf(raw)


@pytest.mark.parametrize("field,value", [
    ("attention_bias", True), ("hidden_act", "gelu"), ("disable_qk_norm", True),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("use_sliding_window", True),
    ("mlp_bias", True), ("dlm_paradigm", "sideways"),
])
def test_nemotron_config_rejects_math_changes(field, value):
    raw = json.loads((NEMOTRON_DIR / "model/config.json").read_text())
    raw[field] = value
    if field == "use_sliding_window":
        raw["sliding_window"] = 128
    with pytest.raises(UnsupportedConfigError, match=field):
        config_from_hf(raw)


def test_unknown_model_type():
    with pytest.raises(UnsupportedConfigError, match="unknown model_type 'gpt2'"):
        config_from_hf({"model_type": "gpt2"})


def test_tokenizer_matches_golden(llada_model):
    g = json.loads((LLADA_DIR / "golden_tokenizer.json").read_text())
    tok = llada_model.tokenizer
    assert len(tok) == g["vocab_size"]
    for case in g["encode_cases"]:
        assert tok.encode(case["text"], add_special_tokens=True) == case["ids"]
        assert tok.decode(case["ids"]) == case["decoded"]
    chat = g["chat"]
    text = tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
    assert text == chat["rendered_add_generation_prompt_true"]
    text = tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=False)
    assert text == chat["rendered_add_generation_prompt_false"]
    assert tok.encode(text, add_special_tokens=False) == chat["ids"]


def test_nemotron_tokenizer_chat_template(nemotron_model):
    tok = nemotron_model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok.encode(text, add_special_tokens=False) == [318, 304, 261, 198, 54, 71, 270, 268, 220, 17, 10,
                                                         18, 30, 319, 198, 318, 292, 274, 315, 83, 198]
    assert nemotron_model.stop_token_ids == (317, 319)


def test_random_model_and_mesh_sharding():
    mesh = dllm_jax.make_mesh("4x2")
    m = dllm_jax.Model.random(LLaDAConfig.tiny(), mesh=mesh)
    q = m.params["layers"][0]["q_proj"].get_value()
    assert tuple(q.sharding.spec) == (None, "model", None)
    ids = np.arange(24).reshape(2, 12) % 300
    single = dllm_jax.Model.random(LLaDAConfig.tiny())
    np.testing.assert_allclose(m.logits(ids), single.logits(ids), atol=1e-4)


def test_chat_prompt_matches_golden(llada_model):
    g = json.loads((LLADA_DIR / "golden_tokenizer.json").read_text())
    assert llada_model.chat_prompt(g["chat"]["messages"]) == g["chat"]["ids"]
    ids = llada_model.chat_prompt("What is 2+2?")
    assert ids[0] == 256 and ids[-3:] == [338, 10, 10]  # bos ... assistant header + "\n\n"


@pytest.mark.parametrize("family", ["llada", "nemotron"])
def test_trimmed_last_block_gives_the_window_logits(llada_model, nemotron_model, family):
    """``hidden(out=(start, size))`` (the last block on a window of positions only, what the full
    step runs) gives the upstream logits of those positions: per-row windows of 1, 8 and 16 positions,
    against the golden full forward."""
    model = llada_model if family == "llada" else nemotron_model
    g = np.load((LLADA_DIR if family == "llada" else NEMOTRON_DIR) / "golden_forward.npz")
    ids = g["input_ids_1"] if family == "llada" else g["fwd0_bidirectional/input_ids"]
    want = g["logits_1"] if family == "llada" else g["fwd0_bidirectional/logits"]
    b, t = ids.shape
    module = nnx.merge(model.graphdef, model.params)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    for size in (1, 8, 16):
        start = (np.arange(b) * 3) % (t - size + 1)  # a different window per row
        x, _ = module.hidden(jnp.asarray(ids), positions, jnp.ones((b, 1, t), bool), out=(jnp.asarray(start), size))
        assert x.shape == (b, size, model.spec.d_model)
        got = np.asarray(module.head(x))
        rows = np.stack([want[i, s:s + size] for i, s in enumerate(start)])
        assert _max_err(got, rows) < ATOL
