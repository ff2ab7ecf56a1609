package server

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/attest/attestgen"
	"github.com/cacheproxy/cacheproxy/internal/config"
)

// importInput returns a generated path-info JSON file of n paths with refs
// references each, signed by attestgen's rebuilder key; for benchmarks it
// is kept in $TMPDIR for the next run.
func importInput(tb testing.TB, n, refs int) string {
	dir := os.TempDir()
	if _, ok := tb.(*testing.T); ok {
		dir = tb.TempDir() // tests leave nothing behind
	}
	name := filepath.Join(dir, fmt.Sprintf("cacheproxy-bench-attest-%d-%d.json", n, refs))
	if _, err := os.Stat(name); err == nil {
		return name
	}
	tmp, err := os.CreateTemp(dir, "cacheproxy-bench-attest-*.tmp")
	if err != nil {
		tb.Fatal(err)
	}
	defer os.Remove(tmp.Name())
	if err := attestgen.Write(tmp, attestgen.Key("rebuilder-1"), "/nix/store", n, refs); err != nil {
		tb.Fatal(err)
	}
	if err := tmp.Close(); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp.Name(), name); err != nil {
		tb.Fatal(err)
	}
	return name
}

// importOverHTTP imports file through a real admin listener with the CLI's
// client (both stream), sampling the heap in use meanwhile. It returns the
// peak in MiB and the counts.
func importOverHTTP(tb testing.TB, file string) (peakMiB float64, counts map[string]int) {
	rb := attestgen.Key("rebuilder-1")
	f := newFixture(tb, func(c *config.Config) {
		c.Policy.Attesters = []config.PublicKey{config.Key(rb.Public())}
	})
	admin := httptest.NewServer(f.s.AdminHandler())
	defer admin.Close()
	c, err := adminapi.NewClient(admin.URL, f.cfg.AdminTokenFile(), nil)
	if err != nil {
		tb.Fatal(err)
	}
	in, err := os.Open(file)
	if err != nil {
		tb.Fatal(err)
	}
	defer in.Close()

	runtime.GC()
	stop, done := make(chan struct{}), make(chan struct{})
	var peak uint64
	go func() {
		defer close(done)
		var ms runtime.MemStats
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	counts, err = c.ImportAttestations(context.Background(), in, "", func(adminapi.AttestResult) {})
	close(stop)
	<-done
	if err != nil {
		tb.Fatal(err)
	}
	return float64(peak) / (1 << 20), counts
}

// BenchmarkAttestImportHeap imports a generated path-info JSON file of
// about 250 MB (80,000 paths with 40 references each) through the admin
// API, as `attest import` does, and reports the peak heap in use of client
// and server together. CACHEPROXY_BENCH_IMPORT_PATHS changes the size.
//
//	go test -run - -bench AttestImportHeap -benchtime=1x ./internal/server/
func BenchmarkAttestImportHeap(b *testing.B) {
	n := 80000
	if v := os.Getenv("CACHEPROXY_BENCH_IMPORT_PATHS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n <= 0 {
			b.Fatalf("CACHEPROXY_BENCH_IMPORT_PATHS=%q", v)
		}
	}
	file := importInput(b, n, 40)
	st, err := os.Stat(file)
	if err != nil {
		b.Fatal(err)
	}
	for range b.N {
		peak, counts := importOverHTTP(b, file)
		if counts[adminapi.AttestStored] != n {
			b.Fatalf("stored %v, want %d", counts, n)
		}
		b.ReportMetric(float64(st.Size())/(1<<20), "input-MiB")
		b.ReportMetric(peak, "peak-heap-MiB")
	}
}

// A streamed import over HTTP stores every path, in batches, and answers
// with every result (a small input here: the figure for a large one is
// BenchmarkAttestImportHeap's).
func TestAttestImportStreamed(t *testing.T) {
	n := 2500 // three batches
	file := importInput(t, n, 3)
	_, counts := importOverHTTP(t, file)
	if counts[adminapi.AttestStored] != n || len(counts) != 1 {
		t.Fatalf("counts %v, want %d stored", counts, n)
	}
}

// An entry that does not parse imports nothing, however far into a large
// import it is, and the error names it.
func TestAttestImportBadEntry(t *testing.T) {
	raw, err := os.ReadFile(importInput(t, 2500, 3))
	if err != nil {
		t.Fatal(err)
	}
	// Break entry 1500 (in the second batch).
	lines := strings.Split(string(raw), "\n")
	lines[1499] = strings.Replace(lines[1499], `"narSize":`, `"narSize":-`, 1)
	rb := attestgen.Key("rebuilder-1")
	f := newFixture(t, func(c *config.Config) {
		c.Policy.Attesters = []config.PublicKey{config.Key(rb.Public())}
	})
	code, body := f.admin("POST", adminapi.PathAttestations, strings.Join(lines, "\n"))
	if code != 400 || !strings.Contains(body, "entry 1500") {
		t.Fatalf("%d %s", code, body)
	}
	if n, err := f.s.db.CountAttestations(); err != nil || n != 0 {
		t.Fatalf("%d attestations stored, want none (%v)", n, err)
	}
	// The same input, fixed, imports whole.
	code, body = f.admin("POST", adminapi.PathAttestations, string(raw))
	if code != 200 {
		t.Fatalf("%d %s", code, body)
	}
	if n, err := f.s.db.CountAttestations(); err != nil || n != 2500 {
		t.Fatalf("%d attestations stored, want 2500 (%v)", n, err)
	}
}
