package main

import (
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/server"
	"github.com/cacheproxy/cacheproxy/internal/testcert"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// writeSelfSigned writes a fresh self-signed certificate naming only the
// DNS name "localhost" (no IP address) and its key as PEM files.
func writeSelfSigned(t *testing.T, name string) (certFile, keyFile string) {
	p := testcert.Write(t, name, "localhost")
	return p.CertFile, p.KeyFile
}

// tlsServer is a server started by startTLSServer.
type tlsServer struct {
	cfgFile, cfgText string
	certFile         string
	tokenFile        string
	adminAddr        string // 127.0.0.1:port
}

// startTLSServer is startServer with admin.tls_cert_file and
// admin.tls_key_file set: a real server on loopback whose admin API
// speaks only HTTPS.
func startTLSServer(t *testing.T) tlsServer {
	t.Helper()
	dir := t.TempDir()
	up := filepath.Join(dir, "upstream")
	os.MkdirAll(up, 0o755)
	upKey, _ := verify.GenerateKey("upstream-1")
	rb, _ := verify.GenerateKey("rebuilder-1")
	certFile, keyFile := writeSelfSigned(t, "admin")
	mainL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adminL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfgFile := filepath.Join(dir, "cacheproxy.toml")
	text := fmt.Sprintf(`listen = %q
state_dir = %q
[[upstreams]]
url = "file://%s"
public_keys = [%q]
[policy]
attesters = [%q]
[admin]
listen = %q
tls_cert_file = %q
tls_key_file = %q
`, mainL.Addr(), filepath.Join(dir, "state"), up, upKey.Public(), rb.Public(), adminL.Addr(), certFile, keyFile)
	if err := os.WriteFile(cfgFile, []byte(text), 0o600); err != nil {
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
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, mainL, adminL) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		s.Close()
	})
	return tlsServer{cfgFile: cfgFile, cfgText: text, certFile: certFile, tokenFile: cfg.AdminTokenFile(), adminAddr: adminL.Addr().String()}
}

// With admin TLS in the config, admin commands reach the server over
// https and trust exactly admin.tls_cert_file: a self-signed certificate
// that does not even name 127.0.0.1, the address dialled.
func TestAdminCommandsOverTLS(t *testing.T) {
	srv := startTLSServer(t)
	if code, out, errOut := cli(t, "", "deny", "add", "-c", srv.cfgFile, "--reason", "CVE", "*-openssl-3.0.7*"); code != 0 {
		t.Fatalf("deny add: %d %s %s", code, out, errOut)
	}
	code, out, errOut := cli(t, "", "deny", "list", "-c", srv.cfgFile)
	if code != 0 || !strings.Contains(out, "*-openssl-3.0.7*") || !strings.Contains(out, "CVE") {
		t.Fatalf("deny list: %d\n%s\n%s", code, out, errOut)
	}

	code, out, errOut = cli(t, "", "verify-cache", "-c", srv.cfgFile)
	if code != 0 || !strings.Contains(out, "checked 0 blobs") {
		t.Fatalf("verify-cache through the server: %d %s %s", code, out, errOut)
	}

	// Another certificate in admin.tls_cert_file (say, the CLI's copy of
	// the config is stale) is not trusted, name or no name.
	otherCert, _ := writeSelfSigned(t, "other")
	stale := filepath.Join(t.TempDir(), "stale.toml")
	os.WriteFile(stale, []byte(strings.Replace(srv.cfgText, srv.certFile, otherCert, 1)), 0o600)
	code, _, errOut = cli(t, "", "deny", "list", "-c", stale)
	if code != 1 || !strings.Contains(errOut, "not trusted") || !strings.Contains(errOut, "not the one in "+otherCert) {
		t.Errorf("deny list trusting another certificate: %d %s", code, errOut)
	}
}

// --server https://... checks the certificate against the system roots
// (which do not know a self-signed one), or against --ca-file, with the
// usual host-name check.
func TestAdminServerFlagTLS(t *testing.T) {
	srv := startTLSServer(t)
	_, port, _ := net.SplitHostPort(srv.adminAddr)
	code, _, errOut := cli(t, "", "deny", "list", "--server", "https://localhost:"+port, "--token-file", srv.tokenFile)
	if code != 1 || !strings.Contains(errOut, "not trusted") || !strings.Contains(errOut, "unknown authority") {
		t.Errorf("--server https:// against the system roots: %d %s", code, errOut)
	}
	// The certificate names localhost, not 127.0.0.1.
	code, _, errOut = cli(t, "", "deny", "list", "--server", "https://"+srv.adminAddr, "--token-file", srv.tokenFile, "--ca-file", srv.certFile)
	if code != 1 || !strings.Contains(errOut, "127.0.0.1") {
		t.Errorf("--ca-file with a host the certificate does not name: %d %s", code, errOut)
	}
	code, out, errOut := cli(t, "", "deny", "list", "--server", "https://localhost:"+port, "--token-file", srv.tokenFile, "--ca-file", srv.certFile)
	if code != 0 || !strings.Contains(out, "PATTERN") {
		t.Errorf("--server https://localhost --ca-file: %d %s %s", code, out, errOut)
	}
	// --ca-file also replaces admin.tls_cert_file, so with the config the
	// dialled 127.0.0.1 must now be named by the certificate.
	code, _, errOut = cli(t, "", "deny", "list", "-c", srv.cfgFile, "--ca-file", srv.certFile)
	if code != 1 || !strings.Contains(errOut, "127.0.0.1") {
		t.Errorf("-c with --ca-file: %d %s", code, errOut)
	}
	code, _, errOut = cli(t, "", "deny", "list", "--server", "http://"+srv.adminAddr, "--token-file", srv.tokenFile, "--ca-file", srv.certFile)
	if code != 1 || !strings.Contains(errOut, "use https://") {
		t.Errorf("--ca-file with http://: %d %s", code, errOut)
	}
}

// The token goes to the admin address only: never in clear text off this
// machine, never after a redirect.
func TestAdminTokenStaysHome(t *testing.T) {
	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	os.WriteFile(tokenFile, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)

	code, _, errOut := cli(t, "", "deny", "list", "--server", "http://192.0.2.1:5481", "--token-file", tokenFile)
	if code != 1 || !strings.Contains(errOut, "clear text") {
		t.Errorf("http:// off loopback: %d %s", code, errOut)
	}

	var elsewhere atomic.Int32
	other := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		elsewhere.Add(1)
		w.Write([]byte(`{"entries":[]}`))
	}))
	defer other.Close()
	redirector := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, other.URL+r.URL.Path, http.StatusTemporaryRedirect)
	}))
	defer redirector.Close()
	ca := filepath.Join(dir, "httptest.crt")
	os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: redirector.Certificate().Raw}), 0o644)
	code, _, errOut = cli(t, "", "deny", "list", "--server", redirector.URL, "--token-file", tokenFile, "--ca-file", ca)
	if code != 1 || elsewhere.Load() != 0 {
		t.Errorf("a redirect was followed: exit %d, %d requests elsewhere; %s", code, elsewhere.Load(), errOut)
	}
}

func TestConnectAddr(t *testing.T) {
	for in, want := range map[string]string{
		":5481":          "127.0.0.1:5481",
		"0.0.0.0:5481":   "127.0.0.1:5481",
		"[::]:5481":      "[::1]:5481",
		"10.0.0.5:5481":  "10.0.0.5:5481",
		"localhost:5481": "localhost:5481",
		"[::1]:5481":     "[::1]:5481",
		"not-an-address": "not-an-address",
	} {
		if got := connectAddr(in); got != want {
			t.Errorf("connectAddr(%q) = %q, want %q", in, got, want)
		}
	}
}
