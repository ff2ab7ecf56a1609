package narinfo

// Test fixtures in testdata/ were made with real Nix 2.8 (not needed at test time):
//
//	nix-build x.nix / y.nix        leaf-1.0, app-0.1 (-> leaf), zz-2.0, multi-0.2 (-> zz, app, itself),
//	                               trivial derivations built with builder=/bin/sh, no nixpkgs
//	nix-store --generate-binary-cache-key k-1 k.sec k.pub        -> testdata/k-1.pub
//	nix store sign --key-file k.sec -r <paths>                   -> the Sig lines
//	nix-store --add-fixed --recursive sha256|sha512 DIR          -> *-cadir   (fixed:r:sha256, fixed:r:sha512)
//	nix-store --add-fixed sha256|sha1 FILE                       -> *-flat.txt (fixed:sha256, fixed:sha1)
//	nix-store --add FILE                                         -> *-src.txt (fixed:r:sha256, "source")
//	builtins.toFile (nix-instantiate --read-write-mode --eval)   -> hello.txt, dep.txt, withref.txt (text, with a reference)
//	fixed-output derivations (outputHashMode flat / recursive sha1) -> fo-flat, fo-r512
//	__contentAddressed derivations (--extra-experimental-features ca-derivations)
//	                               -> cadr-1.0 (fixed:r:sha256 + a reference), cad-1.0 (+ a self-reference)
//	nix copy --to file:///tmp/x <paths>                          -> testdata/*.narinfo, byte for byte
//	nix path-info --json <CA paths>                              -> testdata/ca-pathinfo.json

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const storeDir = "/nix/store"

func readNarinfos(t testing.TB) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob("testdata/*.narinfo")
	if err != nil || len(files) == 0 {
		t.Fatalf("no narinfo fixtures: %v", err)
	}
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(f)] = b
	}
	return out
}

func mustParse(t testing.TB, b []byte) *NarInfo {
	t.Helper()
	n, err := Parse(b, storeDir)
	if err != nil {
		t.Fatalf("Parse: %v\n%s", err, b)
	}
	return n
}

func TestHashForms(t *testing.T) {
	// One sha256 digest in every form Nix prints (values from `nix hash to-base16/to-base32`).
	want := "sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r"
	for _, in := range []string{
		"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I=",
		"sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r",
		"sha256:f9f8dd12bd202b279be5a9e987f5953a6da6f1ff506b59211670975e9384e7d2",
		"sha256:F9F8DD12BD202B279BE5A9E987F5953A6DA6F1FF506B59211670975E9384E7D2",
		"sha256:+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I=",
	} {
		got, err := NormalizeHash(in)
		if err != nil || got != want {
			t.Errorf("NormalizeHash(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	// Other algorithms, cross-checked with nix and md5sum.
	for in, want := range map[string]string{
		"sha1:0b726d2cc565a6391d918ed39e75d088fb0cba6f":                                                   "sha1:dyx0ryw8s1srxlwfj4fkk9k5qln6swhb",
		"md5:5d41402abc4b2a76b9719d911017c592":                                                            "md5:4jqlbi14cxf6wpcajbphm40hax",
		"sha512-fkorVPZTOgpQy/UQWtdq9noDtEedzjAWQ8O5/knkPdnywYvJOOX16oOwqVLSKa2hWOBNxPdMAt/MKFdysaUwFg==": "sha512:0b319dif9bjik6z096ggi2dw1ca3b99s99akc43xbsyaf69ig0z5n9xwi4zxff38cb31klx8ys06ypndbbml47mrd80lfjkyra2njky",
	} {
		got, err := NormalizeHash(in)
		if err != nil || got != want {
			t.Errorf("NormalizeHash(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{
		"", "sha256", "1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r", // no algo
		"sha257:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r", // unknown algo
		"sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7",  // short
		"sha256:elp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r", // 'e' not in alphabet
		"sha256:zlp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r", // bits beyond 256
		"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I",          // unpadded SRI
		"sha256:g9f8dd12bd202b279be5a9e987f5953a6da6f1ff506b59211670975e9384e7d2",
		"sha1-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I=", // SRI size mismatch
	} {
		if _, _, err := ParseHash(bad); err == nil {
			t.Errorf("ParseHash(%q) succeeded", bad)
		}
	}
}

func TestSHA256RoundTrip(t *testing.T) {
	want := SumSHA256([]byte("hello"))
	for _, form := range []string{want.String(), "sha256:" + hex.EncodeToString(want[:]),
		"sha256-" + base64.StdEncoding.EncodeToString(want[:])} {
		got, err := ParseSHA256(form)
		if err != nil || got != want {
			t.Errorf("ParseSHA256(%q) = %v, %v", form, got, err)
		}
		var u SHA256
		if err := u.UnmarshalText([]byte(form)); err != nil || u != want {
			t.Errorf("UnmarshalText(%q) = %v, %v", form, u, err)
		}
	}
	if _, err := ParseSHA256("sha1:" + strings.Repeat("0", 40)); err == nil {
		t.Error("sha1 accepted as SHA256")
	}
	var z SHA256
	if z.String() != "" || !z.IsZero() {
		t.Errorf("zero SHA256 renders %q", z.String())
	}
}

func TestCompressionList(t *testing.T) {
	for _, c := range Compressions() {
		if !c.Supported() {
			t.Errorf("%s not supported", c)
		}
	}
	if Compression("lzip").Supported() || CompressionZstd.Ext() != ".zst" || CompressionNone.Ext() != "" {
		t.Error("compression table wrong")
	}
}

func TestStorePaths(t *testing.T) {
	p, err := ParseStorePath("/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1", storeDir)
	if err != nil {
		t.Fatal(err)
	}
	if p.Hash != "5r8cswd6jchqkwx3dn2xapsahpjxj0js" || p.Name != "app-0.1" || p.Dir != storeDir ||
		p.String() != "/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1" || p.Base() != "5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1" {
		t.Errorf("parsed %+v", p)
	}
	okNames := []string{"a", "foo-1.0+git_x?y=z", "X." + strings.Repeat("n", MaxNameLen-2)}
	for _, n := range okNames {
		if _, _, err := ParseBaseName("5r8cswd6jchqkwx3dn2xapsahpjxj0js-" + n); err != nil {
			t.Errorf("name %q rejected: %v", n, err)
		}
	}
	bad := map[string]string{
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-":                                     "too short",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-.hidden":                              "starts with '.'",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a b":                                  "illegal character",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a/b":                                  "not directly",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0je-app":                                  "hash part",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0j-app":                                   "hash part",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js_app":                                  "no '-'",
		"/gnu/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app":                                  "not in store dir",
		"/nix/store2/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app":                                 "not in store dir",
		"/nix/store/../store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app":                         "not directly",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-" + strings.Repeat("n", MaxNameLen+1): "longer",
	}
	for in, want := range bad {
		_, err := ParseStorePath(in, storeDir)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseStorePath(%q) = %v, want error containing %q", in, err, want)
		}
	}
	if _, err := ParseStorePath("/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app", "/nix/store/"); err == nil {
		t.Error("store dir with trailing slash accepted")
	}
	if !ValidHash("5r8cswd6jchqkwx3dn2xapsahpjxj0js") || ValidHash("5r8cswd6jchqkwx3dn2xapsahpjxj0jt") || ValidHash("abc") {
		t.Error("ValidHash wrong")
	}
}

// Real narinfos written by `nix copy` must parse, and Marshal must reproduce them byte
// for byte (Nix writes References and Sigs sorted, and we keep file order).
func TestRealNarinfosRoundTrip(t *testing.T) {
	for name, b := range readNarinfos(t) {
		n := mustParse(t, b)
		if got := n.Marshal(); string(got) != string(b) {
			t.Errorf("%s: Marshal differs from Nix's file:\n--- nix\n%s--- ours\n%s", name, b, got)
		}
		if n.Compression != "xz" || n.FileHash.IsZero() || n.FileSize == 0 {
			t.Errorf("%s: parsed %+v", name, n)
		}
	}
	n := mustParse(t, readNarinfos(t)["5r8cswd6jchqkwx3dn2xapsahpjxj0js.narinfo"])
	want := &NarInfo{
		StorePath:   "/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1",
		URL:         "nar/0wvswvibsavla94qjnbvbn87zclvwpshacwg2agb9l5xhhqr9h6l.nar.xz",
		Compression: "xz",
		FileHash:    mustSHA256("sha256:0wvswvibsavla94qjnbvbn87zclvwpshacwg2agb9l5xhhqr9h6l"),
		FileSize:    220,
		NarHash:     mustSHA256("sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r"),
		NarSize:     504,
		References:  []string{"icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0"},
		Deriver:     "k7zrq5kfqjigrllvszzh5qyr2yw2qrvp-app-0.1.drv",
		Sigs:        []string{"k-1:Yfle+PjNdrs5hnWQLIxcYk0FKlQmG13z7U2XK3UCh4pR789L6ubyoKT7T5Jod4ZUPxrXAJvm7khHAlmi9NRtBQ=="},
	}
	if !reflect.DeepEqual(n, want) {
		t.Errorf("parsed\n%+v\nwant\n%+v", n, want)
	}
}

func TestParseLenientForms(t *testing.T) {
	in := "StorePath: /nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1\n" +
		"URL: nar/x.nar\n" +
		"NarHash: sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I=\n" +
		"NarSize: 504\n" +
		"References:  icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0   3jz64a65vnhvn9vz6f13s5899fn7px9p-zz-2.0\n" +
		"Deriver: unknown-deriver\n" +
		"System: x86_64-linux\n" +
		"Future-Key: some value: with colons\n" +
		"X-Nocolon-Space:value\n" +
		"Sig: \n" +
		"\n" +
		"CA: " // no final newline
	n := mustParse(t, []byte(in))
	if n.Compression != "bzip2" {
		t.Errorf("Compression = %q, want Nix's default bzip2", n.Compression)
	}
	if n.NarHash.String() != "sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r" {
		t.Errorf("NarHash not normalized: %q", n.NarHash)
	}
	if !reflect.DeepEqual(n.References, []string{"icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0", "3jz64a65vnhvn9vz6f13s5899fn7px9p-zz-2.0"}) {
		t.Errorf("References = %q (want file order)", n.References)
	}
	if n.Deriver != "" || n.System != "x86_64-linux" || n.Sigs != nil || n.CA != "" || !n.FileHash.IsZero() || n.FileSize != 0 {
		t.Errorf("parsed %+v", n)
	}
	wantExtra := []Field{{"Future-Key", "some value: with colons"}, {"X-Nocolon-Space", "value"}}
	if !reflect.DeepEqual(n.Extra, wantExtra) {
		t.Errorf("Extra = %q", n.Extra)
	}
	n2 := mustParse(t, n.Marshal())
	if !reflect.DeepEqual(n, n2) {
		t.Errorf("round trip:\n%+v\n%+v", n, n2)
	}
}

func TestParseErrorsNameTheKey(t *testing.T) {
	good := map[string]string{
		"StorePath": "/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1",
		"URL":       "nar/x.nar.xz",
		"NarHash":   "sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r",
		"NarSize":   "504",
	}
	order := []string{"StorePath", "URL", "NarHash", "NarSize"}
	build := func(override map[string]string, drop string) []byte {
		var b strings.Builder
		for _, k := range order {
			if k == drop {
				continue
			}
			v := good[k]
			if o, ok := override[k]; ok {
				v = o
			}
			b.WriteString(k + ": " + v + "\n")
		}
		for _, k := range []string{"FileHash", "FileSize", "References", "Deriver", "CA"} {
			if o, ok := override[k]; ok {
				b.WriteString(k + ": " + o + "\n")
			}
		}
		return []byte(b.String())
	}
	if _, err := Parse(build(nil, ""), storeDir); err != nil {
		t.Fatalf("baseline: %v", err)
	}
	cases := []struct {
		name string
		in   []byte
		key  string
	}{
		{"missing StorePath", build(nil, "StorePath"), "StorePath"},
		{"missing URL", build(nil, "URL"), "URL"},
		{"missing NarHash", build(nil, "NarHash"), "NarHash"},
		{"missing NarSize", build(nil, "NarSize"), "NarSize"},
		{"zero NarSize", build(map[string]string{"NarSize": "0"}, ""), "NarSize"},
		{"bad NarSize", build(map[string]string{"NarSize": "12a"}, ""), "NarSize"},
		{"negative NarSize", build(map[string]string{"NarSize": "-1"}, ""), "NarSize"},
		{"huge NarSize", build(map[string]string{"NarSize": "99999999999999999999"}, ""), "NarSize"},
		{"bad FileSize", build(map[string]string{"FileSize": "x"}, ""), "FileSize"},
		{"bad NarHash", build(map[string]string{"NarHash": "sha256:zzz"}, ""), "NarHash"},
		{"unprefixed NarHash", build(map[string]string{"NarHash": "1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r"}, ""), "NarHash"},
		{"sha1 NarHash", build(map[string]string{"NarHash": "sha1:dyx0ryw8s1srxlwfj4fkk9k5qln6swhb"}, ""), "NarHash"},
		{"bad FileHash", build(map[string]string{"FileHash": "md5:x"}, ""), "FileHash"},
		{"path outside store", build(map[string]string{"StorePath": "/gnu/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1"}, ""), "StorePath"},
		{"path not a store path", build(map[string]string{"StorePath": "/nix/store/app"}, ""), "StorePath"},
		{"bad reference", build(map[string]string{"References": "icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0 not-a-path"}, ""), "References"},
		{"absolute reference", build(map[string]string{"References": "/nix/store/icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0"}, ""), "References"},
		{"bad deriver", build(map[string]string{"Deriver": "/nix/store/k7zrq5kfqjigrllvszzh5qyr2yw2qrvp-app-0.1.drv"}, ""), "Deriver"},
		{"bad CA", build(map[string]string{"CA": "fixed:sha256:nothash"}, ""), "CA"},
		{"unknown CA method", build(map[string]string{"CA": "magic:sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r"}, ""), "CA"},
		{"duplicate StorePath", append(build(nil, ""), "StorePath: /nix/store/icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0\n"...), "StorePath"},
		{"no space after colon", []byte(strings.Replace(string(build(nil, "")), "NarSize: ", "NarSize:", 1)), "NarSize"},
	}
	for _, c := range cases {
		_, err := Parse(c.in, storeDir)
		var fe *FieldError
		if err == nil || !errors.As(err, &fe) || fe.Key != c.key || !strings.Contains(err.Error(), c.key) {
			t.Errorf("%s: err = %v, want a FieldError for key %s", c.name, err, c.key)
		}
	}
	if _, err := Parse([]byte("garbage without colon\n"), storeDir); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("line without colon: %v", err)
	}
	if _, err := Parse(build(nil, ""), "/nix/store/"); err == nil {
		t.Error("bad store dir accepted")
	}
	// Another store dir: the narinfo is for a different store.
	if _, err := Parse(build(nil, ""), "/gnu/store"); err == nil {
		t.Error("narinfo for /nix/store accepted with store dir /gnu/store")
	}
}

func readPubKey(t *testing.T) (string, ed25519.PublicKey) {
	t.Helper()
	b, err := os.ReadFile("testdata/k-1.pub")
	if err != nil {
		t.Fatal(err)
	}
	name, k, ok := strings.Cut(strings.TrimSpace(string(b)), ":")
	if !ok {
		t.Fatal("bad key file")
	}
	raw, err := base64.StdEncoding.DecodeString(k)
	if err != nil || len(raw) != ed25519.PublicKeySize {
		t.Fatalf("bad key: %v", err)
	}
	return name, ed25519.PublicKey(raw)
}

func verifySig(t *testing.T, keyName string, pub ed25519.PublicKey, fp, sig string) bool {
	t.Helper()
	name, s, ok := strings.Cut(sig, ":")
	if !ok || name != keyName {
		return false
	}
	raw, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return false
	}
	return ed25519.Verify(pub, []byte(fp), raw)
}

// The Sig lines were made by `nix store sign` with the key in testdata/k-1.pub, so
// they verify exactly when Fingerprint reproduces Nix's fingerprint.
func TestFingerprintVerifiesNixSignatures(t *testing.T) {
	keyName, pub := readPubKey(t)
	signed := 0
	for name, b := range readNarinfos(t) {
		n := mustParse(t, b)
		if len(n.Sigs) == 0 {
			continue
		}
		signed++
		fp, err := n.Fingerprint(storeDir)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !verifySig(t, keyName, pub, fp, n.Sigs[0]) {
			t.Errorf("%s: Nix's signature does not verify over %q", name, fp)
		}
	}
	if signed < 4 {
		t.Fatalf("only %d signed fixtures", signed)
	}

	// multi-0.2 references three paths including itself; an upstream that lists
	// them in another order (or twice) must yield the same fingerprint.
	n := mustParse(t, readNarinfos(t)["s0bmwrafr6ifsvggrjysjiyrazggwpk5.narinfo"])
	n.References = []string{n.References[2], n.References[0], n.References[1], n.References[0]}
	fp, err := n.Fingerprint(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	want := "1;/nix/store/s0bmwrafr6ifsvggrjysjiyrazggwpk5-multi-0.2;sha256:0zd0ggjcp05v06p0whnyl3621jiwi5iql5qfwa63s03jfq81vr34;440;" +
		"/nix/store/3jz64a65vnhvn9vz6f13s5899fn7px9p-zz-2.0,/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1,/nix/store/s0bmwrafr6ifsvggrjysjiyrazggwpk5-multi-0.2"
	if fp != want {
		t.Errorf("fingerprint\n%s\nwant\n%s", fp, want)
	}
	if !verifySig(t, keyName, pub, fp, n.Sigs[0]) {
		t.Error("signature does not verify after reordering references")
	}
	// Any other NarHash form gives the same fingerprint; tampering breaks the signature.
	fp2, err := Fingerprint(storeDir, n.StorePath, mustSHA256("sha256-ZOQdEHZyAD2M4g4XimOJPMogzKDeQg6uAbuAy+R7oH0="), n.NarSize, n.References)
	if err != nil || fp2 != want {
		t.Errorf("SRI NarHash: %q, %v", fp2, err)
	}
	fp3, _ := Fingerprint(storeDir, n.StorePath, n.NarHash, n.NarSize+1, n.References)
	if verifySig(t, keyName, pub, fp3, n.Sigs[0]) {
		t.Error("signature verifies over a tampered NarSize")
	}
	if _, err := Fingerprint(storeDir, n.StorePath, SHA256{}, 1, nil); err == nil {
		t.Error("missing NarHash accepted")
	}
	if _, err := Fingerprint(storeDir, n.StorePath, n.NarHash, 0, nil); err == nil {
		t.Error("zero NarSize accepted")
	}
	if _, err := Fingerprint(storeDir, n.StorePath, n.NarHash, 1, []string{"/nix/store/3jz64a65vnhvn9vz6f13s5899fn7px9p-zz-2.0"}); err == nil {
		t.Error("absolute reference accepted")
	}
	if fp, _ := Fingerprint(storeDir, "/nix/store/icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0",
		mustSHA256("sha256:0l1v2mjy9ivhn9njfz2szzh7whr0vj02cysj0xhng9mdi3zfcnpa"), 120, nil); fp != "1;/nix/store/icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0;sha256:0l1v2mjy9ivhn9njfz2szzh7whr0vj02cysj0xhng9mdi3zfcnpa;120;" {
		t.Errorf("no-reference fingerprint %q", fp)
	}
}

func TestVerifyCARealPaths(t *testing.T) {
	proven := map[string]string{
		"321dz3ryzh8vh3szdxr3hkdliy3w7l2j.narinfo": "nix-store --add (source)",
		"zz66l43f14bs1l1sgx3a5i4dghp5a4mj.narinfo": "--add-fixed --recursive sha256",
		"60x3lqvfwr4n3sbh4gwkxzwwfr2jmhcz.narinfo": "--add-fixed --recursive sha512",
		"rbjs35s89dr6d7mr7b87a3x9b4lwm4r7.narinfo": "--add-fixed sha256 (flat)",
		"2xi67wiim3qmdm8ihijca90xd6l8q2rp.narinfo": "--add-fixed sha1 (flat)",
		"wwxsp5alchk49n52d6k8bl3578zd72b7.narinfo": "fixed-output derivation, flat sha256",
		"ivzyb461mca72aazjqbwbkyr9vyaf828.narinfo": "fixed-output derivation, recursive sha1",
		"y25hsnq1kd1hjmsvvhp24bygpai69li3.narinfo": "builtins.toFile",
		"fars50mlfk67nyzn0mc86b8gwbai49jr.narinfo": "builtins.toFile",
		"xq1m3brilpi5pb4kvgkailwbirkhf8ck.narinfo": "builtins.toFile with a reference",
		"96rlw6vxj6m9b4y0x8psdp117zd7x9hi.narinfo": "CA derivation with a reference",
	}
	all := readNarinfos(t)
	for file, what := range proven {
		n := mustParse(t, all[file])
		if err := VerifyCA(n, storeDir); err != nil {
			t.Errorf("%s (%s): %v", file, what, err)
		}
	}
	for file, b := range all {
		n := mustParse(t, b)
		if _, ok := proven[file]; ok || n.CA != "" {
			continue
		}
		if err := VerifyCA(n, storeDir); err == nil || !strings.Contains(err.Error(), "no CA") {
			t.Errorf("%s: input-addressed path: %v", file, err)
		}
	}

	// cad-1.0 references itself. Its path is provable (type "source:<ref>:self"), but
	// Nix hashes a self-referencing CA output modulo its own hash, so NarHash is not
	// the CA hash and rule 7 must refuse it.
	cad := mustParse(t, all["6s1v37aypwrakzsirgl6j3r4hj4956x9.narinfo"])
	c, err := ParseCA(cad.CA)
	if err != nil {
		t.Fatal(err)
	}
	sp, _ := ParseStorePath(cad.StorePath, storeDir)
	if got, err := StorePathFromCA(storeDir, c, sp.Name, cad.References, sp.Base()); err != nil || got != cad.StorePath {
		t.Errorf("self-referencing path: computed %q, %v", got, err)
	}
	if err := VerifyCA(cad, storeDir); err == nil || !strings.Contains(err.Error(), "NarHash") {
		t.Errorf("self-referencing CA path: %v, want NarHash mismatch", err)
	}

	// Tampering: every input of the path computation matters.
	tamper := func(file string, f func(n *NarInfo)) error {
		n := mustParse(t, all[file])
		f(n)
		return VerifyCA(n, storeDir)
	}
	if err := tamper("xq1m3brilpi5pb4kvgkailwbirkhf8ck.narinfo", func(n *NarInfo) { n.References = nil }); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("dropped reference: %v", err)
	}
	if err := tamper("zz66l43f14bs1l1sgx3a5i4dghp5a4mj.narinfo", func(n *NarInfo) {
		n.References = []string{"icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0"}
	}); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("added reference: %v", err)
	}
	if err := tamper("zz66l43f14bs1l1sgx3a5i4dghp5a4mj.narinfo", func(n *NarInfo) {
		n.NarHash = mustSHA256("sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r")
	}); err == nil || !strings.Contains(err.Error(), "NarHash") {
		t.Errorf("other NarHash: %v", err)
	}
	if err := tamper("rbjs35s89dr6d7mr7b87a3x9b4lwm4r7.narinfo", func(n *NarInfo) {
		n.StorePath = strings.Replace(n.StorePath, "flat.txt", "flat2.txt", 1)
	}); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("renamed: %v", err)
	}
	if err := tamper("rbjs35s89dr6d7mr7b87a3x9b4lwm4r7.narinfo", func(n *NarInfo) {
		n.CA = strings.Replace(n.CA, "fixed:", "fixed:r:", 1)
	}); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("flat claimed recursive: %v", err)
	}
	if err := tamper("2xi67wiim3qmdm8ihijca90xd6l8q2rp.narinfo", func(n *NarInfo) {
		n.References = []string{"icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0"}
	}); err == nil || !strings.Contains(err.Error(), "cannot have references") {
		t.Errorf("flat sha1 with references: %v", err)
	}
	if err := tamper("y25hsnq1kd1hjmsvvhp24bygpai69li3.narinfo", func(n *NarInfo) {
		n.References = []string{"y25hsnq1kd1hjmsvvhp24bygpai69li3-hello.txt"}
	}); err == nil || !strings.Contains(err.Error(), "itself") {
		t.Errorf("text self-reference: %v", err)
	}
	if err := tamper("y25hsnq1kd1hjmsvvhp24bygpai69li3.narinfo", func(n *NarInfo) {
		n.CA = "fixed:git:sha1:dyx0ryw8s1srxlwfj4fkk9k5qln6swhb"
	}); err == nil || !strings.Contains(err.Error(), "not supported") {
		t.Errorf("git CA: %v", err)
	}
	if err := tamper("y25hsnq1kd1hjmsvvhp24bygpai69li3.narinfo", func(n *NarInfo) { n.CA = "magic:x" }); err == nil {
		t.Error("unknown CA method accepted")
	}
}

// The CA strings `nix path-info --json` printed agree with ParseCA/String, and the
// path-info NarHash forms agree with the narinfos.
func TestCAPathInfoFixture(t *testing.T) {
	b, err := os.ReadFile("testdata/ca-pathinfo.json")
	if err != nil {
		t.Fatal(err)
	}
	var infos []struct {
		Path, NarHash, CA string
		Valid             *bool
	}
	if err := json.Unmarshal(b, &infos); err != nil {
		t.Fatal(err)
	}
	all := readNarinfos(t)
	checked := 0
	for _, pi := range infos {
		if pi.Valid != nil && !*pi.Valid {
			continue
		}
		c, err := ParseCA(pi.CA)
		if err != nil {
			t.Fatalf("%s: %v", pi.Path, err)
		}
		if c.String() != pi.CA {
			t.Errorf("CA %q renders as %q", pi.CA, c.String())
		}
		sp, _ := ParseStorePath(pi.Path, storeDir)
		n := mustParse(t, all[sp.Hash+".narinfo"])
		if h, _ := ParseSHA256(pi.NarHash); h != n.NarHash {
			t.Errorf("%s: path-info NarHash %s, narinfo %s", pi.Path, h, n.NarHash)
		}
		checked++
	}
	if checked < 4 {
		t.Fatalf("checked only %d", checked)
	}
}

func FuzzParse(f *testing.F) {
	for _, b := range readNarinfos(f) {
		f.Add(b)
	}
	f.Add([]byte("StorePath: /nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-a\nURL: u\nNarHash: sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r\nNarSize: 1\nX:\n:y\nSig: \nCompression:"))
	f.Fuzz(func(t *testing.T, data []byte) {
		n, err := Parse(data, storeDir)
		if err != nil {
			return
		}
		out := n.Marshal()
		n2, err := Parse(out, storeDir)
		if err != nil {
			t.Fatalf("Parse(Marshal(n)) failed: %v\n%q", err, out)
		}
		if !reflect.DeepEqual(n, n2) {
			t.Fatalf("round trip differs:\n%#v\n%#v", n, n2)
		}
		if string(n2.Marshal()) != string(out) {
			t.Fatalf("Marshal not stable")
		}
		_, _ = n.Fingerprint(storeDir)
		_ = VerifyCA(n, storeDir)
	})
}

func mustSHA256(s string) SHA256 {
	h, err := ParseSHA256(s)
	if err != nil {
		panic(err)
	}
	return h
}
