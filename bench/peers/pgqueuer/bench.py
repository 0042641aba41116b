"""PgQueuer, run the way redrive's `dispatch` benchmark runs: N due no-op jobs in the table, then
time the workers emptying it. Usage: python bench.py DATABASE_URL N"""

import asyncio
import sys
import time

import asyncpg
from pgqueuer import AsyncpgDriver, Queries, QueueManager
from pgqueuer.types import QueueExecutionMode


async def main(dsn: str, n: int) -> None:
    driver = AsyncpgDriver(await asyncpg.connect(dsn))
    queries = Queries(driver)
    await queries.install()
    for start in range(0, n, 1000):
        k = min(1000, n - start)
        await queries.enqueue(["noop"] * k, [None] * k, [0] * k)

    qm = QueueManager(queries)

    @qm.entrypoint("noop")
    async def noop(job) -> None:
        return None

    began = time.perf_counter()
    await qm.run(mode=QueueExecutionMode.drain, batch_size=100)
    secs = time.perf_counter() - began
    print(f"| pgqueuer dispatch | {n} | {secs:.2f} | {n / secs:.0f} |")


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
