package server

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
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
	// Asked by a rebuilder that did not attest the leaf: still queued; an
	// unknown attester name is a mistake.
	if code, body := f.admin("GET", adminapi.PathRebuildQueue+"?attester=rebuilder-1", ""); code != 200 || !strings.Contains(body, leaf.storePath) {
		t.Fatalf("queue for rebuilder-1: %d %s", code, body)
	}
	if code, body := f.admin("GET", adminapi.PathRebuildQueue+"?attester=nobody", ""); code != 400 || !strings.Contains(body, "policy.attesters") {
		t.Fatalf("queue for an unknown attester: %d %s", code, body)
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

// pathInfoJSON is a rebuilder's `nix path-info --json` entry for o, as if
// it had rebuilt narHash/narSize, signed by key, with the "cacheproxy"
// report (raw JSON, or "" for none).
func pathInfoJSON(t *testing.T, o *storeObj, narHash narinfo.SHA256, narSize uint64, key verify.SecretKey, report string) string {
	t.Helper()
	refs := make([]string, 0, len(o.ni.References))
	for _, r := range o.ni.References {
		refs = append(refs, storeDir+"/"+r)
	}
	fp, err := narinfo.Fingerprint(storeDir, o.storePath, narHash, narSize, o.ni.References)
	if err != nil {
		t.Fatal(err)
	}
	e := map[string]any{"path": o.storePath, "narHash": narHash.String(), "narSize": narSize, "references": refs,
		"signatures": []string{key.Sign(fp)}}
	if report != "" {
		e["cacheproxy"] = json.RawMessage(report)
	}
	raw, err := json.Marshal([]any{e})
	if err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

// A rebuilder that got another NarHash twice says so ("stable"): the path
// is refused as attestation_mismatch, and the classification shows in the
// rejection log, explain and the mismatch counter. A matching rebuild
// shows in explain with its key and time.
func TestMismatchClassification(t *testing.T) {
	f := newFixture(t)
	bad := closureObj(t, "cls-bad-1", 71)
	good := closureObj(t, "cls-good-1", 72)
	f.up.publish(bad)
	f.up.publish(good)
	other := sha256Str([]byte("what the source really builds"))
	body := pathInfoJSON(t, bad, other, bad.ni.NarSize, f.rebuilder,
		`{"classification":"stable","upstreamNarHash":"`+bad.ni.NarHash.String()+`","builds":[{"narHash":"`+other.String()+`","narSize":200},{"narHash":"`+other.String()+`","narSize":200}]}`)
	if code, out := f.admin("POST", adminapi.PathAttestations, body); code != 200 || !strings.Contains(out, `"stored": 1`) {
		t.Fatalf("import: %d %s", code, out)
	}
	f.expectDecision(bad, 404, "rejected; reason=attestation_mismatch")
	if n := f.metric("cacheproxy_attestation_mismatches_total", `classification="stable"`); n != 1 {
		t.Fatalf("stable mismatches %v, want 1", n)
	}
	if n := f.metric("cacheproxy_attestation_mismatches_total", `classification="not_reproducible"`); n != 0 {
		t.Fatalf("not_reproducible mismatches %v, want 0", n)
	}

	code, out := f.admin("GET", adminapi.PathRejections, "")
	var rejs adminapi.Rejections
	if code != 200 || json.Unmarshal([]byte(out), &rejs) != nil || len(rejs.Rejections) != 1 || rejs.Rejections[0].Classification != "stable" {
		t.Fatalf("rejections: %d %s", code, out)
	}
	ex := f.explain(bad.hash)
	if ex.Decision == nil || ex.Decision.Classification != "stable" || len(ex.Decision.Rebuilds) != 1 ||
		ex.Decision.Rebuilds[0].Matches || ex.Decision.Rebuilds[0].Classification != "stable" || ex.Decision.Rebuilds[0].NarHash != other.String() {
		t.Fatalf("explain of the mismatch: %+v", ex.Decision)
	}
	if ex.Rejection == nil || ex.Rejection.Classification != "stable" {
		t.Fatalf("explain's last rejection: %+v", ex.Rejection)
	}
	if resp, page := f.mustGet("/"); resp.StatusCode != 200 || !strings.Contains(section(t, string(page), "rejections"), "attestation_mismatch (stable)") {
		t.Fatalf("status page rejections lack the classification: %d\n%s", resp.StatusCode, page)
	}
	// Not in the rebuild queue: no rebuild can approve it.
	if q := f.rebuildQueue(); len(q.Paths) != 0 {
		t.Fatalf("a mismatch queued for rebuild: %+v", q)
	}

	// The rebuilder re-posts the same signature, now not_reproducible:
	// the report is replaced, the verdict follows.
	body = pathInfoJSON(t, bad, other, bad.ni.NarSize, f.rebuilder, `{"classification":"not_reproducible"}`)
	if code, out := f.admin("POST", adminapi.PathAttestations, body); code != 200 || !strings.Contains(out, `"stored": 1`) {
		t.Fatalf("re-import: %d %s", code, out)
	}
	f.expectDecision(bad, 404, "rejected; reason=attestation_mismatch")
	if ex := f.explain(bad.hash); ex.Decision.Classification != "not_reproducible" {
		t.Fatalf("explain after re-import: %+v", ex.Decision)
	}

	// A matching rebuild approves, and explain names its key and time.
	f.attest(good)
	f.expectDecision(good, 200, "approved; reason=attested")
	ex = f.explain(good.hash)
	if len(ex.Decision.Rebuilds) != 1 || !ex.Decision.Rebuilds[0].Matches || ex.Decision.Rebuilds[0].Key != "rebuilder-1" ||
		ex.Decision.Rebuilds[0].Imported.IsZero() || ex.Decision.Classification != "" {
		t.Fatalf("explain of an attested path: %+v", ex.Decision)
	}
}

func (f *fixture) explain(hash string) adminapi.Explain {
	f.t.Helper()
	code, body := f.admin("GET", adminapi.PathExplain+hash, "")
	var ex adminapi.Explain
	if code != 200 || json.Unmarshal([]byte(body), &ex) != nil {
		f.t.Fatalf("explain %s: %d %s", hash, code, body)
	}
	return ex
}
