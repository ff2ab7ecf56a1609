// Package e2e drives the real cacheproxy binary with the real Nix client.
//
// Harness overview (everything here is usable from any test in the package):
//
//	requireBinary(t)                       fail clearly when ./cmd/cacheproxy did not build
//	buildClosure(t, opts) Closure          app-0.1 -> leaf-1.0, unique per test (nonce = test name)
//	addFixedCA(t) StorePath                a fixed:r:sha256 content-addressed path (nix-store --add-fixed --recursive)
//	upKey, up2Key, rb1Key, rb2Key, strangerKey   *Key (generated once in TestMain)
//	newUpstream(t, key) *Upstream          on-disk binary cache served by a counting, hookable httptest server
//	   .Publish(t, compression, paths...)  nix copy --to file://DIR?compression=C&secret-key=... (only key's Sig lands)
//	   .Narinfo / .PutNarinfo / .Resign / .NarFile / .SetHook / .Count / .NarCount / .Spec
//	attestFile(t, key, paths...) string    nix store sign + nix path-info --json --sigs, filtered to key's sigs
//	startProxy(t, ProxyConfig) *Proxy      config TOML + `cacheproxy serve -c`, waits for /healthz, killed at cleanup
//	   .CLI / .MustCLI / .Get / .NarinfoDecision / .ExpectRejected / .ExpectApproved / .Metrics / .MetricSum
//	newClient(t) *Client                   throwaway chroot store + isolated HOME; .Substitute(t, url, key, paths...)
//	   .DefaultNarinfoTTLs                 keep Nix's narinfo cache TTLs (30 days / 1 hour) instead of 0
//	newFleetClient(t) *Client              (fleet_test.go) a fleet machine: default TTLs, one HOME, fresh store per run;
//	   .CacheNarinfos / .FreshStore        nix path-info through the proxy fills the HOME's narinfo cache
//	Proxy.RestartWith(t, cfg)              restart on a rewritten config (same addresses and state dir)
//	assertSameTree(t, a, b)                recursive content/mode/symlink comparison
//	Upstream.publishSynth(t, rng, name, n) (synth_test.go) a store object made in Go, no nix-build;
//	   Proxy.fetchSynth(t, obj)            narinfo then NAR, a complete 200 checked against NarHash
//	ProxyConfig.StateDir                   put the state dir elsewhere (diskfull_test.go: on a tmpfs)
//	rebuildQueue(t, px) / withReport(t, file, report)   (rebuild_test.go) GET /admin/v1/rebuild-queue;
//	                                       add a rebuilder's "cacheproxy" report to an attestFile
//	runRebuild(t, px)                      (rebuildcmd_test.go) the real `cacheproxy rebuild --once` as rebuilder-1
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

const storeDir = "/nix/store"

var (
	moduleRoot    string
	workDir       string // package-wide temp dir
	nixHome       string // HOME/XDG_CACHE_HOME for fixture-side nix commands
	cacheproxyBin string
	buildErr      error

	upKey, up2Key, rb1Key, rb2Key, strangerKey *Key
)

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

func runMain(m *testing.M) int {
	for _, tool := range []string{"nix-store", "nix", "nix-build"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") != "" {
				fmt.Fprintf(os.Stderr, "FATAL: e2e tests need the Nix client but %s is not on PATH (CI is set, refusing to skip)\n", tool)
				return 1
			}
			fmt.Printf("SKIP: e2e tests need the Nix client (nix-store, nix, nix-build); %s is not on PATH\n", tool)
			return 0
		}
	}
	wd, err := os.Getwd()
	if err != nil {
		fmt.Fprintln(os.Stderr, "FATAL:", err)
		return 1
	}
	moduleRoot = filepath.Dir(wd)
	if _, err := os.Stat(filepath.Join(moduleRoot, "go.mod")); err != nil {
		fmt.Fprintf(os.Stderr, "FATAL: module root %s has no go.mod (run go test from the e2e dir)\n", moduleRoot)
		return 1
	}
	workDir, err = os.MkdirTemp("", "cacheproxy-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "FATAL:", err)
		return 1
	}
	defer os.RemoveAll(workDir)
	nixHome = filepath.Join(workDir, "nixhome")
	os.MkdirAll(nixHome, 0o755)

	// The binary. CACHEPROXY_BIN lets a developer reuse a prebuilt one.
	if b := os.Getenv("CACHEPROXY_BIN"); b != "" {
		cacheproxyBin = b
	} else {
		cacheproxyBin = filepath.Join(workDir, "cacheproxy")
		goTool, lerr := exec.LookPath("go")
		if lerr != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		cmd := exec.Command(goTool, "build", "-o", cacheproxyBin, "./cmd/cacheproxy")
		cmd.Dir = moduleRoot
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/cacheproxy failed: %v\n%s", err, out)
			fmt.Fprintf(os.Stderr, "WARNING: %v\n(tests that need the binary will fail; harness self-tests still run)\n", buildErr)
		}
	}

	keyDir := filepath.Join(workDir, "keys")
	os.MkdirAll(keyDir, 0o700)
	for _, k := range []struct {
		dst  **Key
		name string
	}{{&upKey, "up-1"}, {&up2Key, "up2-1"}, {&rb1Key, "rebuilder-1"}, {&rb2Key, "rebuilder-2"}, {&strangerKey, "stranger-1"}} {
		key, err := generateKey(keyDir, k.name)
		if err != nil {
			fmt.Fprintln(os.Stderr, "FATAL: generating key:", err)
			return 1
		}
		*k.dst = key
	}
	return m.Run()
}

// requireBinary fails the test when the cacheproxy binary is not available.
func requireBinary(t testing.TB) {
	t.Helper()
	if buildErr != nil {
		t.Fatalf("cacheproxy binary not available, cannot run this test: %v", buildErr)
	}
}

// ---------------------------------------------------------------- nix helpers

func nixEnv(home string) []string {
	env := []string{}
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "HOME=") || strings.HasPrefix(kv, "XDG_CACHE_HOME=") || strings.HasPrefix(kv, "NIX_CONFIG=") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "HOME="+home, "XDG_CACHE_HOME="+filepath.Join(home, ".cache"))
}

// runNix runs a Nix tool on the fixture side (local /nix/store, no
// substituters) and returns stdout; it fails the test on error.
func runNix(t testing.TB, tool string, args ...string) string {
	t.Helper()
	out, errOut, err := runNixE(tool, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", tool, strings.Join(args, " "), err, errOut)
	}
	return out
}

func runNixE(tool string, args ...string) (string, string, error) {
	if tool == "nix" {
		args = append([]string{"--extra-experimental-features", "nix-command"}, args...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, tool, args...)
	cmd.Env = nixEnv(nixHome)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// StorePath is a full store path such as /nix/store/<hash>-<name>.
type StorePath string

func (p StorePath) Base() string { return filepath.Base(string(p)) }
func (p StorePath) Hash() string { return p.Base()[:32] }
func (p StorePath) Name() string { return p.Base()[33:] }

// Closure is the two-path fixture app-0.1 -> leaf-1.0.
type Closure struct {
	App, Leaf       StorePath
	AppDrv, LeafDrv StorePath // deriver .drv paths
	Nonce           string
}

// Paths returns leaf then app (closure order).
func (c Closure) Paths() []StorePath { return []StorePath{c.Leaf, c.App} }

type ClosureOpts struct {
	Nonce   string // default: sanitized test name + timestamp
	BigSize int    // bytes of random payload in app (0 = tiny)
}

var nonceRe = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// buildClosure builds a fresh app-0.1 -> leaf-1.0 closure whose contents are
// unique to this test (so nothing collides in /nix/store or client caches).
func buildClosure(t testing.TB, opts ClosureOpts) Closure {
	t.Helper()
	nonce := opts.Nonce
	if nonce == "" {
		nonce = fmt.Sprintf("%s-%d", t.Name(), time.Now().UnixNano())
	}
	nonce = nonceRe.ReplaceAllString(nonce, "_")
	expr := filepath.Join(moduleRoot, "e2e", "testdata", "closure.nix")
	out := runNix(t, "nix-build", "--no-out-link", expr,
		"--argstr", "nonce", nonce, "--arg", "bigSize", strconv.Itoa(opts.BigSize),
		"--option", "substituters", "")
	app := StorePath(strings.TrimSpace(lastLine(out)))
	refs := strings.Fields(runNix(t, "nix-store", "-q", "--references", string(app)))
	if len(refs) != 1 {
		t.Fatalf("fixture %s: expected exactly one reference, got %v", app, refs)
	}
	c := Closure{App: app, Leaf: StorePath(refs[0]), Nonce: nonce}
	c.AppDrv = StorePath(strings.TrimSpace(runNix(t, "nix-store", "-q", "--deriver", string(app))))
	c.LeafDrv = StorePath(strings.TrimSpace(runNix(t, "nix-store", "-q", "--deriver", string(c.Leaf))))
	return c
}

// addFixedCA adds a directory with unique content as a fixed-output,
// recursive sha256 content-addressed path (CA: fixed:r:sha256:...).
func addFixedCA(t testing.TB) StorePath {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca-"+nonceRe.ReplaceAllString(t.Name(), "_"))
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "file"), []byte(fmt.Sprintf("ca content %s %d\n", t.Name(), time.Now().UnixNano())), 0o644)
	out := runNix(t, "nix-store", "--add-fixed", "--recursive", "sha256", dir)
	return StorePath(strings.TrimSpace(lastLine(out)))
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// ---------------------------------------------------------------- keys

// Key is a Nix binary-cache signing key pair.
type Key struct {
	Name    string
	Pub     string // "name:base64" for trusted-public-keys / config
	SecFile string
	PubFile string
	priv    ed25519.PrivateKey
}

func generateKey(dir, name string) (*Key, error) {
	sec, pub := filepath.Join(dir, name+".sec"), filepath.Join(dir, name+".pub")
	if _, errOut, err := runNixE("nix-store", "--generate-binary-cache-key", name, sec, pub); err != nil {
		return nil, fmt.Errorf("%v: %s", err, errOut)
	}
	secText, err := os.ReadFile(sec)
	if err != nil {
		return nil, err
	}
	pubText, err := os.ReadFile(pub)
	if err != nil {
		return nil, err
	}
	n, b64, ok := strings.Cut(strings.TrimSpace(string(secText)), ":")
	if !ok || n != name {
		return nil, fmt.Errorf("unexpected secret key format %q", secText)
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("secret key %s: %v (len %d)", name, err, len(raw))
	}
	return &Key{Name: name, Pub: strings.TrimSpace(string(pubText)), SecFile: sec, PubFile: pub, priv: ed25519.PrivateKey(raw)}, nil
}

// Sign returns a Nix signature line value "name:base64" over fingerprint fp.
func (k *Key) Sign(fp string) string {
	return k.Name + ":" + base64.StdEncoding.EncodeToString(ed25519.Sign(k.priv, []byte(fp)))
}

// ---------------------------------------------------------------- hashes

// nix32 encodes bytes in Nix's base32 (as in narinfo FileHash/NarHash).
func nix32(b []byte) string { return nixbase32.EncodeToString(b) }

func sha256Nix32(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + nix32(s[:])
}

// ---------------------------------------------------------------- narinfo

// Narinfo is an order-preserving narinfo, for rewriting upstream files.
type Narinfo struct {
	Keys, Vals []string
}

func parseNarinfo(s string) (*Narinfo, error) {
	ni := &Narinfo{}
	for _, line := range strings.Split(s, "\n") {
		if line == "" {
			continue
		}
		k, v, ok := strings.Cut(line, ": ")
		if !ok {
			if strings.HasSuffix(line, ":") { // "References:" with nothing after
				k, v = strings.TrimSuffix(line, ":"), ""
			} else {
				return nil, fmt.Errorf("bad narinfo line %q", line)
			}
		}
		ni.Keys, ni.Vals = append(ni.Keys, k), append(ni.Vals, v)
	}
	return ni, nil
}

func (ni *Narinfo) Get(k string) string {
	for i, kk := range ni.Keys {
		if kk == k {
			return ni.Vals[i]
		}
	}
	return ""
}

func (ni *Narinfo) GetAll(k string) []string {
	var r []string
	for i, kk := range ni.Keys {
		if kk == k {
			r = append(r, ni.Vals[i])
		}
	}
	return r
}

func (ni *Narinfo) Set(k, v string) {
	for i, kk := range ni.Keys {
		if kk == k {
			ni.Vals[i] = v
			return
		}
	}
	ni.Add(k, v)
}

func (ni *Narinfo) Add(k, v string) { ni.Keys, ni.Vals = append(ni.Keys, k), append(ni.Vals, v) }

func (ni *Narinfo) Del(k string) {
	var ks, vs []string
	for i, kk := range ni.Keys {
		if kk != k {
			ks, vs = append(ks, kk), append(vs, ni.Vals[i])
		}
	}
	ni.Keys, ni.Vals = ks, vs
}

func (ni *Narinfo) String() string {
	var b strings.Builder
	for i, k := range ni.Keys {
		b.WriteString(k + ": " + ni.Vals[i] + "\n")
	}
	return b.String()
}

// Fingerprint is Nix's: 1;<path>;<narHash>;<narSize>;<sorted full refs>.
func (ni *Narinfo) Fingerprint() string {
	var refs []string
	for _, r := range strings.Fields(ni.Get("References")) {
		refs = append(refs, storeDir+"/"+r)
	}
	sort.Strings(refs)
	return fmt.Sprintf("1;%s;%s;%s;%s", ni.Get("StorePath"), ni.Get("NarHash"), ni.Get("NarSize"), strings.Join(refs, ","))
}

// ---------------------------------------------------------------- upstream

// Upstream is an on-disk binary cache served over loopback HTTP by a handler
// that counts requests per URL path and can be made to lie via SetHook.
type Upstream struct {
	Dir string
	Key *Key
	URL string
	srv *httptest.Server

	mu     sync.Mutex
	counts map[string]int
	hook   func(w http.ResponseWriter, r *http.Request) bool
}

func newUpstream(t testing.TB, key *Key) *Upstream {
	t.Helper()
	u := &Upstream{Dir: filepath.Join(t.TempDir(), "upstream"), Key: key, counts: map[string]int{}}
	os.MkdirAll(u.Dir, 0o755)
	os.WriteFile(filepath.Join(u.Dir, "nix-cache-info"), []byte("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"), 0o644)
	files := http.FileServer(http.Dir(u.Dir))
	u.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.mu.Lock()
		u.counts[r.URL.Path]++
		hook := u.hook
		u.mu.Unlock()
		if hook != nil && hook(w, r) {
			return
		}
		files.ServeHTTP(w, r)
	}))
	u.URL = u.srv.URL
	t.Cleanup(u.srv.Close)
	return u
}

// SetHook installs h; when it returns true the request is considered handled.
// nil removes the hook.
func (u *Upstream) SetHook(h func(w http.ResponseWriter, r *http.Request) bool) {
	u.mu.Lock()
	u.hook = h
	u.mu.Unlock()
}

// FailAll makes every request answer status (e.g. 503).
func (u *Upstream) FailAll(status int) {
	u.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("Retry-After", "1")
		http.Error(w, http.StatusText(status), status)
		return true
	})
}

// Count is the number of requests seen for an exact URL path.
func (u *Upstream) Count(path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[path]
}

// NarCount is the number of requests for any /nar/ URL.
func (u *Upstream) NarCount() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for p, c := range u.counts {
		if strings.HasPrefix(p, "/nar/") {
			n += c
		}
	}
	return n
}

func (u *Upstream) NarinfoCount(p StorePath) int { return u.Count("/" + p.Hash() + ".narinfo") }

// Spec is this upstream as a config entry trusting its key.
func (u *Upstream) Spec() UpstreamSpec {
	return UpstreamSpec{URL: u.URL, PublicKeys: []string{u.Key.Pub}}
}

// Publish copies paths (and their closures) into the cache with the given
// compression (xz, zstd, bzip2, none, br), signed with the upstream key by
// the store's secret-key parameter. Only this key's Sig lines are kept in the
// narinfos, whatever signatures the local store DB holds.
func (u *Upstream) Publish(t testing.TB, compression string, paths ...StorePath) {
	t.Helper()
	args := []string{"copy", "--to", fmt.Sprintf("file://%s?compression=%s&secret-key=%s", u.Dir, compression, u.Key.SecFile),
		"--option", "substituters", ""}
	for _, p := range paths {
		args = append(args, string(p))
	}
	runNix(t, "nix", args...)
	qargs := []string{"-qR"}
	for _, p := range paths {
		qargs = append(qargs, string(p))
	}
	for _, p := range strings.Fields(runNix(t, "nix-store", qargs...)) {
		ni := u.Narinfo(t, StorePath(p))
		sigs := ni.GetAll("Sig")
		ni.Del("Sig")
		for _, s := range sigs {
			if strings.HasPrefix(s, u.Key.Name+":") {
				ni.Add("Sig", s)
			}
		}
		u.PutNarinfo(t, StorePath(p), ni)
	}
}

func (u *Upstream) narinfoFile(p StorePath) string { return filepath.Join(u.Dir, p.Hash()+".narinfo") }

// Narinfo reads the upstream narinfo of p.
func (u *Upstream) Narinfo(t testing.TB, p StorePath) *Narinfo {
	t.Helper()
	b, err := os.ReadFile(u.narinfoFile(p))
	if err != nil {
		t.Fatalf("upstream narinfo of %s: %v", p, err)
	}
	ni, err := parseNarinfo(string(b))
	if err != nil {
		t.Fatalf("upstream narinfo of %s: %v", p, err)
	}
	return ni
}

// PutNarinfo replaces the upstream narinfo of p.
func (u *Upstream) PutNarinfo(t testing.TB, p StorePath, ni *Narinfo) {
	t.Helper()
	u.PutRaw(t, p.Hash()+".narinfo", []byte(ni.String()))
}

// PutRaw writes any file into the cache dir (e.g. a garbage narinfo).
func (u *Upstream) PutRaw(t testing.TB, name string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(u.Dir, name), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// Resign drops all Sig lines and signs ni's (current) fingerprint with key.
func (u *Upstream) Resign(ni *Narinfo, key *Key) {
	ni.Del("Sig")
	ni.Add("Sig", key.Sign(ni.Fingerprint()))
}

// NarFile is the on-disk path of p's (compressed) NAR file.
func (u *Upstream) NarFile(t testing.TB, p StorePath) string {
	t.Helper()
	return filepath.Join(u.Dir, u.Narinfo(t, p).Get("URL"))
}

// ---------------------------------------------------------------- attestations

// attestFile signs paths with key via `nix store sign` (as a rebuilder does)
// and writes `nix path-info --json --sigs` for them, with the signature lists
// filtered to key's own signatures, into a temp file; it returns the file.
func attestFile(t testing.TB, key *Key, paths ...StorePath) string {
	t.Helper()
	args := []string{"store", "sign", "--key-file", key.SecFile}
	for _, p := range paths {
		args = append(args, string(p))
	}
	runNix(t, "nix", args...)
	js := pathInfoJSON(t, paths...)
	var infos []map[string]any
	if err := json.Unmarshal([]byte(js), &infos); err != nil {
		t.Fatalf("nix path-info --json output is not the expected array: %v\n%s", err, js)
	}
	for _, info := range infos {
		var keep []any
		sigs, _ := info["signatures"].([]any)
		for _, s := range sigs {
			if str, _ := s.(string); strings.HasPrefix(str, key.Name+":") {
				keep = append(keep, str)
			}
		}
		info["signatures"] = keep
	}
	out, _ := json.Marshal(infos)
	f := filepath.Join(t.TempDir(), "attest-"+key.Name+".json")
	if err := os.WriteFile(f, out, 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

func pathInfoJSON(t testing.TB, paths ...StorePath) string {
	t.Helper()
	args := []string{"path-info", "--json", "--sigs"}
	for _, p := range paths {
		args = append(args, string(p))
	}
	return runNix(t, "nix", args...)
}

// craftAttestation writes a Nix 2.8 style path-info JSON array for ni, signed
// in Go by key over ni's fingerprint (ni may have been altered).
func craftAttestation(t testing.TB, key *Key, nis ...*Narinfo) string {
	t.Helper()
	var infos []map[string]any
	for _, ni := range nis {
		refs := []string{}
		for _, r := range strings.Fields(ni.Get("References")) {
			refs = append(refs, storeDir+"/"+r)
		}
		size, _ := strconv.ParseInt(ni.Get("NarSize"), 10, 64)
		infos = append(infos, map[string]any{
			"path": ni.Get("StorePath"), "narHash": ni.Get("NarHash"), "narSize": size,
			"references": refs, "signatures": []string{key.Sign(ni.Fingerprint())},
		})
	}
	out, _ := json.Marshal(infos)
	f := filepath.Join(t.TempDir(), fmt.Sprintf("crafted-%s-%d.json", key.Name, time.Now().UnixNano()))
	if err := os.WriteFile(f, out, 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// ---------------------------------------------------------------- proxy

type UpstreamSpec struct {
	URL        string
	PublicKeys []string
	Timeout    string // default "5s"
}

type ProxyConfig struct {
	Upstreams        []UpstreamSpec
	Attesters        []*Key
	Quorum           int // default 1 when attesters are given
	ContentAddressed bool
	RequireClosure   bool
	Mode             string // "" = enforce
	SigningKeyFile   string // top-level signing_key_file, if set
	ServeCompression string // top-level serve_compression, if set
	Extra            string // raw TOML appended at the end (e.g. a [cache] table)
	Top              string // raw TOML of top-level keys, written before the first table
	StateDir         string // default <proxy dir>/state
}

// Proxy is a running `cacheproxy serve`.
type Proxy struct {
	Dir, CfgFile, StateDir string
	Addr, AdminAddr        string
	URL, AdminURL          string
	GatekeeperKey          string
	cmd                    *exec.Cmd
	logs                   *syncBuffer
	exited                 chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func tomlStr(s string) string { return strconv.Quote(s) }

func tomlList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = tomlStr(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

// writeConfig renders cfg into dir/cacheproxy.toml and returns the file.
func writeConfig(t testing.TB, dir, listen, adminListen, stateDir string, cfg ProxyConfig) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "listen = %s\nstate_dir = %s\n", tomlStr(listen), tomlStr(stateDir))
	mode := cfg.Mode
	if mode == "" {
		mode = "enforce"
	}
	fmt.Fprintf(&b, "mode = %s\n", tomlStr(mode))
	if cfg.SigningKeyFile != "" {
		fmt.Fprintf(&b, "signing_key_file = %s\n", tomlStr(cfg.SigningKeyFile))
	}
	b.WriteString(cfg.Top)
	if cfg.ServeCompression != "" {
		fmt.Fprintf(&b, "serve_compression = %s\n", tomlStr(cfg.ServeCompression))
	}
	b.WriteString("\n")
	for _, u := range cfg.Upstreams {
		to := u.Timeout
		if to == "" {
			to = "5s"
		}
		fmt.Fprintf(&b, "[[upstreams]]\nurl = %s\npublic_keys = %s\ntimeout = %s\n\n", tomlStr(u.URL), tomlList(u.PublicKeys), tomlStr(to))
	}
	var att []string
	for _, k := range cfg.Attesters {
		att = append(att, k.Pub)
	}
	q := cfg.Quorum
	if q == 0 && len(att) > 0 {
		q = 1
	}
	if att == nil {
		att = []string{}
	}
	fmt.Fprintf(&b, "[policy]\nattesters = %s\n", tomlList(att))
	if q > 0 {
		fmt.Fprintf(&b, "quorum = %d\n", q)
	}
	fmt.Fprintf(&b, "content_addressed = %v\nrequire_closure = %v\n\n", cfg.ContentAddressed, cfg.RequireClosure)
	fmt.Fprintf(&b, "[admin]\nlisten = %s\n\n", tomlStr(adminListen))
	b.WriteString(cfg.Extra)
	f := filepath.Join(dir, "cacheproxy.toml")
	if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return f
}

// startProxy writes a config for cfg, starts `cacheproxy serve -c FILE`,
// waits for /healthz, fetches the gatekeeper key, and stops it at cleanup
// (its log goes to the test log if the test failed).
func startProxy(t testing.TB, cfg ProxyConfig) *Proxy {
	t.Helper()
	p := newProxy(t, cfg)
	p.start(t)
	return p
}

// newProxy writes a config for cfg in a new directory, with free ports,
// and returns the Proxy that would run it.
func newProxy(t testing.TB, cfg ProxyConfig) *Proxy {
	t.Helper()
	requireBinary(t)
	dir := t.TempDir()
	p := &Proxy{Dir: dir, StateDir: filepath.Join(dir, "state"), Addr: freeAddr(t), AdminAddr: freeAddr(t)}
	if cfg.StateDir != "" {
		p.StateDir = cfg.StateDir
	}
	p.URL, p.AdminURL = "http://"+p.Addr, "http://"+p.AdminAddr
	p.CfgFile = writeConfig(t, dir, p.Addr, p.AdminAddr, p.StateDir, cfg)
	return p
}

func (p *Proxy) start(t testing.TB) {
	t.Helper()
	cmd, exited := p.launch(t)
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-exited:
			cfgText, _ := os.ReadFile(p.CfgFile)
			t.Fatalf("cacheproxy serve exited during startup (%v)\nconfig:\n%s\nlog:\n%s", cmd.ProcessState, cfgText, p.logs.String())
		default:
		}
		resp, err := http.Get(p.URL + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("cacheproxy serve: /healthz not 200 within 20s (last: %v)\nlog:\n%s", err, p.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	out, errOut, err := p.CLI(t, "pubkey")
	if err != nil {
		t.Fatalf("cacheproxy pubkey -c %s: %v\n%s", p.CfgFile, err, errOut)
	}
	p.GatekeeperKey = strings.TrimSpace(lastLine(out))
	if !regexp.MustCompile(`^[^:\s]+:[A-Za-z0-9+/]{43}=$`).MatchString(p.GatekeeperKey) {
		t.Fatalf("cacheproxy pubkey printed %q, want one line name:base64(32 bytes)", out)
	}
}

// launch starts `cacheproxy serve -c CFG` and stops it at cleanup (its
// log goes to the test log if the test failed); it does not wait for it.
func (p *Proxy) launch(t testing.TB) (*exec.Cmd, chan struct{}) {
	t.Helper()
	p.logs = &syncBuffer{}
	p.exited = make(chan struct{})
	p.cmd = exec.Command(cacheproxyBin, "serve", "-c", p.CfgFile)
	p.cmd.Dir = p.Dir
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting cacheproxy serve: %v", err)
	}
	cmd, exited := p.cmd, p.exited
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("---- cacheproxy serve log (%s) ----\n%s", p.CfgFile, p.logs.String())
		}
	})
	return cmd, exited
}

func (p *Proxy) stop() {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.exited
	}
}

// Restart stops and starts the server again with the same config and state.
func (p *Proxy) Restart(t testing.TB) {
	t.Helper()
	p.stop()
	p.start(t)
}

// RestartWith stops the server, rewrites its config file from cfg (same
// listen addresses and state dir, so clients, state and gatekeeper key carry
// over) and starts it again. cfg must be complete, as for startProxy.
func (p *Proxy) RestartWith(t testing.TB, cfg ProxyConfig) {
	t.Helper()
	p.stop()
	p.CfgFile = writeConfig(t, p.Dir, p.Addr, p.AdminAddr, p.StateDir, cfg)
	p.start(t)
}

// Logs returns what the server wrote so far.
func (p *Proxy) Logs() string { return p.logs.String() }

// LogsContain reports whether the server's log holds every one of subs,
// waiting up to 10 s: the log reaches the test through a pipe copied by
// another goroutine, so a line written just before a signal or a response
// may not be in Logs yet.
func (p *Proxy) LogsContain(subs ...string) bool {
	deadline := time.Now().Add(10 * time.Second)
	for {
		logs, all := p.Logs(), true
		for _, s := range subs {
			all = all && strings.Contains(logs, s)
		}
		if all || time.Now().After(deadline) {
			return all
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// CLI runs `cacheproxy <sub...> -c CFG args...`; sub is space-separated
// ("allow add"). Flags in args must come before positional arguments.
func (p *Proxy) CLI(t testing.TB, sub string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	full := append(strings.Fields(sub), "-c", p.CfgFile)
	full = append(full, args...)
	return runCacheproxy(t, p.Dir, full...)
}

// MustCLI is CLI that fails the test on a non-zero exit.
func (p *Proxy) MustCLI(t testing.TB, sub string, args ...string) string {
	t.Helper()
	out, errOut, err := p.CLI(t, sub, args...)
	if err != nil {
		t.Fatalf("cacheproxy %s %s: %v\nstdout:\n%s\nstderr:\n%s", sub, strings.Join(args, " "), err, out, errOut)
	}
	return out
}

func runCacheproxy(t testing.TB, dir string, args ...string) (string, string, error) {
	t.Helper()
	requireBinary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, cacheproxyBin, args...)
	cmd.Dir = dir
	// Commands without -c read $CACHEPROXY_CONFIG: not the developer's.
	cmd.Env = filterEnv(os.Environ(), "CACHEPROXY_CONFIG=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

// Attest runs `cacheproxy attest import -c CFG FILE` and fails on error.
func (p *Proxy) Attest(t testing.TB, file string) string {
	t.Helper()
	return p.MustCLI(t, "attest import", file)
}

var httpClient = &http.Client{Timeout: 30 * time.Second}

// Get performs a GET against the main listener and reads the whole body.
// A body read error (aborted transfer) is returned, not fatal.
func (p *Proxy) Get(t testing.TB, path string) (*http.Response, []byte, error) {
	t.Helper()
	return doGet(t, p.URL+path, nil)
}

func doGet(t testing.TB, url string, hdr http.Header) (*http.Response, []byte, error) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

// NarinfoDecision GETs /<hash>.narinfo and returns status, the
// X-Cacheproxy-Decision header and the body.
func (p *Proxy) NarinfoDecision(t testing.TB, sp StorePath) (int, string, string) {
	t.Helper()
	resp, body, err := p.Get(t, "/"+sp.Hash()+".narinfo")
	if err != nil {
		t.Fatalf("GET %s.narinfo from cacheproxy: %v", sp.Hash(), err)
	}
	return resp.StatusCode, resp.Header.Get("X-Cacheproxy-Decision"), string(body)
}

// ExpectRejected asserts a 404 with `X-Cacheproxy-Decision: rejected; reason=R`.
func (p *Proxy) ExpectRejected(t testing.TB, sp StorePath, reason string) {
	t.Helper()
	code, dec, body := p.NarinfoDecision(t, sp)
	want := "rejected; reason=" + reason
	if code != 404 || dec != want {
		t.Fatalf("GET /%s.narinfo (%s): got %d, X-Cacheproxy-Decision %q; want 404 with %q\nbody: %s",
			sp.Hash(), sp.Name(), code, dec, want, body)
	}
	if strings.Count(strings.TrimRight(body, "\n"), "\n") > 0 {
		t.Errorf("rejection body should be one line, got %q", body)
	}
}

// ExpectApproved asserts a 200 narinfo for sp signed by the gatekeeper key
// and returns it parsed.
func (p *Proxy) ExpectApproved(t testing.TB, sp StorePath) *Narinfo {
	t.Helper()
	code, dec, body := p.NarinfoDecision(t, sp)
	if code != 200 {
		t.Fatalf("GET /%s.narinfo (%s): got %d (X-Cacheproxy-Decision %q), want 200 approved\nbody: %s", sp.Hash(), sp.Name(), code, dec, body)
	}
	if dec != "" && !strings.HasPrefix(dec, "approved") {
		t.Errorf("approved narinfo carries X-Cacheproxy-Decision %q", dec)
	}
	ni, err := parseNarinfo(body)
	if err != nil {
		t.Fatalf("proxy narinfo for %s does not parse: %v\n%s", sp, err, body)
	}
	if ni.Get("StorePath") != string(sp) {
		t.Fatalf("proxy narinfo StorePath %q, want %q", ni.Get("StorePath"), sp)
	}
	gkName, _, _ := strings.Cut(p.GatekeeperKey, ":")
	found := false
	for _, s := range ni.GetAll("Sig") {
		if strings.HasPrefix(s, gkName+":") {
			found = true
			if !verifySig(p.GatekeeperKey, ni.Fingerprint(), s) {
				t.Errorf("gatekeeper Sig on %s does not verify over %q", sp, ni.Fingerprint())
			}
		}
	}
	if !found {
		t.Errorf("proxy narinfo for %s has no Sig by the gatekeeper key %s:\n%s", sp, gkName, body)
	}
	return ni
}

// expectApproval asserts the narinfo is served (200) and that the metric
// cacheproxy_decisions_total{decision="approved",reason=R} is > 0.
func (p *Proxy) expectApproval(t testing.TB, sp StorePath, reason string) *Narinfo {
	t.Helper()
	ni := p.ExpectApproved(t, sp)
	if v := p.MetricSum(t, "cacheproxy_decisions_total", map[string]string{"decision": "approved", "reason": reason}); v < 1 {
		t.Errorf("after approving %s, cacheproxy_decisions_total{decision=\"approved\",reason=%q} = %v, want >= 1", sp.Name(), reason, v)
	}
	return ni
}

func verifySig(pub, fp, sig string) bool {
	pn, pb, _ := strings.Cut(pub, ":")
	sn, sb, _ := strings.Cut(sig, ":")
	if pn != sn {
		return false
	}
	k, err1 := base64.StdEncoding.DecodeString(pb)
	s, err2 := base64.StdEncoding.DecodeString(sb)
	if err1 != nil || err2 != nil || len(k) != ed25519.PublicKeySize {
		return false
	}
	return ed25519.Verify(ed25519.PublicKey(k), []byte(fp), s)
}

// Metrics returns the /metrics text.
func (p *Proxy) Metrics(t testing.TB) string {
	t.Helper()
	resp, body, err := p.Get(t, "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: status %d, want 200\n%s", resp.StatusCode, body)
	}
	return string(body)
}

// MetricSum sums the samples of metric name whose labels include want.
func (p *Proxy) MetricSum(t testing.TB, name string, want map[string]string) float64 {
	t.Helper()
	return metricSum(p.Metrics(t), name, want)
}

var sampleRe = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)`)
var labelRe = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

func metricSum(text, name string, want map[string]string) float64 {
	sum := 0.0
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		m := sampleRe.FindStringSubmatch(line)
		if m == nil || m[1] != name {
			continue
		}
		labels := map[string]string{}
		for _, lm := range labelRe.FindAllStringSubmatch(m[3], -1) {
			labels[lm[1]] = lm[2]
		}
		ok := true
		for k, v := range want {
			if labels[k] != v {
				ok = false
			}
		}
		if ok {
			f, err := strconv.ParseFloat(m[4], 64)
			if err == nil {
				sum += f
			}
		}
	}
	return sum
}

// AdminToken reads the generated admin token.
func (p *Proxy) AdminToken(t testing.TB) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(p.StateDir, "admin-token"))
	if err != nil {
		t.Fatalf("reading admin token (default <state_dir>/admin-token): %v", err)
	}
	return strings.TrimSpace(string(b))
}

// ---------------------------------------------------------------- client

// Client is a throwaway Nix store (chroot store DIR/client) with its own
// HOME, so neither /nix/store nor a narinfo disk cache can satisfy a lookup.
type Client struct {
	Root string // chroot store root: files land in Root + /nix/store/...
	Home string
	// DefaultNarinfoTTLs makes Substitute keep Nix's default narinfo cache
	// TTLs (positive 30 days, negative 1 hour), as a fleet machine has them,
	// instead of passing narinfo-cache-{positive,negative}-ttl 0: narinfos
	// this HOME fetched before are then answered from
	// ~/.cache/nix/binary-cache-v6.sqlite without asking the substituter.
	DefaultNarinfoTTLs bool
}

func newClient(t testing.TB) *Client {
	t.Helper()
	d := t.TempDir()
	c := &Client{Root: filepath.Join(d, "client"), Home: filepath.Join(d, "home")}
	os.MkdirAll(c.Home, 0o755)
	return c
}

// Substitute runs `nix-store --store ROOT -r PATHS` with url as the only
// substituter and key as the only trusted public key. It returns the combined
// output and the exit error.
func (c *Client) Substitute(t testing.TB, url, key string, paths ...StorePath) (string, error) {
	t.Helper()
	args := []string{"--store", c.Root, "-r"}
	for _, p := range paths {
		args = append(args, string(p))
	}
	args = append(args,
		"--option", "substituters", url,
		"--option", "trusted-public-keys", key,
	)
	if !c.DefaultNarinfoTTLs {
		args = append(args,
			"--option", "narinfo-cache-negative-ttl", "0",
			"--option", "narinfo-cache-positive-ttl", "0",
		)
	}
	args = append(args,
		"--option", "connect-timeout", "5",
		"--option", "stalled-download-timeout", "20",
		"--option", "download-attempts", "2",
	)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nix-store", args...)
	cmd.Env = nixEnv(c.Home)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("nix-store -r timed out: %w", ctx.Err())
	}
	return string(out), err
}

// MustSubstitute substitutes and checks every path is now in the client store.
func (c *Client) MustSubstitute(t testing.TB, url, key string, paths ...StorePath) {
	t.Helper()
	out, err := c.Substitute(t, url, key, paths...)
	if err != nil {
		t.Fatalf("client could not substitute %v from %s: %v\n%s", paths, url, err, out)
	}
	for _, p := range paths {
		if !c.Has(p) {
			t.Fatalf("after substitution %s is not in client store %s\n%s", p, c.Root, out)
		}
	}
}

// Path is where p's files live in the client store.
func (c *Client) Path(p StorePath) string { return filepath.Join(c.Root, string(p)) }

// Has reports whether p is a valid path in the client store (a failed
// import can leave files behind that Nix never registered).
func (c *Client) Has(p StorePath) bool {
	cmd := exec.Command("nix-store", "--store", c.Root, "--check-validity", string(p))
	cmd.Env = nixEnv(c.Home)
	return cmd.Run() == nil
}

// assertSameTree compares two file trees: types, exec bits, contents, links.
func assertSameTree(t testing.TB, want, got string) {
	t.Helper()
	var wantList []string
	err := filepath.WalkDir(want, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(want, path)
		wantList = append(wantList, rel)
		g := filepath.Join(got, rel)
		wi, _ := os.Lstat(path)
		gi, gerr := os.Lstat(g)
		if gerr != nil {
			return fmt.Errorf("%s missing in substituted copy: %v", rel, gerr)
		}
		if wi.Mode().Type() != gi.Mode().Type() {
			return fmt.Errorf("%s: type %v, want %v", rel, gi.Mode().Type(), wi.Mode().Type())
		}
		switch {
		case wi.Mode()&fs.ModeSymlink != 0:
			wl, _ := os.Readlink(path)
			gl, _ := os.Readlink(g)
			if wl != gl {
				return fmt.Errorf("%s: symlink -> %q, want %q", rel, gl, wl)
			}
		case wi.Mode().IsRegular():
			wb, _ := os.ReadFile(path)
			gb, _ := os.ReadFile(g)
			if !bytes.Equal(wb, gb) {
				return fmt.Errorf("%s: content differs (%d vs %d bytes)", rel, len(gb), len(wb))
			}
			if wi.Mode()&0o111 != gi.Mode()&0o111 {
				return fmt.Errorf("%s: exec bits %v, want %v", rel, gi.Mode(), wi.Mode())
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("comparing %s with substituted %s: %v", want, got, err)
	}
	n := 0
	filepath.WalkDir(got, func(string, fs.DirEntry, error) error { n++; return nil })
	if n != len(wantList) {
		t.Fatalf("substituted %s has %d entries, original has %d", got, n, len(wantList))
	}
}

// ---------------------------------------------------------------- tampering

// flipContentByte flips one bit in the first regular file's contents of an
// uncompressed NAR, keeping the archive structurally valid (so only hashes
// can tell).
func flipContentByte(t testing.TB, nar []byte) {
	t.Helper()
	i := bytes.Index(nar, []byte("contents"))
	if i < 0 || i+16 >= len(nar) {
		t.Fatalf("no file contents in NAR (%d bytes)", len(nar))
	}
	nar[i+16] ^= 0x01
}

// tamperNar flips a content byte of p's NAR on the upstream (which must use
// compression "none"). With fixFileHash the narinfo's FileHash is updated to
// the new bytes (and re-signed by the upstream key; FileHash is not part of
// the fingerprint so the old Sig stays valid either way), leaving only
// NarHash to catch it. It returns the tampered bytes.
func tamperNar(t testing.TB, u *Upstream, p StorePath, fixFileHash bool) []byte {
	t.Helper()
	ni := u.Narinfo(t, p)
	if ni.Get("Compression") != "none" {
		t.Fatalf("tamperNar needs compression none, %s has %s", p, ni.Get("Compression"))
	}
	nf := u.NarFile(t, p)
	b, err := os.ReadFile(nf)
	if err != nil {
		t.Fatal(err)
	}
	flipContentByte(t, b)
	if err := os.WriteFile(nf, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if fixFileHash {
		ni.Set("FileHash", sha256Nix32(b))
		u.PutNarinfo(t, p, ni)
	}
	return b
}

// Total is the number of requests the upstream has seen.
func (u *Upstream) Total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, c := range u.counts {
		n += c
	}
	return n
}

// NarURLPath is the URL path ("/nar/...") of p's NAR on this upstream.
func (u *Upstream) NarURLPath(t testing.TB, p StorePath) string {
	t.Helper()
	return "/" + u.Narinfo(t, p).Get("URL")
}

// StallHalfway makes the upstream send the first half of p's NAR file (with
// the full Content-Length), then wait until release is called (it sends the
// rest) or the proxy's connection goes away. release is also called at
// cleanup.
func (u *Upstream) StallHalfway(t testing.TB, p StorePath) (release func()) {
	t.Helper()
	ch := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(ch) }) }
	t.Cleanup(release)
	u.NarHook(t, p, func(w http.ResponseWriter, r *http.Request, orig []byte) {
		half := len(orig) / 2
		w.Header().Set("Content-Length", fmt.Sprint(len(orig)))
		w.WriteHeader(200)
		w.Write(orig[:half])
		w.(http.Flusher).Flush()
		select {
		case <-ch:
			w.Write(orig[half:])
		case <-r.Context().Done():
		}
	})
	return release
}

// NarHook makes requests for p's NAR go to h, which gets the real bytes.
// Other requests are served normally.
func (u *Upstream) NarHook(t testing.TB, p StorePath, h func(w http.ResponseWriter, r *http.Request, orig []byte)) {
	t.Helper()
	path := u.NarURLPath(t, p)
	orig, err := os.ReadFile(u.NarFile(t, p))
	if err != nil {
		t.Fatal(err)
	}
	u.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != path {
			return false
		}
		h(w, r, append([]byte(nil), orig...))
		return true
	})
}

// serveBytes is a complete, well-formed response carrying b.
func serveBytes(w http.ResponseWriter, b []byte) {
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(200)
	w.Write(b)
}

// breakAfter announces the full length, sends the first n bytes, flushes and
// drops the connection (a broken transfer).
func breakAfter(w http.ResponseWriter, b []byte, n int) {
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(200)
	w.Write(b[:n])
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	panic(http.ErrAbortHandler)
}

// ---------------------------------------------------------------- fixture

// fixture is the common setup: a fresh closure published to one upstream
// (signed by upKey) and a proxy in front of it.
type fixture struct {
	C  Closure
	Up *Upstream
	Px *Proxy
}

// newFixture builds a closure, publishes it with codec and starts a proxy.
// cfg.Upstreams defaults to the new upstream; cfg.Attesters defaults to
// rebuilder-1 (pass []*Key{} for none). prepare, if non-nil, runs after
// publishing and before the proxy starts (to tamper with the upstream first).
func newFixture(t testing.TB, codec string, cfg ProxyConfig, prepare func(f *fixture)) *fixture {
	t.Helper()
	f := &fixture{C: buildClosure(t, ClosureOpts{}), Up: newUpstream(t, upKey)}
	f.Up.Publish(t, codec, f.C.App)
	if prepare != nil {
		prepare(f)
	}
	if cfg.Upstreams == nil {
		cfg.Upstreams = []UpstreamSpec{f.Up.Spec()}
	}
	if cfg.Attesters == nil {
		cfg.Attesters = []*Key{rb1Key}
	}
	f.Px = startProxy(t, cfg)
	return f
}

// attestClosure imports rebuilder-1's attestation of the whole closure.
func (f *fixture) attestClosure(t testing.TB) {
	t.Helper()
	f.Px.Attest(t, attestFile(t, rb1Key, f.C.Paths()...))
}

// addTextCA adds a text content-addressed path (builtins.toFile; CA text:sha256:...).
func addTextCA(t testing.TB) StorePath {
	t.Helper()
	expr := fmt.Sprintf("builtins.toFile \"txt-ca\" \"text ca %s %d\"", nonceRe.ReplaceAllString(t.Name(), "_"), time.Now().UnixNano())
	out := runNix(t, "nix-instantiate", "--read-write-mode", "--eval", "-E", expr)
	return StorePath(strings.Trim(strings.TrimSpace(out), "\""))
}

// ---------------------------------------------------------------- misc

// eventually retries f until it returns nil or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
