package server

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
)

// writeToken writes a named token file and returns its path.
func writeToken(t *testing.T, dir, name, token string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name+".token")
	if err := os.WriteFile(p, []byte(token+"\n"), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

// adminAs calls the admin API with a given bearer token.
func (f *fixture) adminAs(token, method, path, body string) (int, string) {
	f.t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+token)
	rec := httptest.NewRecorder()
	f.s.AdminHandler().ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

func (f *fixture) audit(query string) []adminapi.AuditRecord {
	f.t.Helper()
	code, body := f.admin("GET", adminapi.PathAudit+query, "")
	if code != 200 {
		f.t.Fatalf("GET audit%s: %d %s", query, code, body)
	}
	var a adminapi.Audit
	if err := json.Unmarshal([]byte(body), &a); err != nil {
		f.t.Fatalf("audit answer: %v\n%s", err, body)
	}
	return a.Records
}

// Named tokens: each authenticates as its name, the default token as
// "admin", and the audit trail says who made each change and why.
func TestNamedTokensAndAudit(t *testing.T) {
	dir := t.TempDir()
	aliceTok, rbTok := strings.Repeat("a", 40), strings.Repeat("r", 40)
	alice := writeToken(t, dir, "alice", aliceTok, 0o600)
	rb := writeToken(t, dir, "rebuilder", rbTok, 0o600)
	f := newFixture(t, func(c *config.Config) {
		c.Admin.Tokens = []config.AdminToken{{Name: "alice", File: alice}, {Name: "rebuilder", File: rb}}
	})
	o := closureObj(t, "audit-app-1", 51)
	f.up.publish(o)

	// The rebuilder imports its attestation, with a reason in the query.
	if code, body := f.adminAs(rbTok, "POST", adminapi.PathAttestations+"?reason="+url.QueryEscape("nightly rebuild"), string(o.signed(f.rebuilder))); code != 200 {
		t.Fatalf("attest as rebuilder: %d %s", code, body)
	}
	// Alice allows twice: the second answer names the entry it replaced.
	add := func(reason, expires string) adminapi.AllowList {
		code, body := f.adminAs(aliceTok, "POST", adminapi.PathAllowlist, jsonBody(adminapi.AllowRequest{Paths: []string{o.storePath}, Reason: reason, Expires: expires}))
		if code != 200 {
			t.Fatalf("allow add: %d %s", code, body)
		}
		var l adminapi.AllowList
		if err := json.Unmarshal([]byte(body), &l); err != nil {
			t.Fatal(err)
		}
		return l
	}
	if l := add("reviewed", "30d"); len(l.Replaced) != 0 {
		t.Errorf("first allow add replaced %+v", l.Replaced)
	}
	l := add("re-reviewed", "")
	if len(l.Replaced) != 1 || l.Replaced[0].Reason != "reviewed" || l.Replaced[0].Expires.IsZero() {
		t.Fatalf("second allow add answers replaced=%+v, want the first entry", l.Replaced)
	}
	// The default token removes it, with a reason; a bad request is
	// refused and recorded too.
	if code, body := f.admin("DELETE", adminapi.PathAllowlist, jsonBody(adminapi.PathsRequest{Paths: []string{o.hash}, Reason: "attested now"})); code != 200 {
		t.Fatalf("allow remove: %d %s", code, body)
	}
	if code, _ := f.adminAs(aliceTok, "DELETE", adminapi.PathDenylist, `{"patterns":["x"],"reasn":"typo"}`); code != 400 {
		t.Fatalf("malformed deny remove: %d", code)
	}
	if code, _ := f.adminAs(aliceTok, "POST", adminapi.PathRetry, jsonBody(adminapi.PathsRequest{Paths: []string{"not-a-path"}, Reason: "try"})); code != 400 {
		t.Fatalf("retry of a bad path: %d", code)
	}
	// A wrong token is still a 401 and records nothing.
	if code, _ := f.adminAs(strings.Repeat("x", 40), "POST", adminapi.PathDenylist, jsonBody(adminapi.DenyRequest{Patterns: []string{"*-x-*"}})); code != 401 {
		t.Fatalf("wrong token: %d", code)
	}

	recs := f.audit("")
	want := []struct{ who, action, outcome, reason string }{
		{"rebuilder", "attest_import", "ok", "nightly rebuild"},
		{"alice", "allow_add", "ok", "reviewed"},
		{"alice", "allow_add", "replaced", "re-reviewed"},
		{"admin", "allow_remove", "ok", "attested now"},
		{"alice", "deny_remove", "failed", ""},
		{"alice", "retry", "failed", "try"},
	}
	if len(recs) != len(want) {
		t.Fatalf("%d audit records, want %d:\n%+v", len(recs), len(want), recs)
	}
	for i, w := range want {
		r := recs[i]
		if r.Who != w.who || r.Action != w.action || r.Outcome != w.outcome || r.Reason != w.reason {
			t.Errorf("record %d = %s %s %s %q, want %+v", i, r.Who, r.Action, r.Outcome, r.Reason, w)
		}
	}
	if r := recs[0]; len(r.What) != 1 || r.What[0] != o.storePath || r.Counts["stored"] != 1 {
		t.Errorf("attest record: %+v", r)
	}
	if r := recs[2]; len(r.PreviousAllow) != 1 || r.PreviousAllow[0].Reason != "reviewed" || r.PreviousAllow[0].NarHash == "" {
		t.Errorf("replacing record keeps %+v, want the old entry", r.PreviousAllow)
	}
	if r := recs[4]; !strings.Contains(r.Error, "unknown field") {
		t.Errorf("refused record: %+v", r)
	}

	// ?since leaves older records out; a bad since is a 400.
	since := recs[3].Time.Format(time.RFC3339Nano)
	if got := f.audit("?since=" + url.QueryEscape(since)); len(got) != 3 || got[0].Action != "allow_remove" {
		t.Errorf("audit since %s: %+v", since, got)
	}
	if got := f.audit("?since=" + url.QueryEscape(time.Now().Add(time.Hour).Format(time.RFC3339))); len(got) != 0 {
		t.Errorf("audit since the future: %+v", got)
	}
	if code, body := f.admin("GET", adminapi.PathAudit+"?since=yesterday", ""); code != 400 || !strings.Contains(body, "RFC 3339") {
		t.Errorf("bad since: %d %s", code, body)
	}
	// The audit needs a token like every admin route.
	if code, _ := f.adminAs("", "GET", adminapi.PathAudit, ""); code != 401 {
		t.Errorf("audit without a token: %d", code)
	}
}

// Named token files are checked as admin.token_file is: long enough, not
// shared between names, and a warning when others may read them.
func TestNamedTokenChecks(t *testing.T) {
	f := newFixture(t)
	f.stop()
	dir := t.TempDir()
	for _, tc := range []struct {
		name   string
		tokens func() []config.AdminToken
		want   string
	}{
		{"short", func() []config.AdminToken {
			return []config.AdminToken{{Name: "alice", File: writeToken(t, dir, "short", "abc", 0o600)}}
		}, "admin.tokens[0] (alice): admin token in"},
		{"same as the default token", func() []config.AdminToken {
			return []config.AdminToken{{Name: "alice", File: writeToken(t, dir, "copy", f.token, 0o600)}}
		}, `is also the token of "admin"`},
		{"same as another name", func() []config.AdminToken {
			p := writeToken(t, dir, "shared", strings.Repeat("s", 32), 0o600)
			return []config.AdminToken{{Name: "alice", File: p}, {Name: "bob", File: p}}
		}, `is also the token of "alice"`},
	} {
		cfg := f.cfg
		cfg.Admin.Tokens = tc.tokens()
		if s, err := New(cfg, f.log); err == nil || !strings.Contains(err.Error(), tc.want) {
			if s != nil {
				s.Close()
			}
			t.Errorf("%s: New = %v, want %q", tc.name, err, tc.want)
		}
	}
	cfg := f.cfg
	open := writeToken(t, dir, "open", strings.Repeat("o", 32), 0o644)
	cfg.Admin.Tokens = []config.AdminToken{{Name: "alice", File: open}}
	var logs bytes.Buffer
	s, err := New(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if !strings.Contains(logs.String(), "admin token file "+open+" is readable by other users") {
		t.Errorf("no warning for a world-readable named token file; logs:\n%s", logs.String())
	}
}
