package server

import (
	"errors"
	"net/http"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

// maxPassthrough bounds listings and build logs relayed from upstreams.
const maxPassthrough = 64 << 20

// handleListing relays <hash>.ls, the NAR listing, for served paths only.
func (s *Server) handleListing(w http.ResponseWriter, r *http.Request) {
	hash := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/"), ".ls")
	if !narinfo.ValidHash(hash) {
		http.Error(w, "malformed store path hash", http.StatusBadRequest)
		return
	}
	rec, err := s.storedRecord(hash)
	if err != nil || rec == nil {
		http.Error(w, "no approved narinfo for this path", http.StatusNotFound)
		return
	}
	u := s.upstreamNamed(rec.Upstream)
	if u == nil {
		http.NotFound(w, r)
		return
	}
	body, err := u.client.Get(r.Context(), hash+".ls", maxPassthrough)
	s.relay(w, body, err, "application/json")
}

// handleLog relays a build log from the first upstream that has it. Logs
// are not substitutes: nothing of them reaches a store.
func (s *Server) handleLog(w http.ResponseWriter, r *http.Request) {
	drv := strings.TrimPrefix(r.URL.Path, "/log/")
	if _, _, err := narinfo.ParseBaseName(drv); err != nil || !strings.HasSuffix(drv, ".drv") {
		http.Error(w, "malformed derivation name", http.StatusBadRequest)
		return
	}
	var lastErr error
	for _, u := range s.upstreams {
		body, err := u.client.Get(r.Context(), "log/"+drv, maxPassthrough)
		if err == nil {
			s.relay(w, body, nil, "text/plain; charset=utf-8")
			return
		}
		if !errors.Is(err, upstream.ErrNotFound) {
			lastErr = err
		}
	}
	if lastErr == nil {
		lastErr = upstream.ErrNotFound
	}
	s.relay(w, nil, lastErr, "")
}

func (s *Server) relay(w http.ResponseWriter, body []byte, err error, contentType string) {
	switch {
	case errors.Is(err, upstream.ErrNotFound):
		http.Error(w, "not found upstream", http.StatusNotFound)
	case err != nil:
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, "upstream unavailable", http.StatusServiceUnavailable)
	default:
		w.Header().Set("Content-Type", contentType)
		w.Write(body)
	}
}
