//go:build liblzma

package verify

// The xz decoder of liblzma (xz-utils), the library Nix itself decodes and
// encodes xz with, through cgo. Built only with `-tags liblzma`; without
// the tag the pure-Go decoder (openGoXZ) is the only one. liblzma decodes
// about 1.5x as fast as the Go port and keeps its dictionary in C memory,
// outside the Go heap, so the collector's headroom does not double it.

/*
#cgo pkg-config: liblzma
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <lzma.h>

// Allocations of at least CP_MMAP_MIN bytes (the dictionary, 8 MiB for
// what Nix writes; the decoder's state and input buffer, tens of KiB) get
// pages of their own from mmap and go back to the kernel on free. glibc's
// malloc would, after the first such free, raise its mmap threshold and
// serve the next dictionaries from its arenas, which keep freed memory
// resident; and it keeps an arena per thread that called it, and cgo calls
// run on many threads (eight arenas of ~200 KiB each in a cold fetch).
// mmap'd pages also cost nothing until the decoder writes them: a NAR of
// 100 bytes uses one page of its 8 MiB dictionary. Every block carries a
// header with its size (liblzma's free does not pass it), 0 for malloc'd
// ones.
#define CP_MMAP_MIN (16u << 10)
#define CP_HDR 16

static void *cp_alloc(void *opaque, size_t nmemb, size_t size) {
	(void)opaque;
	if (size != 0 && nmemb > (SIZE_MAX - CP_HDR) / size)
		return NULL;
	size_t n = nmemb * size + CP_HDR;
	uint8_t *p;
	if (n >= CP_MMAP_MIN) {
		p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			return NULL;
		*(size_t *)p = n;
	} else {
		p = malloc(n);
		if (p == NULL)
			return NULL;
		*(size_t *)p = 0;
	}
	return p + CP_HDR;
}

static void cp_free_mem(void *opaque, void *ptr) {
	(void)opaque;
	if (ptr == NULL)
		return;
	uint8_t *p = (uint8_t *)ptr - CP_HDR;
	size_t n = *(size_t *)p;
	if (n != 0)
		munmap(p, n);
	else
		free(p);
}

static const lzma_allocator cp_allocator = { cp_alloc, cp_free_mem, NULL };

// cp_state is one decoder: the lzma_stream (it holds pointers to liblzma's
// state, which Go memory must not) and its input buffer, in C memory.
typedef struct {
	lzma_stream s;
	uint8_t in[64 << 10];
} cp_state;

// cp_new starts a decoder reading concatenated .xz streams and padding (as
// xz -dc does), with memlimit bounding the dictionary. On failure it
// frees everything and returns NULL with *ret set.
static cp_state *cp_new(uint64_t memlimit, lzma_ret *ret) {
	cp_state *st = cp_alloc(NULL, 1, sizeof(cp_state));
	if (st == NULL) {
		*ret = LZMA_MEM_ERROR;
		return NULL;
	}
	lzma_stream init = LZMA_STREAM_INIT;
	st->s = init;
	st->s.allocator = &cp_allocator;
	*ret = lzma_stream_decoder(&st->s, memlimit, LZMA_CONCATENATED);
	if (*ret != LZMA_OK) {
		lzma_end(&st->s);
		cp_free_mem(NULL, st);
		return NULL;
	}
	return st;
}

static void cp_end(cp_state *st) {
	lzma_end(&st->s);
	cp_free_mem(NULL, st);
}

// The result of one cp_code call: lzma_ret and how much of each buffer it
// used.
typedef struct {
	lzma_ret ret;
	size_t in_used;
	size_t out_used;
} cp_result;

// cp_code decodes st->in[off:end] into out, a Go buffer. out is used only
// for the duration of the call (cgo's rule for Go pointers passed to C):
// liblzma copies what it keeps into its own state, and next_out is cleared
// before returning.
static cp_result cp_code(cp_state *st, size_t off, size_t end,
		uint8_t *out, size_t out_len, int finish) {
	lzma_stream *s = &st->s;
	s->next_in = st->in + off;
	s->avail_in = end - off;
	s->next_out = out;
	s->avail_out = out_len;
	cp_result r;
	r.ret = lzma_code(s, finish ? LZMA_FINISH : LZMA_RUN);
	r.in_used = (end - off) - s->avail_in;
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
	"sync/atomic"
	"unsafe"
)

// XZDecoder names the xz decoder this binary was built with (cacheproxy
// --version prints it).
const XZDecoder = "liblzma " + C.LZMA_VERSION_STRING

// xzCodec is liblzma's.
var xzCodec = codec{open: openLZMA, truncated: isLZMATruncated}

// lzmaMemlimit is liblzma's bound on the decoder's memory: the dictionary
// (at most maxXZDict, as for the Go decoder) plus the decoder's own state
// (about 30 KiB). xz dictionary sizes are 2^n or 3·2^(n-1), so the next size
// above 64 MiB is 96 MiB: the margin admits no larger dictionary.
const lzmaMemlimit = maxXZDict + 1<<20

// errLZMATruncated is liblzma saying it needs more input at the end of the
// input (LZMA_BUF_ERROR with LZMA_FINISH): the stream stopped early.
var errLZMATruncated = errors.New("xz: compressed data is truncated or otherwise corrupt")

func isLZMATruncated(err error) bool { return errors.Is(err, errLZMATruncated) }

// lzmaStates counts the decoders allocated and not yet freed (for tests: C
// memory the collector does not see must still be given back).
var lzmaStates atomic.Int64

// lzmaDecoder is an io.Reader over one xz input (concatenated streams and
// stream padding allowed, as xz(1) and the Go decoder read them).
//
// Unlike the Go decoders, these are not pooled: a fresh decoder per NAR
// costs a few small allocations, and its dictionary is mmap'd (see
// cp_alloc), so it takes memory only as the NAR fills it and gives all of
// it back when the NAR is done. A pooled decoder would keep a whole
// dictionary resident per idle decoder, and sync.Pool keeps more of them
// than there are downloads (one private to each P, and a victim
// generation).
type lzmaDecoder struct {
	st  *C.cp_state
	in  []byte // st.in, from Go; unread input is in[off:end]
	src io.Reader
	off int
	end int
	eof bool  // src returned io.EOF
	err error // sticky: io.EOF at the end, or the failure
}

func openLZMA(src io.Reader, _ uint64) (io.Reader, func(), error) {
	var ret C.lzma_ret
	st := C.cp_new(C.uint64_t(lzmaMemlimit), &ret)
	if st == nil {
		return nil, nil, lzmaError(ret)
	}
	lzmaStates.Add(1)
	d := &lzmaDecoder{
		st:  st,
		in:  unsafe.Slice((*byte)(unsafe.Pointer(&st.in[0])), len(st.in)),
		src: src,
	}
	closed := false
	release := func() {
		if !closed {
			closed = true
			C.cp_end(d.st)
			d.st, d.in = nil, nil
			lzmaStates.Add(-1)
		}
	}
	return d, release, nil
}

func (d *lzmaDecoder) Read(p []byte) (int, error) {
	if d.err != nil {
		return 0, d.err
	}
	if d.st == nil {
		return 0, errors.New("xz: read after close")
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
		finish := C.int(0)
		if d.eof && d.off == d.end {
			finish = 1
		}
		r := C.cp_code(d.st, C.size_t(d.off), C.size_t(d.end),
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
