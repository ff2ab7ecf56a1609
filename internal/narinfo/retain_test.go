package narinfo

import (
	"runtime"
	"strings"
	"testing"
)

// A parsed narinfo keeps none of the bytes it was parsed from beyond its own
// fields: a narinfo with a multi-megabyte unknown field, once that field is
// dropped (as the gate does before storing), must not pin the whole text in
// memory through the short strings taken from it (StorePath, URL, ...).
func TestParsedFieldsDoNotPinTheText(t *testing.T) {
	const n, junk = 40, 2 << 20
	base := "StorePath: /nix/store/1lp7hj9mx5vh2qhmjsshzzqscv9sjpsq-hello-2.12\n" +
		"URL: nar/1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r.nar.xz\n" +
		"Compression: xz\n" +
		"NarHash: sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r\n" +
		"NarSize: 226560\n" +
		"References: 1lp7hj9mx5vh2qhmjsshzzqscv9sjpsq-hello-2.12\n" +
		"Sig: cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\n"
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	kept := make([]*NarInfo, 0, n)
	for i := 0; i < n; i++ {
		text := []byte(base + "X-Junk: " + strings.Repeat("j", junk) + "\n")
		ni, err := Parse(text, "/nix/store")
		if err != nil {
			t.Fatal(err)
		}
		ni.Extra = nil
		kept = append(kept, ni)
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	if grown > n*junk/8 {
		t.Errorf("%d parsed narinfos whose %d-byte unknown field was dropped still hold %d bytes of heap: their fields pin the text", n, junk, grown)
	}
	runtime.KeepAlive(kept)
}
