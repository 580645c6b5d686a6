"""Scale-out: one job split into partitions that run as Ray tasks, with limits held globally.

    partition.py  the deterministic slices of the input (files under `<journal>.parts/`), cut once
    governor.py   the limits every partition shares: a creating-POST rate and the budget (a Ray actor
                  per job, rebuilt from the partition journals when it restarts) and its worker adapter
    merge.py      the partition outputs into one output file (streamed, input order) or a dataset
    runner.py     `run_partitioned()`: what `enrich run --ray` calls instead of `job.run_job`
    status.py     `enrich status` / `enrich plan` for a partitioned job (no Ray needed)

Each partition runs the unchanged single-machine pipeline (`job.run_job`) on its slice with its
own journal `<journal>.parts/part-NNNNN.sqlite`, so exactly-once, reconciliation and resume are
the single-machine ones. Only runner.py and the actor class import Ray (the optional `ray` extra).
"""

PARTS_SUFFIX = ".parts"
