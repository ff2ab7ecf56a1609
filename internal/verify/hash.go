package verify

import (
	"hash"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// sum is the SHA-256 digest a hasher holds.
func sum(h hash.Hash) narinfo.SHA256 {
	var d narinfo.SHA256
	h.Sum(d[:0])
	return d
}
