package gate

import (
	"context"
	"errors"
	"path"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
)

// maxNarInfoSize bounds what is read of an upstream narinfo; real ones are
// a few KiB even with thousands of references.
const maxNarInfoSize = 4 << 20

// outcome is the gate's answer for one store path hash before it becomes
// an HTTP answer.
type outcome struct {
	rec         *cache.Record    // the stored decision to serve, when the path is served
	decision    *policy.Decision // the decision, when one was made now
	unavailable error            // set when nothing was approved and an upstream failed transiently
	// until ends an approval that rests on evidence with an expiry (its own
	// allowlist entry, or with require_closure one of its references').
	until time.Time
	// remembered is set when the outcome came from the negative cache: it
	// was logged when it was decided.
	remembered bool
}

// stored returns the stored decision for hash if it may be served now: made
// under the current settings, not expired, and approved unless in report
// mode (which stores the rejections it serves).
func (g *Gate) stored(hash string) (*cache.Record, error) {
	if rec := g.hot.get(hash); rec != nil && g.servable(rec) {
		return rec, nil
	}
	// Not in memory, or the copy there is out of date: the store may hold a
	// newer decision.
	before := g.db.Changes()
	rec, err := g.db.Record(hash)
	if err != nil || rec == nil {
		return nil, err
	}
	g.hot.put(hash, rec, before, g.db.Changes)
	if !g.servable(rec) {
		return nil, nil
	}
	return rec, nil
}

// servable reports whether a stored decision may be served now.
func (g *Gate) servable(rec *cache.Record) bool {
	c := g.conf()
	return rec.Settings == c.settings && !rec.Expired(g.now()) && (rec.Approved || c.policy.Report)
}

// lookup is the answer for hash at this moment: the stored decision when
// there is one, otherwise one decision round (shared by every concurrent
// request for the hash, narinfo and NAR alike) that decides and stores.
// kind labels the cache metrics ("narinfo"), or "" not to count.
func (g *Gate) lookup(ctx context.Context, hash, kind string) (outcome, error) {
	rec, err := g.stored(hash)
	if err != nil {
		return outcome{}, err
	}
	if rec != nil {
		if kind != "" {
			g.m.CacheHits.WithLabelValues(kind).Inc()
		}
		if !rec.Approved {
			// Report mode counts every request for a rejected path, as
			// enforce mode does, though the answer comes from the store.
			g.m.Decisions.WithLabelValues("rejected", string(rec.Reason)).Inc()
		}
		return outcome{rec: rec}, nil
	}
	if out, ok := g.neg.get(hash, g.now()); ok {
		if d := out.decision; d != nil {
			g.m.Decisions.WithLabelValues("rejected", string(d.Reason)).Inc()
		}
		out.remembered = true
		return out, nil
	}
	if kind != "" {
		g.m.CacheMisses.WithLabelValues(kind).Inc()
	}
	// The shared round must not die with the first client that gave up.
	v, err, _ := g.flight.Do(hash, func() (any, error) {
		before := g.changes()
		out, err := g.decideAndStore(context.WithoutCancel(ctx), g.conf(), hash, map[string]bool{})
		if err == nil {
			g.neg.put(hash, out, g.now(), before, g.changes)
		}
		return out, err
	})
	if err != nil {
		return outcome{}, err
	}
	return v.(outcome), nil
}

// decideAndStore decides and stores what is served (approved, or in report
// mode also rejected by policy); rejections are logged, counted and
// recorded. visiting holds the paths whose closure walk is under way; c is
// the settings the whole round decides under.
func (g *Gate) decideAndStore(ctx context.Context, c *conf, hash string, visiting map[string]bool) (outcome, error) {
	if rec, err := g.stored(hash); err != nil || rec != nil {
		return outcome{rec: rec}, err // decided while we waited
	}
	// A decision rests on the evidence as it was when deciding began; if an
	// admin change lands meanwhile, the decision is answered but not stored.
	before := g.db.Changes()
	epoch, err := g.db.Epoch()
	if err != nil {
		return outcome{}, err
	}
	out, err := g.decide(ctx, c, hash, visiting, true)
	if err != nil || out.decision == nil {
		return out, err
	}
	d := out.decision
	g.m.Decisions.WithLabelValues(decisionLabel(d.Approved), string(d.Reason)).Inc()
	if d.Reason == policy.AttestationMismatch {
		g.m.AttestationMismatches.WithLabelValues(classLabel(d.Classification)).Inc()
	}
	if !c.policy.Served(*d) || out.unavailable != nil {
		g.logRejection(*d, hash)
		return out, nil
	}
	if !d.Approved {
		g.logRejection(*d, hash) // report mode: recorded, then served
	} else {
		g.log.Info("approved", decisionAttrs(*d, d.NarInfo.StorePath)...)
	}
	rec := g.record(c, *d, out.until)
	// An approval clears the path's rejection log entry: read it first, for
	// the time the path waited for its attestation.
	var waited *cache.Rejection
	if d.Approved && d.Reason == policy.Attested {
		if waited, err = g.db.Rejection(hash); err != nil {
			return outcome{}, err
		}
	}
	g.storeRecord(hash, rec, epoch, before, waited)
	return outcome{rec: &rec, decision: d}, nil
}

// storeRecord keeps a decision for the requests that follow. The answer
// does not wait for the disk: the decision is kept in memory at once
// (unless the evidence changed since deciding began) and written to the
// state file in the background, joined with other decisions into one
// commit. A crash before the commit loses only decisions, which are made
// again when next requested. Until its commit, any change of evidence
// drops it from memory (evidenceChanged), since the store's list of
// dropped decisions cannot name one it does not hold yet.
func (g *Gate) storeRecord(hash string, rec cache.Record, epoch int64, before uint64, waited *cache.Rejection) {
	g.unstored.add(hash)
	g.hot.put(hash, &rec, before, g.db.Changes)
	g.writes.Add(1)
	go func() {
		defer g.writes.Done()
		stored, err := g.db.PutRecordBatched(hash, rec, epoch)
		if err != nil {
			g.log.Error("store decision", "path", rec.StorePath, "err", err)
		}
		if err != nil || !stored {
			// Evidence changed since deciding began. The change drops the
			// copy in memory too (evidenceChanged), but its notice may
			// come after this: drop it here, before it stops counting
			// as unstored.
			g.hot.drop([]string{hash})
		}
		g.unstored.done(hash)
		if stored && waited != nil {
			g.m.TimeToAttestation.Observe(rec.Decided.Sub(waited.First).Seconds())
		}
	}()
}

// classLabel is the classification label of
// cacheproxy_attestation_mismatches_total.
func classLabel(c policy.Classification) string {
	if c == "" {
		return "unclassified"
	}
	return string(c)
}

func decisionLabel(approved bool) string {
	if approved {
		return "approved"
	}
	return "rejected"
}

// decide returns the first approved decision in upstream order; failing
// that, the first rejection, marked unavailable when an upstream failed
// transiently (it might have approved); failing that, not found or
// unavailable. It stores nothing of the path itself; with store set, the
// closure walk stores what it decides about references.
//
// Every upstream is asked at once (askAll), but the answers are taken in
// configured order, so the result is the one asking them one after the
// other would give: an answer is acted on as soon as every earlier
// upstream's answer is known. An approval from upstream i does not wait for
// upstreams after i; a slow upstream before i is waited for (its answer
// could be the one served), unless it is marked down, which answers at once.
// An upstream whose narinfo is stored with the path's decision (decided
// under other settings) answers from the store.
func (g *Gate) decide(ctx context.Context, c *conf, hash string, visiting map[string]bool, store bool) (outcome, error) {
	var first *policy.Decision
	var unavailable error
	var ev *policy.Evidence
	prior, err := g.priorNarInfo(c, hash)
	if err != nil {
		return outcome{}, err
	}
	answers := g.askAll(ctx, c, hash, prior)
	for i, u := range c.upstreams {
		a := <-answers[i]
		raw, err := a.raw, a.err
		switch {
		case errors.Is(err, upstream.ErrNotFound):
			continue
		case err != nil:
			unavailable = errors.Join(unavailable, err)
			continue
		}
		if ev == nil {
			e, _, err := g.db.Evidence(hash)
			if err != nil {
				return outcome{}, err
			}
			ev = &e
		}
		d := c.policy.Decide(policy.Input{Hash: hash, Raw: raw, Upstream: u.Name(), UpstreamKeys: u.Keys}, *ev, g.now())
		var until time.Time
		if d.Reason == policy.Allowlisted && d.Allow != nil {
			until = d.Allow.Expires
		}
		if d.Approved && c.policy.RequireClosure {
			refs, refsUntil, err := g.referenceDecisions(ctx, c, hash, d, visiting, store)
			var ru *refUnavailableError
			if errors.As(err, &ru) {
				return outcome{unavailable: err}, nil // 503, not a 404 the client would cache
			}
			if err != nil {
				return outcome{}, err
			}
			d = c.policy.Closure(d, refs)
			until = earliest(until, refsUntil)
		}
		if d.Approved {
			return outcome{decision: &d, until: until}, nil
		}
		// The first rejection is the answer, unless a later upstream's
		// would be served (report mode) and the first's would not.
		if first == nil || (!c.policy.Served(*first) && c.policy.Served(d)) {
			first = &d
		}
	}
	return outcome{decision: first, unavailable: unavailable}, nil
}

// narinfoAnswer is one upstream's answer for a narinfo.
type narinfoAnswer struct {
	raw []byte
	err error
}

// askAll sends the narinfo request to every upstream at once and returns
// one channel per upstream, in configured order, that delivers its answer.
// Each request goes through its upstream's client, so max_connections and
// down-marking apply as to any other request. A request whose answer is no
// longer needed (an earlier upstream approved) is left to finish rather
// than cancelled: cancelling would close its connection, and the next
// decision would pay a new connection (and TLS handshake) to that upstream;
// its answer still counts for the upstream's health.
func (g *Gate) askAll(ctx context.Context, c *conf, hash string, prior map[string][]byte) []chan narinfoAnswer {
	answers := make([]chan narinfoAnswer, len(c.upstreams))
	for i, u := range c.upstreams {
		answers[i] = make(chan narinfoAnswer, 1) // never blocks a request nobody waits for
		if raw := prior[u.Name()]; raw != nil {
			answers[i] <- narinfoAnswer{raw: raw}
			continue
		}
		if i == 0 {
			continue // asked below, once the others are on their way
		}
		go func() {
			raw, err := g.fetchNarInfo(ctx, u, hash)
			answers[i] <- narinfoAnswer{raw, err}
		}()
	}
	if len(c.upstreams) > 0 && len(answers[0]) == 0 {
		// The first upstream's answer is always needed first: ask it on
		// this goroutine (for a single upstream, the common case, there is
		// no goroutine at all).
		raw, err := g.fetchNarInfo(ctx, c.upstreams[0], hash)
		answers[0] <- narinfoAnswer{raw, err}
	}
	return answers
}

// fetchNarInfo asks one upstream for a narinfo, timing and counting the
// request; errors are upstream.ErrNotFound or a transient failure.
func (g *Gate) fetchNarInfo(ctx context.Context, u Upstream, hash string) ([]byte, error) {
	start := time.Now()
	raw, err := u.Client.Get(ctx, hash+".narinfo", maxNarInfoSize)
	g.m.UpstreamDuration.WithLabelValues(u.Name(), "narinfo").Observe(time.Since(start).Seconds())
	result := "found"
	switch {
	case errors.Is(err, upstream.ErrNotFound):
		result = "not_found"
	case err != nil:
		result = "unavailable"
		g.log.Warn("upstream unavailable", "upstream", u.Name(), "hash", hash, "err", err)
	}
	g.m.UpstreamRequests.WithLabelValues(u.Name(), "narinfo", result).Inc()
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
// the stored decisions where they exist) for require_closure, and returns
// the earliest expiry among their approvals.
func (g *Gate) referenceDecisions(ctx context.Context, c *conf, hash string, d policy.Decision, visiting map[string]bool, store bool) (map[string]policy.Decision, time.Time, error) {
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
		rec, err := g.stored(rh)
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
			out, err = g.decideAndStore(ctx, c, rh, visiting)
		default:
			out, err = g.decide(ctx, c, rh, visiting, false)
		}
		if err != nil {
			return nil, until, err
		}
		switch {
		case out.rec != nil:
			refs[ref] = policy.Decision{Approved: out.rec.Approved, Reason: out.rec.Reason}
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

// narFile is the name this proxy gives a path's NAR file: unique per
// path, NAR content and compression, so that a client holding an older
// narinfo never gets bytes its NarHash does not describe.
func narFile(hash string, ni *narinfo.NarInfo) string {
	return hash + "-" + ni.NarHash.Nix32() + ".nar" + ni.Compression.Ext()
}

// record turns a served decision into the stored record served from now
// on: the upstream narinfo with its URL pointing here and the gatekeeper's
// signature added. It is signed once, here, and served as stored.
func (g *Gate) record(c *conf, d policy.Decision, until time.Time) cache.Record {
	ni := *d.NarInfo
	hash := path.Base(ni.StorePath)[:narinfo.HashLen]
	rec := cache.Record{
		StorePath: ni.StorePath, Reason: d.Reason, Approved: d.Approved,
		Upstream: d.Upstream, NarURL: ni.URL, NarFile: narFile(hash, &ni), NAR: d.NAR(),
		Settings: c.settings, Decided: g.now(), ValidUntil: until,
	}
	if c.policy.RequireClosure {
		for _, ref := range ni.References {
			if rh, _, err := narinfo.ParseBaseName(ref); err == nil && rh != hash {
				rec.References = append(rec.References, rh)
			}
		}
	}
	ni.URL = "nar/" + rec.NarFile
	if g.recode && ni.Compression != narinfo.CompressionZstd {
		rec.Recode = true
		g.withRecoded(&rec, &ni)
	}
	// Unknown fields are covered by no signature and mean nothing to Nix,
	// which drops them when it re-serves a narinfo; so do we, rather than
	// store and serve whatever an upstream puts there.
	ni.Extra = nil
	ni.Sigs = append(append([]string(nil), ni.Sigs...), g.key.Sign(d.Fingerprint))
	rec.NarInfo = ni.Marshal()
	return rec
}

// logRejection logs, and records for `cacheproxy rejections`, one refusal.
func (g *Gate) logRejection(d policy.Decision, hash string) {
	g.logRefusal(d, hash)
	storePath, deriver := g.names(d, hash)
	err := g.db.RecordRejection(cache.Rejection{StorePath: storePath, Reason: string(d.Reason), Detail: d.Detail,
		Deriver: deriver, Upstream: d.Upstream, Last: g.now(), Missing: d.Missing, Classification: classification(d)})
	if err != nil {
		g.log.Error("record rejection", "path", storePath, "err", err)
	}
}

// classification is what a rejection records of the rebuilders' verdict:
// only an attestation_mismatch has one.
func classification(d policy.Decision) string {
	if d.Reason != policy.AttestationMismatch {
		return ""
	}
	return string(d.Classification)
}

// logRefusal writes the log line of one refusal.
func (g *Gate) logRefusal(d policy.Decision, hash string) {
	storePath, _ := g.names(d, hash)
	g.log.Warn("rejected", append(decisionAttrs(d, storePath), "served", g.conf().policy.Served(d))...)
}

// names are the store path and deriver a decision is about.
func (g *Gate) names(d policy.Decision, hash string) (storePath, deriver string) {
	storeDir := g.conf().policy.StoreDir
	storePath = path.Join(storeDir, hash)
	if d.NarInfo != nil {
		storePath = d.NarInfo.StorePath
		if d.NarInfo.Deriver != "" {
			deriver = path.Join(storeDir, d.NarInfo.Deriver)
		}
	}
	return storePath, deriver
}

// priorNarInfo returns, by upstream name, the upstream narinfo behind a
// stored decision made under other decision settings (before a reload or
// a restart with another policy), so that deciding again asks the policy,
// not the network. Only such a decision: one made under the current
// settings that is not servable (expired, or a rejection after report mode
// ended) is decided from a fresh upstream answer, as before.
func (g *Gate) priorNarInfo(c *conf, hash string) (map[string][]byte, error) {
	rec, err := g.db.Record(hash)
	if err != nil || rec == nil || rec.Settings == c.settings {
		return nil, err
	}
	ni, err := narinfo.Parse(rec.NarInfo, c.policy.StoreDir)
	if err != nil || len(ni.Sigs) == 0 || rec.NarURL == "" {
		return nil, nil // not what record() writes: ask the upstream
	}
	// record() changed exactly two things: the URL, and the gatekeeper's
	// signature appended last. Neither is covered by the upstream's
	// signature, which the policy checks again with the current keys.
	ni.URL = rec.NarURL
	ni.Sigs = ni.Sigs[:len(ni.Sigs)-1]
	return map[string][]byte{rec.Upstream: ni.Marshal()}, nil
}
