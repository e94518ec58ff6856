"""jobs.manifest: the worker writes it next to the adapter, the client verifies the fetched copy."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from jobs.manifest import ManifestError, verify_manifest, write_manifest


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "adapter"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"\x00weights" * 1000)
    (d / "adapter_config.json").write_text('{"r": 16}')
    (d / "sub" / "nested.txt").write_text("x")
    return d


def test_round_trip(folder):
    sha = write_manifest(folder)
    assert sha == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert verify_manifest(folder) == sha
    assert verify_manifest(folder, expected_sha256=sha) == sha
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    assert [f["path"] for f in listed] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "sub/nested.txt",
    ]
    assert listed[1]["size"] == 8000


def test_same_content_same_digest(folder, tmp_path):
    sha = write_manifest(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "manifest.json").unlink()
    assert write_manifest(copy) == sha


def test_every_difference_is_named(folder):
    sha = write_manifest(folder)
    (folder / "adapter_config.json").write_text('{"r": 32}')  # same size, other bytes
    (folder / "sub" / "nested.txt").unlink()
    (folder / "extra.bin").write_bytes(b"?")
    with pytest.raises(ManifestError) as info:
        verify_manifest(folder)
    message = str(info.value)
    assert "adapter_config.json: sha256 differs" in message
    assert "sub/nested.txt: missing" in message
    assert "extra.bin: not in the manifest" in message
    with pytest.raises(ManifestError, match="expected"):
        verify_manifest(folder, expected_sha256="0" * 64)
    assert sha


def test_truncated_file_and_missing_manifest(folder):
    write_manifest(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights")
    with pytest.raises(ManifestError, match="size 8, expected 8000"):
        verify_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="missing"):
        verify_manifest(folder)
