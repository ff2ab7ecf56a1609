package e2e

// Every decision reason of the README, observed over HTTP: the narinfo status,
// the X-Cacheproxy-Decision header and cacheproxy_decisions_total.

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

func fakeNarHash(s string) string { return sha256Nix32([]byte("not the real NAR " + s)) }

func TestDecisionUpstreamMalformed(t *testing.T) {
	t.Parallel()
	t.Run("garbage", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) {
			f.Up.PutRaw(t, f.C.App.Hash()+".narinfo", []byte("this is not a narinfo\x00\x01\n{}\n"))
		})
		f.attestClosure(t)
		f.Px.ExpectRejected(t, f.C.App, "upstream_malformed")
	})
	t.Run("other_store_path", func(t *testing.T) {
		t.Parallel()
		// The app hash's narinfo describes the leaf, properly signed.
		f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) {
			f.Up.PutNarinfo(t, f.C.App, f.Up.Narinfo(t, f.C.Leaf))
		})
		f.attestClosure(t)
		f.Px.ExpectRejected(t, f.C.App, "upstream_malformed")
		f.Px.ExpectApproved(t, f.C.Leaf)
	})
	t.Run("other_store_dir", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) {
			ni := f.Up.Narinfo(t, f.C.Leaf)
			ni.Set("StorePath", "/gnu/store/"+f.C.Leaf.Base())
			f.Up.Resign(ni, upKey)
			f.Up.PutNarinfo(t, f.C.Leaf, ni)
		})
		f.attestClosure(t)
		f.Px.ExpectRejected(t, f.C.Leaf, "upstream_malformed")
	})
	t.Run("missing_fields", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) {
			ni := f.Up.Narinfo(t, f.C.Leaf)
			ni.Del("NarHash")
			ni.Del("URL")
			f.Up.PutNarinfo(t, f.C.Leaf, ni)
		})
		f.attestClosure(t)
		f.Px.ExpectRejected(t, f.C.Leaf, "upstream_malformed")
	})
}

func TestDecisionUpstreamUnsigned(t *testing.T) {
	t.Parallel()
	cases := map[string]func(ni *Narinfo){
		"sig_stripped":   func(ni *Narinfo) { ni.Del("Sig") },
		"unknown_key":    func(ni *Narinfo) { ni.Del("Sig"); ni.Add("Sig", strangerKey.Sign(ni.Fingerprint())) },
		"attester_key":   func(ni *Narinfo) { ni.Del("Sig"); ni.Add("Sig", rb1Key.Sign(ni.Fingerprint())) }, // attester keys are not upstream keys
		"bad_signature":  func(ni *Narinfo) { ni.Del("Sig"); ni.Add("Sig", upKey.Sign(ni.Fingerprint()+"x")) },
		"garbage_sig":    func(ni *Narinfo) { ni.Del("Sig"); ni.Add("Sig", "up-1:bm90IGEgc2lnbmF0dXJl") },
		"narsize_edited": func(ni *Narinfo) { ni.Set("NarSize", "999") }, // old Sig no longer covers the fingerprint
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) {
				ni := f.Up.Narinfo(t, f.C.Leaf)
				mutate(ni)
				f.Up.PutNarinfo(t, f.C.Leaf, ni)
			})
			f.attestClosure(t)
			f.Px.ExpectRejected(t, f.C.Leaf, "upstream_unsigned")
			f.Px.ExpectApproved(t, f.C.App)
			if v := f.Px.MetricSum(t, "cacheproxy_decisions_total", map[string]string{"decision": "rejected", "reason": "upstream_unsigned"}); v < 1 {
				t.Errorf("cacheproxy_decisions_total{rejected,upstream_unsigned} = %v, want >= 1", v)
			}
		})
	}
}

func TestDecisionDenied(t *testing.T) {
	t.Parallel()
	t.Run("path_beats_attestation", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{}, nil)
		f.attestClosure(t)
		f.Px.ExpectApproved(t, f.C.Leaf)
		f.Px.MustCLI(t, "deny add", "--reason", "CVE-2099-0001", string(f.C.Leaf))
		f.Px.ExpectRejected(t, f.C.Leaf, "denied")
		f.Px.ExpectApproved(t, f.C.App) // require_closure is off
		out, err := newClient(t).Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
		if err == nil {
			t.Errorf("client substituted a closure containing a denied path:\n%s", out)
		}
		if list := f.Px.MustCLI(t, "deny list"); !strings.Contains(list, f.C.Leaf.Hash()) || !strings.Contains(list, "CVE-2099-0001") {
			t.Errorf("deny list does not show the entry and its reason:\n%s", list)
		}
		f.Px.MustCLI(t, "deny remove", string(f.C.Leaf))
		f.Px.ExpectApproved(t, f.C.Leaf)
	})
	t.Run("bare_hash", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{}, nil)
		f.attestClosure(t)
		f.Px.MustCLI(t, "deny add", "--reason", "CVE", f.C.App.Hash())
		f.Px.ExpectRejected(t, f.C.App, "denied")
	})
	t.Run("name_glob", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{}, nil)
		f.attestClosure(t)
		f.Px.MustCLI(t, "deny add", "--reason", "CVE", "*-leaf-1.0*")
		f.Px.ExpectRejected(t, f.C.Leaf, "denied")
		f.Px.ExpectApproved(t, f.C.App)
	})
	t.Run("nar_hash", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{}, nil)
		f.attestClosure(t)
		f.Px.MustCLI(t, "deny add", "--reason", "CVE", f.Up.Narinfo(t, f.C.Leaf).Get("NarHash"))
		f.Px.ExpectRejected(t, f.C.Leaf, "denied")
	})
	t.Run("beats_allowlist", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{}, nil)
		f.Px.MustCLI(t, "allow add", "--reason", "reviewed", string(f.C.Leaf))
		f.Px.MustCLI(t, "deny add", "--reason", "CVE", string(f.C.Leaf))
		f.Px.ExpectRejected(t, f.C.Leaf, "denied")
	})
}

// The alarm: upstream serves (validly signed) a NarHash other than the one
// our rebuilder attested.
func TestDecisionAttestationMismatch(t *testing.T) {
	t.Parallel()
	for _, field := range []string{"NarHash", "NarSize", "References"} {
		t.Run(field, func(t *testing.T) {
			t.Parallel()
			var att string
			f := newFixture(t, "zstd", ProxyConfig{}, func(f *fixture) {
				att = attestFile(t, rb1Key, f.C.Paths()...) // the rebuilder saw the real thing
				ni := f.Up.Narinfo(t, f.C.App)
				switch field {
				case "NarHash":
					ni.Set("NarHash", fakeNarHash(field))
				case "NarSize":
					ni.Set("NarSize", "4096")
				case "References":
					ni.Set("References", "")
				}
				f.Up.Resign(ni, upKey) // a stolen upstream key
				f.Up.PutNarinfo(t, f.C.App, ni)
			})
			f.Px.Attest(t, att)
			f.Px.ExpectRejected(t, f.C.App, "attestation_mismatch")
			f.Px.ExpectApproved(t, f.C.Leaf)
			if v := f.Px.MetricSum(t, "cacheproxy_decisions_total", map[string]string{"decision": "rejected", "reason": "attestation_mismatch"}); v < 1 {
				t.Errorf("cacheproxy_decisions_total{rejected,attestation_mismatch} = %v, want >= 1", v)
			}
			if field == "NarHash" {
				// An allowlist entry pinned to the upstream NarHash overrides the alarm (rule 4).
				f.Px.MustCLI(t, "allow add", "--reason", "reviewed the difference", string(f.C.App))
				f.Px.expectApproval(t, f.C.App, "allowlisted")
			}
		})
	}
}

func TestDecisionAllowlisted(t *testing.T) {
	t.Parallel()
	t.Run("path", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{Attesters: []*Key{}}, nil)
		f.Px.MustCLI(t, "allow add", "--reason", "r", string(f.C.App))
		f.Px.expectApproval(t, f.C.App, "allowlisted")
		f.Px.ExpectRejected(t, f.C.Leaf, "unattested")
		if list := f.Px.MustCLI(t, "allow list"); !strings.Contains(list, f.C.App.Hash()) {
			t.Errorf("allow list does not show %s:\n%s", f.C.App, list)
		}
		f.Px.MustCLI(t, "allow remove", string(f.C.App))
		f.Px.ExpectRejected(t, f.C.App, "unattested")
	})
	t.Run("closure", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "xz", ProxyConfig{Attesters: []*Key{}}, nil)
		f.Px.MustCLI(t, "allow add", "--closure", "--reason", "r", string(f.C.App))
		f.Px.expectApproval(t, f.C.App, "allowlisted")
		f.Px.expectApproval(t, f.C.Leaf, "allowlisted")
		cl := newClient(t)
		cl.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
		assertSameTree(t, string(f.C.App), cl.Path(f.C.App))
		if v := f.Px.MetricSum(t, "cacheproxy_allowlist_entries", nil); v < 2 {
			t.Errorf("cacheproxy_allowlist_entries = %v after allow add --closure of 2 paths, want >= 2", v)
		}
	})
	t.Run("bare_hash", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{Attesters: []*Key{}}, nil)
		f.Px.MustCLI(t, "allow add", "--reason", "r", f.C.Leaf.Hash())
		f.Px.expectApproval(t, f.C.Leaf, "allowlisted")
	})
	t.Run("expires", func(t *testing.T) {
		t.Parallel()
		f := newFixture(t, "zstd", ProxyConfig{Attesters: []*Key{}}, nil)
		f.Px.MustCLI(t, "allow add", "--expires", "2s", "--reason", "r", string(f.C.Leaf))
		f.Px.ExpectApproved(t, f.C.Leaf)
		time.Sleep(2500 * time.Millisecond)
		f.Px.ExpectRejected(t, f.C.Leaf, "unattested")
	})
}

func TestDecisionContentAddressed(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upKey)
	fixed, text := addFixedCA(t), addTextCA(t)
	up.Publish(t, "zstd", fixed, text)
	c := buildClosure(t, ClosureOpts{})
	up.Publish(t, "zstd", c.App)
	// A lying CA field on an input-addressed path, re-signed by the upstream key.
	ni := up.Narinfo(t, c.Leaf)
	ni.Set("CA", "fixed:r:"+ni.Get("NarHash"))
	up.Resign(ni, upKey)
	up.PutNarinfo(t, c.Leaf, ni)
	// A CA path whose CA hash was swapped (CA is not in the fingerprint).
	fixed2 := addFixedCA(t)
	up.Publish(t, "zstd", fixed2)
	ni2 := up.Narinfo(t, fixed2)
	ni2.Set("CA", "fixed:r:"+fakeNarHash("ca"))
	up.PutNarinfo(t, fixed2, ni2)

	on := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}, ContentAddressed: true})
	off := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}, ContentAddressed: false})

	on.expectApproval(t, fixed, "content_addressed")
	on.ExpectApproved(t, text)
	on.ExpectRejected(t, c.Leaf, "unattested")
	on.ExpectRejected(t, fixed2, "unattested")
	off.ExpectRejected(t, fixed, "unattested")
	off.ExpectRejected(t, text, "unattested")

	cl := newClient(t)
	cl.MustSubstitute(t, on.URL, on.GatekeeperKey, fixed, text)
	assertSameTree(t, string(fixed), cl.Path(fixed))
	assertSameTree(t, string(text), cl.Path(text))
}

func TestDecisionClosureIncomplete(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{RequireClosure: true}, nil)
	f.Px.Attest(t, attestFile(t, rb1Key, f.C.App))
	f.Px.ExpectRejected(t, f.C.App, "closure_incomplete")
	f.Px.ExpectRejected(t, f.C.Leaf, "unattested")
	f.Px.Attest(t, attestFile(t, rb1Key, f.C.Leaf))
	f.Px.expectApproval(t, f.C.App, "attested")
	newClient(t).MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
}

func TestDecisionQuorum(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{Attesters: []*Key{rb1Key, rb2Key}, Quorum: 2}, nil)
	a1 := attestFile(t, rb1Key, f.C.Paths()...)
	f.Px.Attest(t, a1)
	f.Px.ExpectRejected(t, f.C.App, "unattested")
	f.Px.Attest(t, a1) // the same key twice is still one key
	f.Px.ExpectRejected(t, f.C.App, "unattested")
	// A non-attester's signature does not count either.
	f.Px.CLI(t, "attest import", attestFile(t, strangerKey, f.C.Paths()...))
	f.Px.ExpectRejected(t, f.C.App, "unattested")
	f.Px.Attest(t, attestFile(t, rb2Key, f.C.Paths()...))
	f.Px.expectApproval(t, f.C.App, "attested")
	f.Px.ExpectApproved(t, f.C.Leaf)
}

// A NAR whose bytes disagree with NarHash quarantines the path until
// `cacheproxy retry`.
func TestDecisionNarMismatchAndRetry(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "none", ProxyConfig{}, nil)
	f.attestClosure(t)
	// The upstream swaps the leaf's NAR bytes; the narinfo stays as signed.
	f.Up.NarHook(t, f.C.Leaf, func(w http.ResponseWriter, r *http.Request, orig []byte) {
		flipContentByte(t, orig)
		serveBytes(w, orig)
	})
	cl := newClient(t)
	out, err := cl.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	if err == nil || cl.Has(f.C.Leaf) {
		t.Fatalf("client substituted a swapped NAR through cacheproxy:\n%s", out)
	}
	f.Px.ExpectRejected(t, f.C.Leaf, "nar_mismatch")
	if v := f.Px.MetricSum(t, "cacheproxy_decisions_total", map[string]string{"decision": "rejected", "reason": "nar_mismatch"}); v < 1 {
		t.Errorf("cacheproxy_decisions_total{rejected,nar_mismatch} = %v, want >= 1", v)
	}
	// Quarantine holds even after the upstream is fixed...
	f.Up.SetHook(nil)
	f.Px.ExpectRejected(t, f.C.Leaf, "nar_mismatch")
	// ...until an operator lifts it.
	f.Px.MustCLI(t, "retry", string(f.C.Leaf))
	f.Px.ExpectApproved(t, f.C.Leaf)
	cl.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	assertSameTree(t, string(f.C.Leaf), cl.Path(f.C.Leaf))
}

// In report mode policy rejections are recorded but served; rules 1-2 and
// NAR verification are still enforced.
func TestReportMode(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{Mode: "report"}, nil)
	c2 := buildClosure(t, ClosureOpts{})
	f.Up.Publish(t, "none", c2.App)
	ni := f.Up.Narinfo(t, c2.Leaf)
	ni.Del("Sig")
	f.Up.PutNarinfo(t, c2.Leaf, ni)

	cl := newClient(t)
	cl.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	assertSameTree(t, string(f.C.App), cl.Path(f.C.App))
	if v := f.Px.MetricSum(t, "cacheproxy_decisions_total", map[string]string{"decision": "rejected", "reason": "unattested"}); v < 1 {
		t.Errorf("report mode: cacheproxy_decisions_total{decision=\"rejected\",reason=\"unattested\"} = %v, want >= 1 (decisions are recorded even when served)", v)
	}
	code, dec, body := f.Px.NarinfoDecision(t, c2.Leaf)
	if code != 404 || dec != "rejected; reason=upstream_unsigned" {
		t.Errorf("report mode must still enforce upstream_unsigned: got %d %q %s", code, dec, body)
	}
	// NAR verification is enforced in report mode too.
	c3 := buildClosure(t, ClosureOpts{})
	f.Up.Publish(t, "none", c3.App)
	f.Up.NarHook(t, c3.Leaf, func(w http.ResponseWriter, r *http.Request, orig []byte) {
		flipContentByte(t, orig)
		serveBytes(w, orig)
	})
	cl3 := newClient(t)
	out, err := cl3.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, c3.App)
	if err == nil || cl3.Has(c3.Leaf) {
		t.Errorf("report mode served a swapped NAR:\n%s", out)
	}
}
