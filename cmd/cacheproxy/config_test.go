package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// cliEnv runs the command line in-process with env as its environment.
func cliEnv(t *testing.T, env config.Env, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(args, env, strings.NewReader(""), &out, &errb)
	return code, out.String(), errb.String()
}

// Admin commands find the server's config without -c: from
// $CACHEPROXY_CONFIG, else from the system path (here a temporary file in
// its place).
func TestAdminCommandsFindConfig(t *testing.T) {
	rb, _ := verify.GenerateKey("rebuilder-1")
	cfg := startServer(t, rb.Public())
	for name, env := range map[string]config.Env{
		"CACHEPROXY_CONFIG": {ConfigFile: cfg, SystemConfig: filepath.Join(t.TempDir(), "absent.toml")},
		"system path":       {SystemConfig: cfg},
	} {
		t.Run(name, func(t *testing.T) {
			code, out, errOut := cliEnv(t, env, "rejections")
			if code != 0 || !strings.Contains(out, "REASON") {
				t.Fatalf("rejections without -c: %d\n%s\n%s", code, out, errOut)
			}
			code, _, errOut = cliEnv(t, env, "deny", "add", "--reason", "test", "*-openssl-3.0.7*")
			if code != 0 {
				t.Fatalf("deny add without -c: %d %s", code, errOut)
			}
		})
	}
	// pubkey finds the key serve made in the state dir the config names.
	code, out, errOut := cliEnv(t, config.Env{ConfigFile: cfg}, "pubkey")
	if code != 0 || !strings.Contains(out, ":") {
		t.Fatalf("pubkey without -c: %d %q %s", code, out, errOut)
	}
}

// A missing token file names the file and the config it came from.
func TestMissingTokenFileNamesConfig(t *testing.T) {
	dir := t.TempDir()
	token := filepath.Join(dir, "no-such-token")
	cfg := filepath.Join(dir, "cp.toml")
	os.WriteFile(cfg, []byte("[admin]\nlisten = \"127.0.0.1:1\"\ntoken_file = \""+token+"\"\n"), 0o600)
	code, _, errOut := cliEnv(t, config.Env{ConfigFile: cfg}, "rejections")
	if code != 1 || !strings.Contains(errOut, token) || !strings.Contains(errOut, "admin.token_file of config "+cfg+" (from $CACHEPROXY_CONFIG)") {
		t.Fatalf("missing token_file: %d %s", code, errOut)
	}
	// With the embedded defaults it says so, and how to point at a config.
	code, _, errOut = cliEnv(t, config.Env{SystemConfig: filepath.Join(dir, "absent.toml"), StateDirectory: filepath.Join(dir, "state")}, "rejections")
	if code != 1 || !strings.Contains(errOut, filepath.Join(dir, "state", "admin-token")) || !strings.Contains(errOut, "embedded defaults") ||
		!strings.Contains(errOut, "CACHEPROXY_CONFIG") {
		t.Fatalf("missing default token: %d %s", code, errOut)
	}
}

// check-config names every problem in one run, FILE:LINE: KEY: what,
// and exits 1.
func TestCheckConfigAllProblems(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "cp.toml")
	os.WriteFile(cfg, []byte(`listen = "127.0.0.1:5480"
lisen = "x"
mode = "strict"
[policy]
quorum = "2"
quorom = 2
[cache]
scrub_period = "1m"
`), 0o600)
	code, out, errOut := cliEnv(t, config.Env{}, "check-config", "-c", cfg)
	want := []string{
		cfg + ":2: lisen: unknown key",
		cfg + ":3: mode: \"strict\" must be \"enforce\" or \"report\"",
		cfg + ":5: policy.quorum: incompatible types",
		cfg + ":6: policy.quorom: unknown key",
		cfg + ":8: cache.scrub_period: 1m is shorter than 1h",
		"cacheproxy check-config: 5 problems in config " + cfg + " (from -c)",
	}
	lines := strings.Split(strings.TrimSpace(errOut), "\n")
	if code != 1 || out != "" || len(lines) != len(want) {
		t.Fatalf("check-config: %d\nstdout %s\nstderr:\n%s", code, out, errOut)
	}
	for i, w := range want {
		if !strings.HasPrefix(lines[i], w) {
			t.Errorf("line %d: %q, want prefix %q", i+1, lines[i], w)
		}
	}
	// A good config prints the effective configuration, naming its source.
	os.WriteFile(cfg, []byte("mode = \"report\"\n"), 0o600)
	code, out, errOut = cliEnv(t, config.Env{SystemConfig: cfg}, "check-config")
	if code != 0 || !strings.HasPrefix(out, "# config "+cfg+" (from default path)\n") || !strings.Contains(out, `mode = "report"`) {
		t.Fatalf("check-config of a good config: %d\n%s\n%s", code, out, errOut)
	}
}

// serve refuses a bad config with every problem, before opening anything.
func TestServeReportsAllProblems(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "cp.toml")
	os.WriteFile(cfg, []byte("log_format = \"xml\"\nlog_level = \"loud\"\n"), 0o600)
	code, _, errOut := cliEnv(t, config.Env{}, "serve", "-c", cfg, "--mode", "lax")
	for _, w := range []string{cfg + ":1: log_format: \"xml\" must be text or json", cfg + ":2: log_level: \"loud\" must be debug, info, warn or error",
		"--mode: mode: \"lax\""} {
		if !strings.Contains(errOut, w) {
			t.Errorf("serve: %d, stderr lacks %q:\n%s", code, w, errOut)
		}
	}
	if code != 1 {
		t.Errorf("exit %d", code)
	}
}

// explain of a quarantined path shows all the evidence (the valid
// attestation too), then the rule that won.
func TestExplainEvidenceThenRule(t *testing.T) {
	var out bytes.Buffer
	printExplain(&out, adminapi.Explain{Hash: strings.Repeat("a", 32), StorePath: "/nix/store/" + strings.Repeat("a", 32) + "-app-1.0",
		Decision: &adminapi.Decision{Reason: "nar_mismatch", Detail: "NAR failed nar_hash check", Upstream: "https://up", UpstreamSigners: []string{"up-1"},
			Attesters: []string{"rebuilder-1"}, Allow: &adminapi.AllowEntry{Reason: "reviewed"},
			Quarantine: &adminapi.Quarantine{Check: "nar_hash", Detail: "got sha256:x"}}})
	text := out.String()
	order := []string{"upstream:", "attesters matching upstream: rebuilder-1", "allowlist:", "quarantine: nar_hash", "decision:   rejected; reason=nar_mismatch", "detail:", "narinfo request now"}
	at := 0
	for _, w := range order {
		i := strings.Index(text[at:], w)
		if i < 0 {
			t.Fatalf("explain lacks %q after %q:\n%s", w, text[:at], text)
		}
		at += i
	}
}

// explain names each rebuild (key, attestation time, what it rebuilt) and
// the classification of a mismatch; the rejections table shows it too.
func TestExplainShowsRebuilds(t *testing.T) {
	var out bytes.Buffer
	at := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	printExplain(&out, adminapi.Explain{Hash: strings.Repeat("a", 32), StorePath: "/nix/store/" + strings.Repeat("a", 32) + "-app-1.0",
		Decision: &adminapi.Decision{Reason: "attestation_mismatch", Upstream: "https://up", Mismatched: []string{"rebuilder-2"},
			Attesters: []string{"rebuilder-1"}, Classification: "stable",
			Rebuilds: []adminapi.Rebuild{{Key: "rebuilder-1", Matches: true, Imported: at},
				{Key: "rebuilder-2", NarHash: "sha256:other", Imported: at, Classification: "stable"}}},
		Rejection: &adminapi.Rejection{Reason: "attestation_mismatch", Classification: "stable", Count: 2, Last: at}})
	text := out.String()
	for _, w := range []string{
		"rebuild:    rebuilder-1, attested 2026-03-01T12:00:00Z, matches upstream\n",
		"rebuild:    rebuilder-2, attested 2026-03-01T12:00:00Z, rebuilt sha256:other, classified stable\n",
		"classification: stable (the rebuild is reproducible and the upstream serves something else",
		"last rejected: attestation_mismatch (stable) (2 times",
	} {
		if !strings.Contains(text, w) {
			t.Errorf("explain lacks %q:\n%s", w, text)
		}
	}
	if got := reasonText(adminapi.Rejection{Reason: "unattested"}); got != "unattested" {
		t.Errorf("reasonText without classification: %q", got)
	}
}
