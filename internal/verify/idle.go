package verify

import (
	"sync"
	"weak"
)

// idle keeps decoders between downloads without keeping them alive: a
// decoder holds its stream's window (2 MiB for Nix's zstd, 8 MiB for its
// xz), and allocating and zeroing one per NAR cost a cold fetch a third
// of its time, but a pool that holds them (sync.Pool keeps one per CPU
// besides those in use, for two collections) made idle windows part of
// the live heap, which the collector's headroom then doubles in the
// server's peak memory. Here an idle decoder is held weakly: taken again
// if a download wants one before the next collection, freed by that
// collection otherwise. No state anyone can observe is kept: decoders are
// reset before every stream.
type idle[T any] struct {
	mu   sync.Mutex
	free []weak.Pointer[T]
}

// maxIdle bounds the list; a decoder beyond it is left to the collector.
const maxIdle = 64

// get returns an idle decoder, or nil.
func (p *idle[T]) get() *T {
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

// put offers a decoder nobody uses any more.
func (p *idle[T]) put(v *T) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) < maxIdle {
		p.free = append(p.free, weak.Make(v))
	}
}
