package narinfo

import (
	"errors"
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

const (
	// HashLen is the length of the hash part of a store path basename.
	HashLen = 32
	// MaxNameLen is Nix's StorePath::MaxPathLen, the longest allowed name part.
	MaxNameLen = 211
)

// StorePath is a parsed store path: Dir is the store directory without a trailing
// slash, Hash the 32-character nix32 hash part, Name the name part.
type StorePath struct{ Dir, Hash, Name string }

// String returns the absolute path "<Dir>/<Hash>-<Name>".
func (p StorePath) String() string { return p.Dir + "/" + p.Base() }

// Base returns the basename "<Hash>-<Name>".
func (p StorePath) Base() string { return p.Hash + "-" + p.Name }

// ValidHash reports whether h is a syntactically valid store path hash part:
// exactly 32 characters of Nix's base-32 alphabet.
func ValidHash(h string) bool {
	if len(h) != HashLen {
		return false
	}
	for i := 0; i < len(h); i++ {
		if !nixbase32.Is(h[i]) {
			return false
		}
	}
	return true
}

// checkStoreDir rejects store directories that cannot prefix a store path. Paths are
// compared as strings, so a trailing slash or relative dir would silently never match.
func checkStoreDir(storeDir string) error {
	if storeDir == "" || storeDir[0] != '/' {
		return fmt.Errorf("store dir %q is not an absolute path", storeDir)
	}
	if strings.HasSuffix(storeDir, "/") {
		return fmt.Errorf("store dir %q ends in a slash", storeDir)
	}
	return nil
}

// validName applies Nix's checkName rules to the name part of a store path.
func validName(name string) error {
	if name == "" {
		return errors.New("empty name")
	}
	if len(name) > MaxNameLen {
		return fmt.Errorf("name is longer than %d characters", MaxNameLen)
	}
	if name[0] == '.' {
		return errors.New("name starts with '.'")
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= '0' && c <= '9', c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z':
		case c == '+', c == '-', c == '.', c == '_', c == '?', c == '=':
		default:
			return fmt.Errorf("name contains illegal character %q", c)
		}
	}
	return nil
}

// PathHash returns the hash part of a store path, absolute or a basename,
// without validating it (a base shorter than a hash is returned whole): the
// key under which the state store keeps evidence for a path already checked.
func PathHash(storePath string) string {
	base := storePath[strings.LastIndexByte(storePath, '/')+1:]
	return base[:min(len(base), HashLen)]
}

// ParseBaseName splits and validates a store path basename "<hash>-<name>".
// Nix itself does not check the '-' separator (it just skips a byte); requiring it
// keeps a basename's meaning unambiguous.
func ParseBaseName(base string) (hash, name string, err error) {
	if len(base) < HashLen+2 {
		return "", "", fmt.Errorf("store path basename %q is too short", base)
	}
	hash, name = base[:HashLen], base[HashLen+1:]
	if !ValidHash(hash) {
		return "", "", fmt.Errorf("store path basename %q: hash part is not 32 nix32 characters", base)
	}
	if base[HashLen] != '-' {
		return "", "", fmt.Errorf("store path basename %q: no '-' after the hash part", base)
	}
	if err := validName(name); err != nil {
		return "", "", fmt.Errorf("store path basename %q: %w", base, err)
	}
	return hash, name, nil
}

// ParseStorePath parses an absolute store path and checks that it lies directly in
// storeDir. No canonicalisation is done: "/nix/store//x" or "/nix/../nix/store/x"
// are rejected rather than normalised, since a gatekeeper should not guess.
func ParseStorePath(abs, storeDir string) (StorePath, error) {
	if err := checkStoreDir(storeDir); err != nil {
		return StorePath{}, err
	}
	prefix := storeDir + "/"
	if !strings.HasPrefix(abs, prefix) {
		return StorePath{}, fmt.Errorf("path %q is not in store dir %q", abs, storeDir)
	}
	base := abs[len(prefix):]
	if strings.Contains(base, "/") {
		return StorePath{}, fmt.Errorf("path %q is not directly in store dir %q", abs, storeDir)
	}
	hash, name, err := ParseBaseName(base)
	if err != nil {
		return StorePath{}, fmt.Errorf("path %q: %w", abs, err)
	}
	return StorePath{Dir: storeDir, Hash: hash, Name: name}, nil
}

// CheckStoreDir returns an error unless storeDir can prefix store paths: absolute,
// not "/" and without a trailing slash (paths are compared as strings).
func CheckStoreDir(storeDir string) error { return checkStoreDir(storeDir) }
