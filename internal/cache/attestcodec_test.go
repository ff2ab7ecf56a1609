package cache

import (
	"encoding/json"
	"math/rand"
	"reflect"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// The binary form gives back exactly what was stored, whatever the names
// and signatures look like, and values stored as JSON by earlier versions
// are still read.
func TestAttestationCodec(t *testing.T) {
	const pub = "rebuilder-1:MU9sQMoEW0Gx8W9EiqE3tqDOVBIkOe/rJzCdSUH1uRk="
	sig := "rebuilder-1:" + "Qm9ndXMgc2lnbmF0dXJlIGJ5dGVzIGZvciB0aGUgdGVzdCwgc2l4dHktZm91ciBieXRlcyBsb25nLCAhIQ=="
	base := policy.Attestation{StorePath: "/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1",
		NarHash: narinfo.SumSHA256([]byte("x")), NarSize: 123456,
		References: []string{"5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1", "icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0"},
		Deriver:    "9aqyj5c0ljbzs0c3a2dqqmcb1zm0vrfm-app-0.1.drv", KeyName: "rebuilder-1", PublicKey: pub, Sig: sig,
		Imported: time.Unix(1700000000, 123).UTC()}
	odd := base
	odd.References = []string{"not-a-hash-name", "EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE-upper"}
	odd.Deriver = ""
	odd.Sig = "rebuilder-1:not base64 at all"
	other := base
	other.References = nil
	other.Sig = "someone-else:" + sig[len("rebuilder-1:"):]
	key := []byte("5r8cswd6jchqkwx3dn2xapsahpjxj0js/" + pub)
	for name, a := range map[string]policy.Attestation{"typical": base, "odd names": odd, "other signer": other} {
		v := encodeAttestation(a)
		got, err := decodeAttestation(key, v)
		if err != nil || !reflect.DeepEqual(got, a) {
			t.Errorf("%s: round trip\n got %+v (%v)\nwant %+v", name, got, err, a)
		}
		for i := range v {
			if _, err := decodeAttestation(key, v[:i]); err == nil {
				t.Errorf("%s: truncated to %d bytes, decoded without error", name, i)
			}
		}
	}
	legacy, _ := json.Marshal(base)
	got, err := decodeAttestation(key, legacy)
	if err != nil || !reflect.DeepEqual(got, base) {
		t.Errorf("JSON value: %+v %v", got, err)
	}
	if n := len(encodeAttestation(base)); n*10 >= len(legacy)*6 {
		t.Errorf("binary form %d bytes, JSON %d", n, len(legacy))
	}
}

// decodeNix32Hash must agree with go-nix's decoder and its round trip, on
// valid hashes and on strings with a character outside the alphabet.
func TestDecodeNix32Hash(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for range 2000 {
		var raw [20]byte
		rng.Read(raw[:])
		s := []byte(nixbase32.EncodeToString(raw[:]))
		if rng.Intn(4) == 0 {
			s[rng.Intn(len(s))] = byte(rng.Intn(256))
		}
		want, err := nixbase32.DecodeString(string(s))
		wantOK := err == nil && len(want) == 20 && nixbase32.EncodeToString(want) == string(s)
		got, ok := decodeNix32Hash(string(s))
		if ok != wantOK || ok && string(got[:]) != string(want) {
			t.Fatalf("%q: got %x %v, want %x %v", s, got, ok, want, wantOK)
		}
	}
	if _, ok := decodeNix32Hash("0"); ok {
		t.Fatal("a short string decoded")
	}
}
