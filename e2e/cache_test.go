package e2e

// Caching and streaming: one upstream fetch per NAR, later clients served
// from the blob store, bytes flowing before the download completes.

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

// narPath is the request path of the NAR named by a proxy narinfo's URL
// (relative, as Nix writes it, or absolute).
func narPath(ni *Narinfo) string {
	u := ni.Get("URL")
	if pu, err := url.Parse(u); err == nil && pu.IsAbs() {
		return pu.RequestURI()
	}
	return "/" + strings.TrimPrefix(u, "/")
}

func TestSecondClientFromCache(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, nil)
	f.attestClosure(t)
	newClient(t).MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	n := f.Up.NarCount()
	if n != 2 {
		t.Errorf("first client: upstream saw %d NAR requests, want 2", n)
	}

	cl2 := newClient(t)
	cl2.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	assertSameTree(t, string(f.C.App), cl2.Path(f.C.App))
	if got := f.Up.NarCount(); got != n {
		t.Errorf("second client caused %d more upstream NAR requests, want 0 (served from cache)", got-n)
	}
	if v := f.Px.MetricSum(t, "cacheproxy_cache_hits_total", nil); v < 1 {
		t.Errorf("cacheproxy_cache_hits_total = %v after a cached download, want >= 1", v)
	}
	if v := f.Px.MetricSum(t, "cacheproxy_served_bytes_total", map[string]string{"source": "cache"}); v <= 0 {
		t.Errorf("cacheproxy_served_bytes_total{source=\"cache\"} = %v, want > 0", v)
	}

	// Range on a cached blob.
	ni := f.Px.ExpectApproved(t, f.C.App)
	raw, _ := os.ReadFile(f.Up.NarFile(t, f.C.App))
	resp, body, err := doGet(t, f.Px.URL+narPath(ni), http.Header{"Range": {"bytes=5-14"}})
	if err != nil || resp.StatusCode != 206 || !bytes.Equal(body, raw[5:15]) {
		t.Errorf("Range bytes=5-14 on a cached NAR: err=%v status=%v body=%q, want 206 and %q", err, resp, body, raw[5:15])
	}

	// The cache and the gatekeeper key survive a restart.
	key := f.Px.GatekeeperKey
	f.Px.Restart(t)
	if f.Px.GatekeeperKey != key {
		t.Errorf("gatekeeper key changed across restart: %q -> %q", key, f.Px.GatekeeperKey)
	}
	newClient(t).MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	if got := f.Up.NarCount(); got != n {
		t.Errorf("after restart a client caused %d upstream NAR requests, want 0 (blobs are persistent)", got-n)
	}
}

// 20 concurrent requests for one uncached NAR: one upstream fetch, 20
// identical complete bodies.
func TestConcurrentNarFetch(t *testing.T) {
	t.Parallel()
	const clients = 20
	c := buildClosure(t, ClosureOpts{BigSize: 3 << 20})
	up := newUpstream(t, upKey)
	up.Publish(t, "zstd", c.App)
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	px.Attest(t, attestFile(t, rb1Key, c.Paths()...))
	ni := px.ExpectApproved(t, c.App)
	upPath := up.NarURLPath(t, c.App)
	// A slow upstream, so that all requests overlap with the one fetch.
	up.NarHook(t, c.App, func(w http.ResponseWriter, r *http.Request, orig []byte) {
		time.Sleep(300 * time.Millisecond)
		w.Header().Set("Content-Length", fmt.Sprint(len(orig)))
		w.WriteHeader(200)
		for off := 0; off < len(orig); off += 64 << 10 {
			w.Write(orig[off:min(off+64<<10, len(orig))])
			w.(http.Flusher).Flush()
			time.Sleep(5 * time.Millisecond)
		}
	})
	want := ni.Get("FileHash")
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make([]error, clients)
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			<-start
			resp, err := httpClient.Get(px.URL + narPath(ni))
			if err != nil {
				errs[i] = err
				return
			}
			defer resp.Body.Close()
			h := sha256.New()
			n, err := io.Copy(h, resp.Body)
			switch {
			case err != nil:
				errs[i] = fmt.Errorf("body after %d bytes: %v", n, err)
			case resp.StatusCode != 200:
				errs[i] = fmt.Errorf("status %d", resp.StatusCode)
			case "sha256:"+nix32(h.Sum(nil)) != want:
				errs[i] = fmt.Errorf("body (%d bytes) sha256 %s, narinfo FileHash %s", n, nix32(h.Sum(nil)), want)
			}
		}(i)
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("concurrent client %d: %v", i, err)
		}
	}
	if n := up.Count(upPath); n != 1 {
		t.Errorf("%d concurrent requests caused %d upstream fetches of the NAR, want exactly 1", clients, n)
	}
	up.SetHook(nil)
	cl := newClient(t)
	cl.MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
	assertSameTree(t, string(c.App), cl.Path(c.App))
}

// The client receives bytes while the upstream is still sending.
func TestNarIsStreamed(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{BigSize: 4 << 20})
	up := newUpstream(t, upKey)
	up.Publish(t, "none", c.App)
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	px.Attest(t, attestFile(t, rb1Key, c.Paths()...))
	ni := px.ExpectApproved(t, c.App)
	releaseFn := up.StallHalfway(t, c.App)
	resp, err := httpClient.Get(px.URL + narPath(ni))
	if err != nil {
		t.Fatalf("GET NAR: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET NAR: status %d", resp.StatusCode)
	}
	got := make(chan int, 1)
	var buf bytes.Buffer
	go func() {
		n, _ := io.CopyN(&buf, resp.Body, 1<<20)
		got <- int(n)
	}()
	select {
	case n := <-got:
		if n < 1<<20 {
			t.Fatalf("only %d bytes before the body ended", n)
		}
	case <-time.After(4 * time.Second):
		releaseFn()
		t.Fatalf("no 1 MiB reached the client within 4s while the upstream had sent 2 MiB and paused: the NAR is not streamed")
	}
	releaseFn()
	rest, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the rest: %v", err)
	}
	all := append(buf.Bytes(), rest...)
	if sha256Nix32(all) != ni.Get("FileHash") {
		t.Errorf("streamed body (%d bytes) does not match FileHash", len(all))
	}
}

// Past [cache] max_size blobs are evicted least-recently-used.
func TestCacheEviction(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upKey)
	c1 := buildClosure(t, ClosureOpts{BigSize: 700 << 10})
	c2 := buildClosure(t, ClosureOpts{BigSize: 700 << 10})
	up.Publish(t, "none", c1.App, c2.App)
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key},
		Extra: "[cache]\nmax_size = \"1MiB\"\n"})
	px.Attest(t, attestFile(t, rb1Key, append(c1.Paths(), c2.Paths()...)...))
	newClient(t).MustSubstitute(t, px.URL, px.GatekeeperKey, c1.App)
	newClient(t).MustSubstitute(t, px.URL, px.GatekeeperKey, c2.App)
	if v := px.MetricSum(t, "cacheproxy_cache_evictions_total", nil); v < 1 {
		t.Errorf("cacheproxy_cache_evictions_total = %v after caching 1.4 MiB under max_size 1MiB, want >= 1", v)
	}
	if v := px.MetricSum(t, "cacheproxy_cache_size_bytes", nil); v > 1<<20 {
		t.Errorf("cacheproxy_cache_size_bytes = %v, want <= 1 MiB", v)
	}
	n := up.Count(up.NarURLPath(t, c1.App))
	cl := newClient(t)
	cl.MustSubstitute(t, px.URL, px.GatekeeperKey, c1.App)
	assertSameTree(t, string(c1.App), cl.Path(c1.App))
	if up.Count(up.NarURLPath(t, c1.App)) != n+1 {
		t.Errorf("the least recently used NAR (c1's app) was not evicted: no re-fetch from upstream")
	}
}
