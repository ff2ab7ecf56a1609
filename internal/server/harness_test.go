package server

// Test harness: a real upstream binary cache (httptest.Server with a
// controllable handler), real store objects (go-nix NARs, zstd, signed
// narinfos) and a real Server on a temp state dir, driven over HTTP.

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const storeDir = "/nix/store"

// ---------------------------------------------------------------- upstream

// fakeUpstream is a binary cache whose every answer the test controls. It
// counts requests per path; a route set with handle overrides the default
// answer (the registered object's narinfo or NAR file, else 404).
type fakeUpstream struct {
	t   testing.TB
	srv *httptest.Server
	key verify.SecretKey

	mu     sync.Mutex
	counts map[string]int
	files  map[string][]byte // path -> bytes served by default
	routes map[string]http.HandlerFunc
}

func newFakeUpstream(t testing.TB, keyName string) *fakeUpstream {
	t.Helper()
	key, err := verify.GenerateKey(keyName)
	if err != nil {
		t.Fatal(err)
	}
	u := &fakeUpstream{t: t, key: key, counts: map[string]int{}, files: map[string][]byte{}, routes: map[string]http.HandlerFunc{}}
	u.srv = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *fakeUpstream) serve(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	u.counts[r.URL.Path]++
	h := u.routes[r.URL.Path]
	body, ok := u.files[r.URL.Path]
	u.mu.Unlock()
	switch {
	case h != nil:
		h(w, r)
	case ok:
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	default:
		http.NotFound(w, r)
	}
}

// handle overrides the answer for one path (nil restores the default).
func (u *fakeUpstream) handle(path string, h http.HandlerFunc) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if h == nil {
		delete(u.routes, path)
	} else {
		u.routes[path] = h
	}
}

func (u *fakeUpstream) count(path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[path]
}

func (u *fakeUpstream) total() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	n := 0
	for _, c := range u.counts {
		n += c
	}
	return n
}

// publish serves obj's narinfo (signed by this upstream) and its NAR file.
func (u *fakeUpstream) publish(o *storeObj) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.files["/"+o.hash+".narinfo"] = o.upstreamNarInfo(u.key)
	if o.file != nil {
		u.files["/"+o.ni.URL] = o.file
	}
}

// ---------------------------------------------------------------- store objects

// storeObj is one store path as an upstream holds it.
type storeObj struct {
	hash      string
	storePath string
	nar       []byte // decompressed NAR (nil for generated ones)
	file      []byte // the NAR file as served (compressed); nil for generated ones
	ni        narinfo.NarInfo
}

func storeHash(name string) string {
	d := sha256.Sum256([]byte("cacheproxy-test/" + name))
	return nixbase32.EncodeToString(d[:20])
}

func sha256Str(b []byte) narinfo.SHA256 { return narinfo.SumSHA256(b) }

// newObj wraps a NAR as a store object with the given compression ("none"
// or "zstd").
func newObj(t testing.TB, name string, narBytes []byte, compression string) *storeObj {
	t.Helper()
	o := &storeObj{hash: storeHash(name), nar: narBytes}
	o.storePath = storeDir + "/" + o.hash + "-" + name
	switch compression {
	case "none":
		o.file = narBytes
	case "zstd":
		enc, err := zstd.NewWriter(nil)
		if err != nil {
			t.Fatal(err)
		}
		o.file = enc.EncodeAll(narBytes, nil)
		enc.Close()
	default:
		t.Fatalf("compression %q not supported by the harness", compression)
	}
	fh := sha256Str(o.file)
	o.ni = narinfo.NarInfo{
		StorePath:   o.storePath,
		URL:         "nar/" + fh.Nix32() + ".nar" + narinfo.Compression(compression).Ext(),
		Compression: narinfo.Compression(compression),
		FileHash:    fh,
		FileSize:    uint64(len(o.file)),
		NarHash:     sha256Str(narBytes),
		NarSize:     uint64(len(narBytes)),
	}
	return o
}

func (o *storeObj) fingerprint(t testing.TB) string {
	fp, err := o.ni.Fingerprint(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	return fp
}

func (o *storeObj) signed(keys ...verify.SecretKey) []byte {
	ni := o.ni
	fp, err := ni.Fingerprint(storeDir)
	if err != nil {
		panic(err)
	}
	ni.Sigs = nil
	for _, k := range keys {
		ni.Sigs = append(ni.Sigs, k.Sign(fp))
	}
	return ni.Marshal()
}

func (o *storeObj) upstreamNarInfo(k verify.SecretKey) []byte { return o.signed(k) }

// dirNAR builds a small directory NAR with go-nix's writer, with one file
// of size bytes of seeded pseudo-random (incompressible) data.
func dirNAR(t testing.TB, seed int64, size int) []byte {
	t.Helper()
	data := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(data)
	var buf bytes.Buffer
	nw, err := nar.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	write := func(h *nar.Header, body []byte) {
		if err := nw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if body != nil {
			if _, err := nw.Write(body); err != nil {
				t.Fatal(err)
			}
		}
	}
	write(&nar.Header{Path: "/", Type: nar.TypeDirectory}, nil)
	write(&nar.Header{Path: "/bin", Type: nar.TypeDirectory}, nil)
	write(&nar.Header{Path: "/bin/hello", Type: nar.TypeRegular, Size: 12, Executable: true}, []byte("#!/bin/sh\necho"[:12]))
	write(&nar.Header{Path: "/data", Type: nar.TypeRegular, Size: int64(size)}, data)
	write(&nar.Header{Path: "/link", Type: nar.TypeSymlink, LinkTarget: "data"}, nil)
	if err := nw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// narString is one NAR token: length, bytes, zero padding to 8.
func narString(s string) []byte {
	b := binary.LittleEndian.AppendUint64(nil, uint64(len(s)))
	b = append(b, s...)
	return append(b, make([]byte, (8-len(s)%8)%8)...)
}

// singleFileNAR returns the bytes before and after the contents of a NAR
// holding one non-executable regular file of size bytes.
func singleFileNAR(size int64) (head, tail []byte) {
	for _, s := range []string{"nix-archive-1", "(", "type", "regular", "contents"} {
		head = append(head, narString(s)...)
	}
	head = binary.LittleEndian.AppendUint64(head, uint64(size))
	tail = append(make([]byte, (8-size%8)%8), narString(")")...)
	return head, tail
}

// ---------------------------------------------------------------- proxy

type fixture struct {
	t         testing.TB
	cfg       config.Config
	up        *fakeUpstream
	rebuilder verify.SecretKey
	s         *Server
	proxy     *httptest.Server
	token     string
	log       *slog.Logger
}

type fixtureOpt func(*config.Config)

func withMode(mode string) fixtureOpt { return func(c *config.Config) { c.Mode = mode } }

func withTimeout(d time.Duration) fixtureOpt {
	return func(c *config.Config) {
		for i := range c.Upstreams {
			c.Upstreams[i].Timeout = config.Duration{Duration: d}
		}
	}
}

// newFixture starts a server in front of ups (a fresh upstream when none).
func newFixture(t testing.TB, opts ...fixtureOpt) *fixture {
	t.Helper()
	return newFixtureWith(t, []*fakeUpstream{newFakeUpstream(t, "upstream-1")}, opts...)
}

func newFixtureWith(t testing.TB, ups []*fakeUpstream, opts ...fixtureOpt) *fixture {
	t.Helper()
	rb, err := verify.GenerateKey("rebuilder-1")
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Defaults(config.Env{})
	cfg.StateDir = t.TempDir()
	cfg.Upstreams = nil
	for _, u := range ups {
		cfg.Upstreams = append(cfg.Upstreams, config.Upstream{URL: u.srv.URL, PublicKeys: []config.PublicKey{config.Key(u.key.Public())},
			Timeout: config.Duration{Duration: 2 * time.Second}})
	}
	cfg.Policy.Attesters = []config.PublicKey{config.Key(rb.Public())}
	cfg.Admin.Listen = "127.0.0.1:0" // never listened on: the tests call AdminHandler
	for _, o := range opts {
		o(&cfg)
	}
	f := &fixture{t: t, cfg: cfg, up: ups[0], rebuilder: rb, log: testLogger(t)}
	f.start()
	return f
}

// testLogger is a fixture's logger; the test fails if anything is logged
// as a Go value (see flatHandler).
func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("CACHEPROXY_TEST_LOG") != "" {
		return slog.New(checkFlatLogs(t, slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})))
	}
	return slog.New(checkFlatLogs(t, slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelDebug})))
}

// start (re)opens the server on the fixture's state dir.
func (f *fixture) start() {
	f.t.Helper()
	s, err := New(f.cfg, f.log)
	if err != nil {
		f.t.Fatal(err)
	}
	f.s = s
	f.proxy = httptest.NewServer(s.Handler())
	tok, err := os.ReadFile(f.cfg.AdminTokenFile())
	if err != nil {
		f.t.Fatal(err)
	}
	f.token = strings.TrimSpace(string(tok))
	f.t.Cleanup(f.stop)
}

// stop closes the proxy and the server; safe to call twice.
func (f *fixture) stop() {
	if f.proxy != nil {
		f.proxy.CloseClientConnections()
		f.proxy.Close()
		f.proxy = nil
	}
	if f.s != nil {
		if err := f.s.Close(); err != nil {
			f.t.Errorf("Close: %v", err)
		}
		f.s = nil
	}
}

// attest imports a rebuilder attestation for o (narinfo text format).
func (f *fixture) attest(o *storeObj) {
	f.t.Helper()
	code, body := f.admin("POST", adminapi.PathAttestations, string(o.signed(f.rebuilder)))
	if code != 200 || !strings.Contains(body, `"stored": 1`) {
		f.t.Fatalf("attest %s: %d %s", o.storePath, code, body)
	}
}

func (f *fixture) admin(method, path, body string) (int, string) {
	f.t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+f.token)
	rec := httptest.NewRecorder()
	f.s.AdminHandler().ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

func (f *fixture) url(p string) string { return f.proxy.URL + p }

// get fetches a path from the proxy and reads the whole body.
func (f *fixture) get(p string, hdr ...string) (*http.Response, []byte, error) {
	f.t.Helper()
	req, err := http.NewRequest("GET", f.url(p), nil)
	if err != nil {
		f.t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if f.s != nil {
		f.s.gate.Flush() // tests read the state file and metrics after answers
	}
	return resp, body, err
}

// mustGet is get that fails the test on a transport or body error.
func (f *fixture) mustGet(p string, hdr ...string) (*http.Response, []byte) {
	f.t.Helper()
	resp, body, err := f.get(p, hdr...)
	if err != nil {
		f.t.Fatalf("GET %s: %v", p, err)
	}
	return resp, body
}

// narURL fetches o's narinfo from the proxy (must be served) and returns the
// NAR path the proxy advertises.
func (f *fixture) narURL(o *storeObj) string {
	f.t.Helper()
	resp, body := f.mustGet("/" + o.hash + ".narinfo")
	if resp.StatusCode != 200 {
		f.t.Fatalf("narinfo %s: %d %s (%s)", o.hash, resp.StatusCode, body, resp.Header.Get("X-Cacheproxy-Decision"))
	}
	ni, err := narinfo.Parse(body, storeDir)
	if err != nil {
		f.t.Fatalf("proxy narinfo: %v\n%s", err, body)
	}
	fp := o.fingerprint(f.t)
	if len(verify.VerifyAny([]verify.PublicKey{f.s.PublicKey()}, fp, ni.Sigs)) != 1 {
		f.t.Fatalf("proxy narinfo lacks a valid gatekeeper signature:\n%s", body)
	}
	if !strings.HasPrefix(ni.URL, "nar/") {
		f.t.Fatalf("proxy narinfo URL %q", ni.URL)
	}
	return "/" + ni.URL
}

// metric scrapes /metrics and returns the value of the series name{labels}
// (labels as Prometheus prints them, sorted, e.g. `check="nar_hash"`), or
// -1 when the series is absent.
func (f *fixture) metric(name, labels string) float64 {
	f.t.Helper()
	resp, body := f.mustGet("/metrics")
	if resp.StatusCode != 200 {
		f.t.Fatalf("/metrics: %d", resp.StatusCode)
	}
	want := name
	if labels != "" {
		want += "{" + labels + "}"
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if v, ok := strings.CutPrefix(line, want+" "); ok {
			x, err := strconv.ParseFloat(v, 64)
			if err != nil {
				f.t.Fatalf("metric line %q: %v", line, err)
			}
			return x
		}
	}
	return -1
}

// dirEntries lists the files in <state>/<sub>.
func (f *fixture) dirEntries(sub string) []string {
	f.t.Helper()
	ents, err := os.ReadDir(filepath.Join(f.cfg.StateDir, sub))
	if err != nil {
		f.t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

func (f *fixture) assertNoBlobsOrTemps() {
	f.t.Helper()
	if b, tmp := f.dirEntries("blobs"), f.dirEntries("tmp"); len(b)+len(tmp) != 0 {
		f.t.Errorf("state dir not clean after a failed download: blobs=%v tmp=%v", b, tmp)
	}
}

// eventually polls cond until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rawRequest sends one request line verbatim (no client-side cleaning or
// escaping) and returns the status code.
func rawRequest(t *testing.T, base, method, target string) int {
	t.Helper()
	addr := strings.TrimPrefix(base, "http://")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", method, target, addr)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func jsonBody(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return string(b)
}

// cutConnection closes the client connection of an upstream handler without
// finishing the response.
func cutConnection(w http.ResponseWriter) {
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	conn.Close()
}
