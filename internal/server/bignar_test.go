package server

import (
	"crypto/sha256"
	"io"
	"math/rand"
	"net/http"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// bigNAR is a single-file NAR of a deterministic pattern, produced on the
// fly: never held in memory.
type bigNAR struct {
	head, tail []byte
	block      []byte // the file contents repeat this block
	size       int64  // file contents size
}

func newBigNAR(size int64) *bigNAR {
	b := &bigNAR{block: make([]byte, 1<<20), size: size}
	rand.New(rand.NewSource(42)).Read(b.block)
	b.head, b.tail = singleFileNAR(size)
	return b
}

func (b *bigNAR) len() int64 { return int64(len(b.head)) + b.size + int64(len(b.tail)) }

// writeTo streams the NAR to w.
func (b *bigNAR) writeTo(w io.Writer) error {
	if _, err := w.Write(b.head); err != nil {
		return err
	}
	for left := b.size; left > 0; {
		n := min(left, int64(len(b.block)))
		if _, err := w.Write(b.block[:n]); err != nil {
			return err
		}
		left -= n
	}
	_, err := w.Write(b.tail)
	return err
}

// Test 6: a big NAR streams through the proxy (download, verification,
// temp file, client) without the heap growing with its size.
func TestNarBigMemoryFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("big NAR test skipped in -short mode")
	}
	size := int64(1 << 30)
	big := newBigNAR(size)
	h := sha256.New()
	if err := big.writeTo(h); err != nil { // first pass: NarHash
		t.Fatal(err)
	}

	f := newFixture(t)
	o := &storeObj{hash: storeHash("big-1"), file: nil}
	o.storePath = storeDir + "/" + o.hash + "-big-1"
	o.ni = narinfo.NarInfo{StorePath: o.storePath, URL: "nar/big.nar", Compression: "none",
		NarHash: narinfo.SHA256(h.Sum(nil)), NarSize: uint64(big.len())}
	f.up.publish(o)
	f.up.handle("/nar/big.nar", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.FormatInt(big.len(), 10))
		big.writeTo(w)
	})
	f.attest(o)
	narPath := f.narURL(o)

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	var peak, samples atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		var ms runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				runtime.ReadMemStats(&ms)
				samples.Add(1)
				if ms.HeapInuse > peak.Load() {
					peak.Store(ms.HeapInuse)
				}
			}
		}
	}()

	start := time.Now()
	resp, err := http.Get(f.url(narPath))
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	close(stop)
	wg.Wait()
	elapsed := time.Since(start)
	if err != nil || n != big.len() {
		t.Fatalf("big NAR: %d of %d bytes, err %v", n, big.len(), err)
	}
	grew := int64(peak.Load()) - int64(base)
	t.Logf("%d MiB in %s; heap in use %d KiB at start, peak %+d KiB over %d samples",
		big.len()>>20, elapsed.Round(time.Millisecond), base>>10, grew>>10, samples.Load())
	if samples.Load() < 5 {
		t.Fatalf("only %d heap samples: the transfer was too quick to measure", samples.Load())
	}
	if grew > 64<<20 {
		t.Errorf("heap in use grew by %d MiB while streaming a %d MiB NAR; want < 64 MiB", grew>>20, big.len()>>20)
	}
	eventually(t, 30*time.Second, "the big blob to be committed", func() bool { return len(f.s.blobs.Names()) == 1 })
}
