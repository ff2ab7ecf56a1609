package server

import (
	"bytes"
	"slices"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/config"
)

// Reload adds an upstream while serving, keeps the client of an upstream
// configured the same, names the keys that need a restart, and refuses
// nothing it can apply.
func TestReload(t *testing.T) {
	f := newFixture(t)
	second := newFakeUpstream(t, "second-1")
	o := newObj(t, "reload-1", dirNAR(t, 21, 1000), "zstd")
	second.publish(o)
	f.attest(o)
	info := "/" + o.hash + ".narinfo"
	if resp, _ := f.mustGet(info); resp.StatusCode != 404 {
		t.Fatalf("before the reload: %d, want 404 (no configured upstream has it)", resp.StatusCode)
	}
	firstClient := f.s.running[0].client

	next := f.cfg
	next.Upstreams = append(slices.Clone(f.cfg.Upstreams), config.Upstream{URL: second.srv.URL,
		PublicKeys: []config.PublicKey{config.Key(second.key.Public())}, Timeout: config.Duration{Duration: 2 * time.Second}, MaxConnections: 4})
	res, err := f.s.Reload(next)
	if err != nil || !res.DecisionsChanged || len(res.NeedRestart) != 0 {
		t.Fatalf("Reload adding an upstream: %+v, %v", res, err)
	}
	if f.s.running[0].client != firstClient {
		t.Error("the unchanged upstream got a new client")
	}
	resp, body := f.mustGet(f.narURL(o))
	if resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
		t.Fatalf("NAR through the added upstream: %d, %d bytes", resp.StatusCode, len(body))
	}

	// Keys a running server cannot change are named and keep their value;
	// with no decision setting changed, nothing is decided again.
	later := next
	later.Listen = "127.0.0.1:1"
	later.StoreDir = "/other/store"
	later.Cache.ScrubPeriod = config.Duration{Duration: 48 * time.Hour}
	later.Cache.NegativeTTL = config.Duration{Duration: time.Second}
	res, err = f.s.Reload(later)
	if err != nil || res.DecisionsChanged {
		t.Fatalf("Reload of restart-only keys: %+v, %v", res, err)
	}
	if want := []string{"listen", "store_dir", "cache.scrub_period"}; !slices.Equal(res.NeedRestart, want) {
		t.Errorf("NeedRestart %v, want %v", res.NeedRestart, want)
	}
	before := second.total()
	if resp, _ := f.mustGet(info); resp.StatusCode != 200 {
		t.Fatalf("after a reload that changes no decision: %d", resp.StatusCode)
	}
	if n := second.total() - before; n != 0 {
		t.Errorf("%d upstream requests after a reload that changes no decision, want 0", n)
	}
}
