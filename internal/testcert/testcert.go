// Package testcert writes throwaway self-signed TLS server certificates for
// tests of the admin listener's HTTPS. It is imported only by tests: the
// certificates are valid for an hour and trust nothing.
package testcert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Pair is a written certificate and key.
type Pair struct {
	CertFile, KeyFile string
	Cert              *x509.Certificate
}

// Write writes a fresh self-signed server certificate for hosts (IP
// addresses or DNS names) and its P-256 key as PEM files NAME.crt and
// NAME.key in a new temporary directory.
func Write(t testing.TB, name string, hosts ...string) Pair {
	t.Helper()
	tmpl := template(name, hosts)
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	p, _ := create(t, t.TempDir(), name, tmpl, nil, nil)
	return p
}

// template is a certificate for name and hosts, valid for an hour either
// side of now.
func template(name string, hosts []string) *x509.Certificate {
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	return tmpl
}

// create makes a fresh P-256 key and a certificate of it from tmpl, signed
// by parent and parentKey (self-signed when nil), and writes NAME.crt and
// NAME.key in dir.
func create(t testing.TB, dir, name string, tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (Pair, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	p := Pair{CertFile: filepath.Join(dir, name+".crt"), KeyFile: filepath.Join(dir, name+".key"), Cert: cert}
	writePEM(t, p.CertFile, "CERTIFICATE", der, 0o644)
	writePEM(t, p.KeyFile, "PRIVATE KEY", keyDER, 0o600)
	return p, key
}

func writePEM(t testing.TB, path, typ string, der []byte, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		t.Fatal(err)
	}
}
