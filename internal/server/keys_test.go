package server

import (
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/cacheproxy/cacheproxy/internal/config"
)

// serve and pubkey starting at once on a fresh state dir agree on one key.
func TestLoadOrCreateKeyConcurrent(t *testing.T) {
	for range 20 {
		cfg := config.Defaults(config.Env{})
		cfg.StateDir = t.TempDir()
		keys := make([]string, 8)
		var wg sync.WaitGroup
		for i := range keys {
			wg.Go(func() {
				k, err := LoadOrCreateKey(cfg)
				if err != nil {
					t.Error(err)
					return
				}
				keys[i] = k.Public().String()
			})
		}
		wg.Wait()
		for _, k := range keys[1:] {
			if k != keys[0] {
				t.Fatalf("concurrent starts made different keys: %q and %q", keys[0], k)
			}
		}
		pub, err := os.ReadFile(filepath.Join(cfg.StateDir, "gatekeeper.pub"))
		if err != nil || string(pub) != keys[0] {
			t.Fatalf("gatekeeper.pub = %q (%v), want %q", pub, err, keys[0])
		}
		leftovers, _ := filepath.Glob(filepath.Join(cfg.StateDir, ".*.tmp-*"))
		if len(leftovers) != 0 {
			t.Fatalf("temp files left: %v", leftovers)
		}
	}
}

// A configured signing_key_file that is missing is an error, never replaced
// by a generated key.
func TestConfiguredKeyMissing(t *testing.T) {
	cfg := config.Defaults(config.Env{})
	cfg.StateDir = t.TempDir()
	cfg.SigningKeyFile = filepath.Join(cfg.StateDir, "absent.sec")
	if _, err := LoadOrCreateKey(cfg); err == nil {
		t.Fatal("missing signing_key_file accepted")
	}
	if _, err := os.Stat(cfg.SigningKeyFile); !os.IsNotExist(err) {
		t.Fatal("a key was generated at the configured path")
	}
}
