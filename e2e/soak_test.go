package e2e

// The soak and the attacks, run by scripts/soak (they take minutes, so the
// normal suite skips them):
//
//	CACHEPROXY_SOAK=10m     TestSoak: mixed hits, cold misses and refused
//	                        paths against the real binary for that long
//	CACHEPROXY_ATTACK=1     TestRSSUnderAttack: idle connections, huge
//	                        unknown narinfo fields, floods of distinct missing
//	                        paths, large build logs; reports peak RSS
//
// Both sample the proxy's RSS (/proc/PID/status), open fds (/proc/PID/fd)
// and goroutines (go_goroutines on /metrics).

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// procSample is one look at the proxy process.
type procSample struct {
	at         time.Duration
	rss, hwm   int64 // bytes: resident now, and the peak so far
	fds        int
	goroutines int
}

// sampleProc reads the proxy's RSS, peak RSS, fd count and goroutines.
func (p *Proxy) sampleProc(t testing.TB, start time.Time) (procSample, error) {
	pid := p.cmd.Process.Pid
	s := procSample{at: time.Since(start).Round(time.Second)}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fs[0], 10, 64)
		switch k {
		case "VmRSS":
			s.rss = n << 10
		case "VmHWM":
			s.hwm = n << 10
		}
	}
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return s, err
	}
	s.fds = len(es)
	resp, body, err := doGet(t, p.URL+"/metrics", nil)
	if err != nil || resp.StatusCode != 200 {
		return s, fmt.Errorf("GET /metrics: %v %v", resp, err)
	}
	s.goroutines = int(metricSum(string(body), "go_goroutines", nil))
	return s, nil
}

func (s procSample) String() string {
	return fmt.Sprintf("%5s rss %6.1f MiB (peak %6.1f)  fds %5d  goroutines %5d", s.at, mib(s.rss), mib(s.hwm), s.fds, s.goroutines)
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// flat says whether a series stays flat after warm-up: the maximum of its
// second half exceeds the maximum of its first half by at most tol (a
// fraction) plus slack (absolute). A leak grows the second half's maximum.
func flat(first, second []int64, tol float64, slack int64) (bool, int64, int64) {
	var a, b int64
	for _, v := range first {
		a = max(a, v)
	}
	for _, v := range second {
		b = max(b, v)
	}
	return b <= a+int64(float64(a)*tol)+slack, a, b
}

// soakStats counts what the load generator saw.
type soakStats struct {
	mu          sync.Mutex
	requests    int
	byKind      map[string]int
	byCode      map[int]int
	explained   map[string]int // 5xx with a reason the test accepts
	unexplained map[string]int // 5xx or broken transfers without one
}

func (s *soakStats) add(kind string, code int, why string, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests++
	s.byKind[kind]++
	s.byCode[code]++
	if why == "" {
		return
	}
	if ok {
		s.explained[why]++
	} else {
		s.unexplained[why]++
	}
}

// classify5xx: a 503 that says every upstream was unavailable is explained
// (the test takes an upstream down on purpose); anything else is not.
func classify5xx(code int, body string) (string, bool) {
	body = strings.TrimSpace(body)
	if code == 503 && strings.HasPrefix(body, "upstreams unavailable") {
		return "503 upstreams unavailable (an upstream down on purpose)", true
	}
	if len(body) > 80 {
		body = body[:80]
	}
	return fmt.Sprintf("%d %s", code, body), false
}

// flappingUpstream is an empty binary cache (every path 404) that answers
// 503 while down: it makes the proxy's upstream health and 503 paths part of
// the soak.
type flappingUpstream struct {
	URL  string
	down atomic.Bool
}

func newFlappingUpstream(t testing.TB) *flappingUpstream {
	f := &flappingUpstream{}
	srv := newUpstream(t, up2Key)
	srv.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if f.down.Load() {
			http.Error(w, "down for the soak", http.StatusServiceUnavailable)
			return true
		}
		return false
	})
	f.URL = srv.URL
	return f
}

func TestSoak(t *testing.T) {
	d := os.Getenv("CACHEPROXY_SOAK")
	if d == "" {
		t.Skip("the soak runs for minutes: scripts/soak (CACHEPROXY_SOAK=10m)")
	}
	duration, err := time.ParseDuration(d)
	if err != nil || duration < 10*time.Second {
		t.Fatalf("CACHEPROXY_SOAK=%q: want a duration of at least 10s", d)
	}
	conc := envInt(t, "CACHEPROXY_SOAK_CONCURRENCY", 8)
	rate := envInt(t, "CACHEPROXY_SOAK_RATE", 150) // operations per second, all workers together
	every := 5 * time.Second
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, 0))

	up := newUpstream(t, upKey)
	flap := newFlappingUpstream(t)
	var hot, cold, refused, denied []*synthObj
	for i := 0; i < 32; i++ {
		hot = append(hot, up.publishSynth(t, rng, fmt.Sprintf("hot-%d", i), 16<<10+rng.IntN(48<<10)))
	}
	for i := 0; i < 1500; i++ {
		cold = append(cold, up.publishSynth(t, rng, fmt.Sprintf("cold-%d", i), 8<<10+rng.IntN(40<<10)))
	}
	for i := 0; i < 100; i++ {
		refused = append(refused, up.publishSynth(t, rng, fmt.Sprintf("unattested-%d", i), 4<<10))
	}
	for i := 0; i < 50; i++ {
		denied = append(denied, up.publishSynth(t, rng, fmt.Sprintf("denied-%d", i), 4<<10))
	}
	px := startProxy(t, ProxyConfig{
		Upstreams: []UpstreamSpec{up.Spec(), {URL: flap.URL, PublicKeys: []string{up2Key.Pub}}},
		Attesters: []*Key{rb1Key},
		// A cache far smaller than the cold set: cold NARs keep being
		// evicted, so a cold request keeps meaning an upstream download.
		Extra: "[cache]\nmax_size = \"8MiB\"\n",
	})
	px.Attest(t, craftAttestation(t, rb1Key, synthNarinfos(append(append(append([]*synthObj{}, hot...), cold...), denied...)...)...))
	px.MustCLI(t, "deny add", "--reason", "soak", "*-denied-*")

	stats := &soakStats{byKind: map[string]int{}, byCode: map[int]int{}, explained: map[string]int{}, unexplained: map[string]int{}}
	client := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conc}}
	get := func(path string) (int, []byte, error) {
		resp, err := client.Get(px.URL + path)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, b, err
	}
	// op fetches a narinfo and, when wantNAR and it is approved, its NAR;
	// it records every response.
	op := func(kind string, sp StorePath, nar []byte) {
		code, body, err := get("/" + sp.Hash() + ".narinfo")
		switch {
		case err != nil:
			stats.add(kind, 0, "narinfo transport error: "+err.Error(), false)
			return
		case code >= 500:
			why, ok := classify5xx(code, string(body))
			stats.add(kind, code, why, ok)
			return
		}
		stats.add(kind, code, "", true)
		if code != 200 || nar == nil {
			return
		}
		ni, err := parseNarinfo(string(body))
		if err != nil {
			stats.add(kind, code, "narinfo does not parse", false)
			return
		}
		code, body, err = get(narPath(ni))
		switch {
		case err != nil:
			stats.add(kind+" nar", 0, "NAR transport error: "+err.Error(), false)
		case code >= 500:
			why, ok := classify5xx(code, string(body))
			stats.add(kind+" nar", code, why, ok)
		case code == 200 && sha256.Sum256(body) != sha256.Sum256(nar):
			stats.add(kind+" nar", code, "a 200 NAR with the wrong bytes", false)
		default:
			stats.add(kind+" nar", code, "", true)
		}
	}

	start := time.Now()
	deadline := start.Add(duration)
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	var wg sync.WaitGroup
	for w := 0; w < conc; w++ {
		wrng := rand.New(rand.NewPCG(seed, uint64(w+1)))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				<-tick.C
				switch n := wrng.IntN(100); {
				case n < 50:
					o := hot[wrng.IntN(len(hot))]
					op("hit", o.Path, o.NAR)
				case n < 75:
					o := cold[wrng.IntN(len(cold))]
					op("cold", o.Path, o.NAR)
				case n < 85:
					op("unattested", refused[wrng.IntN(len(refused))].Path, nil)
				case n < 90:
					op("denied", denied[wrng.IntN(len(denied))].Path, nil)
				default:
					op("missing", randomStorePath(wrng, "missing"), nil)
				}
			}
		}()
	}
	// The second upstream is down for 30 s of every 2 minutes.
	stopFlap := make(chan struct{})
	go func() {
		for {
			select {
			case <-stopFlap:
				return
			case <-time.After(90 * time.Second):
			}
			flap.down.Store(true)
			select {
			case <-stopFlap:
				return
			case <-time.After(30 * time.Second):
			}
			flap.down.Store(false)
		}
	}()
	var samples []procSample
	for time.Now().Before(deadline) {
		time.Sleep(min(every, time.Until(deadline)))
		s, err := px.sampleProc(t, start)
		if err != nil {
			t.Fatalf("sampling the proxy: %v", err)
		}
		samples = append(samples, s)
		t.Log(s)
	}
	close(stopFlap)
	wg.Wait()

	// Warm-up is the first fifth; the rest is cut in two halves.
	var rss1, rss2, g1, g2, fd1, fd2 []int64
	warm := len(samples) / 5
	rest := samples[warm:]
	for i, s := range rest {
		if i < len(rest)/2 {
			rss1, g1, fd1 = append(rss1, s.rss), append(g1, int64(s.goroutines)), append(fd1, int64(s.fds))
		} else {
			rss2, g2, fd2 = append(rss2, s.rss), append(g2, int64(s.goroutines)), append(fd2, int64(s.fds))
		}
	}
	rssFlat, r1, r2 := flat(rss1, rss2, 0.10, 8<<20)
	gFlat, gm1, gm2 := flat(g1, g2, 0.10, 20)
	fdFlat, f1, f2 := flat(fd1, fd2, 0.10, 10)
	var peak int64
	for _, s := range samples {
		peak = max(peak, s.hwm)
	}
	stats.mu.Lock()
	defer stats.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "SOAK REPORT (seed %d)\n", seed)
	fmt.Fprintf(&b, "duration %v, concurrency %d, target rate %d ops/s\n", duration, conc, rate)
	fmt.Fprintf(&b, "requests %d  by kind %v\n", stats.requests, stats.byKind)
	fmt.Fprintf(&b, "status codes %v\n", stats.byCode)
	n5 := 0
	for c, n := range stats.byCode {
		if c >= 500 {
			n5 += n
		}
	}
	nu := 0
	for _, n := range stats.unexplained {
		nu += n
	}
	fmt.Fprintf(&b, "5xx %d; explained %v; unexplained %d %v\n", n5, stats.explained, nu, stats.unexplained)
	fmt.Fprintf(&b, "after warm-up (%d samples every %v, first %d dropped): max first half / second half\n", len(rest), every, warm)
	fmt.Fprintf(&b, "  rss        %.1f / %.1f MiB  flat=%v\n", mib(r1), mib(r2), rssFlat)
	fmt.Fprintf(&b, "  goroutines %d / %d  flat=%v\n", gm1, gm2, gFlat)
	fmt.Fprintf(&b, "  fds        %d / %d  flat=%v\n", f1, f2, fdFlat)
	fmt.Fprintf(&b, "peak RSS (VmHWM) %.1f MiB\n", mib(peak))
	t.Log("\n" + b.String())
	if f := os.Getenv("CACHEPROXY_SOAK_REPORT"); f != "" {
		if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
			t.Error(err)
		}
	}
	if nu > 0 {
		t.Errorf("%d unexplained 5xx or broken responses: %v", nu, stats.unexplained)
	}
	if !rssFlat || !gFlat || !fdFlat {
		t.Errorf("not flat after warm-up: rss %v, goroutines %v, fds %v", rssFlat, gFlat, fdFlat)
	}
	if stats.requests == 0 {
		t.Error("the load generator made no request")
	}
}

// TestRSSUnderAttack runs the attacks of the reliability review against the
// real binary and reports its peak RSS after each (VmHWM, so nothing
// between two samples is missed).
func TestRSSUnderAttack(t *testing.T) {
	if os.Getenv("CACHEPROXY_ATTACK") == "" {
		t.Skip("the attacks take minutes: scripts/soak --attack (CACHEPROXY_ATTACK=1)")
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0))
	up := newUpstream(t, upKey)

	// Narinfos with a 3 MiB unknown field (no signature covers it; just
	// under the 4 MiB a narinfo may have), for 300 distinct attested paths;
	// missing paths answered after 100 ms, so a flood piles up; /log/
	// files of 32 MiB.
	junk := strings.Repeat("x", 3<<20)
	var fat []*synthObj
	fatText := map[string]string{}
	for i := 0; i < 300; i++ {
		o := up.publishSynth(t, rng, fmt.Sprintf("fat-%d", i), 1<<10)
		fat = append(fat, o)
		fatText["/"+o.Path.Hash()+".narinfo"] = o.NI.String() + "X-Unsigned-Junk: " + junk + "\n"
	}
	logBody := strings.Repeat("build output line\n", (32<<20)/18)
	up.SetHook(func(w http.ResponseWriter, r *http.Request) bool {
		if s, ok := fatText[r.URL.Path]; ok {
			w.Header().Set("Content-Type", "text/x-nix-narinfo")
			io.WriteString(w, s)
			return true
		}
		if strings.HasPrefix(r.URL.Path, "/log/") {
			io.WriteString(w, logBody)
			return true
		}
		if strings.HasSuffix(r.URL.Path, ".narinfo") {
			time.Sleep(100 * time.Millisecond)
			http.NotFound(w, r)
			return true
		}
		return false
	})
	px := startProxy(t, ProxyConfig{Upstreams: []UpstreamSpec{up.Spec()}, Attesters: []*Key{rb1Key}})
	px.Attest(t, craftAttestation(t, rb1Key, synthNarinfos(fat...)...))
	start := time.Now()
	report := func(phase string) procSample {
		s, err := px.sampleProc(t, start)
		if err != nil {
			t.Fatalf("sampling after %s: %v", phase, err)
		}
		t.Logf("%-44s %s", phase+":", s)
		return s
	}
	report("idle, after start")

	// 1. Idle connections: 3000 connections that send nothing, and 1000
	// that send half a request header, held while /healthz is asked.
	var conns []net.Conn
	for i := 0; i < 4000; i++ {
		c, err := net.Dial("tcp", px.Addr)
		if err != nil {
			t.Logf("connection %d: %v", i, err)
			break
		}
		if i >= 3000 {
			io.WriteString(c, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n")
		}
		conns = append(conns, c)
	}
	time.Sleep(3 * time.Second)
	if resp, body, err := px.Get(t, "/healthz"); err != nil || resp.StatusCode != 200 {
		t.Errorf("/healthz with %d idle connections: %v %v %s", len(conns), resp, err, body)
	}
	report(fmt.Sprintf("%d idle connections", len(conns)))
	for _, c := range conns {
		c.Close()
	}
	time.Sleep(2 * time.Second)
	report("idle connections closed")

	// parallel runs n requests from conc workers.
	parallel := func(n, conc int, path func(i int) string) map[int]int {
		var mu sync.Mutex
		codes := map[int]int{}
		var next atomic.Int64
		var wg sync.WaitGroup
		client := &http.Client{Timeout: 120 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conc}}
		for w := 0; w < conc; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1)) - 1
					if i >= n {
						return
					}
					code := 0
					if resp, err := client.Get(px.URL + path(i)); err == nil {
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						code = resp.StatusCode
					}
					mu.Lock()
					codes[code]++
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		// Our keep-alive connections are not the proxy's: close them so
		// the sample after the phase sees what the proxy itself holds.
		client.CloseIdleConnections()
		time.Sleep(2 * time.Second)
		return codes
	}

	// 2. Huge unknown narinfo fields: 300 distinct paths, twice (the
	// second time from the stored decisions).
	codes := parallel(600, 32, func(i int) string { return "/" + fat[i%len(fat)].Path.Hash() + ".narinfo" })
	report(fmt.Sprintf("300 narinfos with 3 MiB unknown fields %v", codes))

	// 3. A flood of distinct missing paths: 20,000 from 1,000 clients.
	codes = parallel(20000, 1000, func(i int) string {
		return "/" + randomStorePath(rand.New(rand.NewPCG(uint64(i), 1)), "missing").Hash() + ".narinfo"
	})
	report(fmt.Sprintf("20000 distinct missing paths %v", codes))

	// 4. Large build logs: 200 requests of 32 MiB from 100 clients.
	codes = parallel(200, 100, func(i int) string {
		return fmt.Sprintf("/log/%s-x.drv", randomStorePath(rand.New(rand.NewPCG(uint64(i), 2)), "x").Hash())
	})
	s := report(fmt.Sprintf("200 build logs of 32 MiB %v", codes))
	t.Logf("RSS UNDER ATTACK: peak %.1f MiB (VmHWM over every phase)", mib(s.hwm))
	// The figure the README documents.
	if bound := int64(envInt(t, "CACHEPROXY_RSS_BOUND_MIB", 384)) << 20; s.hwm > bound {
		t.Errorf("peak RSS %.1f MiB is above the documented bound of %d MiB", mib(s.hwm), bound>>20)
	}
	if f := os.Getenv("CACHEPROXY_SOAK_REPORT"); f != "" {
		fh, err := os.OpenFile(f, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintf(fh, "RSS under attack (4000 idle connections, 3 MiB unknown narinfo fields, 20000 missing paths, 32 MiB logs): peak %.1f MiB\n", mib(s.hwm))
			fh.Close()
		}
	}
}
