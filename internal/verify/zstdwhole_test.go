package verify

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// A small zstd NAR is decoded whole (openZstdWhole), a big one streamed
// (openZstdStream). Whatever the stream (good, cut short, with a flipped
// byte, garbage or skippable frames after it, several frames, longer than
// the NAR), both paths must read the same bytes, up to one more than
// NarSize, and both accept or both refuse it.
func TestZstdWholeMatchesStream(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	text := bytes.Repeat([]byte("nix store path contents, "), 4000) // compressible, 100 KB
	noise := make([]byte, 50_000)
	for i := range noise {
		noise[i] = byte(rng.Uint32())
	}
	var streams [][]byte
	for _, nar := range [][]byte{text, noise, append(text[:10_000:10_000], noise[:5_000]...), {}} {
		for _, level := range []zstd.EncoderLevel{zstd.SpeedFastest, zstd.SpeedDefault, zstd.SpeedBestCompression} {
			enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderCRC(level != zstd.SpeedFastest))
			if err != nil {
				t.Fatal(err)
			}
			good := enc.EncodeAll(nar, nil)
			// The whole path decodes it itself (no fallback to streaming).
			d, err := zstdAll()
			if err != nil {
				t.Fatal(err)
			}
			if out, err := d.DecodeAll(good, make([]byte, 0, len(nar)+1)); err != nil || !bytes.Equal(out, nar) {
				t.Fatalf("DecodeAll of a good %d-byte stream: %d bytes, %v", len(nar), len(out), err)
			}
			streams = append(streams, good,
				append(bytes.Clone(good), good...),                                  // two frames
				append(bytes.Clone(good), 0x50, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 7, 7), // a skippable frame
				append(bytes.Clone(good), "garbage"...),
				append(bytes.Clone(good), 0),
			)
			for _, cut := range []int{1, 4, 6, len(good) / 2, len(good) - 1} {
				if cut < len(good) {
					streams = append(streams, good[:cut])
				}
			}
			for range 40 {
				bad := bytes.Clone(good)
				bad[rng.IntN(len(bad))] ^= byte(1 + rng.IntN(255))
				streams = append(streams, bad)
			}
		}
	}
	for i, data := range streams {
		// The stream's own NAR size, and sizes shorter than it (overlong
		// streams) when it decodes.
		full, _ := readLimited(openZstdStream(bytes.NewReader(data)))(1 << 30)
		for _, narSize := range []uint64{uint64(len(full)), uint64(len(full)) / 2, 0} {
			whole, werr := readLimited(openZstdWhole(bytes.NewReader(data), narSize))(narSize + 1)
			stream, serr := readLimited(openZstdStream(bytes.NewReader(data)))(narSize + 1)
			if !bytes.Equal(whole, stream) || (werr == nil) != (serr == nil) {
				t.Errorf("stream %d (%d bytes), NarSize %d: whole read %d bytes (err %v), streaming %d (err %v)",
					i, len(data), narSize, len(whole), werr, len(stream), serr)
			}
		}
	}
}

// readLimited reads at most limit bytes from an opened decoder, as the
// verifier does (it never asks for more than one byte past NarSize).
func readLimited(r io.Reader, closeFn func(), err error) func(limit uint64) ([]byte, error) {
	return func(limit uint64) ([]byte, error) {
		if err != nil {
			return nil, err
		}
		defer closeFn()
		out, err := io.ReadAll(io.LimitReader(r, int64(limit)))
		if errors.Is(err, io.EOF) {
			err = nil
		}
		return out, err
	}
}
