"""The adapter store against a real S3-compatible server (moto's, started here): no mocks."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import boto3
import pytest
from pydantic import ValidationError

from app.adapter_store import AdapterFetchError, AdapterStore, ObjectStoreConfig
from app.adapter_validation import LoraTargets, validate_adapter_dir
from tests.object_store import s3_server

DEMO = "acme-support"  # rank 8, about 0.7 MB
MB = 1 << 20


@pytest.fixture(scope="module")
def endpoint() -> str:
    with s3_server() as url:
        yield url


@pytest.fixture
def s3(endpoint):
    return boto3.client("s3", endpoint_url=endpoint)


@pytest.fixture
def bucket(s3) -> str:
    name = f"adapters-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def demo(builtin) -> Path:
    return builtin.adapter(DEMO)


def upload(s3, bucket: str, prefix: str, directory: Path) -> str:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def store(tmp_path: Path, endpoint: str, max_bytes: int = 64 * MB, **kw) -> AdapterStore:
    return AdapterStore(
        tmp_path / "cache", max_bytes, ObjectStoreConfig(endpoint_url=endpoint), **kw
    )


def entry_count(s: AdapterStore) -> int:
    return len(list((s.cache_dir / "entries").iterdir()))


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    other = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    return names == other and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def test_fetch_downloads_every_object_under_the_prefix(
    tmp_path, endpoint, s3, bucket, demo, builtin
):
    uri = upload(s3, bucket, "acme/support", demo)
    s3.put_object(Bucket=bucket, Key="acme/support-old/adapter_config.json", Body=b"{}")  # sibling
    path = store(tmp_path, endpoint).fetch(uri)
    assert same_files(path, demo)
    targets = LoraTargets.from_model_dir(builtin.model)
    assert validate_adapter_dir(path, targets, max_rank=16, max_bytes=64 * MB).rank == 8
    # A trailing slash names the same prefix, and the same cache entry.
    assert store(tmp_path, endpoint).fetch(uri + "/") == path


def test_nested_objects_keep_their_layout(tmp_path, endpoint, s3, bucket, demo):
    uri = upload(s3, bucket, "nested", demo)
    s3.put_object(Bucket=bucket, Key="nested/docs/README.md", Body=b"hello")
    s3.put_object(Bucket=bucket, Key="nested/docs/", Body=b"")  # a directory marker
    path = store(tmp_path, endpoint).fetch(uri)
    assert (path / "docs" / "README.md").read_bytes() == b"hello"


def test_refetch_hits_the_cache(tmp_path, endpoint, s3, bucket, demo):
    uri = upload(s3, bucket, "a", demo)
    s = store(tmp_path, endpoint)
    first = s.fetch(uri)
    inode = (first / "adapter_model.safetensors").stat().st_ino
    second = store(tmp_path, endpoint).fetch(uri)  # another store on the same cache: a process
    assert second == first and (second / "adapter_model.safetensors").stat().st_ino == inode
    assert entry_count(s) == 1


def test_new_upload_under_the_same_uri_is_a_new_entry(tmp_path, endpoint, s3, bucket, demo):
    uri = upload(s3, bucket, "a", demo)
    s = store(tmp_path, endpoint)
    old = s.fetch(uri)
    config = json.loads((demo / "adapter_config.json").read_text()) | {"lora_alpha": 32}
    s3.put_object(Bucket=bucket, Key="a/adapter_config.json", Body=json.dumps(config).encode())
    new = s.fetch(uri)
    assert new != old
    assert json.loads((new / "adapter_config.json").read_text())["lora_alpha"] == 32
    assert same_files(old, demo)  # the old version is untouched for whoever still reads it


def test_lru_eviction_by_total_bytes(tmp_path, endpoint, s3, bucket, demo):
    size = sum(p.stat().st_size for p in demo.iterdir())
    a, b, c = (upload(s3, bucket, name, demo) for name in "abc")
    s = store(tmp_path, endpoint, max_bytes=int(2.5 * size))
    path_a, path_b = s.fetch(a), s.fetch(b)
    s.fetch(a)  # a is now more recent than b
    path_c = s.fetch(c)
    assert path_a.exists() and path_c.exists() and not path_b.exists()
    assert s.cached_bytes() == 2 * size <= s.max_bytes
    assert s.fetch(b).exists() and not path_a.exists()  # b is back; a was least recent


def test_pinned_uri_survives_eviction_until_unpinned(tmp_path, endpoint, s3, bucket, demo):
    size = sum(p.stat().st_size for p in demo.iterdir())
    a, b, c = (upload(s3, bucket, name, demo) for name in "abc")
    s = store(tmp_path, endpoint, max_bytes=int(2.5 * size))
    s.pin(a)
    path_a = s.fetch(a)
    path_b = s.fetch(b)
    path_c = s.fetch(c)
    assert path_a.exists() and path_c.exists() and not path_b.exists()
    path_b = s.fetch(b)  # a is least recent, but pinned: c goes
    assert path_a.exists() and path_b.exists() and not path_c.exists()
    s.unpin(a)
    s.fetch(c)
    assert not path_a.exists()


def test_pins_of_dead_processes_expire(tmp_path, endpoint, s3, bucket, demo):
    s = store(tmp_path, endpoint)
    (s.cache_dir / "pins.json").write_text(json.dumps({"s3://x/y": [_dead_pid()]}))
    assert s._read_pins() == {}


@pytest.mark.parametrize(
    "key",
    ["../escape", "sub/../../escape", "a\\b.json", "./x.json", "sub//x.json", "we ird.json"],
)
def test_object_keys_with_path_tricks_are_refused(tmp_path, endpoint, s3, bucket, demo, key):
    uri = upload(s3, bucket, "tricky", demo)
    s3.put_object(Bucket=bucket, Key=f"tricky/{key}", Body=b"x")
    s = store(tmp_path, endpoint)
    with pytest.raises(AdapterFetchError, match=f"cannot fetch adapter {uri}: object name"):
        s.fetch(uri)
    assert entry_count(s) == 0 and not list((s.cache_dir / "tmp").iterdir())


def test_too_large_is_refused_before_downloading(tmp_path, endpoint, s3, bucket, demo):
    uri = upload(s3, bucket, "big", demo)
    size = sum(p.stat().st_size for p in demo.iterdir())
    s = store(tmp_path, endpoint, max_adapter_bytes=size - 1)
    with pytest.raises(
        AdapterFetchError, match=f"{size} bytes is more than the limit of {size - 1}"
    ):
        s.fetch(uri)
    assert entry_count(s) == 0 and not list((s.cache_dir / "tmp").iterdir())


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("s3://{bucket}/missing", "no files under it (empty or missing prefix)"),
        ("s3://{bucket}-nope/a", "no such bucket"),
        ("s3://{bucket}", "no prefix: expected s3://bucket/prefix"),
        ("s3://Bad_Bucket/a", "'Bad_Bucket' is not a valid bucket name"),
        ("https://example.com/a", "expected s3://bucket/prefix or an absolute local path"),
        ("relative/dir", "expected s3://bucket/prefix or an absolute local path"),
        ("/nonexistent/adapter", "no such directory"),
    ],
)
def test_bad_uris_are_named(tmp_path, endpoint, bucket, uri, problem):
    uri = uri.format(bucket=bucket)
    with pytest.raises(AdapterFetchError) as caught:
        store(tmp_path, endpoint).fetch(uri)
    assert str(caught.value) == f"cannot fetch adapter {uri}: {problem}"


def test_missing_credentials_are_named_and_nothing_secret_is(
    tmp_path, endpoint, bucket, monkeypatch
):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key)
    with pytest.raises(AdapterFetchError, match="no usable AWS credentials") as caught:
        store(tmp_path, endpoint).fetch(f"s3://{bucket}/a")
    assert secret not in str(caught.value)


def test_unreachable_endpoint_is_named(tmp_path):
    s = AdapterStore(
        tmp_path / "cache", MB, ObjectStoreConfig(endpoint_url=f"http://127.0.0.1:{_free_port()}")
    )
    with pytest.raises(AdapterFetchError, match="cannot reach the object store endpoint"):
        s.fetch("s3://adapters/a")


def test_local_directory_is_copied_and_versioned(tmp_path, demo):
    source = Path(shutil.copytree(demo, tmp_path / "source"))
    s = AdapterStore(tmp_path / "cache", 64 * MB)
    first = s.fetch(str(source))
    assert first != source and same_files(first, source)
    assert s.fetch(str(source)) == first
    (source / "adapter_config.json").write_text("{}")
    second = s.fetch(str(source))
    assert second != first and (second / "adapter_config.json").read_text() == "{}"


def test_local_symlinks_are_refused(tmp_path, demo):
    source = Path(shutil.copytree(demo, tmp_path / "source"))
    (source / "extra.json").symlink_to("/etc/hostname")
    with pytest.raises(AdapterFetchError, match="extra.json is a symlink"):
        AdapterStore(tmp_path / "cache", 64 * MB).fetch(str(source))


def test_object_store_config_holds_nothing_secret():
    with pytest.raises(ValidationError, match="extra"):
        ObjectStoreConfig(endpoint_url="http://localhost:9000", aws_secret_access_key="x")
    with pytest.raises(ValidationError, match="must not carry credentials"):
        ObjectStoreConfig(endpoint_url="http://key:secret@localhost:9000")
    with pytest.raises(ValidationError, match="http"):
        ObjectStoreConfig(endpoint_url="ftp://localhost")


def test_abandoned_downloads_are_cleaned_up(tmp_path):
    stale = tmp_path / "cache" / "tmp" / f"{_dead_pid()}-abc"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    AdapterStore(tmp_path / "cache", MB)
    assert not stale.exists()


def _fetch_in_another_process(cache_dir: str, endpoint: str, uri: str) -> str:
    # Spawned: a fresh interpreter, with the parent's environment (the dummy credentials).
    config = ObjectStoreConfig(endpoint_url=endpoint)
    return str(AdapterStore(Path(cache_dir), 64 * MB, config).fetch(uri))


def test_processes_sharing_the_cache_agree(tmp_path, endpoint, s3, bucket, demo):
    uri = upload(s3, bucket, "shared", demo)
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=context) as pool:
        paths = list(
            pool.map(_fetch_in_another_process, [str(cache)] * 2, [endpoint] * 2, [uri] * 2)
        )
    assert paths[0] == paths[1] and same_files(Path(paths[0]), demo)
    assert len(list((cache / "entries").iterdir())) == 1
    assert not list((cache / "tmp").iterdir())


def _dead_pid() -> int:
    process = multiprocessing.get_context("spawn").Process(target=int)
    process.start()
    process.join()
    return process.pid


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_does_not_trust_the_listing(tmp_path, endpoint, s3, bucket, demo):
    """The limit holds while bytes arrive, and a file longer than listed aborts the download."""
    uri = upload(s3, bucket, "liar", demo)
    s = store(tmp_path, endpoint)
    listing = s._list(uri)
    s.max_adapter_bytes = 1000  # as if the listing had under-reported the sizes
    with pytest.raises(AdapterFetchError, match="more than the limit of 1000 bytes"):
        s._download(uri, listing, tmp_path / "one")
    s.max_adapter_bytes = s.max_bytes
    shrunk = [dataclasses.replace(f, size=f.size - 1) for f in listing]
    with pytest.raises(AdapterFetchError, match="changed while downloading"):
        s._download(uri, shrunk, tmp_path / "two")


def test_an_upload_during_the_download_is_not_mixed_in(tmp_path, endpoint, s3, bucket, demo):
    uri = upload(s3, bucket, "racing", demo)
    s = store(tmp_path, endpoint)
    listing = s._list(uri)
    s3.put_object(Bucket=bucket, Key="racing/adapter_model.safetensors", Body=b"new version")
    with pytest.raises(AdapterFetchError, match=f"{uri}: changed while downloading; fetch again"):
        s._download(uri, listing, tmp_path / "mixed")
