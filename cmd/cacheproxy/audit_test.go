package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// allow add says when it replaced an entry, and audit shows every change
// with the name of the token that made it and the reason given.
func TestAllowReplaceAndAudit(t *testing.T) {
	rb, _ := verify.GenerateKey("rebuilder-1")
	tokDir := t.TempDir()
	aliceTok := filepath.Join(tokDir, "alice.token")
	if err := os.WriteFile(aliceTok, []byte(strings.Repeat("a", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, upDir, upKey := startServerWith(t, rb.Public(), "\n[[admin.tokens]]\nname = \"alice\"\nfile = \""+aliceTok+"\"\n")
	hash := strings.Repeat("b", 32)
	ni := narinfo.NarInfo{StorePath: "/nix/store/" + hash + "-app-1.0", URL: "nar/x.nar",
		Compression: narinfo.CompressionNone, NarHash: narinfo.SumSHA256([]byte("nar")), NarSize: 3}
	fp, _ := ni.Fingerprint("/nix/store")
	ni.Sigs = []string{upKey.Sign(fp)}
	if err := os.WriteFile(filepath.Join(upDir, hash+".narinfo"), ni.Marshal(), 0o644); err != nil {
		t.Fatal(err)
	}

	code, out, errOut := cli(t, "", "allow", "add", "-c", cfg, "--token-file", aliceTok, "--reason", "first review", "--expires", "30d", ni.StorePath)
	if code != 0 || strings.Contains(out, "replaced") {
		t.Fatalf("allow add: %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = cli(t, "", "allow", "add", "-c", cfg, "--token-file", aliceTok, "--reason", "second review", ni.StorePath)
	if code != 0 || !strings.Contains(out, `replaced the existing entry: reason "first review", expires 20`) {
		t.Fatalf("allow add over an entry does not say it replaced it: %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut := cli(t, "", "allow", "remove", "-c", cfg, "--reason", "attested since", hash); code != 0 {
		t.Fatalf("allow remove: %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut := cli(t, "", "deny", "add", "-c", cfg, "--reason", "CVE-2099-1", "*-app-1.0*"); code != 0 {
		t.Fatalf("deny add: %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut := cli(t, "", "deny", "remove", "-c", cfg, "--reason", "fixed", "*-app-1.0*"); code != 0 {
		t.Fatalf("deny remove: %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut := cli(t, "", "retry", "-c", cfg, "--reason", "upstream fixed", hash); code != 0 {
		t.Fatalf("retry: %d\n%s%s", code, out, errOut)
	}
	att := ni
	att.Sigs = []string{rb.Sign(fp)}
	if code, out, errOut := cli(t, string(att.Marshal()), "attest", "import", "-c", cfg, "--reason", "nightly", "-"); code != 0 {
		t.Fatalf("attest import: %d\n%s%s", code, out, errOut)
	}

	code, out, errOut = cli(t, "", "audit", "-c", cfg)
	if code != 0 {
		t.Fatalf("audit: %d %s", code, errOut)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	want := [][]string{
		{"TIME", "WHO", "ACTION", "OUTCOME", "WHAT", "REASON", "DETAIL"},
		{"alice", "allow_add", "ok", ni.StorePath, `"first review"`, "added=1"},
		{"alice", "allow_add", "replaced", `"second review"`, `replaced ` + ni.StorePath + ` (reason "first review", expires 20`},
		{"admin", "allow_remove", "ok", hash, `"attested since"`, "removed=1", `removed ` + ni.StorePath + ` (reason "second review", expires never`},
		{"admin", "deny_add", "ok", "*-app-1.0*", `"CVE-2099-1"`},
		{"admin", "deny_remove", "ok", `"fixed"`, `removed *-app-1.0* (reason "CVE-2099-1")`},
		{"admin", "retry", "failed", `"upstream fixed"`, "not_quarantined=1"},
		{"admin", "attest_import", "ok", `"nightly"`, "stored=1"},
	}
	if len(lines) != len(want) {
		t.Fatalf("audit printed %d lines, want %d:\n%s", len(lines), len(want), out)
	}
	for i, w := range want {
		for _, field := range w {
			if !strings.Contains(lines[i], field) {
				t.Errorf("audit line %d lacks %q:\n%s", i, field, lines[i])
			}
		}
	}

	code, out, _ = cli(t, "", "audit", "-c", cfg, "--json", "--since", "1h")
	var a adminapi.Audit
	if code != 0 || json.Unmarshal([]byte(out), &a) != nil || len(a.Records) != len(want)-1 || a.Records[0].Who != "alice" {
		t.Fatalf("audit --json --since 1h: %d\n%s", code, out)
	}
	if code, _, errOut := cli(t, "", "audit", "-c", cfg, "--since", "yesterday"); code != 2 || !strings.Contains(errOut, "--since") {
		t.Errorf("audit --since yesterday: %d %s", code, errOut)
	}
}

// A reason or path cannot break the table: control characters are
// replaced, reasons quoted.
func TestPrintAuditOneLinePerRecord(t *testing.T) {
	var b strings.Builder
	printAudit(&b, []adminapi.AuditRecord{{Who: "eve\tx", Action: "deny_add", Outcome: "ok", What: []string{"*-a\n-*"}, Reason: "line1\nline2"}})
	if n := strings.Count(b.String(), "\n"); n != 2 {
		t.Errorf("one record printed on %d lines:\n%s", n-1, b.String())
	}
}
