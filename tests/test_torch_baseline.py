"""The PyTorch eager baseline (benchmarks/torch_llada.py) against the upstream golden fixtures."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_llada as tl  # noqa: E402  (the repo root is on pytest's pythonpath)
from helpers import LLADA_DIR  # noqa: E402

MODEL_DIR = LLADA_DIR / "model"
GEN = json.loads((LLADA_DIR / "golden_generate.json").read_text())
FAST = json.loads((LLADA_DIR / "golden_fastdllm.json").read_text())
FWD = np.load(LLADA_DIR / "golden_forward.npz")

DUAL_CASES = [c for c in FAST["cases"] if c["function"] == "generate_with_dual_cache"]
PREFIX_CASES = [c for c in FAST["cases"] if c["function"] == "generate_with_prefix_cache"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    return tl.TorchLLaDA.from_state_dict(tl.load_fixture_state_dict(MODEL_DIR), tl.load_config(MODEL_DIR))


def _t(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.long)


# ---- forward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("i", [0, 1, 2])
def test_forward_logits(model, i):
    logits = model(_t(FWD[f"input_ids_{i}"])).numpy()
    np.testing.assert_allclose(logits, FWD[f"logits_{i}"], atol=1e-4, rtol=1e-5)


def test_forward_hidden_states_and_kv_cache(model):
    logits, cache, hidden = model(_t(FWD["input_ids_0"]), use_cache=True, output_hidden_states=True)
    np.testing.assert_allclose(torch.stack(hidden).numpy(), FWD["hidden_states_0"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(torch.stack([k for k, _ in cache]).numpy(), FWD["kv_cache_k_0"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(torch.stack([v for _, v in cache]).numpy(), FWD["kv_cache_v_0"], atol=1e-4, rtol=1e-5)


def test_forward_padded_batch(model):
    mask = FWD["padded_attention_mask"]
    logits = model(_t(FWD["padded_input_ids"]), attention_mask=_t(mask)).numpy()
    keep = mask == 1
    np.testing.assert_allclose(logits[keep], FWD["padded_logits"][keep], atol=1e-4, rtol=1e-5)
    alone = model(_t(FWD["padded_row0_unpadded_input_ids"])).numpy()
    np.testing.assert_allclose(alone, FWD["padded_row0_unpadded_logits"], atol=1e-4, rtol=1e-5)
    # an all-ones mask is the same as no mask
    ids = _t(FWD["input_ids_1"])
    assert torch.equal(model(ids, attention_mask=torch.ones_like(ids)), model(ids))


def test_cached_call_on_unchanged_state_equals_full_forward(model):
    ids = _t(FWD["input_ids_2"])
    full, cache, _ = model(ids, use_cache=True)
    dual = model.forward_cached(ids[:, 20:36], cache, 20, mode="dual")
    np.testing.assert_allclose(dual.numpy(), full[:, 20:36].numpy(), atol=1e-5)
    prefix = model.forward_cached(ids[:, 20:], [(k[:, :, :20], v[:, :, :20]) for k, v in cache], 20, mode="prefix")
    np.testing.assert_allclose(prefix.numpy(), full[:, 20:].numpy(), atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    sd = tl.random_state_dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab=400, seed=3)
    cfg = tl.llada_config(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=48, vocab=400)
    mha_sd = dict(sd)
    for key, w in sd.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            mha_sd[key] = w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    gqa = tl.TorchLLaDA.from_state_dict(sd, cfg)(ids)
    mha = tl.TorchLLaDA.from_state_dict(mha_sd, dict(cfg, n_kv_heads=4))(ids)
    np.testing.assert_allclose(gqa.numpy(), mha.numpy(), atol=1e-5)


def test_state_dict_helpers(tmp_path):
    keys = (LLADA_DIR / "state_dict_keys.txt").read_text().split()
    sd = tl.random_state_dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=128, vocab=384, seed=1)
    fixture = tl.load_fixture_state_dict(MODEL_DIR)
    assert list(sd) == keys
    assert list(tl.TorchLLaDA.from_state_dict(sd, tl.load_config(MODEL_DIR)).state_dict()) == keys
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in fixture.items()}
    assert all(v.dtype == torch.float32 for v in sd.values())
    arrays = tl.export_state_dict_numpy(sd)
    assert list(arrays) == keys and arrays[keys[0]].dtype == np.float32
    cfg = tl.llada_config(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=128, vocab=384,
                          mask_token_id=336, eos_token_id=257, pad_token_id=258, max_sequence_length=512)
    assert cfg == tl.load_config(MODEL_DIR)  # same field set and values as the fixture's config.json
    out = tl.write_hf_dir(sd, cfg, tmp_path / "hf")
    back = tl.load_fixture_state_dict(out)
    assert all(torch.equal(back[k], sd[k]) for k in keys)
    assert tl.load_config(out) == cfg


# ---- original LLaDA generate() ------------------------------------------------------------------

@pytest.mark.parametrize("case", GEN["cases"], ids=lambda c: c["name"])
def test_generate_basic_matches_golden(model, case):
    a = case["args"]
    mask = None if case["attention_mask"] is None else _t(case["attention_mask"])
    trace = []
    x, nfe = tl.generate_basic(model, _t(case["prompt_ids"]), mask, steps=a["steps"], gen_length=a["gen_length"],
                               block_length=a["block_length"], temperature=a["temperature"],
                               cfg_scale=a["cfg_scale"], remasking=a["remasking"], mask_id=a["mask_id"],
                               trace=trace)
    assert x.tolist() == case["output_ids"]
    assert nfe == case["num_model_calls"] == len(case["steps"])
    for got, want in zip(trace, case["steps"]):
        assert got["unmasked_positions"] == want["unmasked_positions"], want["step"]
        assert got["unmasked_tokens"] == want["unmasked_tokens"], want["step"]


# ---- Fast-dLLM cached samplers ----------------------------------------------------------------

def _run_fast(fn, model, case):
    a = case["args"]
    trace = []
    x, nfe = fn(model, _t(case["prompt_ids"]), steps=a["steps"], gen_length=a["gen_length"],
                block_length=a["block_length"], temperature=a["temperature"], remasking=a["remasking"],
                mask_id=a["mask_id"], threshold=a["threshold"], trace=trace)
    assert x.tolist() == case["output_ids"]
    assert nfe == case["nfe"] == len(case["steps"])
    for got, want in zip(trace, case["steps"]):
        assert got["cached_call"] == want["cached_call"] and got["input_span"] == want["input_span"], want["call"]
        assert got["unmasked_positions"][0] == want["unmasked_positions"], want["call"]
        assert got["unmasked_tokens"][0] == want["unmasked_tokens"], want["call"]


@pytest.mark.parametrize("case", DUAL_CASES, ids=lambda c: c["name"])
def test_generate_dual_cache_matches_golden(model, case):
    _run_fast(tl.generate_dual_cache, model, case)


@pytest.mark.parametrize("case", PREFIX_CASES, ids=lambda c: c["name"])
def test_generate_prefix_cache_matches_golden(model, case):
    _run_fast(tl.generate_prefix_cache, model, case)


def test_dual_cache_one_step_per_block_raises_like_upstream(model):
    with pytest.raises(IndexError):
        tl.generate_dual_cache(model, _t([[1, 2, 3]]), steps=2, gen_length=16, block_length=8, mask_id=336)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_dual_cache_left_padded_batch_equals_rows_alone(model, threshold):
    case = next(c for c in GEN["cases"] if c["attention_mask"] is not None and len(c["prompt_ids"]) == 2)
    ids, mask = _t(case["prompt_ids"]), _t(case["attention_mask"])
    kw = dict(steps=16, gen_length=32, block_length=8, mask_id=336, threshold=threshold)
    x, _ = tl.generate_dual_cache(model, ids, mask, **kw)
    P = ids.shape[1]
    for r in range(2):
        row = ids[r:r + 1, mask[r].bool()]
        alone, _ = tl.generate_dual_cache(model, row, **kw)
        assert x[r, P:].tolist() == alone[0, row.shape[1]:].tolist()


def test_temperature_paths_run(model):
    g = torch.Generator().manual_seed(0)
    prompt = _t(GEN["cases"][0]["prompt_ids"])
    x, nfe = tl.generate_basic(model, prompt, steps=8, gen_length=16, block_length=8, temperature=1.0,
                               mask_id=336, generator=g)
    assert nfe == 8 and not (x == 336).any()
    x, nfe = tl.generate_dual_cache(model, prompt, steps=8, gen_length=16, block_length=8, temperature=0.7,
                                    remasking="random", mask_id=336, generator=g)
    assert not (x == 336).any()
