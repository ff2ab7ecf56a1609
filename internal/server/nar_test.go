package server

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nar"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/narstream"
)

// gatedNar makes the upstream send the first `first` bytes of body, then
// wait for the returned gate to close, then trickle the rest in small
// chunks.
func gatedNar(f *fixture, o *storeObj, first int) (gate chan struct{}) {
	gate = make(chan struct{})
	body := o.file
	f.up.handle("/"+o.ni.URL, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body[:first])
		w.(http.Flusher).Flush()
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
		for off := first; off < len(body); off += 16 << 10 {
			w.Write(body[off:min(off+16<<10, len(body))])
			w.(http.Flusher).Flush()
			time.Sleep(2 * time.Millisecond)
		}
	})
	return gate
}

func waitGroupTimeout(t *testing.T, wg *sync.WaitGroup, d time.Duration, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("timed out after %s waiting for %s", d, what)
	}
}

// Test 1: N clients of one uncached NAR share one upstream download, all
// get the complete verified bytes; afterwards the blob is served from the
// cache, with Range.
func TestNarFollowersShareOneDownload(t *testing.T) {
	f := newFixture(t)
	o := newObj(t, "hello-2.12", dirNAR(t, 1, 600<<10), "zstd")
	f.up.publish(o)
	f.attest(o)
	upNar := "/" + o.ni.URL
	upInfo := "/" + o.hash + ".narinfo"

	// Concurrent narinfo requests: one upstream round.
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, _, err := f.get(upInfo)
			if err != nil || resp.StatusCode != 200 {
				t.Errorf("narinfo: %v %v", resp, err)
			}
		}()
	}
	wg.Wait()
	if n := f.up.count(upInfo); n != 1 {
		t.Errorf("10 concurrent narinfo requests made %d upstream requests, want 1", n)
	}
	narPath := f.narURL(o)

	// HEAD of an uncached NAR announces its size without fetching it.
	resp, err := http.Head(f.url(narPath))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.ContentLength != int64(len(o.file)) {
		t.Errorf("HEAD %s: %d, Content-Length %d, want 200, %d", narPath, resp.StatusCode, resp.ContentLength, len(o.file))
	}
	if n := f.up.count(upNar); n != 0 {
		t.Errorf("HEAD fetched the NAR from upstream (%d requests)", n)
	}

	// Every client must have received bytes before the upstream sends the
	// rest: so all of them are attached to the one running download.
	const clients = 20
	gate := gatedNar(f, o, 2*narstream.Holdback)
	var gotFirst sync.WaitGroup
	gotFirst.Add(clients)
	bodies := make([][]byte, clients)
	wg = sync.WaitGroup{}
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			signalled := false
			defer func() {
				if !signalled {
					gotFirst.Done()
				}
			}()
			resp, err := http.Get(f.url(narPath))
			if err != nil {
				t.Errorf("client %d: %v", i, err)
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 || resp.ContentLength != int64(len(o.file)) {
				t.Errorf("client %d: status %d, Content-Length %d, want 200, %d", i, resp.StatusCode, resp.ContentLength, len(o.file))
			}
			first := make([]byte, 1)
			if _, err := io.ReadFull(resp.Body, first); err != nil {
				t.Errorf("client %d: first byte: %v", i, err)
				return
			}
			signalled = true
			gotFirst.Done()
			rest, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Errorf("client %d: body: %v", i, err)
			}
			bodies[i] = append(first, rest...)
		}()
	}
	waitGroupTimeout(t, &gotFirst, 20*time.Second, "every client to receive its first bytes")
	close(gate)
	waitGroupTimeout(t, &wg, 30*time.Second, "every client to finish")

	want := sha256.Sum256(o.file)
	for i, b := range bodies {
		if sha256.Sum256(b) != want || len(b) != len(o.file) {
			t.Errorf("client %d: got %d bytes, sha256 differs from the NAR file (%d bytes)", i, len(b), len(o.file))
		}
	}
	if n := f.up.count(upNar); n != 1 {
		t.Fatalf("%d clients made %d upstream NAR requests, want 1", clients, n)
	}
	eventually(t, 5*time.Second, "served_bytes{source=upstream} to count every client", func() bool {
		return f.metric("cacheproxy_served_bytes_total", `source="upstream"`) == float64(clients*len(o.file))
	})
	if got := f.dirEntries("tmp"); len(got) != 0 {
		t.Errorf("temp files left after a verified download: %v", got)
	}

	// A 21st request is a cache hit.
	hits := f.metric("cacheproxy_cache_hits_total", `kind="nar"`)
	resp, body := f.mustGet(narPath)
	if resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
		t.Errorf("cached NAR: status %d, %d bytes, want 200 and the NAR file", resp.StatusCode, len(body))
	}
	if h := f.metric("cacheproxy_cache_hits_total", `kind="nar"`); h != hits+1 {
		t.Errorf("cache_hits_total{kind=nar} went %v -> %v, want +1", hits, h)
	}
	if n := f.up.count(upNar); n != 1 {
		t.Errorf("cache hit went upstream (%d NAR requests)", n)
	}

	// Range on the cached blob.
	for _, tc := range []struct {
		rng        string
		start, end int // end exclusive
	}{
		{"bytes=1000-1999", 1000, 2000},
		{"bytes=0-0", 0, 1},
		{"bytes=-100", len(o.file) - 100, len(o.file)},
		{"bytes=" + strconv.Itoa(len(o.file)-5) + "-", len(o.file) - 5, len(o.file)},
	} {
		resp, body := f.mustGet(narPath, "Range", tc.rng)
		if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(body, o.file[tc.start:tc.end]) {
			t.Errorf("Range %s: status %d, %d bytes; want 206 and bytes [%d,%d)", tc.rng, resp.StatusCode, len(body), tc.start, tc.end)
		}
	}
	if resp, _ := f.mustGet(narPath, "Range", "bytes="+strconv.Itoa(len(o.file)+10)+"-"); resp.StatusCode != http.StatusRequestedRangeNotSatisfiable {
		t.Errorf("unsatisfiable Range: status %d, want 416", resp.StatusCode)
	}
	if n := f.up.count(upNar); n != 1 {
		t.Errorf("Range requests went upstream (%d NAR requests)", n)
	}
}

// A client that gives up mid-transfer must not abort the download that
// other clients (and the cache) are waiting for.
func TestNarClientDisconnectDoesNotAbortDownload(t *testing.T) {
	f := newFixture(t)
	o := newObj(t, "disconnect-1", dirNAR(t, 7, 400<<10), "zstd")
	f.up.publish(o)
	f.attest(o)
	narPath := f.narURL(o)
	gate := gatedNar(f, o, 2*narstream.Holdback)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", f.url(narPath), nil)
	quitter, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(quitter.Body, make([]byte, 100)); err != nil {
		t.Fatal(err)
	}

	stayer, err := http.Get(f.url(narPath))
	if err != nil {
		t.Fatal(err)
	}
	defer stayer.Body.Close()
	first := make([]byte, 100)
	if _, err := io.ReadFull(stayer.Body, first); err != nil {
		t.Fatal(err)
	}
	cancel() // the first client hangs up while the download runs
	quitter.Body.Close()
	time.Sleep(50 * time.Millisecond)
	close(gate)

	rest, err := io.ReadAll(stayer.Body)
	if err != nil {
		t.Fatalf("remaining client: %v", err)
	}
	if !bytes.Equal(append(first, rest...), o.file) {
		t.Fatal("remaining client got the wrong bytes")
	}
	eventually(t, 5*time.Second, "the blob to be committed", func() bool { return len(f.s.blobs.Names()) == 1 })
	if n := f.up.count("/" + o.ni.URL); n != 1 {
		t.Errorf("%d upstream NAR requests, want 1", n)
	}
}

// holdBackRun starts a client on narPath while the upstream sends all of
// body but its last 10 bytes and then waits; it checks that the client got
// exactly what hold-back allows and never the end, then lets the upstream
// send tail and returns what the client finally got.
func holdBackRun(t *testing.T, f *fixture, o *storeObj, narPath string, body, tail []byte) ([]byte, error) {
	return holdBackRunCL(t, f, o, narPath, body, tail, int64(len(body)))
}

// holdBackRunCL is holdBackRun for a response whose Content-Length is
// wantCL (-1: none, when the narinfo gives no FileSize for a compressed NAR).
func holdBackRunCL(t *testing.T, f *fixture, o *storeObj, narPath string, body, tail []byte, wantCL int64) ([]byte, error) {
	t.Helper()
	if len(body) <= 4*narstream.Holdback {
		t.Fatalf("NAR file of %d bytes is too small for a hold-back test", len(body))
	}
	release := make(chan struct{})
	f.up.handle("/"+o.ni.URL, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body[:len(body)-len(tail)])
		w.(http.Flusher).Flush()
		select {
		case <-release:
			w.Write(tail)
		case <-r.Context().Done():
		}
	})

	var received atomic.Int64
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := http.Get(f.url(narPath))
		if err != nil {
			done <- result{err: err}
			return
		}
		defer resp.Body.Close()
		if resp.ContentLength != wantCL {
			t.Errorf("Content-Length %d, want %d", resp.ContentLength, wantCL)
		}
		var buf bytes.Buffer
		chunk := make([]byte, 8<<10)
		for {
			n, err := resp.Body.Read(chunk)
			buf.Write(chunk[:n])
			received.Add(int64(n))
			if err == io.EOF {
				done <- result{b: buf.Bytes()}
				return
			}
			if err != nil {
				done <- result{b: buf.Bytes(), err: err}
				return
			}
		}
	}()

	sent := int64(len(body) - len(tail))
	wantHeld := sent - narstream.Holdback
	eventually(t, 10*time.Second, "the client to receive the bytes hold-back releases", func() bool {
		return received.Load() >= wantHeld
	})
	time.Sleep(200 * time.Millisecond) // anything more would arrive now
	if got := received.Load(); got > int64(len(body))-narstream.Holdback || got != wantHeld {
		t.Errorf("while the upstream withholds its last %d bytes, the client has %d of %d bytes; want exactly %d (at most size-64KiB)",
			len(tail), got, len(body), wantHeld)
	}
	select {
	case r := <-done:
		t.Fatalf("client finished before the upstream sent the last bytes: %d bytes, err %v", len(r.b), r.err)
	default:
	}
	close(release)
	select {
	case r := <-done:
		return r.b, r.err
	case <-time.After(20 * time.Second):
		t.Fatal("client never finished")
		return nil, nil
	}
}

// Test 2a: the last bytes are held back until verified; then they come.
func TestNarHoldBackReleasedWhenVerified(t *testing.T) {
	f := newFixture(t)
	o := newObj(t, "holdback-ok", dirNAR(t, 2, 400<<10), "none")
	o.ni.FileHash, o.ni.FileSize = narinfo.SHA256{}, 0
	f.up.publish(o)
	f.attest(o)
	narPath := f.narURL(o)
	got, err := holdBackRun(t, f, o, narPath, o.file, o.file[len(o.file)-10:])
	if err != nil || !bytes.Equal(got, o.file) {
		t.Fatalf("after release: %d of %d bytes, err %v; want the complete NAR", len(got), len(o.file), err)
	}
	eventually(t, 5*time.Second, "the blob to be committed", func() bool { return len(f.dirEntries("blobs")) == 1 })
}

// Test 2b: a tail that makes NarHash disagree: the client never gets a
// complete body, the path is quarantined as nar_mismatch, nothing is kept,
// and retry lifts the quarantine.
func TestNarTamperedTailQuarantines(t *testing.T) {
	for _, tc := range []struct {
		name, compression string
	}{
		// "none" without FileHash: only NarHash can notice.
		{"none", "none"},
		// zstd with FileHash/FileSize fixed up to the tampered file (an
		// upstream that re-signed): the compressed checks pass, NarHash fails.
		{"zstd-resigned", "zstd"},
		// zstd without FileHash/FileSize: no Content-Length to the client,
		// so only the aborted chunked encoding tells it the body is bad.
		{"zstd-no-filesize", "zstd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			narBytes := dirNAR(t, 3, 400<<10)
			o := newObj(t, "tampered-"+tc.name, narBytes, tc.compression)
			var served []byte
			switch tc.compression {
			case "none":
				o.ni.FileHash, o.ni.FileSize = narinfo.SHA256{}, 0
				served = bytes.Clone(o.file)
				for i := len(served) - 10; i < len(served); i++ {
					served[i] ^= 0x5a
				}
			case "zstd":
				bad := bytes.Clone(narBytes)
				bad[len(bad)/2] ^= 1 // inside /data's contents: still a valid NAR
				enc, _ := zstd.NewWriter(nil)
				served = enc.EncodeAll(bad, nil)
				enc.Close()
				o.ni.FileHash, o.ni.FileSize = sha256Str(served), uint64(len(served))
				if tc.name == "zstd-no-filesize" {
					o.ni.FileHash, o.ni.FileSize = narinfo.SHA256{}, 0
				}
			}
			f.up.publish(o)
			f.attest(o)
			narPath := f.narURL(o)

			wantCL := int64(len(served))
			if o.ni.Compression != "none" && o.ni.FileSize == 0 {
				wantCL = -1
			}
			got, err := holdBackRunCL(t, f, o, narPath, served, served[len(served)-10:], wantCL)
			if err == nil || len(got) >= len(served) {
				t.Fatalf("tampered NAR: client got %d of %d bytes with err %v; want an incomplete transfer", len(got), len(served), err)
			}

			// Immediately after the client saw the failure, the path is
			// quarantined (a Nix client retries at once).
			resp, body := f.mustGet("/" + o.hash + ".narinfo")
			if resp.StatusCode != 404 || resp.Header.Get("X-Cacheproxy-Decision") != "rejected; reason=nar_mismatch" {
				t.Errorf("narinfo after a NAR mismatch: %d %q (%s); want 404 with rejected; reason=nar_mismatch",
					resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"), strings.TrimSpace(string(body)))
			}
			if v := f.metric("cacheproxy_nar_verification_failures_total", `check="nar_hash"`); v != 1 {
				t.Errorf(`nar_verification_failures_total{check="nar_hash"} = %v, want 1`, v)
			}
			if v := f.metric("cacheproxy_nar_verification_failures_total", `check="truncated"`); v != 0 {
				t.Errorf(`a mismatch was also counted as truncated (%v)`, v)
			}
			f.assertNoBlobsOrTemps()
			// explain shows all the evidence of a quarantined path (its
			// valid attestation too), then the rule that won.
			code, out := f.admin("GET", adminapi.PathExplain+o.hash, "")
			var ex adminapi.Explain
			if err := json.Unmarshal([]byte(out), &ex); code != 200 || err != nil || ex.Decision == nil ||
				ex.Decision.Reason != "nar_mismatch" || ex.Decision.Quarantine == nil || ex.Decision.Quarantine.Check != "nar_hash" ||
				len(ex.Decision.Attesters) != 1 || ex.Decision.Attesters[0] != f.rebuilder.Name {
				t.Errorf("explain of a quarantined, attested path: %d %s", code, out)
			}
			// The NAR itself is refused too, and does not reach upstream.
			before := f.up.count("/" + o.ni.URL)
			if resp, _, _ := f.get(narPath); resp == nil || resp.StatusCode != 404 {
				t.Errorf("NAR of a quarantined path: %v, want 404", resp)
			}
			if n := f.up.count("/" + o.ni.URL); n != before {
				t.Errorf("NAR of a quarantined path reached upstream")
			}

			// The upstream is fixed; an operator lifts the quarantine.
			f.up.handle("/"+o.ni.URL, nil)
			if tc.compression == "zstd" { // the honest narinfo
				o = newObj(t, "tampered-"+tc.name, narBytes, tc.compression)
				f.up.publish(o)
			}
			code, out = f.admin("POST", adminapi.PathRetry, jsonBody(adminapi.PathsRequest{Paths: []string{o.storePath}}))
			if code != 200 || !strings.Contains(out, o.hash) {
				t.Fatalf("retry: %d %s", code, out)
			}
			narPath = f.narURL(o)
			resp, body = f.mustGet(narPath)
			if resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
				t.Fatalf("after retry: %d, %d bytes", resp.StatusCode, len(body))
			}
		})
	}
}

// Test 3: an upstream that breaks the connection after half the declared
// Content-Length: a broken transfer, counted as truncated, not quarantined.
// Likewise an upstream that stalls past its timeout.
func TestNarTruncatedNotQuarantined(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault func(body []byte) http.HandlerFunc
	}{
		{"connection-cut", func(body []byte) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				w.Write(body[:len(body)/2])
				cutConnection(w)
			}
		}},
		{"stalled", func(body []byte) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", strconv.Itoa(len(body)))
				w.Write(body[:len(body)/2])
				w.(http.Flusher).Flush()
				<-r.Context().Done() // until the proxy's idle timeout gives up
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, withTimeout(500*time.Millisecond))
			o := newObj(t, "trunc-"+tc.name, dirNAR(t, 4, 512<<10), "zstd")
			f.up.publish(o)
			f.attest(o)
			narPath := f.narURL(o)
			f.up.handle("/"+o.ni.URL, tc.fault(o.file))

			resp, body, err := f.get(narPath)
			switch {
			case err != nil:
				// The broken transfer the client must see (unexpected EOF
				// against Content-Length).
				if !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Logf("client error: %v", err)
				}
			case resp.StatusCode == 200:
				t.Fatalf("a truncated upstream transfer reached the client as a clean 200 of %d/%d bytes", len(body), len(o.file))
			case resp.StatusCode != http.StatusBadGateway:
				// Failing before any byte was released: a 5xx is fine.
				t.Errorf("broken transfer before the first byte: status %d, want 502", resp.StatusCode)
			}
			if v := f.metric("cacheproxy_nar_verification_failures_total", `check="truncated"`); v != 1 {
				t.Errorf(`failures{check="truncated"} = %v, want 1`, v)
			}
			for _, c := range []string{"nar_hash", "nar_size", "file_hash", "file_size", "decompress"} {
				if v := f.metric("cacheproxy_nar_verification_failures_total", `check="`+c+`"`); v != 0 {
					t.Errorf(`a broken transfer counted as failures{check=%q} = %v`, c, v)
				}
			}
			f.assertNoBlobsOrTemps()
			resp, _ = f.mustGet("/" + o.hash + ".narinfo")
			if resp.StatusCode != 200 || resp.Header.Get("X-Cacheproxy-Decision") != "approved; reason=attested" {
				t.Fatalf("narinfo after a broken transfer: %d %q; want 200, still approved", resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"))
			}

			// The network heals: the next request fetches, verifies, caches.
			f.up.handle("/"+o.ni.URL, nil)
			resp, body = f.mustGet(narPath)
			if resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
				t.Fatalf("after the upstream healed: %d, %d bytes", resp.StatusCode, len(body))
			}
			eventually(t, 5*time.Second, "the blob to be committed", func() bool { return len(f.s.blobs.Names()) == 1 })
			resp, body = f.mustGet(narPath)
			if resp.StatusCode != 200 || !bytes.Equal(body, o.file) || f.up.count("/"+o.ni.URL) != 2 {
				t.Fatalf("cached NAR: %d, %d bytes, %d upstream requests (want 2)", resp.StatusCode, len(body), f.up.count("/"+o.ni.URL))
			}
		})
	}
}

// The hand-built single-file NAR framing used by the big-NAR test is the
// one go-nix writes.
func TestSingleFileNARFraming(t *testing.T) {
	for _, size := range []int{0, 1, 7, 8, 9, 1000} {
		data := bytes.Repeat([]byte{'x'}, size)
		var buf bytes.Buffer
		nw, _ := nar.NewWriter(&buf)
		if err := nw.WriteHeader(&nar.Header{Path: "/", Type: nar.TypeRegular, Size: int64(size)}); err != nil {
			t.Fatal(err)
		}
		nw.Write(data)
		if err := nw.Close(); err != nil {
			t.Fatal(err)
		}
		head, tail := singleFileNAR(int64(size))
		if got := append(append(head, data...), tail...); !bytes.Equal(got, buf.Bytes()) {
			t.Fatalf("size %d: hand-built NAR differs from go-nix's", size)
		}
	}
}

// A client that stops reading neither slows the download nor the other
// clients: the writer never waits for readers.
func TestNarStalledClientDoesNotBlockOthers(t *testing.T) {
	f := newFixture(t)
	o := newObj(t, "stalled-reader-1", dirNAR(t, 8, 24<<20), "none") // far more than socket buffers hold
	f.up.publish(o)
	f.attest(o)
	narPath := f.narURL(o)

	stuck, err := http.Get(f.url(narPath)) // reads one byte, then nothing
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Body.Close()
	if _, err := io.ReadFull(stuck.Body, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}

	done := make(chan error, 1)
	go func() {
		resp, body, err := f.get(narPath)
		if err == nil && (resp.StatusCode != 200 || !bytes.Equal(body, o.file)) {
			err = errors.New("wrong status or bytes")
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("second client: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a client that stopped reading blocked another client")
	}
	eventually(t, 10*time.Second, "the blob to be committed while a client is stuck", func() bool {
		return len(f.s.blobs.Names()) == 1
	})
	if n := f.up.count("/" + o.ni.URL); n != 1 {
		t.Errorf("%d upstream NAR requests, want 1", n)
	}
	// The stuck client, once it reads again, still gets everything.
	rest, err := io.ReadAll(stuck.Body)
	if err != nil || len(rest)+1 != len(o.file) {
		t.Errorf("stuck client resumed: %d more bytes, err %v; want the remaining %d", len(rest), err, len(o.file)-1)
	}
}

// Blobs past cache.max_size are evicted least recently used (not first
// in); a client being served a blob while it is evicted is unaffected, and
// the next request fetches it again.
func TestNarEviction(t *testing.T) {
	f := newFixture(t, func(c *config.Config) { c.Cache.MaxSize = 700 << 10 }) // room for two
	var objs []*storeObj
	var files []string
	for i := range 3 {
		o := newObj(t, "evict-"+strconv.Itoa(i), dirNAR(t, int64(30+i), 300<<10), "none")
		f.up.publish(o)
		f.attest(o)
		objs = append(objs, o)
		files = append(files, strings.TrimPrefix(f.narURL(o), "/nar/"))
	}
	fetch := func(i int) {
		t.Helper()
		time.Sleep(5 * time.Millisecond) // distinct last-used times
		o := objs[i]
		if resp, body := f.mustGet("/nar/" + files[i]); resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
			t.Fatalf("%s: %d, %d bytes", o.storePath, resp.StatusCode, len(body))
		}
		eventually(t, 5*time.Second, "the blob of "+o.storePath, func() bool {
			m, _ := f.s.blobs.Meta(files[i])
			return m != nil
		})
	}
	cached := func(want ...int) {
		t.Helper()
		var names []string
		for _, i := range want {
			names = append(names, files[i])
		}
		slices.Sort(names)
		if got := f.s.blobs.Names(); !slices.Equal(got, names) {
			t.Errorf("cached blobs %v, want %v", got, names)
		}
		if f.s.blobs.Size() > 700<<10 {
			t.Errorf("blob store holds %d bytes, over max_size", f.s.blobs.Size())
		}
		if got := f.metric("cacheproxy_cache_size_bytes", ""); got != float64(f.s.blobs.Size()) {
			t.Errorf("cache_size_bytes = %v, blob store holds %d", got, f.s.blobs.Size())
		}
	}

	fetch(0)
	fetch(1)
	fetch(0) // hit: 1 is now the least recently used, though 0 came first
	fetch(2)
	cached(0, 2)

	// A client starts reading 0, which makes it the most recent...
	time.Sleep(5 * time.Millisecond)
	reader, err := http.Get(f.url("/nar/" + files[0]))
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Body.Close()
	head := make([]byte, 10)
	if _, err := io.ReadFull(reader.Body, head); err != nil {
		t.Fatal(err)
	}
	fetch(1) // evicts 2
	cached(0, 1)
	fetch(1) // hit: 0 is the least recently used...
	fetch(2) // ...and is evicted while the client reads it
	cached(1, 2)
	// Evictions are counted once the evicting download has handed out its
	// last bytes, which may be just after the client has them.
	eventually(t, 5*time.Second, "cache_evictions_total = 3", func() bool {
		return f.metric("cacheproxy_cache_evictions_total", "") == 3
	})
	rest, err := io.ReadAll(reader.Body)
	if err != nil || !bytes.Equal(append(head, rest...), objs[0].file) {
		t.Errorf("client reading a blob while it was evicted: %d bytes, err %v", len(head)+len(rest), err)
	}
	for i, want := range []int{1, 2, 2} {
		if got := f.up.count("/" + objs[i].ni.URL); got != want {
			t.Errorf("NAR %d fetched from upstream %d times, want %d", i, got, want)
		}
	}
	fetch(0) // evicted: fetched again
	if got := f.up.count("/" + objs[0].ni.URL); got != 2 {
		t.Errorf("evicted NAR 0 fetched %d times in all, want 2", got)
	}
}

// Each upstream fault lands in its own class: transient failures are
// counted and retried, bad data is counted under its check and quarantined.
func TestNarUpstreamFaultsClassified(t *testing.T) {
	for _, tc := range []struct {
		name       string
		fileHash   bool // keep FileHash in the narinfo
		compress   string
		fault      func(o *storeObj) http.HandlerFunc
		check      string // failure counted, "" for none
		quarantine bool
	}{
		{"nar-503", true, "zstd", func(o *storeObj) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) { http.Error(w, "busy", 503) }
		}, "", false},
		{"undecodable", false, "zstd", func(o *storeObj) http.HandlerFunc {
			garbage := bytes.Repeat([]byte{0xa5}, len(o.file))
			return func(w http.ResponseWriter, r *http.Request) { w.Write(garbage) }
		}, "decompress", true},
		{"longer-than-filesize", true, "zstd", func(o *storeObj) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				w.Write(append(bytes.Clone(o.file), make([]byte, 100)...))
			}
		}, "file_size", true},
		// (a flipped byte inside a zstd frame is a decompress failure; with
		// "none" FileHash is checked before NarHash)
		{"file-hash", true, "none", func(o *storeObj) http.HandlerFunc {
			bad := bytes.Clone(o.file)
			bad[len(bad)/2] ^= 1
			return func(w http.ResponseWriter, r *http.Request) { w.Write(bad) }
		}, "file_hash", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t)
			o := newObj(t, "fault-"+tc.name, dirNAR(t, 40, 200<<10), tc.compress)
			if !tc.fileHash {
				o.ni.FileHash = narinfo.SHA256{}
			}
			f.up.publish(o)
			f.attest(o)
			narPath := f.narURL(o)
			f.up.handle("/"+o.ni.URL, tc.fault(o))

			resp, body, err := f.get(narPath)
			if err == nil && resp.StatusCode == 200 {
				t.Fatalf("faulty upstream: client got a clean 200 with %d bytes", len(body))
			}
			if err == nil && resp.StatusCode == http.StatusBadGateway && resp.Header.Get("Retry-After") == "" {
				t.Errorf("502 without Retry-After")
			}
			for _, c := range []string{"nar_hash", "nar_size", "file_hash", "file_size", "decompress", "truncated"} {
				want := 0.0
				if c == tc.check {
					want = 1
				}
				if v := f.metric("cacheproxy_nar_verification_failures_total", `check="`+c+`"`); v != want {
					t.Errorf(`failures{check=%q} = %v, want %v`, c, v, want)
				}
			}
			f.assertNoBlobsOrTemps()
			resp, _ = f.mustGet("/" + o.hash + ".narinfo")
			quarantined := resp.StatusCode == 404 && resp.Header.Get("X-Cacheproxy-Decision") == "rejected; reason=nar_mismatch"
			if quarantined != tc.quarantine || (!quarantined && resp.StatusCode != 200) {
				t.Errorf("narinfo after the fault: %d %q; want quarantined=%v", resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"), tc.quarantine)
			}
		})
	}
}
