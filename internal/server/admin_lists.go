package server

import (
	"net/http"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

func allowWire(es []policy.AllowEntry) []adminapi.AllowEntry {
	out := make([]adminapi.AllowEntry, len(es))
	for i, e := range es {
		out[i] = adminapi.AllowEntry{StorePath: e.StorePath, NarHash: e.NarHash.String(), Fingerprint: e.Fingerprint,
			Reason: e.Reason, Added: e.Added, Expires: e.Expires}
	}
	return out
}

func denyWire(es []policy.DenyEntry) []adminapi.DenyEntry {
	out := make([]adminapi.DenyEntry, len(es))
	for i, e := range es {
		out[i] = adminapi.DenyEntry{Pattern: e.Pattern, Reason: e.Reason, Added: e.Added}
	}
	return out
}

func (s *Server) handleAllowList(w http.ResponseWriter, r *http.Request) {
	entries, err := s.gate.AllowList()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.AllowList{Entries: allowWire(entries)})
}

// handleAllowAdd pins each path (and with closure, everything it
// references) to the NarHash its upstream serves now; a path that cannot be
// resolved fails the whole request.
func (s *Server) handleAllowAdd(w http.ResponseWriter, r *http.Request) {
	var req allowRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	hashes, err := s.pathHashes(req.Paths)
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	var expires time.Time
	if req.Expires != "" {
		d, err := config.ParseDuration(req.Expires)
		if err != nil || d <= 0 {
			writeError(w, http.StatusBadRequest, "expires %q: want a positive duration such as 30d or 12h", req.Expires)
			return
		}
		expires = time.Now().Add(d)
	}
	entries, err := s.gate.Allow(r.Context(), hashes, req.Closure, req.Reason, expires)
	if err != nil {
		writeGateError(w, "nothing added: ", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.AllowList{Entries: allowWire(entries)})
}

func (s *Server) handleAllowRemove(w http.ResponseWriter, r *http.Request) {
	hashes, ok := s.pathsRequest(w, r)
	if !ok {
		return
	}
	removed, missing, err := s.gate.RemoveAllow(hashes)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.Removed{Removed: removed, Missing: missing})
}

func (s *Server) handleDenyList(w http.ResponseWriter, r *http.Request) {
	entries, err := s.gate.DenyList()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.DenyList{Entries: denyWire(entries)})
}

func (s *Server) handleDenyAdd(w http.ResponseWriter, r *http.Request) {
	var req denyRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	if len(req.Patterns) == 0 {
		writeError(w, http.StatusBadRequest, "no patterns given")
		return
	}
	now := time.Now()
	entries := make([]policy.DenyEntry, 0, len(req.Patterns))
	for _, p := range req.Patterns {
		entries = append(entries, policy.DenyEntry{Pattern: p, Reason: req.Reason, Added: now})
	}
	if err := s.gate.Deny(entries); err != nil {
		writeGateError(w, "nothing denied: ", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.DenyList{Entries: denyWire(entries)})
}

func (s *Server) handleDenyRemove(w http.ResponseWriter, r *http.Request) {
	var req patternsRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	if len(req.Patterns) == 0 {
		writeError(w, http.StatusBadRequest, "no patterns given")
		return
	}
	removed, missing, err := s.gate.RemoveDeny(req.Patterns)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.Removed{Removed: removed, Missing: missing})
}
