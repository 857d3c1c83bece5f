"""An `s3://` input read through a storage block — Nightshift's ObjectStorage, or the prefect-aws
S3Bucket a team already holds — against a real S3-compatible server (moto's), with credentials
that must not leak into any file, parameter or log."""

from __future__ import annotations

import uuid

import pytest
from conftest import chat_request, read_jsonl, write_jsonl


def saved_storage_block(kind: str, endpoint: str, key: str, secret: str) -> str:
    """The block a run names as `storage`, saved on the session's server."""
    if kind == "ObjectStorage":
        from nightshift.blocks import ObjectStorage

        ObjectStorage(endpoint_url=endpoint, access_key_id=key, secret_access_key=secret).save(
            "lake-test", overwrite=True
        )
        return "lake-test"
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    credentials = AwsCredentials(
        aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint),
    )  # fmt: skip
    S3Bucket(bucket_name="corpus", credentials=credentials).save("lake-test", overwrite=True)
    return "s3-bucket/lake-test"


@pytest.mark.parametrize("kind", ["ObjectStorage", "prefect-aws S3Bucket"])
def test_an_s3_input_runs_with_the_blocks_credentials_which_leak_nowhere(
    kind, prefect_server, s3_endpoint, tiny_job, tmp_path
):
    import s3fs
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    from nightshift.blocks.storage import storage_options_of
    from nightshift.config import CanaryConfig
    from nightshift.flows.batch import batch_inference

    key, secret = "nightshift-test", f"s3cr3t-{uuid.uuid4().hex}"
    storage = saved_storage_block(kind, s3_endpoint, key, secret)
    bucket = s3fs.S3FileSystem(**storage_options_of(storage))
    bucket.makedirs("corpus", exist_ok=True)
    local = write_jsonl(
        tmp_path / "requests.jsonl", [chat_request(f"doc-{i}", f"Summarize item {i}.") for i in range(6)]
    )
    bucket.put(str(local), "corpus/2026-11-22.jsonl")

    run_dir = tmp_path / "run"
    state = batch_inference(
        input_path="s3://corpus/2026-11-22.jsonl",
        run_dir=str(run_dir),
        job=tiny_job,
        storage=storage,
        shard_size=4,
        validation=CanaryConfig(oracle_samples=0, determinism_samples=0),
        return_state=True,
    )

    assert state.is_completed()
    assert [line["custom_id"] for line in read_jsonl(run_dir / "output.jsonl")] == [f"doc-{i}" for i in range(6)]
    for path in run_dir.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert logs and secret not in str(flow_run.parameters) + "".join(log.message for log in logs)
