// graphile-worker, run the way redrive's `dispatch` benchmark runs: N due no-op jobs in the table,
// then time the workers emptying it. Each job carries a 1 KiB payload, as redrive's rows do.
// Usage: node bench.mjs DATABASE_URL N unbatched|batched
//
//   - unbatched: 24 concurrent jobs, each worker fetching and completing its own jobs.
//   - batched: the configuration of graphile-worker's own performance figures
//     (worker.graphile.org/docs/performance): 24 concurrent jobs, a pool of 25, a local queue of
//     500 fetched at once, and completions and failures written in batches.
//
// Handler calls are counted in memory; only once every job has run does the benchmark poll the
// table (every 20 ms) for the last batched completions. It gives up after 10 minutes. Prints one
// line: "graphile-<config> <jobs> <seconds>".
import { Logger, makeWorkerUtils, run, runMigrations } from "graphile-worker";
import pg from "pg";

const [connectionString, nArg, mode] = process.argv.slice(2);
const n = Number(nArg);
const deadline = performance.now() + 10 * 60 * 1000;
const fail = (why) => {
  console.error(`graphile-worker bench: ${why}`);
  process.exit(1);
};
const modes = {
  unbatched: {},
  batched: { localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 },
};
if (!connectionString || !(n > 0) || !(mode in modes)) {
  fail("usage: node bench.mjs DATABASE_URL N unbatched|batched");
}
const silent = new Logger(() => () => {});
const options = {
  connectionString,
  concurrency: 24,
  maxPoolSize: 25,
  noHandleSignals: true,
  pollInterval: 1000,
  logger: silent,
  preset: { worker: modes[mode] },
};
await runMigrations(options);

const pool = new pg.Pool({ connectionString });
const utils = await makeWorkerUtils({ connectionString });
const payload = "x".repeat(1024); // 1 KiB per job, as each of redrive's rows carries
for (let start = 0; start < n; start += 1000) {
  const specs = [];
  for (let i = start; i < Math.min(start + 1000, n); i++) specs.push({ identifier: "noop", payload: { n: i, payload } });
  await utils.addJobs(specs);
}
await utils.release();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let calls = 0;
const began = performance.now();
const runner = await run({ ...options, taskList: { noop: async () => void calls++ } });
while (calls < n) {
  if (performance.now() > deadline) fail(`gave up after 10 minutes: ${calls} of ${n} jobs run`);
  await sleep(5);
}
for (;;) {
  const { rows } = await pool.query("SELECT count(*)::int AS left FROM graphile_worker.jobs");
  if (rows[0].left === 0) break;
  if (performance.now() > deadline) fail(`gave up after 10 minutes: ${rows[0].left} jobs not completed`);
  await sleep(20);
}
const secs = (performance.now() - began) / 1000;
await runner.stop();
await pool.end();
console.log(`graphile-${mode} ${n} ${secs.toFixed(3)}`);
