package narinfo

// Native fuzz targets (go test -fuzz). Plain `go test` replays the f.Add seeds
// and testdata/fuzz/<FuzzName>/ on every run; to fuzz one target:
//
//	go test -run XXX -fuzz '^FuzzNarinfo$' -fuzztime 3m -parallel 1 ./internal/narinfo/
//
// (FuzzParse in narinfo_test.go is the older, smaller round-trip target; these
// check more invariants and cover the store-path, hash and CA parsers.)

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// fuzzStrict turns known, reported bugs back into failures (see the
// crashers-*.txt files next to testdata/fuzz/<FuzzName>/).
var fuzzStrict = os.Getenv("CACHEPROXY_FUZZ_STRICT") != ""

// fuzzStoreDirs are the store dirs the fuzz targets choose from by an index
// byte: the real one, Guix's, a short one and a deep one, so that inputs built
// around one store dir also meet the others.
var fuzzStoreDirs = []string{"/nix/store", "/gnu/store", "/s", "/var/lib/nix/store"}

func fuzzStoreDir(i uint8) string { return fuzzStoreDirs[int(i)%len(fuzzStoreDirs)] }

// fuzzNarinfoSeeds returns real narinfos from this and sibling packages'
// testdata (read only), each blank-line-separated block on its own.
func fuzzNarinfoSeeds(f *testing.F) [][]byte {
	var out [][]byte
	for _, pat := range []string{
		"testdata/*.narinfo",
		"../cache/testdata/*.narinfo",
		"../verify/testdata/cache-*/*.narinfo",
		"../attest/testdata/*.narinfo",
	} {
		files, _ := filepath.Glob(pat)
		for _, name := range files {
			b, err := os.ReadFile(name)
			if err != nil {
				f.Fatal(err)
			}
			for _, block := range bytes.Split(b, []byte("\n\n")) {
				if len(bytes.TrimSpace(block)) > 0 {
					out = append(out, append(bytes.TrimRight(block, "\n"), '\n'))
				}
			}
		}
	}
	if len(out) == 0 {
		f.Fatal("no narinfo seeds found")
	}
	return out
}

// FuzzNarinfo: Parse never panics; what it accepts satisfies every documented
// field invariant; Marshal round-trips (the promise on Marshal: Parse(n.Marshal())
// equals n) and is stable; Fingerprint and VerifyCA never panic, and
// Fingerprint succeeds whenever NarHash is present.
func FuzzNarinfo(f *testing.F) {
	for _, b := range fuzzNarinfoSeeds(f) {
		f.Add(b, uint8(0))
	}
	// Lenient forms the parser documents, and some near misses.
	for _, s := range []string{
		"StorePath: /nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1\nURL: nar/x.nar\n" +
			"NarHash: sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I=\nNarSize: 504\n" +
			"References:  icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0   3jz64a65vnhvn9vz6f13s5899fn7px9p-zz-2.0\n" +
			"Deriver: unknown-deriver\nSystem: x86_64-linux\nFuture-Key: some value: with colons\n" +
			"X-Nocolon-Space:value\nSig: \n\nCA: ",
		"StorePath: /gnu/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a\nURL: u\nCompression: zstd\n" +
			"FileHash: sha256:f9f8dd12bd202b279be5a9e987f5953a6da6f1ff506b59211670975e9384e7d2\nFileSize: 0\n" +
			"NarHash: sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r\nNarSize: 00001\n" +
			"References: 5r8cswd6jchqkwx3dn2xapsahpjxj0js-a\nSig: k:x\nSig: k:x\n:\n: \n",
		"StorePath: /nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a\nURL: u\n" +
			"NarHash: sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r\nNarSize: 18446744073709551615\n" +
			"CA: text:sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r\n",
		"StorePath: /nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a\nURL: u\n" +
			"NarHash: sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r\nNarSize: 1\n" +
			"CA: fixed:git:sha1:0b726d2cc565a6391d918ed39e75d088fb0cba6f\nNarHash: sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r\n",
	} {
		f.Add([]byte(s), uint8(0))
		f.Add([]byte(s), uint8(1))
	}
	f.Fuzz(func(t *testing.T, data []byte, sdi uint8) {
		sd := fuzzStoreDir(sdi)
		n, err := Parse(data, sd)
		if err != nil {
			if n != nil {
				t.Fatalf("Parse returned a narinfo and an error: %v", err)
			}
			return
		}
		fuzzCheckNarinfo(t, n, sd)
		if n.NarHash.IsZero() {
			// Known bug (testdata/fuzz/crashers-FuzzNarinfo.txt): Parse accepts an
			// all-zero NarHash, which NarInfo treats as absent, so Marshal writes
			// "NarHash: " and Parse(n.Marshal()) fails. Tolerated unless
			// CACHEPROXY_FUZZ_STRICT is set, so that fuzzing can look further.
			if fuzzStrict {
				t.Fatalf("Parse accepted an all-zero NarHash (the zero SHA256 means absent): Marshal gives\n%q", n.Marshal())
			}
			_, _ = n.Fingerprint(sd)
			_ = VerifyCA(n, sd)
			return
		}

		out := n.Marshal()
		n2, err := Parse(out, sd)
		if err != nil {
			t.Fatalf("Parse(Marshal(n)) failed: %v\ninput:\n%q\nmarshaled:\n%q", err, data, out)
		}
		if !reflect.DeepEqual(n, n2) {
			t.Fatalf("Parse(Marshal(n)) != n:\n%#v\n%#v\nmarshaled:\n%q", n, n2, out)
		}
		if out2 := n2.Marshal(); !bytes.Equal(out, out2) {
			t.Fatalf("Marshal not stable:\n%q\n%q", out, out2)
		}

		fp, err := n.Fingerprint(sd)
		switch {
		case err != nil && !n.NarHash.IsZero():
			// StorePath, NarSize and References were all checked by Parse,
			// so only a missing NarHash may stop the fingerprint.
			t.Fatalf("Fingerprint of a parsed narinfo failed: %v", err)
		case err == nil:
			if want := "1;" + n.StorePath + ";" + n.NarHash.String() + ";"; !strings.HasPrefix(fp, want) {
				t.Fatalf("fingerprint %q does not start with %q", fp, want)
			}
			// Reference order and duplicates must not change it (std::set in Nix).
			rev := slices.Clone(n.References)
			slices.Reverse(rev)
			rev = append(rev, rev...)
			fp2, err := Fingerprint(sd, n.StorePath, n.NarHash, n.NarSize, rev)
			if err != nil || fp2 != fp {
				t.Fatalf("fingerprint depends on reference order: %q vs %q (%v)", fp, fp2, err)
			}
		}

		if err := VerifyCA(n, sd); err == nil {
			fuzzCheckCAProof(t, n, sd)
		}
		// A narinfo never verifies against another store dir's paths.
		if other := fuzzStoreDir(sdi + 1); other != sd {
			if err := VerifyCA(n, other); err == nil {
				t.Fatalf("VerifyCA accepted %s under store dir %s", n.StorePath, other)
			}
		}
	})
}

// fuzzCheckNarinfo checks the field invariants Parse documents.
func fuzzCheckNarinfo(t *testing.T, n *NarInfo, sd string) {
	t.Helper()
	if _, err := ParseStorePath(n.StorePath, sd); err != nil {
		t.Fatalf("parsed StorePath %q is invalid: %v", n.StorePath, err)
	}
	if n.URL == "" || n.NarSize == 0 || n.Compression == "" {
		t.Fatalf("parsed narinfo misses a required field: %#v", n)
	}
	if !n.FileHash.IsZero() && n.FileHash.String() == "" {
		t.Fatal("non-zero FileHash renders empty")
	}
	for _, r := range n.References {
		if _, _, err := ParseBaseName(r); err != nil {
			t.Fatalf("parsed reference %q is invalid: %v", r, err)
		}
	}
	if n.References != nil && len(n.References) == 0 {
		t.Fatal("References is empty but not nil")
	}
	if n.Deriver != "" {
		if _, _, err := ParseBaseName(n.Deriver); err != nil {
			t.Fatalf("parsed Deriver %q is invalid: %v", n.Deriver, err)
		}
	}
	if n.Sigs != nil && len(n.Sigs) == 0 || slices.Contains(n.Sigs, "") {
		t.Fatalf("bad Sigs %q", n.Sigs)
	}
	if n.Extra != nil && len(n.Extra) == 0 {
		t.Fatal("Extra is empty but not nil")
	}
	for _, x := range n.Extra {
		if singleKey(x.Key) || x.Key == "Sig" || strings.ContainsAny(x.Key, ":\n") || strings.Contains(x.Value, "\n") {
			t.Fatalf("bad Extra field %q", x)
		}
	}
	if n.CA != "" {
		if _, err := ParseCA(n.CA); err != nil {
			t.Fatalf("parsed CA %q does not parse: %v", n.CA, err)
		}
	}
	for _, s := range []string{n.URL, string(n.Compression), n.System, n.CA} {
		if strings.Contains(s, "\n") {
			t.Fatalf("field value with newline: %q", s)
		}
	}
}

// fuzzCheckCAProof re-derives what VerifyCA claims to have proven.
func fuzzCheckCAProof(t *testing.T, n *NarInfo, sd string) {
	t.Helper()
	c, err := ParseCA(n.CA)
	if err != nil {
		t.Fatalf("VerifyCA accepted unparsable CA %q", n.CA)
	}
	sp, err := ParseStorePath(n.StorePath, sd)
	if err != nil {
		t.Fatalf("VerifyCA accepted invalid store path %q", n.StorePath)
	}
	got, err := StorePathFromCA(sd, c, sp.Name, n.References, sp.Base())
	if err != nil || got != n.StorePath {
		t.Fatalf("VerifyCA accepted %s but the CA gives %q (%v)", n.StorePath, got, err)
	}
	if c.Method == CANar && c.Algo == "sha256" && !bytes.Equal(c.Digest, n.NarHash[:]) {
		t.Fatalf("VerifyCA accepted fixed:r:sha256 with NarHash %s != CA", n.NarHash)
	}
	if c.Method == CAText && slices.Contains(n.References, sp.Base()) {
		t.Fatal("VerifyCA accepted a self-referencing text path")
	}
}

// FuzzStorePath: ParseStorePath, ParseBaseName and ValidHash never panic and
// agree with each other; what they accept re-renders to the input; ValidHash
// agrees with go-nix's nix32 decoder; MakeStorePath output always parses.
func FuzzStorePath(f *testing.F) {
	for _, s := range []string{
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1",
		"/nix/store/96rlw6vxj6m9b4y0x8psdp117zd7x9hi-cadr-1.0",
		"/nix/store/ags2i7v0a0jgw615r99p2iywfyb8r6sb-cadr-1.0.drv",
		"/gnu/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-foo-1.0+git_x?y=z",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-.hidden",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a/b",
		"/nix/store/../store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js_app",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0je-app",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-" + strings.Repeat("n", MaxNameLen),
		"5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1",
		"5r8cswd6jchqkwx3dn2xapsahpjxj0js",
	} {
		f.Add(s, "/nix/store")
	}
	f.Add("/gnu/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a", "/gnu/store")
	f.Add("//5r8cswd6jchqkwx3dn2xapsahpjxj0js-a", "/")
	f.Add("/nix/store//5r8cswd6jchqkwx3dn2xapsahpjxj0js-a", "/nix/store/")
	f.Add("/x/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a", "x")
	f.Fuzz(func(t *testing.T, s, sd string) {
		p, err := ParseStorePath(s, sd)
		if err == nil {
			if CheckStoreDir(sd) != nil {
				t.Fatalf("ParseStorePath accepted %q in bad store dir %q", s, sd)
			}
			if p.String() != s || p.Dir != sd || p.Base() != s[len(sd)+1:] {
				t.Fatalf("ParseStorePath(%q, %q) = %+v does not re-render", s, sd, p)
			}
			if !ValidHash(p.Hash) || len(p.Name) == 0 || len(p.Name) > MaxNameLen {
				t.Fatalf("ParseStorePath(%q) = %+v", s, p)
			}
		}
		h, name, berr := ParseBaseName(s)
		if berr == nil {
			if h+"-"+name != s || !ValidHash(h) || validName(name) != nil {
				t.Fatalf("ParseBaseName(%q) = %q, %q", s, h, name)
			}
			if strings.ContainsAny(s, "/") {
				t.Fatalf("ParseBaseName accepted %q with a slash", s)
			}
		}
		// The two parsers agree: an absolute path parses iff its basename does.
		if CheckStoreDir(sd) == nil && strings.HasPrefix(s, sd+"/") {
			base := s[len(sd)+1:]
			_, _, e2 := ParseBaseName(base)
			if (err == nil) != (e2 == nil && !strings.Contains(base, "/")) {
				t.Fatalf("ParseStorePath(%q, %q) = %v but ParseBaseName(%q) = %v", s, sd, err, base, e2)
			}
		}
		// ValidHash against an independent check: 32 chars that nixbase32 decodes.
		for _, c := range []string{s, s[:min(len(s), HashLen)]} {
			_, derr := nixbase32.DecodeString(c)
			if want := len(c) == HashLen && derr == nil; ValidHash(c) != want {
				t.Fatalf("ValidHash(%q) = %v, nixbase32 says %v", c, ValidHash(c), want)
			}
		}
		// A computed store path is always a valid one.
		if CheckStoreDir(sd) == nil && validName(s) == nil {
			mp := MakeStorePath(sd, "text", []byte(s), s)
			if q, err := ParseStorePath(mp, sd); err != nil || q.Name != s {
				t.Fatalf("MakeStorePath(%q, %q) = %q does not parse: %v", sd, s, mp, err)
			}
		}
	})
}

// FuzzHash: ParseHash, ParseSHA256, ParseTypedHash, NormalizeHash and ParseCA
// never panic; digests have the algorithm's size; every accepted spelling
// normalizes to one that parses back to the same digest; SHA256 String and
// Parse (and MarshalText/UnmarshalText) round-trip, in every encoding.
func FuzzHash(f *testing.F) {
	for _, s := range []string{
		"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I=",
		"sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r",
		"sha256:f9f8dd12bd202b279be5a9e987f5953a6da6f1ff506b59211670975e9384e7d2",
		"sha256:F9F8DD12BD202B279BE5A9E987F5953A6DA6F1FF506B59211670975E9384E7D2",
		"sha256:+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I=",
		"sha1:0b726d2cc565a6391d918ed39e75d088fb0cba6f",
		"md5:5d41402abc4b2a76b9719d911017c592",
		"md5:4jqlbi14cxf6wpcajbphm40hax",
		"sha512-fkorVPZTOgpQy/UQWtdq9noDtEedzjAWQ8O5/knkPdnywYvJOOX16oOwqVLSKa2hWOBNxPdMAt/MKFdysaUwFg==",
		"sha512:0b319dif9bjik6z096ggi2dw1ca3b99s99akc43xbsyaf69ig0z5n9xwi4zxff38cb31klx8ys06ypndbbml47mrd80lfjkyra2njky",
		"sha256:zlp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r",
		"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I",
		"sha256:" + strings.Repeat("0", 52),
		"fixed:r:sha256:0zbg67yzxisacpdaj93kd9d1wvnlkvj0crskij6pqcv9jpcyl89q",
		"fixed:sha1:dyx0ryw8s1srxlwfj4fkk9k5qln6swhb",
		"fixed:r:sha512:0b319dif9bjik6z096ggi2dw1ca3b99s99akc43xbsyaf69ig0z5n9xwi4zxff38cb31klx8ys06ypndbbml47mrd80lfjkyra2njky",
		"text:sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r",
		"text:sha1:0b726d2cc565a6391d918ed39e75d088fb0cba6f",
		"fixed:git:sha1:0b726d2cc565a6391d918ed39e75d088fb0cba6f",
		"fixed:r:sha256:f9f8dd12bd202b279be5a9e987f5953a6da6f1ff506b59211670975e9384e7d2",
	} {
		f.Add(s, "sha256")
	}
	f.Add("1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r", "sha256")
	f.Add("dyx0ryw8s1srxlwfj4fkk9k5qln6swhb", "sha1")
	f.Add("sha1-C3JtLMVlpjkdkY7Tnl3QiPsMum8=", "sha1")
	f.Add("XUFAKrxLKna5cZ2REBfFkg==", "md5")
	f.Fuzz(func(t *testing.T, s, algo string) {
		a, d, err := ParseHash(s)
		if err == nil {
			if algoSize(a) == 0 || len(d) != algoSize(a) {
				t.Fatalf("ParseHash(%q) = %q with %d bytes", s, a, len(d))
			}
			norm := FormatHash(a, d)
			for _, form := range []string{norm, a + ":" + hex.EncodeToString(d), a + "-" + base64.StdEncoding.EncodeToString(d), a + ":" + base64.StdEncoding.EncodeToString(d)} {
				a2, d2, err := ParseHash(form)
				if err != nil || a2 != a || !bytes.Equal(d2, d) {
					t.Fatalf("ParseHash(%q) (re-encoding of %q) = %q, %x, %v", form, s, a2, d2, err)
				}
			}
			if n, err := NormalizeHash(s); err != nil || n != norm {
				t.Fatalf("NormalizeHash(%q) = %q, %v; want %q", s, n, err, norm)
			}
			if d3, err := ParseTypedHash(s, a); err != nil || !bytes.Equal(d3, d) {
				t.Fatalf("ParseTypedHash(%q, %q) = %x, %v; ParseHash gave %x", s, a, d3, err, d)
			}
		} else if _, err2 := NormalizeHash(s); err2 == nil {
			t.Fatalf("NormalizeHash(%q) accepted what ParseHash refused (%v)", s, err)
		}

		h, err := ParseSHA256(s)
		if (err == nil) != (a == "sha256") {
			t.Fatalf("ParseSHA256(%q) = %v, ParseHash algo %q", s, err, a)
		}
		if err == nil {
			if !bytes.Equal(h[:], d) {
				t.Fatalf("ParseSHA256(%q) = %x, ParseHash %x", s, h[:], d)
			}
			fuzzCheckSHA256(t, h)
		}

		if d, err := ParseTypedHash(s, algo); err == nil {
			if len(d) != algoSize(algo) {
				t.Fatalf("ParseTypedHash(%q, %q) gave %d bytes", s, algo, len(d))
			}
			if d2, err := ParseTypedHash(FormatHash(algo, d), algo); err != nil || !bytes.Equal(d, d2) {
				t.Fatalf("ParseTypedHash round trip of %q: %x vs %x (%v)", s, d, d2, err)
			}
			if d2, err := ParseTypedHash(nixbase32.EncodeToString(d), algo); err != nil || !bytes.Equal(d, d2) {
				t.Fatalf("ParseTypedHash of bare nix32 of %q: %x vs %x (%v)", s, d, d2, err)
			}
		}

		// Raw bytes as a SHA256: String/Parse round trip for any value.
		if len(s) >= 32 {
			fuzzCheckSHA256(t, SHA256([]byte(s[:32])))
		}

		if c, err := ParseCA(s); err == nil {
			if len(c.Digest) != algoSize(c.Algo) {
				t.Fatalf("ParseCA(%q) digest has %d bytes", s, len(c.Digest))
			}
			if c.Method == CAText && c.Algo != "sha256" {
				t.Fatalf("ParseCA(%q) accepted text with %s", s, c.Algo)
			}
			str := c.String()
			c2, err := ParseCA(str)
			if err != nil || !reflect.DeepEqual(c, c2) {
				t.Fatalf("ParseCA(%q).String() = %q parses to %+v, %v", s, str, c2, err)
			}
			if c2.String() != str {
				t.Fatalf("CA String not stable: %q vs %q", str, c2.String())
			}
			// StorePathFromCA never panics on what ParseCA accepts.
			_, _ = StorePathFromCA("/nix/store", c, "x", nil, "")
		}
	})
}

func fuzzCheckSHA256(t *testing.T, h SHA256) {
	t.Helper()
	if h.IsZero() {
		if h.String() != "" {
			t.Fatalf("zero hash renders %q", h.String())
		}
		return
	}
	for _, form := range []string{h.String(), "sha256:" + hex.EncodeToString(h[:]), "sha256-" + base64.StdEncoding.EncodeToString(h[:])} {
		h2, err := ParseSHA256(form)
		if err != nil || h2 != h {
			t.Fatalf("ParseSHA256(%q) = %x, %v; want %x", form, h2[:], err, h[:])
		}
	}
	if h.String() != "sha256:"+h.Nix32() {
		t.Fatalf("String %q vs Nix32 %q", h.String(), h.Nix32())
	}
	txt, err := h.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	var u SHA256
	if err := u.UnmarshalText(txt); err != nil || u != h {
		t.Fatalf("UnmarshalText(%q) = %x, %v", txt, u[:], err)
	}
}

// FuzzVerifyCA builds narinfos that are content-addressed by construction
// (store path computed with StorePathFromCA from a fuzzed method, hash, name
// and references) and checks that VerifyCA accepts them, and refuses them once
// the name, a reference or (for fixed:r:sha256) the NarHash changes.
func FuzzVerifyCA(f *testing.F) {
	const leaf = "icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0"
	const zz = "3jz64a65vnhvn9vz6f13s5899fn7px9p-zz-2.0"
	d32 := bytes.Repeat([]byte{0xab}, 32)
	f.Add(uint8(0), uint8(2), d32, "hello.txt", leaf, false, uint8(0))
	f.Add(uint8(2), uint8(2), d32, "cadr-1.0", leaf, false, uint8(0))
	f.Add(uint8(2), uint8(2), d32, "cad-1.0", leaf+" "+zz, true, uint8(1))
	f.Add(uint8(1), uint8(1), d32[:20], "flat.txt", "", false, uint8(2))
	f.Add(uint8(2), uint8(3), append(d32, d32...), "cadir", "", false, uint8(0))
	f.Add(uint8(1), uint8(2), d32, "fo-flat", "", false, uint8(3))
	f.Add(uint8(3), uint8(2), d32, "git-tree", "", false, uint8(0))
	f.Fuzz(func(t *testing.T, method, algoi uint8, digest []byte, name, refList string, self bool, sdi uint8) {
		methods := []string{CAText, CAFlat, CANar, CAGit}
		algos := []string{"md5", "sha1", "sha256", "sha512"}
		c := CA{Method: methods[int(method)%len(methods)], Algo: algos[int(algoi)%len(algos)]}
		size := algoSize(c.Algo)
		if len(digest) < size {
			return
		}
		c.Digest = digest[:size]
		if _, err := ParseCA(c.String()); err != nil {
			return // e.g. text with sha1: not a content address Nix makes
		}
		if validName(name) != nil {
			return
		}
		sd := fuzzStoreDir(sdi)
		refs := strings.Fields(refList)
		const selfMarker = "self"
		in := slices.Clone(refs)
		if self {
			in = append(in, selfMarker)
		}
		if slices.Contains(refs, selfMarker) {
			return
		}
		p, err := StorePathFromCA(sd, c, name, in, selfMarker)
		if err != nil {
			return // invalid reference, or references where Nix allows none
		}
		sp, err := ParseStorePath(p, sd)
		if err != nil || sp.Name != name {
			t.Fatalf("StorePathFromCA gave unparsable %q: %v", p, err)
		}
		n := &NarInfo{StorePath: p, URL: "u", Compression: CompressionXZ, NarSize: 1, References: slices.Clone(refs), CA: c.String()}
		if self {
			n.References = append(n.References, sp.Base())
		}
		copy(n.NarHash[:], bytes.Repeat([]byte{1}, 32))
		if c.Method == CANar && c.Algo == "sha256" {
			copy(n.NarHash[:], c.Digest)
		}
		err = VerifyCA(n, sd)
		if c.Method == CAGit {
			if err == nil {
				t.Fatal("VerifyCA accepted a git content address")
			}
			return
		}
		if err != nil {
			t.Fatalf("VerifyCA refused a path built from its CA: %v\n%#v", err, n)
		}
		// The narinfo survives the text form too.
		n2, err := Parse(n.Marshal(), sd)
		if err != nil {
			t.Fatalf("constructed narinfo does not parse: %v\n%s", err, n.Marshal())
		}
		if err := VerifyCA(n2, sd); err != nil {
			t.Fatalf("VerifyCA after round trip: %v", err)
		}

		// Anything that changes the computed path must be refused.
		bad := *n
		bad.StorePath = p + "x"
		if len(name) < MaxNameLen && VerifyCA(&bad, sd) == nil {
			t.Fatal("VerifyCA accepted a different name")
		}
		bad = *n
		bad.References = append(slices.Clone(n.References), "00000000000000000000000000000000-extra")
		if VerifyCA(&bad, sd) == nil {
			t.Fatal("VerifyCA accepted an extra reference")
		}
		bad = *n
		bad.CA = CA{Method: c.Method, Algo: c.Algo, Digest: fuzzFlip(c.Digest)}.String()
		if VerifyCA(&bad, sd) == nil {
			t.Fatal("VerifyCA accepted a different CA hash")
		}
		if c.Method == CANar && c.Algo == "sha256" {
			bad = *n
			bad.NarHash[0] ^= 1
			if VerifyCA(&bad, sd) == nil {
				t.Fatal("VerifyCA accepted fixed:r:sha256 with a different NarHash")
			}
		}
	})
}

func fuzzFlip(b []byte) []byte {
	out := slices.Clone(b)
	out[len(out)-1] ^= 1
	return out
}
