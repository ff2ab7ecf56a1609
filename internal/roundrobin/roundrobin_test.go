package roundrobin

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// named starts a backend that answers every request with its name.
func named(t *testing.T, name string) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, name)
	}))
	t.Cleanup(s.Close)
	return s
}

// refusing returns a loopback URL on which nothing listens.
func refusing(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "http://" + l.Addr().String()
	l.Close()
	return u
}

// resetting starts a backend that reads the request and then resets the
// connection (RST, SO_LINGER 0) without a response byte, as a node killed
// mid-request does.
func resetting(t *testing.T) *httptest.Server {
	t.Helper()
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		conn, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		conn.(*net.TCPConn).SetLinger(0)
		conn.Close()
	}))
	t.Cleanup(s.Close)
	return s
}

func newLB(t *testing.T, backends ...string) *LB {
	t.Helper()
	lb := New(backends)
	t.Cleanup(lb.Close)
	return lb
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", url, err)
	}
	return resp.StatusCode, string(body)
}

func wantCounts(t *testing.T, lb *LB, requests, failures []int64) {
	t.Helper()
	for i := range requests {
		if r, f := lb.Requests(i), lb.Failures(i); r != requests[i] || f != failures[i] {
			t.Errorf("backend %d: %d requests, %d failures; want %d, %d", i, r, f, requests[i], failures[i])
		}
	}
}

func TestRoundRobin(t *testing.T) {
	a, b, c := named(t, "a"), named(t, "b"), named(t, "c")
	lb := newLB(t, a.URL, b.URL, c.URL)
	var got []string
	for range 6 {
		code, body := get(t, lb.URL+"/nix-cache-info")
		if code != http.StatusOK {
			t.Fatalf("status %d: %s", code, body)
		}
		got = append(got, body)
	}
	if s := strings.Join(got, ""); s != "abcabc" {
		t.Fatalf("order %q, want abcabc", s)
	}
	wantCounts(t, lb, []int64{2, 2, 2}, []int64{0, 0, 0})
}

func TestRefusedBackendIsSkipped(t *testing.T) {
	a, c := named(t, "a"), named(t, "c")
	lb := newLB(t, a.URL, refusing(t), c.URL)
	for range 6 {
		if code, body := get(t, lb.URL+"/x"); code != http.StatusOK || (body != "a" && body != "c") {
			t.Fatalf("status %d, body %q", code, body)
		}
	}
	// Requests 2 and 5 started on the dead backend and moved to c.
	wantCounts(t, lb, []int64{2, 0, 4}, []int64{0, 2, 0})

	// A request with a body moves on too: the refused dial never read it.
	resp, err := http.Post(lb.URL+"/admin", "text/plain", strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	resp, err = http.Post(lb.URL+"/admin", "text/plain", strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "c" {
		t.Fatalf("POST after a refused dial: status %d, body %q", resp.StatusCode, body)
	}
}

func TestResetBeforeResponse(t *testing.T) {
	a := named(t, "a")
	lb := newLB(t, resetting(t).URL, a.URL)
	// GET is idempotent: retried on a.
	if code, body := get(t, lb.URL+"/x.narinfo"); code != http.StatusOK || body != "a" {
		t.Fatalf("GET: status %d, body %q", code, body)
	}
	wantCounts(t, lb, []int64{0, 1}, []int64{1, 0})

	// POST was sent and may have had an effect: not retried, 502.
	lb.next.Store(0)
	resp, err := http.Post(lb.URL+"/admin", "text/plain", strings.NewReader("payload"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("POST to a resetting backend: status %d, body %q; want 502", resp.StatusCode, body)
	}
	wantCounts(t, lb, []int64{0, 1}, []int64{2, 0})
}

func TestAllBackendsFail(t *testing.T) {
	lb := newLB(t, refusing(t), refusing(t))
	if code, body := get(t, lb.URL+"/x"); code != http.StatusBadGateway {
		t.Fatalf("status %d, body %q; want 502", code, body)
	}
	wantCounts(t, lb, []int64{0, 0}, []int64{1, 1})
}

func TestSetDown(t *testing.T) {
	a, b, c := named(t, "a"), named(t, "b"), named(t, "c")
	lb := newLB(t, a.URL, b.URL, c.URL)
	lb.SetDown(1, true)
	var got []string
	for range 4 {
		_, body := get(t, lb.URL+"/x")
		got = append(got, body)
	}
	if s := strings.Join(got, ""); s != "acac" {
		t.Fatalf("order with b down %q, want acac", s)
	}
	for i := range 3 {
		lb.SetDown(i, true)
	}
	if code, body := get(t, lb.URL+"/x"); code != http.StatusBadGateway || !strings.Contains(body, ErrNoBackend.Error()) {
		t.Fatalf("all down: status %d, body %q", code, body)
	}
	lb.SetDown(1, false)
	if _, body := get(t, lb.URL+"/x"); body != "b" {
		t.Fatalf("after b back up: %q", body)
	}
	wantCounts(t, lb, []int64{2, 1, 2}, []int64{0, 0, 0})
}

// TestStreamsWithoutBuffering proves bytes reach the client while the
// backend is still sending: the backend holds the rest of its body until
// the client has read the first part through the balancer. A buffering
// balancer would deadlock here (bounded by the test's timeout).
func TestStreamsWithoutBuffering(t *testing.T) {
	first := bytes.Repeat([]byte("n"), 1<<20+123) // not a multiple of any buffer
	release := make(chan struct{})
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-nix-nar")
		w.Write(first)
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "rest")
	}))
	t.Cleanup(s.Close)
	defer close(release)
	lb := newLB(t, s.URL)

	resp, err := http.Get(lb.URL + "/nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	got := make([]byte, len(first))
	if _, err := io.ReadFull(resp.Body, got); err != nil {
		t.Fatalf("reading the first part while the backend waits: %v", err)
	}
	if !bytes.Equal(got, first) {
		t.Fatal("first part differs")
	}
	release <- struct{}{}
	rest, err := io.ReadAll(resp.Body)
	if err != nil || string(rest) != "rest" {
		t.Fatalf("rest %q, %v", rest, err)
	}
}

// TestLargeBody streams a NAR-sized body (128 MiB, generated, never held
// in memory) through the balancer and checks every byte and the length.
func TestLargeBody(t *testing.T) {
	const size = 128 << 20
	seed := uint64(time.Now().UnixNano())
	gen := func() io.Reader { return io.LimitReader(rand.NewChaCha8(seedBytes(seed)), size) }
	want := sha256.New()
	io.Copy(want, gen())

	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(size))
		io.Copy(w, gen())
	}))
	t.Cleanup(s.Close)
	lb := newLB(t, s.URL)

	start := time.Now()
	resp, err := http.Get(lb.URL + "/nar/big.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ContentLength != size {
		t.Errorf("Content-Length %d, want %d", resp.ContentLength, size)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	if err != nil || n != size {
		t.Fatalf("copied %d bytes, %v", n, err)
	}
	if !bytes.Equal(h.Sum(nil), want.Sum(nil)) {
		t.Fatal("body differs")
	}
	el := time.Since(start)
	t.Logf("128 MiB through the balancer in %v (%.0f MB/s)", el, float64(size)/1e6/el.Seconds())
}

func seedBytes(seed uint64) (b [32]byte) {
	copy(b[:], fmt.Sprintf("%032d", seed))
	return b
}

// TestBackendDiesMidBody: a response that has started is not retried, and
// the client's transfer fails instead of ending short and looking whole.
func TestBackendDiesMidBody(t *testing.T) {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000000")
		w.Write(make([]byte, 100000))
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the connection is cut
	}))
	t.Cleanup(s.Close)
	a := named(t, "a")
	lb := newLB(t, s.URL, a.URL)
	resp, err := http.Get(lb.URL + "/nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err == nil {
		t.Fatalf("read %d bytes of 1000000 without an error", n)
	}
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Logf("client error (expected some error): %v", err)
	}
	wantCounts(t, lb, []int64{1, 0}, []int64{0, 0})
}

func TestHopByHopHeaders(t *testing.T) {
	seen := make(chan http.Header, 1)
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
		w.Header().Set("Connection", "X-Resp-Hop")
		w.Header().Set("X-Resp-Hop", "1")
		w.Header().Set("X-Resp-End", "1")
		io.WriteString(w, "ok")
	}))
	t.Cleanup(s.Close)
	lb := newLB(t, s.URL)
	req, _ := http.NewRequest(http.MethodGet, lb.URL+"/x", nil)
	req.Header.Set("Connection", "X-Hop")
	req.Header.Set("X-Hop", "1")
	req.Header.Set("X-End", "1")
	req.Header.Set("Accept-Encoding", "identity")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	h := <-seen
	if h.Get("X-Hop") != "" || h.Get("X-End") != "1" {
		t.Errorf("backend saw X-Hop %q, X-End %q", h.Get("X-Hop"), h.Get("X-End"))
	}
	if h.Get("X-Forwarded-For") != "127.0.0.1" {
		t.Errorf("X-Forwarded-For %q", h.Get("X-Forwarded-For"))
	}
	if h.Get("Accept-Encoding") != "identity" {
		t.Errorf("Accept-Encoding %q, want the client's", h.Get("Accept-Encoding"))
	}
	if resp.Header.Get("X-Resp-Hop") != "" || resp.Header.Get("X-Resp-End") != "1" {
		t.Errorf("client saw X-Resp-Hop %q, X-Resp-End %q", resp.Header.Get("X-Resp-Hop"), resp.Header.Get("X-Resp-End"))
	}
}
