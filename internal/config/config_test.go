package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/testcert"
)

const (
	keyA = "rebuilder-a-1:cflnkb3HVHh13QHZ7lFmSm1yh3DJwBgNvwKr6STrEbc="
	keyB = "rebuilder-b-1:OgTBKz42p0bT6N3tXq/6fo2KiNMECJa/zruDbZrdmUs="
	keyC = "internal-cache-1:Zra8KKykaWyevxZbqsO5EN/uWtp0WXZ9qHgJa4ANxtg="
)

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cacheproxy.toml")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaultsValidate(t *testing.T) {
	cfg, err := Load("", Env{})
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	want := Config{
		Listen:   "127.0.0.1:5480",
		StateDir: "./cacheproxy-state",
		StoreDir: "/nix/store",
		Priority: 40,
		Mode:     "enforce",
		Upstreams: []Upstream{{
			URL:            "https://cache.nixos.org",
			PublicKeys:     keys("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="),
			Timeout:        Duration{30 * time.Second},
			MaxConnections: 64,
		}},
		Policy:  Policy{Quorum: 1, ContentAddressed: true},
		Cache:   Cache{MaxSize: 100 << 30, MaxNarSize: 16 << 30, MinFree: 256 << 20, ScrubPeriod: Duration{7 * 24 * time.Hour}, NegativeTTL: Duration{10 * time.Second}},
		Admin:   Admin{Listen: "127.0.0.1:5481"},
		Rebuild: Rebuild{Interval: Duration{5 * time.Minute}, Jobs: 1},

		ShutdownTimeout: Duration{30 * time.Second},
		LogFormat:       "text", LogLevel: "info",
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("defaults:\n got %+v\nwant %+v", cfg, want)
	}
	if got := cfg.AdminTokenFile(); got != "cacheproxy-state/admin-token" {
		t.Errorf("AdminTokenFile = %q", got)
	}
	if got := cfg.SigningKeyPath(); got != "cacheproxy-state/gatekeeper.sec" {
		t.Errorf("SigningKeyPath = %q", got)
	}
}

func TestDefaultsAreFresh(t *testing.T) {
	a := Defaults(Env{})
	a.Upstreams[0].PublicKeys[0] = ParseKey("mutated")
	if b := Defaults(Env{}); b.Upstreams[0].PublicKeys[0].Text == "mutated" {
		t.Fatal("Defaults shares slices between calls")
	}
}

func TestStateDirectoryEnv(t *testing.T) {
	for _, tc := range []struct{ env, want string }{
		{"", "./cacheproxy-state"},
		{"/var/lib/cacheproxy", "/var/lib/cacheproxy"},
		{"/var/lib/cacheproxy:/var/lib/other", "/var/lib/cacheproxy"},
	} {
		cfg, err := Load("", Env{StateDirectory: tc.env})
		if err != nil {
			t.Fatal(err)
		}
		if cfg.StateDir != tc.want {
			t.Errorf("STATE_DIRECTORY=%q: state_dir %q, want %q", tc.env, cfg.StateDir, tc.want)
		}
	}
	// A state_dir in the file wins over the environment.
	cfg, err := Load(writeFile(t, `state_dir = "/srv/cp"`), Env{StateDirectory: "/var/lib/x"})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.StateDir != "/srv/cp" {
		t.Errorf("state_dir = %q", cfg.StateDir)
	}
}

func TestDerivedPathsFollowStateDirOverride(t *testing.T) {
	cfg, err := Load("", Env{})
	if err != nil {
		t.Fatal(err)
	}
	cfg.StateDir = "/flag/dir" // what --state-dir does after Load
	if got := cfg.AdminTokenFile(); got != "/flag/dir/admin-token" {
		t.Errorf("AdminTokenFile = %q", got)
	}
	if got := cfg.SigningKeyPath(); got != "/flag/dir/gatekeeper.sec" {
		t.Errorf("SigningKeyPath = %q", got)
	}
	cfg.ApplyStateDirDefaults()
	if cfg.Admin.TokenFile != "/flag/dir/admin-token" || cfg.SigningKeyFile != "" {
		t.Errorf("ApplyStateDirDefaults: token %q signing %q", cfg.Admin.TokenFile, cfg.SigningKeyFile)
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("after ApplyStateDirDefaults: %v", err)
	}
}

func TestFullExample(t *testing.T) {
	cfg, err := Load("testdata/full.toml", Env{StateDirectory: "/ignored"})
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Listen:           "127.0.0.1:5480",
		StateDir:         "/var/lib/cacheproxy",
		StoreDir:         "/nix/store",
		Priority:         40,
		Mode:             "enforce",
		ServeCompression: "zstd",
		SigningKeyFile:   "/run/keys/cacheproxy.sec",
		Upstreams: []Upstream{
			{
				URL:            "https://cache.nixos.org",
				PublicKeys:     keys("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="),
				Timeout:        Duration{30 * time.Second},
				MaxConnections: 32,
			},
			{
				URL:            "file:///srv/internal-cache",
				PublicKeys:     keys(keyC),
				Timeout:        Duration{30 * time.Second}, // per-entry default
				MaxConnections: 64,                         // per-entry default
			},
		},
		Policy: Policy{Attesters: keys(keyA, keyB), Quorum: 2, ContentAddressed: false, RequireClosure: true},
		Cache:  Cache{MaxSize: 500_000_000, MaxNarSize: 100 << 20, MinFree: 1 << 30, ScrubPeriod: Duration{3 * 24 * time.Hour}, NegativeTTL: Duration{5 * time.Second}},
		Admin: Admin{Listen: "127.0.0.1:5481", TokenFile: "/run/keys/cacheproxy-admin-token",
			TLSCertFile: "/run/keys/cacheproxy-admin.crt", TLSKeyFile: "/run/keys/cacheproxy-admin.key",
			Tokens: []AdminToken{{Name: "alice", File: "/run/keys/cacheproxy-alice.token"},
				{Name: "rebuilder-a", File: "/run/keys/cacheproxy-rebuilder-a.token"}}},
		Rebuild: Rebuild{Server: "https://cacheproxy.internal:5481", TokenFile: "/run/keys/cacheproxy-rebuilder-a.token",
			CAFile: "/etc/cacheproxy/admin.crt", KeyFile: "/etc/nix/rebuilder-a-1.sec", Interval: Duration{10 * time.Minute},
			Jobs: 2, Check: true, KeepDiffs: "/var/lib/cacheproxy-rebuild/diffs"},

		ShutdownTimeout: Duration{time.Minute},
		LogFormat:       "json", LogLevel: "warn",
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("full example:\n got %+v\nwant %+v", cfg, want)
	}
	// The example names key files that do not exist here; with real ones
	// it validates.
	cfg.SigningKeyFile = writeFile(t, "secret")
	cfg.Admin.TLSCertFile, cfg.Admin.TLSKeyFile = writeCertPair(t)
	for i := range cfg.Admin.Tokens {
		cfg.Admin.Tokens[i].File = writeFile(t, "token-of-at-least-16-bytes")
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("full example does not validate: %v", err)
	}
}

func TestUpstreamsReplaceDefaults(t *testing.T) {
	cfg, err := Load(writeFile(t, `
[[upstreams]]
url = "https://internal.example"
timeout = "5s"
`), Env{})
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Upstreams) != 1 {
		t.Fatalf("upstreams = %+v", cfg.Upstreams)
	}
	u := cfg.Upstreams[0]
	// The default cache.nixos.org key must not leak into a file upstream;
	// the per-entry defaults do apply.
	if u.URL != "https://internal.example" || len(u.PublicKeys) != 0 || u.Timeout.Duration != 5*time.Second || u.MaxConnections != DefaultMaxConnections {
		t.Fatalf("upstream = %+v", u)
	}
	err = cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "upstreams[0].public_keys") {
		t.Fatalf("want error about upstreams[0].public_keys, got %v", err)
	}
}

func TestPartialFileKeepsDefaults(t *testing.T) {
	cfg, err := Load(writeFile(t, "mode = \"report\"\n[policy]\nrequire_closure = true\n"), Env{})
	if err != nil {
		t.Fatal(err)
	}
	want := Defaults(Env{})
	want.Mode = "report"
	want.Policy.RequireClosure = true
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("got %+v\nwant %+v", cfg, want)
	}
}

func TestAdminListenEmptyDisables(t *testing.T) {
	cfg, err := Load(writeFile(t, "[admin]\nlisten = \"\"\n"), Env{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.Listen != "" {
		t.Fatalf("admin.listen = %q", cfg.Admin.Listen)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct {
		name, file string
		want       []string
	}{
		{"unknown key", "[policy]\nquorom = 2\n", []string{":2: policy.quorom: unknown key"}},
		{"unknown top key", "listen = \"127.0.0.1:1\"\nlistne = \"x\"\n", []string{":2: listne: unknown key"}},
		{"unknown upstream key", "[[upstreams]]\nurl = \"https://x\"\npublic_key = \"a\"\n", []string{":3: upstreams[0].public_key: unknown key"}},
		{"two unknown keys", "a = 1\nb = 2\n", []string{":1: a: unknown key", ":2: b: unknown key"}},
		{"wrong type", "[policy]\nquorum = \"two\"\n", []string{":2: policy.quorum: incompatible types"}},
		{"bad duration", "[[upstreams]]\ntimeout = \"30 parsecs\"\n", []string{":2: upstreams[0].timeout: ", "30 parsecs"}},
		{"max_connections not a number", "[[upstreams]]\nmax_connections = \"many\"\n", []string{":2: upstreams[0].max_connections"}},
		{"bad size", "[cache]\nmax_size = \"100 GB-ish\"\n", []string{":2: cache.max_size"}},
		{"syntax", "listen = \n", []string{":1: listen: expected value"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeFile(t, tc.file)
			_, err := Load(p, Env{})
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), p) {
				t.Errorf("error %q does not name the file", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	if _, err := Load(filepath.Join(t.TempDir(), "missing.toml"), Env{}); err == nil || !strings.Contains(err.Error(), "missing.toml") {
		t.Errorf("missing file: %v", err)
	}
}

func TestValidateErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "nope")
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"no upstreams", func(c *Config) { c.Upstreams = nil }, "upstreams: at least one"},
		{"ftp url", func(c *Config) { c.Upstreams[0].URL = "ftp://x" }, "upstreams[0].url"},
		{"no scheme", func(c *Config) { c.Upstreams[0].URL = "cache.nixos.org" }, "upstreams[0].url"},
		{"http no host", func(c *Config) { c.Upstreams[0].URL = "https://" }, "upstreams[0].url"},
		{"relative file", func(c *Config) { c.Upstreams[0].URL = "file://relative/dir" }, "upstreams[0].url"},
		{"opaque file", func(c *Config) { c.Upstreams[0].URL = "file:relative" }, "upstreams[0].url"},
		{"empty url", func(c *Config) { c.Upstreams[0].URL = "" }, "upstreams[0].url"},
		{"url with query", func(c *Config) { c.Upstreams[0].URL = "https://x/?a=b" }, "upstreams[0].url"},
		{"upstream without keys", func(c *Config) { c.Upstreams[0].PublicKeys = nil }, "upstreams[0].public_keys: at least one"},
		{"key no colon", func(c *Config) { c.Upstreams[0].PublicKeys = append(c.Upstreams[0].PublicKeys, ParseKey("nocolon")) }, "upstreams[0].public_keys[1]"},
		{"key empty name", func(c *Config) { c.Upstreams[0].PublicKeys = keys(":cflnkb3HVHh13QHZ7lFmSm1yh3DJwBgNvwKr6STrEbc=") }, "upstreams[0].public_keys[0]"},
		{"key bad base64", func(c *Config) { c.Upstreams[0].PublicKeys = keys("k:not base64!") }, "upstreams[0].public_keys[0]"},
		{"key short", func(c *Config) { c.Upstreams[0].PublicKeys = keys("k:AAAA") }, "upstreams[0].public_keys[0]"},
		{"zero timeout", func(c *Config) { c.Upstreams[0].Timeout = Duration{} }, "upstreams[0].timeout"},
		{"zero max_connections", func(c *Config) { c.Upstreams[0].MaxConnections = 0 }, "upstreams[0].max_connections: 0 must be at least 1"},
		{"negative max_connections", func(c *Config) { c.Upstreams[0].MaxConnections = -3 }, "upstreams[0].max_connections"},
		{"unreadable netrc", func(c *Config) { c.Upstreams[0].NetrcFile = missing }, "upstreams[0].netrc_file"},
		{"netrc is dir", func(c *Config) { c.Upstreams[0].NetrcFile = dir }, "upstreams[0].netrc_file"},
		{"quorum zero", func(c *Config) { c.Policy.Quorum = 0 }, "policy.quorum"},
		{"quorum too large", func(c *Config) { c.Policy.Attesters = keys(keyA); c.Policy.Quorum = 2 }, "policy.quorum"},
		{"quorum without attesters", func(c *Config) { c.Policy.Quorum = 3 }, "policy.quorum"},
		{"bad attester", func(c *Config) { c.Policy.Attesters = keys(keyA, "x:yz") }, "policy.attesters[1]"},
		{"duplicate attester key", func(c *Config) {
			c.Policy.Attesters = keys(keyA, "other-name"+keyA[strings.Index(keyA, ":"):])
		}, "policy.attesters[1]: same key"},
		{"duplicate attester name", func(c *Config) {
			c.Policy.Attesters = keys(keyA, "rebuilder-a-1"+keyB[strings.Index(keyB, ":"):])
		}, "policy.attesters[1]: key name"},
		{"bad mode", func(c *Config) { c.Mode = "permissive" }, "mode"},
		{"bad serve compression", func(c *Config) { c.ServeCompression = "xz" }, `serve_compression: "xz" must be "" (serve what the upstream has) or "zstd"`},
		{"unreadable signing key", func(c *Config) { c.SigningKeyFile = missing }, "signing_key_file"},
		{"negative priority", func(c *Config) { c.Priority = -1 }, "priority"},
		{"relative store dir", func(c *Config) { c.StoreDir = "nix/store" }, "store_dir"},
		{"unclean store dir", func(c *Config) { c.StoreDir = "/nix/store/" }, "store_dir"},
		{"bad listen", func(c *Config) { c.Listen = "localhost" }, "listen"},
		{"bad listen port", func(c *Config) { c.Listen = "127.0.0.1:http" }, "listen"},
		{"empty listen", func(c *Config) { c.Listen = "" }, "listen"},
		{"bad admin listen", func(c *Config) { c.Admin.Listen = "127.0.0.1:99999" }, "admin.listen"},
		{"admin same as main", func(c *Config) { c.Admin.Listen = c.Listen }, "admin.listen"},
		{"empty state dir", func(c *Config) { c.StateDir = "" }, "state_dir"},
		{"zero cache", func(c *Config) { c.Cache.MaxSize = 0 }, "cache.max_size"},
		{"zero max NAR", func(c *Config) { c.Cache.MaxNarSize = 0 }, "cache.max_nar_size"},
		{"short scrub", func(c *Config) { c.Cache.ScrubPeriod = Duration{time.Minute} }, "cache.scrub_period"},
		{"long negative ttl", func(c *Config) { c.Cache.NegativeTTL = Duration{2 * time.Hour} }, "cache.negative_ttl"},
		{"negative shutdown timeout", func(c *Config) { c.ShutdownTimeout = Duration{-time.Second} }, "shutdown_timeout"},
		{"etcd not a URL", func(c *Config) { c.Cluster.Etcd = []string{"10.0.0.1:2379"} }, "cluster.etcd[0]"},
		{"etcd without port", func(c *Config) { c.Cluster.Etcd = []string{"http://10.0.0.1"} }, "cluster.etcd[0]"},
		{"etcd with path", func(c *Config) { c.Cluster.Etcd = []string{"http://e:2379", "http://e:2379/v3"} }, "cluster.etcd[1]"},
		{"cluster keys without etcd", func(c *Config) { c.Cluster.Prefix = "/x/" }, "cluster.etcd: the [cluster] section needs"},
		{"relative prefix", func(c *Config) { c.Cluster.Etcd = []string{"http://e:2379"}; c.Cluster.Prefix = "x/" }, "cluster.prefix"},
		{"cert without key", func(c *Config) { c.Cluster.Etcd = []string{"https://e:2379"}; c.Cluster.CertFile = missing }, "cluster.cert_file: cert_file and key_file go together"},
		{"unreadable ca", func(c *Config) { c.Cluster.Etcd = []string{"https://e:2379"}; c.Cluster.CAFile = missing }, "cluster.ca_file"},
		{"tls files with http", func(c *Config) {
			c.Cluster.Etcd = []string{"http://e:2379"}
			c.Cluster.CAFile = writeFile(t, "x")
		}, "no endpoint is https"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Defaults(Env{})
			tc.mutate(&cfg)
			err := cfg.Validate()
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not contain %q", err, tc.want)
			}
		})
	}
}

func TestValidateReportsAllProblems(t *testing.T) {
	cfg := Defaults(Env{})
	cfg.Mode = "x"
	cfg.Priority = -5
	cfg.Upstreams[0].URL = "gopher://x"
	err := cfg.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, key := range []string{"mode:", "priority:", "upstreams[0].url:"} {
		if !strings.Contains(err.Error(), key) {
			t.Errorf("error %q misses %q", err, key)
		}
	}
}

func TestValidAlternatives(t *testing.T) {
	cfg := Defaults(Env{})
	cfg.Upstreams = append(cfg.Upstreams,
		Upstream{URL: "file:///srv/cache", PublicKeys: keys(keyC), Timeout: Duration{time.Second}, MaxConnections: 1},
		Upstream{URL: "http://[::1]:8080/prefix/", PublicKeys: keys(keyC), Timeout: Duration{time.Second}, MaxConnections: 1000},
	)
	cfg.Listen = "[::]:80"
	cfg.Admin.Listen = ":5481" // all interfaces: allowed with TLS
	cfg.Admin.TLSCertFile, cfg.Admin.TLSKeyFile = writeCertPair(t)
	cfg.Mode = "report"
	cfg.Policy.Attesters = keys(keyA, keyB)
	cfg.Policy.Quorum = 2
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	for _, name := range []string{"defaults", "full"} {
		t.Run(name, func(t *testing.T) {
			var cfg Config
			var err error
			if name == "defaults" {
				cfg, err = Load("", Env{StateDirectory: "/var/lib/cp"})
			} else {
				cfg, err = Load("testdata/full.toml", Env{})
			}
			if err != nil {
				t.Fatal(err)
			}
			cfg.Upstreams[0].Timeout = Duration{90 * time.Second}
			cfg.Upstreams[0].MaxConnections = 7
			cfg.Admin.Listen = "" // must survive as "off", not revert to the default
			cfg.ApplyStateDirDefaults()
			out, err := cfg.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range []string{`timeout = "1m30s"`, `max_size = "`, `max_connections = 7`} {
				if !strings.Contains(string(out), w) {
					t.Errorf("output lacks %s:\n%s", w, out)
				}
			}
			back, err := Load(writeFile(t, string(out)), Env{StateDirectory: "/somewhere/else"})
			if err != nil {
				t.Fatalf("re-Load: %v\n%s", err, out)
			}
			if !reflect.DeepEqual(back, cfg) {
				t.Fatalf("round trip differs:\n got %+v\nwant %+v\n%s", back, cfg, out)
			}
		})
	}
}

func TestEnvFromOS(t *testing.T) {
	t.Setenv("STATE_DIRECTORY", "/var/lib/from-env")
	if got := EnvFromOS().StateDirectory; got != "/var/lib/from-env" {
		t.Fatalf("EnvFromOS = %q", got)
	}
}

// An explicit "0s" is not mistaken for "unset" and replaced by the default.
func TestExplicitZeroTimeoutIsRefused(t *testing.T) {
	cfg, err := Load(writeFile(t, `
[[upstreams]]
url = "https://a.example"
public_keys = ["`+keyC+`"]
timeout = "0s"

[[upstreams]]
url = "https://b.example"
public_keys = ["`+keyC+`"]
`), Env{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Upstreams[0].Timeout.Duration != 0 || cfg.Upstreams[1].Timeout.Duration != 30*time.Second {
		t.Fatalf("timeouts %v, %v", cfg.Upstreams[0].Timeout, cfg.Upstreams[1].Timeout)
	}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "upstreams[0].timeout") {
		t.Fatalf("want upstreams[0].timeout error, got %v", err)
	}
}

func keys(ss ...string) []PublicKey {
	out := make([]PublicKey, len(ss))
	for i, s := range ss {
		out[i] = ParseKey(s)
	}
	return out
}

// An explicit max_connections = 0 is refused, not replaced by the default;
// each [[upstreams]] entry gets the default on its own.
func TestMaxConnectionsPerEntry(t *testing.T) {
	cfg, err := Load(writeFile(t, `
[[upstreams]]
url = "https://a.example"
public_keys = ["`+keyC+`"]
max_connections = 0

[[upstreams]]
url = "https://b.example"
public_keys = ["`+keyC+`"]

[[upstreams]]
url = "https://c.example"
public_keys = ["`+keyC+`"]
max_connections = 8
`), Env{})
	if err != nil {
		t.Fatal(err)
	}
	var got []int
	for _, u := range cfg.Upstreams {
		got = append(got, u.MaxConnections)
	}
	if !reflect.DeepEqual(got, []int{0, DefaultMaxConnections, 8}) {
		t.Fatalf("max_connections %v, want [0 %d 8]", got, DefaultMaxConnections)
	}
	err = cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "upstreams[0].max_connections") {
		t.Fatalf("want upstreams[0].max_connections error, got %v", err)
	}
	if strings.Contains(err.Error(), "upstreams[1]") || strings.Contains(err.Error(), "upstreams[2]") {
		t.Fatalf("valid entries reported: %v", err)
	}
}

// writeCertPair writes a self-signed certificate and its key.
func writeCertPair(t *testing.T) (certFile, keyFile string) {
	p := testcert.Write(t, "admin", "localhost", "127.0.0.1")
	return p.CertFile, p.KeyFile
}

// A non-loopback admin.listen needs TLS, because every admin call carries
// the bearer token; loopback addresses do not.
func TestAdminListenNeedsTLS(t *testing.T) {
	cert, key := writeCertPair(t)
	for _, tc := range []struct {
		listen string
		tls    bool
		ok     bool
	}{
		{"10.0.0.5:5481", false, false},
		{"0.0.0.0:5481", false, false},
		{":5481", false, false}, // empty host: all interfaces
		{"[::]:5481", false, false},
		{"proxy.example:5481", false, false}, // a name may resolve to anything
		{"127.0.0.1:5481", false, true},
		{"127.1.2.3:5481", false, true},
		{"[::1]:5481", false, true},
		{"localhost:5481", false, true},
		{"10.0.0.5:5481", true, true},
		{"0.0.0.0:5481", true, true},
		{":5481", true, true},
		{"[::1]:5481", true, true},
	} {
		cfg := Defaults(Env{})
		cfg.Admin.Listen = tc.listen
		if tc.tls {
			cfg.Admin.TLSCertFile, cfg.Admin.TLSKeyFile = cert, key
		}
		err := cfg.Validate()
		switch {
		case tc.ok && err != nil:
			t.Errorf("admin.listen %q, TLS %v: refused: %v", tc.listen, tc.tls, err)
		case !tc.ok && err == nil:
			t.Errorf("admin.listen %q, TLS %v: accepted", tc.listen, tc.tls)
		case !tc.ok:
			for _, w := range []string{"admin.listen:", tc.listen, "admin.tls_cert_file", "admin.tls_key_file"} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("admin.listen %q: error %q does not contain %q", tc.listen, err, w)
				}
			}
		}
	}
}

func TestAdminTLSFiles(t *testing.T) {
	cert, key := writeCertPair(t)
	otherCert, otherKey := writeCertPair(t)
	dir := t.TempDir()
	missing := filepath.Join(dir, "nope")
	notPEM := writeFile(t, "not a certificate")
	for _, tc := range []struct {
		name       string
		cert, key  string
		want, also string
	}{
		{"only cert", cert, "", "admin.tls_key_file: must be set together with admin.tls_cert_file", ""},
		{"only key", "", key, "admin.tls_cert_file: must be set together with admin.tls_key_file", ""},
		{"cert of another key", cert, otherKey, "admin.tls_cert_file: " + cert + " with admin.tls_key_file " + otherKey, "not a usable certificate"},
		{"key of another cert", otherCert, key, "admin.tls_cert_file: ", "private key does not match public key"},
		{"cert not PEM", notPEM, key, "admin.tls_cert_file: ", "not a usable certificate"},
		{"key not PEM", cert, notPEM, "admin.tls_cert_file: ", "not a usable certificate"},
		{"missing cert", missing, key, "admin.tls_cert_file: not readable", ""},
		{"missing key", cert, missing, "admin.tls_key_file: not readable", ""},
		{"cert is a directory", dir, key, "admin.tls_cert_file: " + dir + " is a directory", ""},
		{"key is a device", cert, os.DevNull, "admin.tls_key_file: " + os.DevNull + " is not a regular file", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Defaults(Env{})
			cfg.Admin.TLSCertFile, cfg.Admin.TLSKeyFile = tc.cert, tc.key
			err := cfg.Validate()
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range []string{tc.want, tc.also} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
	// Half a pair on a non-loopback address: the operator meant TLS, so the
	// missing half is named, not the address. The whole pair is accepted.
	cfg := Defaults(Env{})
	cfg.Admin.Listen = "0.0.0.0:5481"
	cfg.Admin.TLSCertFile = cert
	err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "admin.tls_key_file: must be set") || strings.Contains(err.Error(), "admin.listen") {
		t.Fatalf("half a pair on 0.0.0.0: %v", err)
	}
	cfg.Admin.TLSKeyFile = key
	if err := cfg.Validate(); err != nil {
		t.Fatalf("whole pair on 0.0.0.0: %v", err)
	}
}

// The admin problems are reported with every other one, in one run.
func TestValidateReportsAdminTLSWithOthers(t *testing.T) {
	cfg := Defaults(Env{})
	cfg.Mode = "x"
	cfg.Admin.Listen = "0.0.0.0:5481"
	bad := Defaults(Env{})
	bad.Admin.Listen = "0.0.0.0:5482"
	bad.Admin.TLSKeyFile = filepath.Join(t.TempDir(), "missing.key")
	bad.Mode = "x"
	for _, tc := range []struct {
		cfg  Config
		want []string
	}{
		{cfg, []string{"mode:", "admin.listen:"}},
		{bad, []string{"mode:", "admin.tls_cert_file: must be set", "admin.tls_key_file: not readable"}},
	} {
		err := tc.cfg.Validate()
		if err == nil {
			t.Fatal("no error")
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("error %q misses %q", err, w)
			}
		}
	}
}

// [[admin.tokens]] parse from TOML and are validated: names unique, fit
// for logs and not the default token's, files readable.
func TestAdminTokens(t *testing.T) {
	dir := t.TempDir()
	alice := filepath.Join(dir, "alice.token")
	if err := os.WriteFile(alice, []byte(strings.Repeat("a", 32)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(writeFile(t, `
[admin]
token_file = "/run/keys/cacheproxy-admin-token"

[[admin.tokens]]
name = "alice"
file = "`+alice+`"

[[admin.tokens]]
name = "rebuilder-1"
file = "`+alice+`"
`), Env{})
	if err != nil {
		t.Fatal(err)
	}
	want := []AdminToken{{Name: "alice", File: alice}, {Name: "rebuilder-1", File: alice}}
	if !reflect.DeepEqual(cfg.Admin.Tokens, want) {
		t.Errorf("tokens = %+v, want %+v", cfg.Admin.Tokens, want)
	}
	cfg.Admin.TokenFile = ""
	if err := cfg.Validate(); err != nil {
		t.Errorf("valid tokens refused: %v", err)
	}
	if _, err := Load(writeFile(t, "[[admin.tokens]]\nname = \"x\"\nfiel = \"/tmp/x\"\n"), Env{}); err == nil || !strings.Contains(err.Error(), "admin.tokens[0].fiel") {
		t.Errorf("unknown key in [[admin.tokens]]: %v", err)
	}

	for _, tc := range []struct {
		name   string
		tokens []AdminToken
		want   string
	}{
		{"duplicate name", []AdminToken{{"alice", alice}, {"alice", alice}}, `admin.tokens[1].name: "alice" is already the name of admin.tokens[0]`},
		{"default name", []AdminToken{{"admin", alice}}, `admin.tokens[0].name: "admin" is the name of admin.token_file's token`},
		{"empty name", []AdminToken{{"", alice}}, `admin.tokens[0].name: "" must be`},
		{"name with a space", []AdminToken{{"alice smith", alice}}, `admin.tokens[0].name: "alice smith" must be`},
		{"no file", []AdminToken{{"alice", ""}}, "admin.tokens[0].file: must be set"},
		{"missing file", []AdminToken{{"alice", filepath.Join(dir, "nope")}}, "admin.tokens[0].file: not readable"},
		{"directory", []AdminToken{{"alice", dir}}, "admin.tokens[0].file: " + dir + " is a directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Defaults(Env{})
			cfg.Admin.Tokens = tc.tokens
			err := cfg.Validate()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Validate = %v, want %q", err, tc.want)
			}
		})
	}
}

// [rebuild] reads every key over its defaults, and Check places each bad
// value at its line, as FILE:LINE: rebuild.KEY.
func TestRebuildSection(t *testing.T) {
	cfg, err := Load(writeFile(t, `
[rebuild]
server = "https://gatekeeper.internal:5481"
token_file = "/run/keys/rebuilder.token"
ca_file = "/etc/cacheproxy/admin.crt"
key_file = "/etc/nix/rebuilder-1.sec"
interval = "90s"
jobs = 4
check = true
keep_diffs = "/var/lib/cacheproxy-rebuild/diffs"
`), Env{})
	if err != nil {
		t.Fatal(err)
	}
	want := Rebuild{Server: "https://gatekeeper.internal:5481", TokenFile: "/run/keys/rebuilder.token", CAFile: "/etc/cacheproxy/admin.crt",
		KeyFile: "/etc/nix/rebuilder-1.sec", Interval: Duration{90 * time.Second}, Jobs: 4, Check: true, KeepDiffs: "/var/lib/cacheproxy-rebuild/diffs"}
	if cfg.Rebuild != want {
		t.Errorf("rebuild = %+v, want %+v", cfg.Rebuild, want)
	}
	if d := Defaults(Env{}).Rebuild; d.Interval.Duration != DefaultRebuildInterval || d.Jobs != DefaultRebuildJobs || d.Check || d.KeepDiffs != "" {
		t.Errorf("rebuild defaults = %+v", d)
	}
	// Marshalled (check-config) and read back, it is the same.
	out, err := cfg.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := Parse(out, Env{})
	if err != nil || back.Rebuild != want {
		t.Errorf("rebuild after Marshal and Parse = %+v, %v", back.Rebuild, err)
	}

	p := writeFile(t, "mode = \"enforce\"\n[rebuild]\nserver = \"ftp://x\"\ninterval = \"0s\"\njobs = 0\nkeepdiffs = \"/x\"\n")
	f, err := Read(Location{Path: p, From: FromFlag}, Env{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, pr := range f.Check() {
		got = append(got, strings.TrimPrefix(pr.String(), p))
	}
	wantPs := []string{
		`:3: rebuild.server: "ftp://x" must be an http:// or https:// URL with a host`,
		`:4: rebuild.interval: 0s must be between 1s and 7d`,
		`:5: rebuild.jobs: 0 must be between 1 and 256`,
		`:6: rebuild.keepdiffs: unknown key`,
	}
	if strings.Join(got, "\n") != strings.Join(wantPs, "\n") {
		t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantPs, "\n"))
	}
}
