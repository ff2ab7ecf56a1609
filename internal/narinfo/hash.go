package narinfo

import (
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// algoSize returns the digest size of a Nix hash algorithm name, or 0 if unknown.
// blake3 is left out on purpose: it is experimental in Nix and never appears in
// narinfos or path-info output that fleets produce today.
func algoSize(algo string) int {
	switch algo {
	case "md5":
		return 16
	case "sha1":
		return 20
	case "sha256":
		return 32
	case "sha512":
		return 64
	}
	return 0
}

// ParseHash parses a hash in any form Nix prints or accepts with a type:
// "<algo>:<digest>" where digest is base16, nix32 or base64 (told apart by length, as
// Nix does), or SRI "<algo>-<base64>". It returns the algorithm name and raw digest.
func ParseHash(s string) (algo string, digest []byte, err error) {
	if i := strings.IndexByte(s, ':'); i >= 0 {
		algo = s[:i]
		if algoSize(algo) == 0 {
			return "", nil, fmt.Errorf("hash %q: unknown hash algorithm %q", s, algo)
		}
		digest, err = decodeDigest(algo, s[i+1:])
		if err != nil {
			return "", nil, fmt.Errorf("hash %q: %w", s, err)
		}
		return algo, digest, nil
	}
	if i := strings.IndexByte(s, '-'); i >= 0 {
		algo = s[:i]
		size := algoSize(algo)
		if size == 0 {
			return "", nil, fmt.Errorf("SRI hash %q: unknown hash algorithm %q", s, algo)
		}
		digest, err = decodeBase64(s[i+1:], size)
		if err != nil {
			return "", nil, fmt.Errorf("SRI hash %q: %w", s, err)
		}
		return algo, digest, nil
	}
	return "", nil, fmt.Errorf("hash %q has no algorithm prefix (want e.g. sha256:... or sha256-...)", s)
}

// ParseTypedHash parses a digest without a prefix whose algorithm is known from
// context (Nix's parseNonSRIUnprefixed), as in the tail of a CA field. A prefixed
// or SRI string is accepted too when its algorithm matches.
func ParseTypedHash(s, algo string) ([]byte, error) {
	if algoSize(algo) == 0 {
		return nil, fmt.Errorf("unknown hash algorithm %q", algo)
	}
	if strings.HasPrefix(s, algo+":") || strings.HasPrefix(s, algo+"-") {
		_, d, err := ParseHash(s)
		return d, err
	}
	d, err := decodeDigest(algo, s)
	if err != nil {
		return nil, fmt.Errorf("%s hash %q: %w", algo, s, err)
	}
	return d, nil
}

// decodeDigest decodes an unprefixed digest, choosing the encoding by length
// exactly as Nix's Hash constructor does.
func decodeDigest(algo, s string) ([]byte, error) {
	size := algoSize(algo)
	switch len(s) {
	case 2 * size:
		d, err := hex.DecodeString(s)
		if err != nil {
			return nil, fmt.Errorf("invalid base16 digest: %w", err)
		}
		return d, nil
	case nixbase32.EncodedLen(size):
		d, err := nixbase32.DecodeString(s)
		if err != nil {
			return nil, fmt.Errorf("invalid nix32 digest: %w", err)
		}
		return d, nil
	case base64.StdEncoding.EncodedLen(size):
		return decodeBase64(s, size)
	}
	return nil, fmt.Errorf("digest has length %d, which is not a base16, nix32 or base64 %s digest", len(s), algo)
}

func decodeBase64(s string, size int) ([]byte, error) {
	d, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("invalid base64 digest: %w", err)
	}
	if len(d) != size {
		return nil, fmt.Errorf("base64 digest has %d bytes, want %d", len(d), size)
	}
	return d, nil
}

// FormatHash renders a digest the way narinfos and fingerprints carry it:
// "<algo>:<nix32>".
func FormatHash(algo string, digest []byte) string {
	return algo + ":" + nixbase32.EncodeToString(digest)
}

// NormalizeHash parses any accepted form and returns "<algo>:<nix32>", so that two
// spellings of one hash compare equal as strings.
func NormalizeHash(s string) (string, error) {
	algo, d, err := ParseHash(s)
	if err != nil {
		return "", err
	}
	return FormatHash(algo, d), nil
}
