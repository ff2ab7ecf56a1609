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
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const (
	// Holdback is how many bytes of a download in progress are kept from
	// readers until both hashes have been checked: with Content-Length set,
	// a client can never hold a complete unverified NAR.
	Holdback = 64 << 10
	// bufSize is the read size of the download and of each reader.
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
	// permanent (and closes it); Discard removes a failed one.
	Temp    func() (*os.File, error)
	Commit  func(f *os.File) error
	Discard func(f *os.File)
	// Grow, when set, is asked before n more bytes are written to f. If it
	// refuses (the cache has no room), a download nobody reads any more
	// stops with its error; one that clients still read goes on (its bytes
	// are bounded by the NAR's declared size, and eviction catches up when
	// it is committed).
	Grow func(f *os.File, n int64) error
	// Done, when set, learns how the download ended before any reader does,
	// so that a quarantine is in place before a client can retry. err is nil,
	// a *verify.Error (the bytes disagree with Expect), a *TruncatedError (the
	// transfer broke) or another error (the upstream or the disk failed);
	// written is how many bytes of the file were received.
	Done func(written int64, err error)
	// Finally, when set, runs after every reader learned the result (for
	// work that must not delay the last bytes, such as eviction).
	Finally func(err error)
}

// Group is the set of running downloads.
type Group struct {
	ctx  context.Context // downloads outlive the request that started them, not the Group
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu        sync.Mutex
	downloads map[string]*Download
	closed    bool
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

// Join returns a reader of the running download of job.Name, starting the
// download if there is none. Before starting one it calls admit under the
// group's lock, so that a check such as "is the blob there by now?" or "is
// the path still approved?" cannot race a download that just ended; an
// error from admit is returned as it is. The caller must Close the reader.
func (g *Group) Join(ctx context.Context, job Job, admit func() error) (*Reader, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, ErrClosed
	}
	if dl := g.downloads[job.Name]; dl != nil {
		if dl.job.Expect != job.Expect {
			return nil, ErrOtherVariant
		}
		return dl.reader(ctx), nil
	}
	if admit != nil {
		if err := admit(); err != nil {
			return nil, err
		}
	}
	tmp, err := job.Temp()
	if err != nil {
		return nil, err
	}
	rf, err := os.Open(tmp.Name())
	if err != nil {
		job.Discard(tmp)
		return nil, fmt.Errorf("open temp file: %w", err)
	}
	dl := &Download{job: job, changed: make(chan struct{}), rf: rf, holders: 1}
	g.downloads[job.Name] = dl
	r := dl.reader(ctx)
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		g.run(dl, tmp)
	}()
	return r, nil
}

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
	changed chan struct{} // closed and replaced whenever avail/done change
	avail   int64         // bytes readers may read
	done    bool
	err     error    // set when the download failed
	rf      *os.File // shared read handle; ReadAt is safe concurrently
	holders int      // holders of rf: the writer and each open Reader
}

func (dl *Download) reader(ctx context.Context) *Reader {
	dl.mu.Lock()
	dl.holders++
	dl.mu.Unlock()
	return &Reader{dl: dl, ctx: ctx}
}

// readers returns the number of open Readers.
func (dl *Download) readers() int {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	return dl.holders - 1 // the writer holds one
}

func (dl *Download) release() {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	dl.holders--
	if dl.holders == 0 {
		dl.rf.Close()
	}
}

// publish makes n bytes readable, or ends the download.
func (dl *Download) publish(n int64, done bool, err error) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	dl.avail, dl.done, dl.err = n, done, err
	close(dl.changed)
	dl.changed = make(chan struct{})
}

// wait blocks until more than off bytes are readable, the download ended,
// or ctx ended.
func (dl *Download) wait(ctx context.Context, off int64) (avail int64, done bool, err error) {
	for {
		dl.mu.Lock()
		avail, done, err, ch := dl.avail, dl.done, dl.err, dl.changed
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

// run is the writer. It ends by committing the file or failing every reader.
func (g *Group) run(dl *Download, tmp *os.File) {
	job := dl.job
	written, err := dl.copy(g.ctx, tmp)
	if err == nil {
		err = job.Commit(tmp)
	} else {
		job.Discard(tmp)
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
	dl.publish(written, true, err)
	dl.release()
	if job.Finally != nil {
		job.Finally(err)
	}
}

// copy runs the transfer through the verifier into tmp and returns the
// bytes written or why it failed.
func (dl *Download) copy(ctx context.Context, tmp *os.File) (int64, error) {
	v, err := verify.NewVerifier(dl.job.Expect)
	if err != nil {
		return 0, err
	}
	defer v.Abort()
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
			if dl.job.Grow != nil {
				if err := dl.job.Grow(tmp, int64(n)); err != nil && dl.readers() == 0 {
					return written, err
				}
			}
			if _, err := tmp.Write(buf[:n]); err != nil {
				return written, fmt.Errorf("write temp file: %w", err)
			}
			written += int64(n)
			dl.publish(max(0, written-Holdback), false, nil)
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

// Reader reads one download from its start. Read blocks until bytes are
// verified-safe to hand out; it returns io.EOF only after the whole NAR was
// verified, and the download's error if it failed.
type Reader struct {
	dl     *Download
	ctx    context.Context
	off    int64
	closed bool
}

// Read implements io.Reader.
func (r *Reader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	avail, done, err := r.dl.wait(r.ctx, r.off)
	if err != nil {
		return 0, err
	}
	if r.off >= avail {
		if done {
			return 0, io.EOF
		}
		return 0, nil
	}
	n, err := r.dl.rf.ReadAt(p[:min(int64(len(p)), avail-r.off)], r.off)
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
		r.dl.release()
	}
	return nil
}
