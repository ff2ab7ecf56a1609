package cache

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/policy"
)

// Attestations are the bulk of the state at fleet scale (a million or
// more), so they are stored in a compact binary form rather than JSON:
// hashes and signatures as bytes, the public key and key name not at all
// (the bbolt key ends with the public key, whose name is the key name).
// That keeps the state file under 1 KiB per attestation and makes reading
// a path's evidence cheaper. Values written as JSON by earlier versions
// (they start with '{') are still read.
//
// Layout, after the version byte attestV1: StorePath (tag 1, the store dir
// and the name as strings, the hash being the key's; tag 0, the whole path
// as a string), NarHash (32
// bytes), NarSize (uvarint), references (uvarint count, then each a base
// name), Deriver (base name), Sig, Imported (varint unix nanoseconds).
// Strings are a uvarint length and the bytes. A base name is tag 1, the 20
// bytes of its nix32 hash and the rest as a string (tag 0: the whole name
// as a string; tag 2: empty). A signature is tag 1 and its 64 bytes when it
// is "<key name>:<canonical base64>", tag 0 and the string otherwise.
const attestV1 = 1

func encodeAttestation(a policy.Attestation) []byte {
	b := make([]byte, 0, 256+len(a.References)*40)
	b = append(b, attestV1)
	// The store path's hash is the key's first part: the value holds the
	// store dir and the name.
	hash := narinfo.PathHash(a.StorePath)
	if dir, rest, ok := strings.Cut(a.StorePath, "/"+hash+"-"); ok && len(hash) == narinfo.HashLen && !strings.Contains(rest, "/") {
		b = append(b, 1)
		b = appendString(b, dir)
		b = appendString(b, rest)
	} else {
		b = append(b, 0)
		b = appendString(b, a.StorePath)
	}
	b = append(b, a.NarHash[:]...)
	b = binary.AppendUvarint(b, a.NarSize)
	b = binary.AppendUvarint(b, uint64(len(a.References)))
	for _, r := range a.References {
		b = appendBaseName(b, r)
	}
	b = appendBaseName(b, a.Deriver)
	if raw, ok := compactSig(a.KeyName, a.Sig); ok {
		b = append(b, 1)
		b = append(b, raw...)
	} else {
		b = append(b, 0)
		b = appendString(b, a.Sig)
	}
	b = binary.AppendVarint(b, a.Imported.UnixNano())
	if r := a.Rebuild; r != nil {
		b = append(b, tagRebuild)
		b = appendString(b, string(r.Classification))
		b = append(b, r.UpstreamNarHash[:]...)
		b = binary.AppendUvarint(b, uint64(len(r.Builds)))
		for _, bd := range r.Builds {
			b = append(b, bd.NarHash[:]...)
			b = binary.AppendUvarint(b, bd.NarSize)
		}
	}
	return b
}

// tagRebuild starts the optional trailing section holding the rebuilder's
// report (policy.Rebuild): classification, upstream NarHash (32 bytes),
// then a uvarint count of builds, each a NarHash and a uvarint NarSize.
const tagRebuild = 1

// compactSig returns the signature bytes when sig is exactly
// "<keyName>:" and their canonical base64.
func compactSig(keyName, sig string) ([]byte, bool) {
	name, enc, ok := strings.Cut(sig, ":")
	if !ok || name != keyName {
		return nil, false
	}
	raw, err := base64.StdEncoding.DecodeString(enc)
	if err != nil || len(raw) != 64 || base64.StdEncoding.EncodeToString(raw) != enc {
		return nil, false
	}
	return raw, true
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendBaseName(b []byte, s string) []byte {
	if s == "" {
		return append(b, 2)
	}
	if len(s) > narinfo.HashLen && s[narinfo.HashLen] == '-' {
		if h, ok := decodeNix32Hash(s[:narinfo.HashLen]); ok {
			b = append(b, 1)
			b = append(b, h[:]...)
			return appendString(b, s[narinfo.HashLen:])
		}
	}
	b = append(b, 0)
	return appendString(b, s)
}

// nix32Digit maps a byte to its value in Nix's base-32 alphabet, or 0xff.
var nix32Digit = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for i := range len(nixbase32.Alphabet) {
		t[nixbase32.Alphabet[i]] = byte(i)
	}
	return t
}()

// decodeNix32Hash decodes the 32 characters of a store path hash, as
// nixbase32.DecodeString does (the last character holds the lowest five
// bits), with a table instead of a search of the alphabet per character:
// an import encodes nine of these per attestation. Every 32 characters of
// the alphabet are the one encoding of their 160 bits, so it succeeds
// exactly when DecodeString does and encoding gives s back.
func decodeNix32Hash(s string) (h [20]byte, ok bool) {
	if len(s) != narinfo.HashLen {
		return h, false
	}
	for n := range narinfo.HashLen {
		d := nix32Digit[s[len(s)-1-n]]
		if d == 0xff {
			return h, false
		}
		i, j := n*5/8, n*5%8
		h[i] |= d << j
		if i+1 < len(h) {
			h[i+1] |= d >> (8 - j)
		}
	}
	return h, true
}

// decodeAttestation reads a stored attestation; key is its bbolt key
// ("<hash>/<public key>").
func decodeAttestation(key, v []byte) (policy.Attestation, error) {
	var a policy.Attestation
	if len(v) > 0 && v[0] == '{' {
		err := json.Unmarshal(v, &a)
		return a, err
	}
	_, pub, ok := strings.Cut(string(key), "/")
	if !ok {
		return a, errors.New("key without a public key")
	}
	a.PublicKey = pub
	a.KeyName, _, _ = strings.Cut(pub, ":")
	d := decoder{b: v}
	if ver := d.byte(); ver != attestV1 {
		return a, fmt.Errorf("unknown attestation encoding %d (%d bytes)", ver, len(v))
	}
	switch d.byte() {
	case 1:
		hash, _, _ := strings.Cut(string(key), "/")
		dir := d.string()
		a.StorePath = dir + "/" + hash + "-" + d.string()
	default:
		a.StorePath = d.string()
	}
	copy(a.NarHash[:], d.bytes(32))
	a.NarSize = d.uvarint()
	if n := d.uvarint(); n > 0 && d.err == nil {
		if n > uint64(len(d.b)) {
			return a, errors.New("truncated attestation")
		}
		a.References = make([]string, n)
		for i := range a.References {
			a.References[i] = d.baseName()
		}
	}
	a.Deriver = d.baseName()
	switch d.byte() {
	case 1:
		a.Sig = a.KeyName + ":" + base64.StdEncoding.EncodeToString(d.bytes(64))
	default:
		a.Sig = d.string()
	}
	ns, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail()
	} else {
		d.b = d.b[n:]
		a.Imported = time.Unix(0, ns).UTC()
	}
	if d.err == nil && len(d.b) != 0 {
		if d.byte() != tagRebuild {
			return a, fmt.Errorf("unknown trailing section in attestation (%d bytes)", len(v))
		}
		r := &policy.Rebuild{Classification: policy.Classification(d.string())}
		copy(r.UpstreamNarHash[:], d.bytes(32))
		if n := d.uvarint(); n > 0 && d.err == nil {
			if n > uint64(len(d.b)) {
				return a, errors.New("truncated attestation")
			}
			r.Builds = make([]policy.Build, n)
			for i := range r.Builds {
				copy(r.Builds[i].NarHash[:], d.bytes(32))
				r.Builds[i].NarSize = d.uvarint()
			}
		}
		a.Rebuild = r
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail()
	}
	return a, d.err
}

// decoder reads the binary form; the first error sticks.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = errors.New("truncated attestation")
	}
	d.b = nil
}

func (d *decoder) byte() byte {
	if len(d.b) < 1 {
		d.fail()
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) bytes(n int) []byte {
	if len(d.b) < n {
		d.fail()
		return make([]byte, n)
	}
	out := d.b[:n]
	d.b = d.b[n:]
	return out
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return ""
	}
	return string(d.bytes(int(n)))
}

func (d *decoder) baseName() string {
	switch d.byte() {
	case 1:
		h := nixbase32.EncodeToString(d.bytes(20))
		return h + d.string()
	case 2:
		return ""
	default:
		return d.string()
	}
}
