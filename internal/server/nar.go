package server

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/gate"
)

// copyBuf is the size of each write of a streamed NAR.
const copyBuf = 64 << 10

// handleNar serves GET and HEAD /nar/<file> for paths the gate serves now:
// from the verified blob (sendfile, Range) or from the one download in
// progress, verified as it streams.
func (s *Server) handleNar(w http.ResponseWriter, r *http.Request) {
	file := strings.TrimPrefix(r.URL.Path, "/nar/")
	if _, ok := gate.NarFileHash(file); !ok {
		http.Error(w, "malformed NAR file name", http.StatusBadRequest)
		return
	}
	a, err := s.proto.NAR(r.Context(), file)
	if err != nil {
		s.internalError(w, "nar "+file, err)
		return
	}
	if a.Status != gate.Serve {
		s.writeAnswer(w, a)
		return
	}
	body, err := s.proto.OpenNAR(r.Context(), a.Record, r.Method == http.MethodGet)
	switch {
	case errors.Is(err, gate.ErrQuarantined):
		w.Header().Set("X-Cacheproxy-Decision", "rejected; reason=nar_mismatch")
		http.Error(w, "the NAR failed verification", http.StatusNotFound)
		return
	case errors.Is(err, gate.ErrDiskFull):
		s.log.Error("NAR not fetched: disk full", "path", a.Record.StorePath, "err", err)
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, "cannot fetch NAR now: "+err.Error(), http.StatusServiceUnavailable)
		return
	case err != nil:
		s.log.Warn("start NAR download", "path", a.Record.StorePath, "err", err)
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, "cannot fetch NAR now: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	defer body.Close()
	w.Header().Set("Content-Type", "application/x-nix-nar")
	w.Header().Set("X-Cacheproxy-Decision", a.Decision)
	switch {
	case body.Blob != nil:
		if s.Limits.Write > 0 && s.Limits.MinRate > 0 && body.Size > 0 {
			extendWrite(w, s.Limits.Write+time.Duration(body.Size/s.Limits.MinRate)*time.Second)
		}
		cw := &countingWriter{ResponseWriter: w}
		http.ServeContent(cw, r, "", time.Time{}, body.Blob)
		s.m.ServedBytes.WithLabelValues("cache").Add(float64(cw.n))
	case body.Stream != nil:
		s.stream(w, r, body)
	default: // HEAD of a NAR not cached yet
		if body.Size >= 0 {
			w.Header().Set("Content-Length", fmt.Sprint(body.Size))
		}
	}
}

// stream copies a download in progress to the client. The reader hands out
// only verified-safe bytes; if the download fails after the headers went
// out, the response is cut so that the client sees an incomplete transfer,
// never a short NAR.
func (s *Server) stream(w http.ResponseWriter, r *http.Request, body gate.Body) {
	buf := make([]byte, copyBuf)
	started := false
	defer func() { s.m.ServedBytes.WithLabelValues("upstream").Add(float64(body.Stream.Offset())) }()
	for {
		n, err := body.Stream.Read(buf)
		if err != nil && err != io.EOF {
			if !started && r.Context().Err() == nil {
				w.Header().Set("Retry-After", retryAfter)
				http.Error(w, "NAR transfer failed", http.StatusBadGateway)
				return
			}
			panic(http.ErrAbortHandler)
		}
		if !started {
			if body.Size >= 0 {
				w.Header().Set("Content-Length", fmt.Sprint(body.Size))
			}
			w.WriteHeader(http.StatusOK)
			started = true
		}
		if n > 0 {
			if s.Limits.Write > 0 {
				extendWrite(w, s.Limits.Write) // a stalled reader loses its connection, a slow one does not
			}
			if _, werr := w.Write(buf[:n]); werr != nil {
				return // client went away
			}
		}
		if err == io.EOF {
			if body.Size >= 0 && body.Stream.Offset() != body.Size {
				panic(http.ErrAbortHandler)
			}
			return
		}
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
	}
}

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
