package e2e

// A lying upstream: every way of swapping or breaking a NAR must leave the
// client without the path, be counted, and leave nothing in the cache.

import (
	"bytes"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func verificationFailures(t testing.TB, px *Proxy, checks ...string) float64 {
	t.Helper()
	m := px.Metrics(t)
	sum := 0.0
	for _, c := range checks {
		sum += metricSum(m, "cacheproxy_nar_verification_failures_total", map[string]string{"check": c})
	}
	return sum
}

// assertNoCachedNar walks the state dir: no file may hold a NAR (the magic
// "nix-archive-1") or the bytes the lying upstream served, and the blob
// directory (state_dir/blobs, if the implementation has one) must be empty.
// Only valid when the proxy never verified any NAR successfully.
func assertNoCachedNar(t testing.TB, px *Proxy, served []byte) {
	t.Helper()
	var probe []byte
	if len(served) >= 32 {
		probe = served[len(served)/2-8 : len(served)/2+8]
	}
	filepath.WalkDir(px.StateDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		b, rerr := os.ReadFile(path)
		if rerr != nil {
			return nil
		}
		rel, _ := filepath.Rel(px.StateDir, path)
		if bytes.Contains(b, []byte("nix-archive-1")) {
			t.Errorf("state dir file %s contains NAR data after a failed verification", rel)
		}
		if probe != nil && bytes.Contains(b, probe) {
			t.Errorf("state dir file %s contains the tampered bytes the upstream served", rel)
		}
		if strings.HasPrefix(rel, "blobs"+string(filepath.Separator)) {
			t.Errorf("blob store holds %s (%d bytes) although no NAR was verified", rel, len(b))
		}
		return nil
	})
}

type tamperCase struct {
	name  string
	codec string
	// prepare tampers with the published upstream before the proxy starts
	// and returns the leaf NAR bytes the upstream now serves.
	prepare func(t *testing.T, f *fixture) []byte
	checks  []string // acceptable values of the check label
	reason  string   // decision for the leaf afterwards
}

func corruptCompressed(t *testing.T, f *fixture) []byte {
	ni := f.Up.Narinfo(t, f.C.Leaf)
	nf := f.Up.NarFile(t, f.C.Leaf)
	b, _ := os.ReadFile(nf)
	for i := len(b)/2 - 2; i < len(b)/2+2; i++ {
		b[i] ^= 0x5a
	}
	os.WriteFile(nf, b, 0o644)
	ni.Set("FileHash", sha256Nix32(b)) // only decompression / NarHash can tell
	f.Up.PutNarinfo(t, f.C.Leaf, ni)
	return b
}

func TestTamperedNar(t *testing.T) {
	t.Parallel()
	cases := []tamperCase{
		{name: "flipped", codec: "none", checks: []string{"file_hash", "nar_hash"}, reason: "nar_mismatch",
			prepare: func(t *testing.T, f *fixture) []byte { return tamperNar(t, f.Up, f.C.Leaf, false) }},
		{name: "flipped_filehash_fixed", codec: "none", checks: []string{"nar_hash"}, reason: "nar_mismatch",
			prepare: func(t *testing.T, f *fixture) []byte { return tamperNar(t, f.Up, f.C.Leaf, true) }},
		{name: "cut_short", codec: "none", checks: []string{"file_size", "file_hash", "nar_size", "nar_hash", "decompress"}, reason: "nar_mismatch",
			prepare: func(t *testing.T, f *fixture) []byte {
				nf := f.Up.NarFile(t, f.C.Leaf)
				b, _ := os.ReadFile(nf)
				b = b[:len(b)/2]
				os.WriteFile(nf, b, 0o644) // served complete, with a matching Content-Length
				return b
			}},
	}
	for _, codec := range []string{"xz", "zstd", "bzip2", "br"} {
		cases = append(cases, tamperCase{name: codec + "_corrupt_stream", codec: codec,
			checks: []string{"decompress", "nar_hash", "nar_size"}, reason: "nar_mismatch", prepare: corruptCompressed})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var served []byte
			f := newFixture(t, tc.codec, ProxyConfig{}, func(f *fixture) { served = tc.prepare(t, f) })
			f.attestClosure(t)
			narURL := narPath(f.Px.ExpectApproved(t, f.C.Leaf))

			cl := newClient(t)
			out, err := cl.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
			if err == nil || cl.Has(f.C.Leaf) {
				t.Fatalf("client substituted a tampered NAR through cacheproxy:\n%s", out)
			}
			if v := verificationFailures(t, f.Px, tc.checks...); v < 1 {
				t.Errorf("cacheproxy_nar_verification_failures_total{check in %v} = %v, want >= 1\n%s", tc.checks, v, grepLines(f.Px.Metrics(t), "cacheproxy_nar_verification_failures_total"))
			}
			f.Px.ExpectRejected(t, f.C.Leaf, tc.reason)
			if resp, body, err := f.Px.Get(t, narURL); err == nil && resp.StatusCode == 200 {
				t.Errorf("quarantined NAR %s still served: 200 with %d bytes", narURL, len(body))
			}
			assertNoCachedNar(t, f.Px, served)
		})
	}
}

// The upstream key is stolen: NarHash changed and re-signed. Only the
// attestation catches it, before any NAR is fetched.
func TestTamperNarHashResigned(t *testing.T) {
	t.Parallel()
	var att string
	var served []byte
	f := newFixture(t, "none", ProxyConfig{}, func(f *fixture) {
		att = attestFile(t, rb1Key, f.C.Paths()...)
		served = tamperNar(t, f.Up, f.C.Leaf, true)
		ni := f.Up.Narinfo(t, f.C.Leaf)
		ni.Set("NarHash", sha256Nix32(served)) // consistent with the swapped bytes
		f.Up.Resign(ni, upKey)
		f.Up.PutNarinfo(t, f.C.Leaf, ni)
	})
	f.Px.Attest(t, att)
	cl := newClient(t)
	out, err := cl.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	if err == nil || cl.Has(f.C.Leaf) {
		t.Fatalf("client substituted a re-signed swapped NAR:\n%s", out)
	}
	f.Px.ExpectRejected(t, f.C.Leaf, "attestation_mismatch")
	if v := f.Px.MetricSum(t, "cacheproxy_decisions_total", map[string]string{"decision": "rejected", "reason": "attestation_mismatch"}); v < 1 {
		t.Errorf("cacheproxy_decisions_total{rejected,attestation_mismatch} = %v, want >= 1", v)
	}
	if n := f.Up.Count(f.Up.NarURLPath(t, f.C.Leaf)); n != 0 {
		t.Errorf("cacheproxy fetched the NAR of a rejected path %d times, want 0", n)
	}
	assertNoCachedNar(t, f.Px, served)
}

// A direct download of a swapped NAR never completes: the proxy holds back
// the final bytes until the hashes check out, then aborts.
func TestTamperDirectDownloadIsIncomplete(t *testing.T) {
	t.Parallel()
	var served []byte
	f := newFixture(t, "none", ProxyConfig{}, func(f *fixture) { served = tamperNar(t, f.Up, f.C.Leaf, true) })
	f.attestClosure(t)
	narURL := narPath(f.Px.ExpectApproved(t, f.C.Leaf))
	resp, body, err := f.Px.Get(t, narURL)
	if err == nil && resp.StatusCode == 200 && len(body) == len(served) {
		t.Fatalf("proxy delivered the complete swapped NAR (%d bytes) without an error", len(body))
	}
	if resp != nil && resp.StatusCode == 200 && !bytes.HasPrefix(served, body) {
		t.Errorf("proxy delivered bytes that are not a prefix of what upstream served")
	}
	f.Px.ExpectRejected(t, f.C.Leaf, "nar_mismatch")
}

// Network blips are counted as truncated and retried, never quarantined.
func TestBrokenTransferNotQuarantined(t *testing.T) {
	t.Parallel()
	cases := map[string]func(w http.ResponseWriter, r *http.Request, orig []byte){
		"reset": func(w http.ResponseWriter, r *http.Request, orig []byte) { breakAfter(w, orig, len(orig)/2) },
		"stall": func(w http.ResponseWriter, r *http.Request, orig []byte) {
			w.Header().Set("Content-Length", strconv.Itoa(len(orig)))
			w.WriteHeader(200)
			w.Write(orig[:len(orig)/2])
			w.(http.Flusher).Flush()
			select { // longer than the upstream timeout (1s); bounded for the suite's sake
			case <-r.Context().Done():
			case <-time.After(8 * time.Second):
			}
			panic(http.ErrAbortHandler)
		},
	}
	for name, h := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f := &fixture{C: buildClosure(t, ClosureOpts{}), Up: newUpstream(t, upKey)}
			f.Up.Publish(t, "none", f.C.App)
			spec := f.Up.Spec()
			spec.Timeout = "1s"
			f.Px = startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{spec}, Attesters: []*Key{rb1Key}})
			f.attestClosure(t)
			f.Up.NarHook(t, f.C.Leaf, h)
			cl := newClient(t)
			out, err := cl.Substitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
			if err == nil || cl.Has(f.C.Leaf) {
				t.Fatalf("client substituted from a broken transfer:\n%s", out)
			}
			if v := verificationFailures(t, f.Px, "truncated"); v < 1 {
				t.Errorf("cacheproxy_nar_verification_failures_total{check=\"truncated\"} = %v, want >= 1\n%s", v, grepLines(f.Px.Metrics(t), "cacheproxy_nar_verification_failures_total"))
			}
			if v := verificationFailures(t, f.Px, "nar_hash", "file_hash", "nar_size", "file_size"); v != 0 {
				t.Errorf("a broken transfer was counted as a hash/size mismatch (%v)", v)
			}
			f.Px.ExpectApproved(t, f.C.Leaf) // not quarantined
			f.Up.SetHook(nil)
			cl.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
			assertSameTree(t, string(f.C.Leaf), cl.Path(f.C.Leaf))
		})
	}
}

func grepLines(text, substr string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
