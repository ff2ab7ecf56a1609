// Package narstream runs the one upstream download of a NAR that any number
// of clients read at once, in the spirit of groupcache's singleflight but for
// a stream: the first request starts the download, later ones join it and
// read the growing temp file from the start, and nobody waits for anybody.
//
// Trust model: the bytes come from an upstream and are trusted by nobody.
// Every byte goes through a verify.Verifier. Readers see bytes only Holdback
// bytes behind the download, and the last Holdback bytes only after the
// verifier has said that sizes and hashes match; a reader of a failed
// download gets an error instead, never a short but complete-looking NAR.
// Only a verified file is committed; everything else is discarded.
package narstream

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"

	"golang.org/x/sync/semaphore"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const (
	// Holdback is how many bytes of a download in progress are kept from
	// readers until both hashes have been checked: with Content-Length set,
	// a client can never hold a complete unverified NAR.
	Holdback = 64 << 10
	// bufSize is the read size of the download and of each reader, and
	// so the size of the temp file's writes. On Linux with large folios
	// (6.x) a write's size sets the size of the page-cache folios that
	// hold it, and a blob written in 64 KiB pieces went out through
	// sendfile 10-15% slower than one written in 256 KiB pieces (a warm
	// fetch of bench/fleet.sh's corpus: best of 7, 0.119-0.131 s against
	// 0.106-0.122 s), for 2-3 MiB more peak memory in a cold xz fetch.
	bufSize = 256 << 10
)

// Errors from Join.
var (
	ErrClosed       = errors.New("shutting down")
	ErrOtherVariant = errors.New("another variant of this NAR is being fetched")
)

// Job describes one download.
type Job struct {
	// Name identifies the NAR file; there is at most one download per name.
	Name string
	// Expect is what the bytes must be. Joining a running download with a
	// different Expect fails with ErrOtherVariant.
	Expect verify.Expect
	// Open starts the upstream transfer: the body and its declared length
	// (-1 when unknown).
	Open func(ctx context.Context) (body io.ReadCloser, size int64, err error)
	// Temp creates the file the bytes land in; Commit makes a verified one
	// permanent (and closes it); Discard removes a failed one. With Temp
	// nil the bytes are only verified (and recoded): the download has no
	// readers of the upstream's bytes, only of the recoded file.
	Temp    func() (*os.File, error)
	Commit  func(f *os.File) error
	Discard func(f *os.File)
	// Grow, when set, is asked before n more bytes are written to f. If it
	// refuses (the cache has no room), a download nobody reads any more
	// stops with its error; one that clients still read goes on (its bytes
	// are bounded by the NAR's declared size, and eviction catches up when
	// it is committed).
	Grow func(f *os.File, n int64) error
	// Done, when set, learns how the download ended: a failure before any
	// reader does, so that a quarantine is in place before a client can
	// retry; a success after the readers got the tail and the files were
	// committed (or failed to be: then err says why). err is nil,
	// a *verify.Error (the bytes disagree with Expect), a *TruncatedError (the
	// transfer broke) or another error (the upstream or the disk failed);
	// written is how many bytes of the file were received.
	Done func(written int64, err error)
	// Finally, when set, runs after every reader learned the result (for
	// work that must not delay the last bytes, such as eviction).
	Finally func(err error)
	// Recode, when set, re-encodes the NAR into a second file while it is
	// verified; readers of that file join with JoinRecoded.
	Recode *Recode
}

// Recode is the second file of a download: the decoded NAR, as the
// verifier passes it on, re-encoded. Its readers are held back like those
// of the upstream's bytes, and the file is committed only when the NAR
// verified.
type Recode struct {
	// Encoder returns an encoder writing to w. The download writes the NAR
	// to it and closes it after the NAR verified (to write the end of the
	// stream); a failed download drops it without closing it.
	Encoder func(w io.Writer) io.WriteCloser
	// Temp, Commit and Discard are as for the upstream's bytes; Commit also
	// learns the recoded file's hash and size.
	Temp    func() (*os.File, error)
	Commit  func(f *os.File, sum narinfo.SHA256, size int64) error
	Discard func(f *os.File)
}

// The outputs of a download.
const (
	upstreamOut = iota // the upstream's bytes
	recodedOut         // Job.Recode's file
)

// Group is the set of running downloads.
type Group struct {
	ctx  context.Context // downloads outlive the request that started them, not the Group
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu        sync.Mutex
	downloads map[string]*Download
	closed    bool

	// decoding, when set, bounds the memory of the decoders running at
	// once (LimitDecoding).
	decoding     *semaphore.Weighted
	decodeBudget int64
	decodeWeight func(verify.Expect) int64
}

// LimitDecoding bounds the memory of the decoders running at once to
// budget bytes: a download whose decoder needs weight(its Expect) bytes
// waits, before it opens its upstream, until that much is free (one that
// needs more than budget waits for all of it). Call it before the Group
// is used.
func (g *Group) LimitDecoding(budget int64, weight func(verify.Expect) int64) {
	g.decoding, g.decodeBudget, g.decodeWeight = semaphore.NewWeighted(budget), budget, weight
}

// admitDecoder waits for the decoder memory a download needs and returns
// the function that gives it back.
func (g *Group) admitDecoder(e verify.Expect) (release func(), err error) {
	if g.decoding == nil {
		return func() {}, nil
	}
	w := min(g.decodeWeight(e), g.decodeBudget)
	if w <= 0 {
		return func() {}, nil
	}
	if err := g.decoding.Acquire(g.ctx, w); err != nil {
		return nil, ErrClosed
	}
	return func() { g.decoding.Release(w) }, nil
}

// NewGroup returns an empty Group.
func NewGroup() *Group {
	ctx, stop := context.WithCancel(context.Background())
	return &Group{ctx: ctx, stop: stop, downloads: map[string]*Download{}}
}

// Close cancels every download and waits for them to end.
func (g *Group) Close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.stop()
	g.wg.Wait()
}

// Join returns a reader of the upstream's bytes of the running download of
// job.Name, starting the download if there is none. Before starting one it
// calls admit under the group's lock, so that a check such as "is the blob
// there by now?" or "is the path still approved?" cannot race a download
// that just ended; an error from admit is returned as it is. The caller
// must Close the reader.
func (g *Group) Join(ctx context.Context, job Job, admit func() error) (*Reader, error) {
	return g.join(ctx, job, admit, upstreamOut)
}

// JoinRecoded is Join for a reader of the recoded file (job.Recode must be
// set). The recoded file's length is unknown until the download ends.
func (g *Group) JoinRecoded(ctx context.Context, job Job, admit func() error) (*Reader, error) {
	if job.Recode == nil {
		return nil, errors.New("narstream: JoinRecoded of a job without Recode")
	}
	return g.join(ctx, job, admit, recodedOut)
}

func (g *Group) join(ctx context.Context, job Job, admit func() error, out int) (*Reader, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, ErrClosed
	}
	if dl := g.downloads[job.Name]; dl != nil {
		if dl.job.Expect != job.Expect || dl.outs[out] == nil {
			return nil, ErrOtherVariant
		}
		return dl.reader(ctx, out), nil
	}
	if out == upstreamOut && job.Temp == nil {
		return nil, errors.New("narstream: Join of a job without Temp")
	}
	if admit != nil {
		if err := admit(); err != nil {
			return nil, err
		}
	}
	dl := &Download{job: job}
	var tmps [2]*os.File
	temps := [2]func() (*os.File, error){job.Temp, nil}
	discards := [2]func(*os.File){job.Discard, nil}
	if job.Recode != nil {
		temps[recodedOut], discards[recodedOut] = job.Recode.Temp, job.Recode.Discard
	}
	for i, temp := range temps {
		if temp == nil {
			continue
		}
		tmp, err := temp()
		var rf *os.File
		if err == nil {
			if rf, err = os.Open(tmp.Name()); err != nil {
				discards[i](tmp)
				err = fmt.Errorf("open temp file: %w", err)
			}
		}
		if err != nil {
			for j := range i {
				if tmps[j] != nil {
					dl.outs[j].rf.Close()
					discards[j](tmps[j])
				}
			}
			return nil, err
		}
		tmps[i] = tmp
		dl.outs[i] = &output{changed: make(chan struct{}), rf: rf, holders: 1}
	}
	g.downloads[job.Name] = dl
	r := dl.reader(ctx, out)
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		g.run(dl, tmps[upstreamOut], tmps[recodedOut])
	}()
	return r, nil
}

// Wait waits for the downloads under way to end, their files committed
// (tests; a download started meanwhile may be waited for too).
func (g *Group) Wait() { g.wg.Wait() }

// Running reports whether a download of name is under way.
func (g *Group) Running(name string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.downloads[name] != nil
}

// Download is one upstream transfer. The writer never waits for readers.
type Download struct {
	job Job

	mu      sync.Mutex
	outs    [2]*output // by upstreamOut, recodedOut; nil when the job has no such file
	readers int        // open Readers
}

// output is one file of a download and what its readers may read of it.
type output struct {
	changed chan struct{} // closed and replaced whenever avail/done change
	avail   int64         // bytes readers may read
	done    bool
	err     error    // set when the download failed
	rf      *os.File // shared read handle; ReadAt is safe concurrently
	holders int      // holders of rf: the writer and each open Reader
}

func (dl *Download) reader(ctx context.Context, out int) *Reader {
	dl.mu.Lock()
	dl.outs[out].holders++
	dl.readers++
	dl.mu.Unlock()
	return &Reader{dl: dl, out: dl.outs[out], ctx: ctx}
}

// openReaders returns the number of open Readers.
func (dl *Download) openReaders() int {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	return dl.readers
}

func (dl *Download) release(o *output, reader bool) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	if reader {
		dl.readers--
	}
	o.holders--
	if o.holders == 0 {
		o.rf.Close()
	}
}

// publish makes n bytes of o readable, or ends it.
func (dl *Download) publish(o *output, n int64, done bool, err error) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	o.avail, o.done, o.err = n, done, err
	close(o.changed)
	o.changed = make(chan struct{})
}

// wait blocks until more than off bytes of o are readable, the download
// ended, or ctx ended.
func (dl *Download) wait(ctx context.Context, o *output, off int64) (avail int64, done bool, err error) {
	for {
		dl.mu.Lock()
		avail, done, err, ch := o.avail, o.done, o.err, o.changed
		dl.mu.Unlock()
		if avail > off || done {
			return avail, done, err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return avail, false, ctx.Err()
		}
	}
}

// run is the writer. It ends by committing the files or failing every
// reader.
func (g *Group) run(dl *Download, tmp, rtmp *os.File) {
	job := dl.job
	var rw *recodeWriter
	if rtmp != nil {
		rw = &recodeWriter{dl: dl, f: rtmp, h: sha256.New()}
	}
	var written int64
	release, err := g.admitDecoder(job.Expect)
	if err == nil {
		written, err = dl.copy(g.ctx, tmp, rw)
		release()
	}
	verified := err == nil
	if verified {
		// The bytes are verified: the readers get the tail now. Making
		// the files durable (fsync, rename, index) is the cache's
		// business, not the client's: a client does not wait on the
		// disk, and a commit that fails costs a later fetch, never a
		// byte that was not verified.
		if o := dl.outs[upstreamOut]; o != nil {
			dl.publish(o, written, true, nil)
		}
		if o := dl.outs[recodedOut]; o != nil {
			dl.publish(o, rw.n, true, nil)
		}
	}
	// The recoded file first: the upstream's bytes of a recoding download
	// are usually only passed through (their Commit discards them).
	if err == nil && rtmp != nil {
		err = job.Recode.Commit(rtmp, narinfo.SHA256(rw.h.Sum(nil)), rw.n)
		rtmp = nil
	}
	if err == nil && tmp != nil {
		err = job.Commit(tmp)
		tmp = nil
	}
	if tmp != nil {
		job.Discard(tmp)
	}
	if rtmp != nil {
		job.Recode.Discard(rtmp)
	}
	if job.Done != nil {
		job.Done(written, err)
	}
	// Leave the table before announcing the end, so that a new request
	// either joins this download or finds its result (the blob, or the
	// quarantine Done wrote).
	g.mu.Lock()
	delete(g.downloads, job.Name)
	g.mu.Unlock()
	for i, n := range [2]func() int64{func() int64 { return written }, func() int64 { return rw.n }} {
		o := dl.outs[i]
		if o == nil {
			continue
		}
		if !verified { // else published above, and a commit error is not the readers'
			dl.publish(o, n(), true, err)
		}
		dl.release(o, false)
	}
	if job.Finally != nil {
		job.Finally(err)
	}
}

// recodeWriter is where the encoder of a recoding download writes: the
// recoded temp file, hashed and published to its readers as it grows.
type recodeWriter struct {
	dl *Download
	f  *os.File
	h  hash.Hash
	n  int64
}

func (w *recodeWriter) Write(p []byte) (int, error) {
	if w.dl.job.Grow != nil {
		if err := w.dl.job.Grow(w.f, int64(len(p))); err != nil && w.dl.openReaders() == 0 {
			return 0, err
		}
	}
	n, err := w.f.Write(p)
	w.h.Write(p[:n])
	w.n += int64(n)
	if err != nil {
		return n, fmt.Errorf("write recoded temp file: %w", err)
	}
	w.dl.publish(w.dl.outs[recodedOut], max(0, w.n-Holdback), false, nil)
	return n, nil
}

// copy runs the transfer through the verifier into tmp (when there is one)
// and, recoded, into rw (when there is one), and returns the bytes of the
// upstream's file or why it failed.
func (dl *Download) copy(ctx context.Context, tmp *os.File, rw *recodeWriter) (int64, error) {
	v, err := verify.NewVerifier(dl.job.Expect)
	if err != nil {
		return 0, err
	}
	defer v.Abort()
	var enc io.WriteCloser
	if rw != nil {
		enc = dl.job.Recode.Encoder(rw)
		v.SetNAROutput(enc)
	}
	body, size, err := dl.job.Open(ctx)
	if err != nil {
		return 0, err
	}
	defer body.Close()
	buf := make([]byte, bufSize)
	var written int64
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			if _, err := v.Write(buf[:n]); err != nil {
				return written, err
			}
			if tmp != nil {
				if dl.job.Grow != nil {
					if err := dl.job.Grow(tmp, int64(n)); err != nil && dl.openReaders() == 0 {
						return written, err
					}
				}
				if _, err := tmp.Write(buf[:n]); err != nil {
					return written, fmt.Errorf("write temp file: %w", err)
				}
				dl.publish(dl.outs[upstreamOut], max(0, written+int64(n)-Holdback), false, nil)
			}
			written += int64(n)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return written, &TruncatedError{Err: rerr}
		}
	}
	if err := v.Finish(); err != nil {
		// Without a Content-Length, a connection that closed early looks
		// like a clean end. A short stream of unknown length is therefore
		// reported as truncated, with the verifier's verdict attached, and
		// the caller decides when repeated shortness is the upstream's answer.
		var ve *verify.Error
		e := dl.job.Expect
		short := e.FileSize == 0 || uint64(written) < e.FileSize
		if size < 0 && short && errors.As(err, &ve) && ve.Check != verify.CheckNarHash && ve.Check != verify.CheckFileHash {
			return written, &TruncatedError{Err: err, UnknownLength: ve}
		}
		return written, err
	}
	if enc != nil {
		// The NAR verified; the end of the recoded stream may go out.
		if err := enc.Close(); err != nil {
			return written, fmt.Errorf("recode: %w", err)
		}
	}
	return written, nil
}

// TruncatedError is a broken transfer: a network blip, not evidence about
// the NAR.
type TruncatedError struct {
	Err error
	// UnknownLength is set when the transfer only looked truncated because
	// neither a Content-Length nor a FileSize said how long it should be:
	// it may as well be an upstream serving a short NAR on purpose.
	UnknownLength *verify.Error
}

func (e *TruncatedError) Error() string { return "transfer broken: " + e.Err.Error() }
func (e *TruncatedError) Unwrap() error { return e.Err }

// Reader reads one file of a download from its start. Read blocks until
// bytes are verified-safe to hand out; it returns io.EOF only after the
// whole NAR was verified, and the download's error if it failed.
type Reader struct {
	dl     *Download
	out    *output
	ctx    context.Context
	off    int64
	closed bool
}

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	avail, done, err := r.dl.wait(r.ctx, r.out, r.off)
	if err != nil {
		return 0, err
	}
	if r.off >= avail {
		if done {
			return 0, io.EOF
		}
		return 0, nil
	}
	n, err := r.out.rf.ReadAt(p[:min(int64(len(p)), avail-r.off)], r.off)
	r.off += int64(n)
	if err == io.EOF {
		err = nil // the file grows; avail says what is there
	}
	return n, err
}

// Offset returns the bytes read so far.
func (r *Reader) Offset() int64 { return r.off }

// Close releases the reader; the download goes on for the others.
func (r *Reader) Close() error {
	if !r.closed {
		r.closed = true
		r.dl.release(r.out, true)
	}
	return nil
}
