"""The nightly deployment on real work pools: a `prefect server start`, process pools, workers,
`prefect deploy` from deployments/prefect.yaml, `prefect deployment run --watch` — and, as a drill
(`make drills`), one GPU worker killed mid-run.

Shards fan out to both GPU workers; the killed worker's group is re-dispatched to the other;
the merged output holds every row exactly once; the run is driven only by block names. The
lost-worker run keeps its input and its run directory on an S3 server (moto's), reached through
an ObjectStorage block: the bucket and the Prefect API are all its processes share.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, chat_request, read_jsonl, write_jsonl
from harness import free_port, nightshift_command, wait_until

PREFECT = str(Path(sys.executable).with_name("prefect"))
ROWS = 12  # six shards of two rows, three groups of two shards: one more group than GPU workers
GROUPS = 3


class Stack:
    """A Prefect server on localhost — on PostgreSQL, as production runs it — and the processes
    that talk to it."""

    def __init__(self, home: Path, database_url: str) -> None:
        port = free_port()
        self.api = f"http://127.0.0.1:{port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "1",
            "NIGHTSHIFT_HOME": str(REPO),
            "HF_HUB_OFFLINE": "1",
            # two GPU workers on one 2-core host start CPU engines together: vLLM's default binding
            # for each, as docs/embeddings.md tells an operator of such a host
            "NIGHTSHIFT_CPU_ALL_CORES": "0",
        }
        self.env.pop("PREFECT_PROFILES_PATH", None)
        self.processes: list[subprocess.Popen] = []
        self.stall_flag = home / "stall-next-child-run"
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)
        self.spawn("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(1)
        raise AssertionError("prefect server did not start:\n" + (self.logs / "server.log").read_text()[-3000:])

    def spawn(self, name: str, args: list[str], **env) -> subprocess.Popen:
        # Own session each: killing a worker's group kills its flow runs and engines too,
        # as losing the machine would.
        process = subprocess.Popen(
            args,
            cwd=REPO,
            env={**self.env, **env},
            start_new_session=True,
            stdout=open(self.logs / f"{name}.log", "w"),
            stderr=subprocess.STDOUT,
        )
        self.processes.append(process)
        return process

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def python(self, code: str) -> None:
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=self.env, check=True, timeout=120)

    def flow_runs(self, flow_name: str) -> list[dict]:
        flows = httpx.post(f"{self.api}/flows/filter", json={"flows": {"name": {"any_": [flow_name]}}}).json()
        return httpx.post(
            f"{self.api}/flow_runs/filter", json={"flows": {"id": {"any_": [f["id"] for f in flows]}}}
        ).json()

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture(scope="module")
def postgres():
    sys.path.insert(0, str(REPO / "bench"))
    from local_servers import PostgresServer

    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, postgres):
    stack = Stack(tmp_path_factory.mktemp("prefect"), postgres.url)
    try:
        yield stack
    finally:
        stack.stop()


def test_the_server_keeps_its_state_in_postgresql(stack, postgres):
    """Prefect's tables are in the PostgreSQL database, not in a SQLite file."""
    tables = subprocess.run(
        [*postgres.as_postgres, str(postgres.bin / "psql"), "-h", "127.0.0.1", "-p", str(postgres.port),
         "-U", "postgres", "-d", "prefect", "-tAc", "SELECT count(*) FROM flow_run"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert tables.stdout.strip().isdigit()
    assert not list(Path(stack.env["PREFECT_HOME"]).glob("*.db"))


@pytest.fixture(scope="module")
def deployed(stack):
    """What docs/deployments.md tells an operator to do: pools, blocks, deploy, an orchestrating worker."""
    subprocess.run(["scripts/deploy.sh"], cwd=REPO, env=stack.env, check=True, timeout=600)
    stack.python(
        "from nightshift.blocks import ModelConfig, GpuPricing\n"
        "ModelConfig(model='tiny', options={'chunk_size': 2},\n"
        "            engine={'max_num_seqs': 8, 'gpu_memory_utilization': 0.05}).save('tiny-test')\n"
        "GpuPricing(accelerator='test-gpu', on_demand_per_hour=2.0, spot_per_hour=0.8).save('test-gpu')\n"
    )
    stack.spawn("worker-cpu", [PREFECT, "worker", "start", "--pool", "nightshift-cpu", "--name", "cpu"])
    return stack


def test_the_kubernetes_job_template_requests_gpus_on_gpu_nodes(stack):
    from prefect.utilities.templating import apply_values

    stack.cli(
        "work-pool",
        "create",
        "nightshift-gpu-k8s",
        "--type",
        "kubernetes",
        "--base-job-template",
        "deployments/k8s-gpu-job-template.json",
    )
    pool = httpx.get(f"{stack.api}/work_pools/nightshift-gpu-k8s").json()
    template = pool["base_job_template"]
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    job = apply_values(template["job_configuration"]["job_manifest"], {**defaults, "gpus": 2})
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # Nothing shared but the bucket and the Prefect API: no volume but the pod's own /dev/shm.
    assert [volume["name"] for volume in pod["volumes"]] == ["dshm"]


def test_blocks_register_and_show_up_as_block_types_and_the_zombie_automation_is_on(deployed):
    listed = deployed.cli("block", "type", "ls").stdout
    for slug in ("nightshift-model", "nightshift-object-storage", "nightshift-gpu-pricing"):
        assert slug in listed
    automations = httpx.post(f"{deployed.api}/automations/filter", json={}).json()
    assert "nightshift-crash-zombie-runs" in [automation["name"] for automation in automations]


@pytest.fixture(scope="module")
def gpu_workers(deployed):
    """Two GPU workers, one flow run at a time each, pinned like one machine's two GPUs."""
    return {
        slot: deployed.spawn(
            f"worker-gpu-{slot}",
            [PREFECT, "worker", "start", "--pool", "nightshift-gpu", "--limit", "1", "--name", f"gpu-{slot}"],
            CUDA_VISIBLE_DEVICES=slot,
            NIGHTSHIFT_CHAOS_STALL_FILE=str(deployed.stall_flag),
        )
        for slot in ("0", "1")
    }


@pytest.fixture(scope="module")
def served(deployed, warm_engine):
    """`tiny-served`: the tiny model on the test worker's warm engine server (`engine_url`).

    The straggler drill, whose subject is dispatch, sends its rows there, so that none of its
    child runs spends 25–40 s of this 2-core machine loading an engine of its own. The unfit
    worker's drill is about a local engine's start, and the lost worker's run about a worker lost
    with its engine and the canary checks on a GPU worker's engine: they keep `tiny-test`."""
    deployed.python(
        "from nightshift.blocks import ModelConfig\n"
        "ModelConfig(model='tiny', options={'chunk_size': 2},\n"
        f"            engine={{'max_num_seqs': 8, 'engine_url': {warm_engine.url!r}}}).save('tiny-served')\n"
    )
    return "tiny-served"


def nightly_parameters(requests, run_dir, model: str = "tiny-test", **fan_out) -> dict:
    """The nightly run's parameters, its canary checks on the GPU pool (the lost-worker run checks them)."""
    return {
        "input_path": str(requests),
        "run_dir": str(run_dir),
        "model": model,
        "pricing": "test-gpu",
        "shard_size": 2,
        "fan_out": {
            "deployment": "nightshift-generate-shards/gpu",
            "shards_per_group": 2,
            "max_in_flight": 2,
            "heartbeat_timeout_s": 45,
            **fan_out,
        },
    }


def dispatch_only(parameters: dict) -> dict:
    """The same run with no canary checks, for the drills whose subject is dispatch: no
    validation run on the pool, no engine loaded for it."""
    fan_out = {**parameters["fan_out"], "validation_deployment": None}
    return {**parameters, "fan_out": fan_out, "validation": {"oracle_samples": 0, "determinism_samples": 0}}


def start_nightly(stack: Stack, parameters: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [
            PREFECT,
            "deployment",
            "run",
            "nightshift-batch/nightly",
            "--params",
            json.dumps(parameters),
            "--watch",
            "--watch-timeout",
            "900",
        ],
        cwd=REPO,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def requests_file(path: Path, rows: int) -> Path:
    return write_jsonl(path, [chat_request(f"req-{i:02d}", f"Tell me about topic {i}.") for i in range(rows)])


def assert_every_row_once(run_dir, rows: int) -> None:
    lines = read_jsonl(run_dir / "output.jsonl")
    assert sorted(line["custom_id"] for line in lines) == [f"req-{i:02d}" for i in range(rows)]
    assert (run_dir / "errors.jsonl").read_text() == ""


def test_a_straggling_group_is_reissued_and_the_first_finisher_wins(deployed, gpu_workers, served, tmp_path):
    """Also the suite's run of the canary checks on the GPU pool (the lost-worker drill checks
    them too): the determinism re-ask goes to the run's engine server, the oracle scores on the
    tiny model's local weights, in a validation flow run of a GPU worker."""
    run_dir = tmp_path / "nightly"
    deployed.stall_flag.touch()  # the first child run to start hangs
    parameters = nightly_parameters(
        requests_file(tmp_path / "in.jsonl", 8), run_dir, served, straggler_factor=1.0, straggler_min_s=0
    )
    run = start_nightly(deployed, parameters)
    output, _ = run.communicate(timeout=900)
    assert run.returncode == 0, output[-4000:]

    assert_every_row_once(run_dir, 8)
    assert_validated_on_a_gpu_worker(deployed, run_dir)

    def children_states():  # the loser's worker may still be stopping it
        states = sorted(
            c["state_type"]
            for c in deployed.flow_runs("nightshift-generate-shards")
            if c["parameters"]["run_dir"] == str(run_dir)
        )
        return states if "CANCELLING" not in states else None

    states = _wait(children_states, None, "the duplicate was not cancelled", timeout=120)
    assert states == ["CANCELLED", "COMPLETED", "COMPLETED"], "two groups, one dispatched twice, its loser cancelled"
    results = [m for m in (run_dir / "groups").glob("*/*.json") if m.parent.name != "validation"]
    assert len(results) == 2, "only the winners' results are used"


@pytest.mark.drill
def test_a_worker_that_cannot_start_the_engine_hands_its_groups_to_the_others(deployed, gpu_workers, tmp_path):
    """A drill (`make drills`): a third GPU worker whose engine cannot start (a KV budget larger
    than the machine) takes a group of a real nightly run, refuses it and the run's later groups,
    and the two fit workers answer every row. It costs about 200–265 s in the suite, nearly all of
    it engine starts in flow-run processes. The suite proves its parts faster: the real engine's
    refusal is said once, with its memory picture, and never retried (flows/test_configuration.py::
    test_an_engine_that_cannot_start_is_said_once_with_its_memory_picture_and_not_retried); the
    dispatcher hands a refused group on without counting an attempt, the unfit worker tries its
    engine once, and a run fails with their words when every online worker refuses
    (tasks/test_fanout_dispatcher.py); groups spread over both GPU workers with every row once
    (the straggler test, above)."""
    unfit = deployed.spawn(
        "worker-gpu-2",
        [PREFECT, "worker", "start", "--pool", "nightshift-gpu", "--limit", "1", "--name", "gpu-2"],
        CUDA_VISIBLE_DEVICES="2",
        VLLM_CPU_KVCACHE_SPACE="100000",  # more KV cache than this machine holds: vLLM refuses to start
    )
    run_dir = tmp_path / "nightly"
    try:  # three groups at once for three free workers: the unfit one takes one
        parameters = nightly_parameters(requests_file(tmp_path / "in.jsonl", 6), run_dir, shards_per_group=1)
        parameters = {**parameters, "fan_out": {**parameters["fan_out"], "max_in_flight": 3}}
        run = start_nightly(deployed, dispatch_only(parameters))
        output, _ = run.communicate(timeout=900)
    finally:
        os.killpg(unfit.pid, signal.SIGKILL)
        unfit.wait()
    assert run.returncode == 0, output[-4000:]

    assert_every_row_once(run_dir, 6)
    winners = [json.loads(m.read_text()) for m in (run_dir / "groups").glob("*/*.json")]
    assert len(winners) == 3 and {w["cuda_visible_devices"] for w in winners} <= {"0", "1"}
    refusals = [json.loads(r.read_text()) for r in (run_dir / "groups").glob("*/*.refused")]
    assert refusals, "the unfit worker took work and handed it back"
    assert {r["cuda_visible_devices"] for r in refusals} == {"2"}
    assert sum(r["engine_started"] for r in refusals) == 1, "it tried to start its engine once, then refused at once"
    assert all("memory free" in r["reason"] and "100000.0 GiB" in r["reason"] for r in refusals)


@pytest.fixture(scope="module")
def bucket(deployed, s3_endpoint):
    """A bucket on the S3 server and an ObjectStorage block, `lake-test`, holding its credentials."""
    import uuid

    from upath import UPath

    secret = f"s3cr3t-{uuid.uuid4().hex}"
    options = {"key": "nightshift-test", "secret": secret, "client_kwargs": {"endpoint_url": s3_endpoint}}
    deployed.python(
        "from nightshift.blocks import ObjectStorage\n"
        f"ObjectStorage(endpoint_url={s3_endpoint!r}, access_key_id='nightshift-test',\n"
        f"              secret_access_key={secret!r}).save('lake-test')\n"
    )
    root = UPath("s3://nightly-fleet", use_listings_cache=False, **options)
    root.fs.mkdir("nightly-fleet")
    return root, secret


@pytest.fixture(scope="module")
def lost_worker_run(deployed, gpu_workers, bucket, tmp_path_factory):
    """A drill (`make drills`): a nightly run, input and run directory on the bucket, during which
    one GPU worker — and the flow run and engine it ran — is SIGKILLed. It waits by design (a
    heartbeat timeout, engines started again: about 200 s here). The suite proves its parts
    faster: when a child run counts as lost (tests/nightshift/test_heartbeat_watch.py), that its
    group is dispatched again and a retried parent gets its runs back, and that a run that wrote its
    results before its worker was lost is not redone (tests/tasks/test_fanout_dispatcher.py);
    fan-out to both GPU workers with every row once, and the canary checks on the pool (the
    straggler drill, above); a run directory on a bucket, resumed with every row once and no
    secret in any object (tests/test_s3_run_dir.py)."""
    root, _ = bucket
    tmp = tmp_path_factory.mktemp("lost-worker")
    (root / "in.jsonl").write_bytes(requests_file(tmp / "in.jsonl", ROWS).read_bytes())
    run_dir = root / "runs" / "nightly"
    parameters = {**nightly_parameters(root / "in.jsonl", run_dir), "storage": "lake-test"}
    run = start_nightly(deployed, parameters)

    # The worker that finishes a group first takes the third; pull the plug on it mid-group.
    groups = run_dir / "groups"

    def worker_on_its_second_group():
        finished = {m.parent.name: _slot(m) for m in groups.glob("*/*.json")}
        busy = {_slot(beat) for beat in groups.glob("*/*.alive") if beat.parent.name not in finished}
        return next(iter(busy & set(finished.values()) - {None}), None)

    victim = _wait(worker_on_its_second_group, run, "no worker took a second group")
    time.sleep(3)
    os.killpg(gpu_workers[victim].pid, signal.SIGKILL)

    output, _ = run.communicate(timeout=900)
    assert run.returncode == 0, output[-4000:]
    return run_dir


@pytest.mark.drill
def test_the_bucket_is_all_the_lost_worker_run_shared(bucket, lost_worker_run):
    root, secret = bucket
    names = {p.name for p in lost_worker_run.iterdir()}
    assert {"plan", "shards", "checkpoints", "groups", "output.jsonl", "report.json", "validation.json"} <= names
    for path in root.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


@pytest.mark.drill
def test_shards_run_on_both_gpu_workers_and_the_merged_output_is_complete(lost_worker_run):
    assert_every_row_once(lost_worker_run, ROWS)
    winners = [json.loads(m.read_text()) for m in (lost_worker_run / "groups").glob("*/*.json")]
    assert {w["cuda_visible_devices"] for w in winners} == {"0", "1"}, "shards ran on both GPU workers"
    assert sorted(r["shard_index"] for w in winners for r in w["results"]) == list(range(ROWS // 2))
    report = json.loads((lost_worker_run / "report.json").read_text())
    assert report["accelerator"] == "test-gpu", "the pricing block named by the run was used"
    assert report["engine_slots"] == 2, "two GPUs ran side by side and both are billed"


@pytest.mark.drill
def test_the_canary_checks_ran_on_a_gpu_worker_not_in_the_orchestrating_flow(deployed, lost_worker_run):
    assert_validated_on_a_gpu_worker(deployed, lost_worker_run)


def assert_validated_on_a_gpu_worker(deployed, run_dir) -> None:
    verdict = json.loads((run_dir / "validation.json").read_text())
    assert verdict["validated"], verdict["failures"]
    assert verdict["where"]["cuda_visible_devices"] in ("0", "1"), "validated on a GPU worker"
    assert verdict["checks"]["determinism"]["of"] == 2, "the re-run had an engine there"
    assert verdict["checks"]["oracle"]["agreement"] == 1.0
    runs = {r["id"]: r for r in deployed.flow_runs("nightshift-validate")}
    validation_run = runs[verdict["where"]["flow_run_id"]]
    assert validation_run["parameters"]["run_dir"] == str(run_dir)
    assert validation_run["state_type"] == "COMPLETED"
    left = json.loads((run_dir / "groups" / "validation" / f"{validation_run['id']}.verdict").read_text())
    assert verdict == left, "validation.json is the verdict of the run that gated the flow, as that run left it"


@pytest.mark.drill
def test_the_lost_workers_run_is_shown_crashed_and_its_group_redone(deployed, lost_worker_run):
    children = [
        c
        for c in deployed.flow_runs("nightshift-generate-shards")
        if c["parameters"]["run_dir"] == str(lost_worker_run)
    ]
    crashed = [c for c in children if c["state_type"] == "CRASHED"]
    assert len(crashed) == 1 and "no heartbeat" in crashed[0]["state"]["message"]
    # a run killed just after writing its results has done its group: it is not redone
    did_a_group = [
        c for c in children if (lost_worker_run / "groups" / c["parameters"]["group"] / f"{c['id']}.json").exists()
    ]
    assert len(did_a_group) == GROUPS, "every group finished once"


@pytest.mark.drill
def test_retrying_the_nightly_run_dispatches_no_group_twice(deployed, lost_worker_run):
    [parent] = [p for p in deployed.flow_runs("nightshift-batch") if p["parameters"]["run_dir"] == str(lost_worker_run)]
    children_before = len(deployed.flow_runs("nightshift-generate-shards"))
    before = (lost_worker_run / "output.jsonl").read_text()

    deployed.cli("flow-run", "retry", parent["id"])
    state = _wait(lambda: _final_state(deployed, parent["id"]), None, "the retried run did not finish")

    assert state == "COMPLETED"
    assert len(deployed.flow_runs("nightshift-generate-shards")) == children_before
    assert (lost_worker_run / "output.jsonl").read_text() == before


def test_deployment_run_watch_exits_nonzero_when_the_run_fails(deployed, tmp_path):
    stack = deployed
    bad_input = tmp_path / "missing.jsonl"
    result = subprocess.run(
        [
            PREFECT,
            "deployment",
            "run",
            "nightshift-batch/nightly",
            "--params",
            json.dumps({"input_path": str(bad_input), "run_dir": str(tmp_path / "r"), "model": "tiny-test"}),
            "--watch",
            "--watch-timeout",
            "600",
        ],
        cwd=REPO,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=700,
    )
    assert result.returncode != 0
    assert "Failed" in result.stdout + result.stderr


def _slot(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["cuda_visible_devices"]
    except (OSError, ValueError, KeyError):
        return None


def _wait(condition, run: subprocess.Popen, message: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if run is not None and run.poll() is not None:
            raise AssertionError(f"{message}; the run ended:\n{run.stdout.read()[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(message)


def _final_state(stack: Stack, flow_run_id: str) -> str | None:
    state = httpx.get(f"{stack.api}/flow_runs/{flow_run_id}").json()["state"]
    return state["type"] if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def test_the_batch_api_runs_each_batch_as_a_flow_run_of_the_deployment(deployed, tmp_path):
    """`nightshift serve --deployment`: the official client's batch becomes a flow run of the
    nightly deployment, taken by the CPU pool's worker; the batch completes from its outputs."""
    import io

    import openai

    port = free_port()
    serve = deployed.spawn(
        "serve",
        nightshift_command("serve", "--storage", tmp_path / "api", "--port", port, "--chat-model", "tiny",
                           "--deployment", "nightshift-batch/nightly", "--poll-s", "0.5"),
        NIGHTSHIFT_API_KEYS="key-ci",
    )  # fmt: skip
    try:
        wait_until(f"http://127.0.0.1:{port}/v1/batches", process=serve)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="key-ci", max_retries=0)
        rows = [chat_request(f"api-{i}", f"Hello number {i}") for i in range(10)]
        content = "\n".join(json.dumps(r) for r in rows).encode()
        upload = client.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            batch = client.batches.retrieve(batch.id)
            if batch.status in ("completed", "failed", "expired", "cancelled"):
                break
            time.sleep(1)
        assert batch.status == "completed", (batch.status, batch.errors)
        outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in outputs) == sorted(r["custom_id"] for r in rows)
        assert batch.request_counts.completed == len(rows)
    finally:
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait()
    runs = [r for r in deployed.flow_runs("nightshift-batch") if r["name"] == f"batch {batch.id}"]
    assert len(runs) == 1 and runs[0]["deployment_id"] and runs[0]["state"]["type"] == "COMPLETED"
