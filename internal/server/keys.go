package server

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// LoadOrCreateKey reads the gatekeeper key, generating it into the state
// dir on first start when no signing_key_file is configured. Two servers
// starting at once end up with the same key: the file is created
// exclusively and the loser reads the winner's.
func LoadOrCreateKey(cfg config.Config) (verify.SecretKey, error) {
	path := cfg.SigningKeyPath()
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) && cfg.SigningKeyFile == "" {
		raw, err = createKey(path)
	}
	if err != nil {
		return verify.SecretKey{}, fmt.Errorf("signing_key_file: %w", err)
	}
	k, err := verify.ParseSecretKey(string(raw))
	if err != nil {
		return k, fmt.Errorf("signing key %s: %w", path, err)
	}
	return k, nil
}

// LoadKey reads the gatekeeper key and never creates one: a key made by a
// command that only meant to print it would differ from the one serve uses
// (same name, other bytes), and a fleet configured with it would refuse
// every path.
func LoadKey(cfg config.Config) (verify.SecretKey, error) {
	path := cfg.SigningKeyPath()
	raw, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist) && cfg.SigningKeyFile == "":
		return verify.SecretKey{}, fmt.Errorf("no gatekeeper key at %s (state_dir %s): start `cacheproxy serve` with this configuration once to create it, or make one with `cacheproxy keygen NAME` and set signing_key_file", path, cfg.StateDir)
	case err != nil:
		return verify.SecretKey{}, fmt.Errorf("signing_key_file: %w", err)
	}
	k, err := verify.ParseSecretKey(string(raw))
	if err != nil {
		return k, fmt.Errorf("signing key %s: %w", path, err)
	}
	return k, nil
}

func createKey(path string) ([]byte, error) {
	host, _ := os.Hostname()
	if host == "" {
		host = "cacheproxy"
	}
	k, err := verify.GenerateKey(host + "-cacheproxy-1")
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	raw, err := createOnce(path, []byte(k.String()), 0o600)
	if err != nil {
		return nil, fmt.Errorf("write signing key: %w", err)
	}
	if k, err = verify.ParseSecretKey(string(raw)); err == nil {
		pub := strings.TrimSuffix(path, ".sec") + ".pub"
		if _, err := createOnce(pub, []byte(k.Public().String()), 0o644); err != nil {
			return nil, fmt.Errorf("write public key: %w", err)
		}
	}
	return raw, nil
}

// minTokenLen is the shortest admin token accepted: the admin API changes
// what the fleet gets, so its token must not be guessable.
const minTokenLen = 16

// adminToken is one admin token and the name the audit trail knows its
// holder by.
type adminToken struct {
	name  string
	token []byte
}

// loadTokens reads every admin token: admin.token_file's (generated on
// first start) as "admin", then each of [[admin.tokens]] (never
// generated). warnings name token files readable by other users. Two names
// with the same token are refused: the audit trail could not tell their
// holders apart.
func loadTokens(cfg config.Config) (toks []adminToken, warnings []string, err error) {
	load := func(name, key, path string, create bool) error {
		tok, warning, err := loadToken(key, path, create)
		if err != nil {
			return err
		}
		for _, t := range toks {
			if subtle.ConstantTimeCompare(t.token, tok) == 1 {
				return fmt.Errorf("%s: the token in %s is also the token of %q; each name needs its own token", key, path, t.name)
			}
		}
		if warning != "" {
			warnings = append(warnings, warning)
		}
		toks = append(toks, adminToken{name: name, token: tok})
		return nil
	}
	if err := load(config.DefaultTokenName, "admin.token_file", cfg.AdminTokenFile(), true); err != nil {
		return nil, nil, err
	}
	for i, t := range cfg.Admin.Tokens {
		if err := load(t.Name, fmt.Sprintf("admin.tokens[%d] (%s)", i, t.Name), t.File, false); err != nil {
			return nil, nil, err
		}
	}
	return toks, warnings, nil
}

// loadToken reads one admin token, generating it when create is set and
// the file does not exist. warning is set when the file is readable by
// other users.
func loadToken(key, path string, create bool) (tok []byte, warning string, err error) {
	tok, err = readToken(key, path, create)
	if err != nil {
		return nil, "", err
	}
	if len(tok) < minTokenLen {
		return nil, "", fmt.Errorf("%s: admin token in %s is %d bytes long; use at least %d random bytes (e.g. openssl rand -hex 32 > %s)", key, path, len(tok), minTokenLen, path)
	}
	if st, err := os.Stat(path); err == nil && st.Mode().Perm()&0o077 != 0 {
		warning = fmt.Sprintf("admin token file %s is readable by other users (mode %04o); chmod 600 it", path, st.Mode().Perm())
	}
	return tok, warning, nil
}

func readToken(key, path string, create bool) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) && create {
		b := make([]byte, 32)
		if _, err := rand.Read(b); err != nil {
			return nil, err
		}
		raw, err = createOnce(path, []byte(hex.EncodeToString(b)+"\n"), 0o600)
		if err != nil {
			return nil, fmt.Errorf("write admin token: %w", err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	tok := []byte(strings.TrimSpace(string(raw)))
	if len(tok) == 0 {
		return nil, fmt.Errorf("%s: %s is empty", key, path)
	}
	return tok, nil
}

// createOnce writes data to path unless path exists, and returns what path
// holds then. The file appears complete and synced or not at all (written
// aside, then hard-linked into place, which fails if another process got
// there first), and the directory is synced: a key handed to the fleet must
// survive a power loss right after first start.
func createOnce(path string, data []byte, mode os.FileMode) ([]byte, error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, err
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chmod(mode)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	if err := os.Link(tmp.Name(), path); errors.Is(err, fs.ErrExist) {
		return os.ReadFile(path)
	} else if err != nil {
		return nil, err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return data, d.Sync()
}
