package cache

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

func jsonOf(t *testing.T, v any) []byte {
	t.Helper()
	raw, err := json.Marshal(v)
	must(t, err)
	return raw
}

func noDeny([]policy.DenyEntry) func(string, narinfo.SHA256) bool {
	return func(string, narinfo.SHA256) bool { return false }
}

// A full resynchronisation, staged in pages, changes what differs and
// drops only the decisions whose evidence changed; a kept local key stays;
// audit records are added once.
func TestFinishMirrorSelective(t *testing.T) {
	db, _ := openTestDB(t)
	allowA := policy.AllowEntry{StorePath: sp(hashA, "hello"), Added: t0}
	allowB := policy.AllowEntry{StorePath: sp(hashB, "hello"), Added: t0}
	qC := policy.Quarantine{StorePath: sp(hashC, "hello"), Check: "nar_hash", Time: t0}
	mustAllow(t)(db.PutAllow([]policy.AllowEntry{allowA, allowB}, nil))
	must(t, db.PutQuarantine(hashC, qC))
	must(t, db.PutQuarantine(hashD, qC))
	putRecords(t, db, hashA, hashB, hashE)

	must(t, db.StartMirror())
	// The cluster: allowA as it is, allowB changed, allowE new, no
	// quarantine of C (kept: pending here) nor of D; one audit record.
	allowB2 := allowB
	allowB2.Reason = "reviewed again"
	allowE := policy.AllowEntry{StorePath: sp(hashE, "hello"), Added: t0}
	rec := AuditRecord{Time: t0, Who: "alice", Action: ActionAllowAdd, Outcome: OutcomeOK}
	must(t, db.StageMirror([]MirrorEntry{
		{Kind: KindAllow, Key: hashA, Value: jsonOf(t, allowA)},
		{Kind: KindAllow, Key: hashB, Value: jsonOf(t, allowB2)},
	}))
	must(t, db.StageMirror([]MirrorEntry{
		{Kind: KindAllow, Key: hashE, Value: jsonOf(t, allowE)},
		{Kind: KindAudit, Key: AuditKey(&rec, 7), Value: jsonOf(t, rec)},
	}))
	keep := func(kind, key string) bool { return kind == KindQuarantine && key == hashC }
	dropped, err := db.FinishMirror("cluster-1", 42, keep, noDeny)
	must(t, err)
	if dropped != 2 {
		t.Errorf("dropped %d decisions, want 2 (B changed, E new)", dropped)
	}
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashE: false})
	allow, _ := db.AllowList()
	if len(allow) != 3 {
		t.Errorf("allowlist %+v", allow)
	}
	if q, _ := db.Quarantine(hashC); q == nil {
		t.Error("a kept local quarantine was deleted")
	}
	if q, _ := db.Quarantine(hashD); q != nil {
		t.Error("a quarantine the cluster lacks was kept")
	}
	if id, rev, _ := db.MirrorState(); id != "cluster-1" || rev != 42 {
		t.Errorf("mirror state %q %d", id, rev)
	}
	// The same again changes nothing and adds no second audit record.
	must(t, db.StartMirror())
	must(t, db.StageMirror([]MirrorEntry{
		{Kind: KindAllow, Key: hashA, Value: jsonOf(t, allowA)},
		{Kind: KindAllow, Key: hashB, Value: jsonOf(t, allowB2)},
		{Kind: KindAllow, Key: hashE, Value: jsonOf(t, allowE)},
		{Kind: KindAudit, Key: AuditKey(&rec, 7), Value: jsonOf(t, rec)},
	}))
	if dropped, err := db.FinishMirror("cluster-1", 43, keep, noDeny); err != nil || dropped != 0 {
		t.Errorf("an unchanged resync dropped %d (%v)", dropped, err)
	}
	if recs, _ := db.Audit(time.Time{}); len(recs) != 1 {
		t.Errorf("%d audit records, want 1", len(recs))
	}
	// Unstaged names what is here but not in the cluster.
	must(t, db.StartMirror())
	local, err := db.Unstaged()
	must(t, err)
	if len(local) != 4 { // 3 allow entries and the kept quarantine
		t.Errorf("unstaged %+v", local)
	}
}

// A change of one revision applies at once; a deny drops what it matches.
func TestApplyMirrorDeny(t *testing.T) {
	db, _ := openTestDB(t)
	putRecords(t, db, hashA, hashB)
	deny := policy.DenyEntry{Pattern: sp(hashA, "hello"), Added: t0}
	match := func(es []policy.DenyEntry) func(string, narinfo.SHA256) bool {
		return func(base string, _ narinfo.SHA256) bool {
			for _, e := range es {
				if "/nix/store/"+base == e.Pattern {
					return true
				}
			}
			return false
		}
	}
	dropped, err := db.ApplyMirror(5, []MirrorEntry{{Kind: KindDeny, Key: deny.Pattern, Value: jsonOf(t, deny)}}, match)
	must(t, err)
	if dropped != 1 {
		t.Errorf("dropped %d", dropped)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true})
	if _, err := db.ApplyMirror(6, []MirrorEntry{{Kind: "bogus", Key: "x", Value: []byte("{}")}}, match); err == nil {
		t.Error("an unknown kind was applied")
	}
	if _, rev, _ := db.MirrorState(); rev != 5 {
		t.Errorf("revision %d after a refused change, want 5", rev)
	}
}
