// Package cluster shares one node's trust state with the others through
// etcd: attestations, the allowlist and denylist, nar_mismatch quarantines
// and the audit records of admin changes.
//
// Trust model. etcd is where the evidence is kept and how it travels, not
// an authority: every node mirrors it into its own state file through a
// watch and decides from that mirror, as a single node decides from its
// own file, and re-verifies every attestation's signature against its own
// attester keys before the mirror holds it. A record in etcd that does not
// verify is treated as absent, counted and logged. What a node serves it
// fetched and verified itself: nodes never exchange blobs or decisions.
// The allowlist, denylist and quarantines carry no signature (as on a
// single node, they are as trustworthy as the admin token that wrote
// them): write access to etcd's prefix is admin access.
//
// Availability. Decisions read only the mirror, so a node keeps serving on
// the last state it mirrored while etcd is unreachable; admin changes then
// fail and change nothing. A quarantine found while etcd is unreachable
// holds on this node at once and reaches the others when etcd is back.
package cluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// Defaults.
const (
	DefaultPrefix = "/cacheproxy/"
	// WriteTimeout bounds an admin change's wait for etcd.
	WriteTimeout = 5 * time.Second
	// probeEvery is how often a node checks that it can reach a quorum.
	probeEvery = time.Second
	// maxOps is how many keys one etcd transaction writes: etcd refuses
	// transactions of more than 128 operations (--max-txn-ops), and each
	// change also writes its audit record.
	maxOps = 100
	// pageSize is how many keys a full resynchronisation reads at a time.
	pageSize = 1000
)

// Options configure a Node.
type Options struct {
	Endpoints []string
	Prefix    string      // key prefix; DefaultPrefix when empty
	TLS       *tls.Config // client TLS, nil for plain HTTP
	DB        *cache.DB   // the mirror
	// Verify checks an attestation's signature against the attester keys
	// configured now; a record that fails is treated as absent.
	Verify func(policy.Attestation) error
	// DenyMatch turns deny entries into a test of stored decisions.
	DenyMatch cache.DenyMatcher
	Log       *slog.Logger
	// Rejected counts records refused by kind; Connected is set to 1 while
	// a quorum is reachable and 0 otherwise. Either may be nil.
	Rejected  func(kind string)
	Connected func(bool)
	// WriteTimeout bounds each write to etcd; WriteTimeout when zero.
	WriteTimeout time.Duration
}

// Node is one cacheproxy node's link to the cluster: the mirror of the
// shared evidence and the place admin changes are written to.
type Node struct {
	o      Options
	cli    *clientv3.Client
	prefix string

	connected atomic.Bool
	applied   atomic.Int64 // last etcd revision the mirror holds
	synced    atomic.Bool  // the mirror held this cluster's state once (Ready)
	resyncs   atomic.Int64 // full resynchronisations (Status.Resyncs)
	mu        sync.Mutex
	appliedC  chan struct{}                // closed and replaced at each revision applied
	lastErr   string                       // why the quorum was last unreachable
	since     time.Time                    // when connected last changed
	pending   map[string]policy.Quarantine // quarantines found here and not yet in etcd
	resync    chan struct{}                // asks the mirror for a full resynchronisation
}

// Open creates a Node. It does not wait for etcd: a node whose etcd is
// unreachable at start serves on the state it mirrored before.
func Open(o Options) (*Node, error) {
	if len(o.Endpoints) == 0 {
		return nil, errors.New("cluster: no etcd endpoints")
	}
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if !strings.HasSuffix(o.Prefix, "/") {
		o.Prefix += "/"
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = WriteTimeout
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            o.Endpoints,
		TLS:                  o.TLS,
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		// etcd's client logs every retry at length; this package reports
		// what matters in the node's own log.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: etcd client: %w", err)
	}
	n := &Node{o: o, cli: cli, prefix: o.Prefix, appliedC: make(chan struct{}), pending: map[string]policy.Quarantine{},
		resync: make(chan struct{}, 1), since: time.Now()}
	id, rev, err := o.DB.MirrorState()
	if err != nil {
		cli.Close()
		return nil, fmt.Errorf("cluster: read mirror state: %w", err)
	}
	n.applied.Store(rev)
	// A mirror of another prefix is not this cluster's state. (Another
	// etcd cluster under the same prefix shows only once etcd answers:
	// then the mirror is read again, in one transaction.)
	n.synced.Store(id != "" && strings.HasSuffix(id, " "+o.Prefix))
	n.report(false, "not connected yet")
	return n, nil
}

// Close ends the link to etcd.
func (n *Node) Close() error { return n.cli.Close() }

// Status is what /healthz and the status page say of the cluster.
type Status struct {
	Connected bool
	Revision  int64 // the last revision mirrored
	Since     time.Time
	Error     string // why a quorum is unreachable, when it is
	Endpoints []string
	Pending   int // quarantines found here not yet written to etcd
	// Resyncs counts full reads of the state since start (the first
	// start, a compaction past the mirror, new attester keys); catching
	// up from the mirror's revision is not one.
	Resyncs int64
}

// Status returns the node's view of the cluster now.
func (n *Node) Status() Status {
	n.mu.Lock()
	defer n.mu.Unlock()
	return Status{Connected: n.connected.Load(), Revision: n.applied.Load(), Since: n.since, Error: n.lastErr,
		Endpoints: n.o.Endpoints, Pending: len(n.pending), Resyncs: n.resyncs.Load()}
}

// Ready reports whether the mirror holds the cluster's trust state: it
// did once, in this start or an earlier one. A node that never mirrored
// its cluster has nothing to decide from yet: every path would look
// unattested, and a fleet machine caches such a 404 for an hour.
func (n *Node) Ready() bool { return n.synced.Load() }

// Resync asks the mirror to read the whole state again (after the
// attester keys changed: records it refused may verify now).
func (n *Node) Resync() {
	select {
	case n.resync <- struct{}{}:
	default:
	}
}

func (n *Node) report(ok bool, why string) {
	n.mu.Lock()
	changed := n.connected.Load() != ok
	n.connected.Store(ok)
	if changed {
		n.since = time.Now()
	}
	if !ok {
		n.lastErr = why
	}
	n.mu.Unlock()
	if n.o.Connected != nil {
		n.o.Connected(ok)
	}
	if changed && ok {
		n.o.Log.Info("cluster: etcd reachable", "revision", n.applied.Load())
	} else if changed {
		n.o.Log.Warn("cluster: etcd unreachable: serving on the last mirrored state, admin changes fail",
			"revision", n.applied.Load(), "error", why)
	}
}

// Run mirrors the cluster until ctx ends: it catches up from the last
// revision applied (or reads everything when etcd compacted past it),
// then follows a watch, and starts over whenever the watch breaks.
func (n *Node) Run(ctx context.Context) {
	go n.probe(ctx)
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := n.follow(ctx)
		if ctx.Err() != nil {
			return
		}
		n.o.Log.Warn("cluster: mirror interrupted, starting over", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// probe checks once a second that a quorum answers (a linearizable read
// needs one), for /healthz and cacheproxy_cluster_connected, and writes
// the quarantines found while it did not.
func (n *Node) probe(ctx context.Context) {
	t := time.NewTicker(probeEvery)
	defer t.Stop()
	for {
		c, cancel := context.WithTimeout(ctx, probeEvery)
		_, err := n.cli.Get(c, n.prefix+"probe", clientv3.WithCountOnly())
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			n.report(false, err.Error())
		} else {
			n.report(true, "")
			n.flushPending(ctx)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// errResync says the mirror must read everything again.
var errResync = errors.New("full resynchronisation needed")

// follow brings the mirror up to date and follows the watch until it
// breaks.
func (n *Node) follow(ctx context.Context) error {
	resp, err := n.cli.Get(ctx, n.prefix+"probe", clientv3.WithCountOnly())
	if err != nil {
		return fmt.Errorf("read cluster revision: %w", err)
	}
	id := fmt.Sprintf("%x %s", resp.Header.ClusterId, n.prefix)
	stored, rev, err := n.o.DB.MirrorState()
	if err != nil {
		return err
	}
	if stored != id || rev == 0 {
		if rev, err = n.fullSync(ctx, id, stored == ""); err != nil {
			return err
		}
	}
	for {
		err := n.watch(ctx, rev)
		if !errors.Is(err, errResync) {
			return err
		}
		if rev, err = n.fullSync(ctx, id, false); err != nil {
			return err
		}
	}
}

// watch applies every change after rev, one revision per transaction.
func (n *Node) watch(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := n.cli.Watch(wctx, n.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithProgressNotify())
	for {
		var wr clientv3.WatchResponse
		var ok bool
		select {
		case <-n.resync:
			return errResync
		case wr, ok = <-wch:
		}
		if !ok {
			return fmt.Errorf("watch closed: %w", ctx.Err())
		}
		if wr.CompactRevision != 0 {
			n.o.Log.Info("cluster: etcd compacted past the mirror's revision: reading the whole state",
				"revision", rev, "compacted", wr.CompactRevision)
			return errResync
		}
		if err := wr.Err(); err != nil {
			return fmt.Errorf("watch: %w", err)
		}
		// Events come in revision order; one transaction's share a revision.
		for i := 0; i < len(wr.Events); {
			r := wr.Events[i].Kv.ModRevision
			var changes []cache.MirrorEntry
			for ; i < len(wr.Events) && wr.Events[i].Kv.ModRevision == r; i++ {
				ev := wr.Events[i]
				var value []byte
				if ev.Type == clientv3.EventTypePut {
					value = ev.Kv.Value
				}
				if e, ok := n.entry(string(ev.Kv.Key), value); ok {
					changes = append(changes, e)
				}
			}
			if _, err := n.o.DB.ApplyMirror(r, changes, n.o.DenyMatch); err != nil {
				return fmt.Errorf("apply revision %d: %w", r, err)
			}
			n.applyDone(r)
			rev = r
		}
		if len(wr.Events) == 0 && wr.Header.Revision > rev {
			// A progress notification: nothing of ours changed up to here.
			n.applyDone(wr.Header.Revision)
		}
	}
}

// entry turns an etcd key and value into a mirror entry, or refuses it:
// an unknown key, or an attestation whose signature does not verify, is
// treated as absent (a deletion), counted and logged.
func (n *Node) entry(key string, value []byte) (cache.MirrorEntry, bool) {
	rest := strings.TrimPrefix(key, n.prefix)
	kind, k, _ := strings.Cut(rest, "/")
	switch kind {
	case cache.KindAttestation, cache.KindAllow, cache.KindDeny, cache.KindQuarantine, cache.KindAudit:
	case "probe":
		return cache.MirrorEntry{}, false
	default:
		n.reject(kind, key, "unknown kind of record")
		return cache.MirrorEntry{}, false
	}
	e := cache.MirrorEntry{Kind: kind, Key: k, Value: value}
	if kind == cache.KindAttestation && value != nil {
		a, err := n.checkAttestation(k, value)
		if err != nil {
			n.reject(kind, key, err.Error())
			e.Value = nil
		}
		e.Attestation = a
	}
	if kind == cache.KindAudit && value != nil && !json.Valid(value) {
		n.reject(kind, key, "not JSON")
		return cache.MirrorEntry{}, false
	}
	return e, true
}

// checkAttestation decodes and verifies a mirrored attestation; it
// returns it decoded when it holds, nil otherwise.
func (n *Node) checkAttestation(key string, value []byte) (*policy.Attestation, error) {
	var a policy.Attestation
	if err := json.Unmarshal(value, &a); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	if want := narinfo.PathHash(a.StorePath) + "/" + a.PublicKey; key != want {
		return nil, fmt.Errorf("stored under %s, but is an attestation of %s by %s", key, a.StorePath, a.KeyName)
	}
	if err := n.o.Verify(a); err != nil {
		return nil, err
	}
	return &a, nil
}

func (n *Node) reject(kind, key, why string) {
	if n.o.Rejected != nil {
		n.o.Rejected(kind)
	}
	n.o.Log.Warn("cluster: record refused, treated as absent", "key", key, "kind", kind, "reason", why)
}

// applyDone records that the mirror holds revision rev and wakes those
// waiting for it.
func (n *Node) applyDone(rev int64) {
	n.mu.Lock()
	if rev > n.applied.Load() {
		n.applied.Store(rev)
		close(n.appliedC)
		n.appliedC = make(chan struct{})
	}
	n.mu.Unlock()
}

// waitApplied waits until the mirror holds revision rev, so that an admin
// change answered by this node shows in its next decision.
func (n *Node) waitApplied(ctx context.Context, rev int64) error {
	for {
		n.mu.Lock()
		done, c := n.applied.Load() >= rev, n.appliedC
		n.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: the change is stored in etcd (revision %d) but this node's mirror has not applied it yet: %w", rev, ctx.Err())
		case <-c:
		}
	}
}

// fullSync reads the whole shared state at one revision and makes the
// mirror hold exactly that (and the quarantines not yet written to etcd),
// a page at a time through the state file's staging area, so memory stays
// bounded however large the state. A node that never mirrored this
// cluster first adds the evidence it holds that etcd lacks, so that
// joining a cluster loses nothing.
func (n *Node) fullSync(ctx context.Context, id string, join bool) (int64, error) {
	rev, records, err := n.stage(ctx)
	if err != nil {
		return 0, err
	}
	if join {
		local, err := n.o.DB.Unstaged()
		if err != nil {
			return 0, err
		}
		added, err := n.seed(ctx, local)
		if err != nil {
			return 0, fmt.Errorf("add this node's evidence to the cluster: %w", err)
		}
		if added > 0 {
			n.o.Log.Info("cluster: joined: added the evidence this node held and etcd lacked", "entries", added)
			if rev, records, err = n.stage(ctx); err != nil {
				return 0, err
			}
		}
	}
	n.mu.Lock()
	pending := make(map[string]bool, len(n.pending))
	for h := range n.pending {
		pending[h] = true
	}
	n.mu.Unlock()
	keep := func(kind, key string) bool { return kind == cache.KindQuarantine && pending[key] }
	// Counted before the switch: whoever sees the state this read also
	// sees the count (TestEtcdUnreachable read it between the two once).
	n.resyncs.Add(1)
	dropped, err := n.o.DB.FinishMirror(id, rev, keep, n.o.DenyMatch)
	if err != nil {
		return 0, fmt.Errorf("store the cluster state: %w", err)
	}
	n.synced.Store(true)
	n.o.Log.Info("cluster: mirror resynchronised", "revision", rev, "records", records, "decisions_dropped", dropped)
	n.applyDone(rev)
	return rev, nil
}

// stage reads every key under the prefix at one revision, a page at a
// time, into the state file's staging area, refusing what entry refuses.
func (n *Node) stage(ctx context.Context) (rev int64, records int, err error) {
	if err := n.o.DB.StartMirror(); err != nil {
		return 0, 0, err
	}
	start, end := n.prefix, clientv3.GetPrefixRangeEnd(n.prefix)
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(pageSize)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := n.cli.Get(ctx, start, opts...)
		if err != nil {
			return 0, 0, fmt.Errorf("read the cluster state: %w", err)
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		var page []cache.MirrorEntry
		for _, x := range resp.Kvs {
			if e, ok := n.entry(string(x.Key), x.Value); ok && e.Value != nil {
				page = append(page, e)
			}
		}
		if err := n.o.DB.StageMirror(page); err != nil {
			return 0, 0, err
		}
		records += len(page)
		if !resp.More || len(resp.Kvs) == 0 {
			return rev, records, nil
		}
		start = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// seed writes local evidence to etcd, never overwriting a key that exists
// there.
func (n *Node) seed(ctx context.Context, local []cache.MirrorEntry) (int, error) {
	var ops []clientv3.Op
	var cmps []clientv3.Cmp
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		// Keys written by another node meanwhile are left as they are:
		// when one of them exists, the others go one at a time.
		resp, err := n.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			return err
		}
		if !resp.Succeeded {
			for i := range ops {
				if _, err := n.cli.Txn(ctx).If(cmps[i]).Then(ops[i]).Commit(); err != nil {
					return err
				}
			}
		}
		ops, cmps = ops[:0], cmps[:0]
		return nil
	}
	for _, e := range local {
		key := n.key(e.Kind, e.Key)
		ops = append(ops, clientv3.OpPut(key, string(e.Value)))
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
		if len(ops) == maxOps {
			if err := flush(); err != nil {
				return 0, err
			}
		}
	}
	return len(local), flush()
}

func (n *Node) key(kind, key string) string { return n.prefix + kind + "/" + key }
