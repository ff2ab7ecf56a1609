package verify

import (
	"compress/bzip2"
	"errors"
	"fmt"
	"io"

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
		// xz-embedded reports a stream that needs more input than there
		// is as XZ_BUF_ERROR.
		return codec{open: openXZ, truncated: func(err error) bool { return errors.Is(err, xz.ErrBuf) }}, nil
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

func openXZ(src io.Reader) (io.Reader, func(), error) {
	// therootcompany/xz (a port of xz-embedded) beat ulikunitz/xz by ~25%
	// on the benchmark payload, and it allocates the dictionary the stream
	// asks for only up to maxXZDict, where ulikunitz allocates whatever the
	// header claims (up to 4 GiB) for every block. It reads concatenated
	// streams and stream padding, as xz(1) does.
	r, err := xz.NewReader(src, maxXZDict)
	if err != nil {
		return nil, nil, err
	}
	return r, noClose, nil
}

func openZstd(src io.Reader) (io.Reader, func(), error) {
	// Concurrency 1 decodes synchronously in the verifier's goroutine: the
	// proxy runs many downloads at once, so per-download worker pools would
	// only oversubscribe the CPUs.
	d, err := zstd.NewReader(src,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxWindow(maxZstdWindow),
	)
	if err != nil {
		return nil, nil, err
	}
	return d, d.Close, nil
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
