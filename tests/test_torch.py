"""Plain torch.save / torch.load through the mount, including a 1 GiB checkpoint."""

from __future__ import annotations

import hashlib
import time

import pytest

torch = pytest.importorskip("torch")

from conftest import list_keys  # noqa: E402

GiB = 1 << 30


def state_dict(total_bytes: int, tensor_bytes: int = 4 << 20, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    count = max(1, total_bytes // tensor_bytes)
    numel = tensor_bytes // 4
    return {f"layer{i}.weight": torch.randn(numel, generator=generator) for i in range(count)}


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def sha256_stream(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def test_save_and_load_small_checkpoint(mnt, s3, mount_factory):
    state = {"model": state_dict(8 << 20), "step": 10, "lr": 1e-3}
    torch.save(state, mnt.path / "step_10.pt")
    loaded = torch.load(mnt.path / "step_10.pt", weights_only=True)
    assert_equal_states(state["model"], loaded["model"])
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("")) == [mnt.key("step_10.pt")]
    mnt.remount(cache_dir=mount_factory.fresh_dir("cache"))
    loaded = torch.load(mnt.path / "step_10.pt", weights_only=True)
    assert_equal_states(state["model"], loaded["model"])
    assert loaded["step"] == 10
    mapped = torch.load(mnt.path / "step_10.pt", mmap=True, weights_only=True)
    assert_equal_states(state["model"], mapped["model"])


def test_one_gib_checkpoint_round_trip(mnt, s3, mount_factory, tmp_path):
    """1 GiB torch.save through the mount: S3 holds exactly the bytes the mount shows,
    and a fresh mount with an empty cache loads equal tensors."""
    state = state_dict(GiB)
    local = tmp_path / "local.pt"
    started = time.perf_counter()
    torch.save(state, local)
    local_seconds = time.perf_counter() - started
    local.unlink()

    started = time.perf_counter()
    torch.save(state, mnt.path / "big.pt")
    mount_seconds = time.perf_counter() - started
    mnt.sync()
    durable_seconds = time.perf_counter() - started
    print(f"\n1 GiB torch.save: local disk {local_seconds:.2f}s, through the mount {mount_seconds:.2f}s "
          f"(durable in S3 after {durable_seconds:.2f}s)")

    body = s3.get_object(Bucket=mnt.bucket, Key=mnt.key("big.pt"))["Body"]
    in_s3 = sha256_stream(body.iter_chunks(8 << 20))
    with open(mnt.path / "big.pt", "rb") as f:
        through_mount = sha256_stream(iter(lambda: f.read(8 << 20), b""))
    assert in_s3 == through_mount
    assert s3.list_multipart_uploads(Bucket=mnt.bucket).get("Uploads", []) == []

    mnt.remount(cache_dir=mount_factory.fresh_dir("cache"))
    started = time.perf_counter()
    loaded = torch.load(mnt.path / "big.pt", weights_only=True)
    print(f"1 GiB torch.load from a fresh mount (empty cache): {time.perf_counter() - started:.2f}s")
    assert_equal_states(state, loaded)
