"""Work-pool recipes: the Kubernetes base job template of deployments/k8s-gpu-job-template.json
sized for N GPUs a pod, optionally onto a cloud's spot nodes.

Prefect fills a template's `{{ variable }}` placeholders from the deployment's job variables
over the variables' defaults; a variable no placeholder references is silently dropped
(prefect#16125, #16127) — here `gpus` is what reaches `resources.limits["nvidia.com/gpu"]`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

K8S_GPU_TEMPLATE = Path(__file__).resolve().parents[2] / "deployments" / "k8s-gpu-job-template.json"

# How each cloud labels and taints its spot (preemptible) nodes.
SPOT_NODES = {
    "gke": ({"cloud.google.com/gke-spot": "true"}, [{"key": "cloud.google.com/gke-spot", "operator": "Equal",
                                                      "value": "true", "effect": "NoSchedule"}]),
    "eks": ({"eks.amazonaws.com/capacityType": "SPOT"}, []),
    "karpenter": ({"karpenter.sh/capacity-type": "spot"}, []),
    "aks": ({"kubernetes.azure.com/scalesetpriority": "spot"}, [{"key": "kubernetes.azure.com/scalesetpriority",
             "operator": "Equal", "value": "spot", "effect": "NoSchedule"}]),
}  # fmt: skip


def kubernetes_job_template(gpus: int = 1, spot: str | None = None) -> dict:
    """The base job template with `gpus` GPUs a pod by default, and `spot`'s node selector and
    toleration added to the defaults (each still a variable a deployment can override)."""
    if gpus < 1:
        raise ValueError("gpus must be at least 1")
    template = copy.deepcopy(json.loads(K8S_GPU_TEMPLATE.read_text()))
    variables = template["variables"]["properties"]
    variables["gpus"]["default"] = gpus
    if spot is not None:
        selector, tolerations = SPOT_NODES[spot]
        variables["node_selector"]["default"] = {**variables["node_selector"]["default"], **selector}
        variables["tolerations"]["default"] = [*variables["tolerations"]["default"], *tolerations]
    return template
