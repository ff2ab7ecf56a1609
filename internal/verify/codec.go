package verify

import (
	"compress/bzip2"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/andybalholm/brotli"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
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
	// open starts a decoder over the compressed stream src. The returned
	// close function releases decoder resources (zstd keeps buffers).
	open func(src io.Reader) (r io.Reader, closeFn func(), err error)
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

// xzReaders keeps xz decoders between downloads. A decoder holds the
// dictionary its streams asked for: 8 MiB for Nix's default (xz -6, in
// streaming mode, whatever the NAR's size), so allocating one per NAR made
// dictionaries almost all of the server's allocations (80 MB for 15 NARs of
// 19 MB in bench/fleet.sh --small) and, with the garbage collector's
// headroom on top, pushed the peak RSS to about twice what the downloads in
// flight need. Reset reuses a dictionary that is big enough, so the memory
// follows the downloads in flight; sync.Pool lets idle decoders go after two
// collections. A pool holds no state anyone can observe: a decoder is
// reset before every stream.
var xzReaders sync.Pool

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

func openGoXZ(src io.Reader) (io.Reader, func(), error) {
	// therootcompany/xz (a port of xz-embedded) beat ulikunitz/xz by ~25%
	// on the benchmark payload, and it allocates the dictionary the stream
	// asks for only up to maxXZDict, where ulikunitz allocates whatever the
	// header claims (up to 4 GiB) for every block. It reads concatenated
	// streams and stream padding, as xz(1) does.
	var err error
	p, _ := xzReaders.Get().(*pooledXZ)
	if p == nil {
		p = &pooledXZ{src: &xzSource{r: src}}
		p.z, err = xz.NewReader(p.src, maxXZDict)
	} else {
		p.src.r = src
		err = p.z.Reset(p.src) // reads the new stream's header
	}
	release := func() {
		p.src.r = nil
		xzReaders.Put(p)
	}
	if err != nil {
		release()
		return nil, nil, err
	}
	return p.z, release, nil
}

// zstdReaders keeps zstd decoders between downloads, for the same reason
// as xzReaders: each fresh decoder allocated its history buffers (the
// stream's window, 8 MiB for Nix's zstd) and zeroed them, which made them
// most of the allocations of a cold zstd fetch (299 MB over bench/fleet.sh's
// corpus) and 9% of its CPU. Reset reuses them.
var zstdReaders sync.Pool

func openZstd(src io.Reader) (io.Reader, func(), error) {
	d, _ := zstdReaders.Get().(*zstd.Decoder)
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
		zstdReaders.Put(d)
	}
	if err := d.Reset(src); err != nil {
		release()
		return nil, nil, err
	}
	return d, release, nil
}

func openBzip2(src io.Reader) (io.Reader, func(), error) {
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

func openBrotli(src io.Reader) (io.Reader, func(), error) {
	return brotli.NewReader(src), noClose, nil
}
