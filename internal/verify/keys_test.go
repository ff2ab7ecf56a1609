package verify

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

func readKeyFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "keys", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// pathInfo is one entry of `nix path-info --json --sigs` (Nix 2.8 shape).
type pathInfo struct {
	Path       string   `json:"path"`
	NarHash    string   `json:"narHash"` // SRI
	NarSize    uint64   `json:"narSize"`
	References []string `json:"references"`
	Signatures []string `json:"signatures"`
}

// fingerprint builds Nix's signed fingerprint. Package narinfo owns the real
// implementation; this copy only exists to check signatures made by Nix.
func (p pathInfo) fingerprint(t *testing.T) string {
	t.Helper()
	raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(p.NarHash, "sha256-"))
	if err != nil {
		t.Fatal(err)
	}
	refs := slices.Clone(p.References)
	slices.Sort(refs)
	return "1;" + p.Path + ";sha256:" + nixbase32.EncodeToString(raw) + ";" +
		strconv.FormatUint(p.NarSize, 10) + ";" + strings.Join(refs, ",")
}

func loadPathInfos(t *testing.T) []pathInfo {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "path-info.json"))
	if err != nil {
		t.Fatal(err)
	}
	var infos []pathInfo
	if err := json.Unmarshal(b, &infos); err != nil {
		t.Fatal(err)
	}
	if len(infos) != 3 {
		t.Fatalf("path-info.json: %d entries, want 3", len(infos))
	}
	return infos
}

func TestParseNixGeneratedKeys(t *testing.T) {
	sec, err := ParseSecretKey(readKeyFile(t, "test-key-1.sec"))
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ParsePublicKey(readKeyFile(t, "test-key-1.pub"))
	if err != nil {
		t.Fatal(err)
	}
	if sec.Name != "test-key-1" || pub.Name != "test-key-1" {
		t.Fatalf("names %q %q", sec.Name, pub.Name)
	}
	if got := sec.Public(); got.Name != pub.Name || !got.Key.Equal(pub.Key) {
		t.Fatalf("secret key's public half %v differs from the .pub file %v", got, pub)
	}
	// String must reproduce Nix's files byte for byte (minus the newline).
	if got, want := sec.String(), strings.TrimSpace(readKeyFile(t, "test-key-1.sec")); got != want {
		t.Errorf("SecretKey.String() = %q, want %q", got, want)
	}
	if got, want := pub.String(), strings.TrimSpace(readKeyFile(t, "test-key-1.pub")); got != want {
		t.Errorf("PublicKey.String() = %q, want %q", got, want)
	}
}

func TestVerifyNixSignatures(t *testing.T) {
	pub, err := ParsePublicKey(readKeyFile(t, "test-key-1.pub"))
	if err != nil {
		t.Fatal(err)
	}
	impostor, err := ParsePublicKey(readKeyFile(t, "impostor.pub"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := ParsePublicKey(readKeyFile(t, "other-key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range loadPathInfos(t) {
		fp := p.fingerprint(t)
		if len(p.Signatures) != 1 {
			t.Fatalf("%s: %d signatures", p.Path, len(p.Signatures))
		}
		sig := p.Signatures[0]
		if !pub.Verify(fp, sig) {
			t.Errorf("%s: Nix's signature does not verify over %q", p.Path, fp)
		}
		if impostor.Verify(fp, sig) {
			t.Errorf("%s: verified with a different key of the same name", p.Path)
		}
		if other.Verify(fp, sig) {
			t.Errorf("%s: verified with a key of another name", p.Path)
		}
		// Any change to the fingerprint must break the signature.
		if pub.Verify(fp+"x", sig) || pub.Verify(strings.Replace(fp, "1;", "2;", 1), sig) {
			t.Errorf("%s: verified over a modified fingerprint", p.Path)
		}
		got := VerifyAny([]PublicKey{other, impostor, pub, pub}, fp, []string{"junk", sig, sig})
		if len(got) != 1 || !got[0].Key.Equal(pub.Key) {
			t.Errorf("%s: VerifyAny = %v, want just %v", p.Path, got, pub)
		}
	}
}

// The signature in a narinfo written by `nix copy` verifies over the
// fingerprint rebuilt from that narinfo (References there are basenames).
func TestVerifyNarinfoSig(t *testing.T) {
	pub, err := ParsePublicKey(readKeyFile(t, "test-key-1.pub"))
	if err != nil {
		t.Fatal(err)
	}
	ni := loadNarinfo(t, "xz", "mlvz8sharr0l75n2falm33fqljksp07j")
	var refs []string
	for r := range strings.FieldsSeq(ni["References"]) {
		refs = append(refs, "/nix/store/"+r)
	}
	slices.Sort(refs)
	fp := "1;" + ni["StorePath"] + ";" + ni["NarHash"] + ";" + ni["NarSize"] + ";" + strings.Join(refs, ",")
	if len(refs) != 3 {
		t.Fatalf("fixture should have 3 references, has %v", refs)
	}
	if !pub.Verify(fp, ni["Sig"]) {
		t.Fatalf("narinfo Sig does not verify over %q", fp)
	}
}

func TestSignVerifyRoundTrip(t *testing.T) {
	sec, err := GenerateKey("cache.example.org-1")
	if err != nil {
		t.Fatal(err)
	}
	// Round trip through the file formats.
	sec2, err := ParseSecretKey("  " + sec.String() + "\n")
	if err != nil {
		t.Fatal(err)
	}
	pub, err := ParsePublicKey(sec2.Public().String() + "\n")
	if err != nil {
		t.Fatal(err)
	}
	fp := "1;/nix/store/0yvpg9gk8jq2srd5ngb70rbdzhax34b4-tree;sha256:1lpjrzn488xv3ms15a1c4zxw3rb4iybpvdmm73chybqa80497al7;14776;"
	sig := sec2.Sign(fp)
	if !strings.HasPrefix(sig, "cache.example.org-1:") {
		t.Fatalf("signature %q lacks the key name", sig)
	}
	if !pub.Verify(fp, sig) {
		t.Fatal("own signature does not verify")
	}

	other, err := GenerateKey("cache.example.org-1")
	if err != nil {
		t.Fatal(err)
	}
	_, b64, _ := strings.Cut(sig, ":")
	raw, _ := base64.StdEncoding.DecodeString(b64)
	flipped := slices.Clone(raw)
	flipped[10] ^= 1
	for name, tc := range map[string]struct {
		key PublicKey
		sig string
	}{
		"wrong key same name": {other.Public(), sig},
		"wrong name":          {pub, "cache.example.org-2:" + b64},
		"no name":             {pub, b64},
		"empty name":          {pub, ":" + b64},
		"bad base64":          {pub, "cache.example.org-1:!!!"},
		"short sig":           {pub, "cache.example.org-1:" + base64.StdEncoding.EncodeToString(raw[:63])},
		"flipped bit":         {pub, "cache.example.org-1:" + base64.StdEncoding.EncodeToString(flipped)},
		"empty":               {pub, ""},
		"zero key":            {PublicKey{Name: "cache.example.org-1"}, sig},
	} {
		if tc.key.Verify(fp, tc.sig) {
			t.Errorf("%s: Verify = true", name)
		}
	}
	if got := VerifyAny(nil, fp, []string{sig}); len(got) != 0 {
		t.Errorf("VerifyAny without keys = %v", got)
	}
	if got := VerifyAny([]PublicKey{other.Public(), pub}, fp, nil); len(got) != 0 {
		t.Errorf("VerifyAny without sigs = %v", got)
	}
}

func TestParseKeyErrors(t *testing.T) {
	good := base64.StdEncoding.EncodeToString(make([]byte, ed25519.PublicKeySize))
	for _, s := range []string{
		"",
		"nocolon",
		":" + good,
		"name:not base64!",
		"name:" + base64.StdEncoding.EncodeToString(make([]byte, 31)),
		"name:" + base64.StdEncoding.EncodeToString(make([]byte, 64)),
	} {
		if _, err := ParsePublicKey(s); err == nil {
			t.Errorf("ParsePublicKey(%q) succeeded", s)
		}
	}
	if _, err := ParsePublicKey(" name:" + good + "\n"); err != nil {
		t.Errorf("ParsePublicKey with whitespace: %v", err)
	}
	for _, s := range []string{
		"",
		"nocolon",
		":" + base64.StdEncoding.EncodeToString(make([]byte, 64)),
		"name:" + good, // a public key is not a secret key
	} {
		if _, err := ParseSecretKey(s); err == nil {
			t.Errorf("ParseSecretKey(%q) succeeded", s)
		}
	}
	for _, name := range []string{"", "a:b"} {
		if _, err := GenerateKey(name); err == nil {
			t.Errorf("GenerateKey(%q) succeeded", name)
		}
	}
}
