package narinfo

import (
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// SHA256 is a SHA-256 digest: NarHash, FileHash, a content address's hash.
// It is parsed once, where text enters the program (a narinfo, path-info
// JSON, an admin request), and compared as a value everywhere else. The zero
// value means "absent" (a narinfo without FileHash).
type SHA256 [sha256.Size]byte

// ParseSHA256 accepts a SHA-256 hash in every form Nix prints or accepts:
// "sha256:" followed by nix32, base16 or base64, or SRI "sha256-<base64>".
func ParseSHA256(s string) (SHA256, error) {
	var h SHA256
	algo, d, err := ParseHash(s)
	if err != nil {
		return h, err
	}
	if algo != "sha256" {
		return h, fmt.Errorf("hash %q: algorithm is %s, want sha256", truncate(s), algo)
	}
	copy(h[:], d)
	return h, nil
}

// SumSHA256 hashes b.
func SumSHA256(b []byte) SHA256 { return sha256.Sum256(b) }

// String renders the hash as narinfos and fingerprints carry it:
// "sha256:<nix32>", or "" for the zero value.
func (h SHA256) String() string {
	if h.IsZero() {
		return ""
	}
	return "sha256:" + h.Nix32()
}

// Nix32 is the bare nix32 digest, as in NAR file names.
func (h SHA256) Nix32() string { return nixbase32.EncodeToString(h[:]) }

// IsZero reports whether the hash is absent.
func (h SHA256) IsZero() bool { return h == SHA256{} }

// MarshalText writes String, so stored records and JSON read as narinfos do.
func (h SHA256) MarshalText() ([]byte, error) { return []byte(h.String()), nil }

// UnmarshalText parses any form ParseSHA256 accepts; "" is the zero value.
func (h *SHA256) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*h = SHA256{}
		return nil
	}
	v, err := ParseSHA256(string(b))
	if err != nil {
		return err
	}
	if v.IsZero() {
		return errors.New("hash is all zero bytes")
	}
	*h = v
	return nil
}
