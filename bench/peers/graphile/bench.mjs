// graphile-worker, run the way redrive's `dispatch` benchmark runs: N due no-op jobs in the table,
// then time the workers emptying it. Usage: node bench.mjs DATABASE_URL N
import { Logger, makeWorkerUtils, run, runMigrations } from "graphile-worker";
import pg from "pg";

const [connectionString, nArg] = process.argv.slice(2);
const n = Number(nArg);
const concurrency = Number(process.env.CONCURRENCY || 24);
const silent = new Logger(() => () => {});
const options = { connectionString, concurrency, noHandleSignals: true, pollInterval: 1000, logger: silent };
await runMigrations(options);

const pool = new pg.Pool({ connectionString });
const utils = await makeWorkerUtils({ connectionString });
for (let start = 0; start < n; start += 1000) {
  const specs = [];
  for (let i = start; i < Math.min(start + 1000, n); i++) specs.push({ identifier: "noop", payload: { n: i } });
  await utils.addJobs(specs);
}
await utils.release();

const began = performance.now();
const runner = await run({ ...options, taskList: { noop: async () => {} } });
for (;;) {
  const { rows } = await pool.query("SELECT count(*)::int AS left FROM graphile_worker.jobs");
  if (rows[0].left === 0) break;
  await new Promise((r) => setTimeout(r, 50));
}
const secs = (performance.now() - began) / 1000;
await runner.stop();
await pool.end();
console.log(`| graphile-worker dispatch (concurrency ${concurrency}) | ${n} | ${secs.toFixed(2)} | ${Math.round(n / secs)} |`);
