package server

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/http"

	"github.com/cacheproxy/cacheproxy/internal/config"
)

// adminTLSConfig is the admin listener's TLS configuration, or nil when
// admin.tls_cert_file and admin.tls_key_file are both unset. Either one set
// means TLS was meant, so a missing half is an error rather than a quiet
// fall-back to clear text (Validate refuses that config before this).
// The pair is loaded once: a renewed certificate takes a restart.
func adminTLSConfig(a config.Admin) (*tls.Config, error) {
	if !a.TLS() {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(a.TLSCertFile, a.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("admin.tls_cert_file %s with admin.tls_key_file %s: %w", a.TLSCertFile, a.TLSKeyFile, err)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// serveListener runs srv on l, over TLS when srv.TLSConfig is set.
// ServeTLS wraps l itself, so the connection the HTTP server sees is the
// *tls.Conn: it then bounds the handshake with its read timeouts and fills
// in Request.TLS, which a TLS listener wrapped in another would hide.
func serveListener(srv *http.Server, l net.Listener) error {
	if srv.TLSConfig != nil {
		return srv.ServeTLS(l, "", "")
	}
	return srv.Serve(l)
}
