package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// withReports adds the report to the entry it belongs to, keeps every
// field Nix wrote, leaves the other entries alone, and drops the entries
// not to post.
func TestWithReports(t *testing.T) {
	in := `[{"path":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a","narHash":"sha256:1","narSize":1,"signatures":["k:s"]},` +
		`{"path":"/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b","narHash":"sha256:2","narSize":2}]`
	rep := &rebuildReport{Classification: classNotReproducible, UpstreamNarHash: "sha256:0",
		Builds: []buildResult{{"sha256:1", 1}, {"sha256:3", 3}}}
	a, b := "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a", "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-b"
	out, err := withReports(in, map[string]*rebuildReport{a: rep}, []string{a, b})
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
	if onlyB, err := withReports(in, map[string]*rebuildReport{a: rep}, []string{b}); err != nil || onlyB != `[{"narHash":"sha256:2","narSize":2,"path":"`+b+`"}]` {
		t.Fatalf("only b to post: %s, %v", onlyB, err)
	}
	if _, err := withReports("not json", map[string]*rebuildReport{"x": rep}, nil); err == nil || !strings.Contains(err.Error(), "nix path-info --json") {
		t.Fatalf("bad path-info JSON: error %v", err)
	}
}

// nixMessage finds Nix's error line, and places an evaluation error.
func TestNixMessage(t *testing.T) {
	for _, tc := range []struct{ stderr, want string }{
		{"building '/nix/store/x.drv'...\nerror: builder for '/nix/store/x.drv' failed with exit code 1\n", "error: builder for '/nix/store/x.drv' failed with exit code 1"},
		{"error: undefined variable 'undefinedThing'\n\n       at /tmp/broken.nix:1:7:\n\n            1| { x = undefinedThing; }\n             |       ^\n",
			"error: undefined variable 'undefinedThing' (at /tmp/broken.nix:1:7)"},
		{"warning: something\nerror: first\nerror: the last one\nbuild log line\n", "error: the last one"},
		{"no error line at all\nlast\n", "last"},
	} {
		if got := nixMessage(tc.stderr); got != tc.want {
			t.Errorf("nixMessage(%q) = %q, want %q", tc.stderr, got, tc.want)
		}
	}
}
