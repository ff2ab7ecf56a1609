package cluster

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"

	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// The admin changes, written to etcd (the gate's evidence store). Each is
// a software transaction over the keys it reads: it reads what is there,
// decides what it replaces or lacks, and commits only if none of those
// keys changed meanwhile (another node's change), else runs again. Its
// audit record is written in the same transaction. A change of more than
// maxOps entries is split into transactions of maxOps, each with its own
// audit record naming its part. Once committed, the change waits for this
// node's mirror, so the answer to it and the next decision here agree.

// ErrUnreachable wraps a change etcd did not take.
var ErrUnreachable = errors.New("cluster: etcd unreachable")

// MaxBatch is how many attestations one import batch should hold.
func (n *Node) MaxBatch() int { return maxOps }

// change runs fn over items in parts of maxOps, each in a transaction of
// its own with a copy of audit for that part. names names a part's items
// for its audit record when there is more than one part. The counts of
// every part are added to audit.
func (n *Node) change(audit *cache.AuditRecord, items int, names func(lo, hi int) []string,
	fn func(s concurrency.STM, lo, hi int, rec *cache.AuditRecord) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), n.o.WriteTimeout)
	defer cancel()
	var last int64
	base := cloneAudit(audit)     // each part's record starts from it
	for lo := 0; ; lo += maxOps { // at least once: a change of nothing is still recorded
		hi := min(lo+maxOps, items)
		var rec *cache.AuditRecord
		resp, err := concurrency.NewSTM(n.cli, func(s concurrency.STM) error {
			rec = cloneAudit(base) // the function runs again on conflict
			if rec != nil && items > maxOps {
				rec.SetWhat(names(lo, hi))
			}
			if err := fn(s, lo, hi, rec); err != nil {
				return err
			}
			if rec != nil {
				rec.Settle()
				raw, err := json.Marshal(rec)
				if err != nil {
					return err
				}
				s.Put(n.key(cache.KindAudit, cache.AuditKey(rec, random())), string(raw))
			}
			return nil
		}, concurrency.WithAbortContext(ctx), concurrency.WithIsolation(concurrency.RepeatableReads))
		if err != nil {
			if lo > 0 {
				return fmt.Errorf("%w: %v (the first %d of %d entries were stored)", ErrUnreachable, err, lo, items)
			}
			return fmt.Errorf("%w: %v: nothing was changed", ErrUnreachable, err)
		}
		if audit != nil {
			for k, v := range rec.Counts {
				audit.Count(k, v-base.Counts[k]) // this part's own
			}
			audit.PreviousAllow = append(audit.PreviousAllow, rec.PreviousAllow[len(base.PreviousAllow):]...)
			audit.PreviousDeny = append(audit.PreviousDeny, rec.PreviousDeny[len(base.PreviousDeny):]...)
		}
		last = resp.Header.Revision
		if hi >= items {
			break
		}
	}
	if audit != nil {
		audit.Settle()
	}
	return n.waitApplied(ctx, last)
}

// cloneAudit copies a record deeply enough to fill it in again.
func cloneAudit(r *cache.AuditRecord) *cache.AuditRecord {
	if r == nil {
		return nil
	}
	c := *r
	c.Counts = nil
	for k, v := range r.Counts {
		c.Count(k, v)
	}
	c.What = slices.Clone(r.What)
	c.PreviousAllow = slices.Clone(r.PreviousAllow)
	c.PreviousDeny = slices.Clone(r.PreviousDeny)
	return &c
}

// namesOf names items[lo:hi] for the audit record of one part of a change.
func namesOf[T any](items []T, name func(T) string) func(lo, hi int) []string {
	return func(lo, hi int) []string {
		out := make([]string, 0, hi-lo)
		for _, it := range items[lo:hi] {
			out = append(out, name(it))
		}
		return out
	}
}

func random() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.BigEndian.Uint64(b[:])
}

func jsonString(v any) string {
	raw, err := json.Marshal(v)
	if err != nil {
		panic(err) // evidence types always encode
	}
	return string(raw)
}

// PutAttestations stores verified attestations; stored[i] is false when
// as[i] was already there.
func (n *Node) PutAttestations(as []policy.Attestation, audit *cache.AuditRecord) ([]bool, error) {
	stored := make([]bool, len(as))
	names := namesOf(as, func(a policy.Attestation) string { return a.StorePath })
	err := n.change(audit, len(as), names, func(s concurrency.STM, lo, hi int, rec *cache.AuditRecord) error {
		for i := lo; i < hi; i++ {
			a := as[i]
			key := n.key(cache.KindAttestation, narinfo.PathHash(a.StorePath)+"/"+a.PublicKey)
			stored[i] = true
			if old := s.Get(key); old != "" {
				var o policy.Attestation
				if json.Unmarshal([]byte(old), &o) == nil && o.Same(a) {
					stored[i] = false
					rec.Count(cache.CountKnown, 1)
					continue
				}
			}
			s.Put(key, jsonString(a))
			rec.Count(cache.CountStored, 1)
		}
		return nil
	})
	return stored, err
}

// PutAllow stores allowlist entries and returns those they replaced.
func (n *Node) PutAllow(entries []policy.AllowEntry, audit *cache.AuditRecord) ([]policy.AllowEntry, error) {
	var replaced []policy.AllowEntry
	names := namesOf(entries, func(e policy.AllowEntry) string { return e.StorePath })
	parts := map[int][]policy.AllowEntry{} // by part, as last run
	err := n.change(audit, len(entries), names, func(s concurrency.STM, lo, hi int, rec *cache.AuditRecord) error {
		var part []policy.AllowEntry
		for _, e := range entries[lo:hi] {
			key := n.key(cache.KindAllow, narinfo.PathHash(e.StorePath))
			if old := s.Get(key); old != "" {
				var o policy.AllowEntry
				if err := json.Unmarshal([]byte(old), &o); err == nil {
					part = append(part, o)
					rec.AddPreviousAllow(o)
				}
				rec.Count(cache.CountReplaced, 1)
			} else {
				rec.Count(cache.CountAdded, 1)
			}
			s.Put(key, jsonString(e))
		}
		parts[lo] = part
		return nil
	})
	for lo := 0; lo < len(entries); lo += maxOps {
		replaced = append(replaced, parts[lo]...)
	}
	return replaced, err
}

// RemoveAllow deletes allowlist entries; it returns the hashes that had none.
func (n *Node) RemoveAllow(hashes []string, audit *cache.AuditRecord) ([]string, error) {
	return n.remove(cache.KindAllow, hashes, audit, cache.CountRemoved, cache.CountMissing, func(rec *cache.AuditRecord, old string) {
		var o policy.AllowEntry
		if json.Unmarshal([]byte(old), &o) == nil {
			rec.AddPreviousAllow(o)
		}
	})
}

// remove deletes keys of one kind and returns those that were not there.
func (n *Node) remove(kind string, keys []string, audit *cache.AuditRecord, done, missed string, previous func(*cache.AuditRecord, string)) ([]string, error) {
	parts := map[int][]string{} // by part, as last run
	err := n.change(audit, len(keys), namesOf(keys, func(k string) string { return k }),
		func(s concurrency.STM, lo, hi int, rec *cache.AuditRecord) error {
			var miss []string
			for _, k := range keys[lo:hi] {
				key := n.key(kind, k)
				old := s.Get(key)
				if old == "" {
					miss = append(miss, k)
					rec.Count(missed, 1)
					continue
				}
				if previous != nil {
					previous(rec, old)
				}
				s.Del(key)
				rec.Count(done, 1)
			}
			parts[lo] = miss
			return nil
		})
	var missing []string
	for lo := 0; lo < len(keys); lo += maxOps {
		missing = append(missing, parts[lo]...)
	}
	return missing, err
}

// PutDeny stores denylist entries. Each node drops the decisions they
// match as its mirror applies them; the count of those is each node's own
// (its log says it), so the one returned here is zero.
func (n *Node) PutDeny(entries []policy.DenyEntry, _ func(string, narinfo.SHA256) bool, audit *cache.AuditRecord) (int, error) {
	names := namesOf(entries, func(e policy.DenyEntry) string { return e.Pattern })
	err := n.change(audit, len(entries), names, func(s concurrency.STM, lo, hi int, rec *cache.AuditRecord) error {
		for _, e := range entries[lo:hi] {
			key := n.key(cache.KindDeny, e.Pattern)
			if old := s.Get(key); old != "" {
				var o policy.DenyEntry
				if json.Unmarshal([]byte(old), &o) == nil {
					rec.AddPreviousDeny(o)
				}
				rec.Count(cache.CountReplaced, 1)
			} else {
				rec.Count(cache.CountAdded, 1)
			}
			s.Put(key, jsonString(e))
		}
		return nil
	})
	return 0, err
}

// RemoveDeny deletes denylist entries; it returns the patterns that had none.
func (n *Node) RemoveDeny(patterns []string, _ func(string, narinfo.SHA256) bool, audit *cache.AuditRecord) ([]string, error) {
	return n.remove(cache.KindDeny, patterns, audit, cache.CountRemoved, cache.CountMissing, func(rec *cache.AuditRecord, old string) {
		var o policy.DenyEntry
		if json.Unmarshal([]byte(old), &o) == nil {
			rec.AddPreviousDeny(o)
		}
	})
}

// Retry lifts quarantines everywhere; it returns the hashes that were not
// quarantined. A quarantine found here and not yet written to etcd is
// lifted here.
func (n *Node) Retry(hashes []string, audit *cache.AuditRecord) ([]string, error) {
	n.mu.Lock()
	local := map[string]bool{}
	for _, h := range hashes {
		if _, ok := n.pending[h]; ok {
			local[h] = true
			delete(n.pending, h)
		}
	}
	n.mu.Unlock()
	missing, err := n.remove(cache.KindQuarantine, hashes, audit, cache.CountLifted, cache.CountNotQuarantined, nil)
	if err != nil {
		return nil, err
	}
	var still []string
	for _, h := range missing {
		if local[h] {
			if _, err := n.o.DB.Retry([]string{h}, nil); err != nil {
				return nil, err
			}
			continue
		}
		still = append(still, h)
	}
	return still, nil
}

// PutQuarantine quarantines a path on this node at once and on every
// node through etcd. The write to etcd does not hold up the download that
// found the mismatch: it is queued, and while etcd is unreachable it waits
// for etcd to come back.
func (n *Node) PutQuarantine(hash string, q policy.Quarantine) error {
	if err := n.o.DB.PutQuarantine(hash, q); err != nil {
		return err
	}
	n.mu.Lock()
	n.pending[hash] = q
	n.mu.Unlock()
	go n.flushPending(context.Background())
	return nil
}

// flushPending writes the quarantines found while etcd was unreachable.
func (n *Node) flushPending(ctx context.Context) {
	n.mu.Lock()
	hashes := slices.Sorted(maps.Keys(n.pending))
	n.mu.Unlock()
	for _, h := range hashes {
		n.mu.Lock()
		q, ok := n.pending[h]
		n.mu.Unlock()
		if !ok {
			continue
		}
		c, cancel := context.WithTimeout(ctx, n.o.WriteTimeout)
		_, err := n.cli.Put(c, n.key(cache.KindQuarantine, h), jsonString(q))
		cancel()
		if err != nil {
			n.o.Log.Warn("cluster: quarantine holds here; it reaches the other nodes when etcd answers", "hash", h, "error", err)
			return
		}
		n.mu.Lock()
		if n.pending[h] == q {
			delete(n.pending, h)
		}
		n.mu.Unlock()
	}
}

// AppendAudit records a refused change in the cluster's audit trail, or
// here when etcd is unreachable (the refusal changed nothing to share).
func (n *Node) AppendAudit(rec cache.AuditRecord) error {
	rec.Settle()
	ctx, cancel := context.WithTimeout(context.Background(), n.o.WriteTimeout)
	defer cancel()
	resp, err := n.cli.Put(ctx, n.key(cache.KindAudit, cache.AuditKey(&rec, random())), jsonString(rec))
	if err != nil {
		return n.o.DB.AppendAudit(rec)
	}
	return n.waitApplied(ctx, resp.Header.Revision)
}
