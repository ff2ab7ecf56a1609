package gate

import (
	"log/slog"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// decisionAttrs are the attributes of a decision's log line: what was
// decided and on which evidence, one scalar per key (key lists joined with
// commas, entries as groups) so that text and JSON logs both stay flat and
// greppable.
func decisionAttrs(d policy.Decision, storePath string) []any {
	a := []any{"path", storePath, "reason", string(d.Reason), "upstream", d.Upstream}
	if len(d.UpstreamSigners) > 0 {
		a = append(a, "upstream_signers", strings.Join(d.UpstreamSigners, ","))
	}
	if len(d.Attesters) > 0 {
		a = append(a, "attesters", strings.Join(d.Attesters, ","))
	}
	if len(d.Mismatched) > 0 {
		a = append(a, "mismatched", strings.Join(d.Mismatched, ","))
	}
	if c := classification(d); c != "" {
		a = append(a, "classification", c)
	}
	if e := d.Allow; e != nil {
		g := []any{"nar_hash", e.NarHash.String(), "reason", e.Reason}
		if !e.Expires.IsZero() {
			g = append(g, "expires", e.Expires)
		}
		a = append(a, slog.Group("allow", g...))
	}
	if e := d.Deny; e != nil {
		a = append(a, slog.Group("deny", "pattern", e.Pattern, "reason", e.Reason))
	}
	if q := d.Quarantine; q != nil {
		a = append(a, slog.Group("quarantine", "check", q.Check, "since", q.Time))
	}
	return append(a, "detail", d.Detail)
}

// NAR download outcomes in logs.
const (
	narVerified    = "verified"    // every byte matched the approved narinfo; cached
	narMismatch    = "mismatch"    // a complete transfer disagreed: quarantined
	narTruncated   = "truncated"   // the transfer broke; retried on the next request
	narUnavailable = "unavailable" // the upstream or the disk failed
)

// narAttrs are the attributes of a NAR download's log line.
func narAttrs(rec *cache.Record, upstream string, written int64, outcome, reason string) []any {
	return []any{"path", rec.StorePath, "file", rec.NarFile, "bytes", written, "upstream", upstream,
		"outcome", outcome, "reason", reason}
}
