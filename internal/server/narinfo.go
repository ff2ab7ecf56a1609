package server

import (
	"fmt"
	"net/http"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/gate"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// handleNarInfo serves GET /<hash>.narinfo: the stored, signed narinfo of a
// path the gate serves, or the answer that refuses it.
func (s *Server) handleNarInfo(w http.ResponseWriter, r *http.Request) {
	hash := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/"), ".narinfo")
	if !narinfo.ValidHash(hash) {
		http.Error(w, "malformed store path hash", http.StatusBadRequest)
		return
	}
	a, err := s.proto.NarInfo(r.Context(), hash)
	if err != nil {
		s.internalError(w, "narinfo "+hash, err)
		return
	}
	if a.Status != gate.Serve {
		s.writeAnswer(w, a)
		return
	}
	w.Header().Set("Content-Type", "text/x-nix-narinfo")
	w.Header().Set("X-Cacheproxy-Decision", a.Decision)
	w.Header().Set("Content-Length", fmt.Sprint(len(a.Record.NarInfo)))
	w.Write(a.Record.NarInfo)
}
