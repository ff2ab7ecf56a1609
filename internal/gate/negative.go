package gate

import (
	"sync"
	"time"
)

// negCache remembers, for a short while, that a path is rejected or in no
// upstream, so that a flood of requests for missing or refused paths is not
// a flood upstream. Any change of evidence clears it (see Gate.evidenceChanged),
// and only outcomes of a completed round are kept: a round in which an
// upstream failed is not an answer about the path.
type negCache struct {
	ttl time.Duration

	mu sync.Mutex
	m  map[string]negEntry
}

type negEntry struct {
	out     outcome
	expires time.Time
}

// maxNegEntries bounds the cache; rejections carry a parsed narinfo, a few
// KiB at most.
const maxNegEntries = 16384

func newNegCache(ttl time.Duration) *negCache {
	return &negCache{ttl: ttl, m: map[string]negEntry{}}
}

func (c *negCache) get(hash string, now time.Time) (outcome, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ttl <= 0 {
		return outcome{}, false
	}
	e, ok := c.m[hash]
	if !ok || !now.Before(e.expires) {
		return outcome{}, false
	}
	return e.out, true
}

// put keeps out unless the evidence changed since before (see hotRecords.put).
func (c *negCache) put(hash string, out outcome, now time.Time, before uint64, current func() uint64) {
	if out.rec != nil || out.unavailable != nil || (out.decision != nil && out.decision.Approved) {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ttl <= 0 || current() != before {
		return
	}
	if len(c.m) >= maxNegEntries {
		for k, e := range c.m {
			if !now.Before(e.expires) || len(c.m) >= maxNegEntries {
				delete(c.m, k)
			}
		}
	}
	c.m[hash] = negEntry{out: out, expires: now.Add(c.ttl)}
}

// reset forgets everything and remembers for ttl from now on.
func (c *negCache) reset(ttl time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ttl = ttl
	clear(c.m)
}

func (c *negCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.m)
}
