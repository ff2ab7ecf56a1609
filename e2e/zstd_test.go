package e2e

import (
	"bytes"
	"io"
	"strconv"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// serve_compression = "zstd" with the real Nix client: a closure published
// as xz is substituted through the proxy, which recodes each NAR on its
// first download; from then on the narinfos name zstd files (FileHash and
// FileSize of what is served, signatures still valid) that Nix substitutes
// from the proxy's cache. A fleet machine that cached the xz narinfos
// before serve_compression was switched on still substitutes the closure.
func TestServeZstdToNix(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{BigSize: 512 << 10})
	up := newUpstream(t, upKey)
	up.Publish(t, "xz", c.App)
	cfg := ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}}
	px := startProxy(t, cfg)
	px.Attest(t, attestFile(t, rb1Key, c.Paths()...))

	// A fleet machine looks the closure up while the proxy serves xz.
	old, oldURLs := warmFleetClient(t, px, c.Paths()...)
	for p, u := range oldURLs {
		if !strings.HasSuffix(u, ".nar.xz") {
			t.Fatalf("before the switch the narinfo of %s names %s, want the upstream's .nar.xz", p.Name(), u)
		}
	}

	cfg.ServeCompression = "zstd"
	px.RestartWith(t, cfg)

	// The first machine after the switch: the NARs are fetched, verified
	// and recoded on the way.
	first := newClient(t)
	first.MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
	for _, p := range c.Paths() {
		assertSameTree(t, string(p), first.Path(p))
	}
	fetched := up.NarCount()
	for _, p := range c.Paths() {
		ni := px.ExpectApproved(t, p) // checks the gatekeeper signature too
		upNi := up.Narinfo(t, p)
		if ni.Get("Compression") != "zstd" || !strings.HasSuffix(ni.Get("URL"), ".nar.zst") {
			t.Fatalf("after the first download the narinfo of %s says Compression %q, URL %q; want zstd", p.Name(), ni.Get("Compression"), ni.Get("URL"))
		}
		if ni.Get("NarHash") != upNi.Get("NarHash") || ni.Get("NarSize") != upNi.Get("NarSize") {
			t.Fatalf("the recoded narinfo of %s changed the NAR", p.Name())
		}
		resp, body, err := px.Get(t, "/"+ni.Get("URL"))
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s: %v %v", ni.Get("URL"), resp, err)
		}
		if sha256Nix32(body) != ni.Get("FileHash") || strconv.Itoa(len(body)) != ni.Get("FileSize") {
			t.Fatalf("%s: served %d bytes hashing to %s; narinfo says FileSize %s, FileHash %s",
				ni.Get("URL"), len(body), sha256Nix32(body), ni.Get("FileSize"), ni.Get("FileHash"))
		}
		dec, err := zstd.NewReader(bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		nar, err := io.ReadAll(dec)
		dec.Close()
		if err != nil || sha256Nix32(nar) != ni.Get("NarHash") {
			t.Fatalf("%s does not decode to the NAR (%v)", ni.Get("URL"), err)
		}
	}

	// The next machine gets zstd from the proxy's cache.
	second := newClient(t)
	second.MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
	for _, p := range c.Paths() {
		assertSameTree(t, string(p), second.Path(p))
	}
	if n := up.NarCount(); n != fetched {
		t.Fatalf("the upstream served %d NARs more for a machine that got the recoded ones", n-fetched)
	}

	// The machine holding the xz narinfos goes straight to the xz files.
	out, err := fleetSubstitute(t, old, px, c.App)
	if err != nil {
		t.Fatalf("a fleet machine holding the xz narinfos could not substitute after the switch to zstd (%v):\n%s", err, out)
	}
	for _, p := range c.Paths() {
		assertSameTree(t, string(p), old.Path(p))
	}
}
