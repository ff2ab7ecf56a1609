package server

import (
	"errors"
	"net/http"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

func isNotFound(err error) bool { return errors.Is(err, upstream.ErrNotFound) }

// handleExplain decides the path afresh (storing nothing for it) and shows
// the evidence, next to the decision currently served and the last
// rejection.
func (s *Server) handleExplain(w http.ResponseWriter, r *http.Request) {
	hash, err := s.pathHash(r.PathValue("hash"))
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	ex := adminapi.Explain{Hash: hash}
	if rec, err := s.db.Record(hash); err == nil && rec != nil {
		meta, err := s.blobs.Meta(rec.NarFile)
		ex.Stored = &adminapi.StoredRecord{Reason: rec.Reason, Approved: rec.Approved, Upstream: rec.Upstream,
			NarHash: rec.NarHash, Decided: rec.Decided, Cached: err == nil && meta != nil}
		ex.StorePath = rec.StorePath
	}
	ex.Rejection, _ = s.db.Rejection(hash)
	out, err := s.decide(r.Context(), hash, map[string]bool{}, false)
	switch {
	case err != nil:
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	case out.decision != nil:
		d := out.decision
		ex.Decision = d
		ex.Served = s.policy.Served(*d) && out.unavailable == nil
		ex.Status = decisionLabel(d.Approved)
		if d.NarInfo != nil {
			ex.StorePath = d.NarInfo.StorePath
		}
		if out.unavailable != nil {
			ex.Error = "another upstream is unavailable: " + out.unavailable.Error()
		}
	case out.unavailable != nil:
		ex.Status, ex.Error = "unavailable", out.unavailable.Error()
	default:
		ex.Status = "not_found"
	}
	writeJSON(w, http.StatusOK, ex)
}

func (s *Server) handleRejections(w http.ResponseWriter, r *http.Request) {
	rejs, err := s.db.Rejections()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.Rejections{Rejections: rejs})
}

// handleRetry lifts nar_mismatch quarantines: the next request fetches and
// verifies the NAR again.
func (s *Server) handleRetry(w http.ResponseWriter, r *http.Request) {
	var req adminapi.PathsRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	hashes, err := s.pathHashes(req.Paths)
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	notQ, err := s.db.Retry(hashes)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	lifted := minus(hashes, notQ)
	for _, h := range lifted {
		s.db.ClearRejection(h)
		s.log.Info("quarantine lifted", "hash", h)
	}
	writeJSON(w, http.StatusOK, adminapi.Retry{Lifted: lifted, NotQuarantined: notQ})
}

func (s *Server) handleVerifyCache(w http.ResponseWriter, r *http.Request) {
	n, failed, err := s.blobs.VerifyAll()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "verify cache: %v", err)
		return
	}
	for _, f := range failed {
		s.log.Error("cached blob failed verification; dropped", "blob", f.Blob, "path", f.StorePath, "err", f.Error)
	}
	s.m.cacheSize.Set(float64(s.blobs.Size()))
	writeJSON(w, http.StatusOK, adminapi.VerifyCache{Checked: n, Dropped: failed})
}
