"""PgQueuer, run the way redrive's `dispatch` benchmark runs: N due no-op jobs in the table, then
time the workers emptying it (each job carries a 1 KiB payload, as redrive's rows do), in
PgQueuer's drain mode (it stops once the queue is empty), fetching 100 jobs at a time. Gives up
after 10 minutes. Usage: python bench.py DATABASE_URL N
Prints one line: "pgqueuer <jobs> <seconds>"."""

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
        await queries.enqueue(["noop"] * k, [b"x" * 1024] * k, [0] * k)

    qm = QueueManager(queries)

    @qm.entrypoint("noop")
    async def noop(job) -> None:
        return None

    began = time.perf_counter()
    try:
        await asyncio.wait_for(qm.run(mode=QueueExecutionMode.drain, batch_size=100), 600)
    except TimeoutError:
        sys.exit("pgqueuer bench: gave up after 10 minutes")
    secs = time.perf_counter() - began
    print(f"pgqueuer {n} {secs:.3f}")


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
