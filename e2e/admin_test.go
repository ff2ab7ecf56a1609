package e2e

// Operators: explain, rejections, the admin API's auth, metrics, attestation
// import shapes and bad input, configuration errors, keygen, verify-cache.

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

func TestExplain(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, nil)
	f.attestClosure(t)
	f.Px.ExpectApproved(t, f.C.App)
	out := f.Px.MustCLI(t, "explain", "--json", string(f.C.App))
	var v any
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("explain --json is not JSON: %v\n%s", err, out)
	}
	for _, want := range []string{"approved", "attested", "rebuilder-1"} {
		if !strings.Contains(out, want) {
			t.Errorf("explain --json of an attested path lacks %q:\n%s", want, out)
		}
	}
	// The usage line's order (PATH then --json) and a bare hash work too.
	if out, errOut, err := f.Px.CLI(t, "explain", f.C.App.Hash(), "--json"); err != nil || json.Unmarshal([]byte(out), &v) != nil {
		t.Errorf("explain HASH --json (order of the usage line): %v\n%s%s", err, out, errOut)
	}
	plain := f.Px.MustCLI(t, "explain", f.C.App.Hash())
	if !strings.Contains(plain, "attested") {
		t.Errorf("explain HASH (text) does not mention the reason:\n%s", plain)
	}

	f.Px.MustCLI(t, "deny add", "--reason", "CVE-2099-0002", string(f.C.Leaf))
	out = f.Px.MustCLI(t, "explain", "--json", string(f.C.Leaf))
	for _, want := range []string{"rejected", "denied", "CVE-2099-0002"} {
		if !strings.Contains(out, want) {
			t.Errorf("explain --json of a denied path lacks %q:\n%s", want, out)
		}
	}
	// A bad argument is one sentence on stderr and a non-zero exit.
	_, errOut, err := f.Px.CLI(t, "explain", "not-a-store-path")
	if err == nil || strings.TrimSpace(errOut) == "" {
		t.Errorf("explain not-a-store-path: err=%v stderr=%q, want non-zero exit and a message", err, errOut)
	}
}

func TestRejectionsDerivers(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, nil)
	f.Px.ExpectRejected(t, f.C.App, "unattested")
	f.Px.ExpectRejected(t, f.C.Leaf, "unattested")
	out := f.Px.MustCLI(t, "rejections", "--derivers")
	for _, drv := range []StorePath{f.C.AppDrv, f.C.LeafDrv} {
		if !strings.Contains(out, string(drv)) {
			t.Errorf("rejections --derivers does not print %s (the .drv to rebuild):\n%s", drv, out)
		}
	}
	js := f.Px.MustCLI(t, "rejections", "--json")
	var v any
	if err := json.Unmarshal([]byte(js), &v); err != nil {
		t.Errorf("rejections --json is not JSON: %v\n%s", err, js)
	}
	if !strings.Contains(js, f.C.App.Hash()) || !strings.Contains(js, "unattested") {
		t.Errorf("rejections --json lacks the rejected path or its reason:\n%s", js)
	}
	// A denied path is no rebuild's to fix: its deriver is left out.
	f.Px.MustCLI(t, "deny add", "--reason", "test", string(f.C.Leaf))
	f.Px.ExpectRejected(t, f.C.Leaf, "denied")
	out = f.Px.MustCLI(t, "rejections", "--derivers")
	if !strings.Contains(out, string(f.C.AppDrv)) || strings.Contains(out, string(f.C.LeafDrv)) {
		t.Errorf("rejections --derivers after denying %s: want only %s:\n%s", f.C.Leaf.Name(), f.C.AppDrv, out)
	}
}

func TestAdminAPIAuth(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, nil)
	token := f.Px.AdminToken(t)
	if st, err := os.Stat(filepath.Join(f.Px.StateDir, "admin-token")); err == nil && st.Mode().Perm() != 0o600 {
		t.Errorf("admin-token mode %v, want 0600", st.Mode().Perm())
	}
	call := func(method, path, auth string, body []byte) (int, string) {
		req, _ := http.NewRequest(method, f.Px.AdminURL+path, bytes.NewReader(body))
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := httpClient.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode, b.String()
	}
	att, _ := os.ReadFile(attestFile(t, rb1Key, f.C.Paths()...))
	for _, auth := range []string{"", "Bearer wrong-token", "Bearer " + token + "x", "Basic " + token, token} {
		for _, r := range []struct{ m, p string }{{"GET", "/admin/v1/rejections"}, {"GET", "/admin/v1/allowlist"}, {"POST", "/admin/v1/attestations"}, {"GET", "/admin/v1/explain/" + f.C.App.Hash()}} {
			if code, body := call(r.m, r.p, auth, att); code != 401 {
				t.Errorf("%s %s with Authorization %q: %d, want 401\n%s", r.m, r.p, auth, code, body)
			}
		}
	}
	f.Px.ExpectRejected(t, f.C.App, "unattested") // nothing was imported without a token

	if code, body := call("POST", "/admin/v1/attestations", "Bearer "+token, []byte("{not json")); code != 400 || strings.TrimSpace(body) == "" {
		t.Errorf("POST malformed attestations: %d %q, want 400 with a message", code, body)
	}
	if code, body := call("POST", "/admin/v1/attestations", "Bearer "+token, att); code != 200 {
		t.Fatalf("POST /admin/v1/attestations with the token: %d\n%s", code, body)
	}
	f.Px.ExpectApproved(t, f.C.App)
	if code, body := call("GET", "/admin/v1/rejections", "Bearer "+token, nil); code != 200 {
		t.Errorf("GET /admin/v1/rejections with the token: %d\n%s", code, body)
	}
}

var specMetrics = []string{
	"cacheproxy_decisions_total",
	"cacheproxy_nar_verification_failures_total",
	"cacheproxy_http_requests_total",
	"cacheproxy_http_request_duration_seconds",
	"cacheproxy_upstream_requests_total",
	"cacheproxy_upstream_request_duration_seconds",
	"cacheproxy_cache_hits_total",
	"cacheproxy_cache_misses_total",
	"cacheproxy_cache_size_bytes",
	"cacheproxy_cache_evictions_total",
	"cacheproxy_served_bytes_total",
	"cacheproxy_attestations",
	"cacheproxy_allowlist_entries",
}

func TestMetricsNames(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "none", ProxyConfig{}, nil)
	f.attestClosure(t)
	newClient(t).MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App) // misses, upstream
	newClient(t).MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App) // hits, cache
	c2 := buildClosure(t, ClosureOpts{})
	f.Up.Publish(t, "none", c2.App)
	f.Px.MustCLI(t, "allow add", "--reason", "r", string(c2.App))
	f.Px.ExpectRejected(t, c2.Leaf, "unattested")
	f.Px.Attest(t, attestFile(t, rb1Key, c2.Leaf))
	tamperNar(t, f.Up, c2.Leaf, true)
	newClient(t).Substitute(t, f.Px.URL, f.Px.GatekeeperKey, c2.App) // a verification failure

	m := f.Px.Metrics(t)
	for _, name := range specMetrics {
		re := regexp.MustCompile(`(?m)^` + name + `(_bucket|_sum|_count)?[{ ]`)
		if !re.MatchString(m) {
			t.Errorf("/metrics has no samples of %s", name)
		}
	}
	if metricSum(m, "cacheproxy_attestations", nil) < 3 {
		t.Errorf("cacheproxy_attestations = %v, want >= 3", metricSum(m, "cacheproxy_attestations", nil))
	}
	if metricSum(m, "cacheproxy_cache_size_bytes", nil) <= 0 {
		t.Errorf("cacheproxy_cache_size_bytes = %v with two cached NARs, want > 0", metricSum(m, "cacheproxy_cache_size_bytes", nil))
	}
	if metricSum(m, "cacheproxy_upstream_requests_total", map[string]string{"kind": "nar"}) < 2 {
		t.Errorf("cacheproxy_upstream_requests_total{kind=\"nar\"} < 2:\n%s", grepLines(m, "cacheproxy_upstream_requests_total"))
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", m)
	}
}

// attestation import: every documented input shape, idempotence, reports.
func TestAttestImportShapes(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, upKey)
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	newC := func() Closure {
		c := buildClosure(t, ClosureOpts{})
		up.Publish(t, "zstd", c.App)
		return c
	}
	readInfos := func(file string) []map[string]any {
		b, _ := os.ReadFile(file)
		var infos []map[string]any
		if err := json.Unmarshal(b, &infos); err != nil {
			t.Fatal(err)
		}
		return infos
	}
	writeJSON := func(v any) string {
		b, _ := json.Marshal(v)
		f := filepath.Join(t.TempDir(), "in.json")
		os.WriteFile(f, b, 0o644)
		return f
	}
	expectAttested := func(name string, c Closure) {
		t.Helper()
		for _, p := range c.Paths() {
			if code, dec, body := px.NarinfoDecision(t, p); code != 200 {
				t.Errorf("%s: %s not approved after import: %d %q %s", name, p.Name(), code, dec, body)
			}
		}
	}

	t.Run("array_nix28", func(t *testing.T) {
		c := newC()
		file := attestFile(t, rb1Key, c.Paths()...)
		px.Attest(t, file)
		expectAttested("array", c)
		n := px.MetricSum(t, "cacheproxy_attestations", nil)
		px.Attest(t, file) // idempotent
		if n2 := px.MetricSum(t, "cacheproxy_attestations", nil); n2 != n {
			t.Errorf("re-importing the same attestations changed cacheproxy_attestations %v -> %v", n, n2)
		}
	})
	t.Run("object_keyed_by_path", func(t *testing.T) {
		c := newC()
		obj := map[string]any{}
		for _, info := range readInfos(attestFile(t, rb1Key, c.Paths()...)) {
			p := info["path"].(string)
			delete(info, "path")
			obj[p] = info
		}
		px.Attest(t, writeJSON(obj))
		expectAttested("object", c)
	})
	t.Run("json_format_2", func(t *testing.T) {
		// Nix >= 2.33 `--json-format 2`: basenames, storeDir, structured hashes.
		c := newC()
		info := map[string]any{}
		for i, in := range readInfos(attestFile(t, rb1Key, c.Paths()...)) {
			p := StorePath(in["path"].(string))
			h := strings.TrimPrefix(up.Narinfo(t, p).Get("NarHash"), "sha256:")
			hash := map[string]any{"algorithm": "sha256", "format": "nix32", "hash": h}
			if i == 1 {
				hash = map[string]any{"algorithm": "sha256", "format": "base16", "hash": hex.EncodeToString(nix32Decode(t, h))}
			}
			refs := []string{}
			for _, r := range in["references"].([]any) {
				refs = append(refs, filepath.Base(r.(string)))
			}
			info[p.Base()] = map[string]any{"version": 2, "storeDir": storeDir, "narHash": hash, "narSize": in["narSize"],
				"references": refs, "ca": nil, "signatures": in["signatures"]}
		}
		px.Attest(t, writeJSON(map[string]any{"version": 2, "storeDir": storeDir, "info": info}))
		expectAttested("json-format 2", c)
	})
	t.Run("hash_nix32_and_base16", func(t *testing.T) {
		c := newC()
		infos := readInfos(attestFile(t, rb1Key, c.Paths()...))
		for i, info := range infos {
			ni := up.Narinfo(t, StorePath(info["path"].(string)))
			if i == 0 {
				info["narHash"] = ni.Get("NarHash") // sha256:nix32
			} else {
				info["narHash"] = "sha256:" + hex.EncodeToString(nix32Decode(t, strings.TrimPrefix(ni.Get("NarHash"), "sha256:")))
			}
		}
		px.Attest(t, writeJSON(infos))
		expectAttested("nix32/base16", c)
	})
	t.Run("narinfo_text", func(t *testing.T) {
		c := newC()
		var texts []string
		for _, p := range c.Paths() {
			ni := up.Narinfo(t, p)
			ni.Del("Sig")
			ni.Add("Sig", rb1Key.Sign(ni.Fingerprint()))
			texts = append(texts, ni.String())
		}
		f := filepath.Join(t.TempDir(), "att.narinfo")
		os.WriteFile(f, []byte(strings.Join(texts, "\n")), 0o644)
		px.Attest(t, f)
		expectAttested("narinfo text", c)
	})
	t.Run("stdin", func(t *testing.T) {
		c := newC()
		b, _ := os.ReadFile(attestFile(t, rb1Key, c.Paths()...))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, cacheproxyBin, "attest", "import", "-c", px.CfgFile, "-")
		cmd.Stdin = bytes.NewReader(b)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("attest import - (stdin): %v\n%s", err, out)
		}
		expectAttested("stdin", c)
	})
	t.Run("bad_signature_reported", func(t *testing.T) {
		c := newC()
		ni := up.Narinfo(t, c.Leaf)
		bad := *ni
		bad.Keys, bad.Vals = append([]string(nil), ni.Keys...), append([]string(nil), ni.Vals...)
		bad.Set("NarSize", "1") // signed over a fingerprint that is not the one in the file
		sig := rb1Key.Sign(bad.Fingerprint())
		file := craftAttestation(t, rb1Key, ni)
		b, _ := os.ReadFile(file)
		var infos []map[string]any
		json.Unmarshal(b, &infos)
		infos[0]["signatures"] = []string{sig}
		out, errOut, _ := px.CLI(t, "attest import", writeJSON(infos))
		if !strings.Contains(out+errOut, c.Leaf.Hash()) {
			t.Errorf("attest import does not report the path with a bad signature:\n%s%s", out, errOut)
		}
		px.ExpectRejected(t, c.Leaf, "unattested")
	})
	t.Run("non_attester_key", func(t *testing.T) {
		c := newC()
		out, errOut, _ := px.CLI(t, "attest import", attestFile(t, strangerKey, c.Paths()...))
		if !strings.Contains(out+errOut, c.Leaf.Hash()) {
			t.Errorf("attest import does not report the paths without an attester signature:\n%s%s", out, errOut)
		}
		px.ExpectRejected(t, c.Leaf, "unattested")
	})
}

// Malformed input changes nothing.
func TestAttestImportMalformed(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "zstd", ProxyConfig{}, nil)
	good, _ := os.ReadFile(attestFile(t, rb1Key, f.C.Paths()...))
	before := f.Px.MetricSum(t, "cacheproxy_attestations", nil)
	inputs := map[string][]byte{
		"truncated_json": good[:len(good)-len(good)/3],
		"garbage":        []byte("\x00\x01 this is neither JSON nor a narinfo \xff\n"),
		"wrong_types":    []byte(`[{"path": 42, "narHash": true, "signatures": "x"}]`),
	}
	for name, in := range inputs {
		file := filepath.Join(t.TempDir(), name)
		os.WriteFile(file, in, 0o644)
		out, errOut, err := f.Px.CLI(t, "attest import", file)
		if err == nil {
			t.Errorf("%s: attest import exited 0 on malformed input\n%s", name, out)
		}
		if strings.TrimSpace(errOut) == "" {
			t.Errorf("%s: attest import failed without a message on stderr", name)
		}
	}
	if after := f.Px.MetricSum(t, "cacheproxy_attestations", nil); after != before {
		t.Errorf("malformed imports changed cacheproxy_attestations %v -> %v", before, after)
	}
	f.Px.ExpectRejected(t, f.C.App, "unattested")
	f.Px.ExpectRejected(t, f.C.Leaf, "unattested")
}

// Bad configuration is refused by check-config and serve, naming the key.
func TestBadConfig(t *testing.T) {
	t.Parallel()
	requireBinary(t)
	dir := t.TempDir()
	base := writeConfig(t, dir, freeAddr(t), freeAddr(t), filepath.Join(dir, "state"), ProxyConfig{
		Upstreams: []UpstreamSpec{{URL: "http://127.0.0.1:9", PublicKeys: []string{upKey.Pub}}},
		Attesters: []*Key{rb1Key},
	})
	baseText, _ := os.ReadFile(base)

	out, errOut, err := runCacheproxy(t, dir, "check-config", "-c", base)
	if err != nil {
		t.Fatalf("check-config of a valid config failed: %v\n%s%s\nconfig:\n%s", err, out, errOut, baseText)
	}
	if !strings.Contains(out, "127.0.0.1:9") {
		t.Errorf("check-config does not print the effective config (no upstream URL):\n%s", out)
	}

	replace := func(old, new string) func(string) string {
		return func(s string) string {
			if !strings.Contains(s, old) {
				panic("config template lacks " + old)
			}
			return strings.Replace(s, old, new, 1)
		}
	}
	cases := []struct {
		name, key string
		edit      func(string) string
	}{
		{"unknown_top_level_key", "frobnicate", func(s string) string { return "frobnicate = true\n" + s }},
		{"unknown_upstream_key", "colour", replace(`timeout = "5s"`, "timeout = \"5s\"\ncolour = \"red\"")},
		{"unknown_policy_key", "quorom", replace("[policy]\n", "[policy]\nquorom = 1\n")},
		{"bad_url", "url", replace(`url = "http://127.0.0.1:9"`, `url = "not a url"`)},
		{"bad_url_scheme", "url", replace(`url = "http://127.0.0.1:9"`, `url = "gopher://127.0.0.1:9"`)},
		{"bad_public_key_base64", "public_keys", replace(upKey.Pub, "up-1:!!!not-base64!!!")},
		{"bad_public_key_no_name", "public_keys", replace(upKey.Pub, strings.SplitN(upKey.Pub, ":", 2)[1])},
		{"bad_public_key_length", "public_keys", replace(upKey.Pub, "up-1:AAAA")},
		{"bad_attester_key", "attesters", replace(rb1Key.Pub, "rebuilder-1:AAAA")},
		{"quorum_above_attesters", "quorum", replace("quorum = 1", "quorum = 2")},
		{"unreadable_signing_key_file", "signing_key_file", func(s string) string {
			return "signing_key_file = \"/nonexistent/cacheproxy.sec\"\n" + s
		}},
		{"bad_mode", "mode", replace(`mode = "enforce"`, `mode = "yolo"`)},
		{"bad_timeout", "timeout", replace(`timeout = "5s"`, `timeout = "soon"`)},
		{"bad_max_size", "max_size", func(s string) string { return s + "\n[cache]\nmax_size = \"lots\"\n" }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := t.TempDir()
			cfg := filepath.Join(d, "bad.toml")
			text := tc.edit(string(baseText))
			text = strings.ReplaceAll(text, filepath.Join(dir, "state"), filepath.Join(d, "state"))
			os.WriteFile(cfg, []byte(text), 0o644)

			out, errOut, err := runCacheproxy(t, d, "check-config", "-c", cfg)
			if err == nil {
				t.Errorf("check-config accepted a config with %s\n%s\nconfig:\n%s", tc.name, out, text)
			} else if !strings.Contains(errOut, tc.key) {
				t.Errorf("check-config error does not name the key %q: %q", tc.key, errOut)
			}

			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, cacheproxyBin, "serve", "-c", cfg)
			cmd.Dir = d
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err = cmd.Run()
			switch {
			case ctx.Err() != nil:
				t.Errorf("serve kept running with a config with %s (killed after 15s)", tc.name)
			case err == nil:
				t.Errorf("serve exited 0 with a config with %s", tc.name)
			case !strings.Contains(stderr.String(), tc.key):
				t.Errorf("serve error does not name the key %q: %q", tc.key, stderr.String())
			}
		})
	}
}

func TestCLIHelp(t *testing.T) {
	t.Parallel()
	requireBinary(t)
	dir := t.TempDir()
	for _, cmd := range []string{"serve", "keygen", "pubkey", "check-config", "attest import", "allow add", "allow list",
		"allow remove", "deny add", "deny list", "deny remove", "explain", "rejections", "retry", "verify-cache", "rebuild"} {
		args := append(strings.Fields(cmd), "--help")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c := exec.CommandContext(ctx, cacheproxyBin, args...)
		c.Dir = dir
		var stdout, stderr bytes.Buffer
		c.Stdout, c.Stderr = &stdout, &stderr
		err := c.Run()
		if ctx.Err() != nil {
			err = fmt.Errorf("still running after 10s (did --help start the command?)")
		}
		cancel()
		out, errOut := stdout.String(), stderr.String()
		if err != nil || strings.TrimSpace(out+errOut) == "" {
			t.Errorf("cacheproxy %s --help: err=%v, output %q", cmd, err, out+errOut)
		}
	}
	if _, errOut, err := runCacheproxy(t, dir, "no-such-command"); err == nil || strings.TrimSpace(errOut) == "" {
		t.Errorf("unknown command: err=%v stderr=%q, want non-zero exit with a message", err, errOut)
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		t.Errorf("--help created %s in the working directory", e.Name())
	}
}

// keygen writes keys in Nix's own format: Nix signs with the .sec and
// verifies with the .pub.
func TestKeygen(t *testing.T) {
	t.Parallel()
	requireBinary(t)
	dir := t.TempDir()
	out, errOut, err := runCacheproxy(t, dir, "keygen", "fleet-test-1", "--dir", dir)
	if err != nil {
		t.Fatalf("keygen: %v\n%s%s", err, out, errOut)
	}
	sec, pub := filepath.Join(dir, "fleet-test-1.sec"), filepath.Join(dir, "fleet-test-1.pub")
	pubText, err := os.ReadFile(pub)
	if err != nil {
		t.Fatalf("keygen did not write %s: %v", pub, err)
	}
	if st, err := os.Stat(sec); err != nil {
		t.Fatalf("keygen did not write %s: %v", sec, err)
	} else if st.Mode().Perm()&0o077 != 0 {
		t.Errorf("secret key %s has mode %v, want no group/other access", sec, st.Mode().Perm())
	}
	c := buildClosure(t, ClosureOpts{})
	runNix(t, "nix", "store", "sign", "--key-file", sec, string(c.Leaf))
	runNix(t, "nix", "store", "verify", "--no-contents", "--sigs-needed", "1",
		"--option", "trusted-public-keys", strings.TrimSpace(string(pubText)), string(c.Leaf))
}

// verify-cache drops a corrupted blob; the next client re-fetches upstream.
func TestVerifyCache(t *testing.T) {
	t.Parallel()
	f := newFixture(t, "none", ProxyConfig{}, nil)
	f.attestClosure(t)
	newClient(t).MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	nar, _ := os.ReadFile(f.Up.NarFile(t, f.C.Leaf))
	var blob string
	filepath.WalkDir(f.Px.StateDir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if b, _ := os.ReadFile(path); bytes.Equal(b, nar) {
				blob = path
			}
		}
		return nil
	})
	if blob == "" {
		t.Fatalf("no file in the state dir %s holds the cached leaf NAR", f.Px.StateDir)
	}
	corrupt := append([]byte(nil), nar...)
	flipContentByte(t, corrupt)
	if err := os.WriteFile(blob, corrupt, 0o644); err != nil {
		t.Fatal(err)
	}
	n := f.Up.NarCount()
	out, errOut, _ := f.Px.CLI(t, "verify-cache")
	if !strings.Contains(out+errOut, f.C.Leaf.Hash()) && !strings.Contains(out+errOut, strings.TrimPrefix(f.Up.Narinfo(t, f.C.Leaf).Get("FileHash"), "sha256:")) && !strings.Contains(out+errOut, filepath.Base(blob)) {
		t.Errorf("verify-cache does not report the corrupted blob (path, file hash or blob name):\n%s%s", out, errOut)
	}
	if b, err := os.ReadFile(blob); err == nil && bytes.Equal(b, corrupt) {
		t.Errorf("verify-cache left the corrupted blob %s in place", blob)
	}
	cl := newClient(t)
	cl.MustSubstitute(t, f.Px.URL, f.Px.GatekeeperKey, f.C.App)
	assertSameTree(t, string(f.C.Leaf), cl.Path(f.C.Leaf))
	if f.Up.NarCount() != n+1 {
		t.Errorf("after verify-cache the leaf should be re-fetched once from upstream: %d upstream NAR requests, want %d", f.Up.NarCount(), n+1)
	}
}

func nix32Decode(t testing.TB, s string) []byte {
	t.Helper()
	b, err := nixbase32.DecodeString(s)
	if err != nil {
		t.Fatalf("bad nix32 %q: %v", s, err)
	}
	return b
}

// signing_key_file: the gatekeeper key is the configured one.
func TestSigningKeyFile(t *testing.T) {
	t.Parallel()
	key, err := generateKey(t.TempDir(), "org-gatekeeper-1")
	if err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, "zstd", ProxyConfig{SigningKeyFile: key.SecFile}, nil)
	if f.Px.GatekeeperKey != key.Pub {
		t.Errorf("pubkey printed %q, want the configured signing key %q", f.Px.GatekeeperKey, key.Pub)
	}
	f.attestClosure(t)
	ni := f.Px.ExpectApproved(t, f.C.App)
	if !verifySig(key.Pub, ni.Fingerprint(), strings.Join(filterPrefix(ni.GetAll("Sig"), key.Name+":"), "")) {
		t.Errorf("narinfo not signed by the configured key:\n%s", ni)
	}
	// Admin commands also work with --server/--token-file and no config.
	out, errOut, err := runCacheproxy(t, t.TempDir(), "allow", "list", "--server", f.Px.AdminURL, "--token-file", filepath.Join(f.Px.StateDir, "admin-token"))
	if err != nil {
		t.Errorf("allow list --server URL --token-file F: %v\n%s%s", err, out, errOut)
	}
}

func filterPrefix(ss []string, prefix string) []string {
	var r []string
	for _, s := range ss {
		if strings.HasPrefix(s, prefix) {
			r = append(r, s)
		}
	}
	return r
}

// `cacheproxy serve` with no config and no flags starts (on 127.0.0.1:5480,
// admin on :5481, state in ./cacheproxy-state) and `cacheproxy allow list`
// from the same directory works with no configuration.
func TestZeroConfig(t *testing.T) {
	requireBinary(t)
	for _, a := range []string{"127.0.0.1:5480", "127.0.0.1:5481"} {
		l, err := net.Listen("tcp", a)
		if err != nil {
			t.Skipf("default address %s is busy, cannot test the zero-config start: %v", a, err)
		}
		l.Close()
	}
	dir := t.TempDir()
	var logs syncBuffer
	cmd := exec.Command(cacheproxyBin, "serve")
	cmd.Dir = dir
	cmd.Env = append(filterEnv(filterEnv(os.Environ(), "STATE_DIRECTORY="), "CACHEPROXY_CONFIG="), "HOME="+dir)
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	defer func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("serve log:\n%s", logs.String())
		}
	}()
	eventually(t, 20*time.Second, func() error {
		select {
		case <-done:
			t.Fatalf("serve with no config exited: %v\n%s", cmd.ProcessState, logs.String())
		default:
		}
		resp, err := http.Get("http://127.0.0.1:5480/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("healthz %d", resp.StatusCode)
		}
		return nil
	})
	st, err := os.Stat(filepath.Join(dir, "cacheproxy-state", "admin-token"))
	if err != nil {
		t.Fatalf("no admin token in ./cacheproxy-state: %v", err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("admin-token mode %v, want 0600", st.Mode().Perm())
	}
	out, errOut, err := runCacheproxy(t, dir, "allow", "list")
	if err != nil {
		t.Errorf("allow list from the same directory with no configuration: %v\n%s%s", err, out, errOut)
	}
	pub, errOut, err := runCacheproxy(t, dir, "pubkey")
	if err != nil || strings.TrimSpace(pub) == "" || !strings.Contains(logs.String(), strings.TrimSpace(pub)) {
		t.Errorf("pubkey (%v %s) should print the key serve generated and logged", err, errOut)
	}
}

func filterEnv(env []string, prefix string) []string {
	var r []string
	for _, kv := range env {
		if !strings.HasPrefix(kv, prefix) {
			r = append(r, kv)
		}
	}
	return r
}
