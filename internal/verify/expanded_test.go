package verify

import (
	"compress/gzip"
	"crypto/ed25519"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/big"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"filippo.io/edwards25519"
)

// ExpandedKey.Verify must decide exactly what crypto/ed25519.Verify
// decides. These tests and FuzzExpandedVerify compare the two on the
// inputs where Ed25519 implementations are known to differ: small-order
// and mixed-order A and R, non-canonical encodings of A, R and S, wrong
// lengths. The edge points are built with filippo.io/edwards25519 (the
// code crypto/ed25519 uses), independently of curve25519-voi.

// smallOrder are the canonical encodings of the eight points of small
// order (TestSmallOrderPoints checks them).
var smallOrder = hexes(
	"0100000000000000000000000000000000000000000000000000000000000000", // identity
	"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // order 2
	"0000000000000000000000000000000000000000000000000000000000000000", // order 4
	"0000000000000000000000000000000000000000000000000000000000000080",
	"26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05", // order 8
	"26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
	"c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
	"c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
)

// nonCanonical are encodings that are not the canonical encoding of a
// point: y ≥ p, and x = 0 with the sign bit set.
var nonCanonical = hexes(
	"0100000000000000000000000000000000000000000000000000000000000080", // identity, sign bit
	"ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff", // order 2, sign bit
	"eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // y = p+1 (identity)
	"eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
	"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // y = p (y = 0)
	"edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
	"efffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // y = p+2
	"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", // y = 2^255-1
)

func hexes(ss ...string) [][]byte {
	out := make([][]byte, len(ss))
	for i, s := range ss {
		b, err := hex.DecodeString(s)
		if err != nil {
			panic(err)
		}
		out[i] = b
	}
	return out
}

func TestSmallOrderPoints(t *testing.T) {
	for i, b := range smallOrder {
		p, err := new(edwards25519.Point).SetBytes(b)
		if err != nil {
			t.Fatalf("smallOrder[%d]: %v", i, err)
		}
		if new(edwards25519.Point).MultByCofactor(p).Equal(edwards25519.NewIdentityPoint()) != 1 {
			t.Fatalf("smallOrder[%d] is not of small order", i)
		}
		if string(p.Bytes()) != string(b) {
			t.Fatalf("smallOrder[%d] is not canonical", i)
		}
	}
	for i, b := range nonCanonical {
		if p, err := new(edwards25519.Point).SetBytes(b); err == nil && string(p.Bytes()) == string(b) {
			t.Fatalf("nonCanonical[%d] is canonical", i)
		}
	}
}

// checkSameDecision fails t when the expanded key and crypto/ed25519
// decide differently on (key, msg, sig), and returns the decision.
func checkSameDecision(t testing.TB, key, msg, sig []byte) bool {
	t.Helper()
	want := len(key) == ed25519.PublicKeySize && ed25519.Verify(key, msg, sig)
	pk := PublicKey{Name: "k", Key: key}
	s := "k:" + base64.StdEncoding.EncodeToString(sig)
	if got := pk.Expand().Verify(string(msg), s); got != want {
		t.Fatalf("expanded key says %v, crypto/ed25519 says %v\nkey %x\nmsg %x\nsig %x", got, want, key, msg, sig)
	}
	if got := pk.Verify(string(msg), s); got != want {
		t.Fatalf("PublicKey.Verify says %v, crypto/ed25519 says %v", got, want)
	}
	return want
}

// edgeModes is how many kinds of input edgeCase makes.
const edgeModes = 7

// edgeCase makes a (key, message, signature) of kind mode from arbitrary
// bytes a, msg and tweak:
//
//	0 a and tweak as key and signature, unchanged
//	1 an honest signature (key from seed a), XORed with tweak
//	2 an honest signature with S + nℓ (non-canonical S)
//	3 an honest signature with a small-order point added to R
//	4 a mixed-order key (aB + T) and S = r + ka: valid for the cofactored
//	  equation, for the cofactorless one only when kT = 0
//	5 a small-order A and a small-order R, S = 0 or from tweak
//	6 a non-canonical A, with a signature from tweak or a small-order R
//	  and S = 0
func edgeCase(mode uint8, a, msg, tweak []byte) (key, sig []byte) {
	pick := func(list [][]byte, i int) []byte { return list[i%len(list)] }
	b0 := func(b []byte, i int) int {
		if len(b) > i {
			return int(b[i])
		}
		return 0
	}
	seed := sha512.Sum512(a)
	priv := ed25519.NewKeyFromSeed(seed[:32])
	pub := priv.Public().(ed25519.PublicKey)
	honest := ed25519.Sign(priv, msg)
	switch mode % edgeModes {
	case 0:
		return a, tweak
	case 1:
		for i := range min(len(tweak), len(honest)) {
			honest[i] ^= tweak[i]
		}
		if len(tweak) > len(honest) {
			honest = append(honest, tweak[len(honest):]...) // a wrong length
		}
		return pub, honest
	case 2:
		s := new(big.Int).SetBytes(reversed(honest[32:]))
		l, _ := new(big.Int).SetString("7237005577332262213973186563042994240857116359379907606001950938285454250989", 10)
		s.Add(s, l.Mul(l, big.NewInt(int64(1+b0(tweak, 0)%14))))
		out := make([]byte, 32)
		s.FillBytes(out)
		return pub, append(honest[:32], reversed(out)...)
	case 3:
		r, _ := new(edwards25519.Point).SetBytes(honest[:32])
		t, _ := new(edwards25519.Point).SetBytes(pick(smallOrder, b0(tweak, 0)))
		return pub, append(new(edwards25519.Point).Add(r, t).Bytes(), honest[32:]...)
	case 4:
		as, _ := edwards25519.NewScalar().SetBytesWithClamping(seed[:32])
		t, _ := new(edwards25519.Point).SetBytes(pick(smallOrder, b0(tweak, 0)))
		A := new(edwards25519.Point).Add(new(edwards25519.Point).ScalarBaseMult(as), t).Bytes()
		rh := sha512.Sum512(append(seed[32:], msg...))
		r, _ := edwards25519.NewScalar().SetUniformBytes(rh[:])
		R := new(edwards25519.Point).ScalarBaseMult(r)
		if b0(tweak, 1)&1 == 1 {
			tr, _ := new(edwards25519.Point).SetBytes(pick(smallOrder, b0(tweak, 2)))
			R.Add(R, tr)
		}
		kh := sha512.New()
		kh.Write(R.Bytes())
		kh.Write(A)
		kh.Write(msg)
		k, _ := edwards25519.NewScalar().SetUniformBytes(kh.Sum(nil))
		S := edwards25519.NewScalar().MultiplyAdd(k, as, r)
		return A, append(R.Bytes(), S.Bytes()...)
	case 5:
		S := make([]byte, 32)
		if len(tweak) >= 64 {
			s, _ := edwards25519.NewScalar().SetUniformBytes(tweak[:64])
			S = s.Bytes()
		}
		return pick(smallOrder, b0(a, 0)), append(append([]byte{}, pick(smallOrder, b0(tweak, 0))...), S...)
	default:
		if len(tweak) < 64 {
			// Most non-canonical encodings are of small-order points: a
			// small-order R with S = 0 is sometimes valid.
			tweak = append(append([]byte{}, pick(smallOrder, b0(tweak, 0))...), make([]byte, 32)...)
		}
		return pick(nonCanonical, b0(a, 0)), tweak
	}
}

func reversed(b []byte) []byte {
	out := make([]byte, len(b))
	for i := range b {
		out[len(b)-1-i] = b[i]
	}
	return out
}

// TestExpandedVerifyMatchesStdlib compares the two on a few hundred inputs
// of each kind, and checks that the kinds meant to reach both answers do.
func TestExpandedVerifyMatchesStdlib(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for mode := range uint8(edgeModes) {
		accepted, n := 0, 100
		for range n {
			a, msg, tweak := make([]byte, rng.Intn(40)), make([]byte, rng.Intn(300)), make([]byte, rng.Intn(70))
			rng.Read(a)
			rng.Read(msg)
			rng.Read(tweak)
			if mode == 1 && rng.Intn(2) == 0 {
				tweak = nil // the honest signature itself
			}
			key, sig := edgeCase(mode, a, msg, tweak)
			if checkSameDecision(t, key, msg, sig) {
				accepted++
			}
		}
		t.Logf("mode %d: %d of %d accepted", mode, accepted, n)
		if (mode == 1 || mode == 4 || mode == 5 || mode == 6) && (accepted == 0 || accepted == n) {
			t.Errorf("mode %d: %d of %d accepted; want both answers", mode, accepted, n)
		}
	}
}

// TestExpandedVerifyVectors compares the two on published edge-case
// vectors (testdata/README.md).
func TestExpandedVerifyVectors(t *testing.T) {
	var vectors []struct{ A, R, S, M string }
	readGzipJSON(t, "ed25519vectors.json.gz", &vectors)
	accepted := 0
	for _, v := range vectors {
		sig := append(mustHex(t, v.R), mustHex(t, v.S)...)
		if checkSameDecision(t, mustHex(t, v.A), []byte(v.M), sig) {
			accepted++
		}
	}
	var cases []struct {
		Message string `json:"message"`
		PubKey  string `json:"pub_key"`
		Sig     string `json:"signature"`
	}
	readGzipJSON(t, "speccheck_cases.json.gz", &cases)
	for _, c := range cases {
		if checkSameDecision(t, mustHex(t, c.PubKey), mustHex(t, c.Message), mustHex(t, c.Sig)) {
			accepted++
		}
	}
	t.Logf("%d of %d vectors accepted", accepted, len(vectors)+len(cases))
	if len(vectors) != 768 || len(cases) != 12 || accepted == 0 {
		t.Fatalf("%d and %d vectors, %d accepted", len(vectors), len(cases), accepted)
	}
}

// TestExpandedVerifyNix checks signatures made by Nix, and the name rule.
func TestExpandedVerifyNix(t *testing.T) {
	key, err := ParsePublicKey(readKeyFile(t, "test-key-1.pub"))
	if err != nil {
		t.Fatal(err)
	}
	other, err := ParsePublicKey(readKeyFile(t, "impostor.pub"))
	if err != nil {
		t.Fatal(err)
	}
	ek, eo := key.Expand(), other.Expand()
	if ek.exp == nil {
		t.Fatal("a real key was not expanded")
	}
	for _, p := range loadPathInfos(t) {
		fp := p.fingerprint(t)
		if !ek.Verify(fp, p.Signatures[0]) {
			t.Errorf("%s: Nix's signature does not verify", p.Path)
		}
		if eo.Verify(fp, p.Signatures[0]) {
			t.Errorf("%s: verifies with the impostor key", p.Path)
		}
		if ek.Verify(fp+"x", p.Signatures[0]) {
			t.Errorf("%s: verifies over another fingerprint", p.Path)
		}
		renamed := PublicKey{Name: "other", Key: key.Key}.Expand()
		if renamed.Verify(fp, p.Signatures[0]) {
			t.Errorf("%s: verifies with a key of another name", p.Path)
		}
	}
	if (PublicKey{}).Expand().Verify("x", "k:AAAA") {
		t.Error("a zero key verified a signature")
	}
}

func readGzipJSON(t *testing.T, name string, v any) {
	t.Helper()
	f, err := os.Open(filepath.Join("testdata", "ed25519", name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.NewDecoder(zr).Decode(v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func mustHex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzExpandedVerify compares the expanded key with crypto/ed25519 on
// inputs built by edgeCase from the fuzzer's bytes (go test -fuzz
// FuzzExpandedVerify ./internal/verify/).
func FuzzExpandedVerify(f *testing.F) {
	for mode := range uint8(edgeModes) {
		f.Add(mode, []byte("seed"), []byte("1;/nix/store/x;sha256:y;1;"), []byte{})
		f.Add(mode, []byte{3}, []byte{}, []byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
			25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54,
			55, 56, 57, 58, 59, 60, 61, 62, 63, 64})
	}
	for _, k := range append(append([][]byte{}, smallOrder...), nonCanonical...) {
		f.Add(uint8(0), k, []byte("m"), append(append([]byte{}, smallOrder[0]...), make([]byte, 32)...))
	}
	f.Fuzz(func(t *testing.T, mode uint8, a, msg, tweak []byte) {
		key, sig := edgeCase(mode, a, msg, tweak)
		checkSameDecision(t, key, msg, sig)
	})
}

// BenchmarkExpandedVerify checks the same Nix-style signatures with
// PublicKey.Verify (crypto/ed25519) and with the expanded key, alternating
// in rounds so that both see the same load, and reports each one's time
// per signature and the ratio.
func BenchmarkExpandedVerify(b *testing.B) {
	sk, err := GenerateKey("bench-1")
	if err != nil {
		b.Fatal(err)
	}
	pk := sk.Public()
	ek := pk.Expand()
	const n = 64
	fps, sigs := make([]string, n), make([]string, n)
	for i := range n {
		fps[i] = "1;/nix/store/" + fmt.Sprintf("%032d", i) + "-pkg;sha256:1ilpawkd1krvhg5764893fy979s13l9k724y48xjx8cz2y8p696h;226488;" +
			"/nix/store/0yvpg9gk8jq2srd5ngb70rbdzhax34b4-hello-2.12.1,/nix/store/84xj5518dh12iklrfndsaapbsl1f6h83-glibc-2.40"
		sigs[i] = sk.Sign(fps[i])
	}
	var std, exp time.Duration
	for b.Loop() {
		t := time.Now()
		for i := range n {
			if !pk.Verify(fps[i], sigs[i]) {
				b.Fatal("stdlib: does not verify")
			}
		}
		std += time.Since(t)
		t = time.Now()
		for i := range n {
			if !ek.Verify(fps[i], sigs[i]) {
				b.Fatal("expanded: does not verify")
			}
		}
		exp += time.Since(t)
	}
	per := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(b.N*n) / 1000 }
	b.ReportMetric(per(std), "stdlib-µs/sig")
	b.ReportMetric(per(exp), "expanded-µs/sig")
	b.ReportMetric(std.Seconds()/exp.Seconds(), "x_faster")
}
