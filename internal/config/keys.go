package config

import "github.com/cacheproxy/cacheproxy/internal/verify"

// PublicKey is a public key as the config file writes it, parsed once when
// the file is read. A malformed key does not stop decoding: Validate reports
// it with its place in the file, together with every other problem.
type PublicKey struct {
	Text string
	Key  verify.PublicKey
	Err  error // why Text is not a key, or nil
}

// Key wraps an already parsed key (defaults, tests).
func Key(k verify.PublicKey) PublicKey { return PublicKey{Text: k.String(), Key: k} }

// ParseKey parses a key in Nix's "name:base64" format.
func ParseKey(s string) PublicKey {
	k, err := verify.ParsePublicKey(s)
	return PublicKey{Text: s, Key: k, Err: err}
}

// UnmarshalText implements TOML decoding.
func (k *PublicKey) UnmarshalText(b []byte) error {
	*k = ParseKey(string(b))
	return nil
}

// MarshalText writes the key as it was given.
func (k PublicKey) MarshalText() ([]byte, error) { return []byte(k.Text), nil }

// Keys returns the parsed keys; call it on a validated config.
func Keys(ks []PublicKey) []verify.PublicKey {
	out := make([]verify.PublicKey, len(ks))
	for i, k := range ks {
		out[i] = k.Key
	}
	return out
}
