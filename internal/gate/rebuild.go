package gate

import (
	"path"
	"sort"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
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
	storeDir   string
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
			add(hashOf(r.StorePath), QueueEntry{StorePath: r.StorePath, Deriver: r.Deriver, Reason: r.Reason,
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
// rejection log (at most cache.MaxRejections paths) and the stored
// decisions.
func (g *Gate) RebuildQueue() ([]QueueEntry, error) {
	rejs, err := g.db.Rejections()
	if err != nil {
		return nil, err
	}
	c := g.conf()
	return rebuildQueue(queueSource{rejections: rejs, storeDir: c.policy.StoreDir,
		approved: func(h string) bool {
			rec, err := g.stored(h)
			return err == nil && rec != nil && rec.Approved
		},
		refs: func(h string) []string { return g.storedRefs(c, h) },
	}), nil
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
	q := rebuildQueue(queueSource{rejections: rejs, storeDir: g.conf().policy.StoreDir,
		approved: func(h string) bool {
			rec, err := g.stored(h)
			return err == nil && rec != nil && rec.Approved
		},
		refs: func(string) []string { return nil },
	})
	return len(q), nil
}

// hashOf returns the 32-character hash of an absolute store path.
func hashOf(storePath string) string {
	base := path.Base(storePath)
	if len(base) < narinfo.HashLen {
		return base
	}
	return base[:narinfo.HashLen]
}
