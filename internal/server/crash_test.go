package server

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Test 8: a failed download leaves nothing behind; a restart removes temp
// leftovers and unindexed blobs and drops index entries whose file is gone.
func TestCrashSafetyOnRestart(t *testing.T) {
	f := newFixture(t)
	kept := newObj(t, "kept-1", dirNAR(t, 20, 200<<10), "zstd")
	lost := newObj(t, "lost-1", dirNAR(t, 21, 200<<10), "zstd")
	broken := newObj(t, "broken-1", dirNAR(t, 22, 200<<10), "zstd")
	for _, o := range []*storeObj{kept, lost, broken} {
		f.up.publish(o)
		f.attest(o)
	}
	keptFile, lostFile := strings.TrimPrefix(f.narURL(kept), "/nar/"), strings.TrimPrefix(f.narURL(lost), "/nar/")
	for _, o := range []*storeObj{kept, lost} {
		if resp, body := f.mustGet(f.narURL(o)); resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
			t.Fatalf("%s: %d", o.storePath, resp.StatusCode)
		}
	}
	eventually(t, 5*time.Second, "two committed blobs", func() bool { return len(f.s.blobs.Names()) == 2 })

	// A failed download: nothing of it in blobs or tmp.
	f.up.handle("/"+broken.ni.URL, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(broken.file)))
		w.Write(broken.file[:len(broken.file)/3])
		cutConnection(w)
	})
	if resp, body, err := f.get(f.narURL(broken)); err == nil && resp.StatusCode == 200 {
		t.Fatalf("broken transfer delivered %d bytes cleanly", len(body))
	}
	if got := f.dirEntries("tmp"); len(got) != 0 {
		t.Errorf("temp files after a failed download: %v", got)
	}
	if got := f.dirEntries("blobs"); !slices.Equal(got, []string{keptFile, lostFile}) && !slices.Equal(got, []string{lostFile, keptFile}) {
		t.Errorf("blobs after a failed download: %v, want only %s and %s", got, keptFile, lostFile)
	}

	// Stop; simulate a crash's leftovers and a blob lost from disk.
	f.stop()
	state := f.cfg.StateDir
	plant := func(p string) {
		if err := os.WriteFile(p, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	plant(filepath.Join(state, "tmp", broken.hash+"-x.nar.zst.123456"))
	plant(filepath.Join(state, "blobs", broken.hash+"-unindexed.nar.zst"))
	if err := os.Remove(filepath.Join(state, "blobs", lostFile)); err != nil {
		t.Fatal(err)
	}

	f.start()
	if got := f.dirEntries("tmp"); len(got) != 0 {
		t.Errorf("temp leftovers survived a restart: %v", got)
	}
	if got := f.dirEntries("blobs"); !slices.Equal(got, []string{keptFile}) {
		t.Errorf("blobs after restart: %v, want only %s", got, keptFile)
	}
	if got := f.s.blobs.Names(); !slices.Equal(got, []string{keptFile}) {
		t.Errorf("blob index after restart: %v, want only %s", got, keptFile)
	}
	if m, err := f.s.blobs.Meta(lostFile); err != nil || m != nil {
		t.Errorf("index entry of a deleted blob survived: %+v %v", m, err)
	}
	if got, want := f.metric("cacheproxy_cache_size_bytes", ""), float64(len(kept.file)); got != want {
		t.Errorf("cache_size_bytes after restart = %v, want %v", got, want)
	}

	// The kept blob is a cache hit; the lost one is fetched again.
	keptReqs, lostReqs := f.up.count("/"+kept.ni.URL), f.up.count("/"+lost.ni.URL)
	for _, o := range []*storeObj{kept, lost} {
		if resp, body := f.mustGet(f.narURL(o)); resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
			t.Fatalf("%s after restart: %d, %d bytes", o.storePath, resp.StatusCode, len(body))
		}
	}
	if f.up.count("/"+kept.ni.URL) != keptReqs || f.up.count("/"+lost.ni.URL) != lostReqs+1 {
		t.Errorf("after restart: kept NAR fetched %d more times (want 0), lost NAR %d more (want 1)",
			f.up.count("/"+kept.ni.URL)-keptReqs, f.up.count("/"+lost.ni.URL)-lostReqs)
	}
}

// Close during a stalled download returns promptly, fails the client's
// transfer, and leaves no temp file.
func TestCloseDuringDownload(t *testing.T) {
	f := newFixture(t, withTimeout(time.Minute)) // only Close can end the stall
	o := newObj(t, "stall-1", dirNAR(t, 23, 400<<10), "zstd")
	f.up.publish(o)
	f.attest(o)
	narPath := f.narURL(o)
	f.up.handle("/"+o.ni.URL, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(o.file)))
		w.Write(o.file[:len(o.file)/2])
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	})
	resp, err := http.Get(f.url(narPath))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if _, err := io.ReadFull(resp.Body, make([]byte, 1000)); err != nil {
		t.Fatal(err)
	}
	closed := make(chan error, 1)
	go func() { closed <- f.s.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung on a stalled download")
	}
	f.s = nil
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Error("client got a clean end of a download cut by Close")
	}
	if got := f.dirEntries("tmp"); len(got) != 0 {
		t.Errorf("temp files after Close: %v", got)
	}
}
