"""Adapters onto a node's local disk: from an S3-compatible object store or a local directory.

A local path on one node does not exist on another, so in a multi-node cluster adapters live in
the object store and every node keeps a local disk cache of the ones it serves (the third tier,
below accelerator slots and the CPU cache). `AdapterStore.fetch(uri)` returns a local directory
holding an immutable snapshot of the adapter's files:

- The cache key is the sha256 of the uri and its listing (relative name, ETag or mtime, size), so
  a new upload under the same uri is a new entry: a replacement never mixes old and new files,
  and the old entry stays intact for whoever still reads it until LRU eviction.
- Downloads go to a temporary directory inside the cache directory (same filesystem) and are
  renamed into place atomically; a crashed download leaves no entry that looks complete.
- Several processes on one node may share the cache directory: an fcntl lock serialises the
  bookkeeping (entries, LRU times, pins, eviction); downloads themselves run outside the lock.
- Eviction is LRU by total bytes, down to `max_bytes`; the newest entry of a pinned uri stays.
- Object keys with path tricks (`..`, absolute, backslashes, odd characters) are refused, and
  the size limit is enforced from the listing before downloading and again while downloading.

Credentials come only from the standard AWS chain (environment, shared files, instance role),
never from config; error messages name the uri and the problem (an S3 error code at most), never
a credential. Validation of the files is `app.adapter_validation`'s job, after fetch.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, field_validator

# One path component of an adapter file: the same rule as adapter validation's file names.
SAFE_COMPONENT = re.compile(r"(?!\.\.?$)[A-Za-z0-9._+-]{1,255}")
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_OBJECTS = 1000
_CHUNK = 1 << 20
_AUTH_ERRORS = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}


class AdapterFetchError(RuntimeError):
    """An adapter could not be fetched; the message names the uri and the problem."""

    def __init__(self, uri: str, problem: str):
        super().__init__(f"cannot fetch adapter {uri}: {problem}")
        self.uri = uri
        self.problem = problem


class ObjectStoreConfig(BaseModel):
    """Where the S3-compatible store is. Nothing secret: credentials come from the standard AWS
    chain (AWS_ACCESS_KEY_ID/..., ~/.aws, an instance or pod role)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None  # MinIO, moto, ...; None: AWS S3
    region: str | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _plain_http_url(cls, url: str | None) -> str | None:
        if url is None:
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("endpoint_url must be an http(s) URL")
        if parts.username or parts.password:
            raise ValueError("endpoint_url must not carry credentials")
        return url


@dataclass(frozen=True)
class _SourceFile:
    name: str  # relative path inside the adapter, validated
    size: int
    version: str  # ETag (S3) or mtime in ns (local): a changed file changes the cache key
    source: str  # S3 object key, or absolute local path


class AdapterStore:
    """A node-local disk cache of adapter directories, shared by the processes of one node."""

    def __init__(
        self,
        cache_dir: Path,
        max_bytes: int,
        object_store: ObjectStoreConfig | None = None,
        *,
        max_adapter_bytes: int | None = None,
    ):
        """`max_bytes`: the cache's total size, kept by LRU eviction. `max_adapter_bytes`: the
        largest adapter fetched at all (default `max_bytes`: one adapter must fit the cache)."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        limit = max_bytes if max_adapter_bytes is None else max_adapter_bytes
        self.max_adapter_bytes = min(limit, max_bytes)
        self.object_store = object_store or ObjectStoreConfig()
        self._entries = self.cache_dir / "entries"
        self._tmp = self.cache_dir / "tmp"
        self._pins_file = self.cache_dir / "pins.json"
        self._client = None
        for d in (self._entries, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._remove_abandoned_downloads()

    # --- public -------------------------------------------------------------------------------

    def fetch(self, uri: str) -> Path:
        """The local directory of the adapter at `uri` (`s3://bucket/prefix` or an absolute local
        directory), downloaded if this exact version is not cached yet."""
        files = self._list(uri)
        key = _entry_key(_canonical(uri), files)
        entry = self._entries / key
        with self._locked():
            if (entry / "meta.json").is_file():
                self._touch(entry)
                return entry / "adapter"
        staged = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self._tmp))
        try:
            size = self._download(uri, files, staged / "adapter")
            _write_json(staged / "meta.json", {"uri": _canonical(uri), "bytes": size})
            with self._locked():
                try:
                    os.rename(staged, entry)
                except OSError as e:  # another process put the same version there first
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                self._touch(entry)
                self._evict(keep=entry)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return entry / "adapter"

    def pin(self, uri: str) -> None:
        """Keep the newest cached version of `uri` through eviction, for as long as this process
        lives or until `unpin`. Pins are per process, so one process's unpin leaves others'."""
        uri = _canonical(uri)
        with self._locked():
            pins = self._read_pins()
            holders = set(pins.get(uri, [])) | {os.getpid()}
            pins[uri] = sorted(holders)
            _write_json_atomic(self._pins_file, pins)

    def unpin(self, uri: str) -> None:
        uri = _canonical(uri)
        with self._locked():
            pins = self._read_pins()
            holders = [pid for pid in pins.get(uri, []) if pid != os.getpid()]
            if holders:
                pins[uri] = holders
            else:
                pins.pop(uri, None)
            _write_json_atomic(self._pins_file, pins)
            self._evict(keep=None)

    def cached_bytes(self) -> int:
        with self._locked():
            return sum(meta["bytes"] for _, meta, _ in self._scan())

    # --- listing ------------------------------------------------------------------------------

    def _list(self, uri: str) -> list[_SourceFile]:
        if uri.startswith("s3://"):
            files = self._list_s3(uri)
        elif os.path.isabs(uri) and "://" not in uri:
            files = _list_local(uri)
        else:
            raise AdapterFetchError(uri, "expected s3://bucket/prefix or an absolute local path")
        if not files:
            raise AdapterFetchError(uri, "no files under it (empty or missing prefix)")
        total = sum(f.size for f in files)
        if total > self.max_adapter_bytes:
            raise AdapterFetchError(
                uri, f"{total} bytes is more than the limit of {self.max_adapter_bytes}"
            )
        return files

    def _list_s3(self, uri: str) -> list[_SourceFile]:
        bucket, prefix = _split_s3_uri(uri)
        files = []
        with _s3_errors(uri):
            pages = (
                self._s3()
                .get_paginator("list_objects_v2")
                .paginate(Bucket=bucket, Prefix=prefix + "/")
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix) + 1 :]
                    if name.endswith("/") and obj["Size"] == 0:
                        continue  # a "directory" marker some tools create
                    _check_relative_name(uri, name)
                    files.append(_SourceFile(name, obj["Size"], obj["ETag"], obj["Key"]))
                    if len(files) > MAX_OBJECTS:
                        raise AdapterFetchError(uri, f"more than {MAX_OBJECTS} objects")
        return sorted(files, key=lambda f: f.name)

    def _s3(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.object_store.endpoint_url,
                region_name=self.object_store.region,
                config=Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3}),
            )
        return self._client

    # --- download -----------------------------------------------------------------------------

    def _download(self, uri: str, files: list[_SourceFile], target: Path) -> int:
        """Copy every listed file; a file larger than listed, or changed since listing, aborts
        (a download never trusts the listing's sizes alone)."""
        total = 0
        for f in files:
            path = target / f.name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as out, closing(self._chunks(uri, f)) as chunks:
                for chunk in chunks:
                    total += len(chunk)
                    if total > self.max_adapter_bytes:
                        raise AdapterFetchError(
                            uri, f"more than the limit of {self.max_adapter_bytes} bytes"
                        )
                    out.write(chunk)
                written = out.tell()
            if written != f.size:
                raise AdapterFetchError(
                    uri, f"{f.name} changed while downloading ({written} bytes, {f.size} listed)"
                )
        return total

    def _chunks(self, uri: str, f: _SourceFile) -> Iterator[bytes]:
        if uri.startswith("s3://"):
            bucket, _ = _split_s3_uri(uri)
            with _s3_errors(uri):
                body = self._s3().get_object(Bucket=bucket, Key=f.source, IfMatch=f.version)["Body"]
                try:
                    while chunk := body.read(_CHUNK):
                        yield chunk
                finally:
                    body.close()
        else:
            with open(f.source, "rb") as src:
                if os.fstat(src.fileno()).st_mtime_ns != int(f.version):
                    raise AdapterFetchError(uri, f"{f.name} changed while copying")
                while chunk := src.read(_CHUNK):
                    yield chunk

    # --- bookkeeping (under the lock) ---------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.cache_dir / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _touch(self, entry: Path) -> None:
        os.utime(entry / "meta.json", ns=(time.time_ns(), time.time_ns()))

    def _scan(self) -> list[tuple[Path, dict, int]]:
        """(entry, meta, last used in ns) of every complete entry."""
        found = []
        for entry in self._entries.iterdir():
            try:
                meta_path = entry / "meta.json"
                found.append(
                    (entry, json.loads(meta_path.read_text()), meta_path.stat().st_mtime_ns)
                )
            except (OSError, ValueError):
                continue
        return found

    def _evict(self, keep: Path | None) -> None:
        entries = sorted(self._scan(), key=lambda e: e[2])  # least recently used first
        pinned_uris = set(self._read_pins())
        newest_of_pinned = {}
        for entry, meta, _ in entries:
            if meta["uri"] in pinned_uris:
                newest_of_pinned[meta["uri"]] = entry  # sorted: the last one is the newest
        protected = set(newest_of_pinned.values()) | {keep}
        total = sum(meta["bytes"] for _, meta, _ in entries)
        for entry, meta, _ in entries:
            if total <= self.max_bytes:
                break
            if entry in protected:
                continue
            doomed = self._tmp / f"evicted-{entry.name}-{time.time_ns()}"
            os.rename(entry, doomed)  # out of sight first: never a half-deleted entry
            shutil.rmtree(doomed, ignore_errors=True)
            total -= meta["bytes"]

    def _read_pins(self) -> dict[str, list[int]]:
        """Pins of live processes only: a crashed process's pins expire with it."""
        try:
            pins = json.loads(self._pins_file.read_text())
        except (OSError, ValueError):
            return {}
        live = {uri: [p for p in pids if _alive(p)] for uri, pids in pins.items()}
        return {uri: pids for uri, pids in live.items() if pids}

    def _remove_abandoned_downloads(self) -> None:
        for d in self._tmp.iterdir():
            pid = d.name.split("-", 1)[0]
            if d.name.startswith("evicted-") or not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


# --- helpers ----------------------------------------------------------------------------------


def _entry_key(uri: str, files: list[_SourceFile]) -> str:
    listing = [(f.name, f.version, f.size) for f in files]
    return hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()


def _canonical(uri: str) -> str:
    """One spelling per location (`s3://b/p/` is `s3://b/p`), for cache keys and pins."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return f"s3://{bucket}/{prefix.rstrip('/')}"
    return os.path.normpath(uri) if os.path.isabs(uri) else uri


def _split_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.rstrip("/")
    if not BUCKET_NAME.fullmatch(bucket):
        raise AdapterFetchError(uri, f"{bucket!r} is not a valid bucket name")
    if not prefix:
        raise AdapterFetchError(uri, "no prefix: expected s3://bucket/prefix")
    return bucket, prefix


def _check_relative_name(uri: str, name: str) -> None:
    if name.startswith("/") or "\\" in name:
        raise AdapterFetchError(uri, f"object name {name!r} is absolute or has a backslash")
    for part in name.split("/"):
        if not SAFE_COMPONENT.fullmatch(part):
            raise AdapterFetchError(
                uri,
                f"object name {name!r}: each path part must be letters, digits or ._+- "
                "and not '.' or '..'",
            )


def _list_local(uri: str) -> list[_SourceFile]:
    root = Path(uri)
    try:
        if not stat.S_ISDIR(os.lstat(root).st_mode):
            raise AdapterFetchError(uri, "not a directory (symlinks are not followed)")
    except FileNotFoundError:
        raise AdapterFetchError(uri, "no such directory") from None
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            _check_relative_name(uri, rel)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise AdapterFetchError(uri, f"{rel} is a symlink")
            if name in filenames:
                if not stat.S_ISREG(st.st_mode):
                    raise AdapterFetchError(uri, f"{rel} is not a regular file")
                files.append(_SourceFile(rel, st.st_size, str(st.st_mtime_ns), str(full)))
        if len(files) > MAX_OBJECTS:
            raise AdapterFetchError(uri, f"more than {MAX_OBJECTS} files")
    return sorted(files, key=lambda f: f.name)


@contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """botocore errors as AdapterFetchError naming the uri and the S3 error code only: botocore's
    own messages may quote request details, which stay out of our errors and logs."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    try:
        yield
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", "unknown"))
        if code == "NoSuchBucket":
            raise AdapterFetchError(uri, "no such bucket") from None
        if code in ("NoSuchKey", "404"):
            raise AdapterFetchError(uri, "an object disappeared while downloading") from None
        if code in ("PreconditionFailed", "412"):
            raise AdapterFetchError(uri, "changed while downloading; fetch again") from None
        if code in _AUTH_ERRORS or code == "403":
            raise AdapterFetchError(uri, f"access denied by the object store ({code})") from None
        raise AdapterFetchError(uri, f"object store error {code}") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise AdapterFetchError(uri, "no usable AWS credentials in the environment") from None
    except EndpointConnectionError:
        raise AdapterFetchError(uri, "cannot reach the object store endpoint") from None
    except BotoCoreError as e:
        raise AdapterFetchError(uri, f"object store client error ({type(e).__name__})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, sort_keys=True) + "\n")


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    _write_json(tmp, obj)
    os.replace(tmp, path)
