"""Where inputs are read from: an object store and its credentials, kept as secrets.

    ObjectStorage(endpoint_url="https://minio.internal:9000", access_key_id="…",
                  secret_access_key="…").save("lake")

then run with `--param storage=lake` and an `s3://bucket/key.jsonl` input. The secret is
stored encrypted by Prefect, shown as `********` in the UI, and never written to logs,
artifacts or reports.

A team that already holds prefect-aws blocks names one of them instead, by its type and name:
`storage=aws-credentials/prod` (an `AwsCredentials` block), `storage=s3-bucket/lake` (an
`S3Bucket`: its credentials, `AwsCredentials` or `MinIOCredentials`) — the same credentials
reach s3fs. Nightshift's own block stays for what the standard ones do not hold in one place:
an S3-compatible endpoint with its keys and session token, no AWS profile or role involved.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class ObjectStorage(Block):
    """Credentials and endpoint of an S3-compatible object store (AWS S3, MinIO, R2, GCS interop)."""

    _block_type_name = "Nightshift Object Storage"
    _block_type_slug = "nightshift-object-storage"

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; empty for AWS S3")
    region: str | None = Field(None, description="bucket region")
    access_key_id: SecretStr | None = Field(None, description="empty: the machine's own credentials (IAM role, env)")
    secret_access_key: SecretStr | None = Field(None, description="secret key")
    session_token: SecretStr | None = Field(None, description="temporary credentials' token")

    def storage_options(self) -> dict:
        """fsspec/s3fs keyword arguments."""
        options: dict = {}
        if self.access_key_id:
            options["key"] = self.access_key_id.get_secret_value()
        if self.secret_access_key:
            options["secret"] = self.secret_access_key.get_secret_value()
        if self.session_token:
            options["token"] = self.session_token.get_secret_value()
        client_kwargs = {k: v for k, v in {"endpoint_url": self.endpoint_url, "region_name": self.region}.items() if v}
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options


def storage_options_of(name: str) -> dict:
    """fsspec/s3fs keyword arguments from the block `name`: an ObjectStorage block by its name,
    or any block by "type-slug/name" — ObjectStorage, prefect-aws's AwsCredentials,
    MinIOCredentials or S3Bucket (its credentials)."""
    if "/" not in name:
        return ObjectStorage.load(name).storage_options()
    block = Block.load(name)
    if isinstance(block, ObjectStorage):
        return block.storage_options()
    from prefect_aws import AwsCredentials, MinIOCredentials, S3Bucket

    if isinstance(block, S3Bucket):
        block = block.credentials
    if isinstance(block, AwsCredentials):
        return _options(block.aws_access_key_id, block.aws_secret_access_key, block.aws_session_token,
                        block.region_name, block.aws_client_parameters, block.profile_name)  # fmt: skip
    if isinstance(block, MinIOCredentials):
        return _options(block.minio_root_user, block.minio_root_password, None, block.region_name,
                        block.aws_client_parameters)  # fmt: skip
    raise ValueError(
        f"storage block {name!r} is a {type(block).__name__}: give an ObjectStorage, AwsCredentials, "
        "MinIOCredentials or S3Bucket block"
    )


def _options(key, secret, token, region, client_parameters, profile=None) -> dict:
    def revealed(value):
        return value.get_secret_value() if isinstance(value, SecretStr) else value

    options = {k: v for k, v in {"key": revealed(key), "secret": revealed(secret), "token": revealed(token),
               "profile": profile}.items() if v}  # fmt: skip
    endpoint = getattr(client_parameters, "endpoint_url", None) if client_parameters else None
    client_kwargs = {k: v for k, v in {"endpoint_url": endpoint, "region_name": region}.items() if v}
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options
