package cache

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	bolt "go.etcd.io/bbolt"
)

// The mirror: in a cluster (internal/cluster) the evidence lives in etcd,
// and every node keeps a copy of it in its own state file, from which it
// decides exactly as a single node does. The functions below apply what
// the cluster says to that copy, dropping the stored decisions each change
// touches and no others, as the admin changes above do.

// Kinds of shared evidence, named after the buckets that hold them here.
const (
	KindAttestation = "attestations" // key: hash "/" public key; value: policy.Attestation
	KindAllow       = "allowlist"    // key: hash; value: policy.AllowEntry
	KindDeny        = "denylist"     // key: pattern; value: policy.DenyEntry
	KindQuarantine  = "quarantine"   // key: hash; value: policy.Quarantine
	KindAudit       = "audit"        // key: AuditKey; value: AuditRecord (never deleted)
)

// SharedKinds lists the kinds a cluster shares, in the order a full
// resynchronisation reads them.
var SharedKinds = []string{KindAttestation, KindAllow, KindDeny, KindQuarantine, KindAudit}

// MirrorEntry is one piece of shared evidence, its value in JSON; a nil
// Value deletes it.
type MirrorEntry struct {
	Kind  string
	Key   string
	Value []byte
	// Attestation, when set, is Value already decoded (a cluster node
	// decodes every attestation to verify it), so that it is not decoded
	// again here.
	Attestation *policy.Attestation
}

// DenyMatcher turns denylist entries into a test of stored decisions (the
// gate's pattern matching, which knows the store directory).
type DenyMatcher func(entries []policy.DenyEntry) func(base string, narHash narinfo.SHA256) bool

// AuditKey names an audit record in a cluster: the time and a random
// number, as hex, so that records sort by time everywhere and a record
// mirrored twice is stored once.
func AuditKey(rec *AuditRecord, random uint64) string {
	k := binary.BigEndian.AppendUint64(nil, uint64(rec.Time.UnixNano()))
	return hex.EncodeToString(binary.BigEndian.AppendUint64(k, random))
}

var (
	keyMirrorRev = []byte("mirror_revision") // last etcd revision applied
	keyMirrorID  = []byte("mirror_id")       // which cluster and prefix it was applied from
)

// MirrorState returns which cluster this file mirrors (empty if none) and
// the last revision it applied.
func (d *DB) MirrorState() (id string, rev int64, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		id = string(tx.Bucket(bucketMeta).Get(keyMirrorID))
		rev = readCount(tx, keyMirrorRev)
		return nil
	})
	return id, rev, err
}

// ApplyMirror applies the changes of one cluster revision in one
// transaction and records rev, so a restart resumes after it. Changes
// that leave a value as it was drop nothing. It returns the number of
// stored decisions dropped.
func (d *DB) ApplyMirror(rev int64, changes []MirrorEntry, match DenyMatcher) (dropped int, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		m := mirrorTx{tx: tx}
		for _, c := range changes {
			if err := m.apply(c); err != nil {
				return err
			}
		}
		if dropped, err = m.finish(d, match); err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keyMirrorRev, binary.BigEndian.AppendUint64(nil, uint64(rev)))
	})
	return dropped, err
}

// A full resynchronisation reads the cluster's whole state a page at a
// time into staging buckets (StageMirror), then makes the evidence here
// what was staged in one transaction (FinishMirror), comparing the two
// sorted key spaces side by side: memory stays bounded by a page however
// large the state, and decisions never see half of it.

// stagingBucket is where a kind is staged during a resynchronisation.
func stagingBucket(kind string) []byte { return []byte("staging_" + kind) }

// StartMirror empties the staging buckets.
func (d *DB) StartMirror() error {
	return d.update(func(tx *bolt.Tx) error {
		for _, kind := range SharedKinds {
			name := stagingBucket(kind)
			if tx.Bucket(name) != nil {
				if err := tx.DeleteBucket(name); err != nil {
					return err
				}
			}
			if _, err := tx.CreateBucket(name); err != nil {
				return err
			}
		}
		return nil
	})
}

// StageMirror adds one page of the cluster's state to the staging buckets.
func (d *DB) StageMirror(page []MirrorEntry) error {
	return d.update(func(tx *bolt.Tx) error {
		m := mirrorTx{tx: tx}
		for _, e := range page {
			b := tx.Bucket(stagingBucket(e.Kind))
			if b == nil {
				return fmt.Errorf("mirror: unknown kind %q (or StartMirror not called)", e.Kind)
			}
			if e.Value == nil {
				continue
			}
			v, err := m.encode(e)
			if err != nil {
				return err
			}
			if e.Kind == KindAudit {
				if _, err := hex.DecodeString(e.Key); err != nil || len(e.Key) != 32 {
					return fmt.Errorf("mirror: invalid audit key %q", e.Key)
				}
			}
			if err := b.Put([]byte(e.Key), v); err != nil {
				return err
			}
		}
		return nil
	})
}

// Unstaged returns the shared evidence held here that the staging buckets
// lack, as mirror entries (audit records left out): what a node joining a
// cluster for the first time adds to it.
func (d *DB) Unstaged() (out []MirrorEntry, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		for _, kind := range SharedKinds {
			if kind == KindAudit {
				continue
			}
			staged := tx.Bucket(stagingBucket(kind))
			if staged == nil {
				return errors.New("mirror: nothing staged")
			}
			err := tx.Bucket([]byte(kind)).ForEach(func(k, v []byte) error {
				if len(k) == 0 || k[0] == 0 || staged.Get(k) != nil {
					return nil
				}
				raw := append([]byte(nil), v...)
				if kind == KindAttestation {
					a, err := decodeAttestation(k, v)
					if err != nil {
						return fmt.Errorf("decode %s/%s: %w", kind, k, err)
					}
					if raw, err = json.Marshal(a); err != nil {
						return err
					}
				}
				out = append(out, MirrorEntry{Kind: kind, Key: string(k), Value: raw})
				return nil
			})
			if err != nil {
				return err
			}
		}
		return nil
	})
	return out, err
}

// FinishMirror makes the shared evidence here what was staged, as of rev
// of the cluster named id, in one transaction: what the stage lacks is
// deleted, unless keep says to keep it (a local change not yet in the
// cluster); audit records are only added. Only the decisions whose
// evidence changed are dropped; it returns how many.
func (d *DB) FinishMirror(id string, rev int64, keep func(kind, key string) bool, match DenyMatcher) (dropped int, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		m := mirrorTx{tx: tx}
		for _, kind := range SharedKinds {
			staged := tx.Bucket(stagingBucket(kind))
			if staged == nil {
				return errors.New("mirror: nothing staged")
			}
			if kind == KindAudit {
				err := staged.ForEach(func(k, v []byte) error {
					if tx.Bucket(bucketAudit).Get(k) != nil {
						return nil
					}
					var rec AuditRecord
					if err := json.Unmarshal(v, &rec); err != nil {
						return fmt.Errorf("mirror: decode audit record: %w", err)
					}
					return putAudit(tx, append([]byte(nil), k...), &rec)
				})
				if err != nil {
					return err
				}
				continue
			}
			if err := m.merge(kind, staged, keep); err != nil {
				return err
			}
		}
		if dropped, err = m.finish(d, match); err != nil {
			return err
		}
		for _, kind := range SharedKinds {
			if err := tx.DeleteBucket(stagingBucket(kind)); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		if err := meta.Put(keyMirrorID, []byte(id)); err != nil {
			return err
		}
		return meta.Put(keyMirrorRev, binary.BigEndian.AppendUint64(nil, uint64(rev)))
	})
	return dropped, err
}

// merge walks the live bucket of kind and its stage side by side, in key
// order, and applies the differences. The changes are gathered first:
// bbolt cursors must not walk a bucket that is being changed.
func (m *mirrorTx) merge(kind string, staged *bolt.Bucket, keep func(kind, key string) bool) error {
	var changes []MirrorEntry
	live := m.tx.Bucket([]byte(kind)).Cursor()
	stage := staged.Cursor()
	lk, lv := live.First()
	sk, sv := stage.First()
	for lk != nil || sk != nil {
		if lk != nil && (len(lk) == 0 || lk[0] == 0) { // internal keys
			lk, lv = live.Next()
			continue
		}
		switch c := compareKeys(lk, sk); {
		case c < 0: // here only
			if keep == nil || !keep(kind, string(lk)) {
				changes = append(changes, MirrorEntry{Kind: kind, Key: string(lk)})
			}
			lk, lv = live.Next()
		case c > 0: // staged only
			changes = append(changes, MirrorEntry{Kind: kind, Key: string(sk), Value: append([]byte(nil), sv...)})
			sk, sv = stage.Next()
		default:
			if !m.same(kind, lk, lv, sv) {
				changes = append(changes, MirrorEntry{Kind: kind, Key: string(sk), Value: append([]byte(nil), sv...)})
			}
			lk, lv = live.Next()
			sk, sv = stage.Next()
		}
	}
	for _, c := range changes {
		if err := m.applyStored(c); err != nil {
			return err
		}
	}
	return nil
}

// compareKeys orders keys, a nil key (an ended cursor) after all others.
func compareKeys(a, b []byte) int {
	switch {
	case a == nil:
		return 1
	case b == nil:
		return -1
	}
	return bytes.Compare(a, b)
}

// mirrorTx gathers, within one transaction, what the applied changes
// invalidate.
type mirrorTx struct {
	tx      *bolt.Tx
	forget  []string            // path hashes whose decisions rest on changed evidence
	deny    []policy.DenyEntry  // deny entries added, changed or removed
	changed bool                // anything changed at all
	added   int64               // attestations added minus removed
	audit   map[string]struct{} // audit keys added
}

func (m *mirrorTx) apply(c MirrorEntry) error {
	if c.Kind == KindAudit {
		return m.applyAudit(c)
	}
	b := m.tx.Bucket([]byte(c.Kind))
	if b == nil || (c.Kind != KindAttestation && c.Kind != KindAllow && c.Kind != KindDeny && c.Kind != KindQuarantine) {
		return fmt.Errorf("mirror: unknown kind %q", c.Kind)
	}
	key := []byte(c.Key)
	if len(key) == 0 || key[0] == 0 {
		return fmt.Errorf("mirror: %s: invalid key %q", c.Kind, c.Key)
	}
	stored, err := m.encode(c)
	if err != nil {
		return err
	}
	return m.applyStored(MirrorEntry{Kind: c.Kind, Key: c.Key, Value: stored})
}

// applyStored applies a change whose value is already in the stored form.
func (m *mirrorTx) applyStored(c MirrorEntry) error {
	b := m.tx.Bucket([]byte(c.Kind))
	key, stored := []byte(c.Key), c.Value
	old := b.Get(key)
	if old == nil && stored == nil {
		return nil
	}
	if old != nil && stored != nil && m.same(c.Kind, key, old, stored) {
		return nil
	}
	// The deny pattern that stops or starts matching: the new entry, or
	// the old one that goes.
	if c.Kind == KindDeny {
		src := stored
		if src == nil {
			src = old
		}
		src = append([]byte(nil), src...)
		var e policy.DenyEntry
		if err := json.Unmarshal(src, &e); err != nil {
			return fmt.Errorf("mirror: decode %s/%s: %w", c.Kind, c.Key, err)
		}
		m.deny = append(m.deny, e)
	} else {
		hash, _, _ := strings.Cut(c.Key, "/")
		m.forget = append(m.forget, hash)
	}
	if c.Kind == KindAttestation {
		switch {
		case old == nil:
			m.added++
		case stored == nil:
			m.added--
		}
	}
	m.changed = true
	if stored == nil {
		return b.Delete(key)
	}
	if c.Kind == KindAttestation {
		b.FillPercent = attestFill
	}
	return b.Put(key, stored)
}

// encode checks a value and returns it as this file stores it.
func (m *mirrorTx) encode(c MirrorEntry) ([]byte, error) {
	if c.Value == nil {
		return nil, nil
	}
	var err error
	switch c.Kind {
	case KindAttestation:
		var a policy.Attestation
		if c.Attestation != nil {
			a = *c.Attestation
		} else {
			err = json.Unmarshal(c.Value, &a)
		}
		if err == nil {
			if narinfo.PathHash(a.StorePath)+"/"+a.PublicKey != c.Key {
				return nil, fmt.Errorf("mirror: %s/%s holds an attestation of %s by %s", c.Kind, c.Key, a.StorePath, a.PublicKey)
			}
			return encodeAttestation(a), nil
		}
	case KindAllow:
		err = json.Unmarshal(c.Value, new(policy.AllowEntry))
	case KindDeny:
		err = json.Unmarshal(c.Value, new(policy.DenyEntry))
	case KindQuarantine:
		err = json.Unmarshal(c.Value, new(policy.Quarantine))
	}
	if err != nil {
		return nil, fmt.Errorf("mirror: decode %s/%s: %w", c.Kind, c.Key, err)
	}
	return c.Value, nil
}

// same reports whether two stored values say the same (attestations:
// policy.Attestation.Same).
func (m *mirrorTx) same(kind string, key, a, b []byte) bool {
	if kind != KindAttestation {
		return bytes.Equal(a, b)
	}
	x, err1 := decodeAttestation(key, a)
	y, err2 := decodeAttestation(key, b)
	return err1 == nil && err2 == nil && x.Same(y)
}

func (m *mirrorTx) applyAudit(c MirrorEntry) error {
	key, err := hex.DecodeString(c.Key)
	if err != nil || len(key) != 16 {
		return fmt.Errorf("mirror: invalid audit key %q", c.Key)
	}
	if c.Value == nil {
		return nil // the trail is append-only here; etcd may drop old records
	}
	var rec AuditRecord
	if err := json.Unmarshal(c.Value, &rec); err != nil {
		return fmt.Errorf("mirror: decode audit/%s: %w", c.Key, err)
	}
	b := m.tx.Bucket(bucketAudit)
	if b.Get(key) != nil {
		return nil
	}
	return putAudit(m.tx, key, &rec)
}

// finish drops the decisions the changes touched, in one go.
func (m *mirrorTx) finish(d *DB, match DenyMatcher) (int, error) {
	if !m.changed {
		return 0, nil
	}
	if m.added != 0 {
		if _, err := countAttestations(m.tx, m.added); err != nil {
			return 0, err
		}
	}
	hashes := m.forget
	if len(m.deny) > 0 && match != nil {
		hashes = append(hashes, matching(m.tx, match(m.deny))...)
	}
	return d.forget(m.tx, hashes)
}
