//go:build !liblzma

package verify

import (
	"io"

	"github.com/therootcompany/xz"
)

// fuzzXZReader is FuzzVerifier's reference xz decoder: the library the
// build decodes with, read directly (a fresh reader, not the pool).
func fuzzXZReader(src io.Reader) (io.Reader, func(), error) {
	r, err := xz.NewReader(src, maxXZDict)
	return r, func() {}, err
}

// benchXZCodecs are the xz decoders in this build, for BenchmarkXZDecoder.
var benchXZCodecs = []struct {
	name string
	c    codec
}{{"go", goXZCodec}}
