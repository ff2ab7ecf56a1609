package verify

import (
	"runtime"
	"runtime/debug"
	"slices"
	"testing"
)

// Pooled xz decoders are reset between streams: a stream that failed
// (corrupt, cut short, aborted half way) leaves nothing behind for the
// next one.
func TestXZDecoderReuseAfterFailures(t *testing.T) {
	good := loadFixture(t, "xz", treeHash)
	other := loadFixture(t, "xz", flatHash)
	bad := slices.Clone(good.data)
	bad[len(bad)/2] ^= 0xff
	for round := range 3 {
		if err := run(t, good.expect, good.data, 7); err != nil {
			t.Fatalf("round %d: good stream: %v", round, err)
		}
		wantCheck(t, run(t, good.expect, bad, 100), CheckDecompress, CheckFileHash, CheckNarHash)
		wantCheck(t, run(t, good.expect, good.data[:len(good.data)/2], 100), CheckNarSize, CheckFileSize, CheckFileHash)
		v, err := NewVerifier(other.expect)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := v.Write(other.data[:len(other.data)/2]); err != nil {
			t.Fatal(err)
		}
		v.Abort()
		if err := run(t, other.expect, other.data, 4096); err != nil {
			t.Fatalf("round %d: other stream after an aborted one: %v", round, err)
		}
	}
}

// Each xz stream Nix writes asks for an 8 MiB dictionary, even for a NAR
// of a few bytes. Verifying NARs one after another must not allocate one
// per NAR: the decoder and its dictionary are reused.
func TestXZDictionaryReused(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop decoders at random")
	}
	f := loadFixture(t, "xz", treeHash)
	// No collection during the test: one would empty the pool (by design),
	// and how often one runs depends on everything else in the process.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	if err := run(t, f.expect, f.data, 1<<20); err != nil { // warm the pool
		t.Fatal(err)
	}
	const runs = 20
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		if err := run(t, f.expect, f.data, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	// A dictionary per NAR would be 8 MiB per run.
	if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 1<<20 {
		t.Fatalf("verifying a %d-byte xz NAR allocated %d bytes per run; the 8 MiB dictionary is not reused", len(f.data), per)
	}
}
