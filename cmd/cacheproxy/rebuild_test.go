package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Bad invocations are usage errors that say what is missing, before any
// request is sent.
func TestRebuildUsage(t *testing.T) {
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("secret\n"), 0o600)
	notKey := filepath.Join(dir, "not-a-key")
	os.WriteFile(notKey, []byte("just text\n"), 0o600)
	admin := []string{"rebuild", "--server", "http://127.0.0.1:1", "--token-file", token}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{append(admin, "--once", "--key-file", notKey, "-A", "hello"), 2, "-A names an attribute of the --instantiate FILE"},
		{append(admin, "--once", "--key-file", notKey, "--interval", "soon"), 2, "invalid value"},
		{append(admin, "--once", "--key-file", notKey, "--jobs", "0"), 1, "--jobs: rebuild.jobs: 0 must be between 1 and 256"},
		{append(admin, "--once"), 2, "--key-file is required"},
		{append(admin, "--once", "--key-file", notKey), 1, "not a Nix secret key"},
		{append(admin, "--once", "--key-file", filepath.Join(dir, "missing")), 1, "--key-file"},
		{append(admin, "--once", "--key-file", notKey, "extra"), 2, `unexpected argument "extra"`},
	} {
		code, _, stderr := cli(t, "", tc.args...)
		if code != tc.code || !strings.Contains(stderr, tc.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", tc.args[5:], code, stderr, tc.code, tc.want)
		}
	}
}

// An empty queue on a real server: nothing to do, nothing printed, exit 0.
func TestRebuildEmptyQueue(t *testing.T) {
	rb, _ := verify.GenerateKey("rebuilder-1")
	cfg := startServer(t, rb.Public())
	keyFile := filepath.Join(t.TempDir(), "rebuilder-1.sec")
	if err := os.WriteFile(keyFile, []byte(rb.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := cli(t, "", "rebuild", "--once", "-c", cfg, "--key-file", keyFile)
	if code != 0 || stdout != "" {
		t.Fatalf("rebuild --once on an empty queue: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

// [rebuild] gives the key file (and the rest) when no flag does; a flag
// overrides its key; a bad value in the file is reported at its line, and
// the gatekeeper's own settings are not the rebuilder's business.
func TestRebuildConfigSection(t *testing.T) {
	rb, _ := verify.GenerateKey("rebuilder-1")
	keyFile := filepath.Join(t.TempDir(), "rebuilder-1.sec")
	if err := os.WriteFile(keyFile, []byte(rb.String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	diffs := filepath.Join(t.TempDir(), "diffs")
	cfg, _, _ := startServerWith(t, rb.Public(), fmt.Sprintf("[rebuild]\nkey_file = %q\njobs = 3\ncheck = true\nkeep_diffs = %q\n", keyFile, diffs))
	if code, stdout, stderr := cli(t, "", "rebuild", "--once", "-c", cfg); code != 0 || stdout != "" {
		t.Fatalf("rebuild --once with [rebuild] key_file: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if st, err := os.Stat(diffs); err != nil || !st.IsDir() {
		t.Errorf("keep_diffs %s was not made: %v", diffs, err)
	}
	missing := filepath.Join(t.TempDir(), "missing.sec")
	if code, _, stderr := cli(t, "", "rebuild", "--once", "-c", cfg, "--key-file", missing); code != 1 || !strings.Contains(stderr, missing) {
		t.Errorf("--key-file over key_file: exit %d, stderr %q; want the flag's file named", code, stderr)
	}

	bad := filepath.Join(t.TempDir(), "rebuilder.toml")
	os.WriteFile(bad, []byte("signing_key_file = \"/nonexistent/gatekeeper.sec\"\n[rebuild]\nkey_file = \""+keyFile+"\"\njobs = 0\n"), 0o600)
	code, _, stderr := cli(t, "", "rebuild", "--once", "-c", bad, "--server", "http://127.0.0.1:1", "--token-file", keyFile)
	if code != 1 || !strings.Contains(stderr, bad+":4: rebuild.jobs: 0 must be between 1 and 256") || strings.Contains(stderr, "signing_key_file") {
		t.Errorf("jobs = 0: exit %d, stderr %q; want only the [rebuild] problem, at its line", code, stderr)
	}
}

// rejections --derivers lists what a rebuild could approve, once each,
// and not an attestation_mismatch: that rebuild was done and disagreed.
func TestRejectionsDeriversLeaveOutMismatches(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(adminapi.Rejections{Rejections: []adminapi.Rejection{
			{StorePath: "/nix/store/a-app", Reason: "closure_incomplete", Deriver: "/nix/store/d1-app.drv"},
			{StorePath: "/nix/store/b-lib", Reason: "unattested", Deriver: "/nix/store/d2-lib.drv"},
			{StorePath: "/nix/store/b-lib-dev", Reason: "unattested", Deriver: "/nix/store/d2-lib.drv"},
			{StorePath: "/nix/store/c-ssl", Reason: "attestation_mismatch", Deriver: "/nix/store/d3-ssl.drv", Classification: "stable"},
			{StorePath: "/nix/store/e-bad", Reason: "denied", Deriver: "/nix/store/d4-bad.drv"},
		}})
	}))
	defer srv.Close()
	token := filepath.Join(t.TempDir(), "token")
	os.WriteFile(token, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)
	code, stdout, stderr := cli(t, "", "rejections", "--derivers", "--server", srv.URL, "--token-file", token)
	if want := "/nix/store/d1-app.drv\n/nix/store/d2-lib.drv\n"; code != 0 || stdout != want {
		t.Fatalf("rejections --derivers: exit %d, stdout %q, stderr %q; want %q", code, stdout, stderr, want)
	}
}
