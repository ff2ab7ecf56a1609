package e2e

// Upstream faults: failover in configured order, 503 + Retry-After (never a
// 404) when every upstream fails transiently, and malformed requests that
// never reach an upstream.

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestUpstreamFailover(t *testing.T) {
	t.Parallel()
	firsts := map[string]func(t *testing.T) UpstreamSpec{
		"first_503": func(t *testing.T) UpstreamSpec {
			u := newUpstream(t, upKey)
			u.FailAll(503)
			return u.Spec()
		},
		"first_404": func(t *testing.T) UpstreamSpec { return newUpstream(t, upKey).Spec() },
		"first_refusing": func(t *testing.T) UpstreamSpec {
			return UpstreamSpec{URL: "http://" + freeAddr(t), PublicKeys: []string{upKey.Pub}}
		},
		"first_500": func(t *testing.T) UpstreamSpec {
			u := newUpstream(t, upKey)
			u.FailAll(500)
			return u.Spec()
		},
	}
	for name, first := range firsts {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c := buildClosure(t, ClosureOpts{})
			second := newUpstream(t, upKey)
			second.Publish(t, "zstd", c.App)
			px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{first(t), second.Spec()}, Attesters: []*Key{rb1Key}})
			px.Attest(t, attestFile(t, rb1Key, c.Paths()...))
			cl := newClient(t)
			cl.MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
			assertSameTree(t, string(c.App), cl.Path(c.App))
			if n := second.NarCount(); n != 2 {
				t.Errorf("second upstream served %d NARs, want 2", n)
			}
		})
	}
}

func TestAllUpstreamsDown(t *testing.T) {
	t.Parallel()
	type setup func(t *testing.T, u *Upstream) []UpstreamSpec
	cases := map[string]setup{
		"503": func(t *testing.T, u *Upstream) []UpstreamSpec { u.FailAll(503); return []UpstreamSpec{u.Spec()} },
		"refused": func(t *testing.T, u *Upstream) []UpstreamSpec {
			return []UpstreamSpec{{URL: "http://" + freeAddr(t), PublicKeys: []string{upKey.Pub}}}
		},
		"503_and_refused": func(t *testing.T, u *Upstream) []UpstreamSpec {
			u.FailAll(503)
			return []UpstreamSpec{u.Spec(), {URL: "http://" + freeAddr(t), PublicKeys: []string{upKey.Pub}}}
		},
		"stalled_past_timeout": func(t *testing.T, u *Upstream) []UpstreamSpec {
			u.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
				select {
				case <-r.Context().Done():
				case <-time.After(6 * time.Second):
				}
				http.Error(w, "too late", 503)
				return true
			})
			s := u.Spec()
			s.Timeout = "1s"
			return []UpstreamSpec{s}
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c := buildClosure(t, ClosureOpts{})
			up := newUpstream(t, upKey)
			up.Publish(t, "zstd", c.App)
			specs := mk(t, up)
			px := startProxy(t, ProxyConfig{Upstreams: specs, Attesters: []*Key{rb1Key}})
			px.Attest(t, attestFile(t, rb1Key, c.Paths()...))
			resp, body, err := px.Get(t, "/"+c.App.Hash()+".narinfo")
			if err != nil {
				t.Fatalf("GET narinfo: %v", err)
			}
			if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
				t.Fatalf("every upstream failing transiently: got %d (Retry-After %q, decision %q) %q; want 503 with Retry-After (a 404 is cached by Nix for an hour)",
					resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("X-Cacheproxy-Decision"), body)
			}
			if name == "503" {
				// The upstream recovers: no negative caching of a transient failure.
				up.SetHook(nil)
				px.ExpectApproved(t, c.App)
			}
		})
	}
}

func TestMalformedRequests(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, nil)
	f.attestClosure(t)
	narURL := narPath(f.Px.ExpectApproved(t, f.C.Leaf))
	before := f.Up.Total()
	type req struct{ method, path string }
	strict := []req{
		{"POST", "/" + f.C.Leaf.Hash() + ".narinfo"},
		{"PUT", "/" + f.C.Leaf.Hash() + ".narinfo"},
		{"DELETE", "/" + f.C.Leaf.Hash() + ".narinfo"},
		{"POST", narURL},
		{"GET", "/abc.narinfo"},
		{"GET", "/" + strings.Repeat("e", 32) + ".narinfo"}, // e is not in Nix's base32 alphabet
		{"GET", "/" + strings.ToUpper(f.C.Leaf.Hash()) + ".narinfo"},
		{"GET", "/" + f.C.Leaf.Hash() + "x.narinfo"},
	}
	for _, r := range strict {
		hr, _ := http.NewRequest(r.method, f.Px.URL+r.path, nil)
		resp, err := httpClient.Do(hr)
		if err != nil {
			t.Errorf("%s %s: %v", r.method, r.path, err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode < 400 || resp.StatusCode > 499 {
			t.Errorf("%s %s: status %d, want 4xx", r.method, r.path, resp.StatusCode)
		}
	}
	// Paths escaping /nar/: a 4xx, or at most a redirect to the cleaned path
	// (Go's ServeMux does that), never content and never an upstream request.
	noRedirect := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, p := range []string{"/nar/../nix-cache-info", "/nar/..%2f..%2fnix-cache-info", "/nar/%2e%2e/%2e%2e/etc/passwd", "/nar/..%2F" + f.C.Leaf.Hash() + ".narinfo"} {
		hr, _ := http.NewRequest("GET", f.Px.URL+p, nil)
		resp, err := noRedirect.Do(hr)
		if err != nil {
			t.Errorf("GET %s: %v", p, err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode < 300 || resp.StatusCode > 499 {
			t.Errorf("GET %s: status %d, want 4xx (or a redirect to the cleaned path)", p, resp.StatusCode)
		}
	}
	if after := f.Up.Total(); after != before {
		t.Errorf("malformed requests reached the upstream (%d requests)", after-before)
	}
}
