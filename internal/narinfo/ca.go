package narinfo

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// Content-address methods, named as in Nix's JSON (content-address-v1).
const (
	CAText = "text" // builtins.toFile, .drv files: sha256 of the file's bytes
	CAFlat = "flat" // fixed output, flat: hash of the single file's bytes
	CANar  = "nar"  // fixed output, recursive: hash of the NAR serialisation
	CAGit  = "git"  // fixed output, git tree hash (experimental in Nix; not verifiable here)
)

// CA is a parsed content address.
type CA struct {
	Method string // CAText, CAFlat, CANar or CAGit
	Algo   string // "md5", "sha1", "sha256" or "sha512"
	Digest []byte
}

// String renders the CA as narinfos carry it: "text:sha256:<nix32>",
// "fixed:<algo>:<nix32>", "fixed:r:<algo>:<nix32>" or "fixed:git:<algo>:<nix32>".
func (c CA) String() string {
	h := FormatHash(c.Algo, c.Digest)
	switch c.Method {
	case CAText:
		return "text:" + h
	case CANar:
		return "fixed:r:" + h
	case CAGit:
		return "fixed:git:" + h
	default:
		return "fixed:" + h
	}
}

// ParseCA parses a narinfo/path-info CA string the way Nix's
// ContentAddress::parse does. The digest may be base16, nix32 or base64.
func ParseCA(s string) (CA, error) {
	prefix, rest, ok := strings.Cut(s, ":")
	if !ok {
		return CA{}, fmt.Errorf("content address %q is not of the form <method>:<rest>", s)
	}
	var c CA
	switch prefix {
	case "text":
		c.Method = CAText
	case "fixed":
		switch {
		case strings.HasPrefix(rest, "r:"):
			c.Method, rest = CANar, rest[2:]
		case strings.HasPrefix(rest, "git:"):
			c.Method, rest = CAGit, rest[4:]
		default:
			c.Method = CAFlat
		}
	default:
		return CA{}, fmt.Errorf("content address %q: unknown method %q (want text or fixed)", s, prefix)
	}
	algo, digest, ok := strings.Cut(rest, ":")
	if !ok {
		return CA{}, fmt.Errorf("content address %q: no hash algorithm", s)
	}
	if algoSize(algo) == 0 {
		return CA{}, fmt.Errorf("content address %q: unknown hash algorithm %q", s, algo)
	}
	if c.Method == CAText && algo != "sha256" {
		return CA{}, fmt.Errorf("content address %q: text content addresses must use sha256", s)
	}
	d, err := decodeDigest(algo, digest)
	if err != nil {
		return CA{}, fmt.Errorf("content address %q: %w", s, err)
	}
	c.Algo, c.Digest = algo, d
	return c, nil
}

// MakeStorePath is Nix's Store::makeStorePath: the store path whose hash part is the
// 160-bit XOR-fold of sha256("<typ>:sha256:<hex inner>:<storeDir>:<name>").
func MakeStorePath(storeDir, typ string, inner []byte, name string) string {
	s := typ + ":sha256:" + hex.EncodeToString(inner) + ":" + storeDir + ":" + name
	h := sha256.Sum256([]byte(s))
	var folded [20]byte
	for i, b := range h {
		folded[i%20] ^= b
	}
	return storeDir + "/" + nixbase32.EncodeToString(folded[:]) + "-" + name
}

// makeType is Nix's makeType: the type string of a store path with references
// (absolute, sorted) and an optional self-reference.
func makeType(typ string, refs []string, self bool) string {
	var b strings.Builder
	b.WriteString(typ)
	for _, r := range refs {
		b.WriteByte(':')
		b.WriteString(r)
	}
	if self {
		b.WriteString(":self")
	}
	return b.String()
}

// StorePathFromCA computes the store path Nix would give an object with this content
// address, name and references (basenames; may include selfBase for a self
// reference). It follows makeTextPath and makeFixedOutputPath exactly.
func StorePathFromCA(storeDir string, c CA, name string, refs []string, selfBase string) (string, error) {
	if err := checkStoreDir(storeDir); err != nil {
		return "", err
	}
	self := false
	var others []string
	for _, r := range refs {
		if r == selfBase {
			self = true
			continue
		}
		others = append(others, r)
	}
	abs, err := absRefs(storeDir, others)
	if err != nil {
		return "", err
	}
	switch {
	case c.Method == CAText:
		if self {
			return "", errors.New("a text content-addressed path cannot reference itself")
		}
		return MakeStorePath(storeDir, makeType("text", abs, false), c.Digest, name), nil
	case c.Method == CANar && c.Algo == "sha256":
		return MakeStorePath(storeDir, makeType("source", abs, self), c.Digest, name), nil
	case c.Method == CANar || c.Method == CAFlat:
		// Every other fixed output is an "output:out" path over a hash of the
		// (prefixed, base16) content hash; Nix allows it no references at all.
		if len(refs) > 0 {
			return "", fmt.Errorf("a %s content-addressed path with %s hash cannot have references", c.Method, c.Algo)
		}
		r := ""
		if c.Method == CANar {
			r = "r:"
		}
		inner := sha256.Sum256([]byte("fixed:out:" + r + c.Algo + ":" + hex.EncodeToString(c.Digest) + ":"))
		return MakeStorePath(storeDir, "output:out", inner[:], name), nil
	default:
		return "", fmt.Errorf("content-address method %q is not supported", c.Method)
	}
}

// VerifyCA implements decision rule 7 (README, "Decision rules"): it returns nil when n's CA field proves
// n's store path, i.e. the path recomputed from CA, name, references and storeDir
// (makeTextPath for "text:sha256:...", makeFixedOutputPath with type "source" and
// references (+ ":self") for "fixed:r:sha256:...", the "output:out" path for other
// fixed outputs, which allow no references) equals n.StorePath. For "fixed:r:sha256"
// the NarHash must also equal the CA hash, because there the CA hash is the NAR hash.
//
// What this does not prove: for text, flat and non-sha256 CAs the NarHash is not tied
// to the CA hash by this check, so a NAR that matches NarHash may still differ from
// the content the path commits to. Callers that must close that gap hash the NAR
// (CANar) or the single file inside it (CAText, CAFlat) with CA.Algo while streaming;
// ParseCA gives them what to compare against.
func VerifyCA(n *NarInfo, storeDir string) error {
	if n.CA == "" {
		return errors.New("content address: narinfo has no CA field")
	}
	c, err := ParseCA(n.CA)
	if err != nil {
		return fmt.Errorf("content address: %w", err)
	}
	sp, err := ParseStorePath(n.StorePath, storeDir)
	if err != nil {
		return fmt.Errorf("content address: StorePath: %w", err)
	}
	got, err := StorePathFromCA(storeDir, c, sp.Name, n.References, sp.Base())
	if err != nil {
		return fmt.Errorf("content address %q of %s: %w", n.CA, n.StorePath, err)
	}
	if got != n.StorePath {
		return fmt.Errorf("content address %q does not match store path %s (it gives %s)", n.CA, n.StorePath, got)
	}
	if c.Method == CANar && c.Algo == "sha256" {
		if !bytes.Equal(n.NarHash[:], c.Digest) {
			return fmt.Errorf("content address %q: NarHash %s differs from the CA hash", n.CA, n.NarHash)
		}
	}
	return nil
}
