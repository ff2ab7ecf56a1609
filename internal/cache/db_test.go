package cache

import (
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/verify"
	bolt "go.etcd.io/bbolt"
)

var t0 = time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)

// Store path hashes (32 nix32 characters) for the tests.
const (
	hashA = "0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	hashB = "1bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	hashC = "2ccccccccccccccccccccccccccccccc"
	hashD = "3ddddddddddddddddddddddddddddddd"
	hashE = "4fffffffffffffffffffffffffffffff"
)

const storeDir = "/nix/store"

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

func mustAllow(t *testing.T) func([]policy.AllowEntry, error) {
	return func(_ []policy.AllowEntry, err error) {
		t.Helper()
		must(t, err)
	}
}

// mustSHA256 parses a hash literal of the tests.
func mustSHA256(s string) narinfo.SHA256 {
	h, err := narinfo.ParseSHA256(s)
	if err != nil {
		panic(err)
	}
	return h
}

func record(hash string) Record { return recordAt(sp(hash, "hello")) }

// recordAt is an approved decision for storePath, with a NarHash of its own.
func recordAt(storePath string, refs ...string) Record {
	hash := path.Base(storePath)[:narinfo.HashLen]
	return Record{StorePath: storePath, NarInfo: []byte("StorePath: " + storePath + "\n"), Reason: policy.Attested,
		Approved: true, Upstream: "https://cache.example.org", NarURL: "nar/x.nar.xz", NarFile: hash + ".nar.xz",
		NAR: verify.Expect{Compression: narinfo.CompressionXZ, FileHash: narinfo.SumSHA256([]byte("file " + storePath)), FileSize: 300,
			NarHash: narinfo.SumSHA256([]byte("nar " + storePath)), NarSize: 680, Flat: narinfo.SumSHA256([]byte("flat"))},
		References: refs, Settings: "settings-1", Decided: t0}
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
		got.NAR != want.NAR || got.NAR.NarSize != 680 || got.NAR.Flat.IsZero() || !got.Approved || got.NarFile != want.NarFile ||
		got.Reason != policy.Attested || got.Settings != want.Settings {
		t.Errorf("round trip: got %+v, want %+v", got, want)
	}
	if n, err := db.CountRecords(); err != nil || n != 3 {
		t.Errorf("CountRecords = %d, %v; want 3", n, err)
	}

	// A newer record replaces the older one.
	want.Reason = policy.Allowlisted
	must(t, putRec(db, hashA, want))
	got, _ = db.Record(hashA)
	if got.Reason != policy.Allowlisted {
		t.Errorf("replaced record: %+v", got)
	}
	if n, _ := db.CountRecords(); n != 3 {
		t.Errorf("CountRecords after replace = %d, want 3", n)
	}

	n, err := db.Forget(hashB)
	must(t, err)
	if n != 1 {
		t.Errorf("Forget(B) dropped %d, want 1", n)
	}
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashC: true})
	n, err = db.Forget(hashB) // forgetting nothing is fine
	must(t, err)
	if n != 0 {
		t.Errorf("second Forget(B) dropped %d, want 0", n)
	}
	// No hashes: nothing is forgotten (it used to mean everything).
	n, err = db.Forget()
	must(t, err)
	if n != 0 {
		t.Errorf("Forget() dropped %d, want 0", n)
	}
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashC: true})
	n, err = db.Forget(hashA, hashC)
	must(t, err)
	if n != 2 {
		t.Errorf("Forget(A, C) dropped %d, want 2", n)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashB: false, hashC: false})
	if n, _ := db.CountRecords(); n != 0 {
		t.Errorf("CountRecords after forgetting all = %d", n)
	}
	// The bucket is usable after every record was forgotten.
	putRecords(t, db, hashC)
	haveRecords(t, db, map[string]bool{hashC: true})
}

func TestWritable(t *testing.T) {
	db, _ := openTestDB(t)
	must(t, db.Writable())
	must(t, db.Writable())
	// The probe writes to the meta bucket, not among the blobs.
	must(t, db.view(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketMeta).Get(keyHealth) == nil {
			t.Error("health probe key not in the meta bucket")
		}
		if n := tx.Bucket(bucketBlobs).Stats().KeyN; n != 0 {
			t.Errorf("blobs bucket holds %d keys after the health probe", n)
		}
		return nil
	}))
	// The health probe's key must not show up as a blob.
	b, err := OpenBlobs(db, t.TempDir(), 0)
	must(t, err)
	if n := b.Names(); len(n) != 0 {
		t.Errorf("Names = %q", n)
	}
	must(t, b.Close())
}

func attestation(hash, key, sig string) policy.Attestation {
	return policy.Attestation{StorePath: sp(hash, "hello"), NarHash: mustSHA256("sha256:1d5wv32xxc3zz9rv66d13ajla2r8zl68wqdlfhy92njh782rw78v"),
		NarSize: 680, References: []string{hash + "-hello"}, KeyName: key, PublicKey: key + ":PUB" + key, Sig: key + ":" + sig,
		Imported: t0}
}

func TestAttestations(t *testing.T) {
	db, _ := openTestDB(t)
	putRecords(t, db, hashA, hashB)

	res, err := db.PutAttestations([]policy.Attestation{
		attestation(hashA, "r1", "sig1"),
		attestation(hashA, "r2", "sig2"),
		attestation(hashA, "r1", "sig1"), // the same again in one batch
	}, nil)
	must(t, err)
	if !slices.Equal(res, []bool{true, true, false}) {
		t.Errorf("results = %v", res)
	}
	// Storing forgot hashA's decision, not hashB's.
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true})

	// Re-importing what is known changes nothing, and forgets nothing.
	putRecords(t, db, hashA)
	res, err = db.PutAttestations([]policy.Attestation{attestation(hashA, "r2", "sig2")}, nil)
	must(t, err)
	if !slices.Equal(res, []bool{false}) {
		t.Errorf("results = %v", res)
	}
	haveRecords(t, db, map[string]bool{hashA: true})

	// A new signature by the same key replaces the old attestation.
	res, err = db.PutAttestations([]policy.Attestation{attestation(hashA, "r1", "sig1-rebuilt")}, nil)
	must(t, err)
	if !slices.Equal(res, []bool{true}) {
		t.Errorf("results = %v", res)
	}
	haveRecords(t, db, map[string]bool{hashA: false})

	_, err = db.PutAttestations([]policy.Attestation{attestation(hashB, "r1", "sigB")}, nil)
	must(t, err)

	ev, _, err := db.Evidence(hashA)
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
	ev, _, err = db.Evidence(hashC)
	must(t, err)
	if len(ev.Attestations) != 0 || ev.Allow != nil || ev.Quarantine != nil || len(ev.Deny) != 0 {
		t.Errorf("evidence of an unknown path: %+v", ev)
	}

	res, err = db.PutAttestations(nil, nil)
	if err != nil || len(res) != 0 {
		t.Errorf("empty import: %v, %v", res, err)
	}
}

func TestAllowList(t *testing.T) {
	db, _ := openTestDB(t)
	putRecords(t, db, hashA, hashB, hashC)
	entries := []policy.AllowEntry{
		{StorePath: sp(hashA, "hello"), NarHash: mustSHA256("sha256:1d5wv32xxc3zz9rv66d13ajla2r8zl68wqdlfhy92njh782rw78v"), Reason: "reviewed", Added: t0},
		{StorePath: sp(hashB, "world"), Reason: "unpinned", Added: t0, Expires: t0.Add(time.Hour)},
	}
	mustAllow(t)(db.PutAllow(entries, nil))
	haveRecords(t, db, map[string]bool{hashA: false, hashB: false, hashC: true})

	list, err := db.AllowList()
	must(t, err)
	if len(list) != 2 || list[0].StorePath != entries[0].StorePath || list[1].StorePath != entries[1].StorePath ||
		!list[1].Expires.Equal(entries[1].Expires) || !list[0].Expires.IsZero() || list[0].NarHash != entries[0].NarHash {
		t.Errorf("AllowList = %+v", list)
	}
	ev, _, err := db.Evidence(hashB)
	must(t, err)
	if ev.Allow == nil || ev.Allow.Reason != "unpinned" {
		t.Errorf("evidence allow = %+v", ev.Allow)
	}

	// Replacing an entry keeps one per path.
	entries[1].Reason = "re-reviewed"
	mustAllow(t)(db.PutAllow(entries[1:], nil))
	list, _ = db.AllowList()
	if len(list) != 2 || list[1].Reason != "re-reviewed" {
		t.Errorf("AllowList after replace = %+v", list)
	}

	putRecords(t, db, hashA, hashB)
	missing, err := db.RemoveAllow([]string{hashA, hashC}, nil)
	must(t, err)
	if !slices.Equal(missing, []string{hashC}) {
		t.Errorf("missing = %v, want [%s]", missing, hashC)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true})
	list, _ = db.AllowList()
	if len(list) != 1 || list[0].StorePath != entries[1].StorePath {
		t.Errorf("AllowList after remove = %+v", list)
	}
	ev, _, _ = db.Evidence(hashA)
	if ev.Allow != nil {
		t.Errorf("removed entry still in evidence: %+v", ev.Allow)
	}
}

// denyMatch matches stored decisions as the gate does for deny patterns.
func denyMatch(patterns ...string) func(base string, narHash narinfo.SHA256) bool {
	return func(base string, narHash narinfo.SHA256) bool {
		for _, p := range patterns {
			if policy.DenyMatches(p, path.Join(storeDir, base), narHash, storeDir) {
				return true
			}
		}
		return false
	}
}

// putAt stores recordAt(storePath, refs...) under its hash.
func putAt(t *testing.T, db *DB, storePath string, refs ...string) Record {
	t.Helper()
	rec := recordAt(storePath, refs...)
	must(t, putRec(db, narinfo.PathHash(storePath), rec))
	return rec
}

func TestDenyList(t *testing.T) {
	db, _ := openTestDB(t)
	putAt(t, db, sp(hashA, "openssl-3.0.7"))
	putAt(t, db, sp(hashB, "hello"))
	putAt(t, db, sp(hashC, "curl-8.0"), hashA) // rests on openssl's decision (require_closure)
	putAt(t, db, sp(hashD, "openssl-3.0.8"))
	entries := []policy.DenyEntry{
		{Pattern: "*-openssl-3.0.7*", Reason: "CVE", Added: t0},
		{Pattern: sp(hashE, "evil"), Added: t0},
	}
	dropped, err := db.PutDeny(entries, denyMatch("*-openssl-3.0.7*", sp(hashE, "evil")), nil)
	must(t, err)
	// Exactly the matching decision and the one resting on it are forgotten.
	if dropped != 2 {
		t.Errorf("PutDeny dropped %d, want 2", dropped)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true, hashC: false, hashD: true})

	list, err := db.DenyList()
	must(t, err)
	var pats []string
	for _, e := range list {
		pats = append(pats, e.Pattern)
	}
	if !slices.Equal(pats, []string{"*-openssl-3.0.7*", sp(hashE, "evil")}) || list[0].Reason != "CVE" {
		t.Errorf("DenyList = %+v", list)
	}
	ev, _, err := db.Evidence(hashA)
	must(t, err)
	if len(ev.Deny) != 2 {
		t.Errorf("evidence deny = %+v", ev.Deny)
	}

	// A NarHash pattern matches by the stored NarHash, whatever the name.
	recB, _ := db.Record(hashB)
	dropped, err = db.PutDeny([]policy.DenyEntry{{Pattern: recB.NAR.NarHash.String(), Added: t0}}, denyMatch(recB.NAR.NarHash.String()), nil)
	must(t, err)
	if dropped != 1 {
		t.Errorf("PutDeny by NarHash dropped %d, want 1", dropped)
	}
	haveRecords(t, db, map[string]bool{hashB: false, hashD: true})

	// Report mode stores served rejections: removing the entry forgets the
	// decisions it matched, and only those.
	putAt(t, db, sp(hashA, "openssl-3.0.7"))
	putAt(t, db, sp(hashB, "hello"))
	missing, err := db.RemoveDeny([]string{"*-openssl-3.0.7*", "nope"}, denyMatch("*-openssl-3.0.7*", "nope"), nil)
	must(t, err)
	if !slices.Equal(missing, []string{"nope"}) {
		t.Errorf("missing = %v", missing)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true, hashD: true})
	list, _ = db.DenyList()
	if len(list) != 2 || list[0].Pattern != sp(hashE, "evil") || list[1].Pattern != recB.NAR.NarHash.String() {
		t.Errorf("DenyList after remove = %+v", list)
	}
}

func TestQuarantineRetry(t *testing.T) {
	db, _ := openTestDB(t)
	putRecords(t, db, hashA, hashB)
	q := policy.Quarantine{StorePath: sp(hashA, "hello"), Check: "nar_hash", Detail: "got sha256:x", Upstream: "u", Time: t0}
	must(t, db.PutQuarantine(hashA, q))
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true})
	if got, err := db.Quarantine(hashA); err != nil || got == nil || got.Check != "nar_hash" || got.Detail != q.Detail {
		t.Errorf("Quarantine(A) = %+v, %v", got, err)
	}
	if got, err := db.Quarantine(hashB); err != nil || got != nil {
		t.Errorf("Quarantine(B) = %+v, %v", got, err)
	}
	ev, _, err := db.Evidence(hashA)
	must(t, err)
	if ev.Quarantine == nil || ev.Quarantine.Check != "nar_hash" || !ev.Quarantine.Time.Equal(t0) {
		t.Fatalf("quarantine = %+v", ev.Quarantine)
	}
	if ev, _, _ := db.Evidence(hashB); ev.Quarantine != nil {
		t.Errorf("quarantine leaked to %s", hashB)
	}

	putRecords(t, db, hashA) // e.g. decided in report mode meanwhile
	notQ, err := db.Retry([]string{hashA, hashB}, nil)
	must(t, err)
	if !slices.Equal(notQ, []string{hashB}) {
		t.Errorf("not quarantined = %v", notQ)
	}
	// Retry forgets the decisions so the next request re-fetches.
	haveRecords(t, db, map[string]bool{hashA: false, hashB: false})
	ev, _, _ = db.Evidence(hashA)
	if ev.Quarantine != nil {
		t.Errorf("quarantine survived retry: %+v", ev.Quarantine)
	}
	if got, _ := db.Quarantine(hashA); got != nil {
		t.Errorf("Quarantine(A) after retry = %+v", got)
	}
	notQ, _ = db.Retry([]string{hashA}, nil)
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
			if err := put(tx, bucketRejections, narinfo.PathHash(r.StorePath), r); err != nil {
				return err
			}
			if err := tx.Bucket(bucketRejectOrder).Put(orderKey(r.Last, narinfo.PathHash(r.StorePath)), nil); err != nil {
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
	_, err := db.PutAttestations([]policy.Attestation{attestation(hashA, "r1", "sig1")}, nil)
	must(t, err)
	putRecords(t, db, hashA)
	mustAllow(t)(db.PutAllow([]policy.AllowEntry{{StorePath: sp(hashB, "x"), Added: t0, Expires: t0.Add(time.Hour)}}, nil))
	dropped, err := db.PutDeny([]policy.DenyEntry{{Pattern: "*-evil-*", Added: t0}}, denyMatch("*-evil-*"), nil)
	must(t, err)
	if dropped != 0 {
		t.Errorf("a deny entry matching no decision dropped %d", dropped)
	}
	recD := putAt(t, db, sp(hashD, "app"), hashA) // rests on A's decision
	must(t, db.PutQuarantine(hashC, policy.Quarantine{StorePath: sp(hashC, "q"), Check: "nar_size", Time: t0}))
	must(t, db.RecordRejection(Rejection{StorePath: sp(hashC, "q"), Reason: "nar_mismatch", Last: t0}))
	must(t, db.Close())

	db, err = OpenDB(file)
	must(t, err)
	defer db.Close()
	haveRecords(t, db, map[string]bool{hashA: true, hashD: true})
	if got, _ := db.Record(hashD); got == nil || got.NAR != recD.NAR || !slices.Equal(got.References, []string{hashA}) ||
		got.Settings != recD.Settings || got.Reason != recD.Reason {
		t.Errorf("record D after reopen = %+v, want %+v", got, recD)
	}
	ev, _, err := db.Evidence(hashA)
	must(t, err)
	if len(ev.Attestations) != 1 || ev.Attestations[0].Sig != "r1:sig1" || len(ev.Deny) != 1 {
		t.Errorf("evidence A after reopen = %+v", ev)
	}
	ev, _, _ = db.Evidence(hashB)
	if ev.Allow == nil || !ev.Allow.Expires.Equal(t0.Add(time.Hour)) {
		t.Errorf("allow after reopen = %+v", ev.Allow)
	}
	ev, _, _ = db.Evidence(hashC)
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
	// The reference index persisted too: forgetting A drops D.
	if n, err := db.Forget(hashA); err != nil || n != 2 {
		t.Errorf("Forget(A) after reopen dropped %d, %v; want 2", n, err)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashD: false})
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
					_, _, err = db.Evidence(h)
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
	_, epoch, err := db.Evidence(hash)
	if err != nil {
		return err
	}
	_, err = db.PutRecord(hash, rec, epoch)
	return err
}

// A decision made on evidence that changed before it was stored is not
// stored: the change would otherwise be silently undone.
func TestPutRecordStaleEpoch(t *testing.T) {
	db, _ := openTestDB(t)
	_, epoch, err := db.Evidence(hashA)
	must(t, err)
	_, err = db.PutDeny([]policy.DenyEntry{{Pattern: hashA}}, denyMatch(hashA), nil)
	must(t, err)
	stored, err := db.PutRecord(hashA, record(hashA), epoch)
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

// SyncSettings remembers the digest of the last start and reports a change
// from a different earlier one; it drops no decisions (each record carries
// the digest it was made under and is decided again when next used).
func TestSyncSettings(t *testing.T) {
	db, _ := openTestDB(t)
	changed, err := db.SyncSettings("a")
	must(t, err)
	if changed {
		t.Fatal("the very first start reported as a change")
	}
	must(t, putRec(db, hashA, record(hashA)))
	if changed, err := db.SyncSettings("a"); err != nil || changed {
		t.Fatalf("same settings reported as a change (%v)", err)
	}
	if rec, _ := db.Record(hashA); rec == nil {
		t.Fatal("record dropped although settings did not change")
	}
	if changed, err := db.SyncSettings("b"); err != nil || !changed {
		t.Fatalf("new settings not reported (%v)", err)
	}
	if rec, _ := db.Record(hashA); rec == nil || rec.Settings != record(hashA).Settings {
		t.Fatalf("record dropped or changed by a settings change: %+v", rec)
	}
	if changed, _ := db.SyncSettings("b"); changed {
		t.Fatal("settings of the last start reported as a change")
	}
	if changed, _ := db.SyncSettings("a"); !changed {
		t.Fatal("going back to earlier settings not reported")
	}
}

// A change to one path's evidence drops that path's decision and the
// decisions resting on it (References), and no others.
func TestEvidenceChangeDropsDependents(t *testing.T) {
	db, _ := openTestDB(t)
	putAt(t, db, sp(hashA, "a"))
	putAt(t, db, sp(hashB, "b"))
	putAt(t, db, sp(hashC, "c"), hashB)
	must(t, db.PutQuarantine(hashB, policy.Quarantine{StorePath: sp(hashB, "b")}))
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashC: false})

	putAt(t, db, sp(hashB, "b"))
	putAt(t, db, sp(hashC, "c"), hashB)
	_, err := db.PutAttestations([]policy.Attestation{attestation(hashB, "r1", "sig1")}, nil)
	must(t, err)
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashC: false})

	putAt(t, db, sp(hashB, "b"))
	putAt(t, db, sp(hashC, "c"), hashB)
	mustAllow(t)(db.PutAllow([]policy.AllowEntry{{StorePath: sp(hashB, "b"), Added: t0}}, nil))
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashC: false})

	putAt(t, db, sp(hashB, "b"))
	putAt(t, db, sp(hashC, "c"), hashB)
	_, err = db.RemoveAllow([]string{hashB}, nil)
	must(t, err)
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashC: false})

	putAt(t, db, sp(hashB, "b"))
	putAt(t, db, sp(hashC, "c"), hashB)
	_, err = db.Retry([]string{hashB}, nil)
	must(t, err)
	haveRecords(t, db, map[string]bool{hashA: true, hashB: false, hashC: false})
}

// Forget drops, transitively, the decisions that rest on a forgotten one:
// A references B and C references A, so forgetting B drops B, A and C, but
// not the unrelated D.
func TestForgetCascade(t *testing.T) {
	db, _ := openTestDB(t)
	var mu sync.Mutex
	var told []string
	db.OnForget(func(hashes []string) {
		mu.Lock()
		told = append(told, hashes...)
		mu.Unlock()
	})
	putAt(t, db, sp(hashB, "b"))
	putAt(t, db, sp(hashA, "a"), hashB)
	putAt(t, db, sp(hashC, "c"), hashA)
	putAt(t, db, sp(hashD, "d"))
	changes := db.Changes()

	n, err := db.Forget(hashB)
	must(t, err)
	if n != 3 {
		t.Errorf("Forget(B) dropped %d, want 3", n)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashB: false, hashC: false, hashD: true})
	mu.Lock()
	slices.Sort(told)
	if !slices.Equal(told, []string{hashA, hashB, hashC}) {
		t.Errorf("OnForget told %v, want [%s %s %s]", told, hashA, hashB, hashC)
	}
	told = nil
	mu.Unlock()
	if db.Changes() == changes {
		t.Error("Changes did not move on")
	}
	// The index entries went with the records: a new A without references
	// is not dropped by B again.
	putAt(t, db, sp(hashA, "a"))
	if n, _ := db.Forget(hashB); n != 0 {
		t.Errorf("Forget(B) again dropped %d, want 0", n)
	}
	haveRecords(t, db, map[string]bool{hashA: true, hashD: true})

	// Replacing a record replaces its references.
	putAt(t, db, sp(hashC, "c"), hashA)
	putAt(t, db, sp(hashC, "c"), hashD)
	if n, _ := db.Forget(hashA); n != 1 {
		t.Errorf("Forget(A) dropped %d, want 1 (C no longer rests on A)", n)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashC: true, hashD: true})

	// Dependents of a path without a record of its own are still found.
	if n, _ := db.Forget(hashD); n != 2 {
		t.Errorf("Forget(D) dropped %d, want 2", n)
	}
	haveRecords(t, db, map[string]bool{hashC: false, hashD: false})
	putAt(t, db, sp(hashC, "c"), hashE)
	if n, _ := db.Forget(hashE); n != 1 {
		t.Errorf("Forget(E) without a record of E dropped %d, want 1", n)
	}
	haveRecords(t, db, map[string]bool{hashC: false})

	// A cycle of references ends.
	putAt(t, db, sp(hashA, "a"), hashC)
	putAt(t, db, sp(hashC, "c"), hashA)
	putAt(t, db, sp(hashD, "d"))
	if n, _ := db.Forget(hashA); n != 2 {
		t.Errorf("Forget(A) in a cycle dropped %d, want 2", n)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashC: false, hashD: true})

	// Nothing dropped: OnForget is not called.
	mu.Lock()
	told = nil
	mu.Unlock()
	if n, _ := db.Forget(hashB); n != 0 {
		t.Errorf("Forget(B) dropped %d", n)
	}
	mu.Lock()
	if told != nil {
		t.Errorf("OnForget told %v for nothing dropped", told)
	}
	mu.Unlock()
}

// ForgetMatching drops the decisions whose "<hash>-<name>" and NarHash a
// matcher accepts (here a glob over the base name), with their dependents.
func TestForgetMatching(t *testing.T) {
	db, _ := openTestDB(t)
	putAt(t, db, sp(hashA, "openssl-3.0.7"))
	recB := putAt(t, db, sp(hashB, "openssl-3.0.8"))
	putAt(t, db, sp(hashC, "hello"))
	putAt(t, db, sp(hashD, "curl-8.0"), hashA)
	putAt(t, db, sp(hashE, "openssl-3.0.7-dev"))

	var seen []string
	n, err := db.ForgetMatching(func(base string, narHash narinfo.SHA256) bool {
		seen = append(seen, base)
		ok, _ := path.Match("*-openssl-3.0.7", base)
		return ok
	})
	must(t, err)
	if n != 2 {
		t.Errorf("ForgetMatching dropped %d, want 2", n)
	}
	haveRecords(t, db, map[string]bool{hashA: false, hashB: true, hashC: true, hashD: false, hashE: true})
	slices.Sort(seen)
	want := []string{hashA + "-openssl-3.0.7", hashB + "-openssl-3.0.8", hashC + "-hello", hashD + "-curl-8.0", hashE + "-openssl-3.0.7-dev"}
	if !slices.Equal(seen, want) {
		t.Errorf("matcher saw %v, want %v", seen, want)
	}

	// The matcher is given each record's NarHash.
	n, err = db.ForgetMatching(func(_ string, narHash narinfo.SHA256) bool { return narHash == recB.NAR.NarHash })
	must(t, err)
	if n != 1 {
		t.Errorf("ForgetMatching by NarHash dropped %d, want 1", n)
	}
	haveRecords(t, db, map[string]bool{hashB: false, hashC: true, hashE: true})

	// Matching nothing drops nothing.
	if n, err := db.ForgetMatching(func(string, narinfo.SHA256) bool { return false }); err != nil || n != 0 {
		t.Errorf("ForgetMatching(nothing) = %d, %v", n, err)
	}
	haveRecords(t, db, map[string]bool{hashC: true, hashE: true})
}
