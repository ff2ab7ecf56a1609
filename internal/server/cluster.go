package server

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/config"
)

// clusterTLSConfig is the etcd client's TLS: nil for http:// endpoints,
// else the CA to verify etcd with (the system roots without one) and this
// node's client certificate, when set.
func clusterTLSConfig(c config.Cluster) (*tls.Config, error) {
	if c.CAFile == "" && c.CertFile == "" {
		for _, e := range c.Etcd {
			if strings.HasPrefix(e, "https://") {
				return &tls.Config{MinVersion: tls.VersionTLS12}, nil
			}
		}
		return nil, nil
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("cluster.ca_file: %w", err)
		}
		conf.RootCAs = x509.NewCertPool()
		if !conf.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("cluster.ca_file %s holds no PEM certificate", c.CAFile)
		}
	}
	if c.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("cluster.cert_file %s with cluster.key_file %s: %w", c.CertFile, c.KeyFile, err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return conf, nil
}

// clusterHealth says how the node stands with etcd. It never fails
// /healthz: a node without etcd still serves every decision it can make
// from its mirror, and a load balancer that dropped every node when etcd
// lost its quorum would turn an admin outage into a fleet outage.
func (s *Server) clusterHealth() string {
	st := s.node.Status()
	if st.Connected {
		return fmt.Sprintf("ok, etcd reachable, mirror at revision %d", st.Revision)
	}
	msg := fmt.Sprintf("DEGRADED etcd unreachable since %s (%s): serving on the state mirrored at revision %d; admin changes fail",
		st.Since.UTC().Format(time.RFC3339), st.Error, st.Revision)
	if st.Pending > 0 {
		msg += fmt.Sprintf("; %d quarantines wait to be written", st.Pending)
	}
	return msg
}

// handleUnsynced answers the cache protocol on a node whose mirror never
// held its cluster's trust state (its first start in the cluster, before
// the first read of etcd ends): 503 with Retry-After, which Nix retries and
// does not cache, instead of a 404 for every path.
func (s *Server) handleUnsynced(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Retry-After", "1")
	http.Error(w, "cluster: this node has not read the cluster's trust state from etcd yet", http.StatusServiceUnavailable)
}
