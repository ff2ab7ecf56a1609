package cache

import (
	"errors"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/policy"
	bolt "go.etcd.io/bbolt"
)

func auditRec(who, action string, at time.Time, what ...string) *AuditRecord {
	r := &AuditRecord{Time: at, Who: who, Action: action, Reason: "because"}
	r.SetWhat(what)
	return r
}

// Each admin change writes its record in its own transaction, with the
// counts and previous entries only the transaction knows.
func TestAuditRecordsChanges(t *testing.T) {
	db, _ := openTestDB(t)
	old := policy.AllowEntry{StorePath: sp(hashA, "hello"), Reason: "first review", Added: t0, Expires: t0.Add(time.Hour)}
	mustAllow(t)(db.PutAllow([]policy.AllowEntry{old}, auditRec("alice", ActionAllowAdd, t0, old.StorePath)))
	repl := policy.AllowEntry{StorePath: sp(hashA, "hello"), Reason: "second review", Added: t0.Add(time.Minute)}
	replaced, err := db.PutAllow([]policy.AllowEntry{repl, {StorePath: sp(hashB, "b"), Added: t0}},
		auditRec("bob", ActionAllowAdd, t0.Add(time.Minute), repl.StorePath, sp(hashB, "b")))
	must(t, err)
	if len(replaced) != 1 || replaced[0].Reason != "first review" {
		t.Fatalf("PutAllow replaced = %+v, want the first entry", replaced)
	}
	_, err = db.RemoveAllow([]string{hashB, hashC}, auditRec("carol", ActionAllowRemove, t0.Add(2*time.Minute), hashB, hashC))
	must(t, err)
	_, err = db.PutDeny([]policy.DenyEntry{{Pattern: "*-evil-*", Reason: "cve", Added: t0}}, denyMatch("*-evil-*"),
		auditRec("alice", ActionDenyAdd, t0.Add(3*time.Minute), "*-evil-*"))
	must(t, err)
	_, err = db.RemoveDeny([]string{"*-evil-*"}, denyMatch("*-evil-*"), auditRec("alice", ActionDenyRemove, t0.Add(4*time.Minute), "*-evil-*"))
	must(t, err)
	_, err = db.Retry([]string{hashA}, auditRec("alice", ActionRetry, t0.Add(5*time.Minute), hashA))
	must(t, err)
	_, err = db.PutAttestations([]policy.Attestation{attestation(hashA, "r1", "sig1")}, auditRec("rebuilder", ActionAttest, t0.Add(6*time.Minute), sp(hashA, "hello")))
	must(t, err)
	_, err = db.PutAttestations([]policy.Attestation{attestation(hashA, "r1", "sig1")}, auditRec("rebuilder", ActionAttest, t0.Add(7*time.Minute), sp(hashA, "hello")))
	must(t, err)

	recs, err := db.Audit(time.Time{})
	must(t, err)
	type want struct {
		who, action, outcome string
		counts               map[string]int
	}
	wants := []want{
		{"alice", ActionAllowAdd, OutcomeOK, map[string]int{CountAdded: 1}},
		{"bob", ActionAllowAdd, OutcomeReplaced, map[string]int{CountAdded: 1, CountReplaced: 1}},
		{"carol", ActionAllowRemove, OutcomePartial, map[string]int{CountRemoved: 1, CountMissing: 1}},
		{"alice", ActionDenyAdd, OutcomeOK, map[string]int{CountAdded: 1}},
		{"alice", ActionDenyRemove, OutcomeOK, map[string]int{CountRemoved: 1}},
		{"alice", ActionRetry, OutcomeFailed, map[string]int{CountNotQuarantined: 1}},
		{"rebuilder", ActionAttest, OutcomeOK, map[string]int{CountStored: 1}},
		{"rebuilder", ActionAttest, OutcomeUnchanged, map[string]int{CountKnown: 1}},
	}
	if len(recs) != len(wants) {
		t.Fatalf("%d records, want %d: %+v", len(recs), len(wants), recs)
	}
	for i, w := range wants {
		r := recs[i]
		if r.Who != w.who || r.Action != w.action || r.Outcome != w.outcome || r.Reason != "because" || len(r.Counts) != len(w.counts) {
			t.Errorf("record %d = %+v, want %+v", i, r, w)
		}
		for k, n := range w.counts {
			if r.Counts[k] != n {
				t.Errorf("record %d counts = %v, want %v", i, r.Counts, w.counts)
			}
		}
	}
	if p := recs[1].PreviousAllow; len(p) != 1 || p[0].Reason != "first review" || !p[0].Expires.Equal(old.Expires) {
		t.Errorf("replacing record keeps %+v, want the old entry", p)
	}
	if p := recs[2].PreviousAllow; len(p) != 1 || p[0].StorePath != sp(hashB, "b") {
		t.Errorf("removing record keeps %+v, want the removed entry", p)
	}
	if p := recs[4].PreviousDeny; len(p) != 1 || p[0].Reason != "cve" {
		t.Errorf("deny remove record keeps %+v, want the removed entry", p)
	}
	if !slices.Equal(recs[2].What, []string{hashB, hashC}) {
		t.Errorf("what = %v", recs[2].What)
	}

	since, err := db.Audit(t0.Add(5 * time.Minute))
	must(t, err)
	if len(since) != 3 || since[0].Action != ActionRetry {
		t.Errorf("Audit(since) = %+v, want the last 3", since)
	}
	// A nil record records nothing.
	mustAllow(t)(db.PutAllow([]policy.AllowEntry{repl}, nil))
	if all, _ := db.Audit(time.Time{}); len(all) != len(wants) {
		t.Errorf("a change without a record added one: %d records", len(all))
	}
}

// A refused change is recorded alone, as failed with its error.
func TestAuditRefused(t *testing.T) {
	db, _ := openTestDB(t)
	r := auditRec("alice", ActionDenyAdd, t0, "openssl-3.0.7")
	r.Error = errors.New("not a pattern").Error()
	must(t, db.AppendAudit(*r))
	recs, err := db.Audit(time.Time{})
	must(t, err)
	if len(recs) != 1 || recs[0].Outcome != OutcomeFailed || recs[0].Error != "not a pattern" {
		t.Errorf("refused change recorded as %+v", recs)
	}
}

// The trail keeps at most MaxAuditRecords and nothing older than MaxAuditAge.
func TestAuditBounds(t *testing.T) {
	db, _ := openTestDB(t)
	start := t0
	for i := range 5 {
		must(t, db.AppendAudit(*auditRec("alice", ActionRetry, start.Add(time.Duration(i)*24*time.Hour))))
	}
	// A record a year and a day later drops those older than MaxAuditAge.
	late := start.Add(MaxAuditAge + 2*24*time.Hour + time.Second)
	must(t, db.AppendAudit(*auditRec("bob", ActionRetry, late)))
	recs, err := db.Audit(time.Time{})
	must(t, err)
	if len(recs) != 3 || !recs[0].Time.Equal(start.Add(3*24*time.Hour)) || recs[2].Who != "bob" {
		t.Fatalf("after the age bound: %d records, first %v", len(recs), recs[0].Time)
	}

	// The count bound, with the bound lowered through the counter: the
	// oldest go first, one per record added.
	must(t, db.update(func(tx *bolt.Tx) error { _, err := addCount(tx, keyAuditCount, MaxAuditRecords-3); return err }))
	must(t, db.AppendAudit(*auditRec("carol", ActionRetry, late.Add(time.Second))))
	recs, _ = db.Audit(time.Time{})
	if len(recs) != 3 || !recs[0].Time.Equal(start.Add(4*24*time.Hour)) || recs[2].Who != "carol" {
		t.Errorf("after the count bound: %+v", recs)
	}

	// What is bounded too.
	many := make([]string, MaxAuditItems+7)
	for i := range many {
		many[i] = hashA
	}
	r := auditRec("alice", ActionRetry, late, many...)
	if len(r.What) != MaxAuditItems || r.WhatMore != 7 {
		t.Errorf("SetWhat kept %d, more %d", len(r.What), r.WhatMore)
	}
}

// Several import batches stored in one transaction keep one audit record
// each, with their own counts, and a batch sees what an earlier one in
// the same transaction stored.
func TestPutAttestationBatches(t *testing.T) {
	db, _ := openTestDB(t)
	bs := []AttestationBatch{
		{Attestations: []policy.Attestation{attestation(hashA, "r1", "sig1"), attestation(hashB, "r1", "sig1")},
			Audit: auditRec("rebuilder", ActionAttest, t0, sp(hashA, "hello"), sp(hashB, "hello"))},
		{Attestations: []policy.Attestation{attestation(hashA, "r1", "sig1"), attestation(hashC, "r1", "sig1")},
			Audit: auditRec("rebuilder", ActionAttest, t0, sp(hashA, "hello"), sp(hashC, "hello"))},
	}
	must(t, db.PutAttestationBatches(bs))
	if !reflect.DeepEqual(bs[0].Stored, []bool{true, true}) || !reflect.DeepEqual(bs[1].Stored, []bool{false, true}) {
		t.Fatalf("stored %v and %v, want [true true] and [false true]", bs[0].Stored, bs[1].Stored)
	}
	recs, err := db.Audit(time.Time{})
	must(t, err)
	if len(recs) != 2 || !reflect.DeepEqual(recs[0].Counts, map[string]int{CountStored: 2}) ||
		!reflect.DeepEqual(recs[1].Counts, map[string]int{CountStored: 1, CountKnown: 1}) {
		t.Fatalf("audit records %+v, want one per batch with its counts", recs)
	}
	if n, err := db.CountAttestations(); err != nil || n != 3 {
		t.Fatalf("%d attestations stored (%v), want 3", n, err)
	}
}
