package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/server"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// cli runs the command line in-process.
func cli(t *testing.T, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(args, config.Env{}, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

// startServer runs a real server on loopback, with an empty file://
// upstream and one attester, and returns its config file.
func startServer(t *testing.T, attester verify.PublicKey) string {
	t.Helper()
	cfg, _, _ := startServerWith(t, attester, "")
	return cfg
}

// startServerWith is startServer with extra TOML at the end of the config
// (after [admin]); it also returns the upstream's folder and key.
func startServerWith(t *testing.T, attester verify.PublicKey, extra string) (cfgFile, upDir string, upKey verify.SecretKey) {
	t.Helper()
	dir := t.TempDir()
	up := filepath.Join(dir, "upstream")
	os.MkdirAll(up, 0o755)
	upKey, _ = verify.GenerateKey("upstream-1")
	mainL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adminL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfgFile = filepath.Join(dir, "cacheproxy.toml")
	toml := fmt.Sprintf(`listen = %q
state_dir = %q
[[upstreams]]
url = "file://%s"
public_keys = [%q]
[policy]
attesters = [%q]
[admin]
listen = %q
`, mainL.Addr(), filepath.Join(dir, "state"), up, upKey.Public(), attester, adminL.Addr()) + extra
	if err := os.WriteFile(cfgFile, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgFile, config.Env{})
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := server.New(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Serve(ctx, mainL, adminL); close(done) }()
	t.Cleanup(func() { cancel(); <-done; s.Close() })
	return cfgFile, up, upKey
}

// pubkey prints a key only when there is one: it never makes one that the
// server would not use.
func TestPubkeyNeverCreatesKey(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	code, out, errOut := cli(t, "", "pubkey", "--state-dir", state)
	if code != 1 || out != "" || !strings.Contains(errOut, "no gatekeeper key at "+state) || !strings.Contains(errOut, "cacheproxy serve") {
		t.Fatalf("pubkey without a key: %d %q %q", code, out, errOut)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Fatalf("pubkey created %s", state)
	}
}

func TestVersionAndHelp(t *testing.T) {
	code, out, _ := cli(t, "", "--version")
	if code != 0 || !strings.HasPrefix(out, "cacheproxy ") {
		t.Errorf("--version: %d %q", code, out)
	}
	code, _, errOut := cli(t, "", "explain", "--help")
	if code != 0 || !strings.Contains(errOut, "  --json") || !strings.Contains(errOut, "  --server URL") || strings.Contains(errOut, "\n  -json") {
		t.Errorf("explain --help prints flags with one dash:\n%s", errOut)
	}
}

// attest import fails when anything was not stored, and names the keys it
// found on each failing path.
func TestAttestImportFailures(t *testing.T) {
	rb, _ := verify.GenerateKey("rebuilder-1")
	stranger, _ := verify.GenerateKey("stranger-1")
	cfg := startServer(t, rb.Public())
	ni := narinfo.NarInfo{StorePath: "/nix/store/" + strings.Repeat("a", 32) + "-app-1.0", URL: "nar/x.nar",
		Compression: narinfo.CompressionNone, NarHash: narinfo.SumSHA256([]byte("nar")), NarSize: 3}
	fp, _ := ni.Fingerprint("/nix/store")
	signed := func(k verify.SecretKey) string {
		n := ni
		n.Sigs = []string{k.Sign(fp)}
		return string(n.Marshal())
	}
	code, out, errOut := cli(t, signed(stranger), "attest", "import", "-c", cfg, "-")
	if code != 1 || !strings.Contains(out, "no_attester_signature") || !strings.Contains(out, "keys: stranger-1") || !strings.Contains(errOut, "not stored") {
		t.Fatalf("import signed by a stranger: %d\n%s\n%s", code, out, errOut)
	}
	code, out, errOut = cli(t, signed(rb), "attest", "import", "-c", cfg, "-")
	if code != 0 || !strings.Contains(out, "stored 1") {
		t.Fatalf("import signed by the attester: %d\n%s\n%s", code, out, errOut)
	}
}

// deny add of a bare name suggests the glob that was probably meant.
func TestDenySuggestsGlob(t *testing.T) {
	rb, _ := verify.GenerateKey("rebuilder-1")
	cfg := startServer(t, rb.Public())
	code, _, errOut := cli(t, "", "deny", "add", "-c", cfg, "openssl-3.0.7")
	if code != 1 || !strings.Contains(errOut, "'*-openssl-3.0.7*'") {
		t.Fatalf("deny add openssl-3.0.7: %d %s", code, errOut)
	}
	if code, _, errOut := cli(t, "", "deny", "add", "-c", cfg, "*-openssl-3.0.7*"); code != 0 {
		t.Fatalf("deny add of the suggested glob: %d %s", code, errOut)
	}
}

func TestRebuildableReasons(t *testing.T) {
	for reason, want := range map[string]bool{"unattested": true, "attestation_mismatch": false, "closure_incomplete": true,
		"denied": false, "upstream_malformed": false, "upstream_unsigned": false, "nar_mismatch": false, "stale_narinfo": false} {
		if rebuildable(reason) != want {
			t.Errorf("rebuildable(%s) = %v", reason, !want)
		}
	}
}
