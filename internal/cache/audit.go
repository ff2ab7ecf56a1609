package cache

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/policy"
	bolt "go.etcd.io/bbolt"
)

// The audit trail: one record per admin change (and per refused attempt),
// written in the same transaction as the change itself, so that no change
// is ever stored without its record.
//
// Bounds: when a record is added, the oldest records are dropped until at
// most MaxAuditRecords remain and none is older than MaxAuditAge. A record
// lists at most MaxAuditItems paths or patterns (the rest are counted in
// WhatMore) and at most as many previous entries.
const (
	MaxAuditRecords = 100000
	MaxAuditAge     = 366 * 24 * time.Hour
	MaxAuditItems   = 100
)

// Admin actions, as the audit trail and the logs name them.
const (
	ActionAttest      = "attest_import"
	ActionAllowAdd    = "allow_add"
	ActionAllowRemove = "allow_remove"
	ActionDenyAdd     = "deny_add"
	ActionDenyRemove  = "deny_remove"
	ActionRetry       = "retry"
)

// Outcomes of an admin change.
const (
	OutcomeOK        = "ok"        // everything named was acted on
	OutcomeReplaced  = "replaced"  // as ok, and existing entries were replaced (see Previous*)
	OutcomePartial   = "partial"   // some of what was named had nothing to act on, or failed
	OutcomeUnchanged = "unchanged" // a valid request that changed nothing (already known, nothing to remove)
	OutcomeFailed    = "failed"    // refused: nothing was changed (see Error), or every item failed
)

// Counts an admin change keeps, by what they say about its outcome.
const (
	CountStored         = "stored"
	CountKnown          = "already_known"
	CountNoAttester     = "no_attester_signature"
	CountBadSignature   = "bad_signature"
	CountAdded          = "added"
	CountReplaced       = "replaced"
	CountRemoved        = "removed"
	CountMissing        = "missing"
	CountLifted         = "lifted"
	CountNotQuarantined = "not_quarantined"
	CountDropped        = "decisions_dropped"
)

// countKind sorts counts into done, failed (nothing to act on) and neutral.
var countKind = map[string]int{
	CountStored: kindDone, CountAdded: kindDone, CountReplaced: kindDone, CountRemoved: kindDone, CountLifted: kindDone,
	CountNoAttester: kindFailed, CountBadSignature: kindFailed, CountMissing: kindFailed, CountNotQuarantined: kindFailed,
}

const (
	kindNeutral = iota
	kindDone
	kindFailed
)

// AuditRecord is one admin change: who made it, what, why, when and how
// it ended.
type AuditRecord struct {
	Time   time.Time `json:"time"`
	Who    string    `json:"who"` // the admin token's name
	Action string    `json:"action"`
	Reason string    `json:"reason,omitempty"`
	// What names the store paths, hashes or patterns of the change (at most
	// MaxAuditItems; WhatMore counts the rest).
	What     []string       `json:"what,omitempty"`
	WhatMore int            `json:"what_more,omitempty"`
	Outcome  string         `json:"outcome"`
	Error    string         `json:"error,omitempty"`
	Counts   map[string]int `json:"counts,omitempty"`
	// PreviousAllow and PreviousDeny are the entries the change replaced
	// or removed, as they were.
	PreviousAllow []policy.AllowEntry `json:"previous_allow,omitempty"`
	PreviousDeny  []policy.DenyEntry  `json:"previous_deny,omitempty"`
}

// SetWhat lists items as the record's What, bounded.
func (r *AuditRecord) SetWhat(items []string) {
	n := min(len(items), MaxAuditItems)
	r.What = append([]string(nil), items[:n]...)
	r.WhatMore = len(items) - n
}

// Count adds n to one of the record's counts; on a nil record (a change
// recorded nowhere) it does nothing.
func (r *AuditRecord) Count(name string, n int) {
	if r == nil {
		return
	}
	if r.Counts == nil {
		r.Counts = map[string]int{}
	}
	r.Counts[name] += n
}

// Settle sets Outcome from Error and the counts.
func (r *AuditRecord) Settle() {
	if r.Error != "" {
		r.Outcome = OutcomeFailed
		return
	}
	done, failed := 0, 0
	for k, n := range r.Counts {
		switch countKind[k] {
		case kindDone:
			done += n
		case kindFailed:
			failed += n
		}
	}
	switch {
	case failed > 0 && done == 0 && r.Counts[CountKnown] == 0:
		r.Outcome = OutcomeFailed
	case failed > 0:
		r.Outcome = OutcomePartial
	case r.Counts[CountReplaced] > 0:
		r.Outcome = OutcomeReplaced
	case done == 0:
		r.Outcome = OutcomeUnchanged
	default:
		r.Outcome = OutcomeOK
	}
}

// count, AddPreviousAllow and AddPreviousDeny fill in a record inside the
// change's transaction; on a nil record (no audit) they do nothing.
func (r *AuditRecord) count(name string, n int) {
	if n != 0 {
		r.Count(name, n)
	}
}

func (r *AuditRecord) AddPreviousAllow(e policy.AllowEntry) {
	if r != nil && len(r.PreviousAllow) < MaxAuditItems {
		r.PreviousAllow = append(r.PreviousAllow, e)
	}
}

func (r *AuditRecord) AddPreviousDeny(e policy.DenyEntry) {
	if r != nil && len(r.PreviousDeny) < MaxAuditItems {
		r.PreviousDeny = append(r.PreviousDeny, e)
	}
}

// auditKey orders records by time; the bucket sequence keeps records of
// the same nanosecond apart and in the order written.
func auditKey(t time.Time, seq uint64) []byte {
	k := binary.BigEndian.AppendUint64(nil, uint64(t.UnixNano()))
	return binary.BigEndian.AppendUint64(k, seq)
}

// appendAudit settles rec and adds it. A nil rec records nothing (callers
// that are not admin changes, tests).
func appendAudit(tx *bolt.Tx, rec *AuditRecord) error {
	if rec == nil {
		return nil
	}
	rec.Settle()
	seq, err := tx.Bucket(bucketAudit).NextSequence()
	if err != nil {
		return err
	}
	return putAudit(tx, auditKey(rec.Time, seq), rec)
}

// putAudit stores rec under key, then applies the bounds.
func putAudit(tx *bolt.Tx, key []byte, rec *AuditRecord) error {
	b := tx.Bucket(bucketAudit)
	raw, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("encode audit record: %w", err)
	}
	if err := b.Put(key, raw); err != nil {
		return fmt.Errorf("store audit record: %w", err)
	}
	n, err := addCount(tx, keyAuditCount, 1)
	if err != nil {
		return err
	}
	cutoff := uint64(max(rec.Time.Add(-MaxAuditAge).UnixNano(), 0))
	c := b.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.First() {
		if n <= MaxAuditRecords && binary.BigEndian.Uint64(k[:8]) >= cutoff {
			break
		}
		if err := c.Delete(); err != nil {
			return err
		}
		if n, err = addCount(tx, keyAuditCount, -1); err != nil {
			return err
		}
	}
	return nil
}

// AppendAudit records a change that stored nothing else (a refused one).
func (d *DB) AppendAudit(rec AuditRecord) error {
	return d.update(func(tx *bolt.Tx) error { return appendAudit(tx, &rec) })
}

// Audit returns the records written at or after since, oldest first.
func (d *DB) Audit(since time.Time) (out []AuditRecord, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAudit).Cursor()
		start := []byte(nil)
		if !since.IsZero() && since.UnixNano() > 0 {
			start = binary.BigEndian.AppendUint64(nil, uint64(since.UnixNano()))
		}
		k, v := c.First()
		if start != nil {
			k, v = c.Seek(start)
		}
		for ; k != nil; k, v = c.Next() {
			var r AuditRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode audit record: %w", err)
			}
			out = append(out, r)
		}
		return nil
	})
	return out, err
}
