package e2e

import (
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"testing"
)

// withReport adds a rebuilder's "cacheproxy" report to every entry of an
// attestation file (path-info JSON array) and returns the new file.
func withReport(t *testing.T, file, report string) string {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var infos []map[string]any
	if err := json.Unmarshal(raw, &infos); err != nil {
		t.Fatalf("attestation file %s: %v", file, err)
	}
	for _, info := range infos {
		info["cacheproxy"] = json.RawMessage(report)
	}
	out, err := json.Marshal(infos)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, out, 0o644); err != nil {
		t.Fatal(err)
	}
	return file
}

// The alarm, classified: the rebuilder built app twice and got the same
// NarHash both times, but the upstream (its key stolen) serves other bytes.
// A real Nix client is refused, and explain and rejections say "stable".
func TestStableMismatchRefusedAndExplained(t *testing.T) {
	t.Parallel()
	var att string
	f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) {
		att = attestFile(t, rb1Key, f.C.App) // the rebuilder saw the real thing
		ni := f.Up.Narinfo(t, f.C.App)
		ni.Set("NarHash", fakeNarHash("stable"))
		f.Up.Resign(ni, upKey)
		f.Up.PutNarinfo(t, f.C.App, ni)
	})
	f.Px.Attest(t, withReport(t, att, `{"classification":"stable","upstreamNarHash":"`+fakeNarHash("stable")+`"}`))

	cl := newClient(t)
	if out, err := cl.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App); err == nil || cl.Has(f.C.App) {
		t.Fatalf("the client substituted a path whose upstream NarHash differs from a stable rebuild:\n%s", out)
	}
	f.Px.ExpectRejected(t, f.C.App, "attestation_mismatch")

	ex := f.Px.MustCLI(t, "explain", string(f.C.App))
	for _, w := range []string{"classification: stable", "rebuild:    " + rb1Key.Name + ", attested ", "classified stable",
		"last rejected: attestation_mismatch (stable)"} {
		if !strings.Contains(ex, w) {
			t.Errorf("explain lacks %q:\n%s", w, ex)
		}
	}
	if rej := f.Px.MustCLI(t, "rejections"); !strings.Contains(rej, "attestation_mismatch (stable)") {
		t.Errorf("rejections lack the classification:\n%s", rej)
	}
	if v := f.Px.MetricSum(t, "cacheproxy_attestation_mismatches_total", map[string]string{"classification": "stable"}); v < 1 {
		t.Errorf("cacheproxy_attestation_mismatches_total{classification=stable} = %v, want >= 1", v)
	}
}

// rebuildQueue reads GET /admin/v1/rebuild-queue from the real server.
func rebuildQueue(t *testing.T, px *Proxy) []map[string]any {
	t.Helper()
	req, err := http.NewRequest("GET", px.AdminURL+"/admin/v1/rebuild-queue", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+px.AdminToken(t))
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var q struct {
		Paths []map[string]any `json:"paths"`
	}
	if resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&q) != nil || q.Paths == nil {
		t.Fatalf("GET rebuild-queue: %s", resp.Status)
	}
	return q.Paths
}

// The loop by hand: with require_closure, a client is refused an attested
// app whose leaf nobody rebuilt; the rebuild queue names the leaf and its
// deriver; once the leaf is attested the queue is empty, the client gets
// the app, and the wait shows in cacheproxy_time_to_attestation_seconds.
func TestRebuildQueueThenSubstitute(t *testing.T) {
	t.Parallel()
	f, cl := leafQueued(t)
	q := rebuildQueue(t, f.Px)
	if len(q) != 1 || q[0]["store_path"] != string(f.C.Leaf) || q[0]["reason"] != "unattested" ||
		!strings.HasSuffix(q[0]["deriver"].(string), ".drv") {
		t.Fatalf("rebuild queue %v, want the leaf with its deriver", q)
	}
	if v := f.Px.MetricSum(t, "cacheproxy_rebuild_queue_paths", nil); v != 1 {
		t.Errorf("cacheproxy_rebuild_queue_paths = %v, want 1", v)
	}
	f.Px.Attest(t, attestFile(t, rb1Key, f.C.Leaf))
	if q := rebuildQueue(t, f.Px); len(q) != 0 {
		t.Fatalf("rebuild queue after the leaf was attested: %v", q)
	}
	cl.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	if v := f.Px.MetricSum(t, "cacheproxy_time_to_attestation_seconds_count", nil); v < 1 {
		t.Errorf("cacheproxy_time_to_attestation_seconds_count = %v, want >= 1", v)
	}
}
