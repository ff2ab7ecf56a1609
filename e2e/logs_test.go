package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// jsonLogLines parses the proxy's log as JSON lines; any other line fails
// the test.
func jsonLogLines(t testing.TB, logs string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("log line is not JSON (%v): %s", err, line)
		}
		out = append(out, m)
	}
	return out
}

// findLog returns the first line with every field of want.
func findLog(lines []map[string]any, want map[string]any) map[string]any {
next:
	for _, l := range lines {
		for k, v := range want {
			if fmt.Sprint(l[k]) != fmt.Sprint(v) {
				continue next
			}
		}
		return l
	}
	return nil
}

// With log_format = "json" the proxy writes one JSON object per line: one
// per decision with its evidence (path, reason, upstream, attesters) and one
// per NAR download with its verification result (path, file, bytes,
// outcome).
func TestJSONLogs(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, nil)
	px := f.Px
	text, err := os.ReadFile(px.CfgFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(px.CfgFile, append([]byte("log_format = \"json\"\n"), text...), 0o644); err != nil {
		t.Fatal(err)
	}
	px.Restart(t)

	px.ExpectRejected(t, f.C.App, "unattested")
	f.attestClosure(t)
	cl := newClient(t)
	cl.MustSubstitute(t, px.URL, px.GatekeeperKey, f.C.App)

	upstream := f.Up.Spec().URL
	var lines []map[string]any
	eventually(t, 5*time.Second, func() error { // the log pipe is copied asynchronously
		lines = jsonLogLines(t, px.Logs())
		for _, p := range f.C.Paths() {
			if findLog(lines, map[string]any{"msg": "NAR verified and cached", "path": string(p)}) == nil {
				return fmt.Errorf("no NAR verification line for %s", p)
			}
		}
		return nil
	})
	if l := findLog(lines, map[string]any{"msg": "rejected", "path": string(f.C.App)}); l == nil ||
		l["level"] != "WARN" || l["reason"] != "unattested" || l["upstream"] != upstream || l["served"] != false {
		t.Errorf("rejection line: %v", l)
	}
	for _, p := range f.C.Paths() {
		l := findLog(lines, map[string]any{"msg": "approved", "path": string(p)})
		if l == nil || l["reason"] != "attested" || l["upstream"] != upstream || l["attesters"] != rb1Key.Name || l["upstream_signers"] != upKey.Name {
			t.Errorf("approval line of %s: %v", p.Name(), l)
		}
		l = findLog(lines, map[string]any{"msg": "NAR verified and cached", "path": string(p)})
		file, _ := l["file"].(string)
		bytes, _ := l["bytes"].(float64)
		if !strings.HasPrefix(file, p.Hash()+"-") || !strings.HasSuffix(file, ".nar.zst") || bytes <= 0 ||
			l["outcome"] != "verified" || l["upstream"] != upstream {
			t.Errorf("NAR line of %s: %v", p.Name(), l)
		}
	}
	for _, l := range lines {
		for k, v := range l {
			if s, ok := v.(string); ok && strings.Contains(s, "map[") {
				t.Errorf("log field %s prints a Go map: %v", k, l)
			}
		}
	}
}
