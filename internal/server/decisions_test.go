package server

import (
	"net/http"
	"path"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/gate"
)

func withRequireClosure(c *config.Config) { c.Policy.RequireClosure = true }

// closureObj is a store object referencing refs (by their objects).
func closureObj(t *testing.T, name string, seed int64, refs ...*storeObj) *storeObj {
	t.Helper()
	o := newObj(t, name, dirNAR(t, seed, 200), "zstd")
	for _, r := range refs {
		o.ni.References = append(o.ni.References, path.Base(r.storePath))
	}
	return o
}

func (f *fixture) expectDecision(o *storeObj, code int, header string) {
	f.t.Helper()
	resp, body := f.mustGet("/" + o.hash + ".narinfo")
	if resp.StatusCode != code || !strings.HasPrefix(resp.Header.Get("X-Cacheproxy-Decision"), header) {
		f.t.Fatalf("%s: %d %q (%s), want %d %q", path.Base(o.storePath), resp.StatusCode,
			resp.Header.Get("X-Cacheproxy-Decision"), strings.TrimSpace(string(body)), code, header)
	}
}

// Stored decisions do not outlive the settings they were made under: a
// path served in report mode is refused once the server restarts in
// enforce mode.
func TestSettingsChangeForgetsDecisions(t *testing.T) {
	f := newFixture(t, withMode("report"))
	o := newObj(t, "report-then-enforce-1", dirNAR(t, 21, 300), "zstd")
	f.up.publish(o)
	f.expectDecision(o, 200, "rejected; reason=unattested")
	f.stop()
	f.cfg.Mode = "enforce"
	f.start()
	f.expectDecision(o, 404, "rejected; reason=unattested")
	if resp, _ := f.mustGet(f.narURLFor(o)); resp.StatusCode != http.StatusNotFound {
		t.Errorf("NAR of a path no longer served: %d, want 404", resp.StatusCode)
	}
}

// narURLFor is the proxy's NAR URL for o without asking for the narinfo.
func (f *fixture) narURLFor(o *storeObj) string {
	return "/nar/" + o.hash + "-" + o.ni.NarHash.Nix32() + ".nar.zst"
}

// A reference shared by two branches of a closure (a diamond) is approved
// on both, on the very first request.
func TestClosureDiamond(t *testing.T) {
	f := newFixture(t, withRequireClosure)
	d := closureObj(t, "diamond-d-1", 31)
	b := closureObj(t, "diamond-b-1", 32, d)
	c := closureObj(t, "diamond-c-1", 33, d)
	a := closureObj(t, "diamond-a-1", 34, b, c)
	for _, o := range []*storeObj{a, b, c, d} {
		f.up.publish(o)
		f.attest(o)
	}
	f.expectDecision(a, 200, "approved; reason=attested")
}

// With require_closure, a parent's approval ends when a reference's does.
func TestClosureReferenceLosesApproval(t *testing.T) {
	f := newFixture(t, withRequireClosure)
	ref := closureObj(t, "lose-ref-1", 41)
	parent := closureObj(t, "lose-parent-1", 42, ref)
	f.up.publish(ref)
	f.up.publish(parent)
	f.attest(parent)
	if code, body := f.admin("POST", adminapi.PathAllowlist, jsonBody(adminapi.AllowRequest{Paths: []string{ref.storePath}})); code != 200 {
		t.Fatalf("allow add: %d %s", code, body)
	}
	f.expectDecision(parent, 200, "approved; reason=attested")
	if code, body := f.admin("DELETE", adminapi.PathAllowlist, jsonBody(adminapi.PathsRequest{Paths: []string{ref.hash}})); code != 200 {
		t.Fatalf("allow remove: %d %s", code, body)
	}
	f.expectDecision(ref, 404, "rejected; reason=unattested")
	f.expectDecision(parent, 404, "rejected; reason=closure_incomplete")
}

// A reference whose upstream fails transiently makes the parent a 503, not
// a 404 (which the client would cache) nor a 500.
func TestClosureReferenceUnavailable(t *testing.T) {
	f := newFixture(t, withRequireClosure)
	ref := closureObj(t, "unavail-ref-1", 51)
	parent := closureObj(t, "unavail-parent-1", 52, ref)
	f.up.publish(ref)
	f.up.publish(parent)
	f.attest(ref)
	f.attest(parent)
	f.up.handle("/"+ref.hash+".narinfo", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "busy", http.StatusServiceUnavailable)
	})
	resp, _ := f.mustGet("/" + parent.hash + ".narinfo")
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("parent with an unavailable reference: %d (Retry-After %q), want 503 with Retry-After",
			resp.StatusCode, resp.Header.Get("Retry-After"))
	}
	f.up.handle("/"+ref.hash+".narinfo", nil)
	f.expectDecision(parent, 200, "approved; reason=attested")
}

// explain decides without storing anything, references included.
func TestExplainStoresNothing(t *testing.T) {
	f := newFixture(t, withRequireClosure)
	ref := closureObj(t, "explain-ref-1", 61)
	parent := closureObj(t, "explain-parent-1", 62, ref)
	for _, o := range []*storeObj{ref, parent} {
		f.up.publish(o)
		f.attest(o)
	}
	code, body := f.admin("GET", adminapi.PathExplain+parent.hash, "")
	if code != 200 || !strings.Contains(body, `"status": "approved"`) {
		t.Fatalf("explain: %d %s", code, body)
	}
	for _, o := range []*storeObj{ref, parent} {
		if rec, err := f.s.db.Record(o.hash); err != nil || rec != nil {
			t.Errorf("explain stored a decision for %s (%v)", o.storePath, err)
		}
	}
	if v := f.metric("cacheproxy_decisions_total", `decision="approved",reason="attested"`); v != 0 {
		t.Errorf("explain counted %v decisions", v)
	}
}

// An upstream that keeps ending a NAR early while declaring no length
// anywhere (no Content-Length, no FileSize) cannot hide behind "truncated"
// forever: after a few transfers in a row the path is quarantined.
func TestRepeatedShortNarWithoutLength(t *testing.T) {
	f := newFixture(t)
	o := newObj(t, "short-unknown-length-1", dirNAR(t, 71, 64<<10), "zstd")
	o.ni.FileSize = 0
	f.up.publish(o)
	f.attest(o)
	f.up.handle("/"+o.ni.URL, func(w http.ResponseWriter, r *http.Request) {
		w.Write(o.file[:len(o.file)/2]) // no Content-Length: chunked, then a clean end
	})
	nar := f.narURL(o)
	for i := 1; i <= gate.MaxAmbiguousTruncations; i++ {
		resp, body, err := f.get(nar)
		if err == nil && resp.StatusCode == 200 && len(body) == len(o.file) {
			t.Fatalf("transfer %d: a short NAR was delivered whole", i)
		}
		want := `decision="approved"`
		if i == gate.MaxAmbiguousTruncations {
			want = `decision="rejected"`
		}
		code, hdr := f.narinfoDecision(o)
		if !strings.Contains(hdr, strings.Trim(strings.TrimPrefix(want, `decision=`), `"`)) {
			t.Fatalf("after %d short transfers: %d %q, want %s", i, code, hdr, want)
		}
	}
	if v := f.metric("cacheproxy_nar_verification_failures_total", `check="truncated"`); v != gate.MaxAmbiguousTruncations-1 {
		t.Errorf("truncated = %v, want %d", v, gate.MaxAmbiguousTruncations-1)
	}
}

func (f *fixture) narinfoDecision(o *storeObj) (int, string) {
	resp, _ := f.mustGet("/" + o.hash + ".narinfo")
	return resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision")
}
