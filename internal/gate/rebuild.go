package gate

import (
	"fmt"
	"path"
	"slices"
	"sort"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// QueueEntry is one path in the rebuild queue: refused now, and approved
// once enough rebuilders attest it.
type QueueEntry struct {
	StorePath string
	Deriver   string // absolute .drv path; "" when no refusal named one
	// Reason is unattested (the path itself was refused so) or
	// closure_incomplete (it is only known as an unattested reference of
	// a path refused for its closure).
	Reason string
	// Requests is how many times the path was refused, or, when more, how
	// many times the paths it keeps from approval were.
	Requests    uint64
	First, Last time.Time
}

// queueSource is the state the queue is computed from: the rejection log,
// whether a path is approved now, and the references of a path when a
// stored narinfo knows them (hashes).
type queueSource struct {
	rejections []cache.Rejection
	approved   func(hash string) bool
	refs       func(hash string) []string
	// attesters names the configured attester keys with an attestation
	// for a path: once quorum of them attested it (since its refusal; the
	// next request decides), or the asking rebuilder's key did, another
	// rebuild by that rebuilder adds nothing.
	attesters func(hash string) []string
	quorum    int
	exclude   string // the asking rebuilder's key name, or ""
	storeDir  string
}

// rebuildQueue lists the rejected paths that a rebuild could approve: those
// refused as unattested, and the unattested references of those refused as
// closure_incomplete. Denied, malformed, mismatched or quarantined paths are
// not in it: no new attestation approves them. Most requested first, except
// that a path's queued dependencies come before it.
func rebuildQueue(src queueSource) []QueueEntry {
	byHash := map[string]*QueueEntry{}
	blocked := map[string]uint64{} // missing reference -> requests of the paths it blocks
	add := func(hash string, e QueueEntry) *QueueEntry {
		q := byHash[hash]
		if q == nil {
			byHash[hash] = &e
			return &e
		}
		if q.First.IsZero() || (!e.First.IsZero() && e.First.Before(q.First)) {
			q.First = e.First
		}
		if e.Last.After(q.Last) {
			q.Last = e.Last
		}
		if q.Deriver == "" {
			q.Deriver = e.Deriver
		}
		if e.Reason == string(policy.Unattested) {
			q.Reason = e.Reason
		}
		q.Requests = max(q.Requests, e.Requests)
		return q
	}
	for _, r := range src.rejections {
		switch policy.Reason(r.Reason) {
		case policy.Unattested:
			add(narinfo.PathHash(r.StorePath), QueueEntry{StorePath: r.StorePath, Deriver: r.Deriver, Reason: r.Reason,
				Requests: r.Count, First: r.First, Last: r.Last})
		case policy.ClosureIncomplete:
			for _, m := range r.Missing {
				if m.Reason != policy.Unattested {
					continue
				}
				h, _, err := narinfo.ParseBaseName(m.Ref)
				if err != nil || src.approved(h) {
					continue // approved since
				}
				blocked[h] += r.Count
				add(h, QueueEntry{StorePath: path.Join(src.storeDir, m.Ref), Reason: string(policy.ClosureIncomplete),
					First: r.First, Last: r.Last})
			}
		}
	}
	hashes := make([]string, 0, len(byHash))
	for h, q := range byHash {
		if keys := src.attesters(h); len(keys) >= max(src.quorum, 1) || (src.exclude != "" && slices.Contains(keys, src.exclude)) {
			delete(byHash, h)
			continue
		}
		q.Requests = max(q.Requests, blocked[h])
		hashes = append(hashes, h)
	}
	sort.Slice(hashes, func(i, j int) bool {
		a, b := byHash[hashes[i]], byHash[hashes[j]]
		if a.Requests != b.Requests {
			return a.Requests > b.Requests
		}
		return a.StorePath < b.StorePath
	})
	// Dependencies first: a depth-first walk over the queued references,
	// in the order above, so a dependency goes just before the first path
	// that needs it. Store paths have no cycles but self-references;
	// onPath guards against anything else a narinfo might claim.
	out := make([]QueueEntry, 0, len(hashes))
	done, onPath := map[string]bool{}, map[string]bool{}
	var visit func(h string)
	visit = func(h string) {
		if done[h] || onPath[h] {
			return
		}
		onPath[h] = true
		for _, r := range src.refs(h) {
			if byHash[r] != nil && r != h {
				visit(r)
			}
		}
		delete(onPath, h)
		done[h] = true
		out = append(out, *byHash[h])
	}
	for _, h := range hashes {
		visit(h)
	}
	return out
}

// RebuildQueue is the rebuild queue now (see rebuildQueue), read from the
// rejection log (at most cache.MaxRejections paths), the attestations and
// the stored decisions. exclude, when not "", is the name of an attester
// key whose rebuilder asks: paths it attested already are left out.
func (g *Gate) RebuildQueue(exclude string) ([]QueueEntry, error) {
	rejs, err := g.db.Rejections()
	if err != nil {
		return nil, err
	}
	c := g.conf()
	if exclude != "" && !slices.ContainsFunc(c.policy.Attesters, func(k verify.PublicKey) bool { return k.Name == exclude }) {
		return nil, fmt.Errorf("%w: attester %q is not a key in policy.attesters", ErrInvalid, exclude)
	}
	src := g.queueSource(c, rejs)
	src.exclude = exclude
	src.refs = func(h string) []string { return g.storedRefs(c, h) }
	return rebuildQueue(src), nil
}

func (g *Gate) queueSource(c *conf, rejs []cache.Rejection) queueSource {
	return queueSource{rejections: rejs, storeDir: c.policy.StoreDir, quorum: c.policy.Quorum,
		approved: func(h string) bool {
			rec, err := g.stored(h)
			return err == nil && rec != nil && rec.Approved
		},
		attesters: func(h string) []string {
			as, err := g.db.Attestations(h)
			if err != nil {
				return nil
			}
			var keys []string
			for _, a := range as {
				for _, k := range c.policy.Attesters {
					if k.String() == a.PublicKey && !slices.Contains(keys, k.Name) {
						keys = append(keys, k.Name)
					}
				}
			}
			return keys
		},
		refs: func(string) []string { return nil },
	}
}

// storedRefs returns the hashes of the references of a path whose narinfo
// is stored (a decision served in report mode, or one made under earlier
// settings), or nil.
func (g *Gate) storedRefs(c *conf, hash string) []string {
	rec, err := g.db.Record(hash)
	if err != nil || rec == nil {
		return nil
	}
	if len(rec.References) > 0 {
		return rec.References
	}
	ni, err := narinfo.Parse(rec.NarInfo, c.policy.StoreDir)
	if err != nil {
		return nil
	}
	var out []string
	for _, ref := range ni.References {
		if rh, _, err := narinfo.ParseBaseName(ref); err == nil && rh != hash {
			out = append(out, rh)
		}
	}
	return out
}

// rebuildQueueLen is the queue's length for the metrics: the same walk
// without the order, bounded by the rejection log's size.
func (g *Gate) rebuildQueueLen() (int, error) {
	rejs, err := g.db.Rejections()
	if err != nil {
		return 0, err
	}
	return len(rebuildQueue(g.queueSource(g.conf(), rejs))), nil
}
