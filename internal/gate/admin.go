package gate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/attest"
	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/upstream"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Kinds of admin errors, for the HTTP status: wrap them with %w.
var (
	ErrInvalid     = errors.New("invalid request")
	ErrNotFound    = errors.New("not found")
	ErrUnavailable = errors.New("upstream unavailable")
)

// Every admin change below writes its evidence, drops the stored decisions
// it affects and appends its audit record in one transaction, and nothing
// else: a fleet machine holding a narinfo for any other path keeps getting
// its NAR, and no change is stored without its record. A refused change
// is recorded too, alone.

// AttestOutcome is what import did with one path's signature by one key.
type AttestOutcome int

// Attestation import outcomes.
const (
	AttestStored       AttestOutcome = iota // verified and stored
	AttestKnown                             // verified, already stored
	AttestNoAttester                        // no signature by a configured attester key
	AttestBadSignature                      // an attester key's signature that does not verify
)

// AttestResult is what import did for one path and attester key (for
// AttestNoAttester, Key lists the names of the keys that did sign).
type AttestResult struct {
	Path, Key string
	Outcome   AttestOutcome
}

// Attest stores the signatures in claims made by configured attester keys
// that verify over the claim's own fingerprint. Whether that fingerprint
// matches what an upstream serves is decided per request by the policy.
func (g *Gate) Attest(by Change, claims []attest.Claim) ([]AttestResult, error) {
	var results []AttestResult
	i := 0
	err := g.AttestStream(by, func() (attest.Claim, error) {
		if i == len(claims) {
			return attest.Claim{}, io.EOF
		}
		i++
		return claims[i-1], nil
	}, func(r AttestResult) { results = append(results, r) })
	if err != nil {
		return nil, err
	}
	return results, nil
}

// AttestBatch is how many claims an import verifies as one unit of work
// and records as one change (stored alone or with other batches in one
// transaction: attestCombine).
const AttestBatch = 1000

// attestJob is one batch of an import on its way through the pipeline.
type attestJob struct {
	seq      int
	claims   []attest.Claim
	results  []AttestResult
	toStore  []policy.Attestation
	storeIdx []int // results[storeIdx[i]] is the outcome of toStore[i]
	err      error
	// For the audit trail: the batch's paths and how many signatures
	// failed or came from no configured attester.
	paths           []string
	bad, noAttester int
}

// AttestStream imports the claims next returns until io.EOF, with what
// Attest does to each, and calls report with each outcome, in input order.
// An import of any size holds a few batches in memory: next is read while
// earlier batches are verified (on every core) and stored (each batch of
// AttestBatch claims one change in the audit trail; batches waiting to be
// stored share a transaction, see storeJobs). An error
// from next ends the import: the batches read in full before it are
// stored, the claims of the batch it interrupted are not. Callers that must
// import all or nothing check the input first (the admin API does).
func (g *Gate) AttestStream(by Change, next func() (attest.Claim, error), report func(AttestResult)) error {
	cf := g.conf() // one set of attesters for the whole import
	// Each attester key is expanded once: its point decoded and a table of
	// its multiples made, work that crypto/ed25519 repeats per signature.
	attesters := make([]verify.ExpandedKey, len(cf.policy.Attesters))
	for i, k := range cf.policy.Attesters {
		attesters[i] = k.Expand()
	}
	workers := runtime.GOMAXPROCS(0)
	jobs := make(chan *attestJob, workers)
	verified := make(chan *attestJob, workers)
	inFlight := make(chan struct{}, 2*workers+2) // bounds the batches held at once
	quit := make(chan struct{})                  // closed when storing failed: stop reading
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				g.verifyClaims(cf.policy.StoreDir, attesters, j)
				verified <- j
			}
		}()
	}
	go func() { wg.Wait(); close(verified) }()
	stored := make(chan error, 1)
	go func() {
		// Workers finish batches out of order; they are stored in order.
		pending := map[int]*attestJob{}
		nextSeq := 0
		var err error
		for j := range verified {
			pending[j.seq] = j
			// Take the batches already verified too: when storing falls
			// behind, those waiting are stored together (storeJobs).
			for more := true; more; {
				select {
				case j, ok := <-verified:
					if ok {
						pending[j.seq] = j
					}
					more = ok
				default:
					more = false
				}
			}
			var ready []*attestJob
			for j := pending[nextSeq]; j != nil; j = pending[nextSeq] {
				delete(pending, nextSeq)
				nextSeq++
				ready = append(ready, j)
			}
			if err == nil {
				if err = g.storeJobs(by, ready, report); err != nil {
					close(quit)
				}
			}
			for range ready {
				<-inFlight
			}
		}
		stored <- err
	}()

	var readErr error
	job := &attestJob{}
	send := func() bool {
		select {
		case inFlight <- struct{}{}:
		case <-quit:
			return false
		}
		jobs <- job
		job = &attestJob{seq: job.seq + 1, claims: make([]attest.Claim, 0, g.batch)}
		return true
	}
	for {
		c, err := next()
		if err == io.EOF {
			if len(job.claims) > 0 {
				send()
			}
			break
		}
		if err != nil {
			readErr = g.refused(g.auditRecord(by, cache.ActionAttest, nil), err)
			break
		}
		job.claims = append(job.claims, c)
		if len(job.claims) == g.batch && !send() {
			break
		}
	}
	close(jobs)
	err := <-stored
	g.refreshGauges()
	if err != nil {
		return err
	}
	return readErr
}

// verifyClaims checks the signatures of one batch: the CPU-heavy part of
// an import, run on several batches at once.
func (g *Gate) verifyClaims(storeDir string, attesters []verify.ExpandedKey, j *attestJob) {
	now := g.now()
	for _, c := range j.claims {
		j.paths = append(j.paths, c.StorePath)
		fp, err := c.Fingerprint(storeDir)
		if err != nil {
			j.err = fmt.Errorf("%w: %s: %v", ErrInvalid, c.StorePath, err)
			return
		}
		found := false
		for _, sig := range c.Sigs {
			name, _, _ := strings.Cut(sig, ":")
			for _, key := range attesters {
				if key.Name != name {
					continue
				}
				found = true
				if !key.Verify(fp, sig) {
					j.results = append(j.results, AttestResult{Path: c.StorePath, Key: key.Name, Outcome: AttestBadSignature})
					j.bad++
					continue
				}
				j.storeIdx = append(j.storeIdx, len(j.results))
				j.results = append(j.results, AttestResult{Path: c.StorePath, Key: key.Name})
				j.toStore = append(j.toStore, policy.Attestation{StorePath: c.StorePath, NarHash: c.NarHash, NarSize: c.NarSize,
					References: c.References, Deriver: c.Deriver, KeyName: key.Name, PublicKey: key.String(), Sig: sig, Imported: now,
					Rebuild: rebuildReport(c.Rebuild)})
			}
		}
		if !found {
			// Name the keys that did sign, so that an operator sees at once
			// which key is missing from policy.attesters (or was mistyped).
			var names []string
			for _, sig := range c.Sigs {
				name, _, _ := strings.Cut(sig, ":")
				names = append(names, name)
			}
			j.results = append(j.results, AttestResult{Path: c.StorePath, Key: strings.Join(names, ","), Outcome: AttestNoAttester})
			j.noAttester++
		}
	}
	j.claims = nil // done with; the batch waits for its turn to be stored
}

// attestCombine is how many verified batches an import stores in one
// transaction at most, when the store takes several (batchPutter) and
// they are waiting: at a million stored attestations a commit of 4 batches
// costs far less than 4 commits (BenchmarkFleetScale), while the batches
// in memory stay bounded by AttestStream's inFlight.
const attestCombine = 4

// batchPutter is an EvidenceStore that stores several import batches in
// one transaction, each with its own audit record (cache.DB).
type batchPutter interface {
	PutAttestationBatches(bs []cache.AttestationBatch) error
}

// storeJobs stores verified batches in input order, up to attestCombine in
// one transaction. A batch that failed verification ends the import: the
// batches before it are stored, it is refused.
func (g *Gate) storeJobs(by Change, jobs []*attestJob, report func(AttestResult)) error {
	limit := 1
	if _, ok := g.ev.(batchPutter); ok {
		limit = attestCombine
	}
	var group []*attestJob
	flush := func() error {
		defer func() { group = group[:0] }()
		if len(group) == 0 {
			return nil
		}
		return g.storeAttestations(by, group, report)
	}
	for _, j := range jobs {
		if j.err != nil {
			if err := flush(); err != nil {
				return err
			}
			return g.refused(g.auditRecord(by, cache.ActionAttest, j.paths), j.err)
		}
		group = append(group, j)
		if len(group) == limit {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// storeAttestations stores verified batches in one transaction (one batch
// unless the store is a batchPutter) and reports their outcomes.
func (g *Gate) storeAttestations(by Change, jobs []*attestJob, report func(AttestResult)) error {
	// Each batch is one change in the audit trail, recorded in the
	// transaction that stores it.
	bs := make([]cache.AttestationBatch, len(jobs))
	for i, j := range jobs {
		rec := g.auditRecord(by, cache.ActionAttest, j.paths)
		if j.bad > 0 {
			rec.Count(cache.CountBadSignature, j.bad)
		}
		if j.noAttester > 0 {
			rec.Count(cache.CountNoAttester, j.noAttester)
		}
		bs[i] = cache.AttestationBatch{Attestations: j.toStore, Audit: rec}
	}
	var err error
	if bp, ok := g.ev.(batchPutter); ok && len(bs) > 1 {
		err = bp.PutAttestationBatches(bs)
	} else {
		bs[0].Stored, err = g.ev.PutAttestations(bs[0].Attestations, bs[0].Audit)
	}
	if err != nil {
		err = fmt.Errorf("store attestations: %w", err)
		for _, b := range bs {
			g.refused(b.Audit, err)
		}
		return err
	}
	for i, j := range jobs {
		g.logChange(bs[i].Audit)
		for k, ok := range bs[i].Stored {
			j.results[j.storeIdx[k]].Outcome = AttestKnown
			if ok {
				j.results[j.storeIdx[k]].Outcome = AttestStored
			}
		}
		for _, r := range j.results {
			report(r)
		}
	}
	return nil
}

// rebuildReport is the policy's copy of a rebuilder's report.
func rebuildReport(r *attest.Rebuild) *policy.Rebuild {
	if r == nil {
		return nil
	}
	out := &policy.Rebuild{Classification: policy.Classification(r.Classification), UpstreamNarHash: r.UpstreamNarHash}
	for _, b := range r.Builds {
		out.Builds = append(out.Builds, policy.Build{NarHash: b.NarHash, NarSize: b.NarSize})
	}
	return out
}

// Pin returns the first upstream narinfo for hash that passes rules 1–2
// (well-formed, signed by its upstream): what an allowlist entry pins.
func (g *Gate) Pin(ctx context.Context, hash string) (*narinfo.NarInfo, error) {
	var lastErr error
	unavailable := false
	c := g.conf()
	for _, u := range c.upstreams {
		raw, err := g.fetchNarInfo(ctx, u, hash)
		if err != nil {
			if !errors.Is(err, upstream.ErrNotFound) {
				unavailable = true
				lastErr = err
			}
			continue
		}
		d := c.policy.Decide(policy.Input{Hash: hash, Raw: raw, Upstream: u.Name(), UpstreamKeys: u.Keys}, policy.Evidence{}, g.now())
		if d.Reason == policy.UpstreamMalformed || d.Reason == policy.UpstreamUnsigned {
			lastErr = fmt.Errorf("%s: %s: %s", u.Name(), d.Reason, d.Detail)
			continue
		}
		return d.NarInfo, nil
	}
	switch {
	case lastErr == nil:
		return nil, fmt.Errorf("%w: %s is in no upstream", ErrNotFound, hash)
	case unavailable:
		return nil, fmt.Errorf("%w: %s: %v", ErrUnavailable, hash, lastErr)
	}
	return nil, fmt.Errorf("%w: %s: %v", ErrInvalid, hash, lastErr)
}

// Allow pins each path (with closure, also everything it references,
// transitively) to the NarHash its upstream serves now, with by.Reason.
// Every path is resolved before anything is written. It returns the
// entries added and, as they were, those they replaced.
func (g *Gate) Allow(ctx context.Context, by Change, hashes []string, closure bool, expires time.Time) (entries, replaced []policy.AllowEntry, err error) {
	now := g.now()
	rec := g.auditRecord(by, cache.ActionAllowAdd, hashes)
	seen := map[string]bool{}
	for len(hashes) > 0 {
		h := hashes[0]
		hashes = hashes[1:]
		if seen[h] {
			continue
		}
		seen[h] = true
		ni, err := g.Pin(ctx, h)
		if err != nil {
			return nil, nil, g.refused(rec, err)
		}
		fp, err := ni.Fingerprint(g.conf().policy.StoreDir)
		if err != nil {
			return nil, nil, g.refused(rec, fmt.Errorf("%w: %s: %v", ErrInvalid, ni.StorePath, err))
		}
		entries = append(entries, policy.AllowEntry{StorePath: ni.StorePath, NarHash: ni.NarHash, Fingerprint: fp,
			Reason: by.Reason, Added: now, Expires: expires})
		if closure {
			for _, ref := range ni.References {
				if rh, _, err := narinfo.ParseBaseName(ref); err == nil {
					hashes = append(hashes, rh)
				}
			}
		}
	}
	// The record names what was pinned (the closure included), not only
	// what was asked for.
	paths := make([]string, len(entries))
	for i, e := range entries {
		paths[i] = e.StorePath
	}
	rec.SetWhat(paths)
	if replaced, err = g.ev.PutAllow(entries, rec); err != nil {
		return nil, nil, g.refused(rec, fmt.Errorf("store allowlist: %w", err))
	}
	g.refreshGauges()
	g.logChange(rec)
	return entries, replaced, nil
}

// RemoveAllow removes allowlist entries; it returns the hashes that had one
// and those that had none.
func (g *Gate) RemoveAllow(by Change, hashes []string) (removed, missing []string, err error) {
	rec := g.auditRecord(by, cache.ActionAllowRemove, hashes)
	if missing, err = g.ev.RemoveAllow(hashes, rec); err != nil {
		return nil, nil, g.refused(rec, err)
	}
	g.refreshGauges()
	g.logChange(rec)
	return minus(hashes, missing), missing, nil
}

// Deny adds a denylist entry for each pattern, with by.Reason, and drops
// the stored decisions they match. It returns the entries added.
func (g *Gate) Deny(by Change, patterns []string) ([]policy.DenyEntry, error) {
	rec := g.auditRecord(by, cache.ActionDenyAdd, patterns)
	if len(patterns) == 0 {
		return nil, g.refused(rec, fmt.Errorf("%w: no patterns given", ErrInvalid))
	}
	now := g.now()
	entries := make([]policy.DenyEntry, len(patterns))
	for i, p := range patterns {
		if policy.DenyKind(p, g.conf().policy.StoreDir) == "" {
			return nil, g.refused(rec, fmt.Errorf("%w: %q is not a store path, hash, NarHash, <hash>-<name> or glob over <hash>-<name>%s",
				ErrInvalid, p, denySuggestion(p)))
		}
		entries[i] = policy.DenyEntry{Pattern: p, Reason: by.Reason, Added: now}
	}
	if _, err := g.ev.PutDeny(entries, g.denyMatch(entries), rec); err != nil {
		return nil, g.refused(rec, fmt.Errorf("store denylist: %w", err))
	}
	g.logChange(rec)
	return entries, nil
}

// denySuggestion proposes the glob an operator most likely meant by a bare
// name such as "openssl-3.0.7".
func denySuggestion(pattern string) string {
	if pattern == "" || strings.ContainsAny(pattern, "/*?[ ") {
		return ""
	}
	return fmt.Sprintf("; to deny every path named %s, use '*-%s*'", pattern, pattern)
}

// RemoveDeny removes denylist entries; it returns the patterns that had one
// and those that had none.
func (g *Gate) RemoveDeny(by Change, patterns []string) (removed, missing []string, err error) {
	rec := g.auditRecord(by, cache.ActionDenyRemove, patterns)
	entries := make([]policy.DenyEntry, len(patterns))
	for i, p := range patterns {
		entries[i].Pattern = p
	}
	if missing, err = g.ev.RemoveDeny(patterns, g.denyMatch(entries), rec); err != nil {
		return nil, nil, g.refused(rec, err)
	}
	g.logChange(rec)
	return minus(patterns, missing), missing, nil
}

// denyMatch reports whether any of entries matches a stored decision.
func (g *Gate) denyMatch(entries []policy.DenyEntry) func(base string, narHash narinfo.SHA256) bool {
	return func(base string, narHash narinfo.SHA256) bool {
		storePath := path.Join(g.conf().policy.StoreDir, base)
		for _, e := range entries {
			if policy.DenyMatches(e.Pattern, storePath, narHash, g.conf().policy.StoreDir) {
				return true
			}
		}
		return false
	}
}

// Retry lifts nar_mismatch quarantines: the next request fetches and
// verifies the NAR again. It returns the hashes that were quarantined and
// those that were not.
func (g *Gate) Retry(by Change, hashes []string) (lifted, notQuarantined []string, err error) {
	rec := g.auditRecord(by, cache.ActionRetry, hashes)
	if notQuarantined, err = g.ev.Retry(hashes, rec); err != nil {
		return nil, nil, g.refused(rec, err)
	}
	lifted = minus(hashes, notQuarantined)
	for _, h := range lifted {
		g.db.ClearRejection(h)
	}
	g.logChange(rec)
	return lifted, notQuarantined, nil
}

// AllowList, DenyList and Rejections read the evidence as stored.
func (g *Gate) AllowList() ([]policy.AllowEntry, error) { return g.db.AllowList() }
func (g *Gate) DenyList() ([]policy.DenyEntry, error)   { return g.db.DenyList() }
func (g *Gate) Rejections() ([]cache.Rejection, error)  { return g.db.Rejections() }

// VerifyCache re-hashes every cached blob and drops those that fail.
func (g *Gate) VerifyCache() (int, []cache.BlobFailure, error) {
	n, failed, err := g.blobs.VerifyAll()
	for _, f := range failed {
		g.log.Error("cached blob failed verification; dropped", "blob", f.Blob, "path", f.StorePath, "err", f.Error)
	}
	g.m.CacheSize.Set(float64(g.blobs.Size()))
	return n, failed, err
}

// Explanation is everything the gate knows about one path right now.
type Explanation struct {
	Hash      string
	StorePath string
	// Decision is decided afresh from the current evidence (nil when no
	// upstream answered); Unavailable says an upstream failed meanwhile.
	Decision    *policy.Decision
	Unavailable error
	// NarInfo and NAR are what a narinfo request and a request for the NAR
	// that narinfo names would get at this moment.
	NarInfo   Answer
	NAR       Answer
	NarFile   string
	NarCached bool
	Stored    *cache.Record // the stored decision, if it is current
	Rejection *cache.Rejection
}

// Explain decides the path afresh, storing nothing and starting no
// download, and says what each kind of request would get now.
func (g *Gate) Explain(ctx context.Context, hash string) (Explanation, error) {
	ex := Explanation{Hash: hash, StorePath: path.Join(g.conf().policy.StoreDir, hash)}
	stored, err := g.stored(hash)
	if err != nil {
		return ex, err
	}
	ex.Stored = stored
	if ex.Rejection, err = g.db.Rejection(hash); err != nil {
		return ex, err
	}
	c := g.conf()
	fresh, err := g.decide(ctx, c, hash, map[string]bool{}, false)
	if err != nil {
		return ex, err
	}
	ex.Decision, ex.Unavailable = fresh.decision, fresh.unavailable
	if ex.Decision != nil && ex.Decision.NarInfo != nil {
		ex.StorePath = ex.Decision.NarInfo.StorePath
	}
	// A request is answered from the stored decision when there is one,
	// otherwise from the decision it would make now.
	out := outcome{rec: stored}
	if stored == nil {
		out = fresh
		if d := fresh.decision; d != nil && fresh.unavailable == nil && c.policy.Served(*d) {
			rec := g.record(c, *d, fresh.until)
			out = outcome{rec: &rec, decision: d}
		}
	}
	ex.NarInfo = answer(out)
	ex.NAR = ex.NarInfo
	if ex.NarInfo.Status == Serve {
		rec := ex.NarInfo.Record
		ex.StorePath, ex.NarFile = rec.StorePath, rec.NarFile
		if f, _ := g.openBlob(rec); f != nil {
			f.Close()
			ex.NarCached = true
		}
		if q, err := g.db.Quarantine(hash); err == nil && q != nil {
			d := policy.Decision{Reason: policy.NarMismatch}
			ex.NAR = Answer{Status: Reject, Decision: d.String(), Detail: "NAR failed " + q.Check + " check"}
		}
	}
	return ex, nil
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

// VerifyAttestation checks a stored attestation as an import checks a
// claim: its signature must verify, over its own fingerprint, with the
// configured attester key it names. A cluster's mirror checks every
// attestation it reads from etcd so.
func (g *Gate) VerifyAttestation(a policy.Attestation) error {
	cf := g.conf()
	c := attest.Claim{StorePath: a.StorePath, NarHash: a.NarHash, NarSize: a.NarSize, References: a.References}
	fp, err := c.Fingerprint(cf.policy.StoreDir)
	if err != nil {
		return fmt.Errorf("attestation of %s: %w", a.StorePath, err)
	}
	for _, key := range cf.policy.Attesters {
		if key.String() != a.PublicKey {
			continue
		}
		if !key.Verify(fp, a.Sig) {
			return fmt.Errorf("attestation of %s by %s: signature does not verify", a.StorePath, key.Name)
		}
		return nil
	}
	return fmt.Errorf("attestation of %s by %s: not a configured attester key", a.StorePath, a.KeyName)
}

// DenyMatcher is denyMatch for the cluster's mirror.
func (g *Gate) DenyMatcher(entries []policy.DenyEntry) func(base string, narHash narinfo.SHA256) bool {
	return g.denyMatch(entries)
}
