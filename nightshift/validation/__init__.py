"""The canary stage's library: the gate itself (`gate`, under the stage's task in
tasks/s5_canary.py), which of a run's rows each check may sample (`rows`), and the gate on
throughput settings (`settings_gate`); the oracle that scores a run's tokens on reference
weights, teacher-forced (`oracle`)."""
