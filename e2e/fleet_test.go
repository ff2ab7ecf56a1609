package e2e

// The fleet: real Nix clients at Nix's default narinfo cache TTLs (positive
// 30 days, negative 1 hour). A machine that fetched a narinfo through the
// proxy keeps it in ~/.cache/nix/binary-cache-v6.sqlite and, when it later
// substitutes the path, goes straight to the NAR without asking for the
// narinfo again. So the NAR handler, not the narinfo handler, is where an
// operator's change meets such a machine:
//
//   - a change that leaves the path approved (an unrelated deny entry, a
//     retry, an attestation import, another path's allowlist removal, a
//     restart with other decision settings) must not break its substitution;
//   - a change that ends the path's approval (deny, allowlist removal or
//     expiry, quarantine, a revoked attester key) must stop its NAR, whatever
//     narinfo the machine holds, with the same 404, header, metric and log
//     line a narinfo request would get.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// newFleetClient is a fleet machine: one HOME for its whole life (so one
// narinfo disk cache) at Nix's default narinfo TTLs. Each Substitute should
// follow FreshStore, so that only the narinfo cache carries over.
func newFleetClient(t testing.TB) *Client {
	t.Helper()
	c := newClient(t)
	c.DefaultNarinfoTTLs = true
	return c
}

// FreshStore points the client at a new, empty store; HOME (and with it the
// narinfo cache) stays.
func (c *Client) FreshStore(t testing.TB) {
	t.Helper()
	c.Root = filepath.Join(t.TempDir(), "client")
}

// narinfoCacheFile is where Nix keeps this HOME's narinfo cache.
func (c *Client) narinfoCacheFile() string {
	return filepath.Join(c.Home, ".cache", "nix", "binary-cache-v6.sqlite")
}

// CacheNarinfos has the client look paths up in the binary cache at url, as
// `nix path-info --store URL` does on a fleet machine, which fills its
// narinfo cache. It returns the NAR URL (relative, "nar/...") each narinfo
// names, as the client holds it.
func (c *Client) CacheNarinfos(t testing.TB, url, key string, paths ...StorePath) map[StorePath]string {
	t.Helper()
	args := []string{"--extra-experimental-features", "nix-command", "path-info", "--json", "--store", url,
		"--option", "substituters", url, "--option", "trusted-public-keys", key}
	for _, p := range paths {
		args = append(args, string(p))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nix", args...)
	cmd.Env = nixEnv(c.Home)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("nix path-info --store %s %v: %v\n%s", url, paths, err, stderr.String())
	}
	var infos []struct {
		Path string `json:"path"`
		URL  string `json:"url"`
	}
	if err := json.Unmarshal(out, &infos); err != nil {
		t.Fatalf("nix path-info --json: %v\n%s", err, out)
	}
	urls := map[StorePath]string{}
	for _, in := range infos {
		urls[StorePath(in.Path)] = in.URL
	}
	for _, p := range paths {
		if !strings.HasPrefix(urls[p], "nar/") {
			t.Fatalf("nix path-info through %s: no NAR URL for %s (got %q)\n%s", url, p, urls[p], out)
		}
	}
	if _, err := os.Stat(c.narinfoCacheFile()); err != nil {
		t.Fatalf("nix path-info through %s left no narinfo cache in the client's HOME: %v", url, err)
	}
	return urls
}

// requestCount is cacheproxy_http_requests_total summed over codes.
func (p *Proxy) requestCount(t testing.TB, handler string) float64 {
	t.Helper()
	return p.MetricSum(t, "cacheproxy_http_requests_total", map[string]string{"handler": handler})
}

// warmFleetClient is a new fleet machine that has looked up paths through
// px (so it holds their narinfos); it checks that the lookups reached px.
func warmFleetClient(t testing.TB, px *Proxy, paths ...StorePath) (*Client, map[StorePath]string) {
	t.Helper()
	cl := newFleetClient(t)
	before := px.requestCount(t, "narinfo")
	urls := cl.CacheNarinfos(t, px.URL, px.GatekeeperKey, paths...)
	if got := px.requestCount(t, "narinfo") - before; got < float64(len(paths)) {
		t.Fatalf("nix path-info of %d paths sent %v narinfo requests to the proxy, want >= %d", len(paths), got, len(paths))
	}
	return cl, urls
}

// fleetSubstitute has cl substitute paths from px into a fresh store, with
// only its narinfo cache carried over, and checks that the client did go
// straight to the NARs: no narinfo request reached the proxy meanwhile (the
// scenario under test), at least one NAR request did.
func fleetSubstitute(t testing.TB, cl *Client, px *Proxy, paths ...StorePath) (string, error) {
	t.Helper()
	cl.FreshStore(t)
	ni0, nar0 := px.requestCount(t, "narinfo"), px.requestCount(t, "nar")
	out, err := cl.Substitute(t, px.URL, px.GatekeeperKey, paths...)
	if d := px.requestCount(t, "narinfo") - ni0; d != 0 {
		t.Errorf("the fleet client sent %v narinfo requests to the proxy while substituting; want 0 (it holds the narinfos), so this run does not test the cached-narinfo path\n%s", d, out)
	}
	if d := px.requestCount(t, "nar") - nar0; d < 1 {
		t.Errorf("the fleet client sent no NAR request to the proxy while substituting %v\n%s", paths, out)
	}
	return out, err
}

// slogAttrRe matches one key=value of slog's text format.
var slogAttrRe = regexp.MustCompile(`([A-Za-z0-9_.]+)=("(?:[^"\\]|\\.)*"|\S*)`)

func slogAttrs(line string) map[string]string {
	attrs := map[string]string{}
	for _, m := range slogAttrRe.FindAllStringSubmatch(line, -1) {
		v := m[2]
		if strings.HasPrefix(v, `"`) {
			if u, err := strconv.Unquote(v); err == nil {
				v = u
			}
		}
		if _, seen := attrs[m[1]]; !seen {
			attrs[m[1]] = v
		}
	}
	return attrs
}

// rejectionLogLines counts the proxy's `level=WARN msg=rejected` lines for
// sp with reason.
func rejectionLogLines(logs string, sp StorePath, reason string) int {
	n := 0
	for _, line := range strings.Split(logs, "\n") {
		a := slogAttrs(line)
		if a["level"] == "WARN" && a["msg"] == "rejected" && a["path"] == string(sp) && a["reason"] == reason {
			n++
		}
	}
	return n
}

// expectNarRejected GETs the NAR URL a fleet client holds for sp and
// asserts the refusal is a rejection like a narinfo's: 404 with
// `X-Cacheproxy-Decision: rejected; reason=R`, one more
// cacheproxy_decisions_total{decision="rejected",reason=R}, and one more
// `level=WARN msg=rejected path=SP reason=R` log line.
func expectNarRejected(t testing.TB, px *Proxy, narURL string, sp StorePath, reason string) {
	t.Helper()
	labels := map[string]string{"decision": "rejected", "reason": reason}
	m0 := px.MetricSum(t, "cacheproxy_decisions_total", labels)
	l0 := rejectionLogLines(px.Logs(), sp, reason)
	path := "/" + strings.TrimPrefix(narURL, "/")
	resp, body, err := px.Get(t, path)
	want := "rejected; reason=" + reason
	switch {
	case err != nil && resp == nil:
		t.Errorf("GET %s (NAR of %s): %v", path, sp.Name(), err)
	case resp.StatusCode == 200:
		t.Errorf("GET %s: the proxy served the NAR of %s (%d bytes), which is no longer approved (want 404 %q)", path, sp.Name(), len(body), want)
	case resp.StatusCode != 404 || resp.Header.Get("X-Cacheproxy-Decision") != want:
		t.Errorf("GET %s (NAR of %s): got %d, X-Cacheproxy-Decision %q; want 404 with %q\nbody: %.300s",
			path, sp.Name(), resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"), want, body)
	}
	if d := px.MetricSum(t, "cacheproxy_decisions_total", labels) - m0; d < 1 {
		t.Errorf("GET %s (NAR of %s): cacheproxy_decisions_total{decision=\"rejected\",reason=%q} went up by %v, want >= 1", path, sp.Name(), reason, d)
	}
	deadline := time.Now().Add(2 * time.Second) // the log pipe is copied asynchronously
	for rejectionLogLines(px.Logs(), sp, reason) <= l0 {
		if time.Now().After(deadline) {
			t.Errorf("GET %s (NAR of %s): no new log line `level=WARN msg=rejected path=%s reason=%s`", path, sp.Name(), sp, reason)
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A fleet machine that holds a path's narinfo must still get the path after
// operator changes that leave it approved.
func TestFleetCachedNarinfoAfterAdminChange(t *testing.T) {
	t.Parallel()
	testFleetAdminChanges(t, false)
}

// The same with require_closure, where every admin change drops every
// stored decision.
func TestFleetCachedNarinfoAfterAdminChangeRequireClosure(t *testing.T) {
	t.Parallel()
	testFleetAdminChanges(t, true)
}

// testFleetAdminChanges: each subtest is a new machine. It looks up two
// attested closures through the proxy: one whose NARs the proxy already
// holds in its blob cache (fetched by another machine during setup) and
// one, new in this subtest, whose NARs it must still fetch upstream. Then
// the operator changes something, and the machine substitutes both into an
// empty store from what its narinfo cache holds.
func testFleetAdminChanges(t *testing.T, requireClosure bool) {
	cached := buildClosure(t, ClosureOpts{}) // NARs in the proxy's blob cache
	other := buildClosure(t, ClosureOpts{})  // another team's closure, for the changes
	up := newUpstream(t, upKey)
	up.Publish(t, "zstd", cached.App)
	up.Publish(t, "none", other.App) // none: its leaf's NAR gets swapped below
	cfg := ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key, rb2Key}, Quorum: 1, RequireClosure: requireClosure}
	px := startProxy(t, cfg)
	px.Attest(t, attestFile(t, rb1Key, cached.Paths()...))
	newClient(t).MustSubstitute(t, px.URL, px.GatekeeperKey, cached.App)
	px.MustCLI(t, "allow add", "--reason", "reviewed", string(other.App))
	px.Attest(t, attestFile(t, rb1Key, other.Leaf))
	// other.Leaf gets quarantined (its NAR swapped upstream, caught on
	// another machine's download), so that `retry` below lifts a real one.
	up.NarHook(t, other.Leaf, func(w http.ResponseWriter, r *http.Request, orig []byte) {
		flipContentByte(t, orig)
		serveBytes(w, orig)
	})
	if out, err := newClient(t).Substitute(t, px.URL, px.GatekeeperKey, other.Leaf); err == nil {
		t.Fatalf("fixture: a swapped NAR was substituted:\n%s", out)
	}
	up.SetHook(nil)
	px.ExpectRejected(t, other.Leaf, "nar_mismatch")
	attOther := attestFile(t, rb1Key, other.App)
	rb3Key, err := generateKey(t.TempDir(), "rebuilder-3")
	if err != nil {
		t.Fatalf("generating rebuilder-3 key: %v", err)
	}

	cases := []struct {
		name   string
		change func(t *testing.T, targets []StorePath)
	}{
		// The control: nothing changes (this passes whenever fleet clients work at all).
		{"no_change", func(t *testing.T, targets []StorePath) {}},
		{"deny_add_unrelated_glob", func(t *testing.T, targets []StorePath) {
			px.MustCLI(t, "deny add", "--reason", "CVE-2099-0002", "*-something-unrelated-*")
		}},
		{"retry_other_path", func(t *testing.T, targets []StorePath) {
			px.MustCLI(t, "retry", string(other.Leaf))
		}},
		{"attest_import_other_path", func(t *testing.T, targets []StorePath) {
			px.Attest(t, attOther)
		}},
		{"attest_import_same_paths_again", func(t *testing.T, targets []StorePath) {
			px.Attest(t, attestFile(t, rb1Key, targets...)) // already known
		}},
		{"attest_import_same_paths_second_attester", func(t *testing.T, targets []StorePath) {
			px.Attest(t, attestFile(t, rb2Key, targets...)) // new evidence for these very paths
		}},
		{"allow_remove_other_path", func(t *testing.T, targets []StorePath) {
			px.MustCLI(t, "allow remove", string(other.App))
		}},
		// Last: the restart's cleanup is this subtest's.
		{"restart_with_another_attester", func(t *testing.T, targets []StorePath) {
			cfg2 := cfg
			cfg2.Attesters = []*Key{rb1Key, rb2Key, rb3Key} // quorum stays 1
			px.RestartWith(t, cfg2)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fresh := buildClosure(t, ClosureOpts{}) // NARs not fetched yet
			up.Publish(t, "zstd", fresh.App)
			px.Attest(t, attestFile(t, rb1Key, fresh.Paths()...))
			targets := append(cached.Paths(), fresh.Paths()...)
			cl, _ := warmFleetClient(t, px, targets...)
			tc.change(t, targets)
			out, err := fleetSubstitute(t, cl, px, cached.App, fresh.App)
			if err != nil {
				t.Fatalf("after %s, a fleet machine holding the narinfos of %s (NARs cached by the proxy) and %s (NARs not yet fetched) could not substitute them (%v):\n%s",
					tc.name, cached.App, fresh.App, err, out)
			}
			for _, p := range targets {
				if !cl.Has(p) {
					t.Fatalf("after %s, %s is not in the fleet machine's store:\n%s", tc.name, p, out)
				}
				assertSameTree(t, string(p), cl.Path(p))
			}
		})
	}
}

// A path that lost its approval must not reach a fleet machine, whatever
// narinfo it holds: its NAR is refused like its narinfo would be. Each
// subtest has its own closure (app-0.1 -> leaf-1.0, leaf attested); the
// machine caches both narinfos while app is approved, app loses its
// approval, and the machine's substitution of app must fail at app's NAR.
func TestFleetRevokedPathNotServed(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upKey)
	cfg := ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}}
	px := startProxy(t, cfg)

	const expires = 3 * time.Second
	var allowedAt time.Time
	attest := func(t *testing.T, c Closure) { px.Attest(t, attestFile(t, rb1Key, c.App)) }
	deny := func(t *testing.T, c Closure) { px.MustCLI(t, "deny add", "--reason", "CVE-2099-0003", string(c.App)) }
	allow := func(t *testing.T, c Closure) { px.MustCLI(t, "allow add", "--reason", "reviewed", string(c.App)) }
	unallow := func(t *testing.T, c Closure) { px.MustCLI(t, "allow remove", string(c.App)) }
	cases := []struct {
		name    string
		reason  string
		approve func(t *testing.T, c Closure) // app's approval, before the machine looks it up
		revoke  func(t *testing.T, c Closure) // what ends it
		// narCached: another machine substitutes the closure before the
		// change, so app's NAR sits verified in the proxy's blob cache.
		narCached bool
	}{
		{name: "deny_add", reason: "denied", approve: attest, revoke: deny},
		{name: "deny_add_nar_cached", reason: "denied", approve: attest, revoke: deny, narCached: true},
		{name: "allow_remove", reason: "unattested", approve: allow, revoke: unallow},
		{name: "allow_remove_nar_cached", reason: "unattested", approve: allow, revoke: unallow, narCached: true},
		{name: "allow_expired", reason: "unattested",
			approve: func(t *testing.T, c Closure) {
				allowedAt = time.Now()
				px.MustCLI(t, "allow add", "--reason", "reviewed", "--expires", fmt.Sprintf("%ds", int(expires/time.Second)), string(c.App))
			},
			revoke: func(t *testing.T, c Closure) {
				time.Sleep(time.Until(allowedAt.Add(expires + 500*time.Millisecond)))
			}},
		{name: "quarantined", reason: "nar_mismatch", approve: attest,
			revoke: func(t *testing.T, c Closure) {
				// The upstream swaps app's NAR; another machine's download
				// makes the proxy quarantine app; then the upstream is fixed.
				up.NarHook(t, c.App, func(w http.ResponseWriter, r *http.Request, orig []byte) {
					flipContentByte(t, orig)
					serveBytes(w, orig)
				})
				defer up.SetHook(nil)
				other := newClient(t)
				if out, err := other.Substitute(t, px.URL, px.GatekeeperKey, c.App); err == nil || other.Has(c.App) {
					t.Fatalf("fixture: another machine substituted a swapped NAR:\n%s", out)
				}
				px.ExpectRejected(t, c.App, "nar_mismatch")
			}},
		// Last: the restart's cleanup is this subtest's. Revoking an
		// attester key takes effect at once, for machines holding narinfos too.
		{name: "attester_removed_at_restart", reason: "unattested", approve: attest, narCached: true,
			revoke: func(t *testing.T, c Closure) {
				cfg2 := cfg
				cfg2.Attesters = []*Key{}
				px.MustCLI(t, "allow add", "--reason", "reviewed", string(c.Leaf)) // the leaf stays approved
				px.RestartWith(t, cfg2)
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := buildClosure(t, ClosureOpts{})
			up.Publish(t, "none", c.App)
			px.Attest(t, attestFile(t, rb1Key, c.Leaf))
			tc.approve(t, c)
			cl, urls := warmFleetClient(t, px, c.Paths()...)
			if tc.narCached {
				newClient(t).MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
			}
			tc.revoke(t, c)
			out, err := fleetSubstitute(t, cl, px, c.App)
			if err == nil || cl.Has(c.App) {
				t.Errorf("after %s, a fleet machine holding the narinfo of %s substituted it (err=%v):\n%s", tc.name, c.App.Name(), err, out)
			} else if !cl.Has(c.Leaf) {
				t.Errorf("the fleet machine did not get %s, which stayed approved, so its failure says nothing about %s's NAR:\n%s", c.Leaf.Name(), c.App.Name(), out)
			}
			expectNarRejected(t, px, urls[c.App], c.App, tc.reason)
			px.ExpectRejected(t, c.App, tc.reason) // and the narinfo agrees
		})
	}
}
