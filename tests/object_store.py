"""A real S3-compatible server for tests: moto's standalone server on a free local port.

    with s3_server() as endpoint_url:
        boto3.client("s3", endpoint_url=endpoint_url).create_bucket(Bucket="adapters")

For the duration, the process environment holds dummy AWS credentials and a region, and no
shared credential or config files are read, so nothing reaches a real AWS account and the code
under test finds its credentials the standard way (the environment chain), as in production.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Settings that would point boto3 somewhere else than the test server.
_CLEARED = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE")


@contextmanager
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port), yield its endpoint URL, stop it."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in (*DUMMY_AWS_ENV, *_CLEARED)}
    os.environ.update(DUMMY_AWS_ENV)
    for key in _CLEARED:
        os.environ.pop(key, None)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def upload_directory(client, bucket: str, prefix: str, directory: Path) -> None:
    """Every file of `directory` to s3://bucket/prefix/<name> (`client`: a boto3 S3 client)."""
    for f in Path(directory).iterdir():
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
