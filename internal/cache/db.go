// Package cache is cacheproxy's persistent state: one bbolt file holding the
// approved narinfos, the evidence the policy reads (attestations, allowlist,
// denylist, quarantine), the recent rejections and the index of verified NAR
// blobs, plus the blob directory itself (blobs.go).
//
// Trust model: everything in here was either verified before it was written
// (approved narinfos, blobs whose hashes matched, attestations whose
// signatures verified) or entered by an authenticated operator (allow and
// deny entries, retries). The package itself checks nothing; it only keeps
// writes atomic, so a crash never leaves a half-written record or a blob that
// was not fully verified.
package cache

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Bucket names. Keys are store path hashes (32 nix32 characters) unless noted.
var (
	bucketRecords      = []byte("records")            // hash -> Record (approved, served as stored)
	bucketAttestations = []byte("attestations")       // hash "/" public key -> Attestation
	bucketAllow        = []byte("allowlist")          // hash -> AllowEntry
	bucketDeny         = []byte("denylist")           // pattern -> DenyEntry
	bucketQuarantine   = []byte("quarantine")         // hash -> Quarantine
	bucketRejections   = []byte("rejections")         // hash -> Rejection (latest per path)
	bucketRejectOrder  = []byte("rejections_by_time") // 8-byte big-endian Last (unix ns) + hash -> nothing; oldest first
	bucketMeta         = []byte("meta")               // counters
	keyRejectionCount  = []byte("rejections")
	keyEpoch           = []byte("epoch")    // moves on with every change of evidence
	keySettings        = []byte("settings") // digest of the settings stored decisions were made under
	bucketBlobs        = []byte("blobs")    // blob name -> BlobMeta
	allBuckets         = [][]byte{bucketRecords, bucketAttestations, bucketAllow, bucketDeny, bucketQuarantine, bucketRejections, bucketRejectOrder, bucketMeta, bucketBlobs}
)

// MaxRejections bounds the rejection log; the oldest entries are dropped first.
const MaxRejections = 10000

// Record is an approved narinfo as cacheproxy serves it, with what the NAR
// route needs to fetch and verify the NAR behind it.
type Record struct {
	StorePath   string    `json:"store_path"`
	NarInfo     []byte    `json:"narinfo"` // rewritten and signed once, served byte for byte
	Reason      string    `json:"reason"`  // the policy's reason (in report mode possibly a rejection that was served anyway)
	Approved    bool      `json:"approved"`
	Upstream    string    `json:"upstream"`
	NarURL      string    `json:"nar_url"`  // relative to the upstream root
	NarFile     string    `json:"nar_file"` // our name, the blob name and the last element of /nar/<file>
	Compression string    `json:"compression"`
	FileHash    string    `json:"file_hash,omitempty"`
	FileSize    uint64    `json:"file_size,omitempty"`
	NarHash     string    `json:"nar_hash"`
	NarSize     uint64    `json:"nar_size"`
	FlatSHA256  []byte    `json:"flat_sha256,omitempty"` // content-address proof to check while streaming
	Decided     time.Time `json:"decided"`
	// ValidUntil ends a decision that rests on evidence with an expiry (an
	// allowlist entry with --expires); zero means until an admin change.
	ValidUntil time.Time `json:"valid_until,omitzero"`
}

// Expired reports whether the record must be decided again at now.
func (r Record) Expired(now time.Time) bool {
	return !r.ValidUntil.IsZero() && !now.Before(r.ValidUntil)
}

// Attestation is one attester key's verified signature over a fingerprint
// for one store path.
type Attestation struct {
	StorePath  string    `json:"store_path"`
	NarHash    string    `json:"nar_hash"`
	NarSize    uint64    `json:"nar_size"`
	References []string  `json:"references"` // basenames, sorted
	Deriver    string    `json:"deriver,omitempty"`
	KeyName    string    `json:"key_name"`
	PublicKey  string    `json:"public_key"` // "name:base64"
	Sig        string    `json:"sig"`
	Imported   time.Time `json:"imported"`
}

// AllowEntry approves one store path, pinned to the NarHash its upstream
// served when the entry was made.
type AllowEntry struct {
	StorePath string    `json:"store_path"`
	NarHash   string    `json:"nar_hash,omitempty"`
	Reason    string    `json:"reason,omitempty"`
	Added     time.Time `json:"added"`
	Expires   time.Time `json:"expires,omitzero"`
}

// Expired reports whether the entry no longer approves anything at now.
func (a AllowEntry) Expired(now time.Time) bool {
	return !a.Expires.IsZero() && !now.Before(a.Expires)
}

// DenyEntry refuses every path matching Pattern: a store path, a bare hash,
// a NarHash ("sha256:...") or a glob over the path's base name.
type DenyEntry struct {
	Pattern string    `json:"pattern"`
	Reason  string    `json:"reason,omitempty"`
	Added   time.Time `json:"added"`
}

// Quarantine marks a path whose NAR failed verification after a complete
// transfer; it stays rejected until an operator retries it.
type Quarantine struct {
	StorePath string    `json:"store_path"`
	Check     string    `json:"check"`
	Detail    string    `json:"detail"`
	Upstream  string    `json:"upstream"`
	Time      time.Time `json:"time"`
}

// Rejection is the latest refusal of one store path.
type Rejection struct {
	StorePath string    `json:"store_path"`
	Reason    string    `json:"reason"`
	Detail    string    `json:"detail,omitempty"`
	Deriver   string    `json:"deriver,omitempty"` // absolute .drv path, when the narinfo named one
	Upstream  string    `json:"upstream,omitempty"`
	Count     uint64    `json:"count"`
	First     time.Time `json:"first"`
	Last      time.Time `json:"last"`
}

// BlobMeta indexes one verified blob on disk, with what it was verified
// against so that verify-cache can check it again without its narinfo.
type BlobMeta struct {
	Size        int64     `json:"size"`
	Added       time.Time `json:"added"`
	LastUsed    time.Time `json:"last_used"`
	StorePath   string    `json:"store_path"`
	Compression string    `json:"compression"`
	FileHash    string    `json:"file_hash,omitempty"`
	FileSize    uint64    `json:"file_size,omitempty"`
	NarHash     string    `json:"nar_hash"`
	NarSize     uint64    `json:"nar_size"`
	FlatSHA256  []byte    `json:"flat_sha256,omitempty"`
}

// DB is the bbolt file. It is safe for concurrent use.
type DB struct {
	bolt *bolt.DB
	// forgetAll makes every change of evidence drop every stored decision,
	// not only the path's own: with require_closure a path's decision also
	// rests on the decisions of everything it references.
	forgetAll bool
	// changes counts committed forgets in this process, so that in-memory
	// copies of records can be checked for staleness without a transaction.
	changes atomic.Uint64
}

// Changes returns a number that moves on whenever stored decisions were
// dropped; a copy of a record read when it had another value may be stale.
func (d *DB) Changes() uint64 { return d.changes.Load() }

// ForgetAllOnChange sets whether evidence changes drop every stored
// decision. Call it before the DB is shared.
func (d *DB) ForgetAllOnChange(on bool) { d.forgetAll = on }

// OpenDB opens (creating if needed) the bbolt file at path.
func OpenDB(path string) (*DB, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	b, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 2 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("open state db %s: %w", path, err)
	}
	err = b.Update(func(tx *bolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("init state db %s: %w", path, err)
	}
	return &DB{bolt: b}, nil
}

// Close closes the file.
func (d *DB) Close() error { return d.bolt.Close() }

// Writable reports whether a write transaction commits (for /healthz).
func (d *DB) Writable() error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketBlobs).Put([]byte("\x00healthz"), nil)
	})
}

func get[T any](tx *bolt.Tx, bucket []byte, key string) (*T, error) {
	raw := tx.Bucket(bucket).Get([]byte(key))
	if raw == nil {
		return nil, nil
	}
	v := new(T)
	if err := json.Unmarshal(raw, v); err != nil {
		return nil, fmt.Errorf("decode %s/%s: %w", bucket, key, err)
	}
	return v, nil
}

func put(tx *bolt.Tx, bucket []byte, key string, v any) error {
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode %s/%s: %w", bucket, key, err)
	}
	return tx.Bucket(bucket).Put([]byte(key), raw)
}

// list decodes every value of a bucket, or those under a key prefix.
func list[T any](tx *bolt.Tx, bucket []byte, prefix string) ([]T, error) {
	var out []T
	c := tx.Bucket(bucket).Cursor()
	p := []byte(prefix)
	for k, v := c.Seek(p); k != nil && len(k) >= len(p) && string(k[:len(p)]) == prefix; k, v = c.Next() {
		if k[0] == 0 { // internal keys such as the health probe
			continue
		}
		var t T
		if err := json.Unmarshal(v, &t); err != nil {
			return nil, fmt.Errorf("decode %s/%s: %w", bucket, k, err)
		}
		out = append(out, t)
	}
	return out, nil
}

func (d *DB) view(fn func(tx *bolt.Tx) error) error   { return d.bolt.View(fn) }
func (d *DB) update(fn func(tx *bolt.Tx) error) error { return d.bolt.Update(fn) }

// Record returns the approved record for a store path hash, or nil.
func (d *DB) Record(hash string) (rec *Record, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		rec, err = get[Record](tx, bucketRecords, hash)
		return err
	})
	return rec, err
}

// PutRecord stores a served record, replacing any older one, unless the
// evidence changed since epoch (Evidence.Epoch): then the decision may be
// stale and nothing is stored (stored is false); the next request decides
// again. An approved record also clears the path's rejection log entry.
func (d *DB) PutRecord(hash string, rec Record, epoch int64) (stored bool, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		if readCount(tx, keyEpoch) != epoch {
			return nil
		}
		stored = true
		if rec.Approved {
			if err := clearRejection(tx, hash); err != nil {
				return err
			}
		}
		return put(tx, bucketRecords, hash, rec)
	})
	return stored, err
}

// Epoch returns the current evidence epoch (see PutRecord).
func (d *DB) Epoch() (n int64, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		n = readCount(tx, keyEpoch)
		return nil
	})
	return n, err
}

// SyncSettings drops every stored decision when the settings they were made
// under (mode, policy, upstreams and their keys, the gatekeeper key: digest)
// differ from those of the last start, so that a revoked key or a stricter
// policy takes effect at once.
func (d *DB) SyncSettings(digest string) (changed bool, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if string(meta.Get(keySettings)) == digest {
			return nil
		}
		changed = true
		if err := d.forget(tx, nil); err != nil {
			return err
		}
		return meta.Put(keySettings, []byte(digest))
	})
	return changed, err
}

// Forget drops the stored decisions for these hashes so the next request
// decides again. With no hashes it forgets every decision (a deny glob or a
// policy change can touch any path).
func (d *DB) Forget(hashes ...string) error {
	return d.update(func(tx *bolt.Tx) error { return d.forget(tx, hashes) })
}

// forget drops stored decisions and moves the epoch on, so that a decision
// computed from evidence read before this change is not stored after it
// (PutRecord).
func (d *DB) forget(tx *bolt.Tx, hashes []string) error {
	if _, err := addCount(tx, keyEpoch, 1); err != nil {
		return err
	}
	tx.OnCommit(func() { d.changes.Add(1) })
	if len(hashes) == 0 || d.forgetAll {
		if err := tx.DeleteBucket(bucketRecords); err != nil {
			return err
		}
		_, err := tx.CreateBucket(bucketRecords)
		return err
	}
	b := tx.Bucket(bucketRecords)
	for _, h := range hashes {
		if err := b.Delete([]byte(h)); err != nil {
			return err
		}
	}
	return nil
}

// Evidence is everything the policy reads about one path, from one read
// transaction so that it is consistent.
type Evidence struct {
	Epoch        int64 // pass to PutRecord
	Attestations []Attestation
	Allow        *AllowEntry
	Deny         []DenyEntry
	Quarantine   *Quarantine
}

// Evidence reads the evidence for one store path hash.
func (d *DB) Evidence(hash string) (ev Evidence, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		ev.Epoch = readCount(tx, keyEpoch)
		if ev.Attestations, err = list[Attestation](tx, bucketAttestations, hash+"/"); err != nil {
			return err
		}
		if ev.Allow, err = get[AllowEntry](tx, bucketAllow, hash); err != nil {
			return err
		}
		if ev.Deny, err = list[DenyEntry](tx, bucketDeny, ""); err != nil {
			return err
		}
		ev.Quarantine, err = get[Quarantine](tx, bucketQuarantine, hash)
		return err
	})
	return ev, err
}

// AttestResult says what PutAttestation did with one attestation.
type AttestResult string

const (
	AttestStored AttestResult = "stored"
	AttestKnown  AttestResult = "already_known"
)

// PutAttestations stores verified attestations in one transaction and drops
// the stored decisions of their paths. An attestation by the same key for the
// same path replaces the older one (the attester rebuilt again).
func (d *DB) PutAttestations(as []Attestation) ([]AttestResult, error) {
	res := make([]AttestResult, len(as))
	err := d.update(func(tx *bolt.Tx) error {
		for i, a := range as {
			hash := hashOf(a.StorePath)
			key := hash + "/" + a.PublicKey
			old, err := get[Attestation](tx, bucketAttestations, key)
			if err != nil {
				return err
			}
			if old != nil && old.Sig == a.Sig {
				res[i] = AttestKnown
				continue
			}
			if err := put(tx, bucketAttestations, key, a); err != nil {
				return err
			}
			if err := d.forget(tx, []string{hash}); err != nil {
				return err
			}
			res[i] = AttestStored
		}
		return nil
	})
	return res, err
}

// CountAttestations returns the number of stored attestations.
func (d *DB) CountAttestations() (n int, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		n = tx.Bucket(bucketAttestations).Stats().KeyN
		return nil
	})
	return n, err
}

// PutAllow stores allowlist entries and forgets the decisions of their paths.
func (d *DB) PutAllow(entries []AllowEntry) error {
	return d.update(func(tx *bolt.Tx) error {
		for _, e := range entries {
			h := hashOf(e.StorePath)
			if err := put(tx, bucketAllow, h, e); err != nil {
				return err
			}
			if err := d.forget(tx, []string{h}); err != nil {
				return err
			}
		}
		return nil
	})
}

// RemoveAllow deletes allowlist entries by hash; it returns the hashes that
// had no entry.
func (d *DB) RemoveAllow(hashes []string) (missing []string, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketAllow)
		for _, h := range hashes {
			if b.Get([]byte(h)) == nil {
				missing = append(missing, h)
				continue
			}
			if err := b.Delete([]byte(h)); err != nil {
				return err
			}
		}
		return d.forget(tx, hashes)
	})
	return missing, err
}

// AllowList returns every allowlist entry.
func (d *DB) AllowList() (out []AllowEntry, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		out, err = list[AllowEntry](tx, bucketAllow, "")
		return err
	})
	return out, err
}

// PutDeny stores denylist entries and forgets every decision, since a glob
// can match any path.
func (d *DB) PutDeny(entries []DenyEntry) error {
	return d.update(func(tx *bolt.Tx) error {
		for _, e := range entries {
			if err := put(tx, bucketDeny, e.Pattern, e); err != nil {
				return err
			}
		}
		return d.forget(tx, nil)
	})
}

// RemoveDeny deletes denylist entries; it returns the patterns that had none.
func (d *DB) RemoveDeny(patterns []string) (missing []string, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketDeny)
		for _, p := range patterns {
			if b.Get([]byte(p)) == nil {
				missing = append(missing, p)
				continue
			}
			if err := b.Delete([]byte(p)); err != nil {
				return err
			}
		}
		return d.forget(tx, nil)
	})
	return missing, err
}

// DenyList returns every denylist entry.
func (d *DB) DenyList() (out []DenyEntry, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		out, err = list[DenyEntry](tx, bucketDeny, "")
		return err
	})
	return out, err
}

// PutQuarantine marks a path nar_mismatch and drops its approved record.
func (d *DB) PutQuarantine(hash string, q Quarantine) error {
	return d.update(func(tx *bolt.Tx) error {
		if err := put(tx, bucketQuarantine, hash, q); err != nil {
			return err
		}
		return d.forget(tx, []string{hash})
	})
}

// Retry lifts quarantines; it returns the hashes that were not quarantined.
// It also forgets their decisions so the next request re-fetches.
func (d *DB) Retry(hashes []string) (notQuarantined []string, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketQuarantine)
		for _, h := range hashes {
			if b.Get([]byte(h)) == nil {
				notQuarantined = append(notQuarantined, h)
			}
			if err := b.Delete([]byte(h)); err != nil {
				return err
			}
		}
		return d.forget(tx, hashes)
	})
	return notQuarantined, err
}

// RecordRejection adds one refusal to the rejection log, keeping the latest
// per path and at most MaxRejections paths. A time index keeps pruning the
// oldest entry O(log n) however full the log is.
func (d *DB) RecordRejection(r Rejection) error {
	hash := hashOf(r.StorePath)
	return d.update(func(tx *bolt.Tx) error {
		old, err := get[Rejection](tx, bucketRejections, hash)
		if err != nil {
			return err
		}
		r.Count, r.First = 1, r.Last
		if old != nil {
			r.Count, r.First = old.Count+1, old.First
			if err := tx.Bucket(bucketRejectOrder).Delete(orderKey(old.Last, hash)); err != nil {
				return err
			}
		}
		if err := put(tx, bucketRejections, hash, r); err != nil {
			return err
		}
		if err := tx.Bucket(bucketRejectOrder).Put(orderKey(r.Last, hash), nil); err != nil {
			return err
		}
		if old != nil {
			return nil
		}
		n, err := addCount(tx, keyRejectionCount, 1)
		for ; err == nil && n > MaxRejections; n-- {
			err = dropOldestRejection(tx)
		}
		return err
	})
}

// orderKey sorts rejections by time; the hash keeps equal times apart.
func orderKey(t time.Time, hash string) []byte {
	k := binary.BigEndian.AppendUint64(nil, uint64(t.UnixNano()))
	return append(k, hash...)
}

func dropOldestRejection(tx *bolt.Tx) error {
	c := tx.Bucket(bucketRejectOrder).Cursor()
	k, _ := c.First()
	if k == nil {
		return nil
	}
	if err := c.Delete(); err != nil {
		return err
	}
	if err := tx.Bucket(bucketRejections).Delete(k[8:]); err != nil {
		return err
	}
	_, err := addCount(tx, keyRejectionCount, -1)
	return err
}

// addCount adjusts a counter in the meta bucket and returns its new value.
func addCount(tx *bolt.Tx, key []byte, delta int64) (int64, error) {
	n := readCount(tx, key) + delta
	return n, tx.Bucket(bucketMeta).Put(key, binary.BigEndian.AppendUint64(nil, uint64(n)))
}

func readCount(tx *bolt.Tx, key []byte) int64 {
	if v := tx.Bucket(bucketMeta).Get(key); len(v) == 8 {
		return int64(binary.BigEndian.Uint64(v))
	}
	return 0
}

// Rejections returns the rejection log, newest first.
func (d *DB) Rejections() (out []Rejection, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		out, err = list[Rejection](tx, bucketRejections, "")
		return err
	})
	sort.SliceStable(out, func(i, j int) bool { return out[i].Last.After(out[j].Last) })
	return out, err
}

// ClearRejection drops a path from the rejection log (it was approved since).
func (d *DB) ClearRejection(hash string) error {
	return d.update(func(tx *bolt.Tx) error { return clearRejection(tx, hash) })
}

func clearRejection(tx *bolt.Tx, hash string) error {
	old, err := get[Rejection](tx, bucketRejections, hash)
	if err != nil || old == nil {
		return err
	}
	if err := tx.Bucket(bucketRejectOrder).Delete(orderKey(old.Last, hash)); err != nil {
		return err
	}
	if err := tx.Bucket(bucketRejections).Delete([]byte(hash)); err != nil {
		return err
	}
	_, err = addCount(tx, keyRejectionCount, -1)
	return err
}

// Rejection returns the rejection log entry of one path, or nil.
func (d *DB) Rejection(hash string) (r *Rejection, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		r, err = get[Rejection](tx, bucketRejections, hash)
		return err
	})
	return r, err
}

// hashOf returns the 32-character hash of an absolute store path.
func hashOf(storePath string) string {
	base := filepath.Base(storePath)
	if len(base) < 32 {
		return base
	}
	return base[:32]
}
