from __future__ import annotations

import shutil

import pytest

from app.tenancy import hash_api_key
from tests.integration.app_under_test import app_args, running_app
from tests.object_store import DUMMY_AWS_ENV, s3_server, upload_directory
from tests.tenancy.admin_client import ADMIN_KEY, BUCKET, S3_ADAPTERS


@pytest.fixture(scope="package")
def s3(builtin, tmp_path_factory):
    """moto's S3 server with the demo adapters uploaded (and one broken copy)."""
    import boto3

    with s3_server() as endpoint_url:
        client = boto3.client("s3", endpoint_url=endpoint_url)
        client.create_bucket(Bucket=BUCKET)
        for prefix, demo in S3_ADAPTERS.items():
            upload_directory(client, BUCKET, prefix, builtin.adapter(demo))
        # A pickled checkpoint beside valid files: must be refused without being opened.
        broken = tmp_path_factory.mktemp("broken")
        shutil.copytree(builtin.adapter("acme-support"), broken / "a")
        (broken / "a" / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
        upload_directory(client, BUCKET, "pickled", broken / "a")
        yield endpoint_url


@pytest.fixture(scope="package")
def server(s3, tmp_path_factory):
    """The app with 2 ingress replicas (limits must hold across them), 1 engine replica, the
    admin API on, adapters from the S3 server, a fresh registry file."""
    state = tmp_path_factory.mktemp("state")
    args = app_args()
    args["ingress"] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}
    args["deployment"]["num_replicas"] = 1
    args["deployment"]["env_vars"] = DUMMY_AWS_ENV
    args["admin"] = {"api_key_sha256": [hash_api_key(ADMIN_KEY)]}
    args["registry"] = {"path": str(state / "registry.sqlite")}
    args["adapter_storage"] = {
        "cache_dir": str(state / "adapters"),
        "object_store": {"endpoint_url": s3},
    }
    with running_app(args):
        yield state
