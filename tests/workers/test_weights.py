"""workers.weights: finding weight files, checking their hashes, and loading them without running pickled code."""

from __future__ import annotations

import hashlib
import io
import os
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from schemas.specs import ModelSpec, StorageOptions
from tests.support import write_torchvision_weights
from workers.io.storage import open_storage
from workers.models import build_model
from workers.weights import (
    WEIGHTS_DIR_ENV,
    WeightsError,
    fetch_location,
    find_named,
    load_state_dict,
    search_dirs,
    verify_hash,
)


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4), "steps": torch.tensor(7)}


def _save_hashed(state: dict, folder: Path, stem: str = "x") -> Path:
    """`state` saved as `<stem>-<sha256[:8]>.pth`, the way torchvision names its files."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    return path


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ verify_hash


def test_verify_hash_accepts_matching_prefix(tmp_path):
    path = _save_hashed(_state(), tmp_path)
    verify_hash(path)  # no error
    full = hashlib.sha256(path.read_bytes()).hexdigest()
    longer = path.with_name(f"x-{full[:16]}.pth")
    path.rename(longer)
    verify_hash(longer)


@pytest.mark.fault(
    fault="a weight file whose content does not match the hash in its name",
    injected="a torchvision-style `<arch>-<sha256 prefix>.pth` file with changed bytes",
    expected="refused with both hashes named; nothing loaded",
)
def test_verify_hash_refuses_changed_content(tmp_path, record_property):
    path = _save_hashed(_state(), tmp_path)
    expected = path.stem.rsplit("-", 1)[1]
    path.write_bytes(path.read_bytes() + b"tampered")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    with pytest.raises(WeightsError) as info:
        verify_hash(path)
    assert expected in str(info.value) and actual in str(info.value)
    with pytest.raises(WeightsError, match="sha256"):
        load_state_dict(path)  # loading checks the hash too
    record_property("measured", f"WeightsError naming {expected} (name) and {actual} (content)")


@pytest.mark.parametrize("name", ["weights.pth", "resnet50-final.pth", "model.safetensors", "model-v2.pt"])
def test_verify_hash_ignores_names_without_hash(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"anything at all")
    verify_hash(path)  # not checked, so no error


# -------------------------------------------------------------------------------------------- load_state_dict


class _RunsCode:
    """Unpickling this runs a shell command (as a malicious checkpoint would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.fault(
    fault="weights that are a pickle with code",
    injected="a checkpoint whose __reduce__ runs a shell command",
    expected="refused by weights_only=True; the command never runs",
)
def test_load_refuses_pickled_code(tmp_path, record_property):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"layer.weight": torch.zeros(2), "payload": _RunsCode(marker)}, path)
    assert not marker.exists()

    with pytest.raises(WeightsError, match="refused to load"):
        load_state_dict(path)
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it. (Proves the check above is not vacuous.)
    torch.load(path, weights_only=False)
    assert marker.exists()
    record_property("measured", "WeightsError, payload not run; the same file run by an unsafe load (control)")


def test_load_torch_state_dict_and_wrapped(tmp_path):
    state = _state()
    _assert_same(load_state_dict(_save_hashed(state, tmp_path / "plain")), state)
    _assert_same(load_state_dict(_save_hashed({"state_dict": state, "epoch": 3}, tmp_path / "wrapped")), state)


def test_load_refuses_non_tensor_mapping(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="mapping of parameter names to tensors"):
        load_state_dict(path)


def test_safetensors_roundtrip(tmp_path):
    state = {k: v.contiguous() for k, v in _state().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    _assert_same(load_state_dict(path), state)

    hashed = tmp_path / f"model-{hashlib.sha256(path.read_bytes()).hexdigest()[:10]}.safetensors"
    path.rename(hashed)
    _assert_same(load_state_dict(hashed), state)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    path = write_torchvision_weights("resnet18", tmp_path)
    spec = ModelSpec(name="resnet50", weights=str(path))
    with pytest.raises(WeightsError, match="does not fit resnet50"):
        build_model(spec, StorageOptions(), tmp_path / "cache")


# ----------------------------------------------------------------------------------------------- find_named


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Separate spec weights_dir, $BULKLABEL_WEIGHTS_DIR and torch hub dir, all empty; hub dir patched in."""
    spec_dir, env_dir, hub_dir = tmp_path / "spec", tmp_path / "env", tmp_path / "hub"
    for folder in (spec_dir, env_dir, hub_dir / "checkpoints"):
        folder.mkdir(parents=True)
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(env_dir))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    return spec_dir, env_dir, hub_dir / "checkpoints"


UNREACHABLE = "http://127.0.0.1:9/x-deadbeef.pth"


def test_find_named_search_order(dirs):
    spec_dir, env_dir, hub_dir = dirs
    spec = ModelSpec(name="resnet18", weights="IMAGENET1K_V1", weights_dir=str(spec_dir))
    assert search_dirs(spec) == [spec_dir, env_dir, hub_dir]
    for folder in (hub_dir, env_dir, spec_dir):
        (folder / "x-deadbeef.pth").write_bytes(folder.name.encode())

    assert find_named("x-deadbeef.pth", UNREACHABLE, spec) == spec_dir / "x-deadbeef.pth"
    (spec_dir / "x-deadbeef.pth").unlink()
    assert find_named("x-deadbeef.pth", UNREACHABLE, spec) == env_dir / "x-deadbeef.pth"
    (env_dir / "x-deadbeef.pth").unlink()
    assert find_named("x-deadbeef.pth", UNREACHABLE, spec) == hub_dir / "x-deadbeef.pth"


def test_find_named_without_spec_dir_uses_env(dirs):
    _, env_dir, _ = dirs
    (env_dir / "x-deadbeef.pth").write_bytes(b"")
    assert find_named("x-deadbeef.pth", UNREACHABLE, ModelSpec(name="resnet18")) == env_dir / "x-deadbeef.pth"


def test_find_named_missing_and_unreachable(dirs):
    spec_dir, env_dir, hub_dir = dirs
    spec = ModelSpec(name="resnet18", weights="IMAGENET1K_V1", weights_dir=str(spec_dir))
    with pytest.raises(WeightsError) as info:
        find_named("x-deadbeef.pth", UNREACHABLE, spec)
    message = str(info.value)
    for folder in (spec_dir, env_dir, hub_dir):
        assert str(folder) in message
    assert "BULKLABEL_WEIGHTS_DIR" in message and UNREACHABLE in message
    assert not (hub_dir / "x-deadbeef.pth").exists()


def test_named_weights_in_weights_dir_are_hash_checked(dirs, tmp_path):
    """A file with torchvision's official name but other content is refused, wherever it was found."""
    spec_dir, _, _ = dirs
    generated = write_torchvision_weights("resnet18", tmp_path / "gen")
    official = "resnet18-f37072fd.pth"  # ResNet18_Weights.IMAGENET1K_V1's file name
    generated.rename(spec_dir / official)
    spec = ModelSpec(name="resnet18", weights="IMAGENET1K_V1", weights_dir=str(spec_dir))
    with pytest.raises(WeightsError, match="f37072fd"):
        build_model(spec, StorageOptions(), tmp_path / "cache")


# -------------------------------------------------------------------------------------------- fetch_location


def test_fetch_location_local(tmp_path, monkeypatch):
    path = _save_hashed(_state(), tmp_path / "w")
    assert fetch_location(str(path), StorageOptions(), tmp_path / "cache") == path
    monkeypatch.chdir(tmp_path)
    assert fetch_location(f"w/{path.name}", StorageOptions(), tmp_path / "cache") == path
    assert not (tmp_path / "cache").exists()  # local files are used in place


def test_fetch_location_missing(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        fetch_location(str(tmp_path / "nope.pth"), StorageOptions(), tmp_path / "cache")
    with pytest.raises(WeightsError, match="does not exist"):
        fetch_location(str(tmp_path), StorageOptions(), tmp_path / "cache")  # a folder is not a weights file


def test_fetch_location_s3(s3_server, s3_prefix, tmp_path):
    options = s3_server.options()
    storage = open_storage(s3_prefix, options)
    cache = tmp_path / "cache"

    good = _save_hashed(_state(), tmp_path / "local")
    good_uri = f"{s3_prefix}/weights/{good.name}"
    storage.upload_file(str(good), good_uri)
    fetched = fetch_location(good_uri, options, cache)
    assert fetched.name == good.name and fetched.is_relative_to(cache)
    assert fetched.read_bytes() == good.read_bytes()
    _assert_same(load_state_dict(fetched), _state())
    assert not list(cache.rglob("*.part"))
    # Downloaded once: a second fetch uses the cached copy.
    storage.delete(good_uri)
    assert fetch_location(good_uri, options, cache) == fetched

    # The hash in the name still applies to a file that came from S3.
    bad_uri = f"{s3_prefix}/weights/x-deadbeef.pth"
    storage.write_bytes(bad_uri, good.read_bytes())
    with pytest.raises(WeightsError, match="deadbeef"):
        load_state_dict(fetch_location(bad_uri, options, cache))

    # End to end: a model built from weights given as an s3:// URI.
    model_file = write_torchvision_weights("mobilenet_v3_small", tmp_path / "model")
    model_uri = f"{s3_prefix}/models/{model_file.name}"
    storage.upload_file(str(model_file), model_uri)
    loaded = build_model(ModelSpec(name="mobilenet_v3_small", weights=model_uri), options, cache)
    assert loaded.model_id == f"mobilenet_v3_small:{model_file.name}"
    assert loaded.embedding_dim == 1024
