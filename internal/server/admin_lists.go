package server

import (
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/cache"
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
	if err := decodeJSON(w, r, &req); err != nil {
		s.refuse(w, r, cache.ActionAllowAdd, nil, "", err)
		return
	}
	hashes, err := s.pathHashes(req.Paths)
	if err != nil {
		s.refuse(w, r, cache.ActionAllowAdd, req.Paths, req.Reason, err)
		return
	}
	var expires time.Time
	if req.Expires != "" {
		d, err := config.ParseDuration(req.Expires)
		if err != nil || d <= 0 {
			s.refuse(w, r, cache.ActionAllowAdd, req.Paths, req.Reason,
				fmt.Errorf("expires %q: want a positive duration such as 30d or 12h", req.Expires))
			return
		}
		expires = time.Now().Add(d)
	}
	entries, replaced, err := s.gate.Allow(r.Context(), change(r, req.Reason), hashes, req.Closure, expires)
	if err != nil {
		writeGateError(w, "nothing added: ", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.AllowList{Entries: allowWire(entries), Replaced: allowWire(replaced)})
}

func (s *Server) handleAllowRemove(w http.ResponseWriter, r *http.Request) {
	hashes, reason, ok := s.pathsRequest(w, r, cache.ActionAllowRemove)
	if !ok {
		return
	}
	removed, missing, err := s.gate.RemoveAllow(change(r, reason), hashes)
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
	if err := decodeJSON(w, r, &req); err != nil {
		s.refuse(w, r, cache.ActionDenyAdd, nil, "", err)
		return
	}
	entries, err := s.gate.Deny(change(r, req.Reason), req.Patterns)
	if err != nil {
		writeGateError(w, "nothing denied: ", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.DenyList{Entries: denyWire(entries)})
}

func (s *Server) handleDenyRemove(w http.ResponseWriter, r *http.Request) {
	var req patternsRequest
	if err := decodeJSON(w, r, &req); err != nil {
		s.refuse(w, r, cache.ActionDenyRemove, nil, "", err)
		return
	}
	if len(req.Patterns) == 0 {
		s.refuse(w, r, cache.ActionDenyRemove, nil, req.Reason, errors.New("no patterns given"))
		return
	}
	removed, missing, err := s.gate.RemoveDeny(change(r, req.Reason), req.Patterns)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.Removed{Removed: removed, Missing: missing})
}
