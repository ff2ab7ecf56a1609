package attest

// Fixtures in testdata/:
//
//	nix-2.8-array.json          real `nix path-info --json --sigs -r` (Nix 2.8) of a small closure
//	                            (leaf-1.0, app-0.1, zz-2.0, multi-0.2, and the CA derivation output
//	                            cadr-1.0), signed with `nix store sign --key-file k.sec` (key: k-1.pub)
//	nix-2.8-array-invalid.json  real Nix 2.8 output including {"path": ..., "valid": false} entries
//	closure.narinfo             the same paths' narinfos from `nix copy --to file://`, blank-line separated
//	nix-2.19-object.json        the object form keyed by store path (Nix 2.19-2.32), in the shape the
//	                            Nix manual documents (store-object-info v1), built from the real values
//	                            above; narHash spelled as SRI, sha256:nix32 and sha256:base16; one null
//	                            (invalid path) entry
//	nix-2.33-format2.json       `--json-format 2` (Nix >= 2.33) in the shape of the Nix manual and
//	                            Nix's own test data (src/libstore-tests/data/path-info/json-2,
//	                            libutil-tests/data/hash): {"version":2,"storeDir":..,"info":{<basename>:..}},
//	                            basenames in references/deriver, narHash as {"algorithm","format","hash"}
//	                            objects (base16, nix32, base64, sri) or an SRI string, ca as
//	                            {"method","hash"}, one signature as {"keyName","sig"}; one null entry
//
// The JSON variants were generated from nix-2.8-array.json by a short script, so the
// signatures in them are real and must verify against k-1.pub.

import (
	"crypto/ed25519"
	"encoding/base64"
	"io"
	"os"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

const storeDir = "/nix/store"

// mustSHA256 parses a hash literal of the test.
func mustSHA256(s string) narinfo.SHA256 {
	h, err := narinfo.ParseSHA256(s)
	if err != nil {
		panic(err)
	}
	return h
}

func read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustParse(t *testing.T, name string) *Result {
	t.Helper()
	r, err := ParseResult(read(t, name), storeDir)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return r
}

func paths(cs []Claim) []string {
	var out []string
	for _, c := range cs {
		out = append(out, c.StorePath)
	}
	return out
}

func TestAllShapesAgree(t *testing.T) {
	arrayOrder := []string{
		"/nix/store/3jz64a65vnhvn9vz6f13s5899fn7px9p-zz-2.0",
		"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1",
		"/nix/store/96rlw6vxj6m9b4y0x8psdp117zd7x9hi-cadr-1.0",
		"/nix/store/icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0",
		"/nix/store/s0bmwrafr6ifsvggrjysjiyrazggwpk5-multi-0.2",
	}
	narinfoOrder := []string{arrayOrder[0], arrayOrder[1], arrayOrder[3], arrayOrder[4], arrayOrder[2]}
	cases := []struct {
		file    string
		format  Format
		order   []string
		invalid []string
	}{
		{"nix-2.8-array.json", FormatJSONArray, arrayOrder, nil},
		{"nix-2.19-object.json", FormatJSONObject, arrayOrder, []string{"/nix/store/y25hsnq1kd1hjmsvvhp24bygpai69li3-hello.txt"}},
		{"nix-2.33-format2.json", FormatJSONObject, arrayOrder, []string{"/nix/store/y25hsnq1kd1hjmsvvhp24bygpai69li3-hello.txt"}},
		{"closure.narinfo", FormatNarinfo, narinfoOrder, nil},
	}
	var ref map[string]Claim
	for _, c := range cases {
		if got := Detect(read(t, c.file)); got != c.format {
			t.Errorf("%s: Detect = %s, want %s", c.file, got, c.format)
		}
		r := mustParse(t, c.file)
		if got := paths(r.Claims); !reflect.DeepEqual(got, c.order) {
			t.Errorf("%s: claims in order %q, want input order %q", c.file, got, c.order)
		}
		if !reflect.DeepEqual(r.Invalid, c.invalid) {
			t.Errorf("%s: invalid = %q, want %q", c.file, r.Invalid, c.invalid)
		}
		byPath := map[string]Claim{}
		for _, cl := range r.Claims {
			byPath[cl.StorePath] = cl
		}
		if ref == nil {
			ref = byPath
			continue
		}
		for p, want := range ref {
			if got := byPath[p]; !reflect.DeepEqual(got, want) {
				t.Errorf("%s: claim for %s\n got %+v\nwant %+v", c.file, p, got, want)
			}
		}
	}
	want := Claim{
		StorePath:  "/nix/store/s0bmwrafr6ifsvggrjysjiyrazggwpk5-multi-0.2",
		NarHash:    mustSHA256("sha256:0zd0ggjcp05v06p0whnyl3621jiwi5iql5qfwa63s03jfq81vr34"),
		NarSize:    440,
		References: []string{"3jz64a65vnhvn9vz6f13s5899fn7px9p-zz-2.0", "5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1", "s0bmwrafr6ifsvggrjysjiyrazggwpk5-multi-0.2"},
		Deriver:    "8lv0mjpi33dnw280pqgkx4dvnqy8by85-multi-0.2.drv",
		Sigs:       []string{"k-1:LAqAXY3CJOCKntJQUotmzZZNoNNd5DAyEuqzXKh8R+jBspGPfOk6/vgxdGz6EHsjkUiqniz9f9gDTSHGVQXACg=="},
	}
	if got := ref[want.StorePath]; !reflect.DeepEqual(got, want) {
		t.Errorf("multi claim\n got %+v\nwant %+v", got, want)
	}
	if ca := ref["/nix/store/96rlw6vxj6m9b4y0x8psdp117zd7x9hi-cadr-1.0"].CA; ca != "fixed:r:sha256:0zbg67yzxisacpdaj93kd9d1wvnlkvj0crskij6pqcv9jpcyl89q" {
		t.Errorf("cadr CA = %q", ca)
	}
}

// Every claim's first signature was made by `nix store sign`; it verifies exactly
// when Claim.Fingerprint is Nix's fingerprint, whatever shape the claim came in.
func TestSignaturesVerify(t *testing.T) {
	name, k, _ := strings.Cut(strings.TrimSpace(string(read(t, "k-1.pub"))), ":")
	pk, err := base64.StdEncoding.DecodeString(k)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"nix-2.8-array.json", "nix-2.19-object.json", "nix-2.33-format2.json", "closure.narinfo"} {
		for _, c := range mustParse(t, f).Claims {
			fp, err := c.Fingerprint(storeDir)
			if err != nil {
				t.Fatalf("%s %s: %v", f, c.StorePath, err)
			}
			if len(c.Sigs) != 1 {
				t.Fatalf("%s %s: sigs %q", f, c.StorePath, c.Sigs)
			}
			kn, s, _ := strings.Cut(c.Sigs[0], ":")
			sig, err := base64.StdEncoding.DecodeString(s)
			if kn != name || err != nil || !ed25519.Verify(ed25519.PublicKey(pk), []byte(fp), sig) {
				t.Errorf("%s %s: signature does not verify over %q", f, c.StorePath, fp)
			}
		}
	}
}

func TestInvalidPathsArray(t *testing.T) {
	r := mustParse(t, "nix-2.8-array-invalid.json")
	inv := append([]string(nil), r.Invalid...)
	sort.Strings(inv)
	want := []string{"/nix/store/xq1m3brilpi5pb4kvgkailwbirkhf8ck-withref.txt", "/nix/store/y25hsnq1kd1hjmsvvhp24bygpai69li3-hello.txt"}
	if !reflect.DeepEqual(inv, want) || len(r.Claims) != 5 {
		t.Errorf("invalid %q, %d claims", r.Invalid, len(r.Claims))
	}
	for _, c := range r.Claims {
		if c.CA == "" || c.Sigs != nil {
			t.Errorf("%+v", c)
		}
	}
}

func TestHashForms(t *testing.T) {
	const want = "sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r"
	for _, h := range []string{
		`"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I="`,
		`"sha256:1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r"`,
		`"sha256:f9f8dd12bd202b279be5a9e987f5953a6da6f1ff506b59211670975e9384e7d2"`,
		`{"algorithm":"sha256","format":"base16","hash":"f9f8dd12bd202b279be5a9e987f5953a6da6f1ff506b59211670975e9384e7d2"}`,
		`{"algorithm":"sha256","format":"nix32","hash":"1lp7hj9mx5vh2qhmjsshzzqscv9sjpsqgsd9wndjfar0pl9dvy7r"}`,
		`{"algorithm":"sha256","format":"base64","hash":"+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I="}`,
		`{"algorithm":"sha256","format":"sri","hash":"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I="}`,
	} {
		in := `[{"path":"/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1","narHash":` + h + `,"narSize":504,"references":[]}]`
		cs, err := Parse([]byte(in), storeDir)
		if err != nil || len(cs) != 1 || cs[0].NarHash.String() != want {
			t.Errorf("narHash %s: %+v, %v", h, cs, err)
		}
	}
}

func TestErrors(t *testing.T) {
	const p = "/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1"
	const h = `"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I="`
	entry := func(fields string) string {
		return `[{"path":"/nix/store/icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0","narHash":` + h + `,"narSize":1,"references":[]},` + fields + `]`
	}
	narinfos := string(read(t, "closure.narinfo"))
	cases := []struct {
		name, in string
		want     []string // all must appear in the error
	}{
		{"empty", "  \n", []string{"empty input"}},
		{"bad JSON", `[{"path": }]`, []string{"invalid JSON"}},
		{"bad JSON object", `{"` + p + `": {"narHash": }`, []string{"invalid JSON"}},
		{"trailing data", `[] []`, []string{"after the top-level value"}},
		{"entry not object", `[1]`, []string{"entry 1", "object"}},
		{"missing path", entry(`{"narHash":` + h + `,"narSize":1,"references":[]}`), []string{"entry 2", "path", "missing"}},
		{"path outside store", entry(`{"path":"/gnu/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1","narHash":` + h + `,"narSize":1,"references":[]}`), []string{"entry 2", "path", "not in store dir"}},
		{"missing narHash", entry(`{"path":"` + p + `","narSize":1,"references":[]}`), []string{"entry 2", p, "narHash", "missing"}},
		{"narHash number", entry(`{"path":"` + p + `","narHash":5,"narSize":1,"references":[]}`), []string{"entry 2", "narHash", "number"}},
		{"narHash garbage", entry(`{"path":"` + p + `","narHash":"sha256:abc","narSize":1,"references":[]}`), []string{"entry 2", "narHash"}},
		{"narHash sha512", entry(`{"path":"` + p + `","narHash":"sha512-fkorVPZTOgpQy/UQWtdq9noDtEedzjAWQ8O5/knkPdnywYvJOOX16oOwqVLSKa2hWOBNxPdMAt/MKFdysaUwFg==","narSize":1,"references":[]}`), []string{"entry 2", "narHash", "sha256"}},
		{"hash object bad format", entry(`{"path":"` + p + `","narHash":{"algorithm":"sha256","format":"hex","hash":"x"},"narSize":1,"references":[]}`), []string{"entry 2", "narHash", "format"}},
		{"hash object extra field", entry(`{"path":"` + p + `","narHash":{"algorithm":"sha256","hash":"x","salt":1},"narSize":1,"references":[]}`), []string{"entry 2", "narHash", "salt"}},
		{"narSize string", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":"504","references":[]}`), []string{"entry 2", "narSize", "string"}},
		{"narSize negative", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":-1,"references":[]}`), []string{"entry 2", "narSize"}},
		{"narSize fraction", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1.5,"references":[]}`), []string{"entry 2", "narSize"}},
		{"narSize zero", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":0,"references":[]}`), []string{"entry 2", "narSize", "zero"}},
		{"missing narSize", entry(`{"path":"` + p + `","narHash":` + h + `,"references":[]}`), []string{"entry 2", "narSize", "missing"}},
		{"missing references", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1}`), []string{"entry 2", "references", "missing"}},
		{"references string", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":"x"}`), []string{"entry 2", "references", "array"}},
		{"references null", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":null}`), []string{"entry 2", "references"}},
		{"bad reference", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":["/nix/store/short"]}`), []string{"entry 2", "references[0]"}},
		{"deriver number", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"deriver":1}`), []string{"entry 2", "deriver"}},
		{"signatures string", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"signatures":"k-1:x"}`), []string{"entry 2", "signatures", "array"}},
		{"signature number", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"signatures":[1]}`), []string{"entry 2", "signatures", "[0]"}},
		{"bad ca", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"ca":"fixed:r:sha256:nope"}`), []string{"entry 2", "ca"}},
		{"ca object bad method", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"ca":{"method":"magic","hash":` + h + `}}`), []string{"entry 2", "ca", "method"}},
		{"ca text sha1", entry(`{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"ca":{"method":"text","hash":"sha1:dyx0ryw8s1srxlwfj4fkk9k5qln6swhb"}}`), []string{"entry 2", "ca", "sha256"}},
		{"valid string", entry(`{"path":"` + p + `","valid":"no"}`), []string{"entry 2", "valid"}},
		{"duplicate field", entry(`{"path":"` + p + `","narHash":` + h + `,"narHash":` + h + `,"narSize":1,"references":[]}`), []string{"entry 2", "narHash", "more than once"}},
		{"object duplicate key", `{"` + p + `":null,"` + p + `":null}`, []string{"more than once"}},
		{"object bad key", `{"not-a-path": null}`, []string{"entry 1", "key"}},
		{"object value string", `{"` + p + `": "x"}`, []string{"entry 1", p, "object"}},
		{"object path disagrees", `{"` + p + `": {"path": "/nix/store/icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0","narHash":` + h + `,"narSize":1,"references":[]}}`, []string{"entry 1", "path", "disagrees"}},
		{"envelope other store", `{"version":2,"storeDir":"/gnu/store","info":{}}`, []string{"storeDir", "/gnu/store"}},
		{"envelope version", `{"version":9,"storeDir":"/nix/store","info":{}}`, []string{"version", "9"}},
		{"envelope info not object", `{"version":2,"storeDir":"/nix/store","info":[]}`, []string{"info", "object"}},
		{"entry other store", `{"version":2,"info":{"5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1":{"storeDir":"/gnu/store","narHash":` + h + `,"narSize":1,"references":[]}}}`, []string{"entry 1", "storeDir"}},
		{"narinfo block broken", narinfos + "\nStorePath: /nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1\nURL: x\nNarSize: 1\n", []string{"narinfo 6", "NarHash", "missing"}},
		{"narinfo bad reference", strings.Replace(narinfos, "References: icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0", "References: nope", 1), []string{"narinfo 2", "References"}},
		{"not narinfo", "hello world\n", []string{"narinfo 1", "line 1"}},
	}
	for _, c := range cases {
		cs, err := Parse([]byte(c.in), storeDir)
		if err == nil {
			t.Errorf("%s: no error (claims %v)", c.name, paths(cs))
			continue
		}
		if cs != nil {
			t.Errorf("%s: claims returned with an error", c.name)
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not mention %q", c.name, err, w)
			}
		}
	}
	if _, err := Parse([]byte("[]"), "/nix/store/"); err == nil {
		t.Error("bad store dir accepted")
	}
}

func TestEmptyCollections(t *testing.T) {
	for _, in := range []string{"[]", "{}", `{"version":2,"storeDir":"/nix/store","info":{}}`} {
		r, err := ParseResult([]byte(in), storeDir)
		if err != nil || len(r.Claims) != 0 || len(r.Invalid) != 0 {
			t.Errorf("%s: %+v, %v", in, r, err)
		}
	}
}

func FuzzParse(f *testing.F) {
	for _, n := range []string{"nix-2.8-array.json", "nix-2.19-object.json", "nix-2.33-format2.json", "closure.narinfo"} {
		b, err := os.ReadFile("testdata/" + n)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cs, err := Parse(data, storeDir)
		if err != nil {
			if cs != nil {
				t.Fatal("claims with error")
			}
			return
		}
		for _, c := range cs {
			if _, err := c.Fingerprint(storeDir); err != nil {
				t.Fatalf("parsed claim has no fingerprint: %v (%+v)", err, c)
			}
		}
	})
}

// An entry larger than the bound is refused by name, without being held
// whole, in every shape. (The bound is lowered here: MaxEntrySize itself
// is 8 MiB, slow to fill under -race.)
func TestEntryTooLarge(t *testing.T) {
	const limit = 16 << 10
	const p = "/nix/store/5r8cswd6jchqkwx3dn2xapsahpjxj0js-app-0.1"
	const h = `"sha256-+fjdEr0gKyeb5anph/WVOm2m8f9Qa1khFnCXXpOE59I="`
	ok := `{"path":"/nix/store/icsd4d6bjhg7nlbcx4q63nvmq00l0k51-leaf-1.0","narHash":` + h + `,"narSize":1,"references":[]}`
	big := `"k-1:` + strings.Repeat("A", limit) + `"`
	parse := func(in string, limit int) ([]Claim, error) {
		d, err := newDecoder(strings.NewReader(in), storeDir, limit)
		if err != nil {
			return nil, err
		}
		var cs []Claim
		for {
			c, err := d.Next()
			if err == io.EOF {
				return cs, nil
			}
			if err != nil {
				return nil, err
			}
			cs = append(cs, c)
		}
	}
	cases := map[string]struct {
		in   string
		want []string
	}{
		"array":   {`[` + ok + `,{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"signatures":[` + big + `]}]`, []string{"entry 2", "larger than 16384 bytes"}},
		"object":  {`{"` + p + `":{"narHash":` + h + `,"narSize":1,"references":[],"signatures":[` + big + `]}}`, []string{"entry 1", "larger than 16384 bytes"}},
		"narinfo": {string(read(t, "closure.narinfo")) + "\nStorePath: " + p + "\nSig: " + strings.Repeat("A", limit) + "\n", []string{"narinfo 6", "larger than 16384 bytes"}},
	}
	for name, c := range cases {
		_, err := parse(c.in, limit)
		for _, w := range c.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %v does not mention %q", name, err, w)
			}
		}
	}
	// Just under the bound is fine, and many entries each under it too.
	sig := `"k-1:` + strings.Repeat("A", limit-300) + `"`
	entry := `{"path":"` + p + `","narHash":` + h + `,"narSize":1,"references":[],"signatures":[` + sig + `]}`
	if cs, err := parse(`[`+entry+`,`+entry+`,`+entry+`]`, limit); err != nil || len(cs) != 3 {
		t.Fatalf("entries just under the bound: %v", err)
	}
	if !strings.Contains(errEntryTooLarge.Error(), "bound") || sizeText(MaxEntrySize) != "8 MiB" {
		t.Fatal(sizeText(MaxEntrySize))
	}
}

// entryFields relies on the decoder for syntax, but stays inside the bytes
// whatever it is given.
func TestEntryFieldsBounded(t *testing.T) {
	obj := `{ "path" : "/nix/store/x", "a\"b":{"c":[1,"]}"]} ,"n":12 , "t":true}`
	f, err := entryFields([]byte(obj))
	if err != nil || len(f) != 4 || string(f["a\"b"]) != `{"c":[1,"]}"]}` || string(f["n"]) != "12" || string(f["t"]) != "true" {
		t.Fatalf("%q %v", f, err)
	}
	for i := range obj {
		entryFields([]byte(obj[:i])) // must not panic
	}
	for _, bad := range []string{`{"a" 1}`, `{"a":1 "b":2}`, `{a:1}`, `{"a":}`} {
		if _, err := entryFields([]byte(bad)); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
}
