"""The canary stage's library: which of a run's rows each check may sample (`rows`), and the
gate on throughput settings (`settings_gate`). The gate itself is gate.py, under the stage's task, tasks/s5_canary.py."""
