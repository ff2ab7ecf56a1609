package verify

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
)

// PublicKey is a Nix binary-cache public key: "name:base64(32-byte ed25519 key)",
// as written by `nix-store --generate-binary-cache-key` and listed in
// trusted-public-keys.
type PublicKey struct {
	Name string
	Key  ed25519.PublicKey
}

// SecretKey is a Nix binary-cache secret key: "name:base64(64-byte ed25519
// private key)", the format of secret-key-files.
type SecretKey struct {
	Name string
	Key  ed25519.PrivateKey
}

// splitNamed splits Nix's "name:base64" encoding shared by keys and
// signatures. Nix splits at the first colon, so names cannot contain one.
func splitNamed(s, what string) (name string, data []byte, err error) {
	name, b64, ok := strings.Cut(s, ":")
	if !ok {
		return "", nil, fmt.Errorf("%s: missing ':' between name and base64 data", what)
	}
	if name == "" {
		return "", nil, fmt.Errorf("%s: empty key name", what)
	}
	data, err = base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return "", nil, fmt.Errorf("%s %q: bad base64: %w", what, name, err)
	}
	return name, data, nil
}

// ParsePublicKey parses a public key in Nix's format. Surrounding whitespace
// (a trailing newline in a key file) is ignored.
func ParsePublicKey(s string) (PublicKey, error) {
	name, key, err := splitNamed(strings.TrimSpace(s), "public key")
	if err != nil {
		return PublicKey{}, err
	}
	if len(key) != ed25519.PublicKeySize {
		return PublicKey{}, fmt.Errorf("public key %q: %d bytes, want %d", name, len(key), ed25519.PublicKeySize)
	}
	return PublicKey{Name: name, Key: ed25519.PublicKey(key)}, nil
}

// ParseSecretKey parses a secret key in Nix's format. Surrounding whitespace
// is ignored.
func ParseSecretKey(s string) (SecretKey, error) {
	name, key, err := splitNamed(strings.TrimSpace(s), "secret key")
	if err != nil {
		return SecretKey{}, err
	}
	if len(key) != ed25519.PrivateKeySize {
		return SecretKey{}, fmt.Errorf("secret key %q: %d bytes, want %d", name, len(key), ed25519.PrivateKeySize)
	}
	return SecretKey{Name: name, Key: ed25519.PrivateKey(key)}, nil
}

// GenerateKey makes a new key pair named name, like
// `nix-store --generate-binary-cache-key`.
func GenerateKey(name string) (SecretKey, error) {
	if name == "" {
		return SecretKey{}, errors.New("generate key: empty key name")
	}
	if strings.Contains(name, ":") {
		// Nix would split such a name at the colon and never match it.
		return SecretKey{}, fmt.Errorf("generate key: name %q contains ':'", name)
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return SecretKey{}, fmt.Errorf("generate key %q: %w", name, err)
	}
	return SecretKey{Name: name, Key: priv}, nil
}

// Public returns the public half of k.
func (k SecretKey) Public() PublicKey {
	return PublicKey{Name: k.Name, Key: k.Key.Public().(ed25519.PublicKey)}
}

// String returns k in Nix's secret key file format.
func (k SecretKey) String() string {
	return k.Name + ":" + base64.StdEncoding.EncodeToString(k.Key)
}

// String returns k in Nix's public key format.
func (k PublicKey) String() string {
	return k.Name + ":" + base64.StdEncoding.EncodeToString(k.Key)
}

// Sign signs fingerprint and returns the signature as Nix writes it in a
// narinfo Sig line: "name:base64(64-byte signature)".
func (k SecretKey) Sign(fingerprint string) string {
	sig := ed25519.Sign(k.Key, []byte(fingerprint))
	return k.Name + ":" + base64.StdEncoding.EncodeToString(sig)
}

// Verify reports whether sig ("name:base64") is a valid signature by k over
// fingerprint. The name must match k's, as in Nix: a signature is only
// checked against the key of the name it claims.
func (k PublicKey) Verify(fingerprint, sig string) bool {
	if len(k.Key) != ed25519.PublicKeySize {
		// ed25519.Verify panics on a bad key length; a zero PublicKey must
		// simply verify nothing.
		return false
	}
	name, raw, err := splitNamed(strings.TrimSpace(sig), "signature")
	if err != nil || name != k.Name || len(raw) != ed25519.SignatureSize {
		return false
	}
	return ed25519.Verify(k.Key, []byte(fingerprint), raw)
}

// VerifyAny returns the keys among keys that validly signed fingerprint in
// sigs, each key (name and key bytes) at most once, in the order of keys.
// Callers count attestations per key, so a key listed twice or a signature
// repeated in a narinfo must not count twice.
func VerifyAny(keys []PublicKey, fingerprint string, sigs []string) []PublicKey {
	var out []PublicKey
	for i, k := range keys {
		if isDuplicateKey(keys[:i], k) {
			continue
		}
		for _, s := range sigs {
			if k.Verify(fingerprint, s) {
				out = append(out, k)
				break
			}
		}
	}
	return out
}

func isDuplicateKey(seen []PublicKey, k PublicKey) bool {
	for _, s := range seen {
		if s.Name == k.Name && s.Key.Equal(k.Key) {
			return true
		}
	}
	return false
}

// MarshalText writes the key in Nix's format.
func (k PublicKey) MarshalText() ([]byte, error) { return []byte(k.String()), nil }
