// Package attest parses attestation input: what rebuilders say about store paths,
// in every shape `cacheproxy attest import` and POST /admin/v1/attestations accept
// (`nix path-info --json --sigs` as produced by Nix <= 2.18 and Lix, by Nix
// 2.19-2.32, and by Nix >= 2.33 with --json-format 2, or narinfo text).
//
// Trust model: this package trusts nothing and decides nothing. A Claim is only what
// the input says; it becomes an attestation only after a caller verifies one of its
// Sigs, with a configured attester key, over the fingerprint built from the upstream
// narinfo (README, "Decision rules"). Parsing is therefore strict about shape (so a
// typo is reported instead of silently producing a claim nobody can verify) and
// all-or-nothing (so an import is never half applied), but it does not reject claims
// for lacking signatures: the importer reports those.
package attest

import (
	"bytes"
	"fmt"
	"io"
	"sort"
	"unicode/utf8"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// Claim is one rebuilder's statement about one path: the fields of its fingerprint
// and the signatures over it.
type Claim struct {
	StorePath  string // absolute
	NarHash    narinfo.SHA256
	NarSize    uint64   // never 0
	References []string // basenames, sorted, without duplicates
	Deriver    string   // basename or ""
	Sigs       []string // "keyname:base64", in input order
	CA         string   // normalized narinfo form ("fixed:r:sha256:<nix32>", ...) or ""
	// Rebuild is the optional "cacheproxy" object of a path-info JSON
	// entry: what the rebuilder said of its rebuild. No signature covers
	// it.
	Rebuild *Rebuild
}

// Rebuild is a rebuilder's report on how it got a claim's NarHash:
//
//	"cacheproxy": {"classification": "stable" | "not_reproducible",
//	               "upstreamNarHash": "sha256:…",
//	               "builds": [{"narHash": "sha256:…", "narSize": N}, …]}
//
// Every field is optional; unknown fields are refused.
type Rebuild struct {
	Classification  string         // "stable", "not_reproducible" or ""
	UpstreamNarHash narinfo.SHA256 // zero when not given
	Builds          []Build
}

// Build is one build's result on the rebuilder.
type Build struct {
	NarHash narinfo.SHA256
	NarSize uint64
}

// Classifications a rebuilder may give.
const (
	ClassStable          = "stable"           // two builds agreed: the upstream serves something else
	ClassNotReproducible = "not_reproducible" // two builds differed
)

// Fingerprint returns the Nix fingerprint the claim's signatures are over.
func (c Claim) Fingerprint(storeDir string) (string, error) {
	return narinfo.Fingerprint(storeDir, c.StorePath, c.NarHash, c.NarSize, c.References)
}

// Result is everything found in one input.
type Result struct {
	Claims []Claim // in input order
	// Invalid lists the absolute store paths the input reports as not valid in the
	// rebuilder's store (`"valid": false` in the array form, null in the object
	// forms). They carry no claim but are worth reporting to the operator.
	Invalid []string
}

// Format names an input shape, as detected by Detect.
type Format string

const (
	FormatJSONArray  Format = "path-info-array"  // Nix <= 2.18, Lix
	FormatJSONObject Format = "path-info-object" // Nix 2.19-2.32, and --json-format 2+ envelopes
	FormatNarinfo    Format = "narinfo"
)

// Detect tells the input shape from the first non-space byte: '[' array, '{'
// object, anything else narinfo text.
func Detect(data []byte) Format {
	t := bytes.TrimLeft(trimBOM(data), " \t\r\n")
	switch {
	case len(t) > 0 && t[0] == '[':
		return FormatJSONArray
	case len(t) > 0 && t[0] == '{':
		return FormatJSONObject
	default:
		return FormatNarinfo
	}
}

func trimBOM(b []byte) []byte { return bytes.TrimPrefix(b, []byte("\xef\xbb\xbf")) }

// Parse accepts every input `cacheproxy attest import` takes and returns the claims
// in input order. Entries the input marks as invalid paths are skipped; use
// ParseResult to see them. On any error nothing is returned, and the error names
// the entry (1-based, with its path when known) and the field.
func Parse(data []byte, storeDir string) ([]Claim, error) {
	r, err := ParseResult(data, storeDir)
	if err != nil {
		return nil, err
	}
	return r.Claims, nil
}

// ParseResult is Parse that also returns the paths reported invalid. It
// holds every claim in memory; an import of any size reads them one at a
// time with a Decoder instead.
func ParseResult(data []byte, storeDir string) (*Result, error) {
	d, err := NewDecoder(bytes.NewReader(data), storeDir)
	if err != nil {
		return nil, err
	}
	r := &Result{}
	for {
		c, err := d.Next()
		if err == io.EOF {
			r.Invalid = d.Invalid
			return r, nil
		}
		if err != nil {
			return nil, err
		}
		r.Claims = append(r.Claims, c)
	}
}

func claimFromNarinfo(ni *narinfo.NarInfo) (Claim, error) {
	c := Claim{
		StorePath:  ni.StorePath,
		NarHash:    ni.NarHash,
		NarSize:    ni.NarSize,
		References: sortRefs(ni.References),
		Deriver:    ni.Deriver,
		Sigs:       textSigs(ni.Sigs),
	}
	if ni.CA != "" {
		ca, err := narinfo.ParseCA(ni.CA)
		if err != nil {
			return Claim{}, fmt.Errorf("CA: %w", err)
		}
		c.CA = ca.String()
	}
	return c, nil
}

// textSigs keeps the signatures that are valid UTF-8. Any other can match
// no configured key (key names are TOML strings, the signature base64), and
// JSON, the form claims are exported and stored in, cannot carry it intact.
func textSigs(sigs []string) []string {
	out := make([]string, 0, len(sigs))
	for _, s := range sigs {
		if utf8.ValidString(s) {
			out = append(out, s)
		}
	}
	return out
}

// sortRefs returns refs sorted and de-duplicated, the order Nix's std::set gives.
func sortRefs(refs []string) []string {
	if len(refs) == 0 {
		return nil
	}
	out := append([]string(nil), refs...)
	sort.Strings(out)
	j := 1
	for i := 1; i < len(out); i++ {
		if out[i] != out[j-1] {
			out[j] = out[i]
			j++
		}
	}
	return out[:j]
}
