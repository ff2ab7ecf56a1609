package gate

import (
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// What a download's decoder takes of the decoding budget: small NARs
// little, big ones a core's slot, and a streamed zstd NAR (whose window is
// allocated in full at once) a whole slot.
func TestDecodeMemory(t *testing.T) {
	for _, tc := range []struct {
		c    narinfo.Compression
		size uint64
		want int64
	}{
		{narinfo.CompressionNone, 100 << 20, 0},
		{narinfo.CompressionXZ, 4096, 4096},
		{narinfo.CompressionXZ, 3 << 20, 3 << 20},
		{narinfo.CompressionXZ, 100 << 20, decodeSlot},
		{narinfo.CompressionZstd, 4096, 4096},
		{narinfo.CompressionZstd, 1 << 20, 1 << 20},
		{narinfo.CompressionZstd, 1<<20 + 1, decodeSlot},
		{narinfo.CompressionZstd, 100 << 20, decodeSlot},
		{narinfo.CompressionBzip2, 100 << 20, decodeSlot},
	} {
		if got := decodeMemory(verify.Expect{Compression: tc.c, NarSize: tc.size}); got != tc.want {
			t.Errorf("decodeMemory(%s, NarSize %d) = %d, want %d", tc.c, tc.size, got, tc.want)
		}
	}
}
