package gate

// Trust data at fleet scale. These benchmarks build their state once per
// iteration; run them with -benchtime=1x:
//
//	CACHEPROXY_BENCH_ATTESTATIONS=1000000 go test -run - -bench FleetScale -benchtime=1x -timeout 1h ./internal/gate/
//	go test -run - -bench Restart100k -benchtime=1x ./internal/gate/
//
// Without the variable FleetScale uses 20,000 attestations. The generated
// input is kept in $TMPDIR (cacheproxy-bench-attest-*.json) for the next run.

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/attest"
	"github.com/cacheproxy/cacheproxy/internal/attest/attestgen"
	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/metrics"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// benchRefs is the references per generated path: about nixpkgs' median.
const benchRefs = 8

func envInt(b *testing.B, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// benchInput returns a path-info JSON file of n paths signed by the
// rebuilder key, generating it on the first run.
func benchInput(b *testing.B, n, refs int) string {
	name := filepath.Join(os.TempDir(), fmt.Sprintf("cacheproxy-bench-attest-%d-%d.json", n, refs))
	if _, err := os.Stat(name); err == nil {
		return name
	}
	tmp, err := os.CreateTemp(os.TempDir(), "cacheproxy-bench-attest-*.tmp")
	if err != nil {
		b.Fatal(err)
	}
	defer os.Remove(tmp.Name())
	if err := attestgen.Write(tmp, attestgen.Key("rebuilder-1"), storeDir, n, refs); err != nil {
		b.Fatal(err)
	}
	if err := tmp.Close(); err != nil {
		b.Fatal(err)
	}
	if err := os.Rename(tmp.Name(), name); err != nil {
		b.Fatal(err)
	}
	return name
}

// benchGate is a gate over a state dir and one file:// upstream (no
// network: what is measured is the gate).
type benchGate struct {
	g     *Gate
	db    *cache.DB
	blobs *cache.Blobs
}

func openBenchGate(b *testing.B, stateDir, upDir string, upKey verify.PublicKey) benchGate {
	db, blobs := openState(b, stateDir)
	c, err := upstream.New(upstream.Options{URL: "file://" + upDir})
	if err != nil {
		b.Fatal(err)
	}
	gk := attestgen.Key("gatekeeper-1")
	g, err := New(Options{
		Policy:    policy.Policy{StoreDir: storeDir, Attesters: []verify.PublicKey{attestgen.Key("rebuilder-1").Public()}, Quorum: 1},
		Upstreams: []Upstream{{Client: c, Keys: []verify.PublicKey{upKey}}},
		Key:       gk, DB: db, Blobs: blobs, Metrics: metrics.New(),
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	return benchGate{g, db, blobs}
}

func (bg benchGate) close() { bg.g.Close(); bg.blobs.Close(); bg.db.Close() }

// cpuTime is the CPU time this process has used (user and system).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// heapPeak samples the heap in use until stopped.
type heapPeak struct {
	stop, done chan struct{}
	peak       uint64
}

func sampleHeap() *heapPeak {
	runtime.GC()
	h := &heapPeak{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		var ms runtime.MemStats
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			runtime.ReadMemStats(&ms)
			h.peak = max(h.peak, ms.HeapInuse)
			select {
			case <-h.stop:
				return
			case <-t.C:
			}
		}
	}()
	return h
}

// Stop returns the peak heap in use, in MiB.
func (h *heapPeak) Stop() float64 {
	close(h.stop)
	<-h.done
	return float64(h.peak) / (1 << 20)
}

// publishPaths writes the upstream narinfos of generated paths into a
// file:// cache directory, signed by upKey.
func publishPaths(b *testing.B, dir string, upKey verify.SecretKey, ids []int) {
	for _, i := range ids {
		p := attestgen.Make(storeDir, i, benchRefs)
		ni := narinfo.NarInfo{StorePath: p.StorePath, URL: "nar/" + p.NarHash.Nix32() + ".nar", Compression: narinfo.CompressionNone,
			NarHash: p.NarHash, NarSize: p.NarSize, References: p.References, Deriver: p.Deriver}
		fp, err := ni.Fingerprint(storeDir)
		if err != nil {
			b.Fatal(err)
		}
		ni.Sigs = []string{upKey.Sign(fp)}
		if err := os.WriteFile(filepath.Join(dir, attestgen.Hash(i)+".narinfo"), ni.Marshal(), 0o644); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFleetScale imports N attestations (signatures verified on every
// core, through the same Decoder and pipeline as the admin API), then
// decides narinfos for paths among them with all N stored, then restarts.
// It reports attestations/s (wall clock, and from the CPU time spread over
// the cores, for a shared machine), the state file's bytes per
// attestation, the peak heap during the import, the time of one decision
// with the upstream's own time (a file:// read) subtracted, both as served
// (stored with a durable commit) and unstored, and the restart time.
func BenchmarkFleetScale(b *testing.B) {
	n := envInt(b, "CACHEPROXY_BENCH_ATTESTATIONS", 20000)
	input := benchInput(b, n, benchRefs)
	upKey := attestgen.Key("upstream-1")
	for range b.N {
		b.StopTimer()
		stateDir, upDir := b.TempDir(), b.TempDir()
		bg := openBenchGate(b, stateDir, upDir, upKey.Public())
		f, err := os.Open(input)
		if err != nil {
			b.Fatal(err)
		}
		st, _ := f.Stat()
		b.StartTimer()

		// Import.
		heap := sampleHeap()
		cpu0 := cpuTime()
		start := time.Now()
		dec, err := attest.NewDecoder(f, storeDir)
		if err != nil {
			b.Fatal(err)
		}
		stored := 0
		err = bg.g.AttestStream(Change{Who: "bench"}, dec.Next, func(r AttestResult) {
			if r.Outcome == AttestStored {
				stored++
			}
		})
		took := time.Since(start)
		cpu := cpuTime() - cpu0
		peak := heap.Stop()
		f.Close()
		if err != nil || stored != n {
			b.Fatalf("import: %d of %d stored, %v", stored, n, err)
		}
		b.ReportMetric(float64(n)/took.Seconds(), "attestations/s")
		// This machine is shared: the rate its two cores give when this
		// process has them is the CPU time spread over both.
		b.ReportMetric(float64(n)/(cpu.Seconds()/float64(runtime.GOMAXPROCS(0))), "attestations/s-on-idle-cores")
		b.ReportMetric(peak, "import-peak-heap-MiB")
		b.ReportMetric(float64(st.Size())/(1<<20), "input-MiB")

		// Decisions with n attestations stored: paths never decided before,
		// so each is a full round (upstream read, evidence, policy, sign,
		// store).
		const decisions = 1000
		ids := rand.New(rand.NewSource(1)).Perm(n)[:min(decisions, n)]
		publishPaths(b, upDir, upKey, ids)
		upStart := time.Now()
		for _, i := range ids {
			if _, err := bg.g.conf().upstreams[0].Client.Get(context.Background(), attestgen.Hash(i)+".narinfo", maxNarInfoSize); err != nil {
				b.Fatal(err)
			}
		}
		upTook := time.Since(upStart)
		// The decision alone, stored nowhere: evidence, policy, signatures.
		onlyStart := time.Now()
		for _, i := range ids {
			out, err := bg.g.decide(context.Background(), bg.g.conf(), attestgen.Hash(i), map[string]bool{}, false)
			if err != nil || out.decision == nil || !out.decision.Approved {
				b.Fatalf("decision for path %d: %+v %v", i, out, err)
			}
		}
		onlyTook := time.Since(onlyStart)
		decCPU := cpuTime()
		decStart := time.Now()
		for _, i := range ids {
			a, err := bg.g.NarInfo(context.Background(), attestgen.Hash(i))
			if err != nil || a.Status != Serve || a.Decision != "approved; reason=attested" {
				b.Fatalf("decision for path %d: %+v %v", i, a, err)
			}
		}
		decTook := time.Since(decStart)
		bg.g.Flush() // the answers did not wait for their commits; these do
		committedTook := time.Since(decStart)
		decCPUTook := cpuTime() - decCPU
		per := func(d time.Duration) float64 { return float64(d.Microseconds()) / float64(len(ids)) }
		b.ReportMetric(per(decTook), "decision-µs")
		b.ReportMetric(per(decTook)-per(upTook), "decision-minus-upstream-µs")
		b.ReportMetric(per(decCPUTook), "decision-cpu-µs")
		b.ReportMetric(per(committedTook)-per(upTook), "decision-committed-minus-upstream-µs")
		b.ReportMetric(per(onlyTook)-per(upTook), "decide-unstored-minus-upstream-µs")

		// State file size.
		bg.close()
		fi, err := os.Stat(filepath.Join(stateDir, "state.db"))
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(fi.Size())/float64(n), "state-bytes/attestation")
		if dst := os.Getenv("CACHEPROXY_BENCH_KEEP_STATE"); dst != "" {
			raw, _ := os.ReadFile(filepath.Join(stateDir, "state.db"))
			os.WriteFile(dst, raw, 0o600)
		}

		// Restart: open the state, ready to serve a stored decision.
		rs := time.Now()
		bg = openBenchGate(b, stateDir, upDir, upKey.Public())
		if a, err := bg.g.NarInfo(context.Background(), attestgen.Hash(ids[0])); err != nil || a.Status != Serve {
			b.Fatalf("after restart: %+v %v", a, err)
		}
		b.ReportMetric(float64(time.Since(rs).Microseconds())/1000, "restart-ms")
		bg.close()
	}
}

// BenchmarkRestart100k stores 100,000 decisions, then measures a restart:
// opening the state and serving a stored decision.
func BenchmarkRestart100k(b *testing.B) {
	for range b.N {
		b.StopTimer()
		f := newFixture(b, false)
		objs := storeDecisions(b, f, 100000, nil)
		opts := Options{Policy: f.g.conf().policy, Upstreams: f.g.conf().upstreams, Key: f.g.key, Metrics: metrics.New(), Log: f.g.log}
		path := filepath.Join(f.dir, "state.db")
		f.g.Close()
		f.blobs.Close()
		f.db.Close()
		b.StartTimer()
		start := time.Now()
		db, err := cache.OpenDB(path)
		if err != nil {
			b.Fatal(err)
		}
		blobs, err := cache.OpenBlobs(db, filepath.Dir(path), 1<<30)
		if err != nil {
			b.Fatal(err)
		}
		opts.DB, opts.Blobs = db, blobs
		g, err := New(opts)
		if err != nil {
			b.Fatal(err)
		}
		if a, err := g.NarInfo(context.Background(), objs[len(objs)/2].hash); err != nil || a.Status != Serve {
			b.Fatalf("after restart: %+v %v", a, err)
		}
		took := time.Since(start)
		b.StopTimer()
		b.ReportMetric(float64(took.Microseconds())/1000, "restart-ms")
		if r := f.up.requests(); r != 0 {
			b.Fatalf("%d upstream requests after the restart", r)
		}
		g.Close()
		blobs.Close()
		db.Close()
		b.StartTimer()
	}
}
