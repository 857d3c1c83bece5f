"""What a run holds while it lives, wherever it runs:

rundir.py         the run directory's layout: every file and object a run reads or writes
storage.py        where those live (a local disk or a bucket), each written whole, behind the commit gate
lease.py          the one live run of a directory: acquired, beaten, fenced, released
progress.py       how far the run has got, for the console and the dashboard
preemption.py     a SIGTERM: stop at a chunk boundary, consistent and resumable
deadline.py       the run's deadline: finished rows merged, the rest expired
processes.py      who counts as alive (a zombie does not)
local_prefect.py  the machine's shared temporary Prefect server, for runs without PREFECT_API_URL
"""
