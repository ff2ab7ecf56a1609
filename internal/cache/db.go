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
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"sync/atomic"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
	"github.com/cacheproxy/cacheproxy/internal/verify"
	bolt "go.etcd.io/bbolt"
)

// Bucket names. Keys are store path hashes (32 nix32 characters) unless noted.
var (
	bucketRecords      = []byte("records")            // hash -> Record (a stored decision, served as stored)
	bucketRecordNames  = []byte("record_names")       // "<hash>-<name>" of each record -> its NarHash (32 bytes); deny patterns scan it
	bucketRecordRefs   = []byte("record_refs")        // reference hash "/" dependent hash -> nothing; decisions that rest on a reference's
	bucketAttestations = []byte("attestations")       // hash "/" public key -> policy.Attestation (attestcodec.go)
	bucketAllow        = []byte("allowlist")          // hash -> policy.AllowEntry
	bucketDeny         = []byte("denylist")           // pattern -> policy.DenyEntry
	bucketQuarantine   = []byte("quarantine")         // hash -> policy.Quarantine
	bucketRejections   = []byte("rejections")         // hash -> Rejection (latest per path)
	bucketRejectOrder  = []byte("rejections_by_time") // 8-byte big-endian Last (unix ns) + hash -> nothing; oldest first
	bucketAudit        = []byte("audit")              // 8-byte big-endian time (unix ns) + 8-byte sequence -> AuditRecord; oldest first
	bucketMeta         = []byte("meta")               // counters
	keyRejectionCount  = []byte("rejections")
	keyAuditCount      = []byte("audit")
	keyEpoch           = []byte("epoch")        // moves on with every change of evidence
	keySettings        = []byte("settings")     // digest of the decision settings of the last start
	keyHealth          = []byte("healthz")      // written by the health probe
	keyAttestCount     = []byte("attestations") // number of keys in bucketAttestations
	bucketBlobs        = []byte("blobs")        // blob name -> BlobMeta
	allBuckets         = [][]byte{bucketRecords, bucketRecordNames, bucketRecordRefs, bucketAttestations, bucketAllow,
		bucketDeny, bucketQuarantine, bucketRejections, bucketRejectOrder, bucketAudit, bucketMeta, bucketBlobs}
)

// MaxRejections bounds the rejection log; the oldest entries are dropped first.
const MaxRejections = 10000

// Record is a stored decision: the narinfo as cacheproxy serves it, with
// what the NAR route needs to fetch and verify the NAR behind it.
type Record struct {
	StorePath string        `json:"store_path"`
	NarInfo   []byte        `json:"narinfo"` // rewritten and signed once, served byte for byte
	Reason    policy.Reason `json:"reason"`  // the policy's reason (in report mode possibly a rejection that was served anyway)
	Approved  bool          `json:"approved"`
	Upstream  string        `json:"upstream"`
	NarURL    string        `json:"nar_url"`  // relative to the upstream root
	NarFile   string        `json:"nar_file"` // our name, the blob name and the last element of /nar/<file>
	NAR       verify.Expect `json:"nar"`
	// References are the hashes of the paths whose decisions this one
	// rests on (require_closure): a change to any of them drops this one.
	References []string `json:"references,omitempty"`
	// Settings is the digest of the decision settings it was made under;
	// a record made under other settings is decided again when next used.
	Settings string    `json:"settings"`
	Decided  time.Time `json:"decided"`
	// ValidUntil ends a decision that rests on evidence with an expiry (an
	// allowlist entry with --expires); zero means until an admin change.
	ValidUntil time.Time `json:"valid_until,omitzero"`
	// Recode is set when the NAR is served as zstd whatever the upstream
	// used (serve_compression): its first download re-encodes it. Until
	// the recoded file exists, NarFile and NAR are the upstream's.
	Recode bool `json:"recode,omitempty"`
	// UpstreamFile and UpstreamNAR are the upstream's file and what it must
	// be once NarFile and NAR name the recoded file: a client holding an
	// older narinfo still asks for it.
	UpstreamFile string        `json:"upstream_file,omitempty"`
	UpstreamNAR  verify.Expect `json:"upstream_nar,omitzero"`
}

// UpstreamVariant returns the name of the upstream's file and what it must
// be.
func (r *Record) UpstreamVariant() (string, verify.Expect) {
	if r.UpstreamFile != "" {
		return r.UpstreamFile, r.UpstreamNAR
	}
	return r.NarFile, r.NAR
}

// Expired reports whether the record must be decided again at now.
func (r Record) Expired(now time.Time) bool {
	return !r.ValidUntil.IsZero() && !now.Before(r.ValidUntil)
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
	// Missing is, for closure_incomplete, the references that were not
	// approved: the rebuild queue lists the rebuildable ones.
	Missing []policy.MissingRef `json:"missing,omitempty"`
	// Classification is, for attestation_mismatch, what the attester that
	// rebuilt something else said of its rebuild (policy.Classification).
	Classification string `json:"classification,omitempty"`
}

// BlobMeta indexes one verified blob on disk, with what it was verified
// against, so that serving it for a decision is a comparison of NAR
// expectations and verify-cache can check it again without its narinfo.
type BlobMeta struct {
	Size      int64         `json:"size"`
	Added     time.Time     `json:"added"`
	LastUsed  time.Time     `json:"last_used"`
	StorePath string        `json:"store_path"`
	NAR       verify.Expect `json:"nar"`
}

// DB is the bbolt file. It is safe for concurrent use.
type DB struct {
	bolt *bolt.DB
	// changes counts committed forgets in this process, so that in-memory
	// copies of records can be checked for staleness without a transaction.
	changes atomic.Uint64
	// onForget, when set, learns which decisions a committed change dropped.
	onForget func(hashes []string)
	opened   os.FileInfo // the file as opened
}

// Changes returns a number that moves on whenever stored decisions were
// dropped; a copy of a record read when it had another value may be stale.
func (d *DB) Changes() uint64 { return d.changes.Load() }

// OnForget sets a function told, after each commit that changed evidence,
// which stored decisions it dropped (possibly none), for in-memory copies
// of decisions. Call it before the DB is shared.
func (d *DB) OnForget(fn func(hashes []string)) { d.onForget = fn }

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
	st, err := os.Stat(path)
	if err != nil {
		b.Close()
		return nil, fmt.Errorf("stat state db %s: %w", path, err)
	}
	// Decisions stored in the background (PutRecordBatched) that arrive
	// within this window share one commit; nobody waits on them, so the
	// window only bounds how long a decision stays in memory alone.
	b.MaxBatchDelay = 2 * time.Millisecond
	return &DB{bolt: b, opened: st}, nil
}

// Close closes the file.
func (d *DB) Close() error { return d.bolt.Close() }

// FileInfo describes the state file as it was opened (for noticing that it
// was deleted or replaced since).
func (d *DB) FileInfo() os.FileInfo { return d.opened }

// Writable reports whether a write transaction commits (for /healthz).
func (d *DB) Writable() error {
	return d.bolt.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).Put(keyHealth, binary.BigEndian.AppendUint64(nil, uint64(time.Now().UnixNano())))
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

// PutRecord stores a decision, replacing any older one, unless the
// evidence changed since epoch (Epoch): then the decision may be stale and
// nothing is stored (stored is false); the next request decides again. An
// approved record also clears the path's rejection log entry.
func (d *DB) PutRecord(hash string, rec Record, epoch int64) (stored bool, err error) {
	return d.PutRecords(map[string]Record{hash: rec}, epoch)
}

// PutRecords is PutRecord for many decisions in one transaction.
func (d *DB) PutRecords(recs map[string]Record, epoch int64) (stored bool, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		if readCount(tx, keyEpoch) != epoch {
			return nil
		}
		stored = true
		for hash, rec := range recs {
			if err := putRecord(tx, hash, rec); err != nil {
				return err
			}
		}
		return nil
	})
	return stored, err
}

// PutRecordBatched is PutRecord for callers that do not wait on it: it
// joins concurrent calls into one commit (bbolt's Batch), so a storm of
// decisions costs one disk sync per batch instead of one each.
func (d *DB) PutRecordBatched(hash string, rec Record, epoch int64) (stored bool, err error) {
	err = d.bolt.Batch(func(tx *bolt.Tx) error {
		stored = false // Batch may run the function again, alone
		if readCount(tx, keyEpoch) != epoch {
			return nil
		}
		stored = true
		return putRecord(tx, hash, rec)
	})
	return stored, err
}

func putRecord(tx *bolt.Tx, hash string, rec Record) error {
	if rec.Approved {
		if err := clearRejection(tx, hash); err != nil {
			return err
		}
	}
	old, err := get[Record](tx, bucketRecords, hash)
	if err != nil {
		return err
	}
	if old != nil {
		if err := unindex(tx, hash, old); err != nil {
			return err
		}
	}
	if err := put(tx, bucketRecords, hash, rec); err != nil {
		return err
	}
	if err := tx.Bucket(bucketRecordNames).Put([]byte(path.Base(rec.StorePath)), rec.NAR.NarHash[:]); err != nil {
		return err
	}
	refs := tx.Bucket(bucketRecordRefs)
	for _, r := range rec.References {
		if err := refs.Put([]byte(r+"/"+hash), nil); err != nil {
			return err
		}
	}
	return nil
}

// unindex removes a record's index entries.
func unindex(tx *bolt.Tx, hash string, rec *Record) error {
	if err := tx.Bucket(bucketRecordNames).Delete([]byte(path.Base(rec.StorePath))); err != nil {
		return err
	}
	refs := tx.Bucket(bucketRecordRefs)
	for _, r := range rec.References {
		if err := refs.Delete([]byte(r + "/" + hash)); err != nil {
			return err
		}
	}
	return nil
}

// UpdateRecord changes the stored decision of hash in place when there is
// one and change reports that it changed it (the file it names, say, once
// a recoded file exists). The decision and its indexes stay as they are;
// in-memory copies read before the update are stale (Changes moves on).
func (d *DB) UpdateRecord(hash string, change func(rec *Record) bool) (updated bool, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		rec, err := get[Record](tx, bucketRecords, hash)
		if err != nil || rec == nil || !change(rec) {
			return err
		}
		updated = true
		tx.OnCommit(func() { d.changes.Add(1) })
		return put(tx, bucketRecords, hash, rec)
	})
	return updated, err
}

// Epoch returns the current evidence epoch (see PutRecord).
func (d *DB) Epoch() (n int64, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		n = readCount(tx, keyEpoch)
		return nil
	})
	return n, err
}

// SyncSettings records the digest of the decision settings (mode, policy,
// upstreams and their keys, the gatekeeper key) this start runs under, and
// reports whether an earlier start ran under other ones. Stored decisions
// are not dropped here: each carries its own digest (Record.Settings) and is
// decided again when next requested, so a restart costs no 404 and no
// stampede of upstream requests.
func (d *DB) SyncSettings(digest string) (changed bool, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		old := meta.Get(keySettings)
		if string(old) == digest {
			return nil
		}
		changed = old != nil
		return meta.Put(keySettings, []byte(digest))
	})
	return changed, err
}

// Forget drops the stored decisions of these paths, and of every path whose
// decision rests on one of them, so the next request decides again.
func (d *DB) Forget(hashes ...string) (dropped int, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		dropped, err = d.forget(tx, hashes)
		return err
	})
	return dropped, err
}

// ForgetMatching drops the stored decisions whose "<hash>-<name>" and
// NarHash match, with their dependents (a deny pattern's reach).
func (d *DB) ForgetMatching(match func(base string, narHash narinfo.SHA256) bool) (dropped int, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		dropped, err = d.forget(tx, matching(tx, match))
		return err
	})
	return dropped, err
}

// matching lists the hashes of stored decisions that match.
func matching(tx *bolt.Tx, match func(base string, narHash narinfo.SHA256) bool) []string {
	var hashes []string
	c := tx.Bucket(bucketRecordNames).Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		var nh narinfo.SHA256
		copy(nh[:], v)
		if match(string(k), nh) {
			hashes = append(hashes, string(k[:min(len(k), narinfo.HashLen)]))
		}
	}
	return hashes
}

// forget drops stored decisions, then those that rest on them, and moves
// the epoch on, so that a decision computed from evidence read before this
// change is not stored after it (PutRecord).
func (d *DB) forget(tx *bolt.Tx, hashes []string) (int, error) {
	if _, err := addCount(tx, keyEpoch, 1); err != nil {
		return 0, err
	}
	records, refs := tx.Bucket(bucketRecords), tx.Bucket(bucketRecordRefs)
	var dropped []string
	seen := map[string]bool{}
	for len(hashes) > 0 {
		h := hashes[len(hashes)-1]
		hashes = hashes[:len(hashes)-1]
		if seen[h] {
			continue
		}
		seen[h] = true
		// Dependents first: they are found through h's entries, whether or
		// not h itself still has a record.
		c := refs.Cursor()
		prefix := []byte(h + "/")
		for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
			hashes = append(hashes, string(k[len(prefix):]))
		}
		rec, err := get[Record](tx, bucketRecords, h)
		if err != nil {
			return 0, err
		}
		if rec == nil {
			continue
		}
		if err := unindex(tx, h, rec); err != nil {
			return 0, err
		}
		if err := records.Delete([]byte(h)); err != nil {
			return 0, err
		}
		dropped = append(dropped, h)
	}
	tx.OnCommit(func() {
		d.changes.Add(1)
		if d.onForget != nil {
			d.onForget(dropped)
		}
	})
	return len(dropped), nil
}

// CountRecords returns the number of stored decisions.
func (d *DB) CountRecords() (n int, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		n = tx.Bucket(bucketRecords).Stats().KeyN
		return nil
	})
	return n, err
}

// Evidence reads the evidence for one store path hash, with the epoch to
// pass to PutRecord.
func (d *DB) Evidence(hash string) (ev policy.Evidence, epoch int64, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		epoch = readCount(tx, keyEpoch)
		if ev.Attestations, err = attestationsOf(tx, hash); err != nil {
			return err
		}
		if ev.Allow, err = get[policy.AllowEntry](tx, bucketAllow, hash); err != nil {
			return err
		}
		if ev.Deny, err = list[policy.DenyEntry](tx, bucketDeny, ""); err != nil {
			return err
		}
		ev.Quarantine, err = get[policy.Quarantine](tx, bucketQuarantine, hash)
		return err
	})
	return ev, epoch, err
}

// attestationsOf reads the attestations of one store path hash.
func attestationsOf(tx *bolt.Tx, hash string) ([]policy.Attestation, error) {
	var out []policy.Attestation
	c := tx.Bucket(bucketAttestations).Cursor()
	prefix := []byte(hash + "/")
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		a, err := decodeAttestation(k, v)
		if err != nil {
			return nil, fmt.Errorf("decode %s/%s: %w", bucketAttestations, k, err)
		}
		out = append(out, a)
	}
	return out, nil
}

// PutAttestations stores verified attestations in one transaction and drops
// the stored decisions of their paths. An attestation by the same key for the
// same path replaces the older one (the attester rebuilt again). stored[i]
// is false when as[i] was already known. audit, when not nil, gains the
// stored and already_known counts and is recorded in the same transaction.
func (d *DB) PutAttestations(as []policy.Attestation, audit *AuditRecord) (stored []bool, err error) {
	bs := []AttestationBatch{{Attestations: as, Audit: audit}}
	if err := d.PutAttestationBatches(bs); err != nil {
		return nil, err
	}
	return bs[0].Stored, nil
}

// AttestationBatch is one batch of an import for PutAttestationBatches.
type AttestationBatch struct {
	Attestations []policy.Attestation
	Audit        *AuditRecord
	Stored       []bool // set on success: what PutAttestations returns
}

// PutAttestationBatches stores several batches, each as PutAttestations
// would with its own audit record, in one transaction. With a million
// attestations stored, most of a commit's cost does not grow with the
// attestations in it (the fdatasync, the branch pages every batch dirties),
// so an import whose storing falls behind stores its waiting batches
// together.
func (d *DB) PutAttestationBatches(bs []AttestationBatch) error {
	return d.update(func(tx *bolt.Tx) error {
		if _, err := countAttestations(tx, 0); err != nil { // before any change: see countAttestations
			return err
		}
		for i := range bs {
			stored, err := d.putAttestations(tx, bs[i].Attestations, bs[i].Audit)
			if err != nil {
				return err
			}
			bs[i].Stored = stored
		}
		return nil
	})
}

// putAttestations is PutAttestations inside tx.
func (d *DB) putAttestations(tx *bolt.Tx, as []policy.Attestation, audit *AuditRecord) ([]bool, error) {
	stored := make([]bool, len(as))
	// In key order, the batch's writes go to neighbouring pages.
	order := make([]int, len(as))
	keys := make([]string, len(as))
	for i, a := range as {
		order[i], keys[i] = i, narinfo.PathHash(a.StorePath)+"/"+a.PublicKey
	}
	sort.SliceStable(order, func(x, y int) bool { return keys[order[x]] < keys[order[y]] })
	b := tx.Bucket(bucketAttestations)
	// Imports insert at random places in the tree: fuller pages keep
	// the file smaller at the cost of a few more splits.
	b.FillPercent = attestFill
	var changed []string
	added := int64(0)
	for _, i := range order {
		a, key := as[i], []byte(keys[i])
		if old := b.Get(key); old != nil {
			o, err := decodeAttestation(key, old)
			if err != nil {
				return nil, fmt.Errorf("decode %s/%s: %w", bucketAttestations, key, err)
			}
			// The same signature with another report (the rebuilder
			// classified its rebuild since) replaces the older one.
			if o.Same(a) {
				audit.count(CountKnown, 1)
				continue
			}
		} else {
			added++
		}
		if err := b.Put(key, encodeAttestation(a)); err != nil {
			return nil, err
		}
		changed = append(changed, narinfo.PathHash(a.StorePath))
		stored[i] = true
		audit.count(CountStored, 1)
	}
	if len(changed) > 0 {
		if _, err := d.forget(tx, changed); err != nil {
			return nil, err
		}
	}
	if _, err := countAttestations(tx, added); err != nil {
		return nil, err
	}
	return stored, appendAudit(tx, audit)
}

// Attestations returns the stored attestations of one path (the rebuild
// queue's look-up: cheaper than Evidence, which reads the denylist too).
func (d *DB) Attestations(hash string) (out []policy.Attestation, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		out, err = attestationsOf(tx, hash)
		return err
	})
	return out, err
}

// attestFill is the attestation bucket's fill percent (bbolt's default is
// 0.5, for sequential inserts).
const attestFill = 0.9

// countAttestations adds delta to the stored count of attestations and
// returns it. A state file from before the count was kept is counted once,
// which in a write transaction must happen before it changes the bucket
// (Stats counts committed pages).
func countAttestations(tx *bolt.Tx, delta int64) (int64, error) {
	if tx.Bucket(bucketMeta).Get(keyAttestCount) == nil {
		n := int64(tx.Bucket(bucketAttestations).Stats().KeyN)
		if !tx.Writable() {
			return n, nil
		}
		if err := tx.Bucket(bucketMeta).Put(keyAttestCount, binary.BigEndian.AppendUint64(nil, uint64(n))); err != nil {
			return 0, err
		}
	}
	if delta == 0 {
		return readCount(tx, keyAttestCount), nil
	}
	return addCount(tx, keyAttestCount, delta)
}

// CountAttestations returns the number of stored attestations.
func (d *DB) CountAttestations() (n int, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		c, err := countAttestations(tx, 0)
		n = int(c)
		return err
	})
	return n, err
}

// PutAllow stores allowlist entries and forgets the decisions of their
// paths. It returns the entries it replaced, as they were; audit, when not
// nil, gains them and the added and replaced counts, and is recorded in the
// same transaction.
func (d *DB) PutAllow(entries []policy.AllowEntry, audit *AuditRecord) (replaced []policy.AllowEntry, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		replaced = nil
		hashes := make([]string, 0, len(entries))
		for _, e := range entries {
			h := narinfo.PathHash(e.StorePath)
			old, err := get[policy.AllowEntry](tx, bucketAllow, h)
			if err != nil {
				return err
			}
			if old != nil {
				replaced = append(replaced, *old)
				audit.AddPreviousAllow(*old)
				audit.count(CountReplaced, 1)
			} else {
				audit.count(CountAdded, 1)
			}
			if err := put(tx, bucketAllow, h, e); err != nil {
				return err
			}
			hashes = append(hashes, h)
		}
		if _, err := d.forget(tx, hashes); err != nil {
			return err
		}
		return appendAudit(tx, audit)
	})
	return replaced, err
}

// RemoveAllow deletes allowlist entries by hash and forgets the decisions of
// their paths; it returns the hashes that had no entry. audit, when not nil,
// gains the removed entries and the removed and missing counts, and is
// recorded in the same transaction.
func (d *DB) RemoveAllow(hashes []string, audit *AuditRecord) (missing []string, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		for _, h := range hashes {
			old, err := get[policy.AllowEntry](tx, bucketAllow, h)
			if err != nil {
				return err
			}
			if old != nil {
				audit.AddPreviousAllow(*old)
			}
		}
		missing, err = deleteKeys(tx, bucketAllow, hashes, audit, CountRemoved, CountMissing)
		if err != nil {
			return err
		}
		if _, err = d.forget(tx, hashes); err != nil {
			return err
		}
		return appendAudit(tx, audit)
	})
	return missing, err
}

// deleteKeys deletes keys from a bucket and returns those it did not hold,
// counting both in audit (as done and missing).
func deleteKeys(tx *bolt.Tx, bucket []byte, keys []string, audit *AuditRecord, done, missed string) (missing []string, err error) {
	b := tx.Bucket(bucket)
	for _, k := range keys {
		if b.Get([]byte(k)) == nil {
			missing = append(missing, k)
			continue
		}
		if err := b.Delete([]byte(k)); err != nil {
			return nil, err
		}
	}
	audit.count(done, len(keys)-len(missing))
	audit.count(missed, len(missing))
	return missing, nil
}

// AllowList returns every allowlist entry.
func (d *DB) AllowList() (out []policy.AllowEntry, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		out, err = list[policy.AllowEntry](tx, bucketAllow, "")
		return err
	})
	return out, err
}

// PutDeny stores denylist entries and forgets the stored decisions they
// match (and their dependents), in one transaction, so that no decision
// made before the entry can be served after it. audit, when not nil, gains
// the entries replaced and the added, replaced and decisions_dropped
// counts, and is recorded in the same transaction.
func (d *DB) PutDeny(entries []policy.DenyEntry, match func(base string, narHash narinfo.SHA256) bool, audit *AuditRecord) (dropped int, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		for _, e := range entries {
			old, err := get[policy.DenyEntry](tx, bucketDeny, e.Pattern)
			if err != nil {
				return err
			}
			if old != nil {
				audit.AddPreviousDeny(*old)
				audit.count(CountReplaced, 1)
			} else {
				audit.count(CountAdded, 1)
			}
			if err := put(tx, bucketDeny, e.Pattern, e); err != nil {
				return err
			}
		}
		if dropped, err = d.forget(tx, matching(tx, match)); err != nil {
			return err
		}
		audit.count(CountDropped, dropped)
		return appendAudit(tx, audit)
	})
	return dropped, err
}

// RemoveDeny deletes denylist entries and forgets the stored decisions they
// matched (report mode stores served rejections); it returns the patterns
// that had no entry. audit, when not nil, gains the removed entries and the
// removed and missing counts, and is recorded in the same transaction.
func (d *DB) RemoveDeny(patterns []string, match func(base string, narHash narinfo.SHA256) bool, audit *AuditRecord) (missing []string, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		for _, p := range patterns {
			old, err := get[policy.DenyEntry](tx, bucketDeny, p)
			if err != nil {
				return err
			}
			if old != nil {
				audit.AddPreviousDeny(*old)
			}
		}
		if missing, err = deleteKeys(tx, bucketDeny, patterns, audit, CountRemoved, CountMissing); err != nil {
			return err
		}
		if _, err = d.forget(tx, matching(tx, match)); err != nil {
			return err
		}
		return appendAudit(tx, audit)
	})
	return missing, err
}

// DenyList returns every denylist entry.
func (d *DB) DenyList() (out []policy.DenyEntry, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		out, err = list[policy.DenyEntry](tx, bucketDeny, "")
		return err
	})
	return out, err
}

// PutQuarantine marks a path nar_mismatch and drops its decision.
func (d *DB) PutQuarantine(hash string, q policy.Quarantine) error {
	return d.update(func(tx *bolt.Tx) error {
		if err := put(tx, bucketQuarantine, hash, q); err != nil {
			return err
		}
		_, err := d.forget(tx, []string{hash})
		return err
	})
}

// Quarantine returns the quarantine of one path, or nil.
func (d *DB) Quarantine(hash string) (q *policy.Quarantine, err error) {
	err = d.view(func(tx *bolt.Tx) error {
		q, err = get[policy.Quarantine](tx, bucketQuarantine, hash)
		return err
	})
	return q, err
}

// Retry lifts quarantines and forgets the paths' decisions, so the next
// request fetches again; it returns the hashes that were not quarantined.
// audit, when not nil, gains the lifted and not_quarantined counts and is
// recorded in the same transaction.
func (d *DB) Retry(hashes []string, audit *AuditRecord) (notQuarantined []string, err error) {
	err = d.update(func(tx *bolt.Tx) error {
		if notQuarantined, err = deleteKeys(tx, bucketQuarantine, hashes, audit, CountLifted, CountNotQuarantined); err != nil {
			return err
		}
		if _, err = d.forget(tx, hashes); err != nil {
			return err
		}
		return appendAudit(tx, audit)
	})
	return notQuarantined, err
}

// RecordRejection adds one refusal to the rejection log, keeping the latest
// per path and at most MaxRejections paths. A time index keeps pruning the
// oldest entry O(log n) however full the log is.
func (d *DB) RecordRejection(r Rejection) error {
	hash := narinfo.PathHash(r.StorePath)
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
