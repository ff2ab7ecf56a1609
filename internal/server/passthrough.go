package server

import (
	"errors"
	"io"
	"net/http"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/gate"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

// handleListing relays <hash>.ls, the NAR listing, for served paths only.
func (s *Server) handleListing(w http.ResponseWriter, r *http.Request) {
	hash := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/"), ".ls")
	if !narinfo.ValidHash(hash) {
		http.Error(w, "malformed store path hash", http.StatusBadRequest)
		return
	}
	a, body, err := s.proto.Listing(r.Context(), hash)
	if err == nil && a.Status != gate.Serve {
		s.writeAnswer(w, a)
		return
	}
	s.relay(w, body, err, "application/json")
}

// handleLog relays a build log from the first upstream that has it.
func (s *Server) handleLog(w http.ResponseWriter, r *http.Request) {
	drv := strings.TrimPrefix(r.URL.Path, "/log/")
	if _, _, err := narinfo.ParseBaseName(drv); err != nil || !strings.HasSuffix(drv, ".drv") {
		http.Error(w, "malformed derivation name", http.StatusBadRequest)
		return
	}
	body, err := s.proto.BuildLog(r.Context(), drv)
	s.relay(w, body, err, "text/plain; charset=utf-8")
}

// relay streams an upstream file to the client; nothing is buffered.
func (s *Server) relay(w http.ResponseWriter, body io.ReadCloser, err error, contentType string) {
	switch {
	case errors.Is(err, upstream.ErrNotFound):
		http.Error(w, "not found upstream", http.StatusNotFound)
	case err != nil:
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, "upstream unavailable", http.StatusServiceUnavailable)
	default:
		defer body.Close()
		w.Header().Set("Content-Type", contentType)
		if _, err := io.Copy(w, body); err != nil {
			panic(http.ErrAbortHandler) // the client must not take a cut log for a whole one
		}
	}
}
