package verify

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// Expect is what a NAR must be: what an approved narinfo promises about its
// NAR file. The stored decision, the blob index and the verifier all hold
// this one struct, so "was this blob verified against what the client was
// promised?" is plain equality. JSON field names are those of the state DB.
type Expect struct {
	// Compression of the file. An unsupported one makes NewVerifier fail.
	Compression narinfo.Compression `json:"compression"`
	// FileHash of the compressed bytes; zero when unknown.
	FileHash narinfo.SHA256 `json:"file_hash,omitzero"`
	// FileSize is the compressed size, 0 when unknown.
	FileSize uint64 `json:"file_size,omitempty"`
	// NarHash of the decompressed NAR (required).
	NarHash narinfo.SHA256 `json:"nar_hash"`
	// NarSize is the decompressed size (required, > 0).
	NarSize uint64 `json:"nar_size"`
	// Flat, when set, additionally requires the NAR to hold exactly one
	// non-executable regular file whose contents hash to it: the content
	// address of a "fixed:sha256" flat or "text:sha256" path.
	Flat narinfo.SHA256 `json:"flat_hash,omitzero"`
}

// MaxFileSize bounds the bytes of the NAR file: FileSize when the narinfo
// gives it, else NarSize plus what a compressor adds to incompressible data
// at most. Without it, an upstream could send endless bytes that decode to
// nothing (zstd skippable frames, xz padding) and fill the disk.
func (e Expect) MaxFileSize() uint64 {
	if e.FileSize > 0 {
		return e.FileSize
	}
	if e.Compression == narinfo.CompressionNone || e.Compression == "" {
		return e.NarSize
	}
	return e.NarSize + e.NarSize/64 + 64<<10
}

// Size is the number of bytes a client receives for this NAR file, or -1
// when neither FileSize nor (uncompressed) NarSize says.
func (e Expect) Size() int64 {
	switch {
	case e.FileSize > 0:
		return int64(e.FileSize)
	case e.Compression == narinfo.CompressionNone || e.Compression == "":
		return int64(e.NarSize)
	}
	return -1
}

// Check names the check that failed, with the label values of the
// cacheproxy_nar_verification_failures_total metric.
type Check string

// The checks of the README's NAR rules. A Verifier never returns CheckTruncated
// itself: only the caller knows that the upstream connection broke, and then
// classifies the failure as truncated whatever the Verifier saw.
const (
	CheckNarHash    Check = "nar_hash"
	CheckNarSize    Check = "nar_size"
	CheckFileHash   Check = "file_hash"
	CheckFileSize   Check = "file_size"
	CheckDecompress Check = "decompress"
	CheckTruncated  Check = "truncated"
)

// Error is a verification failure: the bytes disagree with the narinfo.
type Error struct {
	Check  Check
	Detail string
	// Err is the underlying cause (a decoder error), if any.
	Err error
}

func (e *Error) Error() string {
	return "nar verification failed: " + string(e.Check) + ": " + e.Detail
}

// Unwrap returns the underlying cause.
func (e *Error) Unwrap() error { return e.Err }

// Misuse errors: programming errors, not verification failures, so they are
// not *Error.
var (
	errFinished = errors.New("verify: Write after Finish")
	errAborted  = errors.New("verify: verifier was aborted")
)

// Verifier checks one NAR download on the fly. It is fed the compressed bytes
// with Write and gives its verdict in Finish. A Verifier is not safe for
// concurrent use; every Verifier must end with Finish or Abort, which release
// its goroutines.
type Verifier struct {
	fileWant narinfo.SHA256 // zero when FileHash is unknown
	fileSize uint64         // 0 when unknown
	fileMax  uint64         // bound on the compressed bytes (Expect.MaxFileSize)
	fileN    uint64
	// fileHash hashes the compressed bytes; nil for "none", where the
	// compressed bytes are the NAR and nar.h already hashes them.
	fileHash hash.Hash

	narWant narinfo.SHA256
	nar     *narSink
	dec     *decoder // nil for "none"

	err    error // first failure returned to the caller; sticky
	closed bool  // Finish or Abort ran
}

// NewVerifier returns a Verifier for a download expected to match e. It fails
// only when e itself is unusable (unknown compression, malformed hash,
// missing NarSize).
func NewVerifier(e Expect) (*Verifier, error) {
	if e.NarHash.IsZero() {
		return nil, errors.New("new verifier: NarHash is required")
	}
	if e.NarSize == 0 {
		// Every NAR has a header, so 0 can only mean "unknown", and an
		// unknown size would leave decompression unbounded.
		return nil, errors.New("new verifier: NarSize is required")
	}
	v := &Verifier{fileSize: e.FileSize, fileMax: e.MaxFileSize(), narWant: e.NarHash, fileWant: e.FileHash}
	var dec codec
	if e.Compression != narinfo.CompressionNone && e.Compression != "" {
		var err error
		if dec, err = codecFor(e.Compression); err != nil {
			return nil, fmt.Errorf("new verifier: %w", err)
		}
		v.fileHash = sha256.New()
	}

	v.nar = &narSink{h: sha256.New(), limit: e.NarSize}
	if !e.Flat.IsZero() {
		v.nar.flat = newFlatChecker(e.Flat)
	}
	if dec.open != nil {
		v.dec = startDecoder(dec, v.nar)
	}
	return v, nil
}

// SetNAROutput makes the verifier copy the decoded NAR to w as it checks
// it (to re-encode it, say), never more than NarSize bytes. Call it before
// the first Write. w is written from the decoding goroutine; an error from
// it fails the verification with an *OutputError, which is not an *Error:
// the bytes were not found to disagree with the narinfo.
func (v *Verifier) SetNAROutput(w io.Writer) { v.nar.out = w }

// OutputError is a failure of the NAR output (SetNAROutput), not of the
// NAR.
type OutputError struct{ Err error }

func (e *OutputError) Error() string { return "NAR output: " + e.Err.Error() }

// Unwrap returns the output's error.
func (e *OutputError) Unwrap() error { return e.Err }

// fail records the first failure; later calls keep returning it.
func (v *Verifier) fail(err error) error {
	if v.err == nil {
		v.err = err
	}
	return v.err
}

// Write feeds compressed bytes. It returns an *Error as soon as the data is
// provably bad: more compressed bytes than FileSize, more decompressed bytes
// than NarSize, undecodable data, trailing bytes after the compressed stream.
// Decoding runs concurrently, so a decoder failure may surface on a later
// Write (or, at the latest, in Finish); Write of no bytes just polls for it.
func (v *Verifier) Write(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	if v.closed {
		return 0, errFinished
	}
	// Uncompressed without a FileSize, the file is the NAR: its bound is
	// NarSize, and the NAR writer below names that check (nar_size).
	if uint64(len(p)) > v.fileMax-v.fileN && (v.dec != nil || v.fileSize > 0) {
		if v.fileSize > 0 {
			return 0, v.fail(&Error{Check: CheckFileSize,
				Detail: fmt.Sprintf("more than the expected %d compressed bytes", v.fileSize)})
		}
		return 0, v.fail(&Error{Check: CheckFileSize,
			Detail: fmt.Sprintf("more than %d compressed bytes for a NAR of %d bytes", v.fileMax, v.nar.limit)})
	}
	if v.dec == nil {
		if err := v.nar.write(p); err != nil {
			return 0, v.fail(err)
		}
		v.fileN += uint64(len(p))
		return len(p), nil
	}
	v.fileN += uint64(len(p))
	v.fileHash.Write(p)
	if err := v.dec.feed(p); err != nil {
		return 0, v.fail(err)
	}
	return len(p), nil
}

// Finish is called after the last byte. It waits for the decoder to reach
// the end of the stream and checks, in this order: compressed size, clean
// decoder end (no corrupt data, no trailing garbage), decompressed size,
// compressed hash, NAR hash, content address. It returns nil or an *Error.
// A stream that is shorter than expected but otherwise consistent fails with
// CheckFileSize (when FileSize is known) or CheckNarSize.
func (v *Verifier) Finish() error {
	if v.closed {
		return v.err
	}
	if v.err != nil {
		v.Abort()
		return v.err
	}
	v.closed = true

	// Stop the decoder first, so that every path below has released it.
	var decErr error
	if v.dec != nil {
		decErr = v.dec.finish()
	}
	var flatErr error
	if v.nar.flat != nil {
		if decErr != nil {
			v.nar.flat.stop()
		} else {
			flatErr = v.nar.flat.finish()
		}
	}

	if v.fileSize > 0 && v.fileN < v.fileSize {
		return v.fail(&Error{Check: CheckFileSize,
			Detail: fmt.Sprintf("compressed stream ended after %d of %d bytes", v.fileN, v.fileSize)})
	}
	if decErr != nil {
		return v.fail(decErr)
	}
	if v.nar.n != v.nar.limit {
		return v.fail(&Error{Check: CheckNarSize,
			Detail: fmt.Sprintf("NAR ended after %d of %d bytes", v.nar.n, v.nar.limit)})
	}
	narGot := sum(v.nar.h)
	if !v.fileWant.IsZero() {
		fileGot := narGot
		if v.fileHash != nil {
			fileGot = sum(v.fileHash)
		}
		if fileGot != v.fileWant {
			return v.fail(&Error{Check: CheckFileHash,
				Detail: fmt.Sprintf("compressed bytes hash to %s, narinfo says %s", fileGot, v.fileWant)})
		}
	}
	if narGot != v.narWant {
		return v.fail(&Error{Check: CheckNarHash,
			Detail: fmt.Sprintf("NAR hashes to %s, narinfo says %s", narGot, v.narWant)})
	}
	if flatErr != nil {
		return v.fail(flatErr)
	}
	return nil
}

// Abort releases the decoder goroutine (if any) without checking anything.
// It is safe to call at any time, also after Finish, and more than once.
func (v *Verifier) Abort() {
	if v.closed {
		return
	}
	v.closed = true
	// A later Finish must not mistake "nothing checked" for "verified".
	v.fail(errAborted)
	if v.dec != nil {
		v.dec.abort()
	}
	if v.nar.flat != nil {
		v.nar.flat.stop()
	}
}

// narSink hashes and counts the decompressed NAR and refuses to go past its
// declared size: an upstream cannot make us hash or forward more than
// NarSize bytes, whatever the compressed stream expands to.
type narSink struct {
	h     hash.Hash
	n     uint64
	limit uint64
	flat  *flatChecker // nil unless a content address is to be proven
	out   io.Writer    // nil unless SetNAROutput
}

func (s *narSink) write(p []byte) error {
	if uint64(len(p)) > s.limit-s.n {
		return &Error{Check: CheckNarSize,
			Detail: fmt.Sprintf("NAR is longer than the expected %d bytes", s.limit)}
	}
	s.h.Write(p)
	s.n += uint64(len(p))
	if s.out != nil {
		if _, err := s.out.Write(p); err != nil {
			return &OutputError{Err: err}
		}
	}
	if s.flat != nil {
		return s.flat.write(p)
	}
	return nil
}

// Buffers between Write and the decoder goroutine. Write copies into them so
// the caller's network reads and the compressed-stream hashing overlap with
// decoding; their number bounds the memory one download can pin.
const (
	feedBufSize  = 64 << 10
	feedBufCount = 2
	// outBufSize is the decoder goroutine's read size.
	outBufSize = 128 << 10
)

// decoder runs a reader-based decompressor in a goroutine, fed by a bounded
// channel of buffers.
type decoder struct {
	in      chan []byte   // filled buffers, Write -> decoder
	free    chan []byte   // emptied buffers, decoder -> Write
	nbuf    int           // buffers allocated so far (Write side)
	stopped chan struct{} // closed by abort
	done    chan struct{} // closed when the goroutine has returned
	err     error         // *Error or nil; written before done is closed
	pulled  uint64        // decompressed bytes taken from the decompressor
}

func startDecoder(c codec, sink *narSink) *decoder {
	d := &decoder{
		in:      make(chan []byte, feedBufCount),
		free:    make(chan []byte, feedBufCount),
		stopped: make(chan struct{}),
		done:    make(chan struct{}),
	}
	go d.run(c, sink)
	return d
}

// feed hands p to the decoder goroutine, in buffer-sized pieces.
func (d *decoder) feed(p []byte) error {
	select {
	case <-d.done:
		return d.failure()
	default:
	}
	for len(p) > 0 {
		var b []byte
		select {
		case b = <-d.free:
		default:
			if d.nbuf < feedBufCount {
				d.nbuf++
				b = make([]byte, feedBufSize)
			} else {
				select {
				case b = <-d.free:
				case <-d.done:
					return d.failure()
				}
			}
		}
		n := copy(b, p)
		p = p[n:]
		select {
		case d.in <- b[:n]:
		case <-d.done:
			return d.failure()
		}
	}
	return nil
}

// failure returns the goroutine's error once it has ended.
func (d *decoder) failure() error {
	if d.err != nil {
		return d.err
	}
	// The goroutine only ends early on an error or on abort, and abort
	// closes the Verifier first; this is defensive.
	return &Error{Check: CheckDecompress, Detail: "decoder stopped"}
}

// finish signals the end of the compressed stream and waits for the
// decoder's verdict.
func (d *decoder) finish() error {
	close(d.in)
	<-d.done
	return d.err
}

func (d *decoder) abort() {
	close(d.stopped)
	<-d.done
}

func (d *decoder) run(c codec, sink *narSink) {
	defer close(d.done)
	src := &chanReader{in: d.in, free: d.free, stopped: d.stopped}
	d.err = d.decode(c, src, sink)
	if d.err != nil && sink.flat != nil {
		// The flat parser would wait for bytes that will never come.
		sink.flat.stop()
	}
}

func (d *decoder) decode(c codec, src *chanReader, sink *narSink) error {
	var in io.Reader = src
	var held *holdbackReader
	if c.holdback > 0 {
		held = newHoldbackReader(src, c.holdback)
		in = held
	}
	r, closeDec, err := c.open(in, sink.limit)
	if err != nil {
		return d.decodeError(c, src, sink, err)
	}
	defer closeDec()
	buf := make([]byte, outBufSize)
	for {
		// Ask for at most one byte more than the NAR may still hold: enough
		// to notice an overlong stream, never more (decompression bombs).
		want := len(buf)
		if rest := sink.limit - sink.n; rest < uint64(want) {
			want = int(rest) + 1
		}
		n, err := r.Read(buf[:want])
		d.pulled += uint64(n)
		if n > 0 {
			if werr := sink.write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return d.decodeError(c, src, sink, err)
		}
	}
	// The decoder is done; anything after the compressed stream is garbage
	// (padding and further streams/frames are the decoders' business).
	extra, err := src.drain()
	if held != nil {
		extra += held.pending()
	}
	if errors.Is(err, errStopped) {
		return &Error{Check: CheckDecompress, Detail: "aborted", Err: err}
	}
	if extra > 0 {
		return &Error{Check: CheckDecompress, Detail: "trailing bytes after the compressed stream"}
	}
	return nil
}

// decodeError classifies a decompressor error. A stream that simply stopped
// early (all input consumed, decoder wants more) is a short NAR rather than
// corrupt data, so it is reported like a short uncompressed stream.
func (d *decoder) decodeError(c codec, src *chanReader, sink *narSink, err error) error {
	if errors.Is(err, errStopped) {
		return &Error{Check: CheckDecompress, Detail: "aborted", Err: err}
	}
	if src.eof && c.truncated(err) && sink.n < sink.limit {
		return &Error{Check: CheckNarSize,
			Detail: fmt.Sprintf("compressed stream ended early, NAR after %d of %d bytes", sink.n, sink.limit), Err: err}
	}
	return &Error{Check: CheckDecompress, Detail: fmt.Sprintf("after %d NAR bytes: %v", sink.n, err), Err: err}
}

// holdbackReader passes bytes through but keeps the last n it has received
// until more arrive or the input ends (see brotliHoldback).
type holdbackReader struct {
	r    io.Reader
	n    int
	buf  []byte // store; unread bytes are buf[off:end]
	off  int
	end  int
	rerr error // the underlying reader's terminal error
}

func newHoldbackReader(r io.Reader, n int) *holdbackReader {
	return &holdbackReader{r: r, n: n, buf: make([]byte, feedBufSize+n)}
}

func (h *holdbackReader) pending() int { return h.end - h.off }

func (h *holdbackReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	for {
		avail := h.end - h.off
		if h.rerr != nil {
			if avail == 0 {
				return 0, h.rerr
			}
		} else {
			avail -= h.n
		}
		if avail > 0 {
			k := copy(p, h.buf[h.off:h.off+avail])
			h.off += k
			return k, nil
		}
		// Keep the held bytes at the front and read behind them.
		h.end = copy(h.buf, h.buf[h.off:h.end])
		h.off = 0
		k, err := h.r.Read(h.buf[h.end:])
		h.end += k
		if err != nil {
			h.rerr = err
		}
	}
}

// errStopped is what the decoder reads after Abort.
var errStopped = errors.New("verify: aborted")

// chanReader is the decompressor's io.Reader (and io.ByteReader, so that
// decoders that want one do not add their own buffering) over the buffers
// Write sends.
type chanReader struct {
	in      <-chan []byte
	free    chan<- []byte
	stopped <-chan struct{}
	buf     []byte // buffer being read, to recycle
	cur     []byte // unread part of buf
	eof     bool   // in was closed: Finish was called
}

func (r *chanReader) fill() error {
	for len(r.cur) == 0 {
		if r.buf != nil {
			// free has room for every buffer in existence: never blocks.
			r.free <- r.buf[:cap(r.buf)]
			r.buf = nil
		}
		if r.eof {
			return io.EOF
		}
		select {
		case b, ok := <-r.in:
			if !ok {
				r.eof = true
				return io.EOF
			}
			r.buf, r.cur = b, b
		case <-r.stopped:
			return errStopped
		}
	}
	return nil
}

func (r *chanReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if len(r.cur) == 0 {
		if err := r.fill(); err != nil {
			return 0, err
		}
	}
	n := copy(p, r.cur)
	r.cur = r.cur[n:]
	return n, nil
}

func (r *chanReader) ReadByte() (byte, error) {
	if len(r.cur) == 0 {
		if err := r.fill(); err != nil {
			return 0, err
		}
	}
	c := r.cur[0]
	r.cur = r.cur[1:]
	return c, nil
}

// drain consumes the rest of the input and counts it. It returns as soon as
// it has seen a byte, since one is enough to fail.
func (r *chanReader) drain() (int, error) {
	if len(r.cur) > 0 {
		return len(r.cur), nil
	}
	if err := r.fill(); err != nil {
		if err == io.EOF {
			return 0, nil
		}
		return 0, err
	}
	return len(r.cur), nil
}
