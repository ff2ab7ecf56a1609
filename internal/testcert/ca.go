package testcert

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"testing"
)

// CA is a throwaway certificate authority for tests of mutual TLS (etcd
// with client certificates): unlike Write's self-signed certificates, the
// certificates it issues are trusted through one CA file, which is how a
// real deployment configures both ends.
type CA struct {
	CertFile string
	Cert     *x509.Certificate
	key      *ecdsa.PrivateKey
	dir      string
}

// nextSerial is a random serial number: two certificates issued by one
// CA must differ, even in the same nanosecond.
func nextSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return n
}

// NewCA writes a fresh self-signed CA certificate NAME.crt (and its key
// NAME.key) in a new temporary directory; the certificates it issues land
// in the same directory.
func NewCA(t testing.TB, name string) *CA {
	t.Helper()
	tmpl := template(name, nil)
	tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	dir := t.TempDir()
	p, key := create(t, dir, name, tmpl, nil, nil)
	return &CA{CertFile: p.CertFile, Cert: p.Cert, key: key, dir: dir}
}

// Issue writes a certificate NAME.crt signed by the CA, and its P-256 key
// NAME.key, valid for hosts (IP addresses or DNS names; none for a pure
// client certificate) and for both server and client authentication: etcd
// 3.4 presents its own server certificate as a client certificate when its
// gRPC gateway dials itself, so one certificate must serve both roles.
func (ca *CA) Issue(t testing.TB, name string, hosts ...string) Pair {
	t.Helper()
	tmpl := template(name, hosts)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	p, _ := create(t, ca.dir, name, tmpl, ca.Cert, ca.key)
	return p
}
