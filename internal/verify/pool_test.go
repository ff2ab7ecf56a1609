package verify

import (
	"runtime"
	"runtime/debug"
	"slices"
	"testing"
)

// Pooled decoders (xz, zstd) are reset between streams: a stream that
// failed (corrupt, cut short, aborted half way) leaves nothing behind for
// the next one.
func TestDecoderReuseAfterFailures(t *testing.T) {
	for _, codec := range []string{"xz", "zstd"} {
		t.Run(codec, func(t *testing.T) { testDecoderReuse(t, codec) })
	}
}

func testDecoderReuse(t *testing.T, codec string) {
	good := loadFixture(t, codec, treeHash)
	other := loadFixture(t, codec, flatHash)
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

// Each xz stream Nix writes asks for an 8 MiB dictionary, and each zstd
// stream for its window, even for a NAR of a few bytes. Verifying small
// NARs one after another must not allocate one per NAR: the xz decoder
// and its buffers are reused, and a small zstd NAR is decoded whole,
// without a window.
func TestDecoderBuffersReused(t *testing.T) {
	for _, codec := range []string{"xz", "zstd"} {
		t.Run(codec, func(t *testing.T) { testBuffersReused(t, codec) })
	}
}

func testBuffersReused(t *testing.T, codec string) {
	f := loadFixture(t, codec, treeHash)
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
		t.Fatalf("verifying a %d-byte %s NAR allocated %d bytes per run; the decoder's buffers are not reused", len(f.data), codec, per)
	}
}
