package server

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
)

// Every bad admin request is a 4xx that changes nothing.
func TestAdminBadInputChangesNothing(t *testing.T) {
	f := newFixture(t)
	long := "*-" + strings.Repeat("x", 33<<10) + "*"
	for _, tc := range []struct {
		name, method, path, body, want string
	}{
		{"33 KiB deny pattern", "POST", adminapi.PathDenylist, jsonBody(adminapi.DenyRequest{Patterns: []string{long}}), "at most"},
		{"huge reason", "POST", adminapi.PathDenylist, jsonBody(adminapi.DenyRequest{Patterns: []string{"*-a-1*"}, Reason: strings.Repeat("r", 5<<10)}), "reason"},
		{"two JSON objects", "POST", adminapi.PathDenylist, `{"patterns":["*-first-*"]} {"patterns":["*-second-*"]}`, "trailing data"},
		{"trailing garbage", "POST", adminapi.PathDenylist, `{"patterns":["*-first-*"]} x`, "trailing data"},
		{"unknown field", "POST", adminapi.PathDenylist, `{"patterns":["*-first-*"],"reasn":"typo"}`, "unknown field"},
		{"long path", "DELETE", adminapi.PathAllowlist, jsonBody(adminapi.PathsRequest{Paths: []string{strings.Repeat("a", 2000)}}), "at most"},
		{"long expiry", "POST", adminapi.PathAllowlist, jsonBody(adminapi.AllowRequest{Paths: []string{"x"}, Expires: strings.Repeat("9", 2000)}), "expiry"},
		{"not JSON", "POST", adminapi.PathRetry, `paths=x`, "malformed JSON"},
		{"body over 4 MiB", "POST", adminapi.PathDenylist, `{"patterns":["` + strings.Repeat("a", 5<<20) + `"]}`, "too large"},
	} {
		code, body := f.admin(tc.method, tc.path, tc.body)
		if code != 400 || !strings.Contains(body, tc.want) {
			t.Errorf("%s: %d %s, want 400 mentioning %q", tc.name, code, strings.TrimSpace(body), tc.want)
		}
	}
	if _, body := f.admin("GET", adminapi.PathDenylist, ""); !strings.Contains(body, `"entries": []`) {
		t.Errorf("a refused request left entries behind: %s", body)
	}
}

// The admin token must not be guessable, and its file not readable by others.
func TestAdminTokenChecks(t *testing.T) {
	f := newFixture(t)
	f.stop()
	tokenFile := f.cfg.AdminTokenFile()
	if err := os.WriteFile(tokenFile, []byte("ab\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(f.cfg, f.log); err == nil || !strings.Contains(err.Error(), "at least 16") {
		t.Fatalf("a 2-character token was accepted: %v", err)
	}
	if err := os.WriteFile(tokenFile, []byte(strings.Repeat("k", 32)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tokenFile, 0o644); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	s, err := New(f.cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if !strings.Contains(logs.String(), "readable by other users") {
		t.Errorf("no warning for a world-readable token file; logs:\n%s", logs.String())
	}
}

// A second server on the same state dir says who holds it, at once.
func TestSecondServerOnStateDir(t *testing.T) {
	f := newFixture(t)
	_, err := New(f.cfg, f.log)
	if err == nil || !strings.Contains(err.Error(), "in use by another cacheproxy (PID") {
		t.Fatalf("second server: %v", err)
	}
}

// /healthz says 503, with the reason, when the state file is gone.
func TestHealthzStateFileGone(t *testing.T) {
	f := newFixture(t)
	if resp, body := f.mustGet("/healthz?verbose"); resp.StatusCode != 200 || !strings.Contains(string(body), "state_file: ok") {
		t.Fatalf("healthy: %d %s", resp.StatusCode, body)
	}
	if err := os.Remove(filepath.Join(f.cfg.StateDir, "state.db")); err != nil {
		t.Fatal(err)
	}
	resp, body := f.mustGet("/healthz")
	if resp.StatusCode != 503 || !strings.Contains(string(body), "state.db is gone") {
		t.Fatalf("state file deleted: %d %s", resp.StatusCode, body)
	}
}
