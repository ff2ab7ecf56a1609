package gate

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/metrics"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// heldUpstream is a real HTTP upstream on loopback whose narinfo answers
// the test releases: each request announces itself on arrived and then
// waits for release (or the end of the test) before answering.
type heldUpstream struct {
	*testUpstream
	arrived chan string   // the request path, as each request arrives
	release chan struct{} // closed to let the answers go
}

func newHeldUpstream(t *testing.T) *heldUpstream {
	h := &heldUpstream{testUpstream: &testUpstream{counts: map[string]int{}, files: map[string][]byte{}},
		arrived: make(chan string, 16), release: make(chan struct{})}
	key, err := verify.GenerateKey("upstream-1")
	if err != nil {
		t.Fatal(err)
	}
	h.key = key
	done := make(chan struct{})
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.arrived <- r.URL.Path
		select {
		case <-h.release:
		case <-done: // the test is over: a black hole ends with it
			return
		}
		h.mu.Lock()
		body, ok := h.files[r.URL.Path]
		h.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(body)
	}))
	t.Cleanup(func() { close(done); h.srv.Close() })
	return h
}

// twoUpstreams is a gate over upstreams a (first) and b, each signing with
// its own key and trusted for it; the rebuilder attests.
func twoUpstreams(t *testing.T, a, b *testUpstream, aOpts upstream.Options) (*Gate, verify.SecretKey) {
	t.Helper()
	rb, gk := genKey(t, "rebuilder-1"), genKey(t, "gatekeeper-1")
	dir := t.TempDir()
	db, blobs := openState(t, dir)
	aOpts.URL = a.srv.URL
	if aOpts.Timeout == 0 {
		aOpts.Timeout = time.Minute // longer than any test may take: a wait on it shows as a hang
	}
	ca, err := upstream.New(aOpts)
	if err != nil {
		t.Fatal(err)
	}
	cb, err := upstream.New(upstream.Options{URL: b.srv.URL, Timeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	g, err := New(Options{
		Policy: policy.Policy{StoreDir: storeDir, Attesters: []verify.PublicKey{rb.Public()}, Quorum: 1},
		Upstreams: []Upstream{{Client: ca, Keys: []verify.PublicKey{a.key.Public()}},
			{Client: cb, Keys: []verify.PublicKey{b.key.Public()}}},
		Key: gk, DB: db, Blobs: blobs, Metrics: metrics.New(),
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close(); blobs.Close(); db.Close() })
	return g, rb
}

func attestWith(t *testing.T, g *Gate, rb verify.SecretKey, o *obj) {
	t.Helper()
	if res, err := g.Attest(Change{Who: "test"}, attestClaims(t, o.signed(rb))); err != nil || len(res) != 1 || res[0].Outcome != AttestStored {
		t.Fatalf("attest %s: %v %+v", o.base(), err, res)
	}
}

// decideAsync asks for o's narinfo on another goroutine.
func decideAsync(g *Gate, o *obj) chan Answer {
	ch := make(chan Answer, 1)
	go func() {
		a, err := g.NarInfo(context.Background(), o.hash)
		if err != nil {
			a = Answer{Detail: err.Error()}
		}
		ch <- a
	}()
	return ch
}

// waitFor fails the test if ch gives nothing within a minute: the gate is
// waiting for an answer it must not wait for. (A guard against a hang, not
// a measure of speed.)
func waitFor[T any](t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(time.Minute):
		t.Fatalf("%s: still waiting after a minute", what)
		panic("unreachable")
	}
}

// Both upstreams are asked at once: the second gets its request while the
// first has not answered. The first's answer is still the one served when
// both approve (configured order).
func TestUpstreamsAskedConcurrently(t *testing.T) {
	a, b := newHeldUpstream(t), newHeldUpstream(t)
	g, rb := twoUpstreams(t, a.testUpstream, b.testUpstream, upstream.Options{})
	app := newObj("app-1.0")
	a.publish(app)
	b.publish(app)
	attestWith(t, g, rb, app)

	got := decideAsync(g, app)
	// Asked one after the other, b would only be asked once a answered,
	// and a answers only after release.
	for _, u := range []*heldUpstream{a, b} {
		if p := waitFor(t, "upstream request", u.arrived); p != "/"+app.hash+".narinfo" {
			t.Fatalf("upstream asked for %s", p)
		}
	}
	close(b.release) // b answers first
	close(a.release)
	ans := waitFor(t, "decision", got)
	wantAnswer(t, "narinfo", ans, Serve, "approved; reason=attested")
	if ans.Record.Upstream != g.conf().upstreams[0].Name() {
		t.Fatalf("served from %s; the first upstream approved too, and comes first", ans.Record.Upstream)
	}
}

// An approval from the first upstream does not wait for a later upstream
// that never answers.
func TestLaterUpstreamNotWaitedFor(t *testing.T) {
	a := newTestUpstream(t)
	b := newHeldUpstream(t) // a black hole: never released
	g, rb := twoUpstreams(t, a, b.testUpstream, upstream.Options{})
	app := newObj("app-1.0")
	a.publish(app)
	b.publish(app)
	attestWith(t, g, rb, app)
	ans := waitFor(t, "decision with a black-holed second upstream", decideAsync(g, app))
	wantAnswer(t, "narinfo", ans, Serve, "approved; reason=attested")
	if ans.Record.Upstream != g.conf().upstreams[0].Name() {
		t.Fatalf("served from %s", ans.Record.Upstream)
	}
}

// A slow first upstream that is not marked down is waited for, even when
// the second has already approved: its answer would be served if it
// approved too. Here it approves, and wins.
func TestEarlierUpstreamWaitedFor(t *testing.T) {
	a, b := newHeldUpstream(t), newTestUpstream(t)
	g, rb := twoUpstreams(t, a.testUpstream, b, upstream.Options{})
	app := newObj("app-1.0")
	a.publish(app)
	b.publish(app)
	attestWith(t, g, rb, app)
	got := decideAsync(g, app)
	waitFor(t, "request to the first upstream", a.arrived)
	// Make sure b has answered before a is let go.
	for b.requests() == 0 {
		time.Sleep(time.Millisecond)
	}
	close(a.release)
	ans := waitFor(t, "decision", got)
	wantAnswer(t, "narinfo", ans, Serve, "approved; reason=attested")
	if ans.Record.Upstream != g.conf().upstreams[0].Name() {
		t.Fatalf("served from %s before the first upstream answered", ans.Record.Upstream)
	}
}

// A first upstream marked down (a black hole that already failed) costs
// nothing: the second's approval is the answer at once.
func TestDownUpstreamSkipped(t *testing.T) {
	a, b := newHeldUpstream(t), newTestUpstream(t)
	g, rb := twoUpstreams(t, a.testUpstream, b, upstream.Options{
		Timeout: 50 * time.Millisecond, DownAfter: 1, ProbeBackoff: time.Hour})
	app, other := newObj("app-1.0"), newObj("other-1.0")
	b.publish(app)
	attestWith(t, g, rb, app)
	// One request that times out marks a down.
	if ans, err := g.NarInfo(context.Background(), other.hash); err != nil || ans.Status != Unavailable {
		t.Fatalf("other: %+v %v", ans, err)
	}
	if g.conf().upstreams[0].Client.Up() {
		t.Fatal("the first upstream is not marked down")
	}
	ans := waitFor(t, "decision with the first upstream down", decideAsync(g, app))
	wantAnswer(t, "narinfo", ans, Serve, "approved; reason=attested")
	if ans.Record.Upstream != g.conf().upstreams[1].Name() {
		t.Fatalf("served from %s", ans.Record.Upstream)
	}
	if len(a.arrived) != 1 {
		t.Fatalf("%d requests reached the down upstream, want only the first", len(a.arrived))
	}
}

// When the first upstream rejects and the second approves, the second's
// approval is served (order decides ties only between approvals).
func TestLaterApprovalBeatsEarlierRejection(t *testing.T) {
	a, b := newTestUpstream(t), newTestUpstream(t)
	g, rb := twoUpstreams(t, a, b, upstream.Options{})
	app := newObj("app-1.0")
	evil := *app
	evil.nar = append([]byte("evil"), app.nar...)
	evil.ni.NarHash = narinfo.SumSHA256(evil.nar)
	a.publish(&evil) // a serves something else: attestation_mismatch
	b.publish(app)
	attestWith(t, g, rb, app)
	ans := waitFor(t, "decision", decideAsync(g, app))
	wantAnswer(t, "narinfo", ans, Serve, "approved; reason=attested")
	if ans.Record.Upstream != g.conf().upstreams[1].Name() {
		t.Fatalf("served from %s", ans.Record.Upstream)
	}
}
