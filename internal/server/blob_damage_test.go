package server

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A cached blob damaged on disk is never served as it is: a short one is
// caught by its size at open and fetched again; the scrub metric counts it.
func TestDamagedBlobRefetched(t *testing.T) {
	f := newFixture(t)
	o := newObj(t, "damaged-blob-1", dirNAR(t, 91, 200<<10), "zstd")
	f.up.publish(o)
	f.attest(o)
	nar := f.narURL(o)
	if resp, body := f.mustGet(nar); resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
		t.Fatalf("first fetch: %d, %d bytes", resp.StatusCode, len(body))
	}
	blob := filepath.Join(f.cfg.StateDir, "blobs", strings.TrimPrefix(nar, "/nar/"))
	if err := os.Truncate(blob, int64(len(o.file)/2)); err != nil {
		t.Fatal(err)
	}
	before := f.up.count("/" + o.ni.URL)
	resp, body := f.mustGet(nar)
	if resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
		t.Fatalf("after damage: %d, %d bytes of %d", resp.StatusCode, len(body), len(o.file))
	}
	if n := f.up.count("/"+o.ni.URL) - before; n != 1 {
		t.Errorf("the damaged blob was fetched again %d times, want 1", n)
	}
	if v := f.metric("cacheproxy_cache_scrub_failures_total", ""); v != 1 {
		t.Errorf("cacheproxy_cache_scrub_failures_total = %v, want 1", v)
	}
}
