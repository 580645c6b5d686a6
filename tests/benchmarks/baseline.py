"""The baseline: the documented per-row pattern with the official `parallel-web` SDK.

asyncio + a semaphore; for each row `task_run.create` then a blocking `task_run.result`;
the default client (its own retries); a 429 that survives the SDK's retries is retried after
1 s, as a user's script would. Prints one JSON line: rows, wall seconds, errors, retries.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import resource
import sys
import time

from parallel import APIError, AsyncParallel, RateLimitError

SCHEMA = {
    "type": "json",
    "json_schema": {
        "type": "object",
        "additionalProperties": False,
        "required": ["headquarters_location"],
        "properties": {"headquarters_location": {"type": ["string", "null"]}},
    },
}


async def main(base_url: str, path: str, column: str, concurrency: int, processor: str) -> dict:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    client = AsyncParallel(api_key="bench-key", base_url=base_url)
    sem = asyncio.Semaphore(concurrency)
    results: list = [None] * len(rows)
    errors = 0
    retries = 0

    async def one(i: int, row: dict) -> None:
        nonlocal errors, retries
        async with sem:
            while True:
                try:
                    run = await client.task_run.create(
                        input={column: row[column]}, processor=processor, task_spec={"output_schema": SCHEMA}
                    )
                    break
                except RateLimitError:
                    retries += 1
                    await asyncio.sleep(1.0)
                except APIError:  # a timeout or a 5xx the SDK's own retries did not cure: the row is lost
                    errors += 1
                    return
            try:
                res = await client.task_run.result(run.run_id, api_timeout=600)
                results[i] = res.output.content
            except Exception:
                errors += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i, r) for i, r in enumerate(rows)))
    wall = time.monotonic() - t0
    await client.close()
    return {
        "rows": len(rows),
        "wall_s": wall,
        "errors": errors,
        "retries_429": retries,
        "completed": sum(r is not None for r in results),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--column", default="company")
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--processor", default="lite-fast")
    a = ap.parse_args()
    out = asyncio.run(main(a.base_url, a.input, a.column, a.concurrency, a.processor))
    out["cpu_s"] = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))
    sys.exit(0)
