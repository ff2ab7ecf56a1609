package server

import (
	"net/http"
	"time"

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
		Upstream: d.Upstream, UpstreamSigners: d.UpstreamSigners, Attesters: d.Attesters, Mismatched: d.Mismatched,
		Classification: string(d.Classification)}
	for _, r := range d.Rebuilds {
		out.Rebuilds = append(out.Rebuilds, adminapi.Rebuild{Key: r.Key, Matches: r.Matches, NarHash: r.NarHash.String(),
			Imported: r.Imported, Classification: string(r.Classification)})
	}
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
		Upstream: r.Upstream, Count: r.Count, First: r.First, Last: r.Last, Classification: r.Classification}
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
	hashes, reason, ok := s.pathsRequest(w, r, cache.ActionRetry)
	if !ok {
		return
	}
	lifted, notQ, err := s.gate.Retry(change(r, reason), hashes)
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

// handleAudit returns the audit trail, oldest first; ?since=RFC3339 leaves
// out older records.
func (s *Server) handleAudit(w http.ResponseWriter, r *http.Request) {
	var since time.Time
	if v := r.URL.Query().Get("since"); v != "" {
		var err error
		if since, err = time.Parse(time.RFC3339, v); err != nil {
			writeError(w, http.StatusBadRequest, "since %q: want an RFC 3339 time such as 2025-06-01T12:00:00Z", v)
			return
		}
	}
	recs, err := s.gate.Audit(since)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "%v", err)
		return
	}
	out := adminapi.Audit{Records: make([]adminapi.AuditRecord, len(recs))}
	for i, rec := range recs {
		out.Records[i] = adminapi.AuditRecord{Time: rec.Time, Who: rec.Who, Action: rec.Action, Reason: rec.Reason,
			What: rec.What, WhatMore: rec.WhatMore, Outcome: rec.Outcome, Error: rec.Error, Counts: rec.Counts}
		if len(rec.PreviousAllow) > 0 {
			out.Records[i].PreviousAllow = allowWire(rec.PreviousAllow)
		}
		if len(rec.PreviousDeny) > 0 {
			out.Records[i].PreviousDeny = denyWire(rec.PreviousDeny)
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// handleRebuildQueue lists what a rebuild could approve; ?attester=NAME
// leaves out what that attester key attested already.
func (s *Server) handleRebuildQueue(w http.ResponseWriter, r *http.Request) {
	q, err := s.gate.RebuildQueue(r.URL.Query().Get("attester"))
	if err != nil {
		writeGateError(w, "", err)
		return
	}
	out := adminapi.RebuildQueue{Paths: make([]adminapi.QueueEntry, len(q))}
	for i, e := range q {
		out.Paths[i] = adminapi.QueueEntry{StorePath: e.StorePath, Deriver: e.Deriver, Reason: e.Reason,
			Requests: e.Requests, First: e.First, Last: e.Last}
	}
	writeJSON(w, http.StatusOK, out)
}
