package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/etcdtest"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const storeDir = "/nix/store"

// etcd is one real etcd member on loopback (internal/etcdtest).
type etcd struct {
	t testing.TB
	*etcdtest.Cluster
	client string
}

func startEtcd(t testing.TB) *etcd {
	c := etcdtest.Start(t, 1)
	return &etcd{t: t, Cluster: c, client: c.Endpoint(0)}
}

func (e *etcd) kill()  { e.Kill(0) }
func (e *etcd) start() { e.Restart(0) }

func (e *etcd) cli() *clientv3.Client {
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{e.client}, Logger: zap.NewNop()})
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

// node is one cacheproxy node's state file and cluster link.
type node struct {
	*Node
	db       *cache.DB
	rejected atomic.Int64
	stop     context.CancelFunc
	done     chan struct{}
}

func newNode(t testing.TB, e *etcd, attesters []verify.PublicKey, dir string) *node {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	db, err := cache.OpenDB(filepath.Join(dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	n := &node{db: db, done: make(chan struct{})}
	n.Node, err = Open(Options{Endpoints: []string{e.client}, DB: db,
		Log:       slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		Verify:    func(a policy.Attestation) error { return verifyWith(attesters, a) },
		DenyMatch: denyMatch,
		Rejected:  func(string) { n.rejected.Add(1) }, WriteTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var ctx context.Context
	ctx, n.stop = context.WithCancel(context.Background())
	go func() { defer close(n.done); n.Run(ctx) }()
	t.Cleanup(n.close)
	return n
}

func (n *node) close() {
	if n.stop == nil {
		return
	}
	n.stop()
	<-n.done
	n.Close()
	n.db.Close()
	n.stop = nil
}

type testWriter struct{ t testing.TB }

var logMu sync.Mutex

func (w testWriter) Write(p []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func verifyWith(keys []verify.PublicKey, a policy.Attestation) error {
	fp, err := narinfo.Fingerprint(storeDir, a.StorePath, a.NarHash, a.NarSize, a.References)
	if err != nil {
		return err
	}
	for _, k := range keys {
		if k.String() == a.PublicKey {
			if !k.Verify(fp, a.Sig) {
				return errors.New("signature does not verify")
			}
			return nil
		}
	}
	return errors.New("not a configured attester key")
}

func denyMatch(entries []policy.DenyEntry) func(string, narinfo.SHA256) bool {
	return func(base string, nh narinfo.SHA256) bool {
		for _, e := range entries {
			if policy.DenyMatches(e.Pattern, storeDir+"/"+base, nh, storeDir) {
				return true
			}
		}
		return false
	}
}

// eventually waits for cond, up to a bound far above the 1 s the README
// promises (the machine may be loaded): correctness, not speed, is tested.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("never happened: %s", what)
}

func storePath(i int) string {
	return fmt.Sprintf("%s/%032d-p%d", storeDir, i, i)
}

func attestation(t *testing.T, key verify.SecretKey, i int) policy.Attestation {
	sp := strings.ReplaceAll(storePath(i), "0", "a")
	var nh narinfo.SHA256
	nh[0], nh[1] = byte(i), 1
	fp, err := narinfo.Fingerprint(storeDir, sp, nh, 1000, nil)
	if err != nil {
		t.Fatal(err)
	}
	return policy.Attestation{StorePath: sp, NarHash: nh, NarSize: 1000, References: []string{}, KeyName: key.Public().Name,
		PublicKey: key.Public().String(), Sig: key.Sign(fp), Imported: time.Now().UTC()}
}

// record stores an approved decision for an attestation's path on a node.
func record(t *testing.T, db *cache.DB, a policy.Attestation) string {
	hash := a.StorePath[len(storeDir)+1:][:narinfo.HashLen]
	rec := cache.Record{StorePath: a.StorePath, Approved: true, NarFile: hash + ".nar", NAR: verify.Expect{NarHash: a.NarHash, NarSize: a.NarSize}}
	epoch, _ := db.Epoch()
	if ok, err := db.PutRecord(hash, rec, epoch); err != nil || !ok {
		t.Fatal(ok, err)
	}
	return hash
}

func keyPair(t testing.TB, name string) verify.SecretKey {
	k, err := verify.GenerateKey(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// The trust state written on one node is what every node decides from:
// attestations, allowlist, denylist (dropping the matching decisions and
// no others), quarantines and their retry, with their audit records.
func TestEvidenceReachesEveryNode(t *testing.T) {
	e := startEtcd(t)
	rb := keyPair(t, "rebuilder-1")
	keys := []verify.PublicKey{rb.Public()}
	a, b := newNode(t, e, keys, ""), newNode(t, e, keys, "")

	att := attestation(t, rb, 1)
	other := attestation(t, rb, 2)
	hash, otherHash := record(t, b.db, att), record(t, b.db, other)
	audit := &cache.AuditRecord{Time: time.Now(), Who: "alice", Action: cache.ActionAttest}
	stored, err := a.PutAttestations([]policy.Attestation{att}, audit)
	if err != nil || !stored[0] {
		t.Fatal(stored, err)
	}
	// The writing node's mirror holds it when the change returns.
	if got, _ := a.db.Attestations(hash); len(got) != 1 {
		t.Fatalf("node A after import: %v", got)
	}
	eventually(t, "attestation mirrored on B and its decision dropped", func() bool {
		got, _ := b.db.Attestations(hash)
		rec, _ := b.db.Record(hash)
		return len(got) == 1 && rec == nil
	})
	if rec, _ := b.db.Record(otherHash); rec == nil {
		t.Fatal("B dropped the decision of a path the import did not touch")
	}
	// The same import again is known, not stored.
	if stored, err := a.PutAttestations([]policy.Attestation{att}, &cache.AuditRecord{Time: time.Now(), Who: "alice", Action: cache.ActionAttest}); err != nil || stored[0] {
		t.Fatal(stored, err)
	}

	// A deny on B stops A's decision of the path it matches, only.
	record(t, a.db, att)
	record(t, a.db, other)
	if _, err := b.PutDeny([]policy.DenyEntry{{Pattern: att.StorePath, Added: time.Now()}}, nil,
		&cache.AuditRecord{Time: time.Now(), Who: "bob", Action: cache.ActionDenyAdd}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "deny mirrored on A and the matching decision dropped", func() bool {
		rec, _ := a.db.Record(hash)
		deny, _ := a.db.DenyList()
		return rec == nil && len(deny) == 1
	})
	if rec, _ := a.db.Record(otherHash); rec == nil {
		t.Fatal("the deny dropped a decision it does not match")
	}

	// Allow on A, remove on B.
	allow := policy.AllowEntry{StorePath: other.StorePath, NarHash: other.NarHash, Added: time.Now().UTC()}
	if _, err := a.PutAllow([]policy.AllowEntry{allow}, &cache.AuditRecord{Time: time.Now(), Who: "alice", Action: cache.ActionAllowAdd}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "allow entry on B", func() bool { l, _ := b.db.AllowList(); return len(l) == 1 })
	missing, err := b.RemoveAllow([]string{otherHash, "00000000000000000000000000000000"},
		&cache.AuditRecord{Time: time.Now(), Who: "bob", Action: cache.ActionAllowRemove})
	if err != nil || len(missing) != 1 {
		t.Fatal(missing, err)
	}
	eventually(t, "allow entry gone on A", func() bool { l, _ := a.db.AllowList(); return len(l) == 0 })

	// A quarantine found on A holds on B; a retry on B lifts it on A.
	q := policy.Quarantine{StorePath: other.StorePath, Check: "nar_hash", Detail: "test", Time: time.Now().UTC()}
	if err := a.PutQuarantine(otherHash, q); err != nil {
		t.Fatal(err)
	}
	eventually(t, "quarantine on B", func() bool { got, _ := b.db.Quarantine(otherHash); return got != nil })
	if nq, err := b.Retry([]string{otherHash}, &cache.AuditRecord{Time: time.Now(), Who: "bob", Action: cache.ActionRetry}); err != nil || len(nq) != 0 {
		t.Fatal(nq, err)
	}
	eventually(t, "quarantine lifted on A", func() bool { got, _ := a.db.Quarantine(otherHash); return got == nil })

	// Every change's audit record is on both nodes.
	eventually(t, "audit trail on both nodes", func() bool {
		ra, _ := a.db.Audit(time.Time{})
		rb, _ := b.db.Audit(time.Time{})
		return len(ra) == 6 && len(rb) == 6
	})
	ra, _ := a.db.Audit(time.Time{})
	if ra[0].Who != "alice" || ra[0].Counts[cache.CountStored] != 1 || ra[2].Who != "bob" || ra[2].Action != cache.ActionDenyAdd {
		t.Fatalf("audit records: %+v", ra)
	}
}

// An attestation written straight into etcd with a bad signature is
// treated as absent, counted and logged, on every node.
func TestForgedRecordIgnored(t *testing.T) {
	e := startEtcd(t)
	rb := keyPair(t, "rebuilder-1")
	a := newNode(t, e, []verify.PublicKey{rb.Public()}, "")
	att := attestation(t, rb, 7)
	forged := att
	forged.NarHash[5] ^= 1 // other bytes, the same signature
	hash := att.StorePath[len(storeDir)+1:][:narinfo.HashLen]
	cli := e.cli()
	defer cli.Close()
	if _, err := cli.Put(context.Background(), DefaultPrefix+"attestations/"+hash+"/"+att.PublicKey, jsonString(forged)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "forged record counted", func() bool { return a.rejected.Load() == 1 })
	if got, _ := a.db.Attestations(hash); len(got) != 0 {
		t.Fatalf("forged attestation mirrored: %+v", got)
	}
	// A node that starts later reads it in its first full sync, and also
	// refuses it.
	b := newNode(t, e, []verify.PublicKey{rb.Public()}, "")
	eventually(t, "forged record counted by a new node", func() bool { return b.rejected.Load() == 1 })
	if got, _ := b.db.Attestations(hash); len(got) != 0 {
		t.Fatalf("forged attestation mirrored: %+v", got)
	}
}

// Without etcd a node keeps its mirror and says so, admin changes fail and
// change nothing, and a quarantine holds here and reaches etcd later; back
// with etcd the node catches up from its revision, or reads everything
// when etcd compacted past it.
func TestEtcdUnreachable(t *testing.T) {
	e := startEtcd(t)
	rb := keyPair(t, "rebuilder-1")
	keys := []verify.PublicKey{rb.Public()}
	a := newNode(t, e, keys, "")
	eventually(t, "connected", func() bool { return a.Status().Connected })
	att := attestation(t, rb, 3)
	if _, err := a.PutAttestations([]policy.Attestation{att}, nil); err != nil {
		t.Fatal(err)
	}
	e.kill()
	eventually(t, "disconnected", func() bool { return !a.Status().Connected })
	_, err := a.PutAllow([]policy.AllowEntry{{StorePath: att.StorePath}}, &cache.AuditRecord{Time: time.Now(), Who: "alice", Action: cache.ActionAllowAdd})
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("allow without etcd: %v", err)
	}
	if l, _ := a.db.AllowList(); len(l) != 0 {
		t.Fatal("a failed change changed the mirror")
	}
	hash := att.StorePath[len(storeDir)+1:][:narinfo.HashLen]
	if got, _ := a.db.Attestations(hash); len(got) != 1 {
		t.Fatal("the mirror lost its state while etcd was down")
	}
	q := policy.Quarantine{StorePath: att.StorePath, Check: "nar_hash", Time: time.Now().UTC()}
	if err := a.PutQuarantine(hash, q); err != nil {
		t.Fatal(err)
	}
	if got, _ := a.db.Quarantine(hash); got == nil || a.Status().Pending != 1 {
		t.Fatal("quarantine did not hold locally", a.Status())
	}

	// A node that never read the cluster's state has nothing to decide
	// from, and says so, until it has read it once.
	fresh := newNode(t, e, keys, "")
	if fresh.Ready() {
		t.Fatal("a node that never reached etcd says its mirror is ready")
	}
	if !a.Ready() {
		t.Fatal("a node that mirrored the cluster before etcd went away is not ready")
	}

	e.start()
	eventually(t, "the fresh node ready once etcd answers", fresh.Ready)
	eventually(t, "reconnected with the quarantine written", func() bool {
		st := a.Status()
		return st.Connected && st.Pending == 0
	})
	if n := a.Status().Resyncs; n != 1 {
		t.Errorf("%d full resyncs after etcd came back, want 1 (the first start): it should catch up from its revision", n)
	}
	cli := e.cli()
	defer cli.Close()
	resp, err := cli.Get(context.Background(), DefaultPrefix+"quarantine/"+hash)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatal("quarantine not in etcd", err)
	}

	// A stopped node catches up from its revision when it starts again;
	// when etcd compacted past it, it reads everything.
	dir := t.TempDir()
	b := newNode(t, e, keys, dir)
	eventually(t, "B mirrored", func() bool { got, _ := b.db.Quarantine(hash); return got != nil })
	b.close()
	att3 := attestation(t, rb, 5)
	if _, err := a.PutAttestations([]policy.Attestation{att3}, nil); err != nil {
		t.Fatal(err)
	}
	b = newNode(t, e, keys, dir)
	hash3 := att3.StorePath[len(storeDir)+1:][:narinfo.HashLen]
	eventually(t, "B caught up", func() bool { got, _ := b.db.Attestations(hash3); return len(got) == 1 })
	if n := b.Status().Resyncs; n != 0 {
		t.Errorf("a restarted node read the whole state %d times instead of catching up from its revision", n)
	}
	b.close()
	att2 := attestation(t, rb, 4)
	if _, err := a.PutAttestations([]policy.Attestation{att2}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Retry([]string{hash}, nil); err != nil {
		t.Fatal(err)
	}
	cur, err := cli.Get(context.Background(), "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(context.Background(), cur.Header.Revision); err != nil {
		t.Fatal(err)
	}
	b = newNode(t, e, keys, dir)
	hash2 := att2.StorePath[len(storeDir)+1:][:narinfo.HashLen]
	eventually(t, "B resynchronised after compaction", func() bool {
		got, _ := b.db.Attestations(hash2)
		q, _ := b.db.Quarantine(hash)
		return len(got) == 1 && q == nil
	})
	if n := b.Status().Resyncs; n != 1 {
		t.Errorf("%d full resyncs after a compaction past the node's revision, want 1", n)
	}
}

// A node that joins a cluster for the first time adds what it held.
func TestJoinKeepsLocalEvidence(t *testing.T) {
	e := startEtcd(t)
	rb := keyPair(t, "rebuilder-1")
	keys := []verify.PublicKey{rb.Public()}
	dir := t.TempDir()
	db, err := cache.OpenDB(filepath.Join(dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	att := attestation(t, rb, 9)
	if _, err := db.PutAttestations([]policy.Attestation{att}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := db.PutDeny([]policy.DenyEntry{{Pattern: "*-evil*"}}, func(string, narinfo.SHA256) bool { return false }, nil); err != nil {
		t.Fatal(err)
	}
	db.Close()
	a := newNode(t, e, keys, dir)
	b := newNode(t, e, keys, "")
	hash := att.StorePath[len(storeDir)+1:][:narinfo.HashLen]
	eventually(t, "the joining node's evidence on another node", func() bool {
		got, _ := b.db.Attestations(hash)
		deny, _ := b.db.DenyList()
		return len(got) == 1 && len(deny) == 1
	})
	if got, _ := a.db.Attestations(hash); len(got) != 1 {
		t.Fatal("the joining node lost its attestation")
	}
}

// A change larger than one etcd transaction is split, each part with its
// audit record.
func TestLargeChangeSplit(t *testing.T) {
	e := startEtcd(t)
	rb := keyPair(t, "rebuilder-1")
	a := newNode(t, e, []verify.PublicKey{rb.Public()}, "")
	var entries []policy.AllowEntry
	for i := range 250 {
		entries = append(entries, policy.AllowEntry{StorePath: strings.ReplaceAll(storePath(100+i), "0", "b"), Added: time.Now().UTC()})
	}
	audit := &cache.AuditRecord{Time: time.Now(), Who: "alice", Action: cache.ActionAllowAdd}
	if _, err := a.PutAllow(entries, audit); err != nil {
		t.Fatal(err)
	}
	if l, _ := a.db.AllowList(); len(l) != 250 {
		t.Fatalf("%d entries", len(l))
	}
	recs, _ := a.db.Audit(time.Time{})
	if len(recs) != 3 || audit.Counts[cache.CountAdded] != 250 {
		t.Fatalf("%d audit records, counts %v", len(recs), audit.Counts)
	}

	// Counts the caller set before the change (an import's bad
	// signatures) are the change's, once, not once per part.
	var as []policy.Attestation
	for i := range 150 {
		as = append(as, attestation(t, rb, 1000+i))
	}
	imp := &cache.AuditRecord{Time: time.Now(), Who: "alice", Action: cache.ActionAttest}
	imp.Count(cache.CountBadSignature, 3)
	if _, err := a.PutAttestations(as, imp); err != nil {
		t.Fatal(err)
	}
	if imp.Counts[cache.CountBadSignature] != 3 || imp.Counts[cache.CountStored] != 150 {
		t.Fatalf("counts of a two-part import: %v", imp.Counts)
	}
}

// BenchmarkPropagation measures the time from an admin change answered by
// one node to its arrival in another node's mirror (the README promises
// well under a second; this says how far under).
func BenchmarkPropagation(b *testing.B) {
	e := startEtcd(b)
	rb := keyPair(b, "rebuilder-1")
	keys := []verify.PublicKey{rb.Public()}
	a, other := newNode(b, e, keys, ""), newNode(b, e, keys, "")
	b.ResetTimer()
	for i := range b.N {
		entry := policy.AllowEntry{StorePath: strings.ReplaceAll(storePath(1000+i), "0", "c"), Added: time.Now().UTC()}
		if _, err := a.PutAllow([]policy.AllowEntry{entry}, nil); err != nil {
			b.Fatal(err)
		}
		hash := entry.StorePath[len(storeDir)+1:][:narinfo.HashLen]
		for {
			if l, _ := other.db.AllowList(); len(l) > 0 && containsHash(l, hash) {
				break
			}
			time.Sleep(100 * time.Microsecond)
		}
	}
}

func containsHash(l []policy.AllowEntry, hash string) bool {
	for _, e := range l {
		if strings.Contains(e.StorePath, hash) {
			return true
		}
	}
	return false
}
