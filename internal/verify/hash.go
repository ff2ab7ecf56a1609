package verify

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// parseSHA256 decodes a SHA-256 digest as Nix writes it. Narinfos use
// "sha256:<nix32>", but Nix also accepts base16 and SRI ("sha256-<base64>"),
// and an upstream that writes those is not wrong, so they are accepted too.
func parseSHA256(s string) ([]byte, error) {
	var (
		raw []byte
		err error
	)
	switch {
	case strings.HasPrefix(s, "sha256:"):
		enc := s[len("sha256:"):]
		switch len(enc) {
		case nixbase32.EncodedLen(sha256.Size):
			raw, err = nixbase32.DecodeString(enc)
		case hex.EncodedLen(sha256.Size):
			raw, err = hex.DecodeString(enc)
		default:
			return nil, fmt.Errorf("hash %q: %d characters is neither nix32 nor base16 sha256", s, len(enc))
		}
	case strings.HasPrefix(s, "sha256-"):
		raw, err = base64.StdEncoding.DecodeString(s[len("sha256-"):])
	default:
		return nil, fmt.Errorf("hash %q: want sha256:<nix32>", s)
	}
	if err != nil {
		return nil, fmt.Errorf("hash %q: %w", s, err)
	}
	if len(raw) != sha256.Size {
		return nil, fmt.Errorf("hash %q: %d bytes, want %d", s, len(raw), sha256.Size)
	}
	return raw, nil
}

// formatSHA256 renders a digest the way narinfos do, for error details that
// an operator can compare with the narinfo by eye.
func formatSHA256(d []byte) string {
	return "sha256:" + nixbase32.EncodeToString(d)
}
