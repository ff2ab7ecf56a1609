package server

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

// maxNarInfoSize bounds what is read of an upstream narinfo; real ones are
// a few KiB even with thousands of references.
const maxNarInfoSize = 4 << 20

// retryAfter is what a client is told to wait when every upstream failed.
const retryAfter = "30"

// outcome is the answer for one store path hash.
type outcome struct {
	rec         *cache.Record    // the narinfo to serve, when the path is served
	decision    *policy.Decision // nil when served from the stored record
	notFound    bool
	unavailable error
}

func (s *Server) handleNarInfo(w http.ResponseWriter, r *http.Request) {
	hash := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/"), ".narinfo")
	if !narinfo.ValidHash(hash) {
		http.Error(w, "malformed store path hash", http.StatusBadRequest)
		return
	}
	out, err := s.resolve(r.Context(), hash)
	switch {
	case err != nil:
		s.log.Error("narinfo", "hash", hash, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
	case out.rec != nil:
		w.Header().Set("Content-Type", "text/x-nix-narinfo")
		w.Header().Set("X-Cacheproxy-Decision", decisionHeader(out.rec.Approved, out.rec.Reason))
		w.Header().Set("Content-Length", fmt.Sprint(len(out.rec.NarInfo)))
		w.Write(out.rec.NarInfo)
	case out.decision != nil:
		d := out.decision
		w.Header().Set("X-Cacheproxy-Decision", d.String())
		http.Error(w, oneLine(fmt.Sprintf("%s: %s", d, d.Detail)), http.StatusNotFound)
	case out.unavailable != nil:
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, oneLine("upstreams unavailable: "+out.unavailable.Error()), http.StatusServiceUnavailable)
	default:
		http.Error(w, "not found in any upstream", http.StatusNotFound)
	}
}

func decisionHeader(approved bool, reason string) string {
	return policy.Decision{Approved: approved, Reason: policy.Reason(reason)}.String()
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// resolve answers a narinfo request: the stored record when there is one,
// otherwise one upstream round (shared by concurrent requests for the same
// hash) that decides and stores the result.
func (s *Server) resolve(ctx context.Context, hash string) (outcome, error) {
	rec, err := s.db.Record(hash)
	if err != nil {
		return outcome{}, err
	}
	if rec != nil && !rec.Expired(s.now()) {
		s.m.cacheHits.WithLabelValues("narinfo").Inc()
		return outcome{rec: rec}, nil
	}
	s.m.cacheMisses.WithLabelValues("narinfo").Inc()
	// The shared round must not die with the first client that gave up.
	v, err, _ := s.narinfoFlight.Do(hash, func() (any, error) {
		return s.decideAndStore(context.WithoutCancel(ctx), hash, map[string]bool{})
	})
	if err != nil {
		return outcome{}, err
	}
	return v.(outcome), nil
}

// decideAndStore fetches, decides, and stores an approved (or, in report
// mode, served) record; rejections are logged, counted and recorded.
func (s *Server) decideAndStore(ctx context.Context, hash string, visiting map[string]bool) (outcome, error) {
	if rec, err := s.db.Record(hash); err != nil || (rec != nil && !rec.Expired(s.now())) {
		return outcome{rec: rec}, err // decided while we waited
	}
	out, err := s.decide(ctx, hash, visiting)
	if err != nil || out.decision == nil {
		return out, err
	}
	d := out.decision
	s.m.decisions.WithLabelValues(decisionLabel(d.Approved), string(d.Reason)).Inc()
	if !s.policy.Served(*d) {
		s.logRejection(*d, hash)
		return out, nil
	}
	if !d.Approved {
		s.logRejection(*d, hash) // report mode: recorded, then served
	} else {
		s.log.Info("approved", "path", d.NarInfo.StorePath, "reason", d.Reason, "detail", d.Detail, "upstream", d.Upstream)
	}
	rec, err := s.approve(*d)
	if err != nil {
		return outcome{}, err
	}
	if err := s.db.PutRecord(hash, rec); err != nil {
		return outcome{}, err
	}
	if d.Approved {
		s.db.ClearRejection(hash)
	}
	return outcome{rec: &rec, decision: d}, nil
}

func decisionLabel(approved bool) string {
	if approved {
		return "approved"
	}
	return "rejected"
}

// decide asks the upstreams in order and returns the first approved
// decision; failing that, the first rejection; failing that, not found or
// unavailable. It stores nothing. visiting guards the closure walk.
func (s *Server) decide(ctx context.Context, hash string, visiting map[string]bool) (outcome, error) {
	var first *policy.Decision
	var unavailable error
	for _, u := range s.upstreams {
		start := time.Now()
		raw, err := u.client.Get(ctx, hash+".narinfo", maxNarInfoSize)
		s.m.upstreamDuration.WithLabelValues(u.name, "narinfo").Observe(time.Since(start).Seconds())
		switch {
		case errors.Is(err, upstream.ErrNotFound):
			s.m.upstreamRequests.WithLabelValues(u.name, "narinfo", "not_found").Inc()
			continue
		case err != nil:
			s.m.upstreamRequests.WithLabelValues(u.name, "narinfo", "unavailable").Inc()
			s.log.Warn("upstream unavailable", "upstream", u.name, "hash", hash, "err", err)
			unavailable = errors.Join(unavailable, err)
			continue
		}
		s.m.upstreamRequests.WithLabelValues(u.name, "narinfo", "found").Inc()
		ev, err := s.db.Evidence(hash)
		if err != nil {
			return outcome{}, err
		}
		d := s.policy.Decide(policy.Input{Hash: hash, Raw: raw, Upstream: u.name, UpstreamKeys: u.keys}, ev, s.now())
		if d.Approved && s.policy.RequireClosure {
			refs, err := s.referenceDecisions(ctx, hash, d, visiting)
			if err != nil {
				return outcome{}, err
			}
			d = s.policy.Closure(d, refs)
		}
		if d.Approved {
			return outcome{decision: &d}, nil
		}
		if first == nil {
			first = &d
		}
	}
	if first != nil {
		return outcome{decision: first}, nil
	}
	if unavailable != nil {
		return outcome{unavailable: unavailable}, nil
	}
	return outcome{notFound: true}, nil
}

// referenceDecisions decides every reference of an approved path (through
// the stored records where they exist) for require_closure.
func (s *Server) referenceDecisions(ctx context.Context, hash string, d policy.Decision, visiting map[string]bool) (map[string]policy.Decision, error) {
	visiting[hash] = true
	refs := map[string]policy.Decision{}
	for _, ref := range d.NarInfo.References {
		rh, _, err := narinfo.ParseBaseName(ref)
		if err != nil || visiting[rh] {
			continue // the path itself; store paths have no other cycles
		}
		rec, err := s.db.Record(rh)
		if err != nil {
			return nil, err
		}
		if rec != nil && !rec.Expired(s.now()) {
			refs[ref] = policy.Decision{Approved: rec.Approved, Reason: policy.Reason(rec.Reason)}
			continue
		}
		out, err := s.decideAndStore(ctx, rh, visiting)
		if err != nil {
			return nil, err
		}
		switch {
		case out.rec != nil:
			refs[ref] = policy.Decision{Approved: out.rec.Approved, Reason: policy.Reason(out.rec.Reason)}
		case out.decision != nil:
			refs[ref] = *out.decision
		case out.unavailable != nil:
			return nil, fmt.Errorf("reference %s: %w", ref, out.unavailable)
		}
	}
	return refs, nil
}

// narExt is the file extension Nix uses for each compression.
func narExt(compression string) string {
	switch compression {
	case "xz":
		return ".xz"
	case "zstd":
		return ".zst"
	case "bzip2":
		return ".bz2"
	case "br":
		return ".br"
	case "gzip":
		return ".gz"
	}
	return ""
}

// approve turns a served decision into the record served from now on: the
// upstream narinfo with its URL pointing here and the gatekeeper's
// signature added. It is signed once, here, and served as stored.
func (s *Server) approve(d policy.Decision) (cache.Record, error) {
	ni := *d.NarInfo
	sp, err := narinfo.ParseStorePath(ni.StorePath, s.cfg.StoreDir)
	if err != nil {
		return cache.Record{}, err
	}
	_, digest, err := narinfo.ParseHash(ni.NarHash)
	if err != nil {
		return cache.Record{}, err
	}
	narFile := sp.Hash + "-" + narinfo.FormatHash("sha256", digest)[len("sha256:"):] + ".nar" + narExt(ni.Compression)
	flat, _ := policy.FlatSHA256(&ni)
	if d.Reason != policy.ContentAddressed {
		flat = nil
	}
	rec := cache.Record{
		StorePath: ni.StorePath, Reason: string(d.Reason), Approved: d.Approved,
		Upstream: d.Upstream, NarURL: ni.URL, NarFile: narFile,
		Compression: ni.Compression, FileHash: ni.FileHash, FileSize: ni.FileSize,
		NarHash: ni.NarHash, NarSize: ni.NarSize, FlatSHA256: flat, Decided: s.now(),
	}
	if d.Reason == policy.Allowlisted && d.Allow != nil {
		rec.ValidUntil = d.Allow.Expires
	}
	ni.URL = "nar/" + narFile
	ni.Sigs = append(append([]string(nil), ni.Sigs...), s.key.Sign(d.Fingerprint))
	rec.NarInfo = ni.Marshal()
	return rec, nil
}

// logRejection logs, and records for `cacheproxy rejections`, one refusal.
func (s *Server) logRejection(d policy.Decision, hash string) {
	storePath := path.Join(s.cfg.StoreDir, hash)
	deriver := ""
	if d.NarInfo != nil {
		storePath = d.NarInfo.StorePath
		if d.NarInfo.Deriver != "" {
			deriver = path.Join(s.cfg.StoreDir, d.NarInfo.Deriver)
		}
	}
	s.log.Warn("rejected", "path", storePath, "reason", d.Reason, "detail", d.Detail, "upstream", d.Upstream, "served", s.policy.Served(d))
	err := s.db.RecordRejection(cache.Rejection{StorePath: storePath, Reason: string(d.Reason), Detail: d.Detail,
		Deriver: deriver, Upstream: d.Upstream, Last: s.now()})
	if err != nil {
		s.log.Error("record rejection", "path", storePath, "err", err)
	}
}
