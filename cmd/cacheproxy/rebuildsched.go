package main

import "context"

// buildJob is one derivation to rebuild and the queued paths it makes.
type buildJob struct {
	drv   string
	paths []string // queued outputs of drv, in queue order
	deps  []string // other jobs' derivations drv needs built first
	outcome
}

// runJobs runs build on each job, at most n at once (n < 1 is one), in
// order, except that a job waits until the jobs it depends on are done:
// building a dependent first would make Nix build the dependency inside
// it (or, where the gatekeeper already serves the dependency, fail to
// substitute it), and the dependency's own job would find nothing left to
// build from source. done is called for each job as it ends, from this
// goroutine. Once ctx ends no job starts, and runJobs returns when the
// running ones have.
func runJobs(ctx context.Context, jobs []*buildJob, n int, build func(context.Context, *buildJob), done func(*buildJob)) {
	if n < 1 {
		n = 1
	}
	pending := append([]*buildJob(nil), jobs...)
	unfinished := map[string]bool{}
	for _, j := range jobs {
		unfinished[j.drv] = true
	}
	ready := func(j *buildJob) bool {
		for _, d := range j.deps {
			if d != j.drv && unfinished[d] {
				return false
			}
		}
		return true
	}
	finished := make(chan *buildJob)
	running := 0
	for {
		for ctx.Err() == nil && running < n && len(pending) > 0 {
			i := firstReady(pending, ready)
			if i < 0 && running > 0 {
				break // wait for a dependency to finish
			}
			if i < 0 {
				// Nothing running and nothing ready: the dependencies
				// are circular (Nix derivations cannot be). Take the
				// first rather than wait forever.
				i = 0
			}
			j := pending[i]
			pending = append(pending[:i], pending[i+1:]...)
			running++
			go func() {
				build(ctx, j)
				finished <- j
			}()
		}
		if running == 0 {
			return
		}
		j := <-finished
		running--
		delete(unfinished, j.drv)
		done(j)
	}
}

func firstReady(jobs []*buildJob, ready func(*buildJob) bool) int {
	for i, j := range jobs {
		if ready(j) {
			return i
		}
	}
	return -1
}
