package gate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"path"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/cacheproxy/cacheproxy/internal/attest"
	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/metrics"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const storeDir = "/nix/store"

// testUpstream is a real HTTP binary cache on loopback whose objects the
// test defines; it counts the requests it gets per path.
type testUpstream struct {
	srv *httptest.Server
	key verify.SecretKey

	mu     sync.Mutex
	counts map[string]int
	files  map[string][]byte
}

func newTestUpstream(t testing.TB) *testUpstream {
	key, err := verify.GenerateKey("upstream-1")
	if err != nil {
		t.Fatal(err)
	}
	u := &testUpstream{key: key, counts: map[string]int{}, files: map[string][]byte{}}
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.counts[r.URL.Path]++
		body, ok := u.files[r.URL.Path]
		u.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(body)
	}))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *testUpstream) requests() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, c := range u.counts {
		n += c
	}
	return n
}

// obj is a store path as the upstream serves it.
type obj struct {
	hash string
	ni   narinfo.NarInfo
	nar  []byte
	file []byte // the NAR file when compressed; nil: nar
}

func objHash(name string) string {
	d := sha256.Sum256([]byte("gate-test/" + name))
	return nixbase32.EncodeToString(d[:20])
}

// newObj makes a store path with an uncompressed NAR of random bytes.
func newObj(name string, refs ...*obj) *obj {
	o := &obj{hash: objHash(name), nar: make([]byte, 512)}
	rand.New(rand.NewSource(int64(len(name)))).Read(o.nar)
	o.nar = append(o.nar, name...)
	o.ni = narinfo.NarInfo{StorePath: storeDir + "/" + o.hash + "-" + name, Compression: narinfo.CompressionNone,
		NarHash: narinfo.SumSHA256(o.nar), NarSize: uint64(len(o.nar))}
	o.ni.URL = "nar/" + o.ni.NarHash.Nix32() + ".nar"
	for _, r := range refs {
		o.ni.References = append(o.ni.References, path.Base(r.ni.StorePath))
	}
	return o
}

func (o *obj) base() string { return path.Base(o.ni.StorePath) }

// signed is o's narinfo signed by keys.
func (o *obj) signed(keys ...verify.SecretKey) []byte {
	ni := o.ni
	fp, err := ni.Fingerprint(storeDir)
	if err != nil {
		panic(err)
	}
	for _, k := range keys {
		ni.Sigs = append(ni.Sigs, k.Sign(fp))
	}
	return ni.Marshal()
}

func (u *testUpstream) publish(os ...*obj) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, o := range os {
		u.files["/"+o.hash+".narinfo"] = o.signed(u.key)
		if o.file != nil {
			u.files["/"+o.ni.URL] = o.file
		} else {
			u.files["/"+o.ni.URL] = o.nar
		}
	}
}

type fixture struct {
	t         testing.TB
	g         *Gate
	up        *testUpstream
	rebuilder verify.SecretKey
	db        *cache.DB
	blobs     *cache.Blobs
	logs      *lockedBuffer
	dir       string // the state dir
}

// lockedBuffer collects the gate's log lines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// genKey generates a signing key named name.
func genKey(t testing.TB, name string) verify.SecretKey {
	t.Helper()
	k, err := verify.GenerateKey(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// openState opens the state DB and the blob store (1 GiB) in dir.
func openState(t testing.TB, dir string) (*cache.DB, *cache.Blobs) {
	t.Helper()
	db, err := cache.OpenDB(filepath.Join(dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	blobs, err := cache.OpenBlobs(db, dir, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	return db, blobs
}

func newFixture(t testing.TB, requireClosure bool) *fixture {
	return newFixtureTTL(t, requireClosure, 0)
}

func newFixtureTTL(t testing.TB, requireClosure bool, negativeTTL time.Duration) *fixture {
	t.Helper()
	up := newTestUpstream(t)
	rb, gk := genKey(t, "rebuilder-1"), genKey(t, "gatekeeper-1")
	dir := t.TempDir()
	db, blobs := openState(t, dir)
	c, err := upstream.New(upstream.Options{URL: up.srv.URL, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	logs := &lockedBuffer{}
	g, err := New(Options{
		Policy: policy.Policy{StoreDir: storeDir, Attesters: []verify.PublicKey{rb.Public()}, Quorum: 1,
			ContentAddressed: true, RequireClosure: requireClosure},
		Upstreams: []Upstream{{Client: c, Keys: []verify.PublicKey{up.key.Public()}}},
		Key:       gk, DB: db, Blobs: blobs, Metrics: metrics.New(), NegativeTTL: negativeTTL,
		Log: slog.New(slog.NewTextHandler(logs, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close(); blobs.Close(); db.Close() })
	return &fixture{t: t, g: g, up: up, rebuilder: rb, db: db, blobs: blobs, logs: logs, dir: dir}
}

// attest stores a rebuilder attestation for each object.
func (f *fixture) attest(os ...*obj) {
	f.t.Helper()
	for _, o := range os {
		res, err := f.g.Attest(Change{Who: "test"}, attestClaims(f.t, o.signed(f.rebuilder)))
		if err != nil || len(res) != 1 || res[0].Outcome != AttestStored {
			f.t.Fatalf("attest %s: %v %+v", o.base(), err, res)
		}
	}
}

func attestClaims(t testing.TB, narinfoText []byte) []attest.Claim {
	t.Helper()
	claims, err := attest.Parse(narinfoText, storeDir)
	if err != nil {
		t.Fatal(err)
	}
	return claims
}

func (f *fixture) narinfo(o *obj) Answer {
	f.t.Helper()
	a, err := f.g.NarInfo(context.Background(), o.hash)
	if err != nil {
		f.t.Fatal(err)
	}
	f.g.Flush() // tests read the state file after answers
	return a
}

func (f *fixture) nar(file string) Answer {
	f.t.Helper()
	a, err := f.g.NAR(context.Background(), file)
	if err != nil {
		f.t.Fatal(err)
	}
	f.g.Flush()
	return a
}

// narFileOf is the NAR file name the gate gives o.
func narFileOf(o *obj) string { return narFile(o.hash, &o.ni) }

func wantAnswer(t testing.TB, what string, a Answer, status Status, decision string) {
	t.Helper()
	if a.Status != status || a.Decision != decision {
		t.Fatalf("%s: status %d %q (%s), want %d %q", what, a.Status, a.Decision, a.Detail, status, decision)
	}
}

// A machine that holds a narinfo gets its NAR after any change that leaves
// the path approved, though the change dropped the stored decision, and
// gets a rejection with a reason once the path lost its approval.
func TestNARDecidesAgain(t *testing.T) {
	f := newFixture(t, false)
	app := newObj("app-1.0")
	other := newObj("other-2.0")
	f.up.publish(app, other)
	f.attest(app, other)
	wantAnswer(t, "narinfo", f.narinfo(app), Serve, "approved; reason=attested")

	// No stored decision at all (as after an eviction or a settings change).
	if _, err := f.db.Forget(app.hash); err != nil {
		t.Fatal(err)
	}
	a := f.nar(narFileOf(app))
	wantAnswer(t, "NAR without stored decision", a, Serve, "approved; reason=attested")
	if a.Record.NarFile != narFileOf(app) {
		t.Fatalf("record names %s", a.Record.NarFile)
	}

	// A file name the decision does not name: the client's narinfo is stale.
	stale := app.hash + "-" + narinfo.SumSHA256([]byte("older build")).Nix32() + ".nar"
	wantAnswer(t, "stale NAR file", f.nar(stale), Reject, "rejected; reason=stale_narinfo")

	// Lost approval: the NAR is refused with the reason, decided again.
	if _, err := f.g.Deny(Change{Who: "test"}, []string{"*-app-1.0"}); err != nil {
		t.Fatal(err)
	}
	wantAnswer(t, "NAR of a denied path", f.nar(narFileOf(app)), Reject, "rejected; reason=denied")
	wantAnswer(t, "other path", f.nar(narFileOf(other)), Serve, "approved; reason=attested")
}

// With require_closure, a change to a reference drops the decisions that
// rest on it, and only those.
func TestClosureInvalidation(t *testing.T) {
	f := newFixture(t, true)
	leaf := newObj("leaf-1.0")
	app := newObj("app-1.0", leaf)
	lone := newObj("lone-1.0")
	f.up.publish(leaf, app, lone)
	f.attest(leaf, app, lone)
	wantAnswer(t, "app", f.narinfo(app), Serve, "approved; reason=attested")
	wantAnswer(t, "lone", f.narinfo(lone), Serve, "approved; reason=attested")
	before := f.up.requests()

	if _, err := f.g.Deny(Change{Who: "test"}, []string{leaf.ni.StorePath}); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.db.CountRecords(); n != 1 {
		t.Fatalf("%d decisions left after denying the leaf, want 1 (lone)", n)
	}
	wantAnswer(t, "lone after deny", f.narinfo(lone), Serve, "approved; reason=attested")
	if n := f.up.requests() - before; n != 0 {
		t.Fatalf("an unaffected path was fetched again: %d upstream requests", n)
	}
	wantAnswer(t, "app NAR after its leaf was denied", f.nar(narFileOf(app)), Reject, "rejected; reason=closure_incomplete")
}

// Explain says what each kind of request gets now, storing nothing.
func TestExplainSaysWhatRequestsGet(t *testing.T) {
	f := newFixture(t, false)
	app := newObj("app-1.0")
	f.up.publish(app)
	ex, err := f.g.Explain(context.Background(), app.hash)
	if err != nil {
		t.Fatal(err)
	}
	wantAnswer(t, "explain narinfo (unattested)", ex.NarInfo, Reject, "rejected; reason=unattested")
	f.attest(app)
	if ex, err = f.g.Explain(context.Background(), app.hash); err != nil {
		t.Fatal(err)
	}
	wantAnswer(t, "explain narinfo", ex.NarInfo, Serve, "approved; reason=attested")
	wantAnswer(t, "explain NAR", ex.NAR, Serve, "approved; reason=attested")
	if ex.NarFile != narFileOf(app) || ex.NarCached || ex.Stored != nil {
		t.Fatalf("explain: file %q cached %v stored %v", ex.NarFile, ex.NarCached, ex.Stored)
	}
	if n, _ := f.db.CountRecords(); n != 0 {
		t.Fatalf("explain stored %d decisions", n)
	}
}

// storeDecisions stores n approved decisions directly (as n narinfo
// requests would have), for paths named "pkg-<i>"; the names in odd get
// "openssl-3.0.7-<i>" instead. It returns the objects.
func storeDecisions(t testing.TB, f *fixture, n int, odd map[int]bool) []*obj {
	t.Helper()
	objs := make([]*obj, n)
	epoch, err := f.db.Epoch()
	if err != nil {
		t.Fatal(err)
	}
	batch := map[string]cache.Record{}
	for i := range objs {
		name := fmt.Sprintf("pkg-%d", i)
		if odd[i] {
			name = fmt.Sprintf("openssl-3.0.7-%d", i)
		}
		o := newObj(name)
		objs[i] = o
		fp, _ := o.ni.Fingerprint(storeDir)
		ni := o.ni
		batch[o.hash] = f.g.record(f.g.conf(), policy.Decision{Approved: true, Reason: policy.Attested, NarInfo: &ni, Fingerprint: fp,
			Upstream: f.g.conf().upstreams[0].Name()}, time.Time{})
		if len(batch) == 10000 || i == n-1 {
			if ok, err := f.db.PutRecords(batch, epoch); err != nil || !ok {
				t.Fatal(ok, err)
			}
			batch = map[string]cache.Record{}
		}
	}
	return objs
}

// A glob deny over many stored decisions drops the matching ones only, and
// no unaffected path goes back to an upstream.
func TestGlobDenyIsSelective(t *testing.T) {
	checkGlobDeny(t, 5000)
}

// BenchmarkGlobDeny100k measures a glob deny that matches 10 of 100,000
// stored decisions: it must drop exactly those 10 and leave every other
// path answered from the store. Run it with -benchtime=1x: each iteration
// stores 100,000 decisions first (untimed).
func BenchmarkGlobDeny100k(b *testing.B) {
	for range b.N {
		checkGlobDeny(b, 100000)
	}
}

func checkGlobDeny(t testing.TB, n int) {
	f := newFixture(t, false)
	odd := map[int]bool{}
	for i := range 10 {
		odd[i*n/10+3] = true
	}
	if b, ok := t.(*testing.B); ok {
		b.StopTimer()
	}
	objs := storeDecisions(t, f, n, odd)
	if b, ok := t.(*testing.B); ok {
		b.StartTimer()
	}
	start := time.Now()
	dropped, err := f.db.PutDeny([]policy.DenyEntry{{Pattern: "*-openssl-3.0.7*"}}, f.g.denyMatch([]policy.DenyEntry{{Pattern: "*-openssl-3.0.7*"}}), nil)
	took := time.Since(start)
	if err != nil || dropped != 10 {
		t.Fatalf("glob deny over %d decisions dropped %d, want 10 (%v)", n, dropped, err)
	}
	if b, ok := t.(*testing.B); ok {
		b.StopTimer()
		b.ReportMetric(float64(dropped), "dropped")
		b.ReportMetric(float64(took.Microseconds())/1000, "deny-ms")
	}
	for i, o := range objs {
		if odd[i] {
			continue
		}
		a, err := f.g.NarInfo(context.Background(), o.hash)
		if err != nil || a.Status != Serve {
			t.Fatalf("%s after an unrelated deny: %+v %v", o.base(), a, err)
		}
	}
	if r := f.up.requests(); r != 0 {
		t.Fatalf("%d upstream requests for paths the deny did not match, want 0", r)
	}
	if b, ok := t.(*testing.B); ok {
		b.ReportMetric(float64(f.up.requests()), "upstream-requests")
		b.StartTimer()
	}
}

// After a restart with other decision settings, a stored decision is
// decided again once, when first requested, from its stored upstream
// narinfo (no upstream request), and then served from the store.
func TestSettingsChangeRedecidesOnce(t *testing.T) {
	f := newFixture(t, false)
	app := newObj("app-1.0")
	f.up.publish(app)
	f.attest(app)
	wantAnswer(t, "before", f.narinfo(app), Serve, "approved; reason=attested")

	other, err := verify.GenerateKey("rebuilder-2")
	if err != nil {
		t.Fatal(err)
	}
	o := Options{Policy: f.g.conf().policy, Upstreams: f.g.conf().upstreams, Key: f.g.key, DB: f.db, Blobs: f.blobs,
		Metrics: metrics.New(), Log: f.g.log}
	o.Policy.Attesters = append(o.Policy.Attesters, other.Public())
	g2, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	f.g = g2
	before := f.up.requests()
	a := f.nar(narFileOf(app))
	wantAnswer(t, "NAR after the settings change", a, Serve, "approved; reason=attested")
	if a.Record.Settings != g2.conf().settings {
		t.Fatal("the decision was not made again under the new settings")
	}
	for range 3 {
		wantAnswer(t, "narinfo", f.narinfo(app), Serve, "approved; reason=attested")
	}
	if n := f.up.requests() - before; n != 0 {
		t.Fatalf("%d upstream requests after the settings change, want none (decided from the stored narinfo)", n)
	}
}

// Reconfigure switches the settings while serving: remembered rejections
// are forgotten, stored decisions are decided again from their stored
// narinfo under the new policy and upstream keys, and settings that enter
// no decision drop nothing.
func TestReconfigure(t *testing.T) {
	f := newFixtureTTL(t, false, time.Hour)
	app, other := newObj("app-1.0"), newObj("other-2.0")
	f.up.publish(app, other)
	f.attest(app)
	wantAnswer(t, "attested", f.narinfo(app), Serve, "approved; reason=attested")
	wantAnswer(t, "unattested", f.narinfo(other), Reject, "rejected; reason=unattested")
	base := Settings{Policy: f.g.conf().policy, Upstreams: f.g.conf().upstreams, NegativeTTL: time.Hour}
	before := f.up.requests()

	// No decision setting changed: nothing is dropped.
	same := base
	same.DiskReserve = 1
	if changed, err := f.g.Reconfigure(same); err != nil || changed {
		t.Fatalf("Reconfigure with the same decision settings: changed=%v err=%v", changed, err)
	}
	stored := f.narinfo(app).Record.Settings

	// Report mode: the remembered rejection is forgotten and served now.
	report := base
	report.Policy.Report = true
	if changed, err := f.g.Reconfigure(report); err != nil || !changed {
		t.Fatalf("Reconfigure to report mode: changed=%v err=%v", changed, err)
	}
	wantAnswer(t, "unattested in report mode", f.narinfo(other), Serve, "rejected; reason=unattested")
	a := f.narinfo(app)
	wantAnswer(t, "attested in report mode", a, Serve, "approved; reason=attested")
	if a.Record.Settings == stored {
		t.Fatal("the stored decision was served under settings it was not made under")
	}
	if n := f.up.requests() - before; n != 1 {
		t.Fatalf("%d upstream requests, want 1 (the path never stored; the approved one is decided from its stored narinfo)", n)
	}

	// The upstream's key revoked: the stored decision is decided again
	// and refused, without asking the upstream.
	revoked := base
	wrong, err := verify.GenerateKey("upstream-1")
	if err != nil {
		t.Fatal(err)
	}
	revoked.Upstreams = []Upstream{{Client: base.Upstreams[0].Client, Keys: []verify.PublicKey{wrong.Public()}}}
	if _, err := f.g.Reconfigure(revoked); err != nil {
		t.Fatal(err)
	}
	before = f.up.requests()
	wantAnswer(t, "after the key revocation", f.narinfo(app), Reject, "rejected; reason=upstream_unsigned")
	if n := f.up.requests() - before; n != 0 {
		t.Fatalf("%d upstream requests, want none", n)
	}

	moved := base
	moved.Policy.StoreDir = "/other/store"
	if _, err := f.g.Reconfigure(moved); err == nil {
		t.Fatal("store_dir changed while serving")
	}
	if _, err := f.g.Reconfigure(base); err != nil {
		t.Fatal(err)
	}
	wantAnswer(t, "back to the first settings", f.narinfo(app), Serve, "approved; reason=attested")
}

// A flood of requests for a missing or rejected path is one upstream
// request per negative TTL, and any admin change ends it at once.
func TestNegativeCache(t *testing.T) {
	f := newFixtureTTL(t, false, time.Hour)
	app := newObj("app-1.0")
	missing := newObj("missing-1.0")
	f.up.publish(app)
	for range 50 {
		wantAnswer(t, "unattested", f.narinfo(app), Reject, "rejected; reason=unattested")
		if a := f.narinfo(missing); a.Status != NotFound {
			t.Fatalf("missing path: %+v", a)
		}
	}
	if n := f.up.requests(); n != 2 {
		t.Fatalf("%d upstream requests for 100 requests of two refused paths, want 2", n)
	}
	f.attest(app) // any evidence change clears it
	wantAnswer(t, "after the attestation", f.narinfo(app), Serve, "approved; reason=attested")
}

// The gauges the alerts read exist with their values from the start, and a
// reload keeps the blob store's and sets the settings' anew.
func TestStartGauges(t *testing.T) {
	f := newFixture(t, false)
	if got := gaugeValue(t, f.g.m.CacheMaxSize); got != float64(f.blobs.MaxSize()) {
		t.Errorf("cache max size gauge %v, want %d", got, f.blobs.MaxSize())
	}
	c := f.g.conf()
	if _, err := f.g.Reconfigure(Settings{Policy: c.policy, Upstreams: c.upstreams, DiskReserve: 12345}); err != nil {
		t.Fatal(err)
	}
	if got := gaugeValue(t, f.g.m.DiskReserve); got != 12345 {
		t.Errorf("disk reserve gauge %v after a reload, want 12345", got)
	}
	if got := gaugeValue(t, f.g.m.CacheMaxSize); got != float64(f.blobs.MaxSize()) {
		t.Errorf("cache max size gauge %v after a reload, want %d", got, f.blobs.MaxSize())
	}
}

func gaugeValue(t *testing.T, g prometheus.Gauge) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}

// A decision answered before its commit (storeRecord) is never served
// after an admin change that lands before the commit: whichever of the
// two commits first, the next answer follows the change.
func TestDecisionBeforeCommitYieldsToChange(t *testing.T) {
	f := newFixture(t, false)
	for i := range 30 {
		o := newObj(fmt.Sprintf("racy-%d", i))
		f.up.publish(o)
		f.attest(o)
		a, err := f.g.NarInfo(context.Background(), o.hash) // no Flush: the commit may still be pending
		if err != nil {
			t.Fatal(err)
		}
		wantAnswer(t, "before the deny", a, Serve, "approved; reason=attested")
		if _, err := f.g.Deny(Change{Who: "test"}, []string{o.ni.StorePath}); err != nil {
			t.Fatal(err)
		}
		a, err = f.g.NarInfo(context.Background(), o.hash)
		if err != nil {
			t.Fatal(err)
		}
		wantAnswer(t, "after the deny", a, Reject, "rejected; reason=denied")
		a, err = f.g.NAR(context.Background(), narFileOf(o))
		if err != nil {
			t.Fatal(err)
		}
		wantAnswer(t, "NAR after the deny", a, Reject, "rejected; reason=denied")
	}
	f.g.Flush()
}
