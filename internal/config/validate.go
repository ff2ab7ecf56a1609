package config

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// FieldError is one problem with one config key. Key uses the file's
// spelling with list indices, e.g. "upstreams[0].public_keys[1]".
type FieldError struct {
	Key string
	Err error
}

func (e *FieldError) Error() string { return e.Key + ": " + e.Err.Error() }
func (e *FieldError) Unwrap() error { return e.Err }

// Validate checks everything the README says is refused at start. It returns
// all problems joined with errors.Join (each a *FieldError naming its key),
// so an operator fixes a config in one round instead of one error per start.
func (c Config) Validate() error {
	var errs []error
	add := func(key string, format string, args ...any) {
		errs = append(errs, &FieldError{Key: key, Err: fmt.Errorf(format, args...)})
	}
	addErr := func(key string, err error) {
		if err != nil {
			errs = append(errs, &FieldError{Key: key, Err: err})
		}
	}

	addErr("listen", checkListen(c.Listen))
	if c.Admin.Listen != "" { // "" is documented as "admin API off"
		addErr("admin.listen", checkListen(c.Admin.Listen))
		if c.Admin.Listen == c.Listen {
			add("admin.listen", "%q is also the main listen address; the admin API needs its own", c.Admin.Listen)
		}
		// Every admin call carries the bearer token, which changes what the
		// whole fleet gets; off loopback it would cross a network in clear
		// text. A malformed address is reported above and not again here.
		if host, _, err := net.SplitHostPort(c.Admin.Listen); err == nil && !IsLoopbackHost(host) && !c.Admin.TLS() {
			add("admin.listen", "%q is not a loopback address, and without TLS the admin token would cross the network in clear text; "+
				"set admin.tls_cert_file and admin.tls_key_file, or listen on 127.0.0.1, [::1] or localhost", c.Admin.Listen)
		}
	}
	errs = append(errs, c.Admin.validateTLS()...)
	errs = append(errs, c.Admin.validateTokens()...)
	if strings.TrimSpace(c.StateDir) == "" {
		add("state_dir", "must not be empty")
	}
	// The store dir goes verbatim into fingerprints and store-path checks, so
	// "/nix/store/" or "/nix//store" would make every signature mismatch.
	if !path.IsAbs(c.StoreDir) || path.Clean(c.StoreDir) != c.StoreDir || c.StoreDir == "/" {
		add("store_dir", "%q must be a clean absolute path such as /nix/store", c.StoreDir)
	}
	if c.Priority < 0 {
		add("priority", "%d must not be negative", c.Priority)
	}
	if c.Mode != ModeEnforce && c.Mode != ModeReport {
		add("mode", "%q must be %q or %q", c.Mode, ModeEnforce, ModeReport)
	}
	if c.ServeCompression != ServeAsUpstream && c.ServeCompression != ServeZstd {
		add("serve_compression", "%q must be %q (serve what the upstream has) or %q", c.ServeCompression, ServeAsUpstream, ServeZstd)
	}
	if c.SigningKeyFile != "" {
		addErr("signing_key_file", checkReadableFile(c.SigningKeyFile))
	}
	if d := c.ShutdownTimeout.Duration; d < 0 || d > time.Hour {
		add("shutdown_timeout", "%s must be between 0s and 1h", c.ShutdownTimeout)
	}

	if len(c.Upstreams) == 0 {
		add("upstreams", "at least one upstream is required")
	}
	for i, u := range c.Upstreams {
		key := fmt.Sprintf("upstreams[%d]", i)
		addErr(key+".url", checkUpstreamURL(u.URL))
		// An upstream without keys could never pass rule 2 (upstream_unsigned);
		// refusing it at start is kinder than rejecting every path it serves.
		if len(u.PublicKeys) == 0 {
			add(key+".public_keys", "at least one public key is required")
		}
		for j, k := range u.PublicKeys {
			addErr(fmt.Sprintf("%s.public_keys[%d]", key, j), k.Err)
		}
		if u.Timeout.Duration <= 0 {
			add(key+".timeout", "%s must be positive", u.Timeout)
		}
		if u.MaxConnections <= 0 {
			add(key+".max_connections", "%d must be at least 1", u.MaxConnections)
		}
		if u.NetrcFile != "" {
			addErr(key+".netrc_file", checkReadableFile(u.NetrcFile))
		}
	}

	// Duplicate attesters would let one rebuilder count twice towards the
	// quorum (same key) or make "name:sig" lines ambiguous (same name).
	names := map[string]int{}
	keys := map[string]int{}
	for i, a := range c.Policy.Attesters {
		key := fmt.Sprintf("policy.attesters[%d]", i)
		if a.Err != nil {
			addErr(key, a.Err)
			continue
		}
		name, pub := a.Key.Name, a.Key.Key
		if j, dup := keys[string(pub)]; dup {
			add(key, "same key as policy.attesters[%d]", j)
		} else if j, dup := names[name]; dup {
			add(key, "key name %q already used by policy.attesters[%d]", name, j)
		}
		keys[string(pub)] = i
		names[name] = i
	}
	// With no attesters the quorum is unused and its default of 1 is fine;
	// any larger value is a quorum that can never be met.
	switch n := len(c.Policy.Attesters); {
	case c.Policy.Quorum < 1:
		add("policy.quorum", "%d must be at least 1", c.Policy.Quorum)
	case c.Policy.Quorum > max(n, 1):
		add("policy.quorum", "%d is larger than the number of attesters (%d)", c.Policy.Quorum, n)
	}

	if c.Cache.ScrubPeriod.Duration < time.Hour {
		add("cache.scrub_period", "%s is shorter than 1h; the scrub would do little but re-hash", c.Cache.ScrubPeriod)
	}
	if c.Cache.NegativeTTL.Duration < 0 || c.Cache.NegativeTTL.Duration > time.Hour {
		add("cache.negative_ttl", "%s must be between 0s and 1h", c.Cache.NegativeTTL)
	}
	if c.Cache.MaxNarSize == 0 {
		add("cache.max_nar_size", "must be larger than zero")
	}
	if c.Cache.MaxSize == 0 {
		add("cache.max_size", "must be larger than zero")
	}
	errs = append(errs, c.Cluster.validate()...)
	errs = append(errs, c.Rebuild.validate()...)
	addErr("log_format", CheckLogFormat(c.LogFormat))
	if _, err := ParseLogLevel(c.LogLevel); err != nil {
		addErr("log_level", err)
	}
	return errors.Join(errs...)
}

// validate checks [rebuild]. Files it names are not opened here: they live
// on the rebuilder, and the gatekeeper reading the same file need not
// read them; `cacheproxy rebuild` reports them as it opens them.
func (r Rebuild) validate() []error {
	var errs []error
	add := func(key string, format string, args ...any) {
		errs = append(errs, &FieldError{Key: "rebuild." + key, Err: fmt.Errorf(format, args...)})
	}
	if r.Server != "" {
		u, err := url.Parse(r.Server)
		switch {
		case err != nil:
			add("server", "%q: %v", r.Server, err)
		case u.Scheme != "http" && u.Scheme != "https" || u.Host == "":
			add("server", "%q must be an http:// or https:// URL with a host", r.Server)
		}
	}
	if d := r.Interval.Duration; d < time.Second || d > 7*24*time.Hour {
		add("interval", "%s must be between 1s and 7d", r.Interval)
	}
	if r.Jobs < 1 || r.Jobs > MaxRebuildJobs {
		add("jobs", "%d must be between 1 and %d", r.Jobs, MaxRebuildJobs)
	}
	return errs
}

// CheckLogFormat accepts the log formats serve knows.
func CheckLogFormat(f string) error {
	if f != "text" && f != "json" {
		return fmt.Errorf("%q must be text or json", f)
	}
	return nil
}

// ParseLogLevel reads a log level: debug, info, warn or error.
func ParseLogLevel(s string) (slog.Level, error) {
	switch s {
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "warn":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("%q must be debug, info, warn or error", s)
}

// validateTLS checks admin.tls_cert_file and admin.tls_key_file: both or
// neither, both readable, and loadable as a pair (the server loads them
// the same way, so a pair refused here would stop it later anyway).
func (a Admin) validateTLS() []error {
	var errs []error
	add := func(key string, err error) {
		if err != nil {
			errs = append(errs, &FieldError{Key: key, Err: err})
		}
	}
	cert, key := a.TLSCertFile, a.TLSKeyFile
	switch {
	case cert != "" && key == "":
		add("admin.tls_key_file", errors.New("must be set together with admin.tls_cert_file"))
	case cert == "" && key != "":
		add("admin.tls_cert_file", errors.New("must be set together with admin.tls_key_file"))
	}
	var certErr, keyErr error
	if cert != "" {
		certErr = checkPEMFile(cert)
		add("admin.tls_cert_file", certErr)
	}
	if key != "" {
		keyErr = checkPEMFile(key)
		add("admin.tls_key_file", keyErr)
	}
	if cert != "" && key != "" && certErr == nil && keyErr == nil {
		if _, err := tls.LoadX509KeyPair(cert, key); err != nil {
			add("admin.tls_cert_file", fmt.Errorf("%s with admin.tls_key_file %s is not a usable certificate and key: %w", cert, key, err))
		}
	}
	return errs
}

// validateTokens checks [[admin.tokens]]: a name fit for logs and the
// audit trail, unique and not the default token's, and a readable file.
// How long the token is, and who else may read it, the server checks as it
// loads it (as for admin.token_file).
func (a Admin) validateTokens() []error {
	var errs []error
	names := map[string]int{}
	for i, t := range a.Tokens {
		key := fmt.Sprintf("admin.tokens[%d]", i)
		switch j, dup := names[t.Name]; {
		case !tokenNameRe.MatchString(t.Name):
			errs = append(errs, &FieldError{Key: key + ".name", Err: fmt.Errorf("%q must be 1 to 64 letters, digits, '.', '_', '@' or '-'", t.Name)})
		case t.Name == DefaultTokenName:
			errs = append(errs, &FieldError{Key: key + ".name", Err: fmt.Errorf("%q is the name of admin.token_file's token; choose another", t.Name)})
		case dup:
			errs = append(errs, &FieldError{Key: key + ".name", Err: fmt.Errorf("%q is already the name of admin.tokens[%d]", t.Name, j)})
		default:
			names[t.Name] = i
		}
		if t.File == "" {
			errs = append(errs, &FieldError{Key: key + ".file", Err: errors.New("must be set (the file holding the token)")})
		} else if err := checkPEMFile(t.File); err != nil {
			errs = append(errs, &FieldError{Key: key + ".file", Err: err})
		}
	}
	return errs
}

var tokenNameRe = regexp.MustCompile(`^[A-Za-z0-9._@-]{1,64}$`)

// IsLoopbackHost reports whether a listen address's host only accepts
// connections from this machine: an IP in 127.0.0.0/8, ::1, or "localhost".
// The empty host (all interfaces) and any other name are not: a name may
// resolve to anything.
func IsLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkPEMFile is checkReadableFile for files read whole into memory: a
// device or FIFO (say /dev/zero) would never end, so only regular files.
func checkPEMFile(name string) error {
	if err := checkReadableFile(name); err != nil {
		return err
	}
	st, err := os.Stat(name)
	if err != nil {
		return fmt.Errorf("not readable: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s is not a regular file", name)
	}
	return nil
}

// checkListen accepts host:port with a numeric port; the host may be empty
// (all interfaces), an IP or a name.
func checkListen(addr string) error {
	if addr == "" {
		return errors.New("must not be empty")
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port: %w", addr, err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("%q: port %q must be a number from 0 to 65535", addr, port)
	}
	return nil
}

// checkUpstreamURL accepts http(s)://host[/path] and file:///absolute/dir.
func checkUpstreamURL(raw string) error {
	if raw == "" {
		return errors.New("must not be empty")
	}
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("%q: %w", raw, err)
	}
	if u.Fragment != "" || u.RawQuery != "" || u.ForceQuery {
		return fmt.Errorf("%q: a cache root cannot have a query or fragment", raw)
	}
	switch u.Scheme {
	case "http", "https":
		if u.Host == "" || u.Hostname() == "" {
			return fmt.Errorf("%q: missing host", raw)
		}
	case "file":
		if u.Opaque != "" || (u.Host != "" && u.Host != "localhost") || !path.IsAbs(u.Path) {
			return fmt.Errorf("%q: a file URL must name an absolute directory, like file:///srv/cache", raw)
		}
	default:
		return fmt.Errorf("%q: scheme must be http, https or file", raw)
	}
	return nil
}

// checkReadableFile opens the file, because only opening proves the service
// user may read it (a stat succeeds on mode 0600 files of other users).
func checkReadableFile(name string) error {
	f, err := os.Open(name)
	if err != nil {
		return fmt.Errorf("not readable: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("not readable: %w", err)
	}
	if st.IsDir() {
		return fmt.Errorf("%s is a directory, not a file", name)
	}
	return nil
}

// validate checks the [cluster] section.
func (c Cluster) validate() []error {
	var errs []error
	add := func(key string, err error) {
		if err != nil {
			errs = append(errs, &FieldError{Key: key, Err: err})
		}
	}
	tls := false
	for i, e := range c.Etcd {
		u, err := url.Parse(e)
		switch {
		case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" || u.Port() == "" || (u.Path != "" && u.Path != "/"):
			add(fmt.Sprintf("cluster.etcd[%d]", i), fmt.Errorf("%q must be an etcd client URL such as http://10.0.0.1:2379", e))
		case u.Scheme == "https":
			tls = true
		}
	}
	if !c.Enabled() {
		if c.Prefix != "" || c.CAFile != "" || c.CertFile != "" || c.KeyFile != "" {
			add("cluster.etcd", errors.New("the [cluster] section needs at least one etcd endpoint"))
		}
		return errs
	}
	if c.Prefix != "" && (!strings.HasPrefix(c.Prefix, "/") || strings.ContainsAny(c.Prefix, " \t\n")) {
		add("cluster.prefix", fmt.Errorf("%q must start with / and contain no white space", c.Prefix))
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		add("cluster.cert_file", errors.New("cert_file and key_file go together"))
	}
	for key, f := range map[string]string{"cluster.ca_file": c.CAFile, "cluster.cert_file": c.CertFile, "cluster.key_file": c.KeyFile} {
		if f != "" {
			add(key, checkPEMFile(f))
		}
	}
	if !tls && (c.CAFile != "" || c.CertFile != "") {
		add("cluster.etcd", errors.New("TLS files are set, but no endpoint is https://"))
	}
	return errs
}
