package upstream

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock drives the probe backoff without sleeping.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeClock) Add(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
}

// states records OnStateChange calls.
type states struct {
	mu  sync.Mutex
	got []bool
}

func (s *states) record(up bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, up)
}

func (s *states) list() []bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]bool(nil), s.got...)
}

func assertDown(t *testing.T, err error) {
	t.Helper()
	assertUnavailable(t, err, 0)
	if !errors.Is(err, ErrDown) {
		t.Fatalf("want ErrDown, got %v", err)
	}
}

func TestMaxConnections(t *testing.T) {
	t.Parallel()
	var cur, peak atomic.Int64
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		n := cur.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		time.Sleep(20 * time.Millisecond)
		cur.Add(-1)
		io.WriteString(w, "ok")
	})
	c := newClient(t, Options{URL: srv.URL, MaxConnections: 2, Timeout: 10 * time.Second})
	if c.ownsTrans.MaxConnsPerHost != 2 {
		t.Errorf("transport MaxConnsPerHost = %d, want 2", c.ownsTrans.MaxConnsPerHost)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for range 10 {
		wg.Go(func() {
			_, err := c.Get(t.Context(), "x.narinfo", 100)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if p := peak.Load(); p != 2 {
		t.Errorf("at most %d requests in flight at the server, want exactly 2", p)
	}
}

// A request that waited for a slot while the requests ahead of it marked
// the upstream down fails at once, without a request of its own.
func TestWaiterFailsWhenMarkedDown(t *testing.T) {
	release := make(chan struct{})
	var hits atomic.Int64
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		select { // a black hole
		case <-release:
		case <-r.Context().Done():
		}
	})
	defer close(release)
	c := newClient(t, Options{URL: srv.URL, MaxConnections: 1, DownAfter: 1, Timeout: 200 * time.Millisecond, ProbeBackoff: time.Hour})
	first := make(chan error, 1)
	go func() {
		_, err := c.Get(t.Context(), "a.narinfo", 100)
		first <- err
	}()
	for hits.Load() == 0 { // the first request holds the only slot
		time.Sleep(time.Millisecond)
	}
	_, err := c.Get(t.Context(), "b.narinfo", 100) // waits for the slot
	if e := <-first; !errors.Is(e, ErrTimeout) {
		t.Fatalf("first request: %v", e)
	}
	assertDown(t, err)
	if n := hits.Load(); n != 1 {
		t.Fatalf("%d requests reached the upstream, want 1", n)
	}
}

// An open NAR holds its slot until Close; waiting for a slot ends with the
// caller's context and is not an upstream failure.
func TestOpenHoldsSlot(t *testing.T) {
	srv, hits := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "data")
	})
	c := newClient(t, Options{URL: srv.URL, MaxConnections: 2, DownAfter: 1})
	ctx := t.Context()
	open := func() io.ReadCloser {
		t.Helper()
		rc, _, err := c.Open(ctx, "nar/x.nar")
		if err != nil {
			t.Fatal(err)
		}
		return rc
	}
	full := func() {
		t.Helper()
		before := hits.Load()
		wctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		defer cancel()
		_, err := c.Get(wctx, "x.narinfo", 100)
		if !errors.Is(err, context.DeadlineExceeded) || !IsUnavailable(err) {
			t.Fatalf("Get with every slot taken: %v, want unavailable with the caller's deadline", err)
		}
		if hits.Load() != before {
			t.Fatal("a request went out without a slot")
		}
	}
	a, b := open(), open()
	io.ReadAll(a) // a body read to the end still holds its slot until Close
	full()
	a.Close()
	a.Close() // a second Close must not give back a second slot
	if _, err := c.Get(ctx, "x.narinfo", 100); err != nil {
		t.Fatalf("after a Close: %v", err)
	}
	d := open()
	full()
	b.Close()
	d.Close()
	if !c.Up() {
		t.Error("waiting for a slot marked the upstream down")
	}
}

// A hanging upstream is marked down after DownAfter timeouts; then requests
// fail at once without reaching it, except one probe per backoff period,
// and the first probe that gets an answer brings it back.
func TestDownAndRecovery(t *testing.T) {
	t.Parallel()
	const timeout = 100 * time.Millisecond
	var healthy atomic.Bool
	var probes atomic.Int64
	release := make(chan struct{})
	srv, hits := server(t, release, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/nix-cache-info" {
			probes.Add(1)
		}
		if !healthy.Load() {
			wait(r, release)
			return
		}
		io.WriteString(w, "StoreDir: /nix/store\n")
	})
	var st states
	c := newClient(t, Options{
		URL: srv.URL, Timeout: timeout, DownAfter: 3,
		ProbeBackoff: 200 * time.Millisecond, MaxProbeBackoff: time.Second,
		OnStateChange: st.record,
	})
	ctx := t.Context()

	for i := range 3 {
		if !c.Up() {
			t.Fatalf("down after %d failures", i)
		}
		_, err := c.Get(ctx, "x.narinfo", 100)
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("request %d: want ErrTimeout, got %v", i, err)
		}
	}
	if c.Up() {
		t.Fatal("still up after 3 timeouts")
	}
	if got := st.list(); len(got) != 1 || got[0] {
		t.Fatalf("OnStateChange calls %v, want [false]", got)
	}

	// Down: no request reaches the upstream, and none waits for a timeout.
	before := hits.Load()
	start := time.Now()
	for range 5 {
		_, err := c.Get(ctx, "x.narinfo", 100)
		assertDown(t, err)
		_, _, err = c.Open(ctx, "nar/x.nar")
		assertDown(t, err)
	}
	if d := time.Since(start); d >= timeout {
		t.Errorf("10 requests to a down upstream took %s", d)
	}
	if n := hits.Load() - before; n != 0 {
		t.Fatalf("%d requests reached a down upstream", n)
	}

	// After the backoff, one request probes; the upstream still hangs, so
	// the probe times out and the backoff doubles (to 400ms).
	time.Sleep(250 * time.Millisecond)
	_, err := c.Get(ctx, "x.narinfo", 100)
	assertDown(t, err)
	if n := probes.Load(); n != 1 {
		t.Fatalf("%d probes, want 1", n)
	}
	if n := hits.Load() - before; n != 1 {
		t.Fatalf("%d requests reached the upstream, want only the probe", n)
	}
	_, err = c.Get(ctx, "x.narinfo", 100)
	assertDown(t, err)
	if n := probes.Load(); n != 1 {
		t.Fatalf("a second probe within the backoff period (%d)", n)
	}

	// Recovery: the next probe answers, and the request that made it goes on.
	healthy.Store(true)
	time.Sleep(450 * time.Millisecond)
	body, err := c.Get(ctx, "x.narinfo", 100)
	if err != nil || string(body) != "StoreDir: /nix/store\n" {
		t.Fatalf("after recovery: %q, %v", body, err)
	}
	if n := probes.Load(); n != 2 {
		t.Errorf("%d probes, want 2", n)
	}
	if !c.Up() {
		t.Error("not up after a successful probe")
	}
	if got := st.list(); len(got) != 2 || got[0] || !got[1] {
		t.Errorf("OnStateChange calls %v, want [false true]", got)
	}
}

// The backoff doubles after each failed probe up to its maximum, a probe
// in flight makes other requests fail at once, and a 404 to the probe is
// an answer (a cache without nix-cache-info is still up).
func TestProbeBackoff(t *testing.T) {
	var mode atomic.Int32 // 0: every request 503; 1: probe blocks until released; 2: healthy, no nix-cache-info
	var probes atomic.Int64
	probing := make(chan struct{}, 1)
	unblock := make(chan struct{})
	unblockOnce := sync.OnceFunc(func() { close(unblock) })
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		isProbe := r.URL.Path == "/nix-cache-info"
		if isProbe {
			probes.Add(1)
		}
		switch mode.Load() {
		case 0:
			http.Error(w, "busy", http.StatusServiceUnavailable)
		case 1:
			probing <- struct{}{}
			<-unblock
			http.Error(w, "busy", http.StatusServiceUnavailable)
		case 2:
			if isProbe {
				http.NotFound(w, r)
				return
			}
			io.WriteString(w, "ok")
		}
	})
	// Registered after the server, so it runs before srv.Close: a failing
	// test must not leave the handler blocked.
	t.Cleanup(unblockOnce)
	clock := &fakeClock{now: time.Unix(1_000_000, 0)}
	c := newClient(t, Options{URL: srv.URL, DownAfter: 2, ProbeBackoff: time.Second, MaxProbeBackoff: 4 * time.Second})
	c.health.now = clock.Now
	ctx := t.Context()

	for range 2 {
		_, err := c.Get(ctx, "x.narinfo", 100)
		assertUnavailable(t, err, http.StatusServiceUnavailable)
	}
	if c.Up() {
		t.Fatal("still up after 2 failures")
	}
	for i, backoff := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second} {
		clock.Add(backoff - time.Millisecond)
		_, err := c.Get(ctx, "x.narinfo", 100)
		assertDown(t, err)
		if n := probes.Load(); n != int64(i) {
			t.Fatalf("period %d: probed %d times before the backoff of %s passed", i, n, backoff)
		}
		clock.Add(time.Millisecond)
		_, err = c.Get(ctx, "x.narinfo", 100)
		assertDown(t, err)
		if n := probes.Load(); n != int64(i+1) {
			t.Fatalf("period %d: %d probes after a backoff of %s, want %d", i, n, backoff, i+1)
		}
	}

	// While one request waits for the probe, the others do not.
	mode.Store(1)
	clock.Add(4 * time.Second)
	first := make(chan error, 1)
	go func() {
		_, err := c.Get(ctx, "x.narinfo", 100)
		first <- err
	}()
	<-probing
	start := time.Now()
	_, err := c.Get(ctx, "x.narinfo", 100)
	assertDown(t, err)
	if d := time.Since(start); d > testTimeout/2 {
		t.Errorf("a request waited %s for someone else's probe", d)
	}
	unblockOnce()
	assertDown(t, <-first)

	mode.Store(2)
	clock.Add(4 * time.Second)
	if body, err := c.Get(ctx, "x.narinfo", 100); err != nil || string(body) != "ok" {
		t.Fatalf("after a probe answered 404: %q, %v", body, err)
	}
	if !c.Up() {
		t.Error("a probe answered 404 and the upstream stayed down")
	}
}

// Only outages count: answers (404, 4xx, HTML, too large) and the caller's
// own cancellation do not, and any answer ends a failure streak.
func TestWhatCountsAsFailure(t *testing.T) {
	release := make(chan struct{})
	srv, _ := server(t, release, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/hang.narinfo":
			wait(r, release)
		case "/500.narinfo":
			http.Error(w, "oops", http.StatusInternalServerError)
		case "/401.narinfo":
			http.Error(w, "who?", http.StatusUnauthorized)
		case "/429.narinfo":
			http.Error(w, "slow down", http.StatusTooManyRequests)
		case "/big.narinfo":
			w.Write(make([]byte, 1000))
		case "/ok.narinfo":
			io.WriteString(w, "ok")
		default:
			http.NotFound(w, r)
		}
	})
	c := newClient(t, Options{URL: srv.URL, DownAfter: 3, Timeout: time.Minute})
	ctx := t.Context()
	get := func(rel string) {
		t.Helper()
		if _, err := c.Get(ctx, rel, 100); err == nil && rel != "ok.narinfo" {
			t.Fatalf("Get(%s) succeeded", rel)
		}
	}
	for range 5 {
		get("missing.narinfo")
		get("401.narinfo")
		get("429.narinfo")
		get("big.narinfo")
	}
	for range 5 {
		cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
		if _, err := c.Get(cctx, "hang.narinfo", 100); err == nil {
			t.Fatal("hang succeeded")
		}
		cancel()
	}
	if !c.Up() {
		t.Fatal("answers or the caller's cancellations marked the upstream down")
	}
	get("500.narinfo")
	get("500.narinfo")
	get("missing.narinfo") // an answer: the streak starts again
	get("500.narinfo")
	get("500.narinfo")
	if !c.Up() {
		t.Fatal("down without 3 consecutive failures")
	}
	get("500.narinfo")
	if c.Up() {
		t.Fatal("up after 3 consecutive 5xx")
	}
}

func TestConnectionRefusedMarksDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c := newClient(t, Options{URL: "http://" + addr, DownAfter: 2, ProbeBackoff: time.Hour})
	for range 2 {
		_, err := c.Get(t.Context(), "x.narinfo", 100)
		assertUnavailable(t, err, 0)
		if errors.Is(err, ErrDown) {
			t.Fatalf("ErrDown before the threshold: %v", err)
		}
	}
	_, _, err = c.Open(t.Context(), "nar/x.nar")
	assertDown(t, err)
}

// A NAR that stalls mid-body is an outage; a consumer closing the body
// early is not.
func TestOpenBodyStallCounts(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, _ := server(t, release, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.Write(make([]byte, 100))
		w.(http.Flusher).Flush()
		wait(r, release)
	})
	c := newClient(t, Options{URL: srv.URL, DownAfter: 1})

	rc, _, err := c.Open(t.Context(), "nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	if _, err := io.ReadFull(rc, buf); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(testTimeout / 4)
		rc.Close()
	}()
	if _, err := io.ReadAll(rc); err == nil {
		t.Fatal("read from a closed body succeeded")
	}
	if !c.Up() {
		t.Fatal("closing a body early marked the upstream down")
	}

	rc, _, err = c.Open(t.Context(), "nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := io.ReadAll(rc); !errors.Is(err, ErrTimeout) {
		t.Fatalf("want ErrTimeout, got %v", err)
	}
	if c.Up() {
		t.Fatal("a stalled body did not count")
	}
}

// A file:// upstream's state follows its directory, but it is never
// refused without looking: a remount is seen on the next request.
func TestFileUpstreamHealth(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "cache")
	var st states
	c := newClient(t, Options{URL: "file://" + dir, DownAfter: 2, ProbeBackoff: time.Hour, OnStateChange: st.record})
	for range 3 {
		_, err := c.Get(t.Context(), "x.narinfo", 100)
		assertUnavailable(t, err, 0)
		if errors.Is(err, ErrDown) {
			t.Fatalf("file upstream refused without looking: %v", err)
		}
	}
	if c.Up() {
		t.Fatal("missing directory: still up")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := c.Get(t.Context(), "x.narinfo", 100)
	assertNotFound(t, err)
	if !c.Up() {
		t.Fatal("directory back: still down")
	}
	if got := st.list(); len(got) != 2 || got[0] || !got[1] {
		t.Errorf("OnStateChange calls %v, want [false true]", got)
	}
}

// Racing transitions never report the same state twice in a row, and the
// last report is the final state.
func TestStateChangeOrdering(t *testing.T) {
	var st states
	c := newClient(t, Options{URL: "http://example.invalid", DownAfter: 2, OnStateChange: st.record})
	failure := errors.New("test failure")
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range 2000 {
				if r.IntN(3) == 0 {
					c.health.success()
				} else {
					c.health.failure(failure)
				}
			}
		})
	}
	wg.Wait()
	got := st.list()
	prev := true
	for i, up := range got {
		if up == prev {
			t.Fatalf("call %d repeats state %v", i, up)
		}
		prev = up
	}
	if len(got) > 0 && got[len(got)-1] != c.Up() {
		t.Fatalf("last reported %v, state is %v", got[len(got)-1], c.Up())
	}
}
