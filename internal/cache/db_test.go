package cache

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

var t0 = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

// Store path hashes (32 nix32 characters) for the tests.
const (
	hashA = "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	hashB = "1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	hashC = "2ccccccccccccccccccccccccccccccc"
)

func sp(hash, name string) string { return "/nix/store/" + hash + "-" + name }

func openTestDB(t *testing.T) (*DB, string) {
	t.Helper()
	file := filepath.Join(t.TempDir(), "state", "nested", "cacheproxy.db")
	db, err := OpenDB(file)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db, file
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func record(hash string) Record {
	return Record{StorePath: sp(hash, "hello"), NarInfo: []byte("StorePath: " + sp(hash, "hello") + "\n"), Reason: "attested",
		Approved: true, Upstream: "https://cache.example.org", NarURL: "nar/x.nar.xz", NarFile: hash + ".nar.xz",
		Compression: "xz", NarHash: "sha256:1d5wv32xxc3zz9rv66d13ajla2r8zl68wqdlfhy92njh782rw78v", NarSize: 680,
		FlatSHA256: []byte{1, 2, 3}, Decided: t0}
}

// haveRecords checks which of the hashes have a stored record.
func haveRecords(t *testing.T, db *DB, want map[string]bool) {
	t.Helper()
	for h, w := range want {
		rec, err := db.Record(h)
		must(t, err)
		if (rec != nil) != w {
			t.Errorf("record %s present = %v, want %v", h, rec != nil, w)
		}
	}
}

func putRecords(t *testing.T, db *DB, hashes ...string) {
	t.Helper()
	for _, h := range hashes {
		must(t, putRec(db, h, record(h)))
	}
}

func TestRecords(t *testing.T) {
	db, _ := openTestDB(t)
	rec, err := db.Record(hashA)
	if rec != nil || err != nil {
		t.Fatalf("empty db: %v, %v", rec, err)
	}
	putRecords(t, db, hashA, hashB, hashC)
	got, err := db.Record(hashA)
	must(t, err)
	want := record(hashA)
	if got.StorePath != want.StorePath || string(got.NarInfo) != string(want.NarInfo) || !got.Decided.Equal(t0) ||
		got.NarSize != 680 || !slices.Equal(got.FlatSHA256, want.FlatSHA256) || !got.Approved || got.NarFile != want.NarFile {
		t.Errorf("round trip: got %+v, want %+v", got, want)
	}

	// A newer record replaces the older one.
	want.Reason = "allowlisted"
	must(t, putRec(db, hashA, want))
	got, _ = db.Record(hashA)
	if got.Reason != "allowlisted" {
		t.Errorf("replaced record: %+v", got)
	}

	must(t, db.Forget(hashB))
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashC: true})
	must(t, db.Forget(hashB)) // forgetting nothing is fine
	must(t, db.Forget())
	haveRecords(t, db, map[string]bool{hashA: false, hashB: false, hashC: false})
	// The bucket is usable after being forgotten wholesale.
	putRecords(t, db, hashC)
	haveRecords(t, db, map[string]bool{hashC: true})
}

func TestWritable(t *testing.T) {
	db, _ := openTestDB(t)
	must(t, db.Writable())
	must(t, db.Writable())
	// The health probe's key must not show up as a blob.
	b, err := OpenBlobs(db, t.TempDir(), 0)
	must(t, err)
	if n := b.Names(); len(n) != 0 {
		t.Errorf("Names = %q", n)
	}
	must(t, b.Close())
}

func attestation(hash, key, sig string) Attestation {
	return Attestation{StorePath: sp(hash, "hello"), NarHash: "sha256:1d5wv32xxc3zz9rv66d13ajla2r8zl68wqdlfhy92njh782rw78v",
		NarSize: 680, References: []string{hash + "-hello"}, KeyName: key, PublicKey: key + ":PUB" + key, Sig: key + ":" + sig,
		Imported: t0}
}

func TestAttestations(t *testing.T) {
	db, _ := openTestDB(t)
	putRecords(t, db, hashA, hashB)

	res, err := db.PutAttestations([]Attestation{
		attestation(hashA, "r1", "sig1"),
		attestation(hashA, "r2", "sig2"),
		attestation(hashA, "r1", "sig1"), // the same again in one batch
	})
	must(t, err)
	if !slices.Equal(res, []AttestResult{AttestStored, AttestStored, AttestKnown}) {
		t.Errorf("results = %v", res)
	}
	// Storing forgot hashA's decision, not hashB's.
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true})

	// Re-importing what is known changes nothing, and forgets nothing.
	putRecords(t, db, hashA)
	res, err = db.PutAttestations([]Attestation{attestation(hashA, "r2", "sig2")})
	must(t, err)
	if !slices.Equal(res, []AttestResult{AttestKnown}) {
		t.Errorf("results = %v", res)
	}
	haveRecords(t, db, map[string]bool{hashA: true})

	// A new signature by the same key replaces the old attestation.
	res, err = db.PutAttestations([]Attestation{attestation(hashA, "r1", "sig1-rebuilt")})
	must(t, err)
	if !slices.Equal(res, []AttestResult{AttestStored}) {
		t.Errorf("results = %v", res)
	}
	haveRecords(t, db, map[string]bool{hashA: false})

	_, err = db.PutAttestations([]Attestation{attestation(hashB, "r1", "sigB")})
	must(t, err)

	ev, err := db.Evidence(hashA)
	must(t, err)
	var sigs []string
	for _, a := range ev.Attestations {
		if a.StorePath != sp(hashA, "hello") {
			t.Errorf("evidence for %s holds %s", hashA, a.StorePath)
		}
		sigs = append(sigs, a.Sig)
	}
	slices.Sort(sigs)
	if !slices.Equal(sigs, []string{"r1:sig1-rebuilt", "r2:sig2"}) {
		t.Errorf("attestations = %v", sigs)
	}
	n, err := db.CountAttestations()
	must(t, err)
	if n != 3 {
		t.Errorf("CountAttestations = %d, want 3", n)
	}
	ev, err = db.Evidence(hashC)
	must(t, err)
	if len(ev.Attestations) != 0 || ev.Allow != nil || ev.Quarantine != nil || len(ev.Deny) != 0 {
		t.Errorf("evidence of an unknown path: %+v", ev)
	}

	res, err = db.PutAttestations(nil)
	if err != nil || len(res) != 0 {
		t.Errorf("empty import: %v, %v", res, err)
	}
}

func TestAllowList(t *testing.T) {
	db, _ := openTestDB(t)
	putRecords(t, db, hashA, hashB, hashC)
	entries := []AllowEntry{
		{StorePath: sp(hashA, "hello"), NarHash: "sha256:1d5wv32xxc3zz9rv66d13ajla2r8zl68wqdlfhy92njh782rw78v", Reason: "reviewed", Added: t0},
		{StorePath: sp(hashB, "world"), Reason: "unpinned", Added: t0, Expires: t0.Add(time.Hour)},
	}
	must(t, db.PutAllow(entries))
	haveRecords(t, db, map[string]bool{hashA: false, hashB: false, hashC: true})

	list, err := db.AllowList()
	must(t, err)
	if len(list) != 2 || list[0].StorePath != entries[0].StorePath || list[1].StorePath != entries[1].StorePath ||
		!list[1].Expires.Equal(entries[1].Expires) || !list[0].Expires.IsZero() || list[0].NarHash != entries[0].NarHash {
		t.Errorf("AllowList = %+v", list)
	}
	ev, err := db.Evidence(hashB)
	must(t, err)
	if ev.Allow == nil || ev.Allow.Reason != "unpinned" {
		t.Errorf("evidence allow = %+v", ev.Allow)
	}

	// Replacing an entry keeps one per path.
	entries[1].Reason = "re-reviewed"
	must(t, db.PutAllow(entries[1:]))
	list, _ = db.AllowList()
	if len(list) != 2 || list[1].Reason != "re-reviewed" {
		t.Errorf("AllowList after replace = %+v", list)
	}

	putRecords(t, db, hashA, hashB)
	missing, err := db.RemoveAllow([]string{hashA, hashC})
	must(t, err)
	if !slices.Equal(missing, []string{hashC}) {
		t.Errorf("missing = %v, want [%s]", missing, hashC)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true})
	list, _ = db.AllowList()
	if len(list) != 1 || list[0].StorePath != entries[1].StorePath {
		t.Errorf("AllowList after remove = %+v", list)
	}
	ev, _ = db.Evidence(hashA)
	if ev.Allow != nil {
		t.Errorf("removed entry still in evidence: %+v", ev.Allow)
	}
}

func TestAllowEntryExpired(t *testing.T) {
	cases := []struct {
		expires time.Time
		want    bool
	}{
		{time.Time{}, false},
		{t0.Add(time.Nanosecond), false},
		{t0, true},
		{t0.Add(-time.Second), true},
	}
	for _, c := range cases {
		if got := (AllowEntry{Expires: c.expires}).Expired(t0); got != c.want {
			t.Errorf("Expires %v: Expired = %v, want %v", c.expires, got, c.want)
		}
	}
}

func TestDenyList(t *testing.T) {
	db, _ := openTestDB(t)
	putRecords(t, db, hashA, hashB)
	must(t, db.PutDeny([]DenyEntry{
		{Pattern: "*-openssl-3.0.7*", Reason: "CVE", Added: t0},
		{Pattern: sp(hashC, "evil"), Added: t0},
	}))
	// A deny entry can match any path: every decision is forgotten.
	haveRecords(t, db, map[string]bool{hashA: false, hashB: false})

	list, err := db.DenyList()
	must(t, err)
	var pats []string
	for _, e := range list {
		pats = append(pats, e.Pattern)
	}
	if !slices.Equal(pats, []string{"*-openssl-3.0.7*", sp(hashC, "evil")}) || list[0].Reason != "CVE" {
		t.Errorf("DenyList = %+v", list)
	}
	ev, err := db.Evidence(hashA)
	must(t, err)
	if len(ev.Deny) != 2 {
		t.Errorf("evidence deny = %+v", ev.Deny)
	}

	putRecords(t, db, hashA)
	missing, err := db.RemoveDeny([]string{"*-openssl-3.0.7*", "nope"})
	must(t, err)
	if !slices.Equal(missing, []string{"nope"}) {
		t.Errorf("missing = %v", missing)
	}
	haveRecords(t, db, map[string]bool{hashA: false})
	list, _ = db.DenyList()
	if len(list) != 1 || list[0].Pattern != sp(hashC, "evil") {
		t.Errorf("DenyList after remove = %+v", list)
	}
}

func TestQuarantineRetry(t *testing.T) {
	db, _ := openTestDB(t)
	putRecords(t, db, hashA, hashB)
	q := Quarantine{StorePath: sp(hashA, "hello"), Check: "nar_hash", Detail: "got sha256:x", Upstream: "u", Time: t0}
	must(t, db.PutQuarantine(hashA, q))
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true})
	ev, err := db.Evidence(hashA)
	must(t, err)
	if ev.Quarantine == nil || ev.Quarantine.Check != "nar_hash" || !ev.Quarantine.Time.Equal(t0) {
		t.Fatalf("quarantine = %+v", ev.Quarantine)
	}
	if ev, _ := db.Evidence(hashB); ev.Quarantine != nil {
		t.Errorf("quarantine leaked to %s", hashB)
	}

	putRecords(t, db, hashA) // e.g. decided in report mode meanwhile
	notQ, err := db.Retry([]string{hashA, hashB})
	must(t, err)
	if !slices.Equal(notQ, []string{hashB}) {
		t.Errorf("not quarantined = %v", notQ)
	}
	// Retry forgets the decisions so the next request re-fetches.
	haveRecords(t, db, map[string]bool{hashA: false, hashB: false})
	ev, _ = db.Evidence(hashA)
	if ev.Quarantine != nil {
		t.Errorf("quarantine survived retry: %+v", ev.Quarantine)
	}
	notQ, _ = db.Retry([]string{hashA})
	if !slices.Equal(notQ, []string{hashA}) {
		t.Errorf("second retry: not quarantined = %v", notQ)
	}
}

func TestRejections(t *testing.T) {
	db, _ := openTestDB(t)
	r := Rejection{StorePath: sp(hashA, "hello"), Reason: "unattested", Deriver: sp(hashC, "hello.drv"), Last: t0}
	must(t, db.RecordRejection(r))
	r.Reason, r.Last, r.Count, r.First = "denied", t0.Add(time.Minute), 99, t0.Add(time.Hour) // Count and First are the DB's
	must(t, db.RecordRejection(r))
	must(t, db.RecordRejection(Rejection{StorePath: sp(hashB, "world"), Reason: "attestation_mismatch", Last: t0.Add(30 * time.Second)}))

	list, err := db.Rejections()
	must(t, err)
	if len(list) != 2 {
		t.Fatalf("Rejections = %+v", list)
	}
	a, b := list[0], list[1]
	if a.StorePath != sp(hashA, "hello") || b.StorePath != sp(hashB, "world") {
		t.Fatalf("not newest first: %+v", list)
	}
	if a.Count != 2 || !a.First.Equal(t0) || !a.Last.Equal(t0.Add(time.Minute)) || a.Reason != "denied" || a.Deriver != r.Deriver {
		t.Errorf("repeated rejection = %+v", a)
	}
	if b.Count != 1 || !b.First.Equal(b.Last) {
		t.Errorf("single rejection = %+v", b)
	}

	must(t, db.ClearRejection(hashA))
	must(t, db.ClearRejection(hashC)) // absent: fine
	list, _ = db.Rejections()
	if len(list) != 1 || list[0].StorePath != sp(hashB, "world") {
		t.Errorf("after clear: %+v", list)
	}
}

// pathN is a distinct store path per n (digits are nix32 characters).
func pathN(n int) string { return sp(fmt.Sprintf("%032d", n), "p") }

// The rejection log keeps at most MaxRejections paths, dropping the least
// recently rejected. The log is filled to the limit in one transaction, which
// is what MaxRejections calls to RecordRejection would leave behind.
func TestRejectionsPruned(t *testing.T) {
	db, _ := openTestDB(t)
	must(t, db.update(func(tx *bolt.Tx) error {
		for i := range MaxRejections {
			// Oldest first by Last, but not in key order.
			n := (i * 7919) % MaxRejections
			r := Rejection{StorePath: pathN(n), Reason: "unattested", Count: 1, First: t0, Last: t0.Add(time.Duration(n) * time.Second)}
			if err := put(tx, bucketRejections, hashOf(r.StorePath), r); err != nil {
				return err
			}
			if err := tx.Bucket(bucketRejectOrder).Put(orderKey(r.Last, hashOf(r.StorePath)), nil); err != nil {
				return err
			}
		}
		_, err := addCount(tx, keyRejectionCount, MaxRejections)
		return err
	}))
	count := func() (n int) {
		t.Helper()
		must(t, db.view(func(tx *bolt.Tx) error {
			n = tx.Bucket(bucketRejections).Stats().KeyN
			if m := tx.Bucket(bucketRejectOrder).Stats().KeyN; m != n {
				t.Errorf("time index has %d entries, log %d", m, n)
			}
			return nil
		}))
		return n
	}
	if n := count(); n != MaxRejections {
		t.Fatalf("setup: %d rejections", n)
	}

	// Another rejection of a logged path prunes nothing.
	must(t, db.RecordRejection(Rejection{StorePath: pathN(0), Reason: "denied", Last: t0.Add(100 * time.Hour)}))
	if n := count(); n != MaxRejections {
		t.Fatalf("re-rejection: %d rejections, want %d", n, MaxRejections)
	}

	// New paths push out the oldest (pathN(0) was just refreshed, so 1, 2, 3).
	const added = 3
	for i := range added {
		must(t, db.RecordRejection(Rejection{StorePath: pathN(MaxRejections + i), Reason: "unattested",
			Last: t0.Add(200*time.Hour + time.Duration(i)*time.Second)}))
		if n := count(); n != MaxRejections {
			t.Fatalf("after %d new paths: %d rejections, want %d", i+1, n, MaxRejections)
		}
	}
	list, err := db.Rejections()
	must(t, err)
	have := map[string]bool{}
	for _, r := range list {
		have[r.StorePath] = true
	}
	for n := 1; n <= added; n++ {
		if have[pathN(n)] {
			t.Errorf("oldest %s survived", pathN(n))
		}
	}
	for _, n := range []int{0, added + 1, MaxRejections - 1, MaxRejections, MaxRejections + added - 1} {
		if !have[pathN(n)] {
			t.Errorf("%s was pruned", pathN(n))
		}
	}
	if list[0].StorePath != pathN(MaxRejections+added-1) {
		t.Errorf("newest = %s", list[0].StorePath)
	}
}

func TestReopenPersists(t *testing.T) {
	db, file := openTestDB(t)
	putRecords(t, db, hashA)
	_, err := db.PutAttestations([]Attestation{attestation(hashA, "r1", "sig1")})
	must(t, err)
	putRecords(t, db, hashA)
	must(t, db.PutAllow([]AllowEntry{{StorePath: sp(hashB, "x"), Added: t0, Expires: t0.Add(time.Hour)}}))
	must(t, db.PutDeny([]DenyEntry{{Pattern: "*-evil-*", Added: t0}}))
	putRecords(t, db, hashA)
	must(t, db.PutQuarantine(hashC, Quarantine{StorePath: sp(hashC, "q"), Check: "nar_size", Time: t0}))
	must(t, db.RecordRejection(Rejection{StorePath: sp(hashC, "q"), Reason: "nar_mismatch", Last: t0}))
	must(t, db.Close())

	db, err = OpenDB(file)
	must(t, err)
	defer db.Close()
	haveRecords(t, db, map[string]bool{hashA: true})
	ev, err := db.Evidence(hashA)
	must(t, err)
	if len(ev.Attestations) != 1 || ev.Attestations[0].Sig != "r1:sig1" || len(ev.Deny) != 1 {
		t.Errorf("evidence A after reopen = %+v", ev)
	}
	ev, _ = db.Evidence(hashB)
	if ev.Allow == nil || !ev.Allow.Expires.Equal(t0.Add(time.Hour)) {
		t.Errorf("allow after reopen = %+v", ev.Allow)
	}
	ev, _ = db.Evidence(hashC)
	if ev.Quarantine == nil || ev.Quarantine.Check != "nar_size" {
		t.Errorf("quarantine after reopen = %+v", ev.Quarantine)
	}
	rj, _ := db.Rejections()
	if len(rj) != 1 || rj[0].Count != 1 {
		t.Errorf("rejections after reopen = %+v", rj)
	}
	n, _ := db.CountAttestations()
	if n != 1 {
		t.Errorf("CountAttestations after reopen = %d", n)
	}
}

func TestOpenDBErrors(t *testing.T) {
	dir := t.TempDir()
	// The state "file" is a directory.
	if _, err := OpenDB(dir); err == nil {
		t.Error("OpenDB on a directory succeeded")
	}
}

// Concurrent readers and writers under the race detector.
func TestDBConcurrent(t *testing.T) {
	db, _ := openTestDB(t)
	done := make(chan error)
	for g := range 4 {
		go func() {
			var err error
			for i := 0; i < 20 && err == nil; i++ {
				h := fmt.Sprintf("%031d%d", i, g)
				err = putRec(db, h, record(h))
				if err == nil {
					_, err = db.Evidence(h)
				}
				if err == nil {
					err = db.RecordRejection(Rejection{StorePath: sp(h, "x"), Last: t0})
				}
			}
			done <- err
		}()
	}
	for range 4 {
		must(t, <-done)
	}
	rj, err := db.Rejections()
	must(t, err)
	if len(rj) != 80 {
		t.Errorf("%d rejections, want 80", len(rj))
	}
}

// putRec stores a record decided on the current evidence.
func putRec(db *DB, hash string, rec Record) error {
	ev, err := db.Evidence(hash)
	if err != nil {
		return err
	}
	_, err = db.PutRecord(hash, rec, ev.Epoch)
	return err
}

// A decision made on evidence that changed before it was stored is not
// stored: the change would otherwise be silently undone.
func TestPutRecordStaleEpoch(t *testing.T) {
	db, _ := openTestDB(t)
	ev, err := db.Evidence(hashA)
	must(t, err)
	must(t, db.PutDeny([]DenyEntry{{Pattern: hashA}}))
	stored, err := db.PutRecord(hashA, record(hashA), ev.Epoch)
	must(t, err)
	if stored {
		t.Fatal("a decision older than the last evidence change was stored")
	}
	if rec, _ := db.Record(hashA); rec != nil {
		t.Fatal("record present")
	}
	must(t, putRec(db, hashA, record(hashA)))
	if rec, _ := db.Record(hashA); rec == nil {
		t.Fatal("a current decision was not stored")
	}
}

// Changed settings drop every stored decision; unchanged ones keep them.
func TestSyncSettings(t *testing.T) {
	db, _ := openTestDB(t)
	changed, err := db.SyncSettings("a")
	must(t, err)
	if !changed {
		t.Fatal("first settings not reported as a change")
	}
	must(t, putRec(db, hashA, record(hashA)))
	if changed, _ := db.SyncSettings("a"); changed {
		t.Fatal("same settings reported as a change")
	}
	if rec, _ := db.Record(hashA); rec == nil {
		t.Fatal("record dropped although settings did not change")
	}
	if changed, _ := db.SyncSettings("b"); !changed {
		t.Fatal("new settings not reported")
	}
	if rec, _ := db.Record(hashA); rec != nil {
		t.Fatal("record kept across a settings change")
	}
}

// With require_closure every evidence change forgets every decision.
func TestForgetAllOnChange(t *testing.T) {
	db, _ := openTestDB(t)
	db.ForgetAllOnChange(true)
	must(t, putRec(db, hashA, record(hashA)))
	must(t, putRec(db, hashB, record(hashB)))
	must(t, db.PutQuarantine(hashB, Quarantine{StorePath: sp(hashB, "b")}))
	if rec, _ := db.Record(hashA); rec != nil {
		t.Fatal("a change to another path's evidence kept this path's decision")
	}
}
