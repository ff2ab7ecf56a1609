package e2e

import (
	"bytes"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The main story: a fleet machine trusting only the gatekeeper key cannot
// get an unattested closure; after a rebuilder's attestation is imported it
// gets the whole closure, byte for byte, for every codec.
func TestSubstituteAttested(t *testing.T) {
	t.Parallel()
	for _, codec := range codecs {
		t.Run(codec, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, codec, ProxyConfig{}, nil)
			c, px := f.C, f.Px

			cl := newClient(t)
			out, err := cl.Substitute(t, px.URL, px.GatekeeperKey, c.App)
			if err == nil || cl.Has(c.App) || cl.Has(c.Leaf) {
				t.Fatalf("unattested closure was substituted through cacheproxy (err=%v):\n%s", err, out)
			}
			px.ExpectRejected(t, c.App, "unattested")
			px.ExpectRejected(t, c.Leaf, "unattested")
			if f.Up.NarCount() != 0 {
				t.Errorf("cacheproxy fetched %d NARs from upstream for rejected paths, want 0", f.Up.NarCount())
			}

			f.attestClosure(t)
			for _, p := range c.Paths() {
				ni := px.ExpectApproved(t, p)
				up := f.Up.Narinfo(t, p)
				for _, k := range []string{"NarHash", "NarSize", "References", "StorePath"} {
					if ni.Get(k) != up.Get(k) {
						t.Errorf("%s: proxy narinfo %s = %q, upstream has %q", p.Name(), k, ni.Get(k), up.Get(k))
					}
				}
				if u := ni.Get("URL"); strings.Contains(u, strings.TrimPrefix(f.Up.URL, "http://")) {
					t.Errorf("%s: narinfo URL %q still points at the upstream; it must be rewritten to the proxy", p.Name(), u)
				}
			}
			cl.MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
			assertSameTree(t, string(c.App), cl.Path(c.App))
			assertSameTree(t, string(c.Leaf), cl.Path(c.Leaf))
			if v := px.MetricSum(t, "cacheproxy_decisions_total", map[string]string{"decision": "approved", "reason": "attested"}); v < 2 {
				t.Errorf("cacheproxy_decisions_total{decision=approved,reason=attested} = %v, want >= 2", v)
			}
			if v := px.MetricSum(t, "cacheproxy_decisions_total", map[string]string{"decision": "rejected", "reason": "unattested"}); v < 2 {
				t.Errorf("cacheproxy_decisions_total{decision=rejected,reason=unattested} = %v, want >= 2", v)
			}
		})
	}
}

func TestNixCacheInfo(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upKey)
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	resp, body, err := px.Get(t, "/nix-cache-info")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET /nix-cache-info: %v %v", err, resp)
	}
	for _, want := range []string{"StoreDir: /nix/store", "WantMassQuery: 1", "Priority: "} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/nix-cache-info lacks %q:\n%s", want, body)
		}
	}
	// A HEAD on an unknown narinfo is a plain 404 (unknown everywhere).
	req, _ := http.NewRequest("HEAD", px.URL+"/"+strings.Repeat("0", 32)+".narinfo", nil)
	hr, err := httpClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	hr.Body.Close()
	if hr.StatusCode != 404 {
		t.Errorf("HEAD of a narinfo unknown everywhere: %d, want 404", hr.StatusCode)
	}
}

// The first rejection in a closure stops a real client; HEAD answers agree
// with GET; build logs are passed through.
func TestHeadAndLogPassthrough(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) {
		os.MkdirAll(filepath.Join(f.Up.Dir, "log"), 0o755)
		os.WriteFile(filepath.Join(f.Up.Dir, "log", f.C.AppDrv.Base()), []byte("build log of app\n"), 0o644)
	})
	req, _ := http.NewRequest("HEAD", f.Px.URL+"/"+f.C.App.Hash()+".narinfo", nil)
	resp, err := httpClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 || resp.Header.Get("X-Cacheproxy-Decision") != "rejected; reason=unattested" {
		t.Errorf("HEAD narinfo of unattested path: %d %q, want 404 rejected; reason=unattested", resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"))
	}
	f.attestClosure(t)
	resp, err = httpClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("HEAD narinfo of attested path: %d, want 200", resp.StatusCode)
	}
	lr, body, err := f.Px.Get(t, "/log/"+f.C.AppDrv.Base())
	if err != nil || lr.StatusCode != 200 || string(body) != "build log of app\n" {
		t.Errorf("GET /log/<drv>: %v %v %q, want the upstream's log", err, lr, body)
	}
}

// /<hash>.ls is passed through for approved paths only.
func TestListingPassthrough(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{})
	up := newUpstream(t, upKey)
	runNix(t, "nix", "copy", "--to", "file://"+up.Dir+"?compression=zstd&write-nar-listing=true&secret-key="+upKey.SecFile,
		"--option", "substituters", "", string(c.App))
	if _, err := os.Stat(filepath.Join(up.Dir, c.App.Hash()+".ls")); err != nil {
		t.Fatalf("fixture: nix copy did not write a .ls listing: %v", err)
	}
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	if resp, _, err := px.Get(t, "/"+c.App.Hash()+".ls"); err != nil || resp.StatusCode != 404 {
		t.Errorf("GET .ls of an unattested path: %v %v, want 404", err, resp)
	}
	px.Attest(t, attestFile(t, rb1Key, c.Paths()...))
	px.ExpectApproved(t, c.App) // as Nix does: narinfo first, then the listing
	want, _ := os.ReadFile(filepath.Join(up.Dir, c.App.Hash()+".ls"))
	resp, body, err := px.Get(t, "/"+c.App.Hash()+".ls")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET .ls of an attested path: %v, status %v, body %q; want 200", err, resp.StatusCode, body)
	}
	if !bytes.Equal(body, want) && !strings.Contains(string(body), `"nonce"`) {
		t.Errorf("GET .ls body is neither the upstream listing nor a listing of the path:\n%s", body)
	}
}
