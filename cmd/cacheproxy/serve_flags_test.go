package main

import (
	"io"
	"os"
	"path/filepath"
	"testing"
)

// --signing-key-file and --admin-token-file override the config, as the
// systemd unit uses them (credentials in %d), and are validated like it.
func TestServeKeyFileFlags(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "signing-key")
	if err := os.WriteFile(key, []byte("placeholder"), 0o600); err != nil {
		t.Fatal(err)
	}
	parse := func(args ...string) (configFlags, error) {
		var cf configFlags
		fs := newFlags("serve", "serve", cmdIO{stderr: io.Discard})
		cf.register(fs, true)
		_, err := parseInterspersed(fs, args)
		return cf, err
	}
	cf, err := parse("--state-dir", dir, "--signing-key-file", key, "--admin-token-file", filepath.Join(dir, "token"))
	if err != nil {
		t.Fatal(err)
	}
	f, err := cf.load()
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.Config
	if cfg.SigningKeyFile != key || cfg.AdminTokenFile() != filepath.Join(dir, "token") {
		t.Errorf("signing_key_file %q, admin token file %q", cfg.SigningKeyFile, cfg.AdminTokenFile())
	}
	cf, err = parse("--state-dir", dir, "--signing-key-file", filepath.Join(dir, "missing"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cf.load(); err == nil {
		t.Error("a missing --signing-key-file was accepted")
	}
}
