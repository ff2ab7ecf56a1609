package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// withReports adds the report to the entry it belongs to, keeps every
// field Nix wrote, and leaves the other entries alone.
func TestWithReports(t *testing.T) {
	in := `[{"path":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a","narHash":"sha256:1","narSize":1,"signatures":["k:s"]},` +
		`{"path":"/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b","narHash":"sha256:2","narSize":2}]`
	rep := &rebuildReport{Classification: classNotReproducible, UpstreamNarHash: "sha256:0",
		Builds: []buildResult{{"sha256:1", 1}, {"sha256:3", 3}}}
	out, err := withReports(in, map[string]*rebuildReport{"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a": rep})
	if err != nil {
		t.Fatal(err)
	}
	var got []map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(got) != 2 || got[0]["signatures"] == nil || got[1]["cacheproxy"] != nil {
		t.Fatalf("entries changed beyond the report: %s", out)
	}
	cp, _ := json.Marshal(got[0]["cacheproxy"])
	want := `{"builds":[{"narHash":"sha256:1","narSize":1},{"narHash":"sha256:3","narSize":3}],"classification":"not_reproducible","upstreamNarHash":"sha256:0"}`
	if string(cp) != want {
		t.Fatalf("report %s, want %s", cp, want)
	}
	if same, err := withReports(in, nil); err != nil || same != in {
		t.Fatalf("no reports changed the JSON: %q, %v", same, err)
	}
	if _, err := withReports("not json", map[string]*rebuildReport{"x": rep}); err == nil || !strings.Contains(err.Error(), "nix path-info --json") {
		t.Fatalf("bad path-info JSON: error %v", err)
	}
}
