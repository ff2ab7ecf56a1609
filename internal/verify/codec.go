package verify

import (
	"bytes"
	"compress/bzip2"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/andybalholm/brotli"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/weakpool"
	"github.com/klauspost/compress/zstd"
	"github.com/therootcompany/xz"
)

// Decoder memory limits. An upstream chooses the window size of what it
// sends, so an unbounded window would let one narinfo allocate gigabytes per
// download. The limits admit everything the reference CLIs produce at their
// strongest settings (xz -9: 64 MiB dictionary; zstd --ultra -22 and
// --long=27: 128 MiB window).
const (
	maxZstdWindow = 128 << 20
	maxXZDict     = 64 << 20
)

// codec describes one decoder.
type codec struct {
	// open starts a decoder over the compressed stream src of a NAR of
	// narSize bytes. The returned close function releases decoder
	// resources (zstd keeps buffers).
	open func(src io.Reader, narSize uint64) (r io.Reader, closeFn func(), err error)
	// holdback, when > 0, makes the decoder's input lag this many bytes
	// behind what has arrived, until the end of the stream is known (see
	// openBrotli).
	holdback int
	// truncated reports whether a decoder error, seen after all input was
	// consumed, means "the stream stopped early" rather than "corrupt".
	truncated func(error) bool
}

func isUnexpectedEOF(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) }

// codecFor maps Nix's Compression field values to decoders. "none" and ""
// are handled without a decoder.
func codecFor(name narinfo.Compression) (codec, error) {
	switch name {
	case narinfo.CompressionXZ:
		// liblzma's with `-tags liblzma` (xz_liblzma.go), else goXZCodec.
		return xzCodec, nil
	case narinfo.CompressionZstd:
		return codec{open: openZstd, truncated: isUnexpectedEOF}, nil
	case narinfo.CompressionBzip2:
		return codec{open: openBzip2, truncated: isUnexpectedEOF}, nil
	case narinfo.CompressionBrotli:
		return codec{open: openBrotli, holdback: brotliHoldback, truncated: isUnexpectedEOF}, nil
	default:
		return codec{}, fmt.Errorf("unsupported compression %q", name)
	}
}

func noClose() {}

// goXZCodec is the pure-Go xz decoder, the default. xz-embedded reports a
// stream that needs more input than there is as XZ_BUF_ERROR.
var goXZCodec = codec{open: openGoXZ, truncated: func(err error) bool { return errors.Is(err, xz.ErrBuf) }}

// xzIdle keeps pure-Go xz decoders between downloads (see weakpool). A
// decoder holds the dictionary its streams asked for: 8 MiB for Nix's
// default (xz -6, in streaming mode, whatever the NAR's size), so
// allocating one per NAR made dictionaries almost all of the server's
// allocations (80 MB for 15 NARs of 19 MB in bench/fleet.sh --small).
// Reset reuses a dictionary that is big enough.
var xzIdle weakpool.Pool[pooledXZ]

// xzSource is the reader a pooled decoder reads from; it is pointed at
// the next stream and cut loose when the decoder goes back to the pool, so
// that an idle decoder does not keep a finished download's input alive.
type xzSource struct{ r io.Reader }

func (s *xzSource) Read(p []byte) (int, error) {
	if s.r == nil {
		return 0, io.EOF
	}
	return s.r.Read(p)
}

type pooledXZ struct {
	z   *xz.Reader
	src *xzSource
}

func openGoXZ(src io.Reader, _ uint64) (io.Reader, func(), error) {
	// therootcompany/xz (a port of xz-embedded) beat ulikunitz/xz by ~25%
	// on the benchmark payload, and it allocates the dictionary the stream
	// asks for only up to maxXZDict, where ulikunitz allocates whatever the
	// header claims (up to 4 GiB) for every block. It reads concatenated
	// streams and stream padding, as xz(1) does.
	var err error
	p := xzIdle.Get()
	if p == nil {
		p = &pooledXZ{src: &xzSource{r: src}}
		p.z, err = xz.NewReader(p.src, maxXZDict)
	} else {
		p.src.r = src
		err = p.z.Reset(p.src) // reads the new stream's header
	}
	release := func() {
		p.src.r = nil
		xzIdle.Put(p)
	}
	if err != nil {
		release()
		return nil, nil, err
	}
	return p.z, release, nil
}

func openZstd(src io.Reader, narSize uint64) (io.Reader, func(), error) {
	if zstdWhole(narSize) {
		return openZstdWhole(src, narSize)
	}
	return openZstdStream(src)
}

// zstdIdle keeps streaming zstd decoders between downloads (see weakpool).
var zstdIdle weakpool.Pool[zstd.Decoder]

// openZstdStream streams a NAR of more than zstdWholeMax through a
// decoder that allocates its history for the frame's window.
func openZstdStream(src io.Reader) (io.Reader, func(), error) {
	d := zstdIdle.Get()
	if d == nil {
		// Concurrency 1 decodes synchronously in the verifier's goroutine:
		// the proxy runs many downloads at once, so per-download worker
		// pools would only oversubscribe the CPUs.
		var err error
		d, err = zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxWindow(maxZstdWindow),
		)
		if err != nil {
			return nil, nil, err
		}
	}
	release := func() {
		d.Reset(nil) // cut loose from the finished download's input
		zstdIdle.Put(d)
	}
	if err := d.Reset(src); err != nil {
		release()
		return nil, nil, err
	}
	return d, release, nil
}

// zstdWholeMax is the largest NAR whose zstd stream is decoded whole
// rather than streamed. A streaming decoder allocates its history for the
// window the frame declares, and Nix writes zstd without the content size,
// so every stream declares the encoder's window (2 MiB at the default
// level) even for a NAR of a few KiB: most NARs are that small, and four
// small downloads at once held four 2 MiB windows. Decoding the whole
// frame into one buffer needs no window beyond the output itself, so a
// small NAR costs its compressed and decoded bytes, at most twice
// zstdWholeMax.
const zstdWholeMax = 1 << 20

// DecodedWhole reports whether the verifier decodes e's stream at once
// when it has arrived rather than as it arrives (small zstd NARs): such a
// decode holds its stream and its NAR, not a window.
func DecodedWhole(e Expect) bool {
	return e.Compression == narinfo.CompressionZstd && zstdWhole(e.NarSize)
}

// zstdWhole reports whether a zstd NAR of narSize bytes is decoded whole.
func zstdWhole(narSize uint64) bool { return narSize <= zstdWholeMax }

// zstdWholeSlack bounds the compressed stream of a NAR decoded whole:
// zstd expands incompressible input by a few bytes per 128 KiB block, so
// a stream longer than NarSize plus this much is streamed instead (it is
// then refused by the size checks, not by this path).
const zstdWholeSlack = 64 << 10

// zstdAll decodes whole frames for every download; its DecodeAll calls
// may run concurrently (one per core, the rest wait: decoding is
// CPU-bound), and each uses the output buffer as its history.
var zstdAll = sync.OnceValues(func() (*zstd.Decoder, error) {
	return zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxWindow(maxZstdWindow),
		zstd.WithDecodeAllCapLimit(true),
	)
})

// openZstdWhole reads the compressed stream to its end and decodes it at
// once into a buffer of at most narSize+1 bytes: one byte more than the
// NAR may hold, so that an overlong stream is still seen as overlong and
// a small stream cannot decode to gigabytes.
func openZstdWhole(src io.Reader, narSize uint64) (io.Reader, func(), error) {
	limit := int64(narSize + zstdWholeSlack)
	in, err := io.ReadAll(io.LimitReader(src, limit+1))
	if err != nil {
		return nil, nil, err
	}
	if int64(len(in)) > limit {
		// Not a stream a real encoder writes for this NAR: stream it, so
		// that the verifier's bounds decide.
		return openZstdStream(io.MultiReader(bytes.NewReader(in), src))
	}
	d, err := zstdAll()
	if err != nil {
		return nil, nil, err
	}
	out, err := d.DecodeAll(in, make([]byte, 0, narSize+1))
	if err != nil {
		// A stream this path refuses (corrupt, truncated, or more than
		// narSize+1 bytes, where DecodeAll stops) is decoded again by the
		// streaming decoder, from memory, so that the verdict and its
		// reason are the same whatever the NAR's size.
		return openZstdStream(bytes.NewReader(in))
	}
	return bytes.NewReader(out), noClose, nil
}

func openBzip2(src io.Reader, _ uint64) (io.Reader, func(), error) {
	return bzip2.NewReader(src), noClose, nil
}

// brotliHoldback works around andybalholm/brotli (v1.3.0) reporting
// "excessive input" for a valid stream whose last few bytes arrive in a
// separate Read from the rest: the decoder then finishes while reading from
// its internal byte-by-byte carry buffer, and the Reader mistakes that
// buffer for unread input. An upstream's TCP segmentation decides where our
// reads split, so without this a good NAR would fail (and be quarantined)
// at random. The carry buffer only ever spans one bit-reader refill (8
// bytes); keeping the last 64 bytes back guarantees the final Read holds
// the whole tail of the stream.
const brotliHoldback = 64

func openBrotli(src io.Reader, _ uint64) (io.Reader, func(), error) {
	return brotli.NewReader(src), noClose, nil
}
