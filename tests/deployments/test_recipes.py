"""The recipes a Prefect team deploys with: the Kubernetes GPU job template and the shipped
Automations, as Prefect itself reads them."""

import json

import pytest

pytestmark = pytest.mark.fast


def rendered_pod(template: dict, **job_variables) -> dict:
    """The pod spec Prefect's worker would submit: the template's placeholders filled in from the
    deployment's job variables over the variables' defaults (Prefect's own templating)."""
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    job = apply_values(template["job_configuration"]["job_manifest"], {**defaults, **job_variables})
    return job["spec"]["template"]["spec"]


def test_the_gpus_a_deployment_asks_for_reach_the_pods_gpu_limit(capsys):
    from nightshift.cli import main

    assert main(["work-pool", "template", "--gpus", "2"]) == 0
    template = json.loads(capsys.readouterr().out)

    container = rendered_pod(template)["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2, "the template's default"
    container = rendered_pod(template, gpus=8)["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8, "a deployment's job variable"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert {"name": "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "value": "60"} in _env(rendered_pod(template, gpus=8))


def _env(pod: dict) -> list:
    env = pod["containers"][0]["env"]
    return [{"name": k, "value": v} for k, v in env.items()] if isinstance(env, dict) else env


def test_spot_nodes_are_selected_and_tolerated_and_stay_variables():
    from nightshift.fleet.work_pools import kubernetes_job_template

    pod = rendered_pod(kubernetes_job_template(1, spot="gke"))
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true", "cloud.google.com/gke-spot": "true"}
    assert {t["key"] for t in pod["tolerations"]} == {"nvidia.com/gpu", "cloud.google.com/gke-spot"}
    on_demand = rendered_pod(kubernetes_job_template(1, spot="gke"), node_selector={"pool": "a100"})
    assert on_demand["nodeSelector"] == {"pool": "a100"}


def test_the_shipped_automations_are_prefects_own_with_their_placeholders_filled():
    from nightshift.fleet.automations import shipped_automations

    block = "3f2b0c9e-0000-4000-8000-000000000001"
    automations = {a.name: a for a in shipped_automations(block, zombie_after_s=300)}

    assert set(automations) == {"nightshift-validation-failed", "nightshift-run-failed", "nightshift-crash-zombie-runs"}
    notify = automations["nightshift-validation-failed"]
    assert notify.trigger.expect == {"nightshift.validation.failed"}
    assert str(notify.actions[0].block_document_id) == block
    assert "{{ event.resource.name }}" in notify.actions[0].subject, "Prefect's own template, for the server to fill"
    zombie = automations["nightshift-crash-zombie-runs"]
    assert zombie.trigger.within.total_seconds() == 300 and zombie.trigger.posture == "Proactive"
    assert zombie.trigger.match_related.root == {
        "prefect.resource.role": "tag",
        "prefect.resource.id": "prefect.tag.nightshift",
    }
    assert zombie.actions[0].state == "CRASHED"


def test_without_a_notification_block_only_the_zombie_automation_is_made():
    from nightshift.fleet.automations import AutomationsError, shipped_automations

    assert [a.name for a in shipped_automations(None)] == ["nightshift-crash-zombie-runs"]
    with pytest.raises(AutomationsError, match="at least 30"):
        shipped_automations(None, zombie_after_s=5)


def test_every_deployment_sends_heartbeats_often_enough_for_the_zombie_automation():
    import yaml

    from nightshift.fleet.automations import DEFAULT_ZOMBIE_AFTER_S, REPO_DEPLOYMENTS

    for deployment in yaml.safe_load((REPO_DEPLOYMENTS / "prefect.yaml").read_text())["deployments"]:
        frequency = int(deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
        assert 30 <= frequency and 3 * frequency <= DEFAULT_ZOMBIE_AFTER_S, deployment["name"]
