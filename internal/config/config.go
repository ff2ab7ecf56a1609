// Package config reads, defaults and validates cacheproxy's TOML configuration.
//
// Its job is to turn an optional config file plus the process environment into
// one Config value whose every field has a meaning, and to refuse at start
// anything the README says must be refused (unknown keys, bad URLs, malformed
// public keys, an impossible quorum, unreadable key files), naming the
// offending key.
//
// Trust model: the config file is operator input and is trusted to say what
// the operator means — it is where the roots of trust (upstream keys, attester
// keys, quorum) are declared, so the package is strict rather than forgiving:
// a typo such as "quorom" must fail loudly instead of silently leaving the
// default in force. It does not check that keys are the right keys, only that
// they are well-formed. The environment is read in exactly one place,
// EnvFromOS; everything else takes an Env value so tests need no os.Setenv.
package config

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// Defaults that other packages or the CLI may want to mention in help text.
const (
	DefaultListen         = "127.0.0.1:5480"
	DefaultAdminListen    = "127.0.0.1:5481"
	DefaultStateDir       = "./cacheproxy-state"
	DefaultStoreDir       = "/nix/store"
	DefaultPriority       = 40
	DefaultMode           = ModeEnforce
	DefaultUpstreamURL    = "https://cache.nixos.org"
	DefaultUpstreamKey    = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
	DefaultTimeout        = 30 * time.Second
	DefaultMaxConnections = 64
	DefaultMaxSize        = Size(100 << 30)
	DefaultMinFree        = Size(256 << 20)
	DefaultScrubPeriod    = 7 * 24 * time.Hour
	DefaultNegativeTTL    = 10 * time.Second
	// DefaultMaxNarSize is far above the largest NARs cache.nixos.org
	// serves (a few GiB: CUDA, TeX Live), and far below what a lying
	// upstream could claim.
	DefaultMaxNarSize = Size(16 << 30)
	DefaultQuorum     = 1
	DefaultLogFormat  = "text"
	DefaultLogLevel   = "info"
	SigningKeyName    = "gatekeeper.sec"
	AdminTokenName    = "admin-token"
	ModeEnforce       = "enforce"
	ModeReport        = "report"
	// ServeAsUpstream and ServeZstd are the values of serve_compression:
	// serve each NAR as its upstream compressed it, or always as zstd.
	ServeAsUpstream      = ""
	ServeZstd            = "zstd"
	stateDirectoryEnvVar = "STATE_DIRECTORY"
)

// DefaultShutdownTimeout is how long SIGTERM waits for responses in flight:
// long enough for most NARs of a fleet's closures on a LAN, well short of
// systemd's 90 s stop timeout.
const DefaultShutdownTimeout = 30 * time.Second

// Defaults of `cacheproxy rebuild`'s long-running mode: a pass over the
// rebuild queue every five minutes keeps the fleet's wait short without
// polling the gatekeeper more than a few hundred times a day; one build at
// a time, as Nix's own max-jobs default.
const (
	DefaultRebuildInterval = 5 * time.Minute
	DefaultRebuildJobs     = 1
	MaxRebuildJobs         = 256
)

// Upstream is one binary cache cacheproxy fetches from, tried in file order.
type Upstream struct {
	URL        string      `toml:"url"`         // http://, https:// or file:///absolute/dir
	PublicKeys []PublicKey `toml:"public_keys"` // "name:base64" ed25519 keys trusted to sign this upstream's narinfos
	Timeout    Duration    `toml:"timeout"`     // default 30s
	NetrcFile  string      `toml:"netrc_file"`  // optional credentials for private upstreams
	// MaxConnections bounds the requests in flight to this upstream (a NAR
	// download counts until it ends); default 64.
	MaxConnections int `toml:"max_connections"`
}

// Policy holds the decision-rule parameters.
type Policy struct {
	Attesters        []PublicKey `toml:"attesters"`         // rebuilder public keys, "name:base64"
	Quorum           int         `toml:"quorum"`            // distinct attester keys required; default 1
	ContentAddressed bool        `toml:"content_addressed"` // default true
	RequireClosure   bool        `toml:"require_closure"`   // default false
}

// Cache holds the blob store limits.
type Cache struct {
	MaxSize Size `toml:"max_size"` // default 100GiB
	// MaxNarSize refuses paths with a larger NAR (too_large); default
	// 16GiB, and never more than max_size.
	MaxNarSize Size `toml:"max_nar_size"`
	// MinFree is the free space kept on the state dir's file system: below
	// it no NAR download starts (503) and /healthz fails. Default 256MiB.
	MinFree Size `toml:"min_free"`
	// ScrubPeriod is how long the background re-hash of every cached blob
	// takes; default 7d.
	ScrubPeriod Duration `toml:"scrub_period"`
	// NegativeTTL is how long a rejection or "not found" is answered
	// without asking the upstreams again (any admin change ends it at
	// once); default 10s, "0s" turns it off.
	NegativeTTL Duration `toml:"negative_ttl"`
}

// Admin configures the admin API listener.
type Admin struct {
	Listen    string `toml:"listen"`     // default 127.0.0.1:5481; "" turns the admin API off
	TokenFile string `toml:"token_file"` // "" means <state_dir>/admin-token; see AdminTokenFile
	// TLSCertFile and TLSKeyFile (PEM, both or neither) make the admin
	// listener serve HTTPS. They are required when Listen is not a loopback
	// address: the bearer token must not cross a network in clear text.
	TLSCertFile string `toml:"tls_cert_file"`
	TLSKeyFile  string `toml:"tls_key_file"`
	// Tokens are named admin tokens, one per person or machine (a
	// rebuilder), so that the audit trail says who made each change. The
	// token in TokenFile is always valid too, under the name "admin".
	Tokens []AdminToken `toml:"tokens"`
}

// Cluster is the [cluster] section.
type Cluster struct {
	// Etcd lists the etcd client URLs (http:// or https://); empty means
	// no cluster.
	Etcd []string `toml:"etcd"`
	// Prefix is the key prefix of this cluster's records; nodes that share
	// trust use the same prefix.
	Prefix string `toml:"prefix"`
	// CAFile verifies etcd's server certificates (https endpoints; the
	// system roots when empty). CertFile and KeyFile (both or neither) are
	// this node's client certificate.
	CAFile   string `toml:"ca_file"`
	CertFile string `toml:"cert_file"`
	KeyFile  string `toml:"key_file"`
}

// Enabled reports whether the section names a cluster.
func (c Cluster) Enabled() bool { return len(c.Etcd) > 0 }

// DefaultClusterPrefix is cluster.prefix's default.
const DefaultClusterPrefix = "/cacheproxy/"

// AdminToken is one named admin token: [[admin.tokens]] name = "alice",
// file = "/run/keys/alice.token". The file holds the token (at least 16
// bytes; surrounding white space is ignored) and is never generated.
type AdminToken struct {
	Name string `toml:"name"`
	File string `toml:"file"`
}

// Rebuild configures `cacheproxy rebuild` on a rebuilder machine; the
// gatekeeper itself ignores it. Its flags override it.
type Rebuild struct {
	// Server and TokenFile find the gatekeeper's admin API, with a token
	// of the rebuilder's own; "" falls back to admin.listen and
	// admin.token_file (a rebuilder on the gatekeeper's host).
	Server    string `toml:"server"`
	TokenFile string `toml:"token_file"`
	CAFile    string `toml:"ca_file"` // trust these CA certificates for Server's https
	KeyFile   string `toml:"key_file"`
	// Interval is the pause between passes over the queue (without
	// --once); Jobs is how many derivations build at once.
	Interval Duration `toml:"interval"`
	Jobs     int      `toml:"jobs"`
	// Check builds every derivation twice and attests only outputs the
	// two builds agree on.
	Check bool `toml:"check"`
	// KeepDiffs is a directory that keeps both NARs of a build that came
	// out differently twice (for diffoscope); "" keeps none.
	KeepDiffs string `toml:"keep_diffs"`
}

// DefaultTokenName is the name of the token in admin.token_file.
const DefaultTokenName = "admin"

// TLS reports whether the admin API is meant to serve HTTPS: either TLS key
// is set. Either one, not both, so that a config naming only one of them
// fails closed (Validate refuses it, the server cannot load it, the CLI
// insists on https) instead of quietly falling back to clear text.
func (a Admin) TLS() bool { return a.TLSCertFile != "" || a.TLSKeyFile != "" }

// Config is the whole effective configuration.
type Config struct {
	Listen         string `toml:"listen"`
	StateDir       string `toml:"state_dir"`
	StoreDir       string `toml:"store_dir"`
	Priority       int    `toml:"priority"`
	Mode           string `toml:"mode"`
	SigningKeyFile string `toml:"signing_key_file"` // "" means <state_dir>/gatekeeper.sec, generated; see SigningKeyPath
	// ServeCompression is "" (serve each NAR as the upstream compressed it)
	// or "zstd" (re-encode every NAR to zstd on its first download).
	ServeCompression string     `toml:"serve_compression"`
	Upstreams        []Upstream `toml:"upstreams"`
	Policy           Policy     `toml:"policy"`
	Cache            Cache      `toml:"cache"`
	Admin            Admin      `toml:"admin"`
	// Cluster, when it names etcd endpoints, keeps the trust state in etcd
	// shared by every node (internal/cluster); without it the node works
	// on its state file alone.
	Cluster Cluster `toml:"cluster"`
	// Rebuild is read by `cacheproxy rebuild` on a rebuilder.
	Rebuild Rebuild `toml:"rebuild"`

	// ShutdownTimeout is how long SIGTERM lets responses in flight (NAR
	// downloads) finish after the listeners stop accepting; default 30s.
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
	// LogFormat is "text" (key=value lines) or "json" (one object a line);
	// LogLevel is debug, info, warn or error. serve's --log-format and
	// --log-level override them.
	LogFormat string `toml:"log_format"`
	LogLevel  string `toml:"log_level"`
}

// Env is what Load and Defaults read from the process environment, passed in
// explicitly so tests need no os.Setenv.
type Env struct {
	// StateDirectory is $STATE_DIRECTORY as systemd's StateDirectory= sets it
	// (possibly a colon-separated list).
	StateDirectory string
	// ConfigFile is $CACHEPROXY_CONFIG: the config file when no -c is given.
	ConfigFile string
	// SystemConfig is the file used when it exists and neither -c nor
	// $CACHEPROXY_CONFIG names one: SystemConfigPath, or a temporary path
	// in tests ("" looks for none).
	SystemConfig string
}

// EnvFromOS reads the process environment. It is the only place in this
// package that does.
func EnvFromOS() Env {
	return Env{StateDirectory: os.Getenv(stateDirectoryEnvVar), ConfigFile: os.Getenv(ConfigEnvVar), SystemConfig: SystemConfigPath}
}

// Defaults returns the embedded defaults — the one place defaults live.
// Each call returns fresh slices, so callers may modify the result.
func Defaults(env Env) Config {
	return Config{
		Listen:   DefaultListen,
		StateDir: defaultStateDir(env),
		StoreDir: DefaultStoreDir,
		Priority: DefaultPriority,
		Mode:     DefaultMode,
		Upstreams: []Upstream{{
			URL:            DefaultUpstreamURL,
			PublicKeys:     []PublicKey{ParseKey(DefaultUpstreamKey)},
			Timeout:        Duration{DefaultTimeout},
			MaxConnections: DefaultMaxConnections,
		}},
		Policy: Policy{
			Quorum:           DefaultQuorum,
			ContentAddressed: true,
		},
		Cache: Cache{MaxSize: DefaultMaxSize, MaxNarSize: DefaultMaxNarSize, MinFree: DefaultMinFree, ScrubPeriod: Duration{DefaultScrubPeriod},
			NegativeTTL: Duration{DefaultNegativeTTL}},
		Admin:           Admin{Listen: DefaultAdminListen},
		Rebuild:         Rebuild{Interval: Duration{DefaultRebuildInterval}, Jobs: DefaultRebuildJobs},
		ShutdownTimeout: Duration{DefaultShutdownTimeout},
		LogFormat:       DefaultLogFormat,
		LogLevel:        DefaultLogLevel,
	}
}

// defaultStateDir follows systemd: with several StateDirectory= entries,
// $STATE_DIRECTORY is colon-separated and the first is the service's own.
func defaultStateDir(env Env) string {
	if first, _, _ := strings.Cut(env.StateDirectory, ":"); first != "" {
		return first
	}
	return DefaultStateDir
}

// Load reads the TOML file at path over the defaults; "" means no file, only
// defaults. Every problem found while reading (TOML errors, values of the
// wrong type, unknown keys) is returned at once as Problems, each with its
// line. Values the file does not set keep their defaults, except that an
// [[upstreams]] list in the file replaces the default list as a whole (an
// upstream the operator did not write must never be trusted implicitly).
// Load does not Validate; Read and File.Check do both with lines.
func Load(path string, env Env) (Config, error) {
	f, err := Read(Location{Path: path, From: FromFlag}, env)
	if err != nil {
		return Config{}, err
	}
	if ps := f.Problems(); len(ps) > 0 {
		return Config{}, ps
	}
	return f.Config, nil
}

// Parse is Load for TOML already in memory (the admin API or tests);
// problems name the file "config".
func Parse(data []byte, env Env) (Config, error) {
	f := &File{Location: Location{Path: "config", From: FromFlag}, Config: Defaults(env), lines: map[string]int{}, flags: map[string]string{}}
	f.read(data, env)
	if ps := f.Problems(); len(ps) > 0 {
		return Config{}, ps
	}
	return f.Config, nil
}

// EffectiveMaxNarSize is the largest NAR accepted: max_nar_size, but no
// more than the whole cache.
func (c Config) EffectiveMaxNarSize() uint64 { return uint64(min(c.Cache.MaxNarSize, c.Cache.MaxSize)) }

// AdminTokenFile is the admin token path: admin.token_file, or
// <state_dir>/admin-token. It is derived on every call so a --state-dir flag
// applied after Load moves it too.
func (c Config) AdminTokenFile() string {
	if c.Admin.TokenFile != "" {
		return c.Admin.TokenFile
	}
	return filepath.Join(c.StateDir, AdminTokenName)
}

// SigningKeyPath is the gatekeeper key path: signing_key_file, or
// <state_dir>/gatekeeper.sec (generated by the server on first start).
func (c Config) SigningKeyPath() string {
	if c.SigningKeyFile != "" {
		return c.SigningKeyFile
	}
	return filepath.Join(c.StateDir, SigningKeyName)
}

// ApplyStateDirDefaults writes the paths derived from StateDir into the
// struct (admin.token_file), for display by check-config. Call it only after
// flags have overridden state_dir. signing_key_file is deliberately left
// empty: a set signing_key_file must exist and be readable, whereas the
// derived one is generated on first start — use SigningKeyPath.
func (c *Config) ApplyStateDirDefaults() {
	c.Admin.TokenFile = c.AdminTokenFile()
}

// Marshal renders the config as TOML (for `cacheproxy check-config`), with
// durations and sizes as strings. Parsing the output yields an equal Config.
func (c Config) Marshal() ([]byte, error) {
	var buf bytes.Buffer
	enc := toml.NewEncoder(&buf)
	enc.Indent = ""
	if err := enc.Encode(c); err != nil {
		return nil, fmt.Errorf("config: encoding TOML: %w", err)
	}
	return buf.Bytes(), nil
}
