"""Where inputs are read from: an object store and its credentials, kept as secrets.

    ObjectStorage(endpoint_url="https://minio.internal:9000", access_key_id="…",
                  secret_access_key="…").save("lake")

then run with `--param storage=lake` and an `s3://bucket/key.jsonl` input. The secret is
stored encrypted by Prefect, shown as `********` in the UI, and never written to logs,
artifacts or reports.
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
