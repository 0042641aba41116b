// River, run the way redrive's `dispatch` benchmark runs: N due no-op jobs in the table, then
// time the workers emptying it. Each job carries a 1 KiB payload, as redrive's rows do.
// Usage: river-bench DATABASE_URL N default|tuned
//
//   - default: River's defaults (a fetch at most every 100 ms, polls every second), with 100
//     workers as in River's own examples.
//   - tuned: 200 workers (redrive's benchmark runs 200) and the shortest fetch cooldown River
//     accepts (1 ms), so it fetches again as soon as workers free up, as redrive claims.
//
// Completions are counted from River's own event stream, which reports a job once its completion
// is written, so the benchmark never polls the table it measures. It gives up after 10 minutes.
// Prints one line: "river-<config> <jobs> <seconds>".
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
)

// Each job carries 1 KiB, as each of redrive's rows carries a 1 KiB payload.
type NoopArgs struct {
	N       int    `json:"n"`
	Payload string `json:"payload"`
}

func (NoopArgs) Kind() string { return "noop" }

type NoopWorker struct{ river.WorkerDefaults[NoopArgs] }

func (NoopWorker) Work(context.Context, *river.Job[NoopArgs]) error { return nil }

const deadline = 10 * time.Minute

func main() {
	if len(os.Args) != 4 {
		fail(fmt.Errorf("usage: river-bench DATABASE_URL N default|tuned"))
	}
	ctx := context.Background()
	n, err := strconv.Atoi(os.Args[2])
	check(err)
	pool, err := pgxpool.New(ctx, os.Args[1])
	check(err)
	migrator, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	check(err)
	_, err = migrator.Migrate(ctx, rivermigrate.DirectionUp, nil)
	check(err)

	workers := river.NewWorkers()
	river.AddWorker(workers, &NoopWorker{})
	config := &river.Config{Workers: workers}
	switch os.Args[3] {
	case "default":
		config.Queues = map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 100}}
	case "tuned":
		config.Queues = map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 200}}
		config.FetchCooldown = river.FetchCooldownMin
		config.FetchPollInterval = 50 * time.Millisecond
	default:
		fail(fmt.Errorf("unknown configuration %q: default or tuned", os.Args[3]))
	}
	client, err := river.NewClient(riverpgxv5.New(pool), config)
	check(err)
	payload := strings.Repeat("x", 1024)
	for start := 0; start < n; start += 1000 {
		batch := []river.InsertManyParams{}
		for i := start; i < start+1000 && i < n; i++ {
			batch = append(batch, river.InsertManyParams{Args: NoopArgs{N: i, Payload: payload}})
		}
		_, err = client.InsertManyFast(ctx, batch)
		check(err)
	}
	// Room for every event, so none is dropped for a full buffer.
	events, cancel := client.SubscribeConfig(&river.SubscribeConfig{
		ChanSize: n,
		Kinds:    []river.EventKind{river.EventKindJobCompleted, river.EventKindJobFailed},
	})
	defer cancel()

	began := time.Now()
	check(client.Start(ctx))
	timeout := time.After(deadline)
	for done := 0; done < n; {
		select {
		case e := <-events:
			if e.Kind != river.EventKindJobCompleted {
				fail(fmt.Errorf("job %d failed: %v", e.Job.ID, e.Job.Errors))
			}
			done++
		case <-timeout:
			fail(fmt.Errorf("gave up after %s: %d of %d jobs completed", deadline, done, n))
		}
	}
	secs := time.Since(began).Seconds()
	check(client.Stop(ctx))
	fmt.Printf("river-%s %d %.3f\n", os.Args[3], n, secs)
}

func check(err error) {
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "river bench:", err)
	os.Exit(1)
}
