package server

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Test 4: upstream failures are 503 + Retry-After (never a 404 that Nix
// would cache for an hour), the next upstream is tried, a plain 404 is a
// 404 without a decision.
func TestNarInfoUpstreamFailures(t *testing.T) {
	t.Run("503", func(t *testing.T) {
		f := newFixture(t)
		o := newObj(t, "flaky-1", dirNAR(t, 10, 1000), "zstd")
		f.up.publish(o)
		f.attest(o)
		info := "/" + o.hash + ".narinfo"
		f.up.handle(info, func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "overloaded", http.StatusServiceUnavailable)
		})
		resp, _ := f.mustGet(info)
		if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" || resp.Header.Get("X-Cacheproxy-Decision") != "" {
			t.Errorf("upstream 503: got %d, Retry-After %q, decision %q; want 503 with Retry-After and no decision",
				resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("X-Cacheproxy-Decision"))
		}
		if v := f.metric("cacheproxy_upstream_requests_total", `kind="narinfo",result="unavailable",upstream="`+f.up.srv.URL+`"`); v != 1 {
			t.Errorf("upstream_requests_total{result=unavailable} = %v, want 1", v)
		}
		// Nothing about the 503 is remembered: once the upstream recovers,
		// the path is served.
		f.up.handle(info, nil)
		if resp, _ := f.mustGet(info); resp.StatusCode != 200 {
			t.Errorf("after the upstream recovered: %d, want 200", resp.StatusCode)
		}
	})

	t.Run("timeout", func(t *testing.T) {
		f := newFixture(t, withTimeout(300*time.Millisecond))
		hash := storeHash("slow-1")
		f.up.handle("/"+hash+".narinfo", func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		})
		resp, _ := f.mustGet("/" + hash + ".narinfo")
		if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
			t.Errorf("stalled upstream: %d (Retry-After %q), want 503 with Retry-After", resp.StatusCode, resp.Header.Get("Retry-After"))
		}
	})

	t.Run("failover", func(t *testing.T) {
		first, second := newFakeUpstream(t, "first-1"), newFakeUpstream(t, "second-1")
		f := newFixtureWith(t, []*fakeUpstream{first, second})
		o := newObj(t, "failover-1", dirNAR(t, 11, 1000), "zstd")
		second.publish(o)
		f.attest(o)
		info := "/" + o.hash + ".narinfo"
		first.handle(info, func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "down", http.StatusServiceUnavailable)
		})
		narPath := f.narURL(o)
		resp, body := f.mustGet(narPath)
		if resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
			t.Fatalf("NAR via the second upstream: %d, %d bytes", resp.StatusCode, len(body))
		}
		if first.count(info) != 1 || second.count(info) != 1 {
			t.Errorf("narinfo requests: first %d, second %d; want 1 each", first.count(info), second.count(info))
		}
		if first.count("/"+o.ni.URL) != 0 || second.count("/"+o.ni.URL) != 1 {
			t.Errorf("NAR requests: first %d, second %d; want the NAR from the upstream that served the narinfo",
				first.count("/"+o.ni.URL), second.count("/"+o.ni.URL))
		}
	})

	t.Run("first-unsigned-second-signed", func(t *testing.T) {
		// An upstream whose narinfo does not verify does not hide a good
		// answer from the next one.
		first, second := newFakeUpstream(t, "first-1"), newFakeUpstream(t, "second-1")
		f := newFixtureWith(t, []*fakeUpstream{first, second})
		o := newObj(t, "twosigs-1", dirNAR(t, 12, 1000), "zstd")
		first.publish(o)
		second.publish(o)
		first.mu.Lock()
		first.files["/"+o.hash+".narinfo"] = o.signed(second.key) // not first's key
		first.mu.Unlock()
		f.attest(o)
		resp, _ := f.mustGet("/" + o.hash + ".narinfo")
		if resp.StatusCode != 200 || resp.Header.Get("X-Cacheproxy-Decision") != "approved; reason=attested" {
			t.Errorf("got %d %q, want 200 approved from the second upstream", resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"))
		}
	})

	t.Run("404", func(t *testing.T) {
		f := newFixture(t)
		resp, _ := f.mustGet("/" + storeHash("nowhere") + ".narinfo")
		if resp.StatusCode != 404 || resp.Header.Get("X-Cacheproxy-Decision") != "" {
			t.Errorf("unknown path: %d, decision %q; want 404 without a decision header", resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"))
		}
	})

	t.Run("404-and-503", func(t *testing.T) {
		// One upstream says 404, the other is down: the path may exist, so
		// 503, not a 404 that Nix would cache.
		first, second := newFakeUpstream(t, "first-1"), newFakeUpstream(t, "second-1")
		f := newFixtureWith(t, []*fakeUpstream{first, second})
		hash := storeHash("maybe")
		second.handle("/"+hash+".narinfo", func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, "down", http.StatusBadGateway)
		})
		if resp, _ := f.mustGet("/" + hash + ".narinfo"); resp.StatusCode != 503 {
			t.Errorf("404 + 502 upstreams: %d, want 503", resp.StatusCode)
		}
	})
}

// Test 5: malformed requests are refused before any upstream request.
func TestMalformedRequestsNeverReachUpstream(t *testing.T) {
	f := newFixture(t)
	o := newObj(t, "unapproved-1", dirNAR(t, 13, 1000), "zstd")
	f.up.publish(o) // upstream has it; nobody approved it
	narFile := o.hash + "-" + o.ni.NarHash.Nix32() + ".nar.zst"

	for _, tc := range []struct {
		method, target string
		want           int
	}{
		{"GET", "/xyz.narinfo", 400},
		{"GET", "/" + strings.Repeat("e", 32) + ".narinfo", 400}, // 'e' is not nix32
		{"GET", "/" + o.hash[:31] + ".narinfo", 400},
		{"GET", "/nar/../etc/passwd", 400},
		{"GET", "/nar/%2e%2e%2fetc", 400},
		{"GET", "/nar/%2e%2e/etc/passwd", 400},
		{"GET", "/nar/" + o.hash + "-x/../../etc/passwd", 400},
		{"GET", "//etc/passwd", 400},
		{"GET", "/nar/" + o.hash, 400},
		{"GET", "/nar/" + narFile + "/x", 400},
		{"GET", "/log/../../etc/passwd", 400},
		{"GET", "/log/notadrv", 400},
		{"GET", "/" + o.hash + ".narinfo/x", 404},
		{"POST", "/x.narinfo", 405},
		{"POST", "/" + o.hash + ".narinfo", 405},
		{"PUT", "/nar/" + narFile, 405},
		{"DELETE", "/nar/" + narFile, 405},
		{"GET", "/nar/" + narFile, 404},  // valid name, unapproved path: decided, refused
		{"HEAD", "/nar/" + narFile, 404}, // same for HEAD
		{"GET", "/" + o.hash + ".ls", 404},
	} {
		if got := rawRequest(t, f.proxy.URL, tc.method, tc.target); got != tc.want {
			t.Errorf("%s %s: %d, want %d", tc.method, tc.target, got, tc.want)
		}
	}
	// The three well-formed requests for the unapproved path decide it (a
	// client may hold an old narinfo): one narinfo request each, never its NAR.
	decided := f.up.count("/" + o.hash + ".narinfo")
	if n := f.up.total(); n != decided || decided > 3 || f.up.count("/"+o.ni.URL) != 0 {
		t.Errorf("malformed or unapproved requests made %d upstream requests, want only narinfo requests for the valid ones (%v)", n, f.up.counts)
	}
}

// Test 7: report mode serves what the policy rules refuse, and says so;
// upstream_unsigned stays refused.
func TestReportMode(t *testing.T) {
	f := newFixture(t, withMode("report"))
	o := newObj(t, "unattested-1", dirNAR(t, 14, 1000), "zstd")
	f.up.publish(o)
	info := "/" + o.hash + ".narinfo"
	for i := range 2 { // the second answer comes from the stored record
		resp, _ := f.mustGet(info)
		if resp.StatusCode != 200 || resp.Header.Get("X-Cacheproxy-Decision") != "rejected; reason=unattested" {
			t.Errorf("report mode, unattested (request %d): %d %q; want 200 with rejected; reason=unattested",
				i+1, resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"))
		}
	}
	// Counted per request, exactly as enforce mode counts its re-decisions.
	if v := f.metric("cacheproxy_decisions_total", `decision="rejected",reason="unattested"`); v != 2 {
		t.Errorf(`decisions_total{rejected,unattested} = %v, want 2`, v)
	}
	narPath := f.narURL(o)
	if resp, body := f.mustGet(narPath); resp.StatusCode != 200 || !bytes.Equal(body, o.file) {
		t.Errorf("report mode NAR: %d, %d bytes", resp.StatusCode, len(body))
	}

	// Rules 1-2 are enforced in report mode too.
	other, err := verify.GenerateKey("not-the-upstream-1")
	if err != nil {
		t.Fatal(err)
	}
	u := newObj(t, "unsigned-1", dirNAR(t, 15, 1000), "zstd")
	f.up.publish(u)
	f.up.mu.Lock()
	f.up.files["/"+u.hash+".narinfo"] = u.signed(other)
	f.up.mu.Unlock()
	resp, _ := f.mustGet("/" + u.hash + ".narinfo")
	if resp.StatusCode != 404 || resp.Header.Get("X-Cacheproxy-Decision") != "rejected; reason=upstream_unsigned" {
		t.Errorf("report mode, unsigned: %d %q; want 404 with rejected; reason=upstream_unsigned",
			resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"))
	}
	if v := f.metric("cacheproxy_decisions_total", `decision="rejected",reason="upstream_unsigned"`); v != 1 {
		t.Errorf(`decisions_total{rejected,upstream_unsigned} = %v, want 1`, v)
	}
	narFile := u.hash + "-" + u.ni.NarHash.Nix32() + ".nar.zst"
	before := f.up.count("/" + u.ni.URL)
	if resp, _ := f.mustGet("/nar/" + narFile); resp.StatusCode != 404 || f.up.count("/"+u.ni.URL) != before {
		t.Errorf("NAR of an unsigned path in report mode: %d; want 404 and no upstream request", resp.StatusCode)
	}
}

// In enforce mode the same unattested path is a 404 with the reason.
func TestEnforceModeUnattested(t *testing.T) {
	f := newFixture(t)
	o := newObj(t, "unattested-2", dirNAR(t, 16, 1000), "zstd")
	f.up.publish(o)
	resp, body := f.mustGet("/" + o.hash + ".narinfo")
	if resp.StatusCode != 404 || resp.Header.Get("X-Cacheproxy-Decision") != "rejected; reason=unattested" ||
		bytes.Count(bytes.TrimSpace(body), []byte("\n")) != 0 {
		t.Errorf("enforce, unattested: %d %q %q; want 404, the reason header and a one-line body",
			resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"), body)
	}
	// An attestation arriving later flips the decision.
	f.attest(o)
	if resp, _ := f.mustGet("/" + o.hash + ".narinfo"); resp.StatusCode != 200 {
		t.Errorf("after attestation: %d, want 200", resp.StatusCode)
	}
}
