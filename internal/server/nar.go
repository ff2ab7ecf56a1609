package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const (
	// holdback is how many bytes of a download in progress are kept from
	// clients until both hashes have been checked: with Content-Length set,
	// a client can never hold a complete unverified NAR.
	holdback = 64 << 10
	// copyBuf is the read size of the download and of each client.
	copyBuf = 256 << 10
)

func (s *Server) handleNar(w http.ResponseWriter, r *http.Request) {
	file := strings.TrimPrefix(r.URL.Path, "/nar/")
	if strings.Contains(file, "/") || len(file) < 33 || !narinfo.ValidHash(file[:32]) || file[32] != '-' {
		http.Error(w, "malformed NAR file name", http.StatusBadRequest)
		return
	}
	rec, err := s.storedRecord(file[:32])
	if err != nil {
		s.log.Error("nar", "file", file, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	if rec == nil || rec.NarFile != file {
		http.Error(w, "no approved narinfo refers to this NAR", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/x-nix-nar")
	if s.serveCached(w, r, *rec) {
		s.m.cacheHits.WithLabelValues("nar").Inc()
		return
	}
	s.m.cacheMisses.WithLabelValues("nar").Inc()
	s.streamNar(w, r, rec)
}

// serveCached serves rec's NAR from the blob store (sendfile, Range) if a
// blob verified against exactly rec's hashes and sizes is there. A blob of
// the same name verified against another variant (another upstream's
// compression of the same NAR) is dropped: its bytes would not match the
// narinfo the client holds.
func (s *Server) serveCached(w http.ResponseWriter, r *http.Request, rec cache.Record) bool {
	f, err := s.blobs.Open(rec.NarFile)
	if err != nil {
		return false
	}
	defer f.Close()
	if meta, err := s.blobs.Meta(rec.NarFile); err != nil || meta == nil || !sameNar(*meta, rec) {
		s.log.Warn("cached blob was verified against another narinfo; dropping it", "blob", rec.NarFile)
		s.blobs.Remove(rec.NarFile)
		return false
	}
	cw := &countingWriter{ResponseWriter: w}
	http.ServeContent(cw, r, "", time.Time{}, f)
	s.m.servedBytes.WithLabelValues("cache").Add(float64(cw.n))
	return true
}

// sameNar reports whether a blob was verified against rec's expectations.
func sameNar(m cache.BlobMeta, rec cache.Record) bool {
	return m.Compression == rec.Compression && m.FileHash == rec.FileHash && m.FileSize == rec.FileSize &&
		m.NarHash == rec.NarHash && m.NarSize == rec.NarSize && bytes.Equal(m.FlatSHA256, rec.FlatSHA256)
}

func blobMeta(rec cache.Record) cache.BlobMeta {
	return cache.BlobMeta{StorePath: rec.StorePath, Compression: rec.Compression, FileHash: rec.FileHash,
		FileSize: rec.FileSize, NarHash: rec.NarHash, NarSize: rec.NarSize, FlatSHA256: rec.FlatSHA256}
}

var (
	errClosed       = errors.New("server is shutting down")
	errOtherVariant = errors.New("another variant of this NAR is being fetched")
	errNotApproved  = errors.New("no longer approved")
)

type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (w *countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

// ReadFrom passes sendfile through (see statusWriter.ReadFrom).
func (w *countingWriter) ReadFrom(r io.Reader) (int64, error) {
	n, err := readFrom(w.ResponseWriter, r)
	w.n += n
	return n, err
}

// download is the one upstream fetch of one NAR. Clients read the temp file
// as it grows, up to avail; the writer never waits for them.
type download struct {
	rec  cache.Record
	size int64 // expected compressed size, or -1

	mu      sync.Mutex
	changed chan struct{} // closed and replaced whenever avail/done change
	avail   int64         // bytes clients may read
	done    bool
	err     error    // set when the download failed
	rf      *os.File // shared read handle; ReadAt is safe concurrently
	readers int      // holders of rf, the writer included
}

// expectedSize is the compressed size a client will receive, when known.
func expectedSize(rec cache.Record) int64 {
	switch {
	case rec.FileSize > 0:
		return int64(rec.FileSize)
	case rec.Compression == "none" || rec.Compression == "":
		return int64(rec.NarSize)
	}
	return -1
}

// join returns the running download of rec's NAR, starting it if needed,
// with a reader reference taken. It returns nil when the blob appeared in
// the meantime.
func (s *Server) join(rec cache.Record) (*download, error) {
	s.dlMu.Lock()
	defer s.dlMu.Unlock()
	if s.closed {
		return nil, errClosed
	}
	if dl := s.downloads[rec.NarFile]; dl != nil {
		if !sameNar(blobMeta(dl.rec), rec) {
			return nil, errOtherVariant
		}
		dl.mu.Lock()
		dl.readers++
		dl.mu.Unlock()
		return dl, nil
	}
	if f, err := s.blobs.Open(rec.NarFile); err == nil {
		f.Close()
		return nil, nil // finished between our lookup and now
	}
	// A failed download quarantines its path before it leaves the table:
	// look again, so that no second fetch starts for a quarantined path.
	if cur, err := s.storedRecord(rec.NarFile[:32]); err != nil || cur == nil || cur.NarFile != rec.NarFile {
		return nil, errNotApproved
	}
	u := s.upstreamNamed(rec.Upstream)
	if u == nil {
		return nil, fmt.Errorf("upstream %s of %s is no longer configured", rec.Upstream, rec.StorePath)
	}
	tmp, err := s.blobs.CreateTemp(rec.NarFile)
	if err != nil {
		return nil, err
	}
	rf, err := os.Open(tmp.Name())
	if err != nil {
		s.blobs.Discard(tmp)
		return nil, fmt.Errorf("open temp blob: %w", err)
	}
	dl := &download{rec: rec, size: expectedSize(rec), changed: make(chan struct{}), rf: rf, readers: 2}
	s.downloads[rec.NarFile] = dl
	s.bgWG.Add(1)
	go func() {
		defer s.bgWG.Done()
		s.fetch(dl, u, tmp)
	}()
	return dl, nil
}

func (s *Server) upstreamNamed(name string) *upstreamCache {
	for _, u := range s.upstreams {
		if u.name == name {
			return u
		}
	}
	return nil
}

func (dl *download) release() {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	dl.readers--
	if dl.readers == 0 {
		dl.rf.Close()
	}
}

// publish makes n bytes readable, or ends the download with err.
func (dl *download) publish(n int64, done bool, err error) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	dl.avail, dl.done, dl.err = n, done, err
	close(dl.changed)
	dl.changed = make(chan struct{})
}

// wait blocks until more than off bytes are readable, the download ended,
// or ctx ended.
func (dl *download) wait(ctx context.Context, off int64) (avail int64, done bool, err error) {
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

// fetch is the writer: upstream bytes go to the temp file and through the
// verifier; clients see them holdback bytes late, and the last ones only
// once verified. It ends by committing the blob or failing every reader.
func (s *Server) fetch(dl *download, u *upstreamCache, tmp *os.File) {
	rec := dl.rec
	start := time.Now()
	written, err := s.copyVerified(dl, u, tmp)
	s.m.upstreamDuration.WithLabelValues(u.name, "nar").Observe(time.Since(start).Seconds())

	if err == nil {
		if err = s.blobs.Commit(tmp, rec.NarFile, blobMeta(rec)); err == nil {
			s.m.upstreamRequests.WithLabelValues(u.name, "nar", "found").Inc()
			s.dlMu.Lock()
			delete(s.shortRuns, rec.NarFile)
			s.dlMu.Unlock()
		}
	} else {
		s.blobs.Discard(tmp)
	}

	// Fix (found by TestNarTamperedTailQuarantines): count the failure and
	// write the quarantine *before* any reader learns of it. This used to
	// run after publish, so a client that retried the moment its transfer
	// broke (Nix does) still got the approved narinfo and started a second
	// download of the bad NAR. While the download is still in the table, a
	// new request either joins it (and sees the failure) or finds the
	// record gone.
	if err != nil {
		s.narFailed(rec, u, err)
	}
	// Remove the download from the table before announcing the end, so
	// that a new request either joins it or sees the committed blob.
	s.dlMu.Lock()
	delete(s.downloads, rec.NarFile)
	s.dlMu.Unlock()
	dl.publish(written, true, err)
	dl.release()
	// Evict only now: its bbolt writes must not delay the final bytes.
	if err == nil {
		if err := s.blobs.Evict(); err != nil {
			s.log.Error("evict blobs", "err", err)
		}
		s.m.cacheSize.Set(float64(s.blobs.Size()))
	}
}

// copyVerified runs the transfer and returns the bytes written or why it
// failed: a *verify.Error for data that disagrees with the narinfo, a
// truncation error for a broken transfer, or another error.
func (s *Server) copyVerified(dl *download, u *upstreamCache, tmp *os.File) (int64, error) {
	rec := dl.rec
	v, err := verify.NewVerifier(verify.Expect{Compression: rec.Compression, FileHash: rec.FileHash, FileSize: rec.FileSize,
		NarHash: rec.NarHash, NarSize: rec.NarSize, FlatSHA256: rec.FlatSHA256})
	if err != nil {
		return 0, err
	}
	defer v.Abort()
	body, size, err := u.client.Open(s.bg, rec.NarURL)
	if err != nil {
		return 0, err
	}
	defer body.Close()
	buf := make([]byte, copyBuf)
	var written int64
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			if _, err := v.Write(buf[:n]); err != nil {
				return written, err
			}
			if _, err := tmp.Write(buf[:n]); err != nil {
				return written, fmt.Errorf("write temp blob: %w", err)
			}
			written += int64(n)
			dl.publish(max(0, written-holdback), false, nil)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return written, &truncatedError{err: rerr}
		}
	}
	if err := v.Finish(); err != nil {
		// Without a Content-Length, a connection that closed early looks
		// like a clean end; a blip must not quarantine, so a short stream
		// of unknown length counts as truncated.
		var ve *verify.Error
		short := rec.FileSize == 0 || uint64(written) < rec.FileSize
		if size < 0 && short && errors.As(err, &ve) && ve.Check != verify.CheckNarHash && ve.Check != verify.CheckFileHash {
			return written, &truncatedError{err: err, unknownLength: ve}
		}
		return written, err
	}
	return written, nil
}

type truncatedError struct {
	err error
	// unknownLength is set when the transfer only looked truncated because
	// neither a Content-Length nor a FileSize said how long it should be:
	// it may as well be an upstream serving a short NAR on purpose.
	unknownLength *verify.Error
}

// maxAmbiguousTruncations is how many transfers of one NAR in a row may end
// short without any declared length before the shortness counts as the
// upstream's answer (nar_mismatch) rather than a network blip.
const maxAmbiguousTruncations = 3

func (e *truncatedError) Error() string { return "transfer broken: " + e.err.Error() }
func (e *truncatedError) Unwrap() error { return e.err }

// narFailed counts a failed NAR transfer and quarantines the path when the
// complete transfer disagreed with the narinfo.
func (s *Server) narFailed(rec cache.Record, u *upstreamCache, err error) {
	var ve *verify.Error
	var te *truncatedError
	if errors.As(err, &te) && te.unknownLength != nil {
		s.dlMu.Lock()
		s.shortRuns[rec.NarFile]++
		n := s.shortRuns[rec.NarFile]
		s.dlMu.Unlock()
		if n >= maxAmbiguousTruncations {
			err, te = te.unknownLength, nil
		}
	}
	if te == nil {
		s.dlMu.Lock()
		delete(s.shortRuns, rec.NarFile)
		s.dlMu.Unlock()
	}
	switch {
	case te != nil:
		s.m.verifyFailures.WithLabelValues(string(verify.CheckTruncated)).Inc()
		s.m.upstreamRequests.WithLabelValues(u.name, "nar", "truncated").Inc()
		s.log.Warn("NAR transfer broken; will retry on next request", "path", rec.StorePath, "upstream", u.name, "err", err)
	case errors.As(err, &ve):
		s.m.verifyFailures.WithLabelValues(string(ve.Check)).Inc()
		s.m.upstreamRequests.WithLabelValues(u.name, "nar", "mismatch").Inc()
		s.m.decisions.WithLabelValues("rejected", "nar_mismatch").Inc()
		hash := rec.NarFile[:32]
		s.log.Error("NAR failed verification; path quarantined", "path", rec.StorePath, "upstream", u.name, "check", ve.Check, "err", err)
		q := cache.Quarantine{StorePath: rec.StorePath, Check: string(ve.Check), Detail: ve.Detail, Upstream: u.name, Time: s.now()}
		if err := s.db.PutQuarantine(hash, q); err != nil {
			s.log.Error("quarantine", "path", rec.StorePath, "err", err)
		}
		s.db.RecordRejection(cache.Rejection{StorePath: rec.StorePath, Reason: "nar_mismatch", Detail: ve.Error(), Upstream: u.name, Last: s.now()})
	default:
		s.m.upstreamRequests.WithLabelValues(u.name, "nar", "unavailable").Inc()
		s.log.Warn("NAR fetch failed", "path", rec.StorePath, "upstream", u.name, "err", err)
	}
}

// streamNar serves a NAR that is not in the cache from the one download of
// it, starting that download if this is the first request.
func (s *Server) streamNar(w http.ResponseWriter, r *http.Request, rec *cache.Record) {
	size := expectedSize(*rec)
	if r.Method == http.MethodHead {
		if size >= 0 {
			w.Header().Set("Content-Length", fmt.Sprint(size))
		}
		return
	}
	dl, err := s.join(*rec)
	switch {
	case errors.Is(err, errNotApproved):
		http.Error(w, "no approved narinfo refers to this NAR", http.StatusNotFound)
		return
	case err != nil:
		s.log.Warn("start NAR download", "path", rec.StorePath, "err", err)
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, "cannot fetch NAR now: "+err.Error(), http.StatusServiceUnavailable)
		return
	case dl == nil: // committed meanwhile
		if !s.serveCached(w, r, *rec) {
			w.Header().Set("Retry-After", retryAfter)
			http.Error(w, "NAR vanished", http.StatusServiceUnavailable)
		}
		return
	}
	defer dl.release()

	buf := make([]byte, copyBuf)
	var off int64
	started := false
	defer func() { s.m.servedBytes.WithLabelValues("upstream").Add(float64(off)) }()
	for {
		avail, done, err := dl.wait(r.Context(), off)
		if err != nil {
			if !started && r.Context().Err() == nil {
				w.Header().Set("Retry-After", retryAfter)
				http.Error(w, "NAR transfer failed", http.StatusBadGateway)
				return
			}
			// Headers and part of the body are out: cut the response so
			// the client sees an incomplete transfer, never a short NAR.
			panic(http.ErrAbortHandler)
		}
		if !started {
			if size >= 0 {
				w.Header().Set("Content-Length", fmt.Sprint(size))
			}
			w.WriteHeader(http.StatusOK)
			started = true
		}
		for off < avail {
			n, rerr := dl.rf.ReadAt(buf[:min(int64(len(buf)), avail-off)], off)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return // client went away
				}
				off += int64(n)
			}
			if rerr != nil && rerr != io.EOF {
				panic(http.ErrAbortHandler)
			}
		}
		if done {
			if size >= 0 && off != size {
				panic(http.ErrAbortHandler)
			}
			return
		}
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
}
