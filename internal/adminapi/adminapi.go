// Package adminapi is the admin API's wire format and its client, shared by
// the server's handlers and the CLI's admin commands.
//
// Trust model: the admin API changes what the gatekeeper approves, so every
// call carries the bearer token from the admin token file; the client never
// sends it anywhere but the configured admin address, and never in clear
// text beyond loopback.
package adminapi

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/config"
)

// Routes.
const (
	PathAttestations = "/admin/v1/attestations"
	PathAllowlist    = "/admin/v1/allowlist"
	PathDenylist     = "/admin/v1/denylist"
	PathExplain      = "/admin/v1/explain/"
	PathRejections   = "/admin/v1/rejections"
	PathRetry        = "/admin/v1/retry"
	PathVerifyCache  = "/admin/v1/verify-cache"
	PathAudit        = "/admin/v1/audit"         // ?since=RFC3339
	PathRebuildQueue = "/admin/v1/rebuild-queue" // ?attester=KEYNAME
)

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
}

// Attestation import outcomes, per path and key.
const (
	AttestStored       = "stored"
	AttestKnown        = "already_known"
	AttestNoAttester   = "no_attester_signature"
	AttestBadSignature = "bad_signature"
)

// AttestResult is what import did for one path (and one attester key).
type AttestResult struct {
	Path   string `json:"path"`
	Key    string `json:"key,omitempty"`
	Status string `json:"status"`
}

// AttestResponse answers POST /admin/v1/attestations.
type AttestResponse struct {
	Results []AttestResult `json:"results"`
	Counts  map[string]int `json:"counts"`
}

// AllowRequest adds allowlist entries (POST /admin/v1/allowlist).
type AllowRequest struct {
	Paths   []string `json:"paths"`
	Closure bool     `json:"closure,omitempty"`
	Reason  string   `json:"reason,omitempty"`
	Expires string   `json:"expires,omitempty"` // "30d", "12h"
}

// PathsRequest names store paths or hashes (DELETE allowlist, retry).
type PathsRequest struct {
	Paths  []string `json:"paths"`
	Reason string   `json:"reason,omitempty"` // why, for the audit trail
}

// DenyRequest adds denylist entries (POST /admin/v1/denylist).
type DenyRequest struct {
	Patterns []string `json:"patterns"`
	Reason   string   `json:"reason,omitempty"`
}

// PatternsRequest removes denylist entries (DELETE /admin/v1/denylist).
type PatternsRequest struct {
	Patterns []string `json:"patterns"`
	Reason   string   `json:"reason,omitempty"` // why, for the audit trail
}

// AllowEntry is one allowlist entry on the wire.
type AllowEntry struct {
	StorePath   string    `json:"store_path"`
	NarHash     string    `json:"nar_hash,omitempty"`    // "sha256:<nix32>" the entry is pinned to
	Fingerprint string    `json:"fingerprint,omitempty"` // the whole fingerprint it is pinned to
	Reason      string    `json:"reason,omitempty"`
	Added       time.Time `json:"added"`
	Expires     time.Time `json:"expires,omitzero"`
}

// DenyEntry is one denylist entry on the wire.
type DenyEntry struct {
	Pattern string    `json:"pattern"`
	Reason  string    `json:"reason,omitempty"`
	Added   time.Time `json:"added"`
}

// AllowList answers GET and POST /admin/v1/allowlist. For POST, Replaced
// are the entries the new ones replaced, as they were.
type AllowList struct {
	Entries  []AllowEntry `json:"entries"`
	Replaced []AllowEntry `json:"replaced,omitempty"`
}

// DenyList answers GET and POST /admin/v1/denylist.
type DenyList struct {
	Entries []DenyEntry `json:"entries"`
}

// Removed answers DELETE calls.
type Removed struct {
	Removed []string `json:"removed"`
	Missing []string `json:"missing,omitempty"`
}

// Quarantine is a nar_mismatch quarantine on the wire.
type Quarantine struct {
	Check    string    `json:"check"`
	Detail   string    `json:"detail"`
	Upstream string    `json:"upstream"`
	Time     time.Time `json:"time"`
}

// Decision is a decision with all the evidence behind it.
type Decision struct {
	Approved        bool        `json:"approved"`
	Reason          string      `json:"reason"`
	Detail          string      `json:"detail,omitempty"`
	Fingerprint     string      `json:"fingerprint,omitempty"`
	Upstream        string      `json:"upstream,omitempty"`
	UpstreamSigners []string    `json:"upstream_signers,omitempty"`
	Attesters       []string    `json:"attesters,omitempty"`  // keys whose attestation matches the upstream fingerprint
	Mismatched      []string    `json:"mismatched,omitempty"` // keys whose attestation differs
	Allow           *AllowEntry `json:"allow,omitempty"`
	Deny            *DenyEntry  `json:"deny,omitempty"`
	Quarantine      *Quarantine `json:"quarantine,omitempty"`
	// Rebuilds are the configured attesters' attestations: which key,
	// when it was imported, whether it matches the upstream, and the
	// rebuilder's classification. For a path approved as attested, the
	// matching ones are the rebuilds that approved it.
	Rebuilds []Rebuild `json:"rebuilds,omitempty"`
	// Classification is, when an attestation mismatches, the most
	// alarming classification among the mismatching ones.
	Classification string `json:"classification,omitempty"`
}

// Rebuild is one attester's attestation for a path, as explain shows it.
type Rebuild struct {
	Key            string    `json:"key"`
	Matches        bool      `json:"matches"`
	NarHash        string    `json:"nar_hash"`
	Imported       time.Time `json:"imported"`
	Classification string    `json:"classification,omitempty"`
}

// String is the form of the X-Cacheproxy-Decision header.
func (d Decision) String() string {
	if d.Approved {
		return "approved; reason=" + d.Reason
	}
	return "rejected; reason=" + d.Reason
}

// Answer is what a request of one kind would get right now.
type Answer struct {
	Status   int    `json:"status"`             // HTTP status
	Decision string `json:"decision,omitempty"` // the X-Cacheproxy-Decision header
	File     string `json:"file,omitempty"`     // for a NAR: the file served, nar/<file>
	Cached   bool   `json:"cached,omitempty"`   // for a NAR: served from the blob store
	Note     string `json:"note,omitempty"`
}

// Explain answers GET /admin/v1/explain/<hash>.
type Explain struct {
	Hash      string     `json:"hash"`
	StorePath string     `json:"store_path,omitempty"`
	Status    string     `json:"status"` // approved, rejected, not_found, unavailable
	Served    bool       `json:"served"`
	Decision  *Decision  `json:"decision,omitempty"` // decided afresh from the current evidence
	NarInfo   Answer     `json:"narinfo"`            // what GET /<hash>.narinfo gets now
	NAR       Answer     `json:"nar"`                // what GET of the NAR it names gets now
	Stored    *Stored    `json:"stored,omitempty"`   // the stored decision, if any
	Rejection *Rejection `json:"last_rejection,omitempty"`
	Error     string     `json:"error,omitempty"`
}

// Stored summarises a stored decision.
type Stored struct {
	Reason   string    `json:"reason"`
	Approved bool      `json:"approved"`
	Upstream string    `json:"upstream"`
	NarHash  string    `json:"nar_hash"`
	NarFile  string    `json:"nar_file"`
	Decided  time.Time `json:"decided"`
	Cached   bool      `json:"nar_cached"`
}

// Rejection is the latest refusal of one store path.
type Rejection struct {
	StorePath string    `json:"store_path"`
	Reason    string    `json:"reason"`
	Detail    string    `json:"detail,omitempty"`
	Deriver   string    `json:"deriver,omitempty"`
	Upstream  string    `json:"upstream,omitempty"`
	Count     uint64    `json:"count"`
	First     time.Time `json:"first"`
	Last      time.Time `json:"last"`
	// Classification is, for attestation_mismatch, what the mismatching
	// rebuilder said: "stable" (reproducible there; the upstream serves
	// something else) or "not_reproducible".
	Classification string `json:"classification,omitempty"`
}

// Rejections answers GET /admin/v1/rejections.
type Rejections struct {
	Rejections []Rejection `json:"rejections"`
}

// QueueEntry is one path a rebuild could approve: refused now, approved
// once enough rebuilders attest it.
type QueueEntry struct {
	StorePath string `json:"store_path"`
	// Deriver is the absolute .drv path to build, when a refusal named one
	// (a reference known only from its dependent's refusal has none).
	Deriver string `json:"deriver,omitempty"`
	// Reason is "unattested" (the path was refused so) or
	// "closure_incomplete" (it is an unattested reference of a path
	// refused for its closure).
	Reason string `json:"reason"`
	// Requests is how many times the path was refused, or, when more, how
	// many times the paths it keeps from approval were.
	Requests uint64    `json:"requests"`
	First    time.Time `json:"first"` // first refusal
	Last     time.Time `json:"last"`  // latest refusal
}

// RebuildQueue answers GET /admin/v1/rebuild-queue: most requested first,
// except that a path's queued dependencies (where a stored narinfo names
// them) come before it, so a rebuilder can take them in order.
type RebuildQueue struct {
	Paths []QueueEntry `json:"paths"`
}

// BlobFailure is a cached NAR that no longer matched what it was verified against.
type BlobFailure struct {
	Blob      string `json:"blob"`
	StorePath string `json:"store_path,omitempty"`
	Error     string `json:"error"`
}

// Retry answers POST /admin/v1/retry.
type Retry struct {
	Lifted         []string `json:"lifted"`
	NotQuarantined []string `json:"not_quarantined,omitempty"`
}

// VerifyCache answers POST /admin/v1/verify-cache.
type VerifyCache struct {
	Checked int           `json:"checked"`
	Dropped []BlobFailure `json:"dropped"`
}

// NewVerifyCache is the answer for a verify-cache run.
func NewVerifyCache(checked int, failed []cache.BlobFailure) VerifyCache {
	out := VerifyCache{Checked: checked, Dropped: []BlobFailure{}}
	for _, f := range failed {
		out.Dropped = append(out.Dropped, BlobFailure{Blob: f.Blob, StorePath: f.StorePath, Error: f.Error})
	}
	return out
}

// AuditRecord is one admin change in the audit trail.
type AuditRecord struct {
	Time          time.Time      `json:"time"`
	Who           string         `json:"who"`    // the admin token's name
	Action        string         `json:"action"` // attest_import, allow_add, allow_remove, deny_add, deny_remove, retry
	Reason        string         `json:"reason,omitempty"`
	What          []string       `json:"what,omitempty"`      // store paths, hashes or patterns (at most 100)
	WhatMore      int            `json:"what_more,omitempty"` // how many more there were
	Outcome       string         `json:"outcome"`             // ok, replaced, partial, unchanged, failed
	Error         string         `json:"error,omitempty"`
	Counts        map[string]int `json:"counts,omitempty"`
	PreviousAllow []AllowEntry   `json:"previous_allow,omitempty"` // entries replaced or removed, as they were
	PreviousDeny  []DenyEntry    `json:"previous_deny,omitempty"`
}

// Audit answers GET /admin/v1/audit, oldest first.
type Audit struct {
	Records []AuditRecord `json:"records"`
}

// Client calls a running server's admin API.
type Client struct {
	Base  string // "http://127.0.0.1:5481"
	Token string
	HTTP  *http.Client
}

// NewClient reads the token file and returns a client for base (a URL or a
// host:port, which means http://). tlsConf is how an https server's
// certificate is checked (see PinnedTLS and CATLS); nil means the system
// roots. The token goes to base and nowhere else: plain http only to a
// loopback host, no proxy from the environment, no redirect followed.
func NewClient(base, tokenFile string, tlsConf *tls.Config) (*Client, error) {
	raw, err := os.ReadFile(tokenFile)
	if err != nil {
		return nil, fmt.Errorf("read admin token: %w", err)
	}
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	u, err := url.Parse(base)
	if err != nil {
		return nil, fmt.Errorf("admin server URL %q: %w", base, err)
	}
	switch u.Scheme {
	case "https":
	case "http":
		if tlsConf != nil {
			return nil, fmt.Errorf("admin server URL %q: a certificate to trust was given, so use https://", base)
		}
		// The token changes what the whole fleet gets; in clear text it
		// may only travel within this machine.
		if !config.IsLoopbackHost(u.Hostname()) {
			return nil, fmt.Errorf("admin server URL %q: refusing to send the admin token in clear text off this machine; use https://", base)
		}
	default:
		return nil, fmt.Errorf("admin server URL %q: scheme must be http or https", base)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	// A proxy named by $HTTPS_PROXY would be one more party between the
	// token and the admin address.
	tr.Proxy = nil
	if tlsConf == nil {
		tlsConf = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	tr.TLSClientConfig = tlsConf
	return &Client{Base: strings.TrimSuffix(base, "/"), Token: strings.TrimSpace(string(raw)),
		HTTP: &http.Client{Timeout: 10 * time.Minute, Transport: tr,
			// The admin API never redirects; following one would resend
			// the token to wherever it points. The 3xx is the answer.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}}, nil
}

// PinnedTLS trusts exactly the first certificate in certFile (PEM), the
// server's own admin.tls_cert_file, as the only root. Operators' admin
// certificates are commonly self-signed, and the CLI connects to whatever
// admin.listen is, often a wildcard such as 0.0.0.0 that no certificate
// names; so the chain is checked against that one root (validity dates
// included) and the host name is not. The name would add nothing: only the
// holder of that certificate's key can complete the handshake.
func PinnedTLS(certFile string) (*tls.Config, error) {
	raw, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	var cert *x509.Certificate
	for rest := raw; cert == nil; {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			return nil, fmt.Errorf("%s: no PEM certificate", certFile)
		}
		if block.Type == "CERTIFICATE" {
			if cert, err = x509.ParseCertificate(block.Bytes); err != nil {
				return nil, fmt.Errorf("%s: %w", certFile, err)
			}
		}
	}
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// Go's own check always compares the host name; VerifyConnection
		// below does the whole check instead, against roots only.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the admin server sent no certificate")
			}
			if _, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots}); err != nil {
				return fmt.Errorf("%w in %s: %v", errNotPinned, certFile, err)
			}
			return nil
		},
	}, nil
}

var errNotPinned = errors.New("the admin server's certificate is not the one")

// CATLS trusts the CA certificates in caFile (PEM) instead of the system
// roots, with the usual checks, host name included.
func CATLS(caFile string) (*tls.Config, error) {
	raw, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(raw) {
		return nil, fmt.Errorf("%s: no PEM certificate", caFile)
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}, nil
}

// ErrUnreachable wraps a failure to reach the server at all.
var ErrUnreachable = errors.New("admin API unreachable")

// Do sends one call; body is JSON-encoded unless it is []byte or an
// io.Reader (sent as it is read); out, when non-nil, receives the JSON
// answer.
func (c *Client) Do(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.send(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return fmt.Errorf("read admin answer: %w", err)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return fmt.Errorf("decode admin answer: %w", err)
		}
	}
	return nil
}

// send sends one call and returns a 2xx answer; any other status is
// returned as an error with the server's message.
func (c *Client) send(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	raw := false
	switch b := body.(type) {
	case nil:
	case []byte:
		rd, raw = bytes.NewReader(b), true
	case io.Reader:
		rd, raw = b, true
	default:
		enc, err := json.Marshal(b)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(enc)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.Base+path, rd)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	if !raw && body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		// A server that answered with a certificate we do not trust was
		// reached: not "unreachable", which would send verify-cache to the
		// state dir the server holds instead of naming the problem.
		var cve *tls.CertificateVerificationError
		if errors.As(err, &cve) || errors.Is(err, errNotPinned) {
			return nil, fmt.Errorf("admin server at %s is not trusted: %v", c.Base, err)
		}
		return nil, fmt.Errorf("%w at %s: %v", ErrUnreachable, c.Base, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		raw, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		var e Error
		if json.Unmarshal(raw, &e) == nil && e.Error != "" {
			return nil, fmt.Errorf("%s", e.Error)
		}
		return nil, fmt.Errorf("admin API answered %s", resp.Status)
	}
	return resp, nil
}

// GetRebuildQueue reads the rebuild queue; a non-empty attester (a key
// name in policy.attesters) leaves out the paths that key attested already.
func (c *Client) GetRebuildQueue(ctx context.Context, attester string) (RebuildQueue, error) {
	route := PathRebuildQueue
	if attester != "" {
		route += "?" + url.Values{"attester": {attester}}.Encode()
	}
	var q RebuildQueue
	err := c.Do(ctx, http.MethodGet, route, nil, &q)
	return q, err
}

// ImportAttestations sends an import as it reads body, and reads the
// answer one result at a time: each goes to each, and the counts are
// returned. Neither the input nor the answer is held whole, whatever the
// size of the import.
func (c *Client) ImportAttestations(ctx context.Context, body io.Reader, reason string, each func(AttestResult)) (counts map[string]int, err error) {
	route := PathAttestations
	if reason != "" {
		route += "?" + url.Values{"reason": {reason}}.Encode()
	}
	resp, err := c.send(ctx, http.MethodPost, route, body)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	bad := func(err error) error { return fmt.Errorf("decode admin answer: %w", err) }
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, bad(fmt.Errorf("want an object (%v)", err))
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, bad(err)
		}
		switch tok {
		case "results":
			if tok, err := dec.Token(); err != nil || tok != json.Delim('[') {
				return nil, bad(fmt.Errorf("results: want an array (%v)", err))
			}
			for dec.More() {
				var r AttestResult
				if err := dec.Decode(&r); err != nil {
					return nil, bad(err)
				}
				each(r)
			}
			if _, err := dec.Token(); err != nil {
				return nil, bad(err)
			}
		case "counts":
			if err := dec.Decode(&counts); err != nil {
				return nil, bad(err)
			}
		default:
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return nil, bad(err)
			}
		}
	}
	if _, err := dec.Token(); err != nil {
		return nil, bad(err)
	}
	return counts, nil
}
