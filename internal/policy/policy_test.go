package policy

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const storeDir = "/nix/store"

func sum(s string) []byte {
	d := sha256.Sum256([]byte(s))
	return d[:]
}

// sha is sum as a narinfo hash.
func sha(s string) narinfo.SHA256 { return narinfo.SumSHA256([]byte(s)) }

// mustSHA256 parses a hash spelled in any form Nix accepts.
func mustSHA256(t *testing.T, s string) narinfo.SHA256 {
	t.Helper()
	h, err := narinfo.ParseSHA256(s)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// mkPath returns a valid store path for name (its hash is derived from name).
func mkPath(name string) string {
	return narinfo.MakeStorePath(storeDir, "test", sum(name), name)
}

func hashOf(storePath string) string { return path.Base(storePath)[:narinfo.HashLen] }

func genKey(t *testing.T, name string) verify.SecretKey {
	t.Helper()
	k, err := verify.GenerateKey(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// fixture is one upstream narinfo for /nix/store/<hash>-openssl-3.0.7 with
// the keys around it.
type fixture struct {
	t *testing.T

	up       verify.SecretKey // the upstream's key
	impostor verify.SecretKey // the upstream key's name, another key
	stranger verify.SecretKey // a key nobody configured
	a, b     verify.SecretKey // configured attesters
	gone     verify.SecretKey // an attester no longer configured

	path, dep, drv string
	hash           string
	narHash        narinfo.SHA256 // its SRI form contains a '/'
	narDigest      []byte
	narSize        uint64
	now            time.Time
}

func newFixture(t *testing.T) *fixture {
	f := &fixture{
		t:        t,
		up:       genKey(t, "cache.example.org-1"),
		impostor: genKey(t, "cache.example.org-1"),
		stranger: genKey(t, "stranger-1"),
		a:        genKey(t, "rebuilder-a-1"),
		b:        genKey(t, "rebuilder-b-1"),
		gone:     genKey(t, "rebuilder-old-1"),
		path:     mkPath("openssl-3.0.7"),
		dep:      mkPath("glibc-2.40"),
		drv:      mkPath("openssl-3.0.7.drv"),
		narSize:  4711,
		now:      time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC),
	}
	f.hash = hashOf(f.path)
	// An SRI hash is base64 and contains a '/' about half of the time;
	// pick a NarHash whose SRI form does, to exercise that spelling.
	for i := 0; ; i++ {
		d := sum("nar " + string(rune('a'+i)))
		if strings.Contains(base64.StdEncoding.EncodeToString(d), "/") {
			f.narDigest = d
			break
		}
	}
	f.narHash = narinfo.SHA256(f.narDigest)
	return f
}

func (f *fixture) policy() Policy {
	return Policy{
		StoreDir:         storeDir,
		Attesters:        []verify.PublicKey{f.a.Public(), f.b.Public()},
		Quorum:           1,
		ContentAddressed: true,
	}
}

// ni is the upstream narinfo, unsigned. It references itself and glibc.
func (f *fixture) ni() *narinfo.NarInfo {
	return &narinfo.NarInfo{
		StorePath:   f.path,
		URL:         "nar/" + narinfo.FormatHash("sha256", sum("file"))[7:] + ".nar.xz",
		Compression: "xz",
		FileHash:    sha("file"),
		FileSize:    1234,
		NarHash:     f.narHash,
		NarSize:     f.narSize,
		References:  []string{path.Base(f.path), path.Base(f.dep)},
		Deriver:     path.Base(f.drv),
		System:      "x86_64-linux",
	}
}

func fingerprint(t *testing.T, ni *narinfo.NarInfo) string {
	t.Helper()
	fp, err := narinfo.Fingerprint(storeDir, ni.StorePath, ni.NarHash, ni.NarSize, ni.References)
	if err != nil {
		t.Fatal(err)
	}
	return fp
}

// signed signs ni's own fingerprint with keys and renders it.
func (f *fixture) signed(ni *narinfo.NarInfo, keys ...verify.SecretKey) []byte {
	fp := fingerprint(f.t, ni)
	for _, k := range keys {
		ni.Sigs = append(ni.Sigs, k.Sign(fp))
	}
	return ni.Marshal()
}

// raw is the upstream narinfo after edit, signed by the upstream key.
func (f *fixture) raw(edit func(*narinfo.NarInfo)) []byte {
	ni := f.ni()
	if edit != nil {
		edit(ni)
	}
	return f.signed(ni, f.up)
}

// att is an attestation by k of the upstream fingerprint, after edit.
func (f *fixture) att(k verify.SecretKey, edit func(*Attestation)) Attestation {
	a := Attestation{
		StorePath:  f.path,
		NarHash:    f.narHash,
		NarSize:    f.narSize,
		References: []string{path.Base(f.dep), path.Base(f.path)},
		Deriver:    path.Base(f.drv),
		KeyName:    k.Name,
		PublicKey:  k.Public().String(),
		Imported:   f.now.Add(-time.Hour),
	}
	if edit != nil {
		edit(&a)
	}
	fp, err := narinfo.Fingerprint(storeDir, a.StorePath, a.NarHash, a.NarSize, a.References)
	if err != nil {
		f.t.Fatal(err)
	}
	a.Sig = k.Sign(fp)
	return a
}

func (f *fixture) allow(narHash narinfo.SHA256, expires time.Time) *AllowEntry {
	return &AllowEntry{StorePath: f.path, NarHash: narHash, Reason: "reviewed", Added: f.now.Add(-24 * time.Hour), Expires: expires}
}

func deny(patterns ...string) []DenyEntry {
	var out []DenyEntry
	for _, p := range patterns {
		out = append(out, DenyEntry{Pattern: p, Reason: "CVE-2022-0000"})
	}
	return out
}

// caNarInfo loads a real Nix-made content-addressed narinfo from testdata.
func caNarInfo(t *testing.T, hash string) *narinfo.NarInfo {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("testdata", hash+".narinfo"))
	if err != nil {
		t.Fatal(err)
	}
	ni, err := narinfo.Parse(raw, storeDir)
	if err != nil {
		t.Fatal(err)
	}
	if ni.CA == "" || len(ni.Sigs) != 0 {
		t.Fatalf("fixture %s: want an unsigned narinfo with CA", hash)
	}
	return ni
}

// Real Nix-made content-addressed paths (see testdata/README.md).
const (
	caRecursive = "nky79z6sva4a91x5rhaal11qxv99px76" // fixed:r:sha256, a directory
	caFlat      = "61aj7swkryfp2b20a5r82689lgcqy8dr" // fixed:sha256, "flat file content\n"
	caText      = "mawqzks1y1qk0yac77rm6ailwnzr4m14" // text:sha256, "hello from toFile\n"
)

// synthCA makes a narinfo whose store path is the one Nix computes for c
// and name, so that narinfo.VerifyCA accepts it.
func synthCA(t *testing.T, c narinfo.CA, name string) *narinfo.NarInfo {
	t.Helper()
	sp, err := narinfo.StorePathFromCA(storeDir, c, name, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	return &narinfo.NarInfo{StorePath: sp, URL: "nar/x.nar", Compression: "none",
		NarHash: sha("some nar"), NarSize: 136, CA: c.String()}
}

func dropLine(raw []byte, prefix string) []byte {
	var out [][]byte
	for _, l := range bytes.SplitAfter(raw, []byte("\n")) {
		if !bytes.HasPrefix(l, []byte(prefix)) {
			out = append(out, l)
		}
	}
	return bytes.Join(out, nil)
}

func TestDecide(t *testing.T) {
	f := newFixture(t)
	up := []verify.PublicKey{f.up.Public()}
	other := f.ni()
	other.NarHash = sha("another nar")
	otherNarHash := other.NarHash
	sri := "sha256-" + base64.StdEncoding.EncodeToString(f.narDigest)
	future, past := f.now.Add(time.Hour), f.now.Add(-time.Hour)
	quorum2 := func(p *Policy) { p.Quorum = 2 }

	caDir := caNarInfo(t, caRecursive)
	caDirRaw := f.signed(caNarInfo(t, caRecursive), f.up)
	caFlatRaw := f.signed(caNarInfo(t, caFlat), f.up)
	caTextRaw := f.signed(caNarInfo(t, caText), f.up)
	caDirAtt := func(k verify.SecretKey, edit func(*Attestation)) Attestation {
		a := Attestation{StorePath: caDir.StorePath, NarHash: caDir.NarHash, NarSize: caDir.NarSize}
		if edit != nil {
			edit(&a)
		}
		a.KeyName, a.PublicKey = k.Name, k.Public().String()
		a.Sig = k.Sign(fingerprint(t, &narinfo.NarInfo{StorePath: a.StorePath, NarHash: a.NarHash, NarSize: a.NarSize, References: a.References}))
		return a
	}

	type tc struct {
		name   string
		hash   string // requested hash; default f.hash
		raw    []byte
		keys   []verify.PublicKey // upstream keys; default up
		policy func(*Policy)
		ev     Evidence

		approved bool
		reason   Reason
		detail   string // substring of Detail; exact when prefixed with "="
		check    func(*testing.T, Decision)
	}
	cases := []tc{
		// Rule 1: upstream_malformed.
		{name: "malformed/garbage", raw: []byte("this is not a narinfo\n"), reason: UpstreamMalformed},
		{name: "malformed/empty", raw: nil, reason: UpstreamMalformed},
		{name: "malformed/binary", raw: []byte{0, 1, 2, 0xff, '\n'}, reason: UpstreamMalformed},
		{name: "malformed/validly signed narinfo for another hash", hash: hashOf(f.dep), raw: f.raw(nil),
			reason: UpstreamMalformed, detail: "answers a request for " + hashOf(f.dep),
			// even with every kind of approval for the requested hash
			ev: Evidence{Allow: &AllowEntry{StorePath: f.dep}}},
		{name: "malformed/store path in another store dir",
			raw:    f.raw(nil),
			policy: func(p *Policy) { p.StoreDir = "/gnu/store" }, reason: UpstreamMalformed},
		{name: "malformed/StorePath line in another store dir",
			raw:    bytes.ReplaceAll(f.raw(nil), []byte("StorePath: /nix/store/"), []byte("StorePath: /gnu/store/")),
			reason: UpstreamMalformed},
		{name: "malformed/StorePath not directly in the store",
			raw:    bytes.Replace(f.raw(nil), []byte("openssl-3.0.7\n"), []byte("openssl-3.0.7/bin\n"), 1),
			reason: UpstreamMalformed},
		{name: "malformed/missing NarHash", raw: dropLine(f.raw(nil), "NarHash:"), reason: UpstreamMalformed, detail: "NarHash"},
		{name: "malformed/missing NarSize", raw: dropLine(f.raw(nil), "NarSize:"), reason: UpstreamMalformed, detail: "NarSize"},
		{name: "malformed/missing StorePath", raw: dropLine(f.raw(nil), "StorePath:"), reason: UpstreamMalformed},
		{name: "malformed/NarHash not sha256",
			raw:    bytes.Replace(f.raw(nil), []byte("NarHash: "+f.narHash.String()), []byte("NarHash: sha1:"+hex.EncodeToString(make([]byte, 20))), 1),
			reason: UpstreamMalformed},
		{name: "malformed/duplicate StorePath", raw: append(f.raw(nil), "StorePath: "+f.dep+"\n"...), reason: UpstreamMalformed},
		{name: "malformed/unknown compression", raw: f.raw(func(ni *narinfo.NarInfo) { ni.Compression = "rar" }),
			ev: Evidence{Allow: f.allow(f.narHash, time.Time{})}, reason: UpstreamMalformed},

		// Rule 2: upstream_unsigned.
		{name: "unsigned/no Sig", raw: f.signed(f.ni()), reason: UpstreamUnsigned},
		{name: "unsigned/no upstream keys configured", raw: f.raw(nil), keys: []verify.PublicKey{}, reason: UpstreamUnsigned},
		{name: "unsigned/Sig by an unknown key", raw: f.signed(f.ni(), f.stranger), reason: UpstreamUnsigned},
		{name: "unsigned/Sig by the key's name but another key", raw: f.signed(f.ni(), f.impostor), reason: UpstreamUnsigned},
		{name: "unsigned/Sig by the right key over another fingerprint",
			raw: func() []byte {
				ni := f.ni()
				ni.NarSize++
				sig := f.up.Sign(fingerprint(t, ni))
				ni = f.ni()
				ni.Sigs = []string{sig}
				return ni.Marshal()
			}(), reason: UpstreamUnsigned},
		{name: "unsigned/Sig over the narinfo before a reference was dropped",
			raw: func() []byte {
				sig := f.up.Sign(fingerprint(t, f.ni()))
				ni := f.ni()
				ni.References = ni.References[:1]
				ni.Sigs = []string{sig}
				return ni.Marshal()
			}(), reason: UpstreamUnsigned},
		{name: "unsigned/Sig by an attester is not the upstream's", raw: f.signed(f.ni(), f.a), reason: UpstreamUnsigned},
		{name: "unsigned/beats quarantine, deny, attestations, allowlist", raw: f.signed(f.ni(), f.stranger),
			ev: Evidence{
				Quarantine:   &Quarantine{StorePath: f.path, Check: "nar_hash"},
				Deny:         deny(f.path),
				Attestations: []Attestation{f.att(f.a, nil)},
				Allow:        f.allow(f.narHash, time.Time{}),
			}, reason: UpstreamUnsigned},
		{name: "unsigned/real CA path without Sig", hash: caRecursive, raw: caNarInfo(t, caRecursive).Marshal(), reason: UpstreamUnsigned},
		{name: "signed/one good Sig among bad ones is enough",
			raw: func() []byte {
				ni := f.ni()
				ni.Sigs = []string{f.impostor.Sign(fingerprint(t, ni)), "cache.example.org-1:garbage", ""}
				return f.signed(ni, f.up)
			}(),
			ev: Evidence{Allow: f.allow(f.narHash, time.Time{})}, approved: true, reason: Allowlisted,
			check: func(t *testing.T, d Decision) {
				if !slices.Equal(d.UpstreamSigners, []string{f.up.Name}) {
					t.Errorf("UpstreamSigners = %v", d.UpstreamSigners)
				}
			}},

		// NAR quarantine: nar_mismatch.
		{name: "nar_mismatch/quarantined", raw: f.raw(nil),
			ev:     Evidence{Quarantine: &Quarantine{StorePath: f.path, Check: "nar_hash", Detail: "got sha256:xyz"}},
			reason: NarMismatch, detail: "nar_hash",
			check: func(t *testing.T, d Decision) {
				if d.Quarantine == nil || d.Quarantine.Check != "nar_hash" {
					t.Errorf("Quarantine = %+v", d.Quarantine)
				}
			}},
		{name: "nar_mismatch/beats allowlist and attestations, and shows them", raw: f.raw(nil),
			ev: Evidence{
				Quarantine:   &Quarantine{StorePath: f.path, Check: "decompress"},
				Attestations: []Attestation{f.att(f.a, nil), f.att(f.b, nil)},
				Allow:        f.allow(f.narHash, time.Time{}),
				Deny:         deny("*-openssl-*"),
			}, reason: NarMismatch,
			check: func(t *testing.T, d Decision) {
				if len(d.Attesters) != 2 || d.Allow == nil || d.Deny == nil {
					t.Errorf("a quarantined path's decision hides evidence: attesters %v, allow %v, deny %v", d.Attesters, d.Allow, d.Deny)
				}
			}},
		{name: "nar_mismatch/beats content address", hash: caRecursive, raw: caDirRaw,
			ev: Evidence{Quarantine: &Quarantine{Check: "nar_size"}}, reason: NarMismatch},

		// An allowlist entry pins the whole fingerprint: the same NarHash
		// with other references or another NarSize is not what was reviewed.
		{name: "allowlist/fingerprint pin", raw: f.raw(nil),
			ev:       Evidence{Allow: &AllowEntry{StorePath: f.path, NarHash: f.narHash, Fingerprint: fingerprint(t, f.ni())}},
			approved: true, reason: Allowlisted},
		{name: "allowlist/fingerprint pin, other references", raw: f.raw(func(ni *narinfo.NarInfo) { ni.References = ni.References[:1] }),
			ev:     Evidence{Allow: &AllowEntry{StorePath: f.path, NarHash: f.narHash, Fingerprint: fingerprint(t, f.ni())}},
			reason: Unattested, detail: "pinned to the fingerprint"},
		{name: "allowlist/fingerprint pin, other NarSize", raw: f.raw(func(ni *narinfo.NarInfo) { ni.NarSize++ }),
			ev:     Evidence{Allow: &AllowEntry{StorePath: f.path, NarHash: f.narHash, Fingerprint: fingerprint(t, f.ni())}},
			reason: Unattested, detail: "pinned to the fingerprint"},

		// too_large: enforced before any evidence, in both modes.
		{name: "too_large/NarSize", raw: f.raw(nil), policy: func(p *Policy) { p.MaxNarSize = f.narSize - 1; p.Report = true },
			ev: Evidence{Attestations: []Attestation{f.att(f.a, nil)}}, reason: TooLarge, detail: "max_nar_size"},
		{name: "too_large/at the bound", raw: f.raw(nil), policy: func(p *Policy) { p.MaxNarSize = f.narSize },
			ev: Evidence{Attestations: []Attestation{f.att(f.a, nil)}}, approved: true, reason: Attested},

		// Rule 3: denied.
		{name: "denied/store path", raw: f.raw(nil), ev: Evidence{Deny: deny(f.path)}, reason: Denied,
			check: func(t *testing.T, d Decision) {
				if d.Deny == nil || d.Deny.Pattern != f.path {
					t.Errorf("Deny = %+v", d.Deny)
				}
			}},
		{name: "denied/bare hash", raw: f.raw(nil), ev: Evidence{Deny: deny(f.hash)}, reason: Denied},
		{name: "denied/NarHash sha256:nix32", raw: f.raw(nil), ev: Evidence{Deny: deny(f.narHash.String())}, reason: Denied},
		{name: "denied/NarHash sha256:base16", raw: f.raw(nil), ev: Evidence{Deny: deny("sha256:" + hex.EncodeToString(f.narDigest))}, reason: Denied},
		{name: "denied/NarHash SRI with a slash", raw: f.raw(nil), ev: Evidence{Deny: deny(sri)}, reason: Denied},
		{name: "denied/name glob", raw: f.raw(nil), ev: Evidence{Deny: deny("*-openssl-3.0.7*")}, reason: Denied},
		{name: "denied/name glob with class", raw: f.raw(nil), ev: Evidence{Deny: deny("*-openssl-3.0.[0-7]")}, reason: Denied},
		{name: "denied/base name", raw: f.raw(nil), ev: Evidence{Deny: deny(path.Base(f.path))}, reason: Denied},
		{name: "denied/first matching entry is reported", raw: f.raw(nil),
			ev: Evidence{Deny: deny(f.dep, "*-openssl-3.0.7*", f.hash)}, reason: Denied,
			detail: `"*-openssl-3.0.7*"`},
		{name: "denied/beats attestations, allowlist pinned", raw: f.raw(nil),
			ev: Evidence{
				Deny:         deny("*-openssl-3.0.7*"),
				Attestations: []Attestation{f.att(f.a, nil), f.att(f.b, nil)},
				Allow:        f.allow(f.narHash, time.Time{}),
			}, reason: Denied},
		{name: "denied/beats attestation mismatch", raw: f.raw(nil),
			ev: Evidence{
				Deny:         deny(f.hash),
				Attestations: []Attestation{f.att(f.a, func(a *Attestation) { a.NarSize++ })},
			}, reason: Denied},
		{name: "denied/beats content address", hash: caFlat, raw: caFlatRaw,
			ev: Evidence{Deny: deny("*-flat.txt")}, reason: Denied},
		{name: "denied/non-matching entries deny nothing", raw: f.raw(nil),
			ev: Evidence{
				Deny: deny(f.dep, hashOf(f.dep), otherNarHash.String(), "*-openssl-3.0.8*", "openssl-3.0.7", path.Base(f.dep),
					"sha512:"+hex.EncodeToString(make([]byte, 64))),
				Allow: f.allow(f.narHash, time.Time{}),
			}, approved: true, reason: Allowlisted},

		// Rule 4: attestation_mismatch.
		{name: "mismatch/other NarHash", raw: f.raw(nil),
			ev:     Evidence{Attestations: []Attestation{f.att(f.a, func(a *Attestation) { a.NarHash = otherNarHash })}},
			reason: AttestationMismatch, detail: f.a.Name,
			check: func(t *testing.T, d Decision) {
				if !slices.Equal(d.Mismatched, []string{f.a.Name}) || len(d.Attesters) != 0 {
					t.Errorf("Mismatched = %v, Attesters = %v", d.Mismatched, d.Attesters)
				}
			}},
		{name: "mismatch/classification: stable beats not_reproducible", raw: f.raw(nil),
			ev: Evidence{Attestations: []Attestation{
				f.att(f.a, func(a *Attestation) {
					a.NarHash = otherNarHash
					a.Rebuild = &Rebuild{Classification: NotReproducible}
				}),
				f.att(f.b, func(a *Attestation) {
					a.NarHash = otherNarHash
					a.Rebuild = &Rebuild{Classification: Stable}
				}),
			}},
			reason: AttestationMismatch,
			check: func(t *testing.T, d Decision) {
				if d.Classification != Stable || len(d.Rebuilds) != 2 || d.Rebuilds[0].Matches || d.Rebuilds[0].Classification != NotReproducible {
					t.Errorf("Classification = %q, Rebuilds = %+v", d.Classification, d.Rebuilds)
				}
			}},
		{name: "mismatch/matching rebuilds shown with key and time", raw: f.raw(nil),
			ev: Evidence{Attestations: []Attestation{
				f.att(f.b, func(a *Attestation) { a.Imported = time.Unix(100, 0) }),
				f.att(f.a, func(a *Attestation) {
					a.NarHash = otherNarHash
					a.Rebuild = &Rebuild{Classification: NotReproducible}
				}),
			}},
			reason: AttestationMismatch,
			check: func(t *testing.T, d Decision) {
				if d.Classification != NotReproducible || len(d.Rebuilds) != 2 || !d.Rebuilds[0].Matches || d.Rebuilds[0].Key != f.b.Name ||
					!d.Rebuilds[0].Imported.Equal(time.Unix(100, 0)) {
					t.Errorf("Classification = %q, Rebuilds = %+v", d.Classification, d.Rebuilds)
				}
			}},
		{name: "mismatch/unclassified", raw: f.raw(nil),
			ev:     Evidence{Attestations: []Attestation{f.att(f.a, func(a *Attestation) { a.NarHash = otherNarHash })}},
			reason: AttestationMismatch,
			check: func(t *testing.T, d Decision) {
				if d.Classification != "" {
					t.Errorf("Classification = %q", d.Classification)
				}
			}},
		{name: "mismatch/other NarSize", raw: f.raw(nil),
			ev:     Evidence{Attestations: []Attestation{f.att(f.a, func(a *Attestation) { a.NarSize = 1 })}},
			reason: AttestationMismatch},
		{name: "mismatch/other references", raw: f.raw(nil),
			ev: Evidence{Attestations: []Attestation{f.att(f.a, func(a *Attestation) {
				a.References = []string{path.Base(f.path), path.Base(mkPath("evil-lib"))}
			})}},
			reason: AttestationMismatch},
		{name: "mismatch/a reference fewer", raw: f.raw(nil),
			ev: Evidence{Attestations: []Attestation{f.att(f.a, func(a *Attestation) {
				a.References = []string{path.Base(f.path)}
			})}},
			reason: AttestationMismatch},
		{name: "mismatch/beats quorum by another key", raw: f.raw(nil),
			ev: Evidence{Attestations: []Attestation{
				f.att(f.b, nil),
				f.att(f.a, func(a *Attestation) { a.NarHash = otherNarHash }),
			}},
			reason: AttestationMismatch,
			check: func(t *testing.T, d Decision) {
				if !slices.Equal(d.Attesters, []string{f.b.Name}) || !slices.Equal(d.Mismatched, []string{f.a.Name}) {
					t.Errorf("Attesters = %v, Mismatched = %v", d.Attesters, d.Mismatched)
				}
			}},
		{name: "mismatch/unpinned allowlist entry does not override", raw: f.raw(nil),
			ev: Evidence{
				Attestations: []Attestation{f.att(f.a, func(a *Attestation) { a.NarHash = otherNarHash })},
				Allow:        f.allow(narinfo.SHA256{}, time.Time{}),
			}, reason: AttestationMismatch},
		{name: "mismatch/allowlist pinned to the attested NarHash does not override", raw: f.raw(nil),
			ev: Evidence{
				Attestations: []Attestation{f.att(f.a, func(a *Attestation) { a.NarHash = otherNarHash })},
				Allow:        f.allow(otherNarHash, time.Time{}),
			}, reason: AttestationMismatch},
		{name: "mismatch/expired pinned allowlist entry does not override", raw: f.raw(nil),
			ev: Evidence{
				Attestations: []Attestation{f.att(f.a, func(a *Attestation) { a.NarHash = otherNarHash })},
				Allow:        f.allow(f.narHash, past),
			}, reason: AttestationMismatch},
		{name: "mismatch/beats content address", hash: caRecursive, raw: caDirRaw,
			ev:     Evidence{Attestations: []Attestation{caDirAtt(f.a, func(a *Attestation) { a.NarSize++ })}},
			reason: AttestationMismatch},
		{name: "mismatch/overridden by allowlist pinned to upstream NarHash", raw: f.raw(nil),
			ev: Evidence{
				Attestations: []Attestation{f.att(f.a, func(a *Attestation) { a.NarHash = otherNarHash })},
				Allow:        f.allow(f.narHash, future),
			}, approved: true, reason: Allowlisted,
			check: func(t *testing.T, d Decision) {
				if !slices.Equal(d.Mismatched, []string{f.a.Name}) || d.Allow == nil {
					t.Errorf("Mismatched = %v, Allow = %v: the evidence must still be shown", d.Mismatched, d.Allow)
				}
			}},
		{name: "mismatch/overridden by pinned allowlist, then attested by another key", raw: f.raw(nil),
			ev: Evidence{
				Attestations: []Attestation{
					f.att(f.a, func(a *Attestation) { a.NarHash = otherNarHash }),
					f.att(f.b, nil),
				},
				Allow: f.allow(f.narHash, time.Time{}),
			}, approved: true, reason: Attested},
		{name: "mismatch/by a key no longer configured is ignored", raw: f.raw(nil),
			ev:     Evidence{Attestations: []Attestation{f.att(f.gone, func(a *Attestation) { a.NarHash = otherNarHash })}},
			reason: Unattested, detail: "=no attestation, allowlist entry or content-address proof",
			check: func(t *testing.T, d Decision) {
				if len(d.Mismatched) != 0 {
					t.Errorf("Mismatched = %v", d.Mismatched)
				}
			}},
		{name: "mismatch/by a configured key's name with another key is ignored", raw: f.raw(nil),
			ev:     Evidence{Attestations: []Attestation{f.att(genKey(t, f.a.Name), func(a *Attestation) { a.NarHash = otherNarHash })}},
			reason: Unattested},
		{name: "match/references in another order and NarHash in base16 still match", raw: f.raw(nil),
			ev: Evidence{Attestations: []Attestation{f.att(f.a, func(a *Attestation) {
				a.References = []string{path.Base(f.path), path.Base(f.dep), path.Base(f.dep)}
				a.NarHash = mustSHA256(t, "sha256:"+hex.EncodeToString(f.narDigest))
			})}},
			approved: true, reason: Attested},

		// Rule 5: attested.
		{name: "attested/quorum 1", raw: f.raw(nil),
			ev:       Evidence{Attestations: []Attestation{f.att(f.a, nil)}},
			approved: true, reason: Attested, detail: "=1 of 1 required attester keys: " + f.a.Name,
			check: func(t *testing.T, d Decision) {
				if d.NarInfo == nil || d.NarInfo.StorePath != f.path || d.Fingerprint != fingerprint(t, f.ni()) {
					t.Errorf("NarInfo = %+v, Fingerprint = %q", d.NarInfo, d.Fingerprint)
				}
				if !slices.Equal(d.Attesters, []string{f.a.Name}) || d.Upstream != "upstream-1" {
					t.Errorf("Attesters = %v, Upstream = %q", d.Attesters, d.Upstream)
				}
			}},
		{name: "attested/quorum 2 with one key", raw: f.raw(nil), policy: quorum2,
			ev:     Evidence{Attestations: []Attestation{f.att(f.b, nil)}},
			reason: Unattested, detail: "=1 attester keys of the 2 required"},
		{name: "attested/quorum 2 with two keys", raw: f.raw(nil), policy: quorum2,
			ev:       Evidence{Attestations: []Attestation{f.att(f.a, nil), f.att(f.b, nil)}},
			approved: true, reason: Attested},
		{name: "attested/the same key twice counts once", raw: f.raw(nil), policy: quorum2,
			ev:     Evidence{Attestations: []Attestation{f.att(f.a, nil), f.att(f.a, nil)}},
			reason: Unattested, detail: "=1 attester keys of the 2 required"},
		{name: "attested/a key no longer configured is ignored", raw: f.raw(nil),
			ev:     Evidence{Attestations: []Attestation{f.att(f.gone, nil)}},
			reason: Unattested, detail: "=no attestation, allowlist entry or content-address proof"},
		{name: "attested/a key no longer configured does not make the quorum", raw: f.raw(nil), policy: quorum2,
			ev:     Evidence{Attestations: []Attestation{f.att(f.a, nil), f.att(f.gone, nil)}},
			reason: Unattested, detail: "=1 attester keys of the 2 required"},
		{name: "attested/a configured key removed from the policy", raw: f.raw(nil),
			policy: func(p *Policy) { p.Attesters = []verify.PublicKey{f.b.Public()} },
			ev:     Evidence{Attestations: []Attestation{f.att(f.a, nil)}},
			reason: Unattested},
		{name: "attested/Sig not over the upstream fingerprint is not counted", raw: f.raw(nil),
			ev: Evidence{Attestations: []Attestation{func() Attestation {
				a := f.att(f.a, nil)
				a.Sig = f.a.Sign(fingerprint(t, other))
				return a
			}()}},
			reason: Unattested,
			check: func(t *testing.T, d Decision) {
				if len(d.Attesters) != 0 || len(d.Mismatched) != 0 {
					t.Errorf("Attesters = %v, Mismatched = %v", d.Attesters, d.Mismatched)
				}
			}},
		{name: "attested/Sig by another key under the attester's name is not counted", raw: f.raw(nil),
			ev: Evidence{Attestations: []Attestation{func() Attestation {
				a := f.att(f.a, nil)
				a.Sig = genKey(t, f.a.Name).Sign(fingerprint(t, f.ni()))
				return a
			}()}},
			reason: Unattested},
		{name: "attested/beats allowlisted", raw: f.raw(nil),
			ev:       Evidence{Attestations: []Attestation{f.att(f.a, nil)}, Allow: f.allow(f.narHash, time.Time{})},
			approved: true, reason: Attested},
		{name: "attested/beats content address", hash: caRecursive, raw: caDirRaw,
			ev:       Evidence{Attestations: []Attestation{caDirAtt(f.a, nil)}},
			approved: true, reason: Attested},
		{name: "attested/short of quorum falls through to the allowlist", raw: f.raw(nil), policy: quorum2,
			ev:       Evidence{Attestations: []Attestation{f.att(f.a, nil)}, Allow: f.allow(f.narHash, time.Time{})},
			approved: true, reason: Allowlisted},

		// Rule 6: allowlisted.
		{name: "allowlisted/unpinned", raw: f.raw(nil), ev: Evidence{Allow: f.allow(narinfo.SHA256{}, time.Time{})},
			approved: true, reason: Allowlisted, detail: "reviewed"},
		{name: "allowlisted/pinned to upstream NarHash", raw: f.raw(nil), ev: Evidence{Allow: f.allow(f.narHash, time.Time{})},
			approved: true, reason: Allowlisted,
			check: func(t *testing.T, d Decision) {
				if d.Allow == nil || d.Allow.NarHash != f.narHash {
					t.Errorf("Allow = %+v", d.Allow)
				}
			}},
		{name: "allowlisted/not yet expired", raw: f.raw(nil), ev: Evidence{Allow: f.allow(f.narHash, future)},
			approved: true, reason: Allowlisted},
		{name: "allowlisted/pinned to another NarHash", raw: f.raw(nil), ev: Evidence{Allow: f.allow(otherNarHash, time.Time{})},
			reason: Unattested, detail: "=allowlist entry pinned to " + otherNarHash.String() + ", upstream serves " + f.narHash.String()},
		{name: "allowlisted/expired", raw: f.raw(nil), ev: Evidence{Allow: f.allow(f.narHash, past)},
			reason: Unattested, detail: "=allowlist entry expired " + past.Format(time.RFC3339)},
		{name: "allowlisted/expires exactly now", raw: f.raw(nil), ev: Evidence{Allow: f.allow(f.narHash, f.now)},
			reason: Unattested, detail: "expired"},
		{name: "allowlisted/beats content address", hash: caFlat, raw: caFlatRaw,
			ev:       Evidence{Allow: &AllowEntry{StorePath: "/nix/store/61aj7swkryfp2b20a5r82689lgcqy8dr-flat.txt"}},
			approved: true, reason: Allowlisted},

		// Rule 7: content_addressed, with real Nix-made narinfos.
		{name: "content_addressed/fixed:r:sha256", hash: caRecursive, raw: caDirRaw, approved: true, reason: ContentAddressed,
			detail: "fixed:r:sha256:"},
		{name: "content_addressed/flat fixed:sha256", hash: caFlat, raw: caFlatRaw, approved: true, reason: ContentAddressed},
		{name: "content_addressed/text:sha256", hash: caText, raw: caTextRaw, approved: true, reason: ContentAddressed},
		{name: "content_addressed/off", hash: caRecursive, raw: caDirRaw,
			policy: func(p *Policy) { p.ContentAddressed = false },
			reason: Unattested, detail: "=no attestation, allowlist entry or content-address proof"},
		{name: "content_addressed/off for flat", hash: caFlat, raw: caFlatRaw,
			policy: func(p *Policy) { p.ContentAddressed = false }, reason: Unattested},
		{name: "content_addressed/NarHash is not the CA hash", hash: caRecursive,
			raw: func() []byte {
				ni := caNarInfo(t, caRecursive)
				ni.NarHash = otherNarHash
				return f.signed(ni, f.up)
			}(),
			reason: Unattested, detail: "content address does not prove the path"},
		{name: "content_addressed/CA for other content", hash: caFlat,
			raw: func() []byte {
				ni := caNarInfo(t, caFlat)
				ni.CA = "fixed:" + narinfo.FormatHash("sha256", sum("other content\n"))
				return f.signed(ni, f.up)
			}(),
			reason: Unattested, detail: "does not match store path"},
		{name: "content_addressed/claimed by a path it does not name",
			raw: f.raw(func(ni *narinfo.NarInfo) {
				ni.References = nil
				ni.CA = "fixed:r:" + f.narHash.String()
			}),
			reason: Unattested, detail: "content address does not prove the path"},
		{name: "content_addressed/reference added to a CA path", hash: caRecursive,
			raw: func() []byte {
				ni := caNarInfo(t, caRecursive)
				ni.References = []string{path.Base(f.dep)}
				return f.signed(ni, f.up)
			}(),
			reason: Unattested},
		{name: "content_addressed/fixed:sha1 proves the path but is not verifiable",
			hash: func() string {
				return hashOf(synthCA(t, narinfo.CA{Method: narinfo.CAFlat, Algo: "sha1", Digest: sha1Sum("x")}, "x.txt").StorePath)
			}(),
			raw:    f.signed(synthCA(t, narinfo.CA{Method: narinfo.CAFlat, Algo: "sha1", Digest: sha1Sum("x")}, "x.txt"), f.up),
			reason: Unattested, detail: "only sha256 content addresses are proven"},
		{name: "content_addressed/fixed:r:sha512 proves the path but is not verifiable",
			hash: func() string {
				return hashOf(synthCA(t, narinfo.CA{Method: narinfo.CANar, Algo: "sha512", Digest: make([]byte, 64)}, "src").StorePath)
			}(),
			raw:    f.signed(synthCA(t, narinfo.CA{Method: narinfo.CANar, Algo: "sha512", Digest: make([]byte, 64)}, "src"), f.up),
			reason: Unattested, detail: "only sha256 content addresses are proven"},

		// Rule 8.
		{name: "unattested/no evidence", raw: f.raw(nil), reason: Unattested,
			detail: "=no attestation, allowlist entry or content-address proof"},
		{name: "unattested/evidence about other paths is not consulted", raw: f.raw(nil),
			ev: Evidence{Deny: deny(f.dep, "*-glibc-*")}, reason: Unattested},
	}

	seen := map[string]bool{}
	for _, c := range cases {
		if seen[c.name] {
			t.Fatalf("duplicate case %q", c.name)
		}
		seen[c.name] = true
		t.Run(c.name, func(t *testing.T) {
			p := f.policy()
			if c.policy != nil {
				c.policy(&p)
			}
			in := Input{Hash: f.hash, Raw: c.raw, Upstream: "upstream-1", UpstreamKeys: up}
			if c.hash != "" {
				in.Hash = c.hash
			}
			if c.keys != nil {
				in.UpstreamKeys = c.keys
			}
			for _, mode := range []bool{false, true} {
				p.Report = mode
				d := p.Decide(in, c.ev, f.now)
				if d.Approved != c.approved || d.Reason != c.reason {
					t.Fatalf("report=%v: got %s (%s), want approved=%v reason=%s", mode, d, d.Detail, c.approved, c.reason)
				}
				if want, exact := strings.CutPrefix(c.detail, "="); exact && d.Detail != want {
					t.Errorf("Detail = %q, want %q", d.Detail, want)
				} else if !exact && !strings.Contains(d.Detail, c.detail) {
					t.Errorf("Detail = %q, want it to contain %q", d.Detail, c.detail)
				}
				if c.approved && (d.NarInfo == nil || d.Fingerprint == "" || len(d.UpstreamSigners) == 0) {
					t.Errorf("approved decision without its evidence: %+v", d)
				}
				if c.check != nil {
					c.check(t, d)
				}
			}
		})
	}
}

func sha1Sum(s string) []byte {
	d := sha1.Sum([]byte(s))
	return d[:]
}

// Decide must not modify the evidence it is given (the server may share it).
func TestDecideDoesNotModifyEvidence(t *testing.T) {
	f := newFixture(t)
	ev := Evidence{
		Attestations: []Attestation{f.att(f.a, nil), f.att(f.b, func(a *Attestation) { a.NarSize++ })},
		Allow:        f.allow(f.narHash, time.Time{}),
		Deny:         deny("*-nothing-*"),
	}
	refs := slices.Clone(ev.Attestations[0].References)
	d := f.policy().Decide(Input{Hash: f.hash, Raw: f.raw(nil), Upstream: "u", UpstreamKeys: []verify.PublicKey{f.up.Public()}}, ev, f.now)
	// b's mismatch is overridden by the pinned entry; a's attestation approves.
	if d.Reason != Attested {
		t.Fatalf("got %s", d)
	}
	if !slices.Equal(ev.Attestations[0].References, refs) {
		t.Errorf("References modified: %v", ev.Attestations[0].References)
	}
}

func TestFlatSHA256(t *testing.T) {
	cases := []struct {
		name string
		ni   *narinfo.NarInfo
		want narinfo.SHA256
		err  string
	}{
		{"recursive: the NarHash is the commitment", caNarInfo(t, caRecursive), narinfo.SHA256{}, ""},
		{"flat", caNarInfo(t, caFlat), sha("flat file content\n"), ""},
		{"text", caNarInfo(t, caText), sha("hello from toFile\n"), ""},
		{"no CA", &narinfo.NarInfo{}, narinfo.SHA256{}, "only sha256"},
		{"flat sha1", &narinfo.NarInfo{CA: "fixed:sha1:" + hex.EncodeToString(sha1Sum("x"))}, narinfo.SHA256{}, "only sha256"},
		{"recursive sha512", &narinfo.NarInfo{CA: "fixed:r:sha512:" + hex.EncodeToString(make([]byte, 64))}, narinfo.SHA256{}, "only sha256"},
		{"git", &narinfo.NarInfo{CA: "fixed:git:sha256:" + hex.EncodeToString(make([]byte, 32))}, narinfo.SHA256{}, "only sha256"},
		{"flat sha256 bad digest", &narinfo.NarInfo{CA: "fixed:sha256:xyz"}, narinfo.SHA256{}, "bad hash"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := FlatSHA256(c.ni)
			if c.err != "" {
				if err == nil || !strings.Contains(err.Error(), c.err) {
					t.Fatalf("err = %v, want %q", err, c.err)
				}
				return
			}
			if err != nil || got != c.want {
				t.Fatalf("got %x, %v; want %x", got, err, c.want)
			}
		})
	}
}

// Decision.NAR carries the narinfo's promises to the NAR verifier, plus the
// content hash for a path approved by its flat or text content address.
func TestDecisionNAR(t *testing.T) {
	f := newFixture(t)
	up := []verify.PublicKey{f.up.Public()}
	decide := func(hash string, raw []byte, ev Evidence) Decision {
		t.Helper()
		d := f.policy().Decide(Input{Hash: hash, Raw: raw, Upstream: "u", UpstreamKeys: up}, ev, f.now)
		if !d.Approved {
			t.Fatalf("setup: %s %s", d, d.Detail)
		}
		return d
	}
	flat := caNarInfo(t, caFlat)
	flatRaw := f.signed(caNarInfo(t, caFlat), f.up)
	promised := verify.Expect{Compression: flat.Compression, FileHash: flat.FileHash, FileSize: flat.FileSize,
		NarHash: flat.NarHash, NarSize: flat.NarSize}

	withFlat := promised
	withFlat.Flat = sha("flat file content\n")
	cases := []struct {
		name string
		d    Decision
		want verify.Expect
	}{
		{"flat content address adds the content hash", decide(caFlat, flatRaw, Evidence{}), withFlat},
		{"the same path allowlisted has no content hash", decide(caFlat, flatRaw, Evidence{Allow: &AllowEntry{StorePath: flat.StorePath}}), promised},
		{"text content address adds the content hash", decide(caText, f.signed(caNarInfo(t, caText), f.up), Evidence{}),
			func() verify.Expect {
				ni := caNarInfo(t, caText)
				return verify.Expect{Compression: ni.Compression, FileHash: ni.FileHash, FileSize: ni.FileSize,
					NarHash: ni.NarHash, NarSize: ni.NarSize, Flat: sha("hello from toFile\n")}
			}()},
		{"recursive content address: the NarHash is the commitment", decide(caRecursive, f.signed(caNarInfo(t, caRecursive), f.up), Evidence{}),
			func() verify.Expect {
				ni := caNarInfo(t, caRecursive)
				return verify.Expect{Compression: ni.Compression, FileHash: ni.FileHash, FileSize: ni.FileSize,
					NarHash: ni.NarHash, NarSize: ni.NarSize}
			}()},
		{"attested", decide(f.hash, f.raw(nil), Evidence{Attestations: []Attestation{f.att(f.a, nil)}}),
			verify.Expect{Compression: narinfo.CompressionXZ, FileHash: sha("file"), FileSize: 1234, NarHash: f.narHash, NarSize: f.narSize}},
	}
	for _, c := range cases {
		if got := c.d.NAR(); got != c.want {
			t.Errorf("%s: NAR() = %+v, want %+v", c.name, got, c.want)
		}
	}
}

func TestAllowEntryExpired(t *testing.T) {
	t0 := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	cases := []struct {
		expires time.Time
		want    bool
	}{
		{time.Time{}, false},
		{t0.Add(time.Nanosecond), false},
		{t0, true},
		{t0.Add(-time.Second), true},
	}
	for _, c := range cases {
		if got := (AllowEntry{Expires: c.expires}).Expired(t0); got != c.want {
			t.Errorf("Expires %v: Expired = %v, want %v", c.expires, got, c.want)
		}
	}
}

func TestClosure(t *testing.T) {
	f := newFixture(t)
	up := []verify.PublicKey{f.up.Public()}
	ok := f.policy().Decide(Input{Hash: f.hash, Raw: f.raw(nil), Upstream: "u", UpstreamKeys: up},
		Evidence{Allow: f.allow(f.narHash, time.Time{})}, f.now)
	if ok.Reason != Allowlisted {
		t.Fatalf("setup: %s %s", ok, ok.Detail)
	}
	rejected := f.policy().Decide(Input{Hash: f.hash, Raw: f.raw(nil), Upstream: "u", UpstreamKeys: up}, Evidence{}, f.now)
	if rejected.Reason != Unattested {
		t.Fatalf("setup: %s", rejected)
	}
	dep := path.Base(f.dep)
	approvedDep := Decision{Approved: true, Reason: Attested}

	cases := []struct {
		name    string
		require bool
		d       Decision
		refs    map[string]Decision
		reason  Reason
		detail  string
	}{
		{"off: a missing reference is fine", false, ok, nil, Allowlisted, ""},
		{"off: a rejected reference is fine", false, ok, map[string]Decision{dep: rejected}, Allowlisted, ""},
		{"on: every reference approved, self-reference ignored", true, ok, map[string]Decision{dep: approvedDep}, Allowlisted, ""},
		{"on: missing reference", true, ok, map[string]Decision{}, ClosureIncomplete, dep + " (not found)"},
		{"on: rejected reference", true, ok, map[string]Decision{dep: rejected}, ClosureIncomplete, dep + " (unattested)"},
		{"on: self-reference rejected is still ignored", true, ok,
			map[string]Decision{dep: approvedDep, path.Base(f.path): rejected}, Allowlisted, ""},
		{"on: a rejected decision is left alone", true, rejected, map[string]Decision{}, Unattested, ""},
		{"on: a decision without narinfo is left alone", true, Decision{Approved: true, Reason: Attested}, nil, Attested, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := f.policy()
			p.RequireClosure = c.require
			got := p.Closure(c.d, c.refs)
			if got.Reason != c.reason || got.Approved != (c.reason != ClosureIncomplete && c.d.Approved) {
				t.Fatalf("got %s (%s), want %s", got, got.Detail, c.reason)
			}
			if !strings.Contains(got.Detail, c.detail) {
				t.Errorf("Detail = %q, want %q", got.Detail, c.detail)
			}
			if c.reason == ClosureIncomplete && got.NarInfo == nil {
				t.Error("closure_incomplete lost the narinfo")
			}
		})
	}

	// Several missing references are listed sorted.
	ni := f.ni()
	ni.References = []string{path.Base(mkPath("zlib-1")), path.Base(f.path), path.Base(mkPath("attr-2"))}
	d := Decision{Approved: true, Reason: Attested, NarInfo: ni}
	got := Policy{StoreDir: storeDir, RequireClosure: true}.Closure(d, nil)
	missing := []string{path.Base(mkPath("zlib-1")) + " (not found)", path.Base(mkPath("attr-2")) + " (not found)"}
	slices.Sort(missing)
	want := "references not approved: " + strings.Join(missing, ", ")
	if got.Reason != ClosureIncomplete || got.Detail != want {
		t.Errorf("got %s %q, want %q", got, got.Detail, want)
	}
}

func TestServed(t *testing.T) {
	// NarMismatch and StaleNarInfo (like rules 1–2) are refused in both modes.
	served := map[Reason]bool{Denied: true, AttestationMismatch: true, Unattested: true, ClosureIncomplete: true}
	for _, r := range Reasons {
		for _, report := range []bool{false, true} {
			p := Policy{Report: report}
			rejected := Decision{Approved: false, Reason: r}
			if got, want := p.Served(rejected), report && served[r]; got != want {
				t.Errorf("report=%v rejected %s: Served = %v, want %v", report, r, got, want)
			}
		}
	}
	for _, r := range []Reason{Attested, Allowlisted, ContentAddressed} {
		for _, report := range []bool{false, true} {
			if !(Policy{Report: report}).Served(Decision{Approved: true, Reason: r}) {
				t.Errorf("report=%v: approved %s not served", report, r)
			}
		}
	}
	if len(Reasons) != 12 { // too_large, like stale_narinfo and nar_mismatch, is never served
		t.Errorf("Reasons has %d entries; update this test", len(Reasons))
	}
}

func TestDecisionString(t *testing.T) {
	if got := (Decision{Approved: true, Reason: Attested}).String(); got != "approved; reason=attested" {
		t.Error(got)
	}
	if got := (Decision{Reason: NarMismatch}).String(); got != "rejected; reason=nar_mismatch" {
		t.Error(got)
	}
}

func TestDenyKind(t *testing.T) {
	p := mkPath("openssl-3.0.7")
	h := hashOf(p)
	d := sum("x")
	sriSlash := ""
	for i := 0; sriSlash == ""; i++ {
		s := "sha256-" + base64.StdEncoding.EncodeToString(sum("sri "+string(rune('a'+i))))
		if strings.Contains(s, "/") {
			sriSlash = s
		}
	}
	cases := []struct{ pattern, want string }{
		{p, "path"},
		{h, "hash"},
		{narinfo.FormatHash("sha256", d), "nar_hash"},
		{"sha256:" + hex.EncodeToString(d), "nar_hash"},
		{"sha256:" + base64.StdEncoding.EncodeToString(d), "nar_hash"},
		{"sha256-" + base64.StdEncoding.EncodeToString(d), "nar_hash"},
		{sriSlash, "nar_hash"},
		{"sha512:" + hex.EncodeToString(make([]byte, 64)), "nar_hash"},
		{"*-openssl-3.0.7*", "glob"},
		{"*-openssl-3.0.[0-7]", "glob"},
		{"?" + h[1:] + "-*", "glob"},
		{path.Base(p), "name"},

		{"", ""},
		{"/etc/passwd", ""},
		{"a/b*", ""},
		{"*/openssl*", ""},
		{"[", ""},
		{"*-openssl-[", ""},
		{"openssl", ""},
		{"openssl-3.0.7", ""},
		{h[:31], ""},
		{h + "x", ""},
		{storeDir, ""},
		{storeDir + "/", ""},
		{storeDir + "/" + h, ""},
		{storeDir + "/garbage", ""},
		{p + "/bin/openssl", ""},
		{"/gnu/store/" + path.Base(p), ""},
		{"sha256:xyz", ""},
		{"md5:" + hex.EncodeToString(make([]byte, 16)), ""},
		{"sha256", ""},
	}
	for _, c := range cases {
		if got := DenyKind(c.pattern, storeDir); got != c.want {
			t.Errorf("DenyKind(%q) = %q, want %q", c.pattern, got, c.want)
		}
	}
}

func TestDenyMatches(t *testing.T) {
	f := newFixture(t)
	ni := f.ni()
	other := mkPath("openssl-3.0.8")
	cases := []struct {
		pattern string
		want    bool
	}{
		{f.path, true},
		{other, false},
		{f.hash, true},
		{hashOf(other), false},
		{f.narHash.String(), true},
		{"sha256-" + base64.StdEncoding.EncodeToString(f.narDigest), true},
		{"sha256:" + hex.EncodeToString(f.narDigest), true},
		{narinfo.FormatHash("sha256", sum("other")), false},
		{"sha512:" + hex.EncodeToString(make([]byte, 64)), false},
		{"*-openssl-3.0.7*", true},
		{"*-openssl-3.0.7", true},
		{"*-openssl-3.0.8*", false},
		{"*-openssl-3.0.7-dev*", false},
		{"openssl*", false}, // the glob is over the base name, which starts with the hash
		{path.Base(f.path), true},
		{path.Base(other), false},
		{"", false},
		{"/etc/passwd", false},
		{"a/b*", false},
	}
	for _, c := range cases {
		if got := DenyMatches(c.pattern, ni.StorePath, ni.NarHash, storeDir); got != c.want {
			t.Errorf("DenyMatches(%q) = %v, want %v", c.pattern, got, c.want)
		}
	}
}
