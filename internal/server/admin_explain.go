package server

import (
	"net/http"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/gate"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// handleExplain shows the decision made afresh from the current evidence,
// all the evidence, and what a narinfo request and a NAR request would get
// at this moment. It stores nothing and fetches no NAR.
func (s *Server) handleExplain(w http.ResponseWriter, r *http.Request) {
	hash, err := s.pathHash(r.PathValue("hash"))
	if err != nil {
		writeError(w, http.StatusBadRequest, "%v", err)
		return
	}
	ex, err := s.gate.Explain(r.Context(), hash)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	out := adminapi.Explain{Hash: hash, StorePath: ex.StorePath, Served: ex.NarInfo.Status == gate.Serve,
		NarInfo: answerWire(ex.NarInfo, ""), NAR: answerWire(ex.NAR, ex.NarFile), Rejection: rejectionWire(ex.Rejection)}
	out.NAR.Cached = ex.NarCached && ex.NAR.Status == gate.Serve
	switch d := ex.Decision; {
	case d != nil:
		out.Decision = decisionWire(d)
		out.Status = "rejected"
		if d.Approved {
			out.Status = "approved"
		}
		if ex.Unavailable != nil {
			out.Error = "another upstream is unavailable: " + ex.Unavailable.Error()
		}
	case ex.Unavailable != nil:
		out.Status, out.Error = "unavailable", ex.Unavailable.Error()
	default:
		out.Status = "not_found"
	}
	if rec := ex.Stored; rec != nil {
		out.Stored = &adminapi.Stored{Reason: string(rec.Reason), Approved: rec.Approved, Upstream: rec.Upstream,
			NarHash: rec.NAR.NarHash.String(), NarFile: rec.NarFile, Decided: rec.Decided, Cached: ex.NarCached}
	}
	writeJSON(w, http.StatusOK, out)
}

func answerWire(a gate.Answer, file string) adminapi.Answer {
	switch a.Status {
	case gate.Serve:
		return adminapi.Answer{Status: http.StatusOK, Decision: a.Decision, File: file}
	case gate.Unavailable:
		return adminapi.Answer{Status: http.StatusServiceUnavailable, Decision: a.Decision, Note: a.Detail}
	}
	return adminapi.Answer{Status: http.StatusNotFound, Decision: a.Decision, Note: a.Detail}
}

func decisionWire(d *policy.Decision) *adminapi.Decision {
	out := &adminapi.Decision{Approved: d.Approved, Reason: string(d.Reason), Detail: d.Detail, Fingerprint: d.Fingerprint,
		Upstream: d.Upstream, UpstreamSigners: d.UpstreamSigners, Attesters: d.Attesters, Mismatched: d.Mismatched}
	if d.Allow != nil {
		out.Allow = &allowWire([]policy.AllowEntry{*d.Allow})[0]
	}
	if d.Deny != nil {
		out.Deny = &denyWire([]policy.DenyEntry{*d.Deny})[0]
	}
	if q := d.Quarantine; q != nil {
		out.Quarantine = &adminapi.Quarantine{Check: q.Check, Detail: q.Detail, Upstream: q.Upstream, Time: q.Time}
	}
	return out
}

func rejectionWire(r *cache.Rejection) *adminapi.Rejection {
	if r == nil {
		return nil
	}
	return &adminapi.Rejection{StorePath: r.StorePath, Reason: r.Reason, Detail: r.Detail, Deriver: r.Deriver,
		Upstream: r.Upstream, Count: r.Count, First: r.First, Last: r.Last}
}

func (s *Server) handleRejections(w http.ResponseWriter, r *http.Request) {
	rejs, err := s.gate.Rejections()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	out := adminapi.Rejections{Rejections: make([]adminapi.Rejection, len(rejs))}
	for i := range rejs {
		out.Rejections[i] = *rejectionWire(&rejs[i])
	}
	writeJSON(w, http.StatusOK, out)
}

// handleRetry lifts nar_mismatch quarantines: the next request fetches and
// verifies the NAR again.
func (s *Server) handleRetry(w http.ResponseWriter, r *http.Request) {
	hashes, ok := s.pathsRequest(w, r)
	if !ok {
		return
	}
	lifted, notQ, err := s.gate.Retry(hashes)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.Retry{Lifted: lifted, NotQuarantined: notQ})
}

func (s *Server) handleVerifyCache(w http.ResponseWriter, r *http.Request) {
	n, failed, err := s.gate.VerifyCache()
	if err != nil {
		writeError(w, http.StatusInternalServerError, "verify cache: %v", err)
		return
	}
	writeJSON(w, http.StatusOK, adminapi.NewVerifyCache(n, failed))
}
