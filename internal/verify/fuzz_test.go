package verify

// Native fuzz target (go test -fuzz). Plain `go test` replays the f.Add seeds
// and testdata/fuzz/FuzzVerifier/ on every run; to fuzz:
//
//	go test -run XXX -fuzz '^FuzzVerifier$' -fuzztime 3m -parallel 1 ./internal/verify/

import (
	"bytes"
	"compress/bzip2"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/andybalholm/brotli"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/klauspost/compress/zstd"
)

// fuzzRefLimit bounds the reference decoder: inputs whose stream decodes to
// more are only checked for "no panic, no hang, bounded decoding".
const fuzzRefLimit = 1 << 20

// fuzzHangTimeout is how long one input may take before it counts as a hang.
const fuzzHangTimeout = 30 * time.Second

// fuzzAllocLimit bounds what one verifier run may allocate. The design allows
// a few feed buffers plus the decoder's window, at most maxZstdWindow (128
// MiB) for zstd and maxXZDict (64 MiB) for xz; anything beyond twice the
// largest means decoding or buffering is not bounded as documented.
const fuzzAllocLimit = 2 * maxZstdWindow

// FuzzVerifier feeds arbitrary bytes, in arbitrary chunks (including empty
// polling writes), to a Verifier for each compression and checks: no panic;
// no hang (fuzzHangTimeout); the verifier never hashes more than NarSize bytes
// nor pulls more than NarSize+1 from the decompressor; allocation stays
// bounded; a Write error is what Finish returns, and a second Finish agrees;
// all goroutines have ended after Finish; if Finish returns nil, the bytes
// really have FileSize/FileHash and decode (with the codec library read
// directly, not through the verifier's plumbing) to exactly NarSize bytes
// hashing to NarHash, and for a flat proof to a canonical single-file NAR
// whose contents hash to Flat (checked without a NAR parser). Conversely, a
// stream the direct decoder reads cleanly, with hashes taken from it, must be
// accepted whatever the chunking: where the upstream's reads split the
// stream must not matter.
//
// mode selects the Expect: bits 0-1: 0 honest (from the reference decode),
// 1 honest with a wrong NarSize (param), 2 arbitrary (NarSize and NarHash
// from param), 3 honest with a flipped hash; bit 2: also set
// FileHash/FileSize; bit 3: also ask for a flat proof.
func FuzzVerifier(f *testing.F) {
	comps := map[narinfo.Compression]uint8{}
	for i, c := range narinfo.Compressions() {
		comps[c] = uint8(i)
	}
	for _, c := range compressions {
		for _, h := range []string{treeHash, flatHash} {
			fx := loadFixture(f, c, h)
			ci := comps[narinfo.Compression(c)]
			f.Add(ci, fx.data, []byte{}, uint8(4), uint64(0))
			f.Add(ci, fx.data, []byte{1, 7, 0, 200, 0xff}, uint8(0), uint64(0))
			f.Add(ci, fx.data, []byte{0x40}, uint8(1), uint64(len(fx.nar)-1))
			f.Add(ci, fx.data, []byte{0xf8, 3}, uint8(2), uint64(100))
			f.Add(ci, fx.data, []byte{13}, uint8(3+4), uint64(1))
			if h == flatHash {
				f.Add(ci, fx.data, []byte{5}, uint8(8), uint64(0))
				f.Add(ci, fx.data, []byte{5}, uint8(8+4), uint64(0))
			}
		}
	}
	for file, c := range map[string]narinfo.Compression{"tree.nar.xz": "xz", "tree.nar.zst": "zstd", "tree.nar.bz2": "bzip2", "tree.nar.br": "br"} {
		data, err := os.ReadFile(filepath.Join("testdata", "cli", file))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(comps[c], data, []byte{0xfe, 1}, uint8(4), uint64(0))
	}
	// A compressed stream wrapped in a wrong codec, and an empty input.
	xzData := loadFixture(f, "xz", flatHash).data
	f.Add(comps["zstd"], xzData, []byte{}, uint8(2), uint64(136))
	f.Add(comps["none"], []byte{}, []byte{}, uint8(2), uint64(1))
	f.Add(comps["br"], []byte{}, []byte{}, uint8(0), uint64(0))

	f.Fuzz(func(t *testing.T, ci uint8, data, chunks []byte, mode uint8, param uint64) {
		all := narinfo.Compressions()
		comp := all[int(ci)%len(all)]

		ref := fuzzRefDecode(comp, data, fuzzRefLimit)
		e, wantOK := fuzzExpect(comp, data, ref, mode, param)

		var ms0, ms1 runtime.MemStats
		runtime.ReadMemStats(&ms0)
		type result struct {
			v          *Verifier
			werr, ferr error
		}
		done := make(chan result, 1)
		go func() {
			v, err := NewVerifier(e)
			if err != nil {
				done <- result{ferr: fmt.Errorf("NewVerifier(%+v): %w", e, err)}
				return
			}
			werr := fuzzFeed(v, data, chunks)
			ferr := v.Finish()
			if werr != nil && ferr != werr {
				ferr = fmt.Errorf("Write failed with %v but Finish returned %v", werr, ferr)
				done <- result{v: v, ferr: ferr, werr: errors.New("mismatch")}
				return
			}
			if ferr2 := v.Finish(); ferr2 != ferr {
				done <- result{v: v, ferr: fmt.Errorf("second Finish = %v, first %v", ferr2, ferr), werr: errors.New("mismatch")}
				return
			}
			done <- result{v: v, werr: werr, ferr: ferr}
		}()
		var res result
		select {
		case res = <-done:
		case <-time.After(fuzzHangTimeout):
			buf := make([]byte, 1<<20)
			t.Fatalf("verifier hung for %v (compression %s, %d bytes, Expect %+v):\n%s",
				fuzzHangTimeout, comp, len(data), e, buf[:runtime.Stack(buf, true)])
		}
		runtime.ReadMemStats(&ms1)
		if res.v == nil {
			t.Fatal(res.ferr)
		}
		if res.werr != nil && res.werr.Error() == "mismatch" {
			t.Fatal(res.ferr)
		}
		v := res.v
		if alloc := ms1.TotalAlloc - ms0.TotalAlloc; alloc > fuzzAllocLimit {
			t.Fatalf("one verifier run allocated %d MiB (compression %s, %d input bytes, NarSize %d)",
				alloc>>20, comp, len(data), e.NarSize)
		}

		// Bounded decoding, and everything released.
		if v.nar.n > e.NarSize {
			t.Fatalf("hashed %d NAR bytes, NarSize %d", v.nar.n, e.NarSize)
		}
		if v.dec != nil {
			select {
			case <-v.dec.done:
			default:
				t.Fatal("decoder goroutine still running after Finish")
			}
			if v.dec.pulled > e.NarSize+1 {
				t.Fatalf("pulled %d bytes from the decompressor, NarSize %d", v.dec.pulled, e.NarSize)
			}
		}
		if v.nar.flat != nil {
			select {
			case <-v.nar.flat.done:
			default:
				t.Fatal("flat checker goroutine still running after Finish")
			}
		}
		if _, err := v.Write([]byte{0}); err == nil {
			t.Fatal("Write after Finish succeeded")
		}

		err := res.ferr
		if err == nil {
			fuzzCheckAccepted(t, comp, data, e)
		} else {
			var ve *Error
			if !errors.As(err, &ve) {
				t.Fatalf("Finish returned %T %v, want *Error", err, err)
			}
		}
		if wantOK && err != nil && !fuzzCompressedBound(err, e, data) {
			t.Fatalf("verifier refused a stream the %s decoder reads cleanly (chunks %v): %v", comp, chunks, err)
		}
	})
}

// fuzzCompressedBound reports whether err is the verifier refusing more
// compressed bytes than it allows for a NAR of this size when the narinfo
// gives no FileSize: an upstream must not send endless bytes that decode to
// nothing, so a bound on its own is not a false refusal as long as it only
// applies to streams larger than the NAR they carry.
func fuzzCompressedBound(err error, e Expect, data []byte) bool {
	var ve *Error
	return errors.As(err, &ve) && ve.Check == CheckFileSize && e.FileSize == 0 &&
		e.Compression != narinfo.CompressionNone && uint64(len(data)) > e.NarSize
}

// fuzzRef is the result of decoding a whole stream at once with the codec
// library directly.
type fuzzRef struct {
	out   []byte
	clean bool // decoded without error, all input consumed, within the limit
}

func fuzzRefDecode(comp narinfo.Compression, data []byte, limit int) fuzzRef {
	if comp == narinfo.CompressionNone {
		return fuzzRef{out: data, clean: len(data) <= limit}
	}
	src := bytes.NewReader(data)
	var r io.Reader
	switch comp {
	case narinfo.CompressionXZ:
		xr, closeFn, err := fuzzXZReader(src)
		if err != nil {
			return fuzzRef{}
		}
		defer closeFn()
		r = xr
	case narinfo.CompressionZstd:
		zr, err := zstd.NewReader(src, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxWindow(maxZstdWindow))
		if err != nil {
			return fuzzRef{}
		}
		defer zr.Close()
		r = zr
	case narinfo.CompressionBzip2:
		r = bzip2.NewReader(src)
	case narinfo.CompressionBrotli:
		r = brotli.NewReader(src)
	default:
		panic(comp)
	}
	out, err := io.ReadAll(io.LimitReader(r, int64(limit)+1))
	return fuzzRef{out: out, clean: err == nil && len(out) <= limit && src.Len() == 0}
}

// fuzzExpect builds the Expect for mode (see FuzzVerifier) and says whether
// the verifier must accept.
func fuzzExpect(comp narinfo.Compression, data []byte, ref fuzzRef, mode uint8, param uint64) (Expect, bool) {
	e := Expect{Compression: comp}
	honest := ref.clean && len(ref.out) > 0
	kind := mode & 3
	if !honest {
		kind = 2
	}
	if kind == 2 {
		var p [8]byte
		binary.LittleEndian.PutUint64(p[:], param)
		e.NarHash = narinfo.SumSHA256(p[:])
		e.NarSize = 1 + param%(2*fuzzRefLimit)
		if param>>63 != 0 {
			e.NarSize = param // huge: decoding is bounded by the input only
		}
		if mode&4 != 0 {
			e.FileHash, e.FileSize = narinfo.SumSHA256(data), uint64(len(data))
		}
		if mode&8 != 0 {
			e.Flat = narinfo.SumSHA256(p[:4])
		}
		return e, false
	}
	e.NarHash, e.NarSize = narinfo.SumSHA256(ref.out), uint64(len(ref.out))
	if mode&4 != 0 {
		e.FileHash, e.FileSize = narinfo.SumSHA256(data), uint64(len(data))
	}
	wantOK := true
	if mode&8 != 0 {
		if contents, ok := fuzzFlatContents(ref.out); ok {
			e.Flat = narinfo.SumSHA256(contents)
		} else {
			e.Flat = narinfo.SumSHA256(ref.out) // not a flat NAR: must fail
			wantOK = false
		}
	}
	switch kind {
	case 1:
		n := 1 + param%(2*uint64(len(ref.out))+16)
		if n == e.NarSize {
			n++
		}
		e.NarSize = n
		wantOK = false
	case 3:
		if param&1 == 0 || e.FileHash.IsZero() {
			e.NarHash[param%32] ^= 1 << (param >> 8 % 8)
		} else {
			e.FileHash[param%32] ^= 1 << (param >> 8 % 8)
		}
		wantOK = false
	}
	return e, wantOK
}

// fuzzFeed writes data in the chunk sizes chunks gives (cycled): 0 is an
// empty (polling) write followed by one byte, 1-239 that many bytes, 240-255
// large chunks of up to ~64 KiB; no chunks means one Write.
func fuzzFeed(v *Verifier, data, chunks []byte) error {
	if len(chunks) == 0 {
		_, err := v.Write(data)
		return err
	}
	for i := 0; len(data) > 0; i++ {
		b := chunks[i%len(chunks)]
		n := int(b)
		switch {
		case b == 0:
			if _, err := v.Write(nil); err != nil {
				return err
			}
			n = 1
		case b >= 240:
			n = (int(b) - 239) * 4093
		}
		n = min(n, len(data))
		if _, err := v.Write(data[:n]); err != nil {
			return err
		}
		data = data[n:]
	}
	return nil
}

// fuzzCheckAccepted re-checks, independently of the verifier, everything
// Finish returning nil claims.
func fuzzCheckAccepted(t *testing.T, comp narinfo.Compression, data []byte, e Expect) {
	t.Helper()
	if e.FileSize > 0 && uint64(len(data)) != e.FileSize {
		t.Fatalf("accepted %d bytes, FileSize %d", len(data), e.FileSize)
	}
	if !e.FileHash.IsZero() && sha256.Sum256(data) != e.FileHash {
		t.Fatal("accepted bytes that do not hash to FileHash")
	}
	limit := int(min(e.NarSize, 64<<20))
	ref := fuzzRefDecode(comp, data, limit)
	if !ref.clean {
		t.Fatalf("accepted a %s stream that does not decode cleanly to at most %d bytes", comp, limit)
	}
	if uint64(len(ref.out)) != e.NarSize {
		t.Fatalf("accepted a stream that decodes to %d bytes, NarSize %d", len(ref.out), e.NarSize)
	}
	if sha256.Sum256(ref.out) != e.NarHash {
		t.Fatal("accepted a stream that does not decode to NarHash")
	}
	if !e.Flat.IsZero() {
		contents, ok := fuzzFlatContents(ref.out)
		if !ok {
			t.Fatalf("flat proof accepted for a NAR that is not one canonical non-executable file:\n%q", ref.out[:min(len(ref.out), 512)])
		}
		if sha256.Sum256(contents) != e.Flat {
			t.Fatal("flat proof accepted for contents that do not hash to Flat")
		}
	}
}

// fuzzFlatNAR is the NAR serialisation of a single non-executable regular
// file, written out by hand: Nix's NAR format is canonical, so a NAR is a
// flat file iff it equals this for its contents.
func fuzzFlatNAR(contents []byte) []byte {
	var b bytes.Buffer
	str := func(s []byte) {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(s)))
		b.Write(n[:])
		b.Write(s)
		b.Write(make([]byte, (8-len(s)%8)%8))
	}
	for _, s := range []string{"nix-archive-1", "(", "type", "regular", "contents"} {
		str([]byte(s))
	}
	str(contents)
	str([]byte(")"))
	return b.Bytes()
}

// fuzzFlatContents returns the file contents if nar is exactly the NAR of one
// non-executable regular file.
func fuzzFlatContents(nar []byte) ([]byte, bool) {
	prefix := fuzzFlatNAR(nil)
	prefix = prefix[:len(prefix)-8-16] // up to and including "contents"
	if !bytes.HasPrefix(nar, prefix) || len(nar) < len(prefix)+8 {
		return nil, false
	}
	n := binary.LittleEndian.Uint64(nar[len(prefix):])
	rest := nar[len(prefix)+8:]
	if n > uint64(len(rest)) {
		return nil, false
	}
	contents := rest[:n]
	if !bytes.Equal(fuzzFlatNAR(contents), nar) {
		return nil, false
	}
	return contents, true
}
