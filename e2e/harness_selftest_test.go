package e2e

// Self-tests of the harness against a plain upstream cache, without
// cacheproxy: they prove that fixtures, signing, tampering and the client
// work, so a failure elsewhere is about cacheproxy.

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"strings"
	"testing"
)

var codecs = []string{"xz", "zstd", "bzip2", "none", "br"}

func TestHarnessUpstreamDirect(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{})
	for _, codec := range codecs {
		t.Run(codec, func(t *testing.T) {
			t.Parallel()
			up := newUpstream(t, upKey)
			up.Publish(t, codec, c.App)
			for _, p := range c.Paths() {
				ni := up.Narinfo(t, p)
				if got := ni.Get("Compression"); got != codec {
					t.Errorf("%s: Compression %q, want %q", p.Name(), got, codec)
				}
				sigs := ni.GetAll("Sig")
				if len(sigs) != 1 || !verifySig(upKey.Pub, ni.Fingerprint(), sigs[0]) {
					t.Errorf("%s: want exactly one valid up-1 Sig, got %v", p.Name(), sigs)
				}
				f, err := os.ReadFile(up.NarFile(t, p))
				if err != nil {
					t.Fatal(err)
				}
				if got := sha256Nix32(f); got != ni.Get("FileHash") {
					t.Errorf("%s: sha256 of NAR file %s, narinfo FileHash %s", p.Name(), got, ni.Get("FileHash"))
				}
			}
			cl := newClient(t)
			cl.MustSubstitute(t, up.URL, upKey.Pub, c.App)
			assertSameTree(t, string(c.App), cl.Path(c.App))
			assertSameTree(t, string(c.Leaf), cl.Path(c.Leaf))
			if n := up.NarCount(); n != 2 {
				t.Errorf("upstream saw %d NAR requests, want 2", n)
			}

			// A client that trusts another key refuses the same cache.
			out, err := newClient(t).Substitute(t, up.URL, rb1Key.Pub, c.App)
			if err == nil || !strings.Contains(out, "is not signed by any of the keys in 'trusted-public-keys'") {
				t.Errorf("client trusting the wrong key: err=%v, output:\n%s", err, out)
			}
		})
	}
}

// Go-side signatures equal Nix's (ed25519 is deterministic), so crafted
// narinfos are indistinguishable from ones nix copy signed.
func TestHarnessGoSigningMatchesNix(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{})
	up := newUpstream(t, upKey)
	up.Publish(t, "none", c.App)
	for _, p := range c.Paths() {
		ni := up.Narinfo(t, p)
		if got, want := upKey.Sign(ni.Fingerprint()), ni.Get("Sig"); got != want {
			t.Errorf("%s: Go signature %s, nix signature %s (fingerprint %q)", p.Name(), got, want, ni.Fingerprint())
		}
		f, _ := os.ReadFile(up.NarFile(t, p))
		if sha256Nix32(f) != ni.Get("NarHash") {
			t.Errorf("%s: uncompressed NAR hash %s != NarHash %s", p.Name(), sha256Nix32(f), ni.Get("NarHash"))
		}
	}
}

// The attestation file holds only the rebuilder's signature, the signature
// verifies over the upstream fingerprint, and a later Publish still puts
// only the upstream key into the narinfo.
func TestHarnessAttestationFile(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{})
	up := newUpstream(t, upKey)
	up.Publish(t, "zstd", c.App)
	f := attestFile(t, rb1Key, c.Paths()...)
	attestFile(t, rb2Key, c.Paths()...) // a second key in the local DB must not leak into the first file
	b, _ := os.ReadFile(f)
	var infos []struct {
		Path       string   `json:"path"`
		NarHash    string   `json:"narHash"`
		NarSize    int64    `json:"narSize"`
		References []string `json:"references"`
		Signatures []string `json:"signatures"`
	}
	if err := json.Unmarshal(b, &infos); err != nil || len(infos) != 2 {
		t.Fatalf("attestation file: %v\n%s", err, b)
	}
	for _, info := range infos {
		ni := up.Narinfo(t, StorePath(info.Path))
		if len(info.Signatures) != 1 || !verifySig(rb1Key.Pub, ni.Fingerprint(), info.Signatures[0]) {
			t.Errorf("%s: attestation sigs %v do not verify over upstream fingerprint %q", info.Path, info.Signatures, ni.Fingerprint())
		}
		if !strings.HasPrefix(info.NarHash, "sha256-") {
			t.Errorf("Nix 2.8 path-info narHash expected in SRI form, got %q", info.NarHash)
		}
	}
	up2 := newUpstream(t, upKey)
	up2.Publish(t, "none", c.App)
	for _, p := range c.Paths() {
		if sigs := up2.Narinfo(t, p).GetAll("Sig"); len(sigs) != 1 || !strings.HasPrefix(sigs[0], "up-1:") {
			t.Errorf("re-published %s carries %v, want only up-1", p.Name(), sigs)
		}
	}
	// craftAttestation signs like nix store sign does.
	cf := craftAttestation(t, rb1Key, up.Narinfo(t, c.Leaf))
	cb, _ := os.ReadFile(cf)
	if !strings.Contains(string(cb), infos[0].Signatures[0]) && !strings.Contains(string(cb), infos[1].Signatures[0]) {
		t.Errorf("crafted attestation %s does not carry the nix-made signature", cb)
	}
}

// The Nix client itself catches a swapped NAR when talking to a cache
// directly; this documents its error message.
func TestHarnessTamperDirect(t *testing.T) {
	t.Parallel()
	c := buildClosure(t, ClosureOpts{})
	up := newUpstream(t, upKey)
	up.Publish(t, "none", c.App)
	tamperNar(t, up, c.Leaf, true)
	out, err := newClient(t).Substitute(t, up.URL, upKey.Pub, c.App)
	if err == nil || !strings.Contains(out, "hash mismatch importing path") {
		t.Errorf("want client failure with 'hash mismatch importing path', got err=%v\n%s", err, out)
	}
	t.Logf("client output on swapped NAR:\n%s", out)
}

func TestHarnessNix32(t *testing.T) {
	t.Parallel()
	const h = "1gsnlnhnbdpjmbr6blif75851as5qsh6f6v7iflkh2nqsb5r39xw"
	want := strings.TrimSpace(runNix(t, "nix", "hash", "to-base16", "sha256:"+h))
	if got := hex.EncodeToString(nix32Decode(t, h)); got != want {
		t.Errorf("nix32Decode: %s, nix says %s", got, want)
	}
	if got := nix32(nix32Decode(t, h)); got != h {
		t.Errorf("nix32 round trip: %s != %s", got, h)
	}
}
