package upstream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// testTimeout keeps the timeout tests fast while leaving loopback plenty of
// headroom under -race.
const testTimeout = 200 * time.Millisecond

// server starts a loopback server whose blocking handlers are released
// before it closes, and counts the requests that reach it.
// release may be nil; otherwise it is closed when the test ends.
func server(t *testing.T, release chan struct{}, h http.HandlerFunc) (srv *httptest.Server, hits *atomic.Int64) {
	t.Helper()
	hits = new(atomic.Int64)
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		h(w, r)
	}))
	t.Cleanup(srv.Close)
	if release != nil {
		t.Cleanup(func() { close(release) }) // runs before srv.Close
	}
	return srv, hits
}

func newClient(t *testing.T, o Options) *Client {
	t.Helper()
	if o.Timeout == 0 {
		o.Timeout = testTimeout
	}
	c, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.CloseIdleConnections)
	return c
}

// wait blocks a handler until the client gives up or the test ends.
func wait(r *http.Request, release chan struct{}) {
	select {
	case <-r.Context().Done():
	case <-release:
	}
}

func assertUnavailable(t *testing.T, err error, status int) {
	t.Helper()
	var u *UnavailableError
	if !errors.As(err, &u) {
		t.Fatalf("want *UnavailableError, got %T %v", err, err)
	}
	if errors.Is(err, ErrNotFound) {
		t.Fatalf("unavailable error also matches ErrNotFound: %v", err)
	}
	if u.StatusCode != status {
		t.Errorf("StatusCode = %d, want %d (%v)", u.StatusCode, status, err)
	}
}

func assertNotFound(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("want ErrNotFound, got %v", err)
	}
	if IsUnavailable(err) {
		t.Fatalf("not-found error is also unavailable: %v", err)
	}
}

func TestStatuses(t *testing.T) {
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		var code int
		if _, err := fmt.Sscanf(r.URL.Path, "/%d.narinfo", &code); err != nil {
			http.Error(w, "bad test path", 400)
			return
		}
		if code == 200 {
			io.WriteString(w, "StorePath: /nix/store/x\n")
			return
		}
		w.WriteHeader(code)
	})
	ctx := t.Context()

	for _, code := range []int{200, 404, 403, 410, 500, 502, 503, 504, 429, 204, 401} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			// A client per status: a run of 5xx would mark a shared one down.
			c := newClient(t, Options{URL: srv.URL})
			rel := fmt.Sprintf("%d.narinfo", code)
			body, err := c.Get(ctx, rel, 1<<20)
			rc, size, oerr := c.Open(ctx, rel)
			switch code {
			case 200:
				if err != nil || string(body) != "StorePath: /nix/store/x\n" {
					t.Fatalf("Get = %q, %v", body, err)
				}
				if oerr != nil || size != int64(len(body)) {
					t.Fatalf("Open size %d, %v", size, oerr)
				}
				got, rerr := io.ReadAll(rc)
				rc.Close()
				if rerr != nil || !bytes.Equal(got, body) {
					t.Fatalf("Open body %q, %v", got, rerr)
				}
			case 404, 403, 410:
				assertNotFound(t, err)
				assertNotFound(t, oerr)
			default:
				assertUnavailable(t, err, code)
				assertUnavailable(t, oerr, code)
			}
		})
	}
}

func TestRequestShape(t *testing.T) {
	type seen struct{ path, query, ua, auth string }
	got := make(chan seen, 1)
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		got <- seen{r.URL.Path, r.URL.RawQuery, r.UserAgent(), r.Header.Get("Authorization")}
	})
	for _, tc := range []struct{ base, rel, path, query string }{
		{srv.URL, "abc.narinfo", "/abc.narinfo", ""},
		{srv.URL + "/prefix", "nar/x.nar.xz", "/prefix/nar/x.nar.xz", ""},
		{srv.URL + "/prefix/", "nar/x.nar.xz", "/prefix/nar/x.nar.xz", ""},
		{srv.URL, "nar/x.nar?hash=abc", "/nar/x.nar", "hash=abc"}, // harmonia-style URL field
	} {
		c := newClient(t, Options{URL: tc.base, UserAgent: "cacheproxy-test/1"})
		if _, err := c.Get(t.Context(), tc.rel, 100); err != nil {
			t.Fatalf("%s + %s: %v", tc.base, tc.rel, err)
		}
		s := <-got
		if s.path != tc.path || s.query != tc.query || s.ua != "cacheproxy-test/1" || s.auth != "" {
			t.Errorf("%s + %s: server saw %+v", tc.base, tc.rel, s)
		}
	}
}

func TestConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c := newClient(t, Options{URL: "http://" + addr})
	_, err = c.Get(t.Context(), "x.narinfo", 100)
	assertUnavailable(t, err, 0)
	_, _, err = c.Open(t.Context(), "nar/x.nar")
	assertUnavailable(t, err, 0)
	// Open cancels its own context on failure; the error must not then
	// pass for the caller's cancellation.
	if errors.Is(err, context.Canceled) {
		t.Errorf("Open error claims a cancellation: %v", err)
	}
}

func TestSlowHeadersTimeout(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, _ := server(t, release, func(w http.ResponseWriter, r *http.Request) {
		wait(r, release)
	})
	c := newClient(t, Options{URL: srv.URL})

	start := time.Now()
	_, err := c.Get(t.Context(), "x.narinfo", 100)
	assertUnavailable(t, err, 0)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("Get: want ErrTimeout, got %v", err)
	}
	_, _, err = c.Open(t.Context(), "nar/x.nar")
	assertUnavailable(t, err, 0)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("Open: want ErrTimeout, got %v", err)
	}
	if d := time.Since(start); d > 5*testTimeout {
		t.Errorf("two timeouts took %s", d)
	}
}

// Get's timeout covers the body too: a narinfo trickling forever is a failure.
func TestGetStalledBody(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, _ := server(t, release, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "100")
		io.WriteString(w, "StorePath: ")
		w.(http.Flusher).Flush()
		wait(r, release)
	})
	c := newClient(t, Options{URL: srv.URL})
	_, err := c.Get(t.Context(), "x.narinfo", 1000)
	assertUnavailable(t, err, 200)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("want ErrTimeout, got %v", err)
	}
}

func TestOpenStalledBody(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, _ := server(t, release, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.Write(make([]byte, 100))
		w.(http.Flusher).Flush()
		wait(r, release)
	})
	c := newClient(t, Options{URL: srv.URL})
	rc, size, err := c.Open(t.Context(), "nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if size != 1000 {
		t.Errorf("size = %d", size)
	}
	start := time.Now()
	n, err := io.Copy(io.Discard, rc)
	if n != 100 {
		t.Errorf("read %d bytes before the stall, want 100", n)
	}
	assertUnavailable(t, err, 200)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("want ErrTimeout, got %v", err)
	}
	if d := time.Since(start); d > 5*testTimeout {
		t.Errorf("stall detected after %s", d)
	}
	// The failure is sticky.
	if _, err2 := rc.Read(make([]byte, 1)); err2 == nil || err2 == io.EOF {
		t.Errorf("read after failure = %v", err2)
	}
}

// The idle timeout is per wait, not per download: a slow but live upstream
// taking several timeouts in total succeeds.
func TestOpenSlowButLive(t *testing.T) {
	t.Parallel()
	const chunks = 8
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(chunks*10))
		for range chunks {
			w.Write(make([]byte, 10))
			w.(http.Flusher).Flush()
			time.Sleep(testTimeout / 4)
		}
	})
	c := newClient(t, Options{URL: srv.URL})
	rc, _, err := c.Open(t.Context(), "nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	n, err := io.Copy(io.Discard, rc)
	if err != nil || n != chunks*10 {
		t.Fatalf("read %d, %v", n, err)
	}
}

// A slow consumer is not a stalled upstream: time spent between Reads does not count.
func TestOpenSlowConsumer(t *testing.T) {
	t.Parallel()
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "20")
		w.Write(make([]byte, 20))
	})
	c := newClient(t, Options{URL: srv.URL})
	rc, _, err := c.Open(t.Context(), "nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	buf := make([]byte, 10)
	if _, err := io.ReadFull(rc, buf); err != nil {
		t.Fatal(err)
	}
	time.Sleep(testTimeout * 2)
	rest, err := io.ReadAll(rc)
	if err != nil || len(rest) != 10 {
		t.Fatalf("after a pause: %d bytes, %v", len(rest), err)
	}
}

func TestOpenShortBody(t *testing.T) {
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.Write(make([]byte, 500)) // the server closes the connection after this
	})
	c := newClient(t, Options{URL: srv.URL})
	rc, size, err := c.Open(t.Context(), "nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	n, err := io.Copy(io.Discard, rc)
	if size != 1000 || n != 500 {
		t.Errorf("size %d, read %d", size, n)
	}
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("want io.ErrUnexpectedEOF, got %v", err)
	}
	assertUnavailable(t, err, 200)
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// A RoundTripper that ends a short body with a clean io.EOF is still caught.
func TestOpenShortBodyCleanEOF(t *testing.T) {
	rt := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		return &http.Response{
			StatusCode:    200,
			Status:        "200 OK",
			ContentLength: 10,
			Body:          io.NopCloser(strings.NewReader("12345")),
			Request:       r,
		}, nil
	})
	c := newClient(t, Options{URL: "http://example.invalid", Transport: rt})
	rc, _, err := c.Open(t.Context(), "nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	_, err = io.ReadAll(rc)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("want io.ErrUnexpectedEOF, got %v", err)
	}
}

func TestOpenUnknownLength(t *testing.T) {
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("part1"))
		w.(http.Flusher).Flush() // forces chunked encoding: no Content-Length
		w.Write([]byte("part2"))
	})
	c := newClient(t, Options{URL: srv.URL})
	rc, size, err := c.Open(t.Context(), "nar/x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if size != -1 || err != nil || string(data) != "part1part2" {
		t.Fatalf("size %d, %q, %v", size, data, err)
	}
}

func TestCallerCancel(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	srv, _ := server(t, release, func(w http.ResponseWriter, r *http.Request) {
		wait(r, release)
	})
	c := newClient(t, Options{URL: srv.URL, Timeout: time.Minute})
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	_, err := c.Get(ctx, "x.narinfo", 100)
	if err == nil || errors.Is(err, ErrNotFound) || errors.Is(err, ErrTimeout) {
		t.Fatalf("got %v", err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("caller's deadline not visible in %v", err)
	}
}

func TestMaxBytes(t *testing.T) {
	big := strings.Repeat("x", 2000)
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/declared.narinfo":
			io.WriteString(w, big)
		case "/chunked.narinfo":
			io.WriteString(w, big[:1000])
			w.(http.Flusher).Flush()
			io.WriteString(w, big[1000:])
		case "/exact.narinfo":
			io.WriteString(w, big[:1000])
		}
	})
	c := newClient(t, Options{URL: srv.URL})
	for _, rel := range []string{"declared.narinfo", "chunked.narinfo"} {
		_, err := c.Get(t.Context(), rel, 1000)
		if !errors.Is(err, ErrTooLarge) {
			t.Errorf("%s: want ErrTooLarge, got %v", rel, err)
		}
		assertUnavailable(t, err, 200)
	}
	if body, err := c.Get(t.Context(), "exact.narinfo", 1000); err != nil || len(body) != 1000 {
		t.Errorf("exactly maxBytes: %d, %v", len(body), err)
	}
}

func TestNetrcCredentials(t *testing.T) {
	auth := make(chan string, 1)
	srv, _ := server(t, nil, func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		if !ok {
			auth <- "none"
		} else {
			auth <- u + ":" + p
		}
	})
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct{ name, netrc, want string }{
		{"machine", "machine other.example login a password b\nmachine 127.0.0.1\n  login alice\n  password \"s3cr et\"\n", "alice:s3cr et"},
		{"default", "machine other.example login a password b\ndefault login bob password pw\n", "bob:pw"},
		{"no match", "machine other.example login a password b\n", "none"},
	} {
		c := newClient(t, Options{URL: srv.URL, NetrcFile: write(tc.name, tc.netrc)})
		if _, err := c.Get(t.Context(), "x.narinfo", 100); err != nil {
			t.Fatal(err)
		}
		if got := <-auth; got != tc.want {
			t.Errorf("%s: server saw credentials %q, want %q", tc.name, got, tc.want)
		}
	}
}

func TestPathEscapeRejected(t *testing.T) {
	srv, hits := server(t, nil, func(w http.ResponseWriter, r *http.Request) {})
	fileDir := t.TempDir()
	for _, up := range []string{srv.URL + "/cache", "file://" + fileDir} {
		c := newClient(t, Options{URL: up})
		for _, rel := range []string{
			"",
			"/etc/passwd",
			"../secret",
			"nar/../../secret",
			"nar/..",
			"./x.narinfo",
			"nar//x.nar",
			"nar/%2e%2e/%2e%2e/secret",
			"nar%2f..%2f..%2fsecret",
			"..%2fsecret",
			`nar\..\secret`,
			"nar/%5c..",
			"x%00.narinfo",
			"http://evil.example/nar/x.nar",
			"https:x.nar",
			"//evil.example/x",
			"file:///etc/passwd",
			"x.narinfo#frag",
			"x\n.narinfo",
			strings.Repeat("a/", 600) + "x",
		} {
			_, err := c.Get(t.Context(), rel, 100)
			if !errors.Is(err, ErrInvalidPath) {
				t.Errorf("%s: Get(%q) = %v, want ErrInvalidPath", up, rel, err)
			}
			if errors.Is(err, ErrNotFound) || IsUnavailable(err) {
				t.Errorf("%s: Get(%q): invalid path misclassified: %v", up, rel, err)
			}
			if _, _, err := c.Open(t.Context(), rel); !errors.Is(err, ErrInvalidPath) {
				t.Errorf("%s: Open(%q) = %v, want ErrInvalidPath", up, rel, err)
			}
		}
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("%d requests reached the server", n)
	}
}

func TestFileUpstream(t *testing.T) {
	dir := t.TempDir()
	outside := t.TempDir()
	mustWrite := func(p, text string) {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mustWrite(filepath.Join(dir, "abc.narinfo"), "StorePath: /nix/store/abc-x\n")
	mustWrite(filepath.Join(dir, "nar", "abc.nar.xz"), strings.Repeat("n", 5000))
	mustWrite(filepath.Join(outside, "secret"), "SECRET")
	if err := os.Symlink(filepath.Join(outside, "secret"), filepath.Join(dir, "escape.narinfo")); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, Options{URL: "file://" + dir})
	ctx := t.Context()

	if body, err := c.Get(ctx, "abc.narinfo", 1000); err != nil || string(body) != "StorePath: /nix/store/abc-x\n" {
		t.Fatalf("Get = %q, %v", body, err)
	}
	_, err := c.Get(ctx, "missing.narinfo", 1000)
	assertNotFound(t, err)
	_, err = c.Get(ctx, "nar/missing/x.nar", 1000)
	assertNotFound(t, err)
	_, err = c.Get(ctx, "nar", 1000) // a directory
	assertNotFound(t, err)
	_, err = c.Get(ctx, "nar/abc.nar.xz", 1000)
	if !errors.Is(err, ErrTooLarge) {
		t.Errorf("want ErrTooLarge, got %v", err)
	}
	body, err := c.Get(ctx, "escape.narinfo", 1000)
	if err == nil || bytes.Contains(body, []byte("SECRET")) {
		t.Errorf("symlink out of the cache root: %q, %v", body, err)
	}
	if _, err := c.Get(ctx, "abc.narinfo?x=1", 1000); !errors.Is(err, ErrInvalidPath) {
		t.Errorf("query on file upstream: %v", err)
	}

	rc, size, err := c.Open(ctx, "nar/abc.nar.xz")
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(rc)
	rc.Close()
	if size != 5000 || len(data) != 5000 || err != nil {
		t.Fatalf("Open: size %d, read %d, %v", size, len(data), err)
	}
	_, _, err = c.Open(ctx, "nar/missing.nar.xz")
	assertNotFound(t, err)

	// An unmounted or deleted cache directory is an outage, not a miss.
	gone := newClient(t, Options{URL: "file://" + filepath.Join(dir, "does-not-exist")})
	_, err = gone.Get(ctx, "abc.narinfo", 1000)
	assertUnavailable(t, err, 0)
	_, _, err = gone.Open(ctx, "nar/abc.nar.xz")
	assertUnavailable(t, err, 0)
}

func TestFileShrinksWhileReading(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "x.nar")
	if err := os.WriteFile(p, make([]byte, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, Options{URL: "file://" + dir})
	rc, size, err := c.Open(t.Context(), "x.nar")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if err := os.Truncate(p, 400); err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, rc)
	if size != 1000 || n != 400 || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("size %d, read %d, %v", size, n, err)
	}
}

func TestNew(t *testing.T) {
	for _, bad := range []Options{
		{URL: "ftp://x"},
		{URL: "cache.nixos.org"},
		{URL: "https://"},
		{URL: "file://relative/dir"},
		{URL: "file:relative"},
		{URL: "https://x/?q=1"},
		{URL: "https://x", Timeout: -time.Second},
		{URL: "https://x", NetrcFile: filepath.Join(t.TempDir(), "missing")},
		{URL: "https://x", MaxConnections: -1},
		{URL: "https://x", DownAfter: -1},
		{URL: "https://x", ProbeBackoff: -time.Second},
		{URL: "https://x", MaxProbeBackoff: -time.Second},
		{URL: "https://x", ProbeBackoff: time.Minute, MaxProbeBackoff: time.Second},
	} {
		if _, err := New(bad); err == nil {
			t.Errorf("New(%+v) succeeded", bad)
		}
	}
	for _, bad := range []Options{
		{URL: "https://user:hunter2@x/?q=1"},
		{URL: "gopher://user:hunter2@x"},
		{URL: "https://user:hunter2@x", MaxConnections: -1},
	} {
		if _, err := New(bad); err == nil || strings.Contains(err.Error(), "hunter2") {
			t.Errorf("New(%+v) = %v, want an error without the password", bad, err)
		}
	}
	c, err := New(Options{URL: "https://user:hunter2@cache.example/root"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(c.Name(), "hunter2") || !strings.Contains(c.Name(), "cache.example/root") {
		t.Errorf("Name() = %q", c.Name())
	}
	if c.timeout != DefaultTimeout {
		t.Errorf("default timeout %s", c.timeout)
	}
	if cap(c.slots) != DefaultMaxConnections || c.ownsTrans.MaxConnsPerHost != DefaultMaxConnections {
		t.Errorf("default connection limit: %d slots, transport %d", cap(c.slots), c.ownsTrans.MaxConnsPerHost)
	}
	h := &c.health
	if h.downAfter != DefaultDownAfter || h.minBackoff != DefaultProbeBackoff || h.maxBackoff != DefaultMaxProbeBackoff || !c.Up() {
		t.Errorf("default health: after %d, backoff %s..%s, up %v", h.downAfter, h.minBackoff, h.maxBackoff, c.Up())
	}
	// A first backoff above the default maximum raises the maximum with it.
	c, err = New(Options{URL: "https://x", ProbeBackoff: 2 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if c.health.maxBackoff != 2*time.Minute {
		t.Errorf("max backoff %s, want 2m", c.health.maxBackoff)
	}
}
