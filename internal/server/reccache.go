package server

import (
	"sync"

	"github.com/cacheproxy/cacheproxy/internal/cache"
)

// maxHotRecords bounds the in-memory copies of stored narinfo records
// (about 1 KiB each).
const maxHotRecords = 65536

// hotRecords keeps recently served records in memory: a narinfo hit is the
// hottest request a fleet makes, and reading and decoding the record from
// bbolt each time costs most of it. An entry is valid only while the DB has
// dropped no decision since it was read (cache.DB.Changes), so every admin
// change or quarantine invalidates all copies at once; expiry and mode are
// checked on every use by the caller, as for records read from disk.
type hotRecords struct {
	mu sync.RWMutex
	m  map[string]hotRecord
}

type hotRecord struct {
	rec     *cache.Record
	changes uint64
}

func newHotRecords() *hotRecords { return &hotRecords{m: map[string]hotRecord{}} }

// get returns the copy of hash's record if it is still current.
func (h *hotRecords) get(hash string, changes uint64) *cache.Record {
	h.mu.RLock()
	e, ok := h.m[hash]
	h.mu.RUnlock()
	if !ok || e.changes != changes {
		return nil
	}
	return e.rec
}

// put remembers rec as read when the DB's change count was changes (read
// before the record, so that a change racing the read invalidates it).
func (h *hotRecords) put(hash string, rec *cache.Record, changes uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.m) >= maxHotRecords {
		for k := range h.m { // drop an arbitrary tenth; map order is random
			delete(h.m, k)
			if len(h.m) < maxHotRecords*9/10 {
				break
			}
		}
	}
	h.m[hash] = hotRecord{rec: rec, changes: changes}
}
