package server

// Findings of the reliability review that had no test of their own: unsigned
// narinfo fields held in memory and the state DB, /log/ buffered whole, and
// closure walks that asked the upstream again for every reference.

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// attestAll imports rebuilder attestations for objs in one request
// (narinfo texts separated by blank lines), one state DB commit.
func (f *fixture) attestAll(objs ...*storeObj) {
	f.t.Helper()
	var b bytes.Buffer
	for _, o := range objs {
		a := *o
		a.ni.Extra = nil // a rebuilder's narinfo, not the upstream's
		b.Write(a.signed(f.rebuilder))
		b.WriteString("\n")
	}
	code, body := f.admin("POST", adminapi.PathAttestations, b.String())
	if code != 200 || !strings.Contains(body, fmt.Sprintf(`"stored": %d`, len(objs))) {
		f.t.Fatalf("attesting %d paths: %d %s", len(objs), code, body)
	}
}

// Unknown narinfo fields are covered by no signature: a multi-megabyte one
// is neither served nor stored, so narinfos of 8 paths with 1 MiB each
// leave the state DB small, and the stored narinfo served after a restart
// has none of it either.
func TestUnknownNarinfoFieldsDropped(t *testing.T) {
	f := newFixture(t)
	junk := strings.Repeat("j", 1<<20)
	var objs []*storeObj
	for i := 0; i < 8; i++ {
		o := newObj(t, fmt.Sprintf("fat-fields-%d", i), dirNAR(t, int64(300+i), 1<<10), "none")
		o.ni.Extra = []narinfo.Field{{Key: "X-Unsigned", Value: junk}, {Key: "Comment", Value: "fine"}}
		f.up.publish(o)
		if !bytes.Contains(o.upstreamNarInfo(f.up.key), []byte("X-Unsigned: jjj")) {
			t.Fatal("the harness did not put the unknown field in the upstream narinfo")
		}
		objs = append(objs, o)
	}
	f.attestAll(objs...)
	check := func(when string) {
		t.Helper()
		for _, o := range objs {
			resp, body := f.mustGet("/" + o.hash + ".narinfo")
			if resp.StatusCode != 200 {
				t.Fatalf("%s: narinfo of %s: %d %s", when, o.storePath, resp.StatusCode, body)
			}
			if len(body) > 4<<10 || bytes.Contains(body, []byte("X-Unsigned")) || bytes.Contains(body, []byte("Comment:")) {
				t.Fatalf("%s: the served narinfo of %s (%d bytes) carries the upstream's unknown fields", when, o.storePath, len(body))
			}
		}
	}
	check("first answer")
	f.stop()
	fi, err := os.Stat(filepath.Join(f.cfg.StateDir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() > 2<<20 {
		t.Errorf("state.db is %d bytes after storing 8 narinfos whose upstream copies carry 1 MiB of unknown fields each", fi.Size())
	}
	f.start()
	check("from the stored decisions after a restart")
}

// A build log is relayed as it arrives, never buffered whole: the client
// reads the first half while the upstream has not sent the second, and a log
// larger than any buffer (80 MiB) arrives complete.
func TestLogStreamed(t *testing.T) {
	f := newFixture(t)
	drv := storeHash("streamed-log") + "-x.drv"
	half := bytes.Repeat([]byte("first half of the log\n"), 1<<14)
	release := make(chan struct{})
	f.up.handle("/log/"+drv, func(w http.ResponseWriter, r *http.Request) {
		w.Write(half)
		w.(http.Flusher).Flush()
		select {
		case <-release:
			w.Write([]byte("the end\n"))
		case <-r.Context().Done():
		case <-time.After(30 * time.Second): // the test has failed by then
		}
	})
	resp, err := http.Get(f.url("/log/" + drv))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET /log/%s: %d", drv, resp.StatusCode)
	}
	got := make([]byte, len(half))
	if _, err := io.ReadFull(resp.Body, got); err != nil || !bytes.Equal(got, half) {
		t.Fatalf("reading the first half of the log before the upstream sent the rest: %v", err)
	}
	close(release)
	rest, err := io.ReadAll(resp.Body)
	if err != nil || string(rest) != "the end\n" {
		t.Fatalf("the rest of the log: %q %v", rest, err)
	}

	big := storeHash("big-log") + "-y.drv"
	line := []byte(strings.Repeat("l", 1023) + "\n")
	const lines = 80 << 10 // 80 MiB
	f.up.handle("/log/"+big, func(w http.ResponseWriter, r *http.Request) {
		for i := 0; i < lines; i++ {
			if _, err := w.Write(line); err != nil {
				return
			}
		}
	})
	resp, err = http.Get(f.url("/log/" + big))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil || resp.StatusCode != 200 || n != int64(lines*len(line)) {
		t.Fatalf("an 80 MiB log: %d, %d bytes, %v; want 200 with all %d bytes", resp.StatusCode, n, err, lines*len(line))
	}
}

// With require_closure, a closure walk reuses the stored decisions of
// references: a second path with the same 200 references costs one
// upstream request (its own narinfo), not 201, and asking again costs none.
func TestClosureWalkReusesReferences(t *testing.T) {
	f := newFixture(t, withRequireClosure)
	var refs []*storeObj
	for i := 0; i < 200; i++ {
		r := newObj(t, fmt.Sprintf("shared-ref-%d", i), dirNAR(t, int64(1000+i), 64), "none")
		f.up.publish(r)
		refs = append(refs, r)
	}
	first := closureObj(t, "walk-first", 2000, refs...)
	second := closureObj(t, "walk-second", 2001, refs...)
	f.up.publish(first)
	f.up.publish(second)
	f.attestAll(append(refs, first, second)...)
	before := f.up.total()
	f.expectDecision(first, 200, "approved")
	if n := f.up.total() - before; n != 201 {
		t.Errorf("the first closure walk took %d upstream requests, want 201 (itself and 200 references)", n)
	}
	before = f.up.total()
	f.expectDecision(second, 200, "approved")
	if n := f.up.total() - before; n != 1 {
		t.Errorf("a second path with the same references took %d upstream requests, want 1 (its own narinfo)", n)
	}
	before = f.up.total()
	for i := 0; i < 10; i++ {
		f.expectDecision(first, 200, "approved")
		f.expectDecision(second, 200, "approved")
	}
	if n := f.up.total() - before; n != 0 {
		t.Errorf("asking again for both took %d upstream requests, want 0", n)
	}
}

// An upstream that declares a 3 MiB NAR (no FileSize, no Content-Length)
// and then sends a file of 1 TiB: the download stops past the declared
// size, the client never gets a complete answer, and nothing stays on disk.
// A path whose NarSize is above cache.max_nar_size is refused before any
// NAR request (too_large).
func TestEndlessNarBounded(t *testing.T) {
	f := newFixture(t, func(c *config.Config) { c.Cache.MaxNarSize = 64 << 20 })
	o := newObj(t, "endless-1", dirNAR(t, 400, 1<<10), "none")
	o.ni.NarSize = 3 << 20
	o.ni.FileSize = 0
	o.ni.FileHash = narinfo.SHA256{}
	f.up.publish(o)
	f.attest(o)
	var sent atomic.Int64
	done := make(chan struct{})
	f.up.handle("/"+o.ni.URL, func(w http.ResponseWriter, r *http.Request) {
		defer close(done)
		head, _ := singleFileNAR(1 << 40)
		w.Write(head)
		chunk := make([]byte, 64<<10)
		for sent.Load() < 1<<30 { // 1 GiB at most, however the test goes
			n, err := w.Write(chunk)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	resp, body, err := f.get(f.narURL(o))
	if err == nil && resp.StatusCode == 200 {
		t.Fatalf("an endless NAR was served as a complete 200 of %d bytes", len(body))
	}
	select {
	case <-done:
	case <-time.After(60 * time.Second): // a hang guard, not a timing
		t.Fatalf("the proxy still reads the endless NAR (%d bytes so far)", sent.Load())
	}
	// What the kernel's socket buffers took is all that went past NarSize.
	t.Logf("the upstream got %d bytes of the endless NAR out before the proxy stopped", sent.Load())
	if n := sent.Load(); n > 3<<20+32<<20 {
		t.Errorf("the upstream sent %d bytes of a NAR declared as %d before the proxy stopped", n, 3<<20)
	}
	eventually(t, 10*time.Second, "no temp file or blob of the endless NAR", func() bool {
		return len(f.dirEntries("tmp")) == 0 && len(f.dirEntries("blobs")) == 0
	})

	huge := newObj(t, "too-large-1", dirNAR(t, 401, 1<<10), "none")
	huge.ni.NarSize = 1 << 30
	f.up.publish(huge)
	f.attest(huge)
	before := f.up.total()
	f.expectDecision(huge, 404, "rejected; reason=too_large")
	if resp, _ := f.mustGet(f.narURLFor(huge)); resp.StatusCode != 404 {
		t.Errorf("NAR of a too_large path: %d, want 404", resp.StatusCode)
	}
	if n := f.up.count("/" + huge.ni.URL); n != 0 {
		t.Errorf("a too_large path made %d NAR requests upstream", n)
	}
	t.Logf("upstream requests for the too_large path: %d (its narinfo)", f.up.total()-before)
}

// /healthz says 503, naming the check, once every upstream is down, and a
// narinfo request then is a 503 with Retry-After (never a 404).
func TestHealthzAllUpstreamsDown(t *testing.T) {
	f := newFixture(t)
	if resp, body := f.mustGet("/healthz?verbose"); resp.StatusCode != 200 || !strings.Contains(string(body), "upstreams: ok") {
		t.Fatalf("healthy: %d %s", resp.StatusCode, body)
	}
	f.up.srv.Close() // connections refused from now on
	for i := 0; i < 5; i++ {
		resp, body := f.mustGet("/" + storeHash(fmt.Sprintf("while-down-%d", i)) + ".narinfo")
		if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
			t.Fatalf("narinfo with the only upstream refusing connections: %d %q %s, want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"), body)
		}
	}
	resp, body := f.mustGet("/healthz?verbose")
	if resp.StatusCode != 503 || !strings.Contains(string(body), "upstreams: FAIL") {
		t.Fatalf("/healthz?verbose with every upstream down: %d\n%s\nwant 503 with \"upstreams: FAIL\"", resp.StatusCode, body)
	}
}
