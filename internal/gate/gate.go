// Package gate is cacheproxy's gatekeeper: every answer about a store path,
// for a narinfo request, a NAR request, an operator's explain or an
// allowlist pin, comes from here. It asks the upstreams, gathers the
// evidence, applies the policy, walks the closure, signs, stores, and keeps
// each stored decision exactly as long as the evidence behind it.
//
// Trust model: the gate trusts its configuration (upstream keys, attester
// keys, policy) and the state store (everything in it was verified or
// entered by an authenticated operator). Upstream answers are trusted only
// as far as policy.Decide approves them, and NAR bytes only as far as the
// verifier checks them against the approved narinfo. Callers (HTTP
// handlers) are not trusted to hold a decision: they ask for the answer at
// the moment of each request.
package gate

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/metrics"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/narstream"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Upstream is one configured binary cache with the keys it must sign with.
type Upstream struct {
	Client *upstream.Client
	Keys   []verify.PublicKey
}

// Name is the upstream's name in logs, metrics and stored records.
func (u Upstream) Name() string { return u.Client.Name() }

// Options are what a Gate is made of. DB, Blobs, Metrics and Log must be set.
type Options struct {
	Policy    policy.Policy // StoreDir set
	Upstreams []Upstream    // asked in this order
	Key       verify.SecretKey
	DB        *cache.DB
	Blobs     *cache.Blobs
	Metrics   *metrics.Metrics
	Log       *slog.Logger
	Now       func() time.Time // time.Now when nil
	// NegativeTTL is how long a rejection or "not found" is remembered
	// (until any change of evidence); 0 turns that off.
	NegativeTTL time.Duration
	// DiskReserve is the free space kept on the blob store's file system:
	// below it no download starts (cached NARs are still served).
	DiskReserve int64
	// ServeCompression is "" (serve each NAR as its upstream compressed
	// it) or zstd (recode every other compression; see recode.go).
	ServeCompression narinfo.Compression
	// Evidence takes the changes of evidence; DB when nil. In a cluster
	// it is etcd (internal/cluster), and DB is the mirror of it.
	Evidence EvidenceStore
}

// EvidenceStore takes the changes of evidence: admin changes with their
// audit records, and quarantines. Decisions always read the DB; a store
// other than the DB must bring its changes into the DB before it returns
// (a cluster waits for its mirror). *cache.DB is one.
type EvidenceStore interface {
	PutAttestations(as []policy.Attestation, audit *cache.AuditRecord) (stored []bool, err error)
	PutAllow(entries []policy.AllowEntry, audit *cache.AuditRecord) (replaced []policy.AllowEntry, err error)
	RemoveAllow(hashes []string, audit *cache.AuditRecord) (missing []string, err error)
	PutDeny(entries []policy.DenyEntry, match func(base string, narHash narinfo.SHA256) bool, audit *cache.AuditRecord) (dropped int, err error)
	RemoveDeny(patterns []string, match func(base string, narHash narinfo.SHA256) bool, audit *cache.AuditRecord) (missing []string, err error)
	PutQuarantine(hash string, q policy.Quarantine) error
	Retry(hashes []string, audit *cache.AuditRecord) (notQuarantined []string, err error)
	AppendAudit(rec cache.AuditRecord) error
}

// batchLimiter is an EvidenceStore that takes attestations in smaller
// batches than AttestBatch (etcd bounds the size of a transaction).
type batchLimiter interface{ MaxBatch() int }

// Settings are the parts of a Gate that Reconfigure may change while it
// serves (a configuration reload).
type Settings struct {
	Policy      policy.Policy // StoreDir must stay what it was
	Upstreams   []Upstream
	NegativeTTL time.Duration
	DiskReserve int64
}

// conf is one consistent set of settings. A decision round reads it once
// and decides, signs and stores under that one set: a reload in between
// must not produce a record that claims settings it was not decided under.
type conf struct {
	policy    policy.Policy
	upstreams []Upstream
	settings  string // digest of everything a stored decision depends on besides the evidence
	reserve   int64
}

// Gate decides. It is safe for concurrent use.
type Gate struct {
	cur   atomic.Pointer[conf]
	key   verify.SecretKey
	db    *cache.DB
	ev    EvidenceStore
	batch int // attestations per import batch
	blobs *cache.Blobs
	m     *metrics.Metrics
	log   *slog.Logger
	now   func() time.Time
	// recode serves every NAR as zstd (serve_compression); fixed at New,
	// since a reload cannot recode what is already stored.
	recode bool
	// reconfigs counts Reconfigure calls, so that a negative answer
	// decided under the settings before one is not remembered after it.
	reconfigs atomic.Uint64

	flight   singleflight.Group // one decision per hash at a time
	hot      *hotRecords
	unstored pendingSet     // decisions in memory not yet committed (storeRecord)
	writes   sync.WaitGroup // storeRecord's background commits
	neg      *negCache
	nars     *narstream.Group
	encoders encoders // the zero value is ready

	mu        sync.Mutex
	shortRuns map[string]int // NAR file -> transfers in a row that ended short with no declared length

	overviewCache overviewCache // for Overview
}

// New returns a Gate over an open state store. Decisions stored under other
// settings (another policy, other upstream keys, another gatekeeper key)
// are not served: each is decided again when next requested.
func New(o Options) (*Gate, error) {
	g := &Gate{key: o.Key, db: o.DB, blobs: o.Blobs,
		m: o.Metrics, log: o.Log, now: o.Now, hot: newHotRecords(), neg: newNegCache(o.NegativeTTL), nars: narstream.NewGroup(),
		shortRuns: map[string]int{}, recode: o.ServeCompression == narinfo.CompressionZstd,
		ev: o.Evidence, batch: AttestBatch}
	if g.ev == nil {
		g.ev = o.DB
	}
	if b, ok := g.ev.(batchLimiter); ok {
		g.batch = min(g.batch, b.MaxBatch())
	}
	if g.now == nil {
		g.now = time.Now
	}
	g.nars.LimitDecoding(decodeBudget(), decodeMemory)
	s := Settings{Policy: o.Policy, Upstreams: o.Upstreams, NegativeTTL: o.NegativeTTL, DiskReserve: o.DiskReserve}
	c := g.newConf(s)
	g.cur.Store(c)
	g.db.OnForget(g.evidenceChanged)
	changed, err := g.db.SyncSettings(c.settings)
	if err != nil {
		return nil, err
	}
	if changed {
		g.log.Info("decision settings changed since the last start: stored decisions are decided again as they are requested")
	}
	// The blob store's bounds are fixed at start; a reload does not change them.
	g.m.CacheMaxSize.Set(float64(g.blobs.MaxSize()))
	g.m.SetDiskFree(g.blobs.Free)
	g.settingsMetrics(s)
	g.refreshGauges()
	g.m.SetRebuildQueue(g.rebuildQueueLen)
	return g, nil
}

func (g *Gate) newConf(s Settings) *conf {
	return &conf{policy: s.Policy, upstreams: s.Upstreams, reserve: s.DiskReserve,
		settings: settingsDigest(s.Policy, s.Upstreams, g.key, g.serveCompression())}
}

// conf is the current settings; read it once per operation.
func (g *Gate) conf() *conf { return g.cur.Load() }

// changes moves whenever the evidence or the settings change: what was
// read or decided before it moved may be out of date.
func (g *Gate) changes() uint64 { return g.db.Changes() + g.reconfigs.Load() }

// Reconfigure switches to new settings while serving. Stored decisions made
// under other decision settings are not served from now on: each is decided
// again when next requested, from its stored narinfo when its upstream is
// still configured (see decide), so a reload costs no upstream round trip
// for what was decided before. Settings that do not enter decisions
// (negative TTL, disk reserve, upstream timeouts) drop nothing. It reports
// whether the decision settings changed.
func (g *Gate) Reconfigure(s Settings) (bool, error) {
	old := g.conf()
	if s.Policy.StoreDir != old.policy.StoreDir {
		return false, fmt.Errorf("store_dir %s cannot change from %s while serving", s.Policy.StoreDir, old.policy.StoreDir)
	}
	c := g.newConf(s)
	if _, err := g.db.SyncSettings(c.settings); err != nil {
		return false, fmt.Errorf("record decision settings: %w", err)
	}
	g.cur.Store(c)
	g.reconfigs.Add(1)
	g.neg.reset(s.NegativeTTL)
	g.settingsMetrics(s)
	changed := c.settings != old.settings
	if changed {
		g.log.Info("decision settings changed: stored decisions are decided again as they are requested")
	}
	return changed, nil
}

// evidenceChanged is told of every committed change of evidence and the
// stored decisions it dropped.
func (g *Gate) evidenceChanged(dropped []string) {
	g.hot.drop(dropped)
	g.hot.drop(g.unstored.list())
	g.neg.clear()
}

// serveCompression is the serve_compression setting, for the settings digest.
func (g *Gate) serveCompression() string {
	if g.recode {
		return string(narinfo.CompressionZstd)
	}
	return ""
}

// Close stops the downloads in progress.
func (g *Gate) Close() {
	g.nars.Close()
	g.Flush()
}

// Flush waits until every decision answered so far is committed to the
// state file (storeRecord), and every download under way has ended with
// its blob stored: at shutdown, and in tests that read the state.
func (g *Gate) Flush() {
	g.nars.Wait()
	g.writes.Wait()
}

// pendingSet counts, per hash, decisions kept in memory whose commit has
// not ended.
type pendingSet struct {
	mu sync.Mutex
	m  map[string]int
}

func (p *pendingSet) add(hash string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m == nil {
		p.m = map[string]int{}
	}
	p.m[hash]++
}

func (p *pendingSet) done(hash string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.m[hash]--; p.m[hash] <= 0 {
		delete(p.m, hash)
	}
}

func (p *pendingSet) list() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.m))
	for h := range p.m {
		out = append(out, h)
	}
	return out
}

// PublicKey is the gatekeeper key fleet machines trust.
func (g *Gate) PublicKey() verify.PublicKey { return g.key.Public() }

// settingsDigest names everything a stored decision depends on besides the
// evidence in the DB: if any of it changes between starts (a revoked
// upstream key, a higher quorum, report mode turned off, a new gatekeeper
// key), stored decisions must not be served as they are.
func settingsDigest(p policy.Policy, upstreams []Upstream, key verify.SecretKey, serveCompression string) string {
	type up struct {
		URL  string
		Keys []string
	}
	v := struct {
		Report, ContentAddressed, RequireClosure bool
		StoreDir, Gatekeeper                     string
		Quorum                                   int
		MaxNarSize                               uint64
		Attesters                                []string
		Upstreams                                []up
		// Only when set, so that decisions stored before the key existed
		// stay current.
		ServeCompression string `json:",omitempty"`
	}{p.Report, p.ContentAddressed, p.RequireClosure, p.StoreDir, key.Public().String(), p.Quorum, p.MaxNarSize, nil, nil,
		serveCompression}
	for _, a := range p.Attesters {
		v.Attesters = append(v.Attesters, a.String())
	}
	sort.Strings(v.Attesters)
	for _, u := range upstreams {
		e := up{URL: u.Name()}
		for _, k := range u.Keys {
			e.Keys = append(e.Keys, k.String())
		}
		sort.Strings(e.Keys)
		v.Upstreams = append(v.Upstreams, e)
	}
	raw, _ := json.Marshal(v)
	sum := sha256.Sum256(raw)
	return hex.EncodeToString(sum[:])
}

func (g *Gate) upstreamNamed(name string) (Upstream, bool) {
	for _, u := range g.conf().upstreams {
		if u.Name() == name {
			return u, true
		}
	}
	return Upstream{}, false
}

// ErrDiskFull: free space is below the reserve, so no download starts.
var ErrDiskFull = errors.New("disk space below the reserve")

// DiskRoom says whether there is room for a new download.
func (g *Gate) DiskRoom() error {
	free, err := g.blobs.Free()
	if err != nil {
		return err
	}
	if reserve := g.conf().reserve; free < reserve {
		return fmt.Errorf("%w: %d bytes free, reserve %d", ErrDiskFull, free, reserve)
	}
	return nil
}

// CheckUpstreams asks each upstream for /nix-cache-info, so that an
// unreachable or misconfigured upstream is reported at start rather than
// at the first client's request. It returns the failures by upstream name.
func (g *Gate) CheckUpstreams(ctx context.Context) map[string]error {
	failed := map[string]error{}
	for _, u := range g.conf().upstreams {
		if _, err := u.Client.Get(ctx, "nix-cache-info", 64<<10); err != nil {
			failed[u.Name()] = err
		}
	}
	return failed
}

// UpstreamsDown says why no upstream can answer, or "" when one can.
func (g *Gate) UpstreamsDown() string {
	var names []string
	for _, u := range g.conf().upstreams {
		if u.Client.Up() {
			return ""
		}
		names = append(names, u.Name())
	}
	return "every upstream is down: " + strings.Join(names, ", ")
}

func (g *Gate) refreshGauges() {
	if n, err := g.db.CountAttestations(); err == nil {
		g.m.Attestations.Set(float64(n))
	}
	if l, err := g.db.AllowList(); err == nil {
		g.m.AllowEntries.Set(float64(len(l)))
	}
	g.m.CacheSize.Set(float64(g.blobs.Size()))
}

// maxHotBytes bounds the memory held by in-memory copies of stored
// records. A record is about 1 KiB, but one with thousands of references
// can be hundreds, so the bound is in bytes, not entries.
const maxHotBytes = 64 << 20

// hotRecords keeps recently served records in memory: a narinfo hit is the
// hottest request a fleet makes, and reading and decoding the record from
// bbolt each time costs most of it. The store tells it which decisions each
// change dropped (cache.DB.OnForget); a copy read while a change was being
// committed is not kept (see put).
type hotRecords struct {
	mu    sync.RWMutex
	m     map[string]*cache.Record
	bytes int // sum of recordSize over m
}

func newHotRecords() *hotRecords { return &hotRecords{m: map[string]*cache.Record{}} }

// recordSize approximates the memory a record holds.
func recordSize(r *cache.Record) int {
	n := 256 + len(r.NarInfo) + len(r.StorePath) + len(r.NarURL) + len(r.NarFile) + len(r.UpstreamFile) + len(r.Upstream) + len(r.Settings)
	for _, ref := range r.References {
		n += 16 + len(ref)
	}
	return n
}

func (h *hotRecords) get(hash string) *cache.Record {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.m[hash]
}

// put keeps rec, read from the store when current() returned before; if
// current() has moved on since, a change may have dropped rec after it was
// read, and it is not kept. The check runs under the lock that drop takes,
// so a drop either sees the copy or the copy sees the drop.
func (h *hotRecords) put(hash string, rec *cache.Record, before uint64, current func() uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if current() != before {
		return
	}
	size := recordSize(rec)
	if size > maxHotBytes/16 {
		return // a giant record is read from the store each time
	}
	h.remove(hash)
	for k := range h.m { // over the bound: drop arbitrary entries (map order is random)
		if h.bytes+size <= maxHotBytes {
			break
		}
		h.remove(k)
	}
	h.m[hash] = rec
	h.bytes += size
}

func (h *hotRecords) remove(hash string) {
	if old, ok := h.m[hash]; ok {
		h.bytes -= recordSize(old)
		delete(h.m, hash)
	}
}

func (h *hotRecords) drop(hashes []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, k := range hashes {
		h.remove(k)
	}
}

// Decoding is CPU-bound, and each decoder holds its stream's window: Nix
// writes xz with the preset's 8 MiB dictionary and zstd with a 2 MiB
// window (more with --long). More decodes at once than cores add no
// throughput, only windows (the peak memory of a cold rollout was four of
// them on two cores), so the decoders running at once share one slot per
// core. An xz decoder fills at most NarSize of its dictionary and takes
// min(NarSize, decodeSlot) of the budget, so that small NARs barely count
// and big ones run one per core; a small zstd NAR is decoded whole,
// without a window, and counts the same; a bigger one is streamed through
// a decoder whose window is allocated in full from its first block, and
// takes a whole slot. An uncompressed NAR has no decoder.
const decodeSlot = 8 << 20

func decodeBudget() int64 { return int64(runtime.GOMAXPROCS(0)) * decodeSlot }

func decodeMemory(e verify.Expect) int64 {
	switch {
	case e.Compression == narinfo.CompressionNone:
		return 0
	case e.Compression == narinfo.CompressionZstd && !verify.DecodedWhole(e):
		return decodeSlot
	}
	return min(int64(e.NarSize), decodeSlot)
}
