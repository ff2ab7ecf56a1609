//go:build liblzma

package verify

// The xz decoder of liblzma (xz-utils), the library Nix itself decodes and
// encodes xz with, through cgo. Built only with `-tags liblzma`; without
// the tag the pure-Go decoder (openGoXZ) is the only one. liblzma decodes
// about 1.5x as fast as the Go port and keeps its dictionary in C memory,
// outside the Go heap, so the collector's headroom does not double it.

/*
#cgo pkg-config: liblzma
#include <stdlib.h>
#include <lzma.h>

// The result of one cp_code call: lzma_ret and how much of each buffer it
// used.
typedef struct {
	lzma_ret ret;
	size_t in_used;
	size_t out_used;
} cp_result;

// cp_new allocates an lzma_stream in C memory: it holds pointers to
// liblzma's internal state, which Go memory must not.
static lzma_stream *cp_new(void) {
	lzma_stream *s = calloc(1, sizeof(lzma_stream));
	if (s != NULL) {
		lzma_stream init = LZMA_STREAM_INIT;
		*s = init;
	}
	return s;
}

static void cp_free(lzma_stream *s) {
	lzma_end(s);
	free(s);
}

// cp_code runs the decoder over Go-owned buffers. The pointers are only
// used for the duration of the call (cgo's rule for Go pointers passed to
// C): liblzma copies what it needs into its own state, and the stream's
// next_in/next_out are cleared before returning.
static cp_result cp_code(lzma_stream *s, const uint8_t *in, size_t in_len,
		uint8_t *out, size_t out_len, int finish) {
	s->next_in = in;
	s->avail_in = in_len;
	s->next_out = out;
	s->avail_out = out_len;
	cp_result r;
	r.ret = lzma_code(s, finish ? LZMA_FINISH : LZMA_RUN);
	r.in_used = in_len - s->avail_in;
	r.out_used = out_len - s->avail_out;
	s->next_in = NULL;
	s->avail_in = 0;
	s->next_out = NULL;
	s->avail_out = 0;
	return r;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"unsafe"
)

// xzDecoderName says which xz decoder this binary uses.
const xzDecoderName = "liblzma " + C.LZMA_VERSION_STRING

// xzCodec is liblzma's.
var xzCodec = codec{open: openLZMA, truncated: isLZMATruncated}

// lzmaMemlimit is liblzma's bound on the decoder's memory: the dictionary
// (at most maxXZDict, as for the Go decoder) plus the decoder's own state
// (about 30 KiB). xz dictionary sizes are 2^n or 3·2^(n-1), so the next size
// above 64 MiB is 96 MiB: the margin admits no larger dictionary.
const lzmaMemlimit = maxXZDict + 1<<20

// lzmaInBufSize is how much compressed input one lzma_code call gets.
const lzmaInBufSize = 64 << 10

// errLZMATruncated is liblzma saying it needs more input at the end of the
// input (LZMA_BUF_ERROR with LZMA_FINISH): the stream stopped early.
var errLZMATruncated = errors.New("xz: compressed data is truncated or otherwise corrupt")

func isLZMATruncated(err error) bool { return errors.Is(err, errLZMATruncated) }

// lzmaState owns one lzma_stream. It is separate from lzmaDecoder so that
// the cleanup that frees it does not keep the decoder reachable.
type lzmaState struct{ s *C.lzma_stream }

// lzmaDecoder is an io.Reader over one xz input (concatenated streams and
// stream padding allowed, as xz(1) and the Go decoder read them). Decoders
// are pooled like the Go ones (see xzReaders): re-initialising an
// lzma_stream keeps liblzma's allocations, and its dictionary when the next
// stream asks for the same size.
type lzmaDecoder struct {
	st  *lzmaState
	src io.Reader
	in  []byte // compressed input; unread is in[off:end]
	off int
	end int
	eof bool  // src returned io.EOF
	err error // sticky: io.EOF at the end, or the failure
}

var lzmaDecoders sync.Pool

func newLZMADecoder() (*lzmaDecoder, error) {
	s := C.cp_new()
	if s == nil {
		return nil, errors.New("xz: out of memory")
	}
	st := &lzmaState{s: s}
	d := &lzmaDecoder{st: st, in: make([]byte, lzmaInBufSize)}
	// A decoder the pool drops (sync.Pool lets idle ones go after two
	// collections) frees its C memory when the collector finds it
	// unreachable; liblzma's dictionary is invisible to the collector.
	runtime.AddCleanup(d, func(st *lzmaState) { C.cp_free(st.s) }, st)
	return d, nil
}

func openLZMA(src io.Reader) (io.Reader, func(), error) {
	d, _ := lzmaDecoders.Get().(*lzmaDecoder)
	if d == nil {
		var err error
		if d, err = newLZMADecoder(); err != nil {
			return nil, nil, err
		}
	}
	// LZMA_CONCATENATED: read streams until the input ends, as xz -dc does.
	// The memory limit is checked when a block header names its dictionary.
	if ret := C.lzma_stream_decoder(d.st.s, C.uint64_t(lzmaMemlimit), C.LZMA_CONCATENATED); ret != C.LZMA_OK {
		// Only allocation can fail here; the state is still valid to end.
		lzmaDecoders.Put(d)
		return nil, nil, lzmaError(ret)
	}
	d.src, d.off, d.end, d.eof, d.err = src, 0, 0, false, nil
	release := func() {
		d.src = nil // an idle decoder keeps no finished download's input alive
		lzmaDecoders.Put(d)
	}
	return d, release, nil
}

func (d *lzmaDecoder) Read(p []byte) (int, error) {
	if d.err != nil {
		return 0, d.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	for {
		if d.off == d.end && !d.eof {
			n, err := d.src.Read(d.in)
			d.off, d.end = 0, n
			if err == io.EOF {
				d.eof = true
			} else if err != nil {
				d.err = err // errStopped, for one: the verifier looks for it
				return 0, err
			}
			if n == 0 && !d.eof {
				continue
			}
		}
		var inPtr *C.uint8_t
		if d.off < d.end {
			inPtr = (*C.uint8_t)(unsafe.Pointer(&d.in[d.off]))
		}
		finish := C.int(0)
		if d.eof && d.off == d.end {
			finish = 1
		}
		r := C.cp_code(d.st.s, inPtr, C.size_t(d.end-d.off),
			(*C.uint8_t)(unsafe.Pointer(&p[0])), C.size_t(len(p)), finish)
		d.off += int(r.in_used)
		n := int(r.out_used)
		switch r.ret {
		case C.LZMA_OK:
			if n > 0 {
				return n, nil
			}
			// Input consumed into the decoder's state; feed it more.
		case C.LZMA_STREAM_END:
			d.err = io.EOF
			return n, nil
		default:
			if r.ret == C.LZMA_BUF_ERROR && finish == 1 {
				d.err = errLZMATruncated
			} else {
				d.err = lzmaError(r.ret)
			}
			// Decoded bytes before the failure still count, like the Go
			// decoder's: the caller sees them, then the error.
			if n > 0 {
				return n, nil
			}
			return 0, d.err
		}
	}
}

// lzmaError words liblzma's failures (see lzma/base.h).
func lzmaError(ret C.lzma_ret) error {
	switch ret {
	case C.LZMA_MEM_ERROR:
		return errors.New("xz: out of memory")
	case C.LZMA_MEMLIMIT_ERROR:
		return fmt.Errorf("xz: dictionary larger than the %d MiB limit", maxXZDict>>20)
	case C.LZMA_FORMAT_ERROR:
		return errors.New("xz: not an xz stream")
	case C.LZMA_OPTIONS_ERROR:
		return errors.New("xz: unsupported options in the stream header")
	case C.LZMA_DATA_ERROR:
		return errors.New("xz: compressed data is corrupt")
	case C.LZMA_UNSUPPORTED_CHECK:
		return errors.New("xz: unsupported integrity check")
	case C.LZMA_BUF_ERROR:
		return errLZMATruncated
	default:
		return fmt.Errorf("xz: liblzma error %d", int(ret))
	}
}
