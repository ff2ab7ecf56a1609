package gate

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// The queue holds what a rebuild could approve, most requested first, with
// queued dependencies before their dependents.
func TestRebuildQueueOrder(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	lib, app, tool, denied, approvedRef := newObj("lib-1.0"), newObj("app-1.0"), newObj("tool-1.0"), newObj("bad-1.0"), newObj("ok-1.0")
	top := newObj("top-1.0")
	src := queueSource{storeDir: storeDir,
		rejections: []cache.Rejection{
			{StorePath: lib.ni.StorePath, Reason: "unattested", Deriver: "/nix/store/x-lib.drv", Count: 1, First: t0, Last: t0},
			{StorePath: app.ni.StorePath, Reason: "unattested", Count: 9, First: t0, Last: t0.Add(time.Hour)},
			{StorePath: tool.ni.StorePath, Reason: "unattested", Count: 5, First: t0, Last: t0},
			{StorePath: denied.ni.StorePath, Reason: "denied", Count: 50, First: t0, Last: t0},
			// top is attested but its references are not: tool (queued
			// already) and ok (approved since) and bad (denied).
			{StorePath: top.ni.StorePath, Reason: "closure_incomplete", Count: 7, First: t0.Add(-time.Hour), Last: t0.Add(2 * time.Hour),
				Missing: []policy.MissingRef{{Ref: tool.base(), Reason: policy.Unattested}, {Ref: approvedRef.base(), Reason: policy.Unattested},
					{Ref: denied.base(), Reason: policy.Denied}}},
		},
		approved:  func(h string) bool { return h == approvedRef.hash },
		attesters: func(string) []string { return nil }, quorum: 1,
		refs: func(h string) []string {
			if h == app.hash {
				return []string{lib.hash, "notqueued"}
			}
			return nil
		},
	}
	q := rebuildQueue(src)
	var got []string
	for _, e := range q {
		got = append(got, e.StorePath)
	}
	want := []string{lib.ni.StorePath, app.ni.StorePath, tool.ni.StorePath}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("queue %v, want %v", got, want)
	}
	// tool: refused 5 times itself, blocks top's 7 requests; its times
	// span both.
	tq := q[2]
	if tq.Requests != 7 || tq.Reason != "unattested" || !tq.First.Equal(t0.Add(-time.Hour)) || !tq.Last.Equal(t0.Add(2*time.Hour)) {
		t.Fatalf("tool entry %+v", tq)
	}
	if q[0].Deriver != "/nix/store/x-lib.drv" {
		t.Fatalf("lib entry %+v", q[0])
	}
}

// Through the gate: an unattested reference of a path refused for its
// closure is queued, with the requests of the path it blocks; once it is
// attested and approved, it drops out.
func TestRebuildQueueFromRejections(t *testing.T) {
	f := newFixture(t, true)
	leaf := newObj("leaf-1.0")
	app := newObj("app-1.0", leaf)
	f.up.publish(leaf, app)
	f.attest(app)
	for range 3 {
		wantAnswer(t, "app", f.narinfo(app), Reject, "rejected; reason=closure_incomplete")
	}
	q, err := f.g.RebuildQueue("")
	if err != nil {
		t.Fatal(err)
	}
	if len(q) != 1 || q[0].StorePath != leaf.ni.StorePath || q[0].Reason != "unattested" || q[0].Requests != 3 {
		t.Fatalf("queue %+v, want leaf requested 3 times", q)
	}
	if n, err := f.g.rebuildQueueLen(); err != nil || n != 1 {
		t.Fatalf("queue length %d %v", n, err)
	}
	f.attest(leaf)
	wantAnswer(t, "app after leaf attested", f.narinfo(app), Serve, "approved; reason=attested")
	if q, err = f.g.RebuildQueue(""); err != nil || len(q) != 0 {
		t.Fatalf("queue after approval %+v %v", q, err)
	}
}

// A path leaves the queue once quorum attesters attested it (the next
// request decides it), and, for one rebuilder, once its own key did.
func TestRebuildQueueSkipsAttested(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	one, both, none := newObj("one-1.0"), newObj("both-1.0"), newObj("none-1.0")
	var rejs []cache.Rejection
	for _, o := range []*obj{one, both, none} {
		rejs = append(rejs, cache.Rejection{StorePath: o.ni.StorePath, Reason: "unattested", Count: 1, First: t0, Last: t0})
	}
	src := queueSource{storeDir: storeDir, rejections: rejs, quorum: 2,
		approved: func(string) bool { return false },
		refs:     func(string) []string { return nil },
		attesters: func(h string) []string {
			switch h {
			case one.hash:
				return []string{"rb-a"}
			case both.hash:
				return []string{"rb-a", "rb-b"}
			}
			return nil
		},
	}
	paths := func(q []QueueEntry) (out []string) {
		for _, e := range q {
			out = append(out, e.StorePath)
		}
		return out
	}
	if got, want := paths(rebuildQueue(src)), []string{none.ni.StorePath, one.ni.StorePath}; !reflect.DeepEqual(got, want) {
		t.Fatalf("queue %v, want %v", got, want)
	}
	src.exclude = "rb-b"
	if got, want := paths(rebuildQueue(src)), []string{none.ni.StorePath, one.ni.StorePath}; !reflect.DeepEqual(got, want) {
		t.Fatalf("queue for rb-b %v, want %v", got, want)
	}
	src.exclude = "rb-a"
	if got, want := paths(rebuildQueue(src)), []string{none.ni.StorePath}; !reflect.DeepEqual(got, want) {
		t.Fatalf("queue for rb-a %v, want %v", got, want)
	}
}

// BenchmarkRebuildQueueFull computes the queue over a full rejection log
// (what each scrape of cacheproxy_rebuild_queue_paths costs), next to
// reading the log alone.
func BenchmarkRebuildQueueFull(b *testing.B) {
	f := newFixture(b, false)
	t0 := time.Now()
	for i := range cache.MaxRejections {
		o := newObj(fmt.Sprintf("bench-%d", i))
		if err := f.db.RecordRejection(cache.Rejection{StorePath: o.ni.StorePath, Reason: "unattested", Last: t0}); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("read log", func(b *testing.B) {
		for range b.N {
			if _, err := f.db.Rejections(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("queue length", func(b *testing.B) {
		for range b.N {
			if n, err := f.g.rebuildQueueLen(); err != nil || n != cache.MaxRejections {
				b.Fatal(n, err)
			}
		}
	})
}
