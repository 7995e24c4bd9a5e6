"""A checkpoint is untrusted input: no file in it can run code, name a file outside it, or make a
reader allocate or print what it should not (DCP metadata pickles, safetensors headers, shard and
DCP file names)."""

import builtins
import json
import os
import pickle
import shutil
import struct
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from convert.hf_to_orbax import convert
from dllm_jax.checkpoint import CheckpointError, DcpSource, SafetensorsSource, save_safetensors
from helpers import LLADA_DIR
from serve.engine import weight_reading as weights

torch = pytest.importorskip("torch")
import torch.distributed.checkpoint  # noqa: E402 - the writer test_real_dcp_written_by_torch_reads uses

LLADA_WEIGHTS = LLADA_DIR / "dcp/policy/weights"


def _real_metadata():
    with open(LLADA_WEIGHTS / ".metadata", "rb") as f:  # the repository's own fixture: trusted
        return pickle.load(f)


def _dcp_copy(tmp_path, metadata=None, raw: bytes | None = None):
    """A copy of the LLaDA fixture's DCP weights dir whose .metadata is ``metadata`` (or ``raw`` bytes)."""
    d = tmp_path / "step_1/policy/weights"
    shutil.copytree(LLADA_WEIGHTS, d)
    if raw is None:
        raw = pickle.dumps(metadata, protocol=4)
    (d / ".metadata").write_bytes(raw)
    return d


class _Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):  # what a crafted checkpoint carries: a call to any importable function
        return self.fn, self.args


def _payloads(marker):
    code = f"open({str(marker)!r}, 'w').close()"
    return {"builtins.exec": _Payload(builtins.exec, code), "posix.system": _Payload(os.system, f"touch '{marker}'")}


@pytest.mark.parametrize("where", ["top level", "inside real metadata"])
@pytest.mark.parametrize("kind", ["builtins.exec", "posix.system"])
def test_crafted_dcp_metadata_runs_nothing(tmp_path, kind, where):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[kind]
    if where == "top level":
        metadata = payload
    else:
        metadata = _real_metadata()
        metadata.storage_meta.modules = [payload]
    src = _dcp_copy(tmp_path, metadata)
    with pytest.raises(CheckpointError) as e:
        convert(src.parent.parent, tmp_path / "out", base_model=LLADA_DIR / "model")
    assert not marker.exists(), "the pickle's payload ran"
    assert str(src / ".metadata") in str(e.value) and kind in str(e.value), e.value
    assert not (tmp_path / "out").exists()
    # the server's POST /update_weights_from_disk reads through the same code (serve.engine.weight_reading.read)
    with pytest.raises(CheckpointError) as e:
        weights.read(types.SimpleNamespace(config=None), str(src))
    assert not marker.exists()
    failure = weights.failure(str(src), e.value)
    assert failure.bad_checkpoint and ".metadata" in failure.reason and kind in failure.reason


def test_dcp_metadata_cannot_touch_globals(tmp_path):
    """An admitted reducer is still not a handle on shared state: BUILD onto a global (here
    torch.serialization._get_layout's cache) and dotted names into a class's internals are refused."""
    from torch.serialization import _get_layout

    before = getattr(_get_layout, "cache", None)
    build_on_global = (b"\x80\x04ctorch.serialization\n_get_layout\n}X\x05\x00\x00\x00cache}sb.")
    dotted = b"\x80\x04ctorch.distributed.checkpoint.metadata\nMetadata.__init__\n."
    try:
        for raw, needle in ((build_on_global, "_get_layout"), (dotted, "Metadata.__init__")):
            src = _dcp_copy(tmp_path / needle, raw=raw)
            with pytest.raises(CheckpointError, match=needle) as e:
                DcpSource(src)
            assert ".metadata" in str(e.value)
            assert getattr(_get_layout, "cache", None) is before, "the pickle changed torch's global state"
    finally:
        if before is not None:
            _get_layout.cache = before


def test_real_dcp_written_by_torch_reads(tmp_path):
    """Everything torch's own dcp.save writes is admitted: bf16/f16/int/bool tensors, non-tensor
    (bytes) entries, a pathlib checkpoint id, the ``model.`` nesting."""
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal((3, 5), dtype=np.float32)).bfloat16()
    sd = {"a": a, "b": torch.arange(6, dtype=torch.int64).reshape(2, 3), "c": torch.ones(4, dtype=torch.float16),
          "m": torch.tensor([True, False]), "step": 7, "extra": {"lr": 0.1}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.distributed.checkpoint.save({"model": sd}, checkpoint_id=tmp_path / "ck", no_dist=True)
    src = DcpSource(tmp_path / "ck")
    infos = src.tensors()
    assert infos["model.a"].dtype == "BF16" and infos["model.a"].shape == (3, 5)
    assert infos["model.step"].dtype == "bytes"
    np.testing.assert_array_equal(src.read("model.a").astype(np.float32), a.float().numpy())
    np.testing.assert_array_equal(src.read("model.b"), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(src.read("model.m"), [True, False])
    with pytest.raises(CheckpointError, match="not a tensor"):
        src.read("model.step")


@pytest.mark.parametrize("name", ["../../../../../../etc/passwd", "/etc/passwd", "sub/../../x.distcp", ""])
def test_dcp_file_names_stay_inside(tmp_path, name):
    metadata = _real_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = name
    src = _dcp_copy(tmp_path, metadata)
    with pytest.raises(CheckpointError) as e:
        DcpSource(src)
    msg = str(e.value)
    assert ".metadata" in msg and repr(name) in msg and "inside" in msg, msg
    assert "root:" not in msg


def _secret(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"TOPSECRET-" * 20)
    return secret


def _assert_no_bytes_of(msg: str, secret):
    raw = secret.read_bytes()
    assert "TOPSECRET" not in msg and "SECRET" not in msg
    assert str(struct.unpack("<Q", raw[:8])[0]) not in msg  # not even as the 'header length'


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_index_shard_outside_the_directory(tmp_path, kind):
    secret = _secret(tmp_path)
    d = tmp_path / "ckpt"
    d.mkdir()
    save_safetensors({"w": np.zeros(4, np.float32)}, d / "model-00001.safetensors")
    name = "../secret.txt" if kind == "dotdot" else str(secret)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model-00001.safetensors", "v": name}}))
    with pytest.raises(CheckpointError) as e:
        SafetensorsSource(d)
    msg = str(e.value)
    # (the name is quoted as an excerpt: a long absolute path is cut)
    assert "model.safetensors.index.json" in msg and repr(name)[:40] in msg and "inside" in msg, msg
    _assert_no_bytes_of(msg, secret)


def test_not_a_safetensors_file_shows_no_bytes(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    secret = _secret(d)
    secret.rename(d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        SafetensorsSource(d)
    assert "model.safetensors" in str(e.value)
    _assert_no_bytes_of(str(e.value), d / "model.safetensors")


@pytest.mark.parametrize("what", ["model.safetensors", "config.json"])
def test_symlink_out_of_the_directory(tmp_path, what):
    """A symlink to a file elsewhere is refused (a converter would copy, or load as weights, a file
    the checkpoint's author chose); linking the whole directory in is fine."""
    secret = _secret(tmp_path)
    d = tmp_path / "ckpt"
    shutil.copytree(LLADA_DIR / "model", d)
    (d / what).unlink()
    (d / what).symlink_to(secret)
    with pytest.raises(CheckpointError) as e:
        convert(d, tmp_path / "out")
    assert what in str(e.value) and "outside" in str(e.value), e.value
    _assert_no_bytes_of(str(e.value), secret)
    assert not (tmp_path / "out").exists()
    (tmp_path / "linked").symlink_to(LLADA_DIR / "model", target_is_directory=True)
    assert SafetensorsSource(tmp_path / "linked").tensors()


@pytest.mark.timeout(60)
def test_fifo_shard_is_refused(tmp_path):
    """Only regular files are opened: a FIFO (or device) named by a checkpoint would block or never end."""
    d = tmp_path / "ckpt"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsSource(d)


def test_safetensors_header_over_the_format_limit(tmp_path):
    """The header length is checked against the format's 100 MB limit before the header is read:
    a sparse file claiming a 200 MB header costs nothing."""
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 200_000_000))
        f.truncate(8 + 200_000_000 + 64)  # sparse: no disk, but a reader trusting the header reads 200 MB
    read = []
    real_open = builtins.open

    def spy(file, mode="r", *a, **k):
        handle = real_open(file, mode, *a, **k)
        return _Spy(handle, read) if str(file) == str(path) else handle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builtins, "open", spy)
        with pytest.raises(CheckpointError) as e:
            SafetensorsSource(path)
    assert "100000000" in str(e.value).replace(",", "").replace("_", "") or "100 MB" in str(e.value), e.value
    assert str(path) in str(e.value)
    assert all(n is not None and 0 <= n <= 8 for n in read), f"read {read} bytes before refusing"


class _Spy:
    def __init__(self, handle, log):
        self._h, self._log = handle, log

    def read(self, n=-1):
        self._log.append(n)
        return self._h.read(n)

    def __getattr__(self, name):
        return getattr(self._h, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.close()


def test_weights_root_confines_update_paths(tmp_path):
    """``serve.engine.weight_reading.confine`` (the --weights-root check): paths resolve inside the root or are refused."""
    root = tmp_path / "root"
    (root / "ckpt").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    assert weights.confine(str(root / "ckpt"), str(root)) == (root / "ckpt").resolve()
    assert weights.confine("/anything", None) == Path("/anything")
    for bad in (str(root / "../elsewhere"), "/etc", str(root / "escape/x")):
        with pytest.raises(weights.WeightUpdateFailed, match="weights root") as e:
            weights.confine(bad, str(root))
        assert e.value.bad_checkpoint
    # a layout subdirectory linked out of the root is refused as well (before any file is read)
    step = root / "step_1/policy"
    step.mkdir(parents=True)
    (step / "weights").symlink_to(LLADA_WEIGHTS.absolute(), target_is_directory=True)
    with pytest.raises(weights.WeightUpdateFailed, match="weights root"):
        weights.read(types.SimpleNamespace(config=None), str(root / "step_1"), root=str(root))
