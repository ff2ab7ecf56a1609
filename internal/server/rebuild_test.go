package server

import (
	"encoding/json"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
)

func (f *fixture) rebuildQueue() adminapi.RebuildQueue {
	f.t.Helper()
	code, body := f.admin("GET", adminapi.PathRebuildQueue, "")
	if code != 200 {
		f.t.Fatalf("GET rebuild-queue: %d %s", code, body)
	}
	var q adminapi.RebuildQueue
	if err := json.Unmarshal([]byte(body), &q); err != nil {
		f.t.Fatalf("rebuild-queue answer: %v\n%s", err, body)
	}
	return q
}

// The rebuild queue lists the unattested reference that keeps an attested
// path from approval; its length is a gauge; once the reference is
// attested the queue empties and the wait shows in the histogram.
func TestRebuildQueueAPIAndMetrics(t *testing.T) {
	f := newFixture(t, withRequireClosure)
	leaf := closureObj(t, "rq-leaf-1", 61)
	leaf.ni.Deriver = "0000000000000000000000000000000a-rq-leaf-1.drv"
	app := closureObj(t, "rq-app-1", 62, leaf)
	f.up.publish(leaf)
	f.up.publish(app)
	f.attest(app)
	if q := f.rebuildQueue(); q.Paths == nil || len(q.Paths) != 0 {
		t.Fatalf("queue before any request: %+v (want an empty list, not null)", q)
	}
	f.expectDecision(app, 404, "rejected; reason=closure_incomplete")

	q := f.rebuildQueue()
	if len(q.Paths) != 1 {
		t.Fatalf("queue %+v, want the leaf", q)
	}
	e := q.Paths[0]
	if e.StorePath != leaf.storePath || e.Reason != "unattested" || e.Requests != 1 ||
		e.Deriver != storeDir+"/"+leaf.ni.Deriver || e.First.IsZero() || e.Last.Before(e.First) {
		t.Fatalf("queue entry %+v", e)
	}
	if n := f.metric("cacheproxy_rebuild_queue_paths", ""); n != 1 {
		t.Fatalf("cacheproxy_rebuild_queue_paths = %v, want 1", n)
	}
	if n := f.metric("cacheproxy_time_to_attestation_seconds_count", ""); n != 0 {
		t.Fatalf("time to attestation observed %v times before any attestation", n)
	}

	f.attest(leaf) // drops the negative answers: evidence changed
	f.expectDecision(app, 200, "approved; reason=attested")
	if q := f.rebuildQueue(); len(q.Paths) != 0 {
		t.Fatalf("queue after approval: %+v", q)
	}
	if n := f.metric("cacheproxy_rebuild_queue_paths", ""); n != 0 {
		t.Fatalf("cacheproxy_rebuild_queue_paths = %v after approval, want 0", n)
	}
	// Both waited: the leaf (unattested) and the app (closure_incomplete).
	if n := f.metric("cacheproxy_time_to_attestation_seconds_count", ""); n != 2 {
		t.Fatalf("time to attestation observed %v times, want 2", n)
	}
	// Without a token, no queue.
	if code, _ := f.adminAs("wrong-token-wrong-token-wrong-token-wrong", "GET", adminapi.PathRebuildQueue, ""); code != 401 {
		t.Fatalf("rebuild-queue without the token: %d", code)
	}
}
