package e2e

// Crash safety of the real binary: `cacheproxy serve` is SIGKILLed (no
// graceful shutdown, no deferred Close, no fsync of anything still in
// flight) in the middle of a download, right after a commit, and at random
// moments in a loop; a new process on the same config and state dir must
// start clean: no temp files, no partial or unindexed blob, the approved
// narinfos intact, the cache still serving what it had committed.

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// crash SIGKILLs the running serve process and waits until it is gone. The
// killed instance's log is kept for the failure report (start replaces it).
func (p *Proxy) crash(t testing.TB) {
	t.Helper()
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatalf("SIGKILL cacheproxy serve (pid %d): %v (did it exit on its own?)\nlog:\n%s", p.cmd.Process.Pid, err, p.Logs())
	}
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("cacheproxy serve (pid %d) still running 10s after SIGKILL", p.cmd.Process.Pid)
	}
	if ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("cacheproxy serve did not die of SIGKILL: %v\nlog:\n%s", p.cmd.ProcessState, p.Logs())
	}
	logs, pid := p.Logs(), p.cmd.Process.Pid
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("---- log of the SIGKILLed cacheproxy serve (pid %d) ----\n%s", pid, logs)
		}
	})
}

// crashRestart SIGKILLs the server and starts a new one on the same config
// and state dir; it checks the gatekeeper key survived.
func (p *Proxy) crashRestart(t testing.TB) {
	t.Helper()
	key := p.GatekeeperKey
	p.crash(t)
	p.start(t)
	if p.GatekeeperKey != key {
		t.Fatalf("gatekeeper key changed across a crash: %q -> %q", key, p.GatekeeperKey)
	}
}

// stateFiles lists the names in <state>/sub (nil when it does not exist).
func (p *Proxy) stateFiles(t testing.TB, sub string) []string {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(p.StateDir, sub))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// expectNoTemp asserts <state>/tmp is empty.
func (p *Proxy) expectNoTemp(t testing.TB, when string) {
	t.Helper()
	if got := p.stateFiles(t, "tmp"); len(got) != 0 {
		t.Errorf("%s: <state>/tmp holds %v, want it empty", when, got)
	}
}

// narBlobName is the blob name of an approved narinfo: the last element of
// its URL (nar/<hash>-<narhash>.nar<ext>).
func narBlobName(ni *Narinfo) string { return path.Base(narPath(ni)) }

// expectCompleteBlobs asserts that every file in <state>/blobs holds exactly
// the bytes its upstream serves for that store path: a crash may lose a
// blob, never leave a partial or foreign one where the cache serves from.
func (p *Proxy) expectCompleteBlobs(t testing.TB, up *Upstream, when string, paths ...StorePath) {
	t.Helper()
	want := map[string][]byte{}
	for _, sp := range paths {
		b, err := os.ReadFile(up.NarFile(t, sp))
		if err != nil {
			t.Fatal(err)
		}
		want[sp.Hash()] = b
	}
	for _, name := range p.stateFiles(t, "blobs") {
		b, err := os.ReadFile(filepath.Join(p.StateDir, "blobs", name))
		if err != nil {
			t.Errorf("%s: reading blob %s: %v", when, name, err)
			continue
		}
		w, ok := want[name[:min(32, len(name))]]
		switch {
		case !ok:
			t.Errorf("%s: <state>/blobs holds %s (%d bytes), which is no NAR of %v", when, name, len(b), paths)
		case !bytes.Equal(b, w):
			t.Errorf("%s: blob %s has %d bytes that differ from the upstream NAR (%d bytes): a partial or corrupt blob survived", when, name, len(b), len(w))
		}
	}
}

// waitPartialTemp waits until <state>/tmp holds a temp file of blob with at
// least min bytes and returns its name.
func (p *Proxy) waitPartialTemp(t testing.TB, blob string, minSize int64) string {
	t.Helper()
	var found string
	eventually(t, 20*time.Second, func() error {
		for _, name := range p.stateFiles(t, "tmp") {
			if !strings.HasPrefix(name, blob+".") {
				continue
			}
			fi, err := os.Stat(filepath.Join(p.StateDir, "tmp", name))
			if err == nil && fi.Size() >= minSize {
				found = name
				return nil
			}
		}
		return fmt.Errorf("no temp file of %s with >= %d bytes in <state>/tmp (holds %v)", blob, minSize, p.stateFiles(t, "tmp"))
	})
	return found
}

// verifyCacheClean runs `cacheproxy verify-cache -c CFG` and asserts it
// exits 0 having checked want() blobs and dropped none. A client gets the
// end of a NAR once it verified, and its blob is stored just after, so a
// download the test just finished may still be committing: the count is
// taken again until the two agree.
func (p *Proxy) verifyCacheClean(t testing.TB, want func() int, when string) {
	t.Helper()
	var out, errOut string
	var err error
	for range 50 {
		n := want()
		out, errOut, err = p.CLI(t, "verify-cache")
		if err == nil && strings.Contains(out, fmt.Sprintf("checked %d blobs, dropped 0", n)) {
			return
		}
		if err != nil || !strings.Contains(out, ", dropped 0") {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("%s: verify-cache: err=%v, want exit 0 and \"checked %d blobs, dropped 0\"\nstdout:\n%s\nstderr:\n%s", when, err, want(), out, errOut)
}

// blobs is a constant count for verifyCacheClean.
func blobs(n int) func() int { return func() int { return n } }

// TestCrashMidDownload: the proxy dies with half of a NAR in a temp file.
// After the restart the temp file is gone, no blob exists for the NAR, the
// approved narinfo is still served from the state store, and a fresh client
// gets the path (one new upstream fetch), after which the NAR is cached.
func TestCrashMidDownload(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{BigSize: 4 << 20})
	up := newUpstream(t, upKey)
	up.Publish(t, "none", c.App)
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	px.Attest(t, attestFile(t, rb1Key, c.Paths()...))
	code, _, niText := px.NarinfoDecision(t, c.App)
	if code != 200 {
		t.Fatalf("narinfo of %s: %d, want 200\n%s", c.App, code, niText)
	}
	ni := px.ExpectApproved(t, c.App)
	blob := narBlobName(ni)
	upNar := up.NarURLPath(t, c.App)
	narSize := int64(len(must(os.ReadFile(up.NarFile(t, c.App)))))

	// The upstream sends half of app's NAR, then stalls until released or
	// until the proxy's connection goes away.
	releaseFn := up.StallHalfway(t, c.App)
	defer releaseFn()

	cl1 := newClient(t)
	type result struct {
		out string
		err error
	}
	first := make(chan result, 1)
	go func() {
		out, err := cl1.Substitute(t, px.URL, px.GatekeeperKey, c.App)
		first <- result{out, err}
	}()
	tmpName := px.waitPartialTemp(t, blob, narSize/2)
	if slices.Contains(px.stateFiles(t, "blobs"), blob) {
		t.Fatalf("blob %s exists while its download is stalled at half", blob)
	}

	key := px.GatekeeperKey
	px.crash(t)
	// Nothing cleaned up behind our back: the restart is what must do it.
	if !slices.Contains(px.stateFiles(t, "tmp"), tmpName) {
		t.Errorf("the partial temp file %s vanished with the SIGKILL alone (tmp: %v)", tmpName, px.stateFiles(t, "tmp"))
	}
	px.expectCompleteBlobs(t, up, "right after SIGKILL", c.Paths()...)
	select {
	case r := <-first:
		if r.err == nil {
			t.Errorf("the client whose proxy died mid-NAR reports success:\n%s", r.out)
		}
		if cl1.Has(c.App) {
			t.Errorf("the client whose proxy died mid-NAR has %s valid in its store", c.App)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("the first client did not give up within 60s of its proxy dying")
	}

	px.start(t)
	if px.GatekeeperKey != key {
		t.Errorf("gatekeeper key changed across a crash: %q -> %q", key, px.GatekeeperKey)
	}
	px.expectNoTemp(t, "after restart")
	if slices.Contains(px.stateFiles(t, "blobs"), blob) {
		t.Errorf("after restart <state>/blobs holds %s, the NAR whose download was killed", blob)
	}
	px.expectCompleteBlobs(t, up, "after restart", c.Paths()...)

	// The approved record survived: served byte for byte, no upstream round.
	niReqs := up.NarinfoCount(c.App)
	code, dec, body := px.NarinfoDecision(t, c.App)
	if code != 200 || body != niText {
		t.Errorf("after restart narinfo of %s: %d (%s), body changed=%v; want the stored approved narinfo byte for byte\n%s", c.App.Name(), code, dec, body != niText, body)
	}
	if n := up.NarinfoCount(c.App) - niReqs; n != 0 {
		t.Errorf("after restart serving the approved narinfo took %d upstream narinfo requests, want 0 (the stored record)", n)
	}

	releaseFn()
	up.SetHook(nil)
	narReqs := up.Count(upNar)
	cl2 := newClient(t)
	cl2.MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
	assertSameTree(t, string(c.App), cl2.Path(c.App))
	assertSameTree(t, string(c.Leaf), cl2.Path(c.Leaf))
	if n := up.Count(upNar) - narReqs; n != 1 {
		t.Errorf("substituting after the crash fetched app's NAR %d times from upstream, want 1", n)
	}
	if !slices.Contains(px.stateFiles(t, "blobs"), blob) {
		t.Errorf("after a complete download %s is not in <state>/blobs (%v)", blob, px.stateFiles(t, "blobs"))
	}
	px.expectNoTemp(t, "after the re-fetch")

	all := up.NarCount()
	cl3 := newClient(t)
	cl3.MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
	assertSameTree(t, string(c.App), cl3.Path(c.App))
	if n := up.NarCount() - all; n != 0 {
		t.Errorf("a second client after the re-fetch caused %d upstream NAR requests, want 0 (cached)", n)
	}
	px.verifyCacheClean(t, blobs(2), "at the end")
}

// TestCrashAfterCommit: a NAR cached before a SIGKILL is served from the
// cache afterwards, and verify-cache (online and offline) finds it good.
func TestCrashAfterCommit(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{BigSize: 1 << 20})
	up := newUpstream(t, upKey)
	up.Publish(t, "zstd", c.App)
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	px.Attest(t, attestFile(t, rb1Key, c.Paths()...))
	newClient(t).MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
	n := up.NarCount()
	if n != 2 {
		t.Errorf("first client: %d upstream NAR requests, want 2", n)
	}
	wantBlobs := []string{narBlobName(px.ExpectApproved(t, c.Leaf)), narBlobName(px.ExpectApproved(t, c.App))}
	slices.Sort(wantBlobs)
	if got := px.stateFiles(t, "blobs"); !slices.Equal(got, wantBlobs) {
		t.Fatalf("before the crash <state>/blobs holds %v, want %v", got, wantBlobs)
	}

	px.crashRestart(t)
	if got := px.stateFiles(t, "blobs"); !slices.Equal(got, wantBlobs) {
		t.Errorf("after SIGKILL and restart <state>/blobs holds %v, want %v", got, wantBlobs)
	}
	px.expectNoTemp(t, "after restart")
	px.expectCompleteBlobs(t, up, "after restart", c.Paths()...)
	if v := px.MetricSum(t, "cacheproxy_cache_size_bytes", nil); v <= 1<<20 {
		t.Errorf("cacheproxy_cache_size_bytes = %v after restart, want the two committed blobs (> 1 MiB)", v)
	}

	cl := newClient(t)
	cl.MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
	assertSameTree(t, string(c.App), cl.Path(c.App))
	assertSameTree(t, string(c.Leaf), cl.Path(c.Leaf))
	if got := up.NarCount(); got != n {
		t.Errorf("after the crash a client caused %d upstream NAR requests, want 0 (served from the blobs committed before)", got-n)
	}
	if v := px.MetricSum(t, "cacheproxy_cache_hits_total", map[string]string{"kind": "nar"}); v < 2 {
		t.Errorf("cacheproxy_cache_hits_total{kind=\"nar\"} = %v after the crash, want >= 2", v)
	}
	px.verifyCacheClean(t, blobs(2), "through the restarted server")

	// And offline, straight on the state dir of a killed server.
	px.crash(t)
	px.verifyCacheClean(t, blobs(2), "offline, after a second SIGKILL")
	px.start(t)
	newClient(t).MustSubstitute(t, px.URL, px.GatekeeperKey, c.App)
	if got := up.NarCount(); got != n {
		t.Errorf("after offline verify-cache a client caused %d upstream NAR requests, want 0", got-n)
	}
}

// TestCrashLoop SIGKILLs the real binary at random moments while cold
// downloads, a download of a tampered NAR and one admin write (attest
// import, allow add, deny add or retry) are in flight, and restarts it on the
// same state dir every time. After each restart: the state opens, no temp
// file is left, every blob on disk is byte for byte a NAR whose NarHash the
// proxy approved, every path served completely before is still served
// correctly, every admin write the CLI saw succeed took effect, the tampered
// NAR was never served as a complete response, and verify-cache passes.
//
// The kills are seeded and the seed is logged: CACHEPROXY_KILL_SEED=N
// replays the same kill moments, objects and admin writes (the timing of
// the machine still varies); CACHEPROXY_KILLS=N sets how many (default 24).
func TestCrashLoop(t *testing.T) {
	t.Parallel()
	kills := envInt(t, "CACHEPROXY_KILLS", 24)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CACHEPROXY_KILL_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("CACHEPROXY_KILL_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("kill loop: %d SIGKILLs, seed %d (replay: CACHEPROXY_KILL_SEED=%d)", kills, seed, seed)
	rng := rand.New(rand.NewPCG(seed, 0x6b696c6c))

	up := newUpstream(t, upKey)
	known := map[string]*synthObj{} // store hash -> object, for the blob check
	publish := func(name string) *synthObj {
		o := up.publishSynth(t, rng, name, 128<<10+rng.IntN(640<<10))
		known[o.Path.Hash()] = o
		return o
	}
	cold := make([]*synthObj, 2*kills)
	for i := range cold {
		cold[i] = publish(fmt.Sprintf("cold-%d", i))
	}
	// The tampered path: signed and attested for its real NAR, but the
	// upstream serves a NAR with one content byte flipped.
	tampered := publish("tampered")
	bad := append([]byte(nil), tampered.NAR...)
	flipContentByte(t, bad)
	up.PutRaw(t, tampered.NI.Get("URL"), bad)

	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	px.Attest(t, craftAttestation(t, rb1Key, synthNarinfos(append(cold, tampered)...)...))

	// A slow upstream: NARs trickle out in 64 KiB chunks 4 ms apart, so a
	// download takes 10-50 ms or more and a kill lands before, during or after the
	// narinfo decision, the download, the commit, the admin write.
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasPrefix(r.URL.Path, "/nar/") {
			return false
		}
		b, err := os.ReadFile(filepath.Join(up.Dir, filepath.FromSlash(r.URL.Path)))
		if err != nil {
			http.NotFound(w, r)
			return true
		}
		w.Header().Set("Content-Length", fmt.Sprint(len(b)))
		w.WriteHeader(200)
		for off := 0; off < len(b); off += 64 << 10 {
			if _, err := w.Write(b[off:min(off+64<<10, len(b))]); err != nil {
				return true
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return true
			case <-time.After(4 * time.Millisecond):
			}
		}
		return true
	})

	// fetch is fetchSynth, counting any complete 200 of the tampered path
	// (whose upstream bytes never match its NarHash).
	var tamperedServed atomic.Int32
	fetch := func(o *synthObj) string {
		r := px.fetchSynth(t, o)
		if o == tampered && (r == "nar: complete" || r == "nar: WRONG") {
			tamperedServed.Add(1)
			t.Errorf("the tampered NAR of %s was served as a complete 200", o.Path.Name())
		}
		return r
	}
	// checkBlobs: every file in <state>/blobs is exactly the NAR of a known
	// path (the tampered bytes are never one: known holds the real NAR).
	checkBlobs := func(when string) int {
		names := px.stateFiles(t, "blobs")
		for _, name := range names {
			b, err := os.ReadFile(filepath.Join(px.StateDir, "blobs", name))
			if err != nil {
				t.Errorf("%s: reading blob %s: %v", when, name, err)
				continue
			}
			o := known[name[:min(32, len(name))]]
			if o == nil || !bytes.Equal(b, o.NAR) {
				t.Errorf("%s: <state>/blobs/%s (%d bytes) is not the verified NAR of any approved path", when, name, len(b))
			}
		}
		return len(names)
	}

	token := px.AdminToken(t)
	kinds := []string{"attest import", "allow add", "deny add", "retry"}
	var order []int
	served := []*synthObj{} // paths served complete before the current kill
	counts := map[string]int{}
	for i := 0; i < kills; i++ {
		if len(order) == 0 {
			order = rng.Perm(len(kinds))
		}
		kind := kinds[order[0]]
		order = order[1:]
		counts[kind]++
		delay := time.Duration(rng.IntN(401)) * time.Millisecond

		// The admin write of this round (sent to the admin API as the CLI
		// sends it, without the CLI's start-up time, so the kill moments
		// spread over the write itself) and the path it is about.
		var target *synthObj
		var api, body string
		switch kind {
		case "attest import":
			target = publish(fmt.Sprintf("import-%d", i))
			nis := []*Narinfo{target.NI}
			for j := 0; j < 200; j++ { // filler, to make the write take a while
				nis = append(nis, synthesize(rng, up.Key, fmt.Sprintf("filler-%d-%d", i, j), 64).NI)
			}
			api, body = "/admin/v1/attestations", string(must(os.ReadFile(craftAttestation(t, rb1Key, nis...))))
		case "allow add":
			target = publish(fmt.Sprintf("allow-%d", i))
			api, body = "/admin/v1/allowlist", fmt.Sprintf(`{"paths":[%q],"reason":"kill loop"}`, target.Path)
		case "deny add":
			// A path that was approved and served until this write.
			target = publish(fmt.Sprintf("deny-%d", i))
			px.Attest(t, craftAttestation(t, rb1Key, target.NI))
			if r := fetch(target); r != "nar: complete" {
				t.Fatalf("round %d: %s before its deny: %s", i, target.Path.Name(), r)
			}
			api, body = "/admin/v1/denylist", fmt.Sprintf(`{"patterns":[%q],"reason":"kill loop"}`, target.Path.Hash())
		case "retry":
			target = tampered
			api, body = "/admin/v1/retry", fmt.Sprintf(`{"paths":[%q]}`, tampered.Path)
		}

		jobs := []*synthObj{cold[2*i], cold[2*i+1], tampered}
		if target != tampered {
			jobs = append(jobs, target)
		}
		results := make([]string, len(jobs))
		var ack bool
		var wg sync.WaitGroup
		for j, o := range jobs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[j] = fetch(o)
			}()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ack = px.adminPost(api, token, body) == nil
		}()
		time.Sleep(delay)
		px.crash(t)
		wg.Wait()
		when := fmt.Sprintf("round %d (%s, SIGKILL after %v)", i, kind, delay)
		t.Logf("%s: cold %s / %s, tampered %s, admin write acknowledged=%v", when, results[0], results[1], results[2], ack)
		checkBlobs(when + ", before restart")

		key := px.GatekeeperKey
		px.start(t)
		if px.GatekeeperKey != key {
			t.Fatalf("%s: gatekeeper key changed across a crash: %q -> %q", when, key, px.GatekeeperKey)
		}
		when += ", after restart"
		px.expectNoTemp(t, when)

		// An acknowledged write survived the kill.
		if ack {
			switch kind {
			case "attest import", "allow add":
				if code, dec, body := px.NarinfoDecision(t, target.Path); code != 200 {
					t.Errorf("%s: %s of %s was acknowledged, but its narinfo is now %d (%s) %s", when, kind, target.Path.Name(), code, dec, body)
				}
			case "deny add":
				if code, dec, _ := px.NarinfoDecision(t, target.Path); code != 404 || dec != "rejected; reason=denied" {
					t.Errorf("%s: deny of %s was acknowledged, but its narinfo is now %d (%s)", when, target.Path.Name(), code, dec)
				}
			}
		}
		// Whatever was served completely before is served correctly now.
		for _, k := range rng.Perm(len(served))[:min(6, len(served))] {
			if r := fetch(served[k]); r != "nar: complete" {
				t.Errorf("%s: %s, served completely before, now gets %s", when, served[k].Path.Name(), r)
			}
		}
		for j, o := range jobs[:2] {
			if results[j] == "nar: complete" {
				served = append(served, o)
			}
		}
		if kind != "deny add" && results[len(results)-1] == "nar: complete" && target != tampered {
			served = append(served, target)
		}
		px.verifyCacheClean(t, func() int { return checkBlobs(when) }, when)
		if t.Failed() {
			t.FailNow()
		}
	}

	// Every cold path is served now, and the tampered one never was.
	for _, o := range cold {
		if r := fetch(o); r != "nar: complete" {
			t.Errorf("after the kill loop %s gets %s", o.Path.Name(), r)
		}
	}
	if r := fetch(tampered); r == "nar: complete" || tamperedServed.Load() != 0 {
		t.Errorf("after the kill loop the tampered path gets %s", r)
	}
	px.verifyCacheClean(t, func() int { return checkBlobs("after the kill loop") }, "after the kill loop")
	px.expectNoTemp(t, "after the kill loop")
	t.Logf("kill loop survived %d SIGKILLs (seed %d): admin writes %v; %d paths served completely before a kill", kills, seed, counts, len(served))
}

// adminPost sends one admin write; nil means the server answered 2xx.
func (p *Proxy) adminPost(api, token, body string) error {
	req, err := http.NewRequest("POST", p.AdminURL+api, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := httpClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	msg, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("POST %s: %d %s", api, resp.StatusCode, msg)
	}
	return nil
}

// envInt reads a positive integer from the environment, or def.
func envInt(t testing.TB, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return v
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
