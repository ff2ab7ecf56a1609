package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/testcert"
)

// writeAdminCert writes a fresh self-signed certificate for 127.0.0.1 and
// its key as PEM files, and returns them with the parsed certificate.
func writeAdminCert(t *testing.T) (certFile, keyFile string, cert *x509.Certificate) {
	p := testcert.Write(t, "admin", "127.0.0.1")
	return p.CertFile, p.KeyFile, p.Cert
}

// withAdminTLS configures the admin listener's certificate and key.
func withAdminTLS(certFile, keyFile string) fixtureOpt {
	return func(c *config.Config) { c.Admin.TLSCertFile, c.Admin.TLSKeyFile = certFile, keyFile }
}

// With admin TLS configured, Serve's admin listener speaks HTTPS (TLS 1.2
// or later) with the configured certificate: a token sent over https
// works, and a plain http request, token and all, gets no admin answer.
func TestAdminServesTLS(t *testing.T) {
	certFile, keyFile, cert := writeAdminCert(t)
	f := newFixture(t, withAdminTLS(certFile, keyFile))
	mainL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adminL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := adminL.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.s.Serve(ctx, mainL, adminL) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})

	roots := x509.NewCertPool()
	roots.AddCert(cert)
	client := func(tc *tls.Config) *http.Client {
		return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
	}
	get := func(c *http.Client, url, token string) (*http.Response, string, error) {
		req, err := http.NewRequest(http.MethodGet, url, nil)
		if err != nil {
			t.Fatal(err)
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := c.Do(req)
		if err != nil {
			return nil, "", err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body), nil
	}

	httpsc := client(&tls.Config{RootCAs: roots})
	resp, body, err := get(httpsc, "https://"+addr+adminapi.PathDenylist, f.token)
	if err != nil {
		t.Fatalf("https with the token: %v", err)
	}
	if resp.StatusCode != http.StatusOK || !strings.Contains(body, `"entries"`) {
		t.Fatalf("https with the token: %d %s", resp.StatusCode, body)
	}
	if resp.TLS == nil || resp.TLS.Version < tls.VersionTLS12 || !resp.TLS.PeerCertificates[0].Equal(cert) {
		t.Fatalf("https connection state: %+v", resp.TLS)
	}
	if resp, _, err := get(httpsc, "https://"+addr+adminapi.PathDenylist, ""); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("https without the token: %v %v, want 401", resp, err)
	}

	// Plain HTTP, with the token: the TLS listener answers the stray
	// request with a bare 400 and never reaches the admin handler.
	resp, body, err = get(client(nil), "http://"+addr+adminapi.PathDenylist, f.token)
	if err != nil {
		t.Fatalf("plain http with the token: %v, want a 400", err)
	}
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "HTTPS server") || strings.Contains(body, `"entries"`) {
		t.Errorf("plain http with the token: %d %q, want 400 from the TLS listener", resp.StatusCode, body)
	}

	// Older TLS versions are refused.
	old := client(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11})
	if _, _, err := get(old, "https://"+addr+adminapi.PathDenylist, f.token); err == nil {
		t.Error("a TLS 1.1 client was served")
	}
}

// A key pair that no longer loads when Serve starts stops the start,
// naming the key, rather than serving the admin API in clear text.
func TestAdminTLSPairGoneStopsServe(t *testing.T) {
	certFile, keyFile, _ := writeAdminCert(t)
	f := newFixture(t, withAdminTLS(certFile, keyFile))
	if err := os.Remove(keyFile); err != nil {
		t.Fatal(err)
	}
	mainL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adminL, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	err = f.s.Serve(context.Background(), mainL, adminL)
	if err == nil || !strings.Contains(err.Error(), "admin.tls_cert_file") || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Serve with a missing key: %v", err)
	}
	if _, err := adminL.Accept(); err == nil {
		t.Error("the admin listener was left open")
	}
}
