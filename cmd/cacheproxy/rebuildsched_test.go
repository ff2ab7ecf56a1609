package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
)

// runJobs starts no job before the jobs it depends on are done, runs
// independent jobs at once (up to n), and otherwise keeps the queue's order.
func TestRunJobsDependenciesFirst(t *testing.T) {
	mk := func(drv string, deps ...string) *buildJob { return &buildJob{drv: drv, deps: deps} }
	t.Run("two at once", func(t *testing.T) {
		jobs := []*buildJob{mk("a"), mk("b", "a"), mk("c"), mk("d", "b", "c")}
		var mu sync.Mutex
		finished := map[string]bool{}
		started := map[string]chan struct{}{"a": make(chan struct{}), "c": make(chan struct{})}
		var order []string
		build := func(ctx context.Context, j *buildJob) {
			mu.Lock()
			for _, d := range j.deps {
				if !finished[d] {
					t.Errorf("%s started before its dependency %s finished", j.drv, d)
				}
			}
			mu.Unlock()
			// a and c depend on nothing: with n = 2 they run together,
			// so each sees the other start (a scheduler running one at
			// a time would never get past this).
			switch j.drv {
			case "a":
				close(started["a"])
				<-started["c"]
			case "c":
				close(started["c"])
				<-started["a"]
			}
		}
		runJobs(context.Background(), jobs, 2, build, func(j *buildJob) {
			mu.Lock()
			finished[j.drv] = true
			order = append(order, j.drv)
			mu.Unlock()
		})
		if len(order) != 4 || order[3] != "d" {
			t.Errorf("done in order %v, want all four, d last", order)
		}
	})
	t.Run("one at a time", func(t *testing.T) {
		// The queue puts d before c, which it depends on: c goes first.
		jobs := []*buildJob{mk("a"), mk("d", "c"), mk("b", "a"), mk("c")}
		var order []string
		runJobs(context.Background(), jobs, 1, func(context.Context, *buildJob) {}, func(j *buildJob) { order = append(order, j.drv) })
		if want := []string{"a", "b", "c", "d"}; !slices.Equal(order, want) {
			t.Errorf("order %v, want %v", order, want)
		}
	})
	t.Run("circular", func(t *testing.T) {
		jobs := []*buildJob{mk("x", "y"), mk("y", "x")}
		var order []string
		runJobs(context.Background(), jobs, 2, func(context.Context, *buildJob) {}, func(j *buildJob) { order = append(order, j.drv) })
		if len(order) != 2 {
			t.Errorf("circular dependencies: done %v, want both", order)
		}
	})
	t.Run("stopped", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		n := 0
		runJobs(ctx, []*buildJob{mk("a"), mk("b")}, 2, func(context.Context, *buildJob) { n++ }, func(*buildJob) {})
		if n != 0 {
			t.Errorf("%d jobs started after the context ended", n)
		}
	})
}

// With --jobs 2 a pass asks Nix for each queued deriver's closure and
// builds a queued dependency before its dependent, whatever the queue's
// order; each path's line comes as its derivation is done.
func TestRebuildJobsBuildDependenciesFirst(t *testing.T) {
	f := newRebuildFixture(t, "app", "app\n")
	store := f.store
	leafDrv := filepath.Join(store, "llllllllllllllllllllllllllllllll-leaf.drv")
	leaf := filepath.Join(store, "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm-leaf")
	f.gk.queue = []adminapi.QueueEntry{
		{StorePath: f.out, Deriver: f.drv, Reason: "unattested", Requests: 9},
		{StorePath: leaf, Deriver: leafDrv, Reason: "unattested", Requests: 1},
	}
	f.gk.upstream[f.out], f.gk.upstream[leaf] = narHashOf("app\n"), narHashOf("leaf\n")
	f.nix.on("nix-store --query --requisites "+f.drv, ok(strings.Join([]string{"/nix/store/x-builder.sh", leafDrv, f.drv}, "\n")+"\n"))
	f.nix.on("nix-store --query --requisites "+leafDrv, ok(leafDrv+"\n"))
	f.nix.on("nix-store --check-validity "+leafDrv, ok(""))
	f.nix.on("nix-store --query --outputs "+leafDrv, ok(leaf+"\n"))
	f.nix.on("nix-store --check-validity "+leaf, fail("error: path '"+leaf+"' is not valid"))
	leafBuilt := false
	var mu sync.Mutex
	f.nix.on("nix-store --realise "+leafDrv, func() (string, error) {
		mu.Lock()
		leafBuilt = true
		mu.Unlock()
		return leaf + "\n", os.WriteFile(leaf, []byte("leaf\n"), 0o644)
	})
	appRealise := f.nix.cmds["nix-store --realise "+f.drv]
	f.nix.on("nix-store --realise "+f.drv, func() (string, error) {
		mu.Lock()
		if !leafBuilt {
			t.Error("the app was built before the leaf it depends on")
		}
		mu.Unlock()
		return appRealise()
	})
	f.nix.on("nix store sign --key-file rebuilder-1.sec "+leaf, ok(""))
	f.nix.on("nix path-info --json --sigs "+leaf, ok(fmt.Sprintf(`[{"path":%q,"narHash":%q,"narSize":5}]`, leaf, narHashOf("leaf\n"))))
	f.r.jobs = 2
	if err := f.r.once(context.Background()); err != nil {
		t.Fatalf("once: %v\n%s", err, f.stderr)
	}
	if want := "attested\t" + leaf + "\nattested\t" + f.out + "\n"; f.stdout.String() != want {
		t.Errorf("stdout %q, want %q", f.stdout, want)
	}
}
