package gate

import (
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
)

// Change says who makes an admin change (the admin token's name) and why.
// Every change is logged and recorded in the audit trail with it.
type Change struct {
	Who    string
	Reason string
}

// auditRecord starts the record of one change.
func (g *Gate) auditRecord(by Change, action string, what []string) *cache.AuditRecord {
	rec := &cache.AuditRecord{Time: g.now(), Who: by.Who, Action: action, Reason: by.Reason}
	rec.SetWhat(what)
	return rec
}

// refused records and logs a change that stored nothing, and returns err.
// Counts gathered before the refusal are dropped: nothing of them was
// stored.
func (g *Gate) refused(rec *cache.AuditRecord, err error) error {
	rec.Error = err.Error()
	rec.Counts, rec.PreviousAllow, rec.PreviousDeny = nil, nil, nil
	if aerr := g.ev.AppendAudit(*rec); aerr != nil {
		g.log.Error("audit trail: recording a refused admin change failed", "who", rec.Who, "action", rec.Action, "err", aerr)
	}
	rec.Settle()
	g.logChange(rec)
	return err
}

// Refused records an admin request refused before it reached the gate (a
// malformed body, a bad path), so that attempts show in the trail too.
func (g *Gate) Refused(by Change, action string, what []string, err error) {
	g.refused(g.auditRecord(by, action, what), err)
}

// Audit returns the audit trail from since on, oldest first.
func (g *Gate) Audit(since time.Time) ([]cache.AuditRecord, error) { return g.db.Audit(since) }

// maxLoggedItems bounds what one log line lists; the audit trail keeps more.
const maxLoggedItems = 10

// logChange writes one structured line per admin change.
func (g *Gate) logChange(rec *cache.AuditRecord) {
	what := rec.What
	more := rec.WhatMore
	if len(what) > maxLoggedItems {
		more += len(what) - maxLoggedItems
		what = what[:maxLoggedItems]
	}
	attrs := []any{"who", rec.Who, "action", rec.Action, "outcome", rec.Outcome, "what", strings.Join(what, " ")}
	if more > 0 {
		attrs = append(attrs, "what_more", more)
	}
	attrs = append(attrs, "reason", rec.Reason)
	if len(rec.Counts) > 0 {
		names := make([]string, 0, len(rec.Counts))
		for k := range rec.Counts {
			names = append(names, k)
		}
		sort.Strings(names)
		counts := make([]any, len(names))
		for i, k := range names {
			counts[i] = slog.Int(k, rec.Counts[k])
		}
		attrs = append(attrs, slog.Group("counts", counts...))
	}
	if prev := previous(rec); prev != "" {
		attrs = append(attrs, "previous", prev)
	}
	if rec.Error != "" {
		g.log.Warn("admin change refused", append(attrs, "err", rec.Error)...)
		return
	}
	g.log.Info("admin change", attrs...)
}

// previous summarises the entries a change replaced or removed.
func previous(rec *cache.AuditRecord) string {
	var parts []string
	for _, e := range rec.PreviousAllow {
		exp := "never"
		if !e.Expires.IsZero() {
			exp = e.Expires.UTC().Format(time.RFC3339)
		}
		parts = append(parts, fmt.Sprintf("%s reason=%q expires=%s", e.StorePath, e.Reason, exp))
	}
	for _, e := range rec.PreviousDeny {
		parts = append(parts, fmt.Sprintf("%s reason=%q", e.Pattern, e.Reason))
	}
	if len(parts) > maxLoggedItems {
		parts = append(parts[:maxLoggedItems], fmt.Sprintf("(+%d more)", len(parts)-maxLoggedItems))
	}
	return strings.Join(parts, "; ")
}
