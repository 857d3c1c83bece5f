"""The DAG's stages as library code; `tasks/` wraps each in a thin `@task` (as prefect-aws does).

estimate.py       before the night: tokens, hours, GPUs and cost to finish by a deadline
plan.py           plan-shards: the input cut into content-hashed shards
layout.py         the order a shard's rows go to the engine (shared prefixes together)
generate.py       generate: one shard's rows through the engine, chunk by chunk
chunks.py         the chunk file, the unit in which generated rows reach the disk
result_cache.py   the opt-in cache of deterministic rows' answers across runs
canaries.py       rows with known expectations that ride inside the real shards
merge.py          merge: the shards' chunk files become the run's outputs, in input order
"""
