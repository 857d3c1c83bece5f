"""The engine: what answers a shard's rows.

protocol.py       what generation needs of an engine, whichever answers
local.py          vLLM in this process, kept saturated across chunks and shards
remote.py         an OpenAI-compatible server (`--engine-url`), a fleet of them
sizing.py         how big a local engine is made, from the model, the job and the host
vllm_adapter.py   every use of vLLM's internals, checked at start
lora.py           LoRA adapters named by rows
tool_calls.py     tools into the chat template, calls out of the answer
politeness.py     how many rows a shared server gets at once
"""
