package server

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

func (s *Server) handleAllowList(w http.ResponseWriter, r *http.Request) {
	entries, err := s.db.AllowList()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.AllowList{Entries: entries})
}

// handleAllowAdd pins each path (and with closure, everything it references)
// to the NarHash its upstream serves now. Every path is resolved before
// anything is written: one that cannot be resolved fails the whole request.
func (s *Server) handleAllowAdd(w http.ResponseWriter, r *http.Request) {
	var req adminapi.AllowRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	hashes, err := s.pathHashes(req.Paths)
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	now := s.now()
	var expires time.Time
	if req.Expires != "" {
		d, err := config.ParseDuration(req.Expires)
		if err != nil || d <= 0 {
			writeError(w, http.StatusBadRequest, "expires %q: want a positive duration such as 30d or 12h", req.Expires)
			return
		}
		expires = now.Add(d)
	}
	var entries []cache.AllowEntry
	seen := map[string]bool{}
	for len(hashes) > 0 {
		h := hashes[0]
		hashes = hashes[1:]
		if seen[h] {
			continue
		}
		seen[h] = true
		ni, code, err := s.upstreamNarInfo(r.Context(), h)
		if err != nil {
			writeError(w, code, "nothing added: %v", err)
			return
		}
		entries = append(entries, cache.AllowEntry{StorePath: ni.StorePath, NarHash: ni.NarHash, Reason: req.Reason, Added: now, Expires: expires})
		if req.Closure {
			for _, ref := range ni.References {
				if rh, _, err := narinfo.ParseBaseName(ref); err == nil {
					hashes = append(hashes, rh)
				}
			}
		}
	}
	if err := s.db.PutAllow(entries); err != nil {
		writeError(w, http.StatusInternalServerError, "store allowlist: %v", err)
		return
	}
	s.refreshGauges()
	for _, e := range entries {
		s.log.Info("allowlisted", "path", e.StorePath, "nar_hash", e.NarHash, "reason", e.Reason, "expires", e.Expires)
	}
	writeJSON(w, http.StatusOK, adminapi.AllowList{Entries: entries})
}

// upstreamNarInfo returns the first upstream narinfo for hash that passes
// rules 1–2 (well-formed, signed by its upstream), with the HTTP status to
// answer when there is none.
func (s *Server) upstreamNarInfo(ctx context.Context, hash string) (*narinfo.NarInfo, int, error) {
	var lastErr error
	unavailable := false
	for _, u := range s.upstreams {
		raw, err := s.fetchNarInfo(ctx, u, hash)
		if err != nil {
			if !isNotFound(err) {
				unavailable = true
				lastErr = err
			}
			continue
		}
		d := s.policy.Decide(policy.Input{Hash: hash, Raw: raw, Upstream: u.name, UpstreamKeys: u.keys}, cache.Evidence{}, s.now())
		if d.Reason == policy.UpstreamMalformed || d.Reason == policy.UpstreamUnsigned {
			lastErr = fmt.Errorf("%s: %s: %s", u.name, d.Reason, d.Detail)
			continue
		}
		return d.NarInfo, 0, nil
	}
	switch {
	case lastErr == nil:
		return nil, http.StatusNotFound, fmt.Errorf("%s not found in any upstream", hash)
	case unavailable:
		return nil, http.StatusServiceUnavailable, fmt.Errorf("%s: %w", hash, lastErr)
	}
	return nil, http.StatusBadRequest, fmt.Errorf("%s: %w", hash, lastErr)
}

func (s *Server) handleAllowRemove(w http.ResponseWriter, r *http.Request) {
	var req adminapi.PathsRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	hashes, err := s.pathHashes(req.Paths)
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	missing, err := s.db.RemoveAllow(hashes)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	s.refreshGauges()
	writeJSON(w, http.StatusOK, adminapi.Removed{Removed: minus(hashes, missing), Missing: missing})
}

func (s *Server) handleDenyList(w http.ResponseWriter, r *http.Request) {
	entries, err := s.db.DenyList()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.DenyList{Entries: entries})
}

func (s *Server) handleDenyAdd(w http.ResponseWriter, r *http.Request) {
	var req adminapi.DenyRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	if len(req.Patterns) == 0 {
		writeError(w, http.StatusBadRequest, "no patterns given")
		return
	}
	now := s.now()
	entries := make([]cache.DenyEntry, 0, len(req.Patterns))
	for _, p := range req.Patterns {
		if policy.DenyKind(p, s.cfg.StoreDir) == "" {
			writeError(w, http.StatusBadRequest, "nothing denied: %q is not a store path, hash, NarHash, name or name glob", p)
			return
		}
		entries = append(entries, cache.DenyEntry{Pattern: p, Reason: req.Reason, Added: now})
	}
	if err := s.db.PutDeny(entries); err != nil {
		writeError(w, http.StatusInternalServerError, "store denylist: %v", err)
		return
	}
	for _, e := range entries {
		s.log.Info("denied", "pattern", e.Pattern, "reason", e.Reason)
	}
	writeJSON(w, http.StatusOK, adminapi.DenyList{Entries: entries})
}

func (s *Server) handleDenyRemove(w http.ResponseWriter, r *http.Request) {
	var req adminapi.PatternsRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	if len(req.Patterns) == 0 {
		writeError(w, http.StatusBadRequest, "no patterns given")
		return
	}
	missing, err := s.db.RemoveDeny(req.Patterns)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.Removed{Removed: minus(req.Patterns, missing), Missing: missing})
}

func minus(all, drop []string) []string {
	skip := map[string]bool{}
	for _, d := range drop {
		skip[d] = true
	}
	out := []string{}
	for _, a := range all {
		if !skip[a] {
			out = append(out, a)
		}
	}
	return out
}
