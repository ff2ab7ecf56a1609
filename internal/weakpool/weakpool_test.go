package weakpool

import (
	"runtime"
	"testing"
)

type big struct{ b [1 << 20]byte }

// An idle object is reused until a collection, and freed by it: the pool
// keeps nothing alive.
func TestReusedUntilCollected(t *testing.T) {
	var p Pool[big]
	if p.Get() != nil {
		t.Fatal("Get of an empty pool returned an object")
	}
	v := new(big)
	p.Put(v)
	if got := p.Get(); got != v {
		t.Fatalf("Get after Put returned %p, want %p", got, v)
	}
	if p.Get() != nil {
		t.Fatal("an object was returned twice")
	}
	p.Put(v)
	v = nil
	runtime.GC()
	runtime.GC()
	if got := p.Get(); got != nil {
		t.Fatal("an idle object survived two collections: the pool keeps it alive")
	}
}

// The list is bounded: a flood of Puts does not grow it without end.
func TestBounded(t *testing.T) {
	var p Pool[big]
	keep := make([]*big, 0, maxIdle+10)
	for range maxIdle + 10 {
		v := new(big)
		keep = append(keep, v)
		p.Put(v)
	}
	n := 0
	for p.Get() != nil {
		n++
	}
	if n != maxIdle {
		t.Fatalf("%d objects came back, want %d", n, maxIdle)
	}
	runtime.KeepAlive(keep)
}
