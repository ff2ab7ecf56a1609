// Package weakpool keeps big reusable objects (decoders and encoders with
// their windows) between uses without keeping them alive.
//
// sync.Pool holds what it is given strongly: one object per CPU besides
// those in use, and a victim generation for a collection, all of it live
// heap that the collector's headroom (GOGC) then doubles in the process's
// peak memory. A Pool here holds idle objects through weak pointers: one
// taken again before the next collection is reused, one that is not is
// freed by that collection. Objects must carry no state a later user
// could observe (callers reset them before every use).
package weakpool

import (
	"sync"
	"weak"
)

// maxIdle bounds the list; an object offered beyond it is left to the
// collector.
const maxIdle = 64

// Pool is a list of idle objects of type T. The zero value is empty and
// ready to use.
type Pool[T any] struct {
	mu   sync.Mutex
	free []weak.Pointer[T]
}

// Get returns an idle object, or nil when there is none (left).
func (p *Pool[T]) Get() *T {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.free) > 0 {
		w := p.free[len(p.free)-1]
		p.free = p.free[:len(p.free)-1]
		if v := w.Value(); v != nil {
			return v
		}
	}
	return nil
}

// Put offers an object nobody uses any more.
func (p *Pool[T]) Put(v *T) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) < maxIdle {
		p.free = append(p.free, weak.Make(v))
	}
}
