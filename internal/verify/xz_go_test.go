//go:build !liblzma

package verify

// benchXZCodecs are the xz decoders in this build, for BenchmarkXZDecoder.
var benchXZCodecs = []struct {
	name string
	c    codec
}{{"go", goXZCodec}}
