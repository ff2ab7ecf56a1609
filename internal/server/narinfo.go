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
	decision    *policy.Decision // the decision, when one was made (nil for a stored record)
	unavailable error            // set when nothing was approved and an upstream failed transiently
	// until ends an approval that rests on evidence with an expiry (its own
	// allowlist entry, or with require_closure one of its references').
	until time.Time
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
	case out.unavailable != nil:
		// Some upstream might have approved it: a 404 now would be cached
		// by the client for an hour.
		if out.decision != nil {
			w.Header().Set("X-Cacheproxy-Decision", out.decision.String())
		}
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, oneLine("upstreams unavailable: "+out.unavailable.Error()), http.StatusServiceUnavailable)
	case out.decision != nil:
		d := out.decision
		w.Header().Set("X-Cacheproxy-Decision", d.String())
		http.Error(w, oneLine(fmt.Sprintf("%s: %s", d, d.Detail)), http.StatusNotFound)
	default:
		http.Error(w, "not found in any upstream", http.StatusNotFound)
	}
}

func decisionHeader(approved bool, reason string) string {
	return policy.Decision{Approved: approved, Reason: policy.Reason(reason)}.String()
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// storedRecord returns the stored record for hash if it may still be
// served: not expired, and approved unless in report mode.
func (s *Server) storedRecord(hash string) (*cache.Record, error) {
	changes := s.db.Changes()
	rec := s.hot.get(hash, changes)
	if rec == nil || rec.Expired(s.now()) { // an expired copy may have been re-decided since

		var err error
		if rec, err = s.db.Record(hash); err != nil || rec == nil {
			return nil, err
		}
		s.hot.put(hash, rec, changes)
	}
	if rec.Expired(s.now()) || (!rec.Approved && !s.policy.Report) {
		return nil, nil
	}
	return rec, nil
}

// resolve answers a narinfo request: the stored record when there is one,
// otherwise one upstream round (shared by concurrent requests for the same
// hash) that decides and stores the result.
func (s *Server) resolve(ctx context.Context, hash string) (outcome, error) {
	rec, err := s.storedRecord(hash)
	if err != nil {
		return outcome{}, err
	}
	if rec != nil {
		s.m.cacheHits.WithLabelValues("narinfo").Inc()
		if !rec.Approved {
			// Report mode counts every request for a rejected path, as
			// enforce mode does, though the answer comes from the store.
			s.m.decisions.WithLabelValues("rejected", rec.Reason).Inc()
		}
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
// visiting holds the paths whose closure walk is under way.
func (s *Server) decideAndStore(ctx context.Context, hash string, visiting map[string]bool) (outcome, error) {
	if rec, err := s.storedRecord(hash); err != nil || rec != nil {
		return outcome{rec: rec}, err // decided while we waited
	}
	// A decision rests on the evidence as it was when deciding began; if an
	// admin change lands meanwhile, the decision is answered but not stored.
	epoch, err := s.db.Epoch()
	if err != nil {
		return outcome{}, err
	}
	out, err := s.decide(ctx, hash, visiting, true)
	if err != nil || out.decision == nil {
		return out, err
	}
	d := out.decision
	s.m.decisions.WithLabelValues(decisionLabel(d.Approved), string(d.Reason)).Inc()
	if !s.policy.Served(*d) || out.unavailable != nil {
		s.logRejection(*d, hash)
		return out, nil
	}
	if !d.Approved {
		s.logRejection(*d, hash) // report mode: recorded, then served
	} else {
		s.log.Info("approved", "path", d.NarInfo.StorePath, "reason", d.Reason, "detail", d.Detail, "upstream", d.Upstream)
	}
	rec, err := s.approve(*d, out.until)
	if err != nil {
		return outcome{}, err
	}
	if _, err := s.db.PutRecord(hash, rec, epoch); err != nil {
		return outcome{}, err
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
// decision; failing that, the first rejection, marked unavailable when an
// upstream failed transiently (it might have approved); failing that, not
// found or unavailable. It stores nothing of the path itself; with store
// set, the closure walk stores what it decides about references.
func (s *Server) decide(ctx context.Context, hash string, visiting map[string]bool, store bool) (outcome, error) {
	var first *policy.Decision
	var unavailable error
	for _, u := range s.upstreams {
		raw, err := s.fetchNarInfo(ctx, u, hash)
		switch {
		case errors.Is(err, upstream.ErrNotFound):
			continue
		case err != nil:
			unavailable = errors.Join(unavailable, err)
			continue
		}
		ev, err := s.db.Evidence(hash)
		if err != nil {
			return outcome{}, err
		}
		d := s.policy.Decide(policy.Input{Hash: hash, Raw: raw, Upstream: u.name, UpstreamKeys: u.keys}, ev, s.now())
		var until time.Time
		if d.Reason == policy.Allowlisted && d.Allow != nil {
			until = d.Allow.Expires
		}
		if d.Approved && s.policy.RequireClosure {
			refs, refsUntil, err := s.referenceDecisions(ctx, hash, d, visiting, store)
			var ru *refUnavailableError
			if errors.As(err, &ru) {
				return outcome{unavailable: err}, nil // 503, not a 404 the client would cache
			}
			if err != nil {
				return outcome{}, err
			}
			d = s.policy.Closure(d, refs)
			until = earliest(until, refsUntil)
		}
		if d.Approved {
			return outcome{decision: &d, until: until}, nil
		}
		// The first rejection is the answer, unless a later upstream's
		// would be served (report mode) and the first's would not.
		if first == nil || (!s.policy.Served(*first) && s.policy.Served(d)) {
			first = &d
		}
	}
	return outcome{decision: first, unavailable: unavailable}, nil
}

// fetchNarInfo asks one upstream for a narinfo, timing and counting the
// request; errors are upstream.ErrNotFound or a transient failure.
func (s *Server) fetchNarInfo(ctx context.Context, u *upstreamCache, hash string) ([]byte, error) {
	start := time.Now()
	raw, err := u.client.Get(ctx, hash+".narinfo", maxNarInfoSize)
	s.m.upstreamDuration.WithLabelValues(u.name, "narinfo").Observe(time.Since(start).Seconds())
	result := "found"
	switch {
	case errors.Is(err, upstream.ErrNotFound):
		result = "not_found"
	case err != nil:
		result = "unavailable"
		s.log.Warn("upstream unavailable", "upstream", u.name, "hash", hash, "err", err)
	}
	s.m.upstreamRequests.WithLabelValues(u.name, "narinfo", result).Inc()
	return raw, err
}

// refUnavailableError: a reference could not be decided because its
// upstreams failed transiently.
type refUnavailableError struct {
	ref string
	err error
}

func (e *refUnavailableError) Error() string { return "reference " + e.ref + ": " + e.err.Error() }
func (e *refUnavailableError) Unwrap() error { return e.err }

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

// referenceDecisions decides every reference of an approved path (through
// the stored records where they exist) for require_closure, and returns
// the earliest expiry among their approvals.
func (s *Server) referenceDecisions(ctx context.Context, hash string, d policy.Decision, visiting map[string]bool, store bool) (map[string]policy.Decision, time.Time, error) {
	// visiting is the current walk only: a reference shared by two branches
	// (a diamond) must be decided, not skipped, on the second branch.
	visiting[hash] = true
	defer delete(visiting, hash)
	var until time.Time
	refs := map[string]policy.Decision{}
	for _, ref := range d.NarInfo.References {
		rh, _, err := narinfo.ParseBaseName(ref)
		if err != nil || rh == hash {
			continue // the path itself
		}
		rec, err := s.storedRecord(rh)
		if err != nil {
			return nil, until, err
		}
		if rec == nil && visiting[rh] {
			continue // a cycle: store paths have none but self-references
		}
		var out outcome
		switch {
		case rec != nil:
			out = outcome{rec: rec}
		case store:
			out, err = s.decideAndStore(ctx, rh, visiting)
		default:
			out, err = s.decide(ctx, rh, visiting, false)
		}
		if err != nil {
			return nil, until, err
		}
		switch {
		case out.rec != nil:
			refs[ref] = policy.Decision{Approved: out.rec.Approved, Reason: policy.Reason(out.rec.Reason)}
			until = earliest(until, out.rec.ValidUntil)
		case out.unavailable != nil:
			return nil, until, &refUnavailableError{ref: ref, err: out.unavailable}
		case out.decision != nil:
			refs[ref] = *out.decision
			until = earliest(until, out.until)
		}
	}
	return refs, until, nil
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
	}
	return ""
}

// approve turns a served decision into the record served from now on: the
// upstream narinfo with its URL pointing here and the gatekeeper's
// signature added. It is signed once, here, and served as stored.
func (s *Server) approve(d policy.Decision, until time.Time) (cache.Record, error) {
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
	rec.ValidUntil = until
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
