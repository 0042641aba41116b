// River, run the way redrive's `dispatch` benchmark runs: N due no-op jobs in the table, then
// time the workers emptying it. Usage: go run . DATABASE_URL N
package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
)

type NoopArgs struct{ N int }

func (NoopArgs) Kind() string { return "noop" }

type NoopWorker struct{ river.WorkerDefaults[NoopArgs] }

func (NoopWorker) Work(context.Context, *river.Job[NoopArgs]) error { return nil }

func main() {
	ctx := context.Background()
	n, _ := strconv.Atoi(os.Args[2])
	pool, err := pgxpool.New(ctx, os.Args[1])
	check(err)
	migrator, err := rivermigrate.New(riverpgxv5.New(pool), nil)
	check(err)
	_, err = migrator.Migrate(ctx, rivermigrate.DirectionUp, nil)
	check(err)

	workers := river.NewWorkers()
	river.AddWorker(workers, &NoopWorker{})
	client, err := river.NewClient(riverpgxv5.New(pool), &river.Config{
		Queues:  map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: 200}},
		Workers: workers,
		// The default 100ms cooldown caps fetching at MaxWorkers jobs per 100ms; redrive
		// claims again as soon as slots free up, so River gets the same chance.
		FetchCooldown:     time.Millisecond,
		FetchPollInterval: 50 * time.Millisecond,
	})
	check(err)
	for start := 0; start < n; start += 1000 {
		batch := []river.InsertManyParams{}
		for i := start; i < start+1000 && i < n; i++ {
			batch = append(batch, river.InsertManyParams{Args: NoopArgs{N: i}})
		}
		_, err = client.InsertManyFast(ctx, batch)
		check(err)
	}

	began := time.Now()
	check(client.Start(ctx))
	for {
		var left int
		check(pool.QueryRow(ctx, "SELECT count(*) FROM river_job WHERE state <> 'completed'").Scan(&left))
		if left == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	secs := time.Since(began).Seconds()
	check(client.Stop(ctx))
	fmt.Printf("| river dispatch | %d | %.2f | %.0f |\n", n, secs, float64(n)/secs)
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "river bench:", err)
		os.Exit(1)
	}
}
