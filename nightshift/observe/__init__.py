"""What an operator sees of a run besides its outputs:

logs.py       Python's logging, configured once (never by vLLM)
events.py     the Prefect events a run emits (what automations trigger on)
assets.py     the run's files as Prefect assets (the dashboard's lineage)
status.py     `nightshift status RUN_DIR`: how far a run has got, from its files alone
telemetry.py  GPU utilization and memory, sampled with pynvml
"""
