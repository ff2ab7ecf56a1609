// Package policy holds cacheproxy's decision rules, all of them, in the
// order in which they apply. Decide is a pure function of an upstream
// narinfo, the evidence stored about its path, and the time; everything else
// in the program only calls it.
//
// Trust model: an upstream's signature proves only where a narinfo came from
// (rules 1–2). What makes a path acceptable is the organisation's own
// evidence: rebuild attestations by configured attester keys that sign the
// very fingerprint the upstream serves (rule 5), a reviewed allowlist entry
// pinned to that NarHash (rule 6), or Nix's content addressing, which makes
// the store path itself a commitment to the content (rule 7). Operators can
// refuse anything (rule 3), and an attester that rebuilt something else than
// the upstream serves raises the alarm (rule 4).
package policy

import (
	"fmt"
	"path"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/narinfo"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// Reason names why a path was approved or rejected. The values are part of
// the HTTP header, the metrics and the admin API.
type Reason string

const (
	UpstreamMalformed   Reason = "upstream_malformed"
	UpstreamUnsigned    Reason = "upstream_unsigned"
	Denied              Reason = "denied"
	AttestationMismatch Reason = "attestation_mismatch"
	Attested            Reason = "attested"
	Allowlisted         Reason = "allowlisted"
	ContentAddressed    Reason = "content_addressed"
	Unattested          Reason = "unattested"
	NarMismatch         Reason = "nar_mismatch"
	ClosureIncomplete   Reason = "closure_incomplete"
	// StaleNarInfo refuses a NAR request whose path is approved but whose
	// file is not the one the current decision names: the client holds an
	// older narinfo (another NarHash or compression), and the bytes served
	// now would not match it.
	StaleNarInfo Reason = "stale_narinfo"
	// TooLarge refuses a path whose NAR is larger than the cache may hold
	// (cache.max_nar_size): it could not be verified and cached.
	TooLarge Reason = "too_large"
)

// Approves says whether decisions with this reason approve the path.
func (r Reason) Approves() bool { return r == Attested || r == Allowlisted || r == ContentAddressed }

// Reasons lists every reason, for documentation and metric initialisation.
var Reasons = []Reason{UpstreamMalformed, UpstreamUnsigned, Denied, AttestationMismatch,
	Attested, Allowlisted, ContentAddressed, Unattested, NarMismatch, ClosureIncomplete, StaleNarInfo, TooLarge}

// Policy is the configured policy.
type Policy struct {
	StoreDir         string
	Attesters        []verify.PublicKey
	Quorum           int
	ContentAddressed bool
	RequireClosure   bool
	Report           bool   // mode = "report": policy rejections are recorded but served
	MaxNarSize       uint64 // larger NARs (or NAR files) are refused as too_large; 0: no bound
}

// Input is one upstream's answer for one requested store path hash.
type Input struct {
	Hash         string // the hash the client asked for
	Raw          []byte // the upstream narinfo as received
	Upstream     string
	UpstreamKeys []verify.PublicKey
}

// Attestation is one attester key's verified signature over the
// fingerprint of one store path: the attester rebuilt the path and got this
// NarHash, NarSize and References.
type Attestation struct {
	StorePath  string         `json:"store_path"`
	NarHash    narinfo.SHA256 `json:"nar_hash"`
	NarSize    uint64         `json:"nar_size"`
	References []string       `json:"references"` // basenames, sorted
	Deriver    string         `json:"deriver,omitempty"`
	KeyName    string         `json:"key_name"`
	PublicKey  string         `json:"public_key"` // "name:base64"
	Sig        string         `json:"sig"`
	Imported   time.Time      `json:"imported"`
	// Rebuild is what the rebuilder said of how it got NarHash, when it
	// said anything. No signature covers it: it is as trustworthy as the
	// admin token that imported it, and it only ever labels a mismatch,
	// never approves anything.
	Rebuild *Rebuild `json:"rebuild,omitempty"`
}

// Same reports whether b says what a says: the same signature with the
// same rebuild report (when it was imported does not count). Storing b
// over a changes nothing a decision reads.
func (a Attestation) Same(b Attestation) bool {
	return a.Sig == b.Sig && reflect.DeepEqual(a.Rebuild, b.Rebuild)
}

// Classification is a rebuilder's verdict on an attestation whose NarHash
// differs from the upstream's.
type Classification string

const (
	// Stable: two builds here gave the same NarHash, so the derivation is
	// reproducible and the upstream serves something else: the alarm.
	Stable Classification = "stable"
	// NotReproducible: two builds here differed; the mismatch says little
	// about the upstream.
	NotReproducible Classification = "not_reproducible"
)

// Classifications lists the valid classifications, most alarming first.
var Classifications = []Classification{Stable, NotReproducible}

// Rebuild is a rebuilder's report on one rebuild, kept with its
// attestation.
type Rebuild struct {
	Classification  Classification `json:"classification,omitempty"`
	UpstreamNarHash narinfo.SHA256 `json:"upstream_nar_hash,omitzero"` // what the upstream served when it compared
	Builds          []Build        `json:"builds,omitempty"`           // each build's result, in build order
}

// Build is the result of one build of a path on a rebuilder.
type Build struct {
	NarHash narinfo.SHA256 `json:"nar_hash"`
	NarSize uint64         `json:"nar_size"`
}

// RebuildEvidence is one configured attester's attestation for a path, as
// a decision shows it: who rebuilt it, when that was imported, whether it
// matches what the upstream serves, and what the rebuilder said of it.
type RebuildEvidence struct {
	Key            string         `json:"key"`
	Matches        bool           `json:"matches"`
	NarHash        narinfo.SHA256 `json:"nar_hash"`
	Imported       time.Time      `json:"imported"`
	Classification Classification `json:"classification,omitempty"`
}

// AllowEntry approves one store path, pinned to the fingerprint (NarHash,
// NarSize and References) its upstream served when a reviewer added it.
// An entry without a fingerprint is pinned to its NarHash alone, and one
// without either approves any NarHash.
type AllowEntry struct {
	StorePath   string         `json:"store_path"`
	NarHash     narinfo.SHA256 `json:"nar_hash,omitzero"`
	Fingerprint string         `json:"fingerprint,omitempty"`
	Reason      string         `json:"reason,omitempty"`
	Added       time.Time      `json:"added"`
	Expires     time.Time      `json:"expires,omitzero"`
}

// Pins reports whether the entry approves a narinfo with this NarHash and
// fingerprint.
func (a AllowEntry) Pins(narHash narinfo.SHA256, fingerprint string) bool {
	switch {
	case a.Fingerprint != "":
		return a.Fingerprint == fingerprint
	case !a.NarHash.IsZero():
		return a.NarHash == narHash
	}
	return true
}

// Expired reports whether the entry no longer approves anything at now.
func (a AllowEntry) Expired(now time.Time) bool {
	return !a.Expires.IsZero() && !now.Before(a.Expires)
}

// DenyEntry refuses every path matching Pattern (see DenyKind).
type DenyEntry struct {
	Pattern string    `json:"pattern"`
	Reason  string    `json:"reason,omitempty"`
	Added   time.Time `json:"added"`
}

// Quarantine marks a path whose NAR failed verification after a complete
// transfer; it stays rejected (nar_mismatch) until an operator retries it.
type Quarantine struct {
	StorePath string    `json:"store_path"`
	Check     string    `json:"check"`
	Detail    string    `json:"detail"`
	Upstream  string    `json:"upstream"`
	Time      time.Time `json:"time"`
}

// Evidence is everything the policy reads about one path, read at one
// moment so that it is consistent.
type Evidence struct {
	Attestations []Attestation
	Allow        *AllowEntry
	Deny         []DenyEntry
	Quarantine   *Quarantine
}

// Decision is the outcome with the evidence behind it.
type Decision struct {
	Approved bool   `json:"approved"`
	Reason   Reason `json:"reason"`
	Detail   string `json:"detail,omitempty"`

	NarInfo         *narinfo.NarInfo `json:"-"`
	Fingerprint     string           `json:"fingerprint,omitempty"`
	Upstream        string           `json:"upstream,omitempty"`
	UpstreamSigners []string         `json:"upstream_signers,omitempty"`
	Attesters       []string         `json:"attesters,omitempty"`  // keys whose attestation matches the upstream fingerprint
	Mismatched      []string         `json:"mismatched,omitempty"` // keys whose attestation differs
	Allow           *AllowEntry      `json:"allow,omitempty"`
	Deny            *DenyEntry       `json:"deny,omitempty"`
	Quarantine      *Quarantine      `json:"quarantine,omitempty"`
	// Missing lists, for closure_incomplete, the references that are not
	// approved (base names, sorted), with why: what a rebuild would have
	// to attest before the path itself can be approved.
	Missing []MissingRef `json:"missing,omitempty"`
	// Rebuilds are the configured attesters' attestations for the path
	// (those with a signature that verifies, matching or not).
	Rebuilds []RebuildEvidence `json:"rebuilds,omitempty"`
	// Classification is, when an attestation mismatches, the most alarming
	// classification among the mismatching ones ("" when none said).
	Classification Classification `json:"classification,omitempty"`
}

// MissingRef is one reference that kept a path's closure from approval.
// Reason is empty when no upstream has the reference at all.
type MissingRef struct {
	Ref    string `json:"ref"` // base name "<hash>-<name>"
	Reason Reason `json:"reason,omitempty"`
}

// String is the form of the X-Cacheproxy-Decision header.
func (d Decision) String() string {
	if d.Approved {
		return "approved; reason=" + string(d.Reason)
	}
	return "rejected; reason=" + string(d.Reason)
}

// Served reports whether the path is handed to clients: approved paths, and
// in report mode also paths that only the policy rules (3–8 and the closure
// rule) refused. Upstream validity and NAR verification are enforced in
// both modes.
func (p Policy) Served(d Decision) bool {
	if d.Approved {
		return true
	}
	switch d.Reason {
	case Denied, AttestationMismatch, Unattested, ClosureIncomplete:
		return p.Report
	}
	return false
}

func reject(d Decision, r Reason, format string, args ...any) Decision {
	d.Approved, d.Reason, d.Detail = false, r, fmt.Sprintf(format, args...)
	return d
}

func approve(d Decision, r Reason, format string, args ...any) Decision {
	d.Approved, d.Reason, d.Detail = true, r, fmt.Sprintf(format, args...)
	return d
}

// Decide applies the rules of the README (Decision rules) in order; the first match wins.
func (p Policy) Decide(in Input, ev Evidence, now time.Time) Decision {
	d := Decision{Upstream: in.Upstream}

	// Rule 1: the narinfo must parse with Nix's semantics, name the
	// requested path and live in our store dir.
	ni, err := narinfo.Parse(in.Raw, p.StoreDir)
	if err != nil {
		return reject(d, UpstreamMalformed, "%v", err)
	}
	sp, err := narinfo.ParseStorePath(ni.StorePath, p.StoreDir)
	if err != nil {
		return reject(d, UpstreamMalformed, "%v", err)
	}
	if sp.Hash != in.Hash {
		return reject(d, UpstreamMalformed, "narinfo for %s answers a request for %s", ni.StorePath, in.Hash)
	}
	fp, err := ni.Fingerprint(p.StoreDir)
	if err != nil {
		return reject(d, UpstreamMalformed, "%v", err)
	}
	if !ni.Compression.Supported() {
		// A NAR we cannot decode is a NAR we cannot verify.
		return reject(d, UpstreamMalformed, "unsupported Compression %q", ni.Compression)
	}
	d.NarInfo, d.Fingerprint = ni, fp

	// Rule 2: the upstream must vouch for what it serves.
	for _, k := range verify.VerifyAny(in.UpstreamKeys, fp, ni.Sigs) {
		d.UpstreamSigners = append(d.UpstreamSigners, k.Name)
	}
	if len(d.UpstreamSigners) == 0 {
		return reject(d, UpstreamUnsigned, "no valid signature by a key of %s", in.Upstream)
	}
	// Like rules 1–2, enforced in both modes: a NAR the cache cannot hold
	// cannot be verified before its last bytes go out.
	if p.MaxNarSize > 0 && max(ni.NarSize, ni.FileSize) > p.MaxNarSize {
		return reject(d, TooLarge, "NAR of %d bytes (file %d) is larger than cache.max_nar_size %d", ni.NarSize, ni.FileSize, p.MaxNarSize)
	}

	// Gather all the evidence before applying rules 3–8, so that a
	// decision (and explain) always shows every attestation and entry that
	// bears on the path, not only the one that decided it.
	// Attesters: which configured keys signed this very fingerprint, and
	// which signed a different one for the same path.
	for _, a := range ev.Attestations {
		key, ok := p.attester(a.PublicKey)
		if !ok {
			continue // no longer configured
		}
		afp, err := narinfo.Fingerprint(p.StoreDir, a.StorePath, a.NarHash, a.NarSize, a.References)
		ev := RebuildEvidence{Key: key.Name, NarHash: a.NarHash, Imported: a.Imported}
		if a.Rebuild != nil {
			ev.Classification = a.Rebuild.Classification
		}
		switch {
		case err != nil || afp != fp:
			d.Mismatched = appendOnce(d.Mismatched, key.Name)
			d.Rebuilds = append(d.Rebuilds, ev)
			d.Classification = moreAlarming(d.Classification, ev.Classification)
		case key.Verify(fp, a.Sig):
			d.Attesters = appendOnce(d.Attesters, key.Name)
			ev.Matches = true
			d.Rebuilds = append(d.Rebuilds, ev)
		}
	}
	allow := ev.Allow
	allowPinned := allow != nil && !allow.Expired(now) && allow.Pins(ni.NarHash, fp)
	if allow != nil {
		d.Allow = allow
	}

	for i := range ev.Deny {
		if DenyMatches(ev.Deny[i].Pattern, ni.StorePath, ni.NarHash, p.StoreDir) {
			d.Deny = &ev.Deny[i]
			break
		}
	}

	// A NAR that failed verification keeps its path refused until an
	// operator retries it; like rules 1–2 this holds in report mode too.
	if ev.Quarantine != nil {
		d.Quarantine = ev.Quarantine
		return reject(d, NarMismatch, "NAR failed %s check: %s", ev.Quarantine.Check, ev.Quarantine.Detail)
	}

	// Rule 3: operators can refuse anything.
	if d.Deny != nil {
		return reject(d, Denied, "denylist entry %q: %s", d.Deny.Pattern, d.Deny.Reason)
	}

	// Rule 4: an attester rebuilt something else than upstream serves.
	if len(d.Mismatched) > 0 && !(allowPinned && !allow.NarHash.IsZero()) {
		return reject(d, AttestationMismatch, "attester %s signed a different fingerprint for %s than upstream serves",
			strings.Join(d.Mismatched, ", "), ni.StorePath)
	}

	// Rule 5: enough distinct attester keys sign the upstream fingerprint.
	if len(d.Attesters) >= p.Quorum && len(d.Attesters) > 0 {
		return approve(d, Attested, "%d of %d required attester keys: %s", len(d.Attesters), p.Quorum, strings.Join(d.Attesters, ", "))
	}

	// Rule 6: a reviewer approved this path (pinned to this NarHash).
	if allowPinned {
		return approve(d, Allowlisted, "allowlist entry: %s", allow.Reason)
	}

	// Rule 7: the store path is a commitment to the content.
	if p.ContentAddressed && ni.CA != "" {
		if err := caProof(ni, p.StoreDir); err == nil {
			return approve(d, ContentAddressed, "store path proven by CA %s", ni.CA)
		} else {
			d.Detail = err.Error()
		}
	}

	// Rule 8.
	why := "no attestation, allowlist entry or content-address proof"
	switch {
	case len(d.Attesters) > 0:
		why = fmt.Sprintf("%d attester keys of the %d required", len(d.Attesters), p.Quorum)
	case allow != nil && allow.Expired(now):
		why = "allowlist entry expired " + allow.Expires.Format(time.RFC3339)
	case allow != nil:
		why = "allowlist entry pinned to " + allow.NarHash.String() + ", upstream serves " + ni.NarHash.String()
		if allow.NarHash == ni.NarHash {
			why = "allowlist entry pinned to the fingerprint " + allow.Fingerprint + ", upstream serves " + fp
		}
	case d.Detail != "":
		why = "content address does not prove the path: " + d.Detail
	}
	return reject(d, Unattested, "%s", why)
}

// Closure applies require_closure: an approved path whose references are
// not all approved is rejected. refs maps each reference's base name to its
// decision; a path's reference to itself is not looked at.
func (p Policy) Closure(d Decision, refs map[string]Decision) Decision {
	if !p.RequireClosure || !d.Approved || d.NarInfo == nil {
		return d
	}
	self := path.Base(d.NarInfo.StorePath)
	var missing []string
	for _, ref := range d.NarInfo.References {
		if ref == self {
			continue
		}
		if rd, ok := refs[ref]; !ok || !rd.Approved {
			r := "not found"
			m := MissingRef{Ref: ref}
			if ok {
				r, m.Reason = string(rd.Reason), rd.Reason
			}
			missing = append(missing, ref+" ("+r+")")
			d.Missing = append(d.Missing, m)
		}
	}
	if len(missing) == 0 {
		return d
	}
	sort.Strings(missing)
	sort.Slice(d.Missing, func(i, j int) bool { return d.Missing[i].Ref < d.Missing[j].Ref })
	return reject(d, ClosureIncomplete, "references not approved: %s", strings.Join(missing, ", "))
}

// moreAlarming returns whichever classification calls for more attention:
// stable, then not_reproducible, then none.
func moreAlarming(a, b Classification) Classification {
	for _, c := range Classifications {
		if a == c || b == c {
			return c
		}
	}
	return a
}

func (p Policy) attester(pub string) (verify.PublicKey, bool) {
	for _, k := range p.Attesters {
		if k.String() == pub {
			return k, true
		}
	}
	return verify.PublicKey{}, false
}

func appendOnce(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}

// caProof accepts the content addresses whose proof cacheproxy can complete:
// "fixed:r:sha256" (NarHash is the CA hash, and NarHash is verified while
// streaming), and sha256 flat files and text, whose content hash the NAR
// verifier checks (FlatSHA256).
func caProof(ni *narinfo.NarInfo, storeDir string) error {
	if err := narinfo.VerifyCA(ni, storeDir); err != nil {
		return err
	}
	if _, err := FlatSHA256(ni); err != nil {
		return err
	}
	return nil
}

// FlatSHA256 returns the file content hash that the NAR verifier must check
// for flat and text content addresses, or zero for "fixed:r:sha256", where
// the NarHash itself is the commitment.
func FlatSHA256(ni *narinfo.NarInfo) (narinfo.SHA256, error) {
	method, rest, _ := strings.Cut(ni.CA, ":")
	switch {
	case method == "fixed" && strings.HasPrefix(rest, "r:sha256:"):
		return narinfo.SHA256{}, nil
	case (method == "fixed" || method == "text") && strings.HasPrefix(rest, "sha256:"):
		h, err := narinfo.ParseSHA256(rest)
		if err != nil {
			return h, fmt.Errorf("content address %q: bad hash", ni.CA)
		}
		return h, nil
	}
	return narinfo.SHA256{}, fmt.Errorf("content address %q: only sha256 content addresses are proven", ni.CA)
}

// NAR is what the NAR of an approved path must be: the narinfo's promises,
// plus, for a path approved by its content address, the content hash.
func (d Decision) NAR() verify.Expect {
	ni := d.NarInfo
	e := verify.Expect{Compression: ni.Compression, FileHash: ni.FileHash, FileSize: ni.FileSize,
		NarHash: ni.NarHash, NarSize: ni.NarSize}
	if d.Reason == ContentAddressed {
		e.Flat, _ = FlatSHA256(ni)
	}
	return e
}

// DenyMatches reports whether a denylist pattern matches a store path with
// this NarHash. A pattern is a store path, a bare hash, a NarHash
// ("sha256:…" or SRI), a base name, or a glob over the base name
// ("*-openssl-3.0.7*").
func DenyMatches(pattern, storePath string, narHash narinfo.SHA256, storeDir string) bool {
	base := path.Base(storePath)
	switch DenyKind(pattern, storeDir) {
	case "path":
		return pattern == storePath
	case "hash":
		return strings.HasPrefix(base, pattern+"-")
	case "nar_hash":
		h, err := narinfo.ParseSHA256(pattern)
		return err == nil && h == narHash
	case "glob":
		ok, _ := path.Match(pattern, base)
		return ok
	default:
		return pattern == base
	}
}

// DenyKind classifies a deny pattern: "path", "hash", "nar_hash", "glob",
// "name" or "" when it is not a usable pattern.
func DenyKind(pattern, storeDir string) string {
	switch {
	case pattern == "":
		return ""
	case strings.HasPrefix(pattern, storeDir+"/"):
		if _, err := narinfo.ParseStorePath(pattern, storeDir); err != nil {
			return ""
		}
		return "path"
	case narinfo.ValidHash(pattern):
		return "hash"
	case strings.ContainsAny(pattern, "*?["):
		if _, err := path.Match(pattern, ""); err != nil || strings.Contains(pattern, "/") {
			return ""
		}
		return "glob"
	}
	// No check for '/' here: ParseHash validates the digest strictly, and an
	// SRI or base64 NarHash contains a '/' about half of the time (such deny
	// patterns used to be refused as unusable; fixed with policy_test.go).
	if _, _, err := narinfo.ParseHash(pattern); err == nil && strings.ContainsAny(pattern, ":-") {
		if strings.HasPrefix(pattern, "sha256") || strings.HasPrefix(pattern, "sha512") || strings.HasPrefix(pattern, "sha1") {
			return "nar_hash"
		}
	}
	if _, _, err := narinfo.ParseBaseName(pattern); err == nil {
		return "name"
	}
	return ""
}
