"""The fleet: the generate stage spread over GPU work pools, and what the Prefect server holds.

fan_out.py       the dispatcher: one child flow run per shard group, lost and straggling ones redone
workers.py       the worker's side: heartbeats, group manifests, refusals a child run leaves behind
work_pools.py    the pools' recipes: Kubernetes job templates, GPU and spot nodes
automations.py   the automations on the Prefect server: zombie runs, failures sent on
"""
