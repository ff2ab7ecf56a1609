package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/server"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// configFlags are the flags every command that reads the config shares.
type configFlags struct {
	file      string
	listen    string
	stateDir  string
	mode      string
	logFormat string
	logLevel  string
	// signingKey and adminToken override signing_key_file and
	// admin.token_file, for keys handed over by systemd's LoadCredential
	// (--signing-key-file=%d/signing-key).
	signingKey string
	adminToken string
	env        config.Env // the process environment; tests set their own
}

func (c *configFlags) register(fs *flag.FlagSet, serve bool) {
	fs.StringVar(&c.file, "c", "", "configuration `FILE` (TOML); default $"+config.ConfigEnvVar+", else "+config.SystemConfigPath+" if it exists, else the embedded defaults")
	fs.StringVar(&c.file, "config", "", "configuration `FILE`, same as -c")
	fs.StringVar(&c.stateDir, "state-dir", "", "state `DIR` (overrides state_dir)")
	if serve {
		fs.StringVar(&c.listen, "listen", "", "listen `ADDR` (overrides listen)")
		fs.StringVar(&c.mode, "mode", "", "enforce or report (overrides mode)")
		fs.StringVar(&c.signingKey, "signing-key-file", "", "gatekeeper secret key `FILE` (overrides signing_key_file; e.g. %d/signing-key under systemd)")
		fs.StringVar(&c.adminToken, "admin-token-file", "", "admin token `FILE` (overrides admin.token_file; e.g. %d/admin-token under systemd)")
		fs.StringVar(&c.logFormat, "log-format", "", "log as text or json (overrides log_format; default text)")
		fs.StringVar(&c.logLevel, "log-level", "", "debug, info, warn or error (overrides log_level; default info)")
	}
}

// load reads the config, applies flags, and validates: every problem, each
// with its file and line, in one error.
func (c *configFlags) load() (*config.File, error) {
	f, err := c.readAll()
	if err != nil {
		return nil, err
	}
	if ps := f.Check(); len(ps) > 0 {
		return nil, fmt.Errorf("%s is invalid:\n%w", f.Location, ps)
	}
	return f, nil
}

// read is load without Validate: admin commands only need the admin
// address and token, and an operator who may read the token need not read
// the signing key. Problems reading the file (TOML errors, unknown keys)
// still stop them.
func (c *configFlags) read() (*config.File, error) {
	f, err := c.readAll()
	if err != nil {
		return nil, err
	}
	if ps := f.Problems(); len(ps) > 0 {
		return nil, fmt.Errorf("%s is invalid:\n%w", f.Location, ps)
	}
	return f, nil
}

// readAll finds and reads the config (-c, $CACHEPROXY_CONFIG,
// /etc/cacheproxy/cacheproxy.toml, else the embedded defaults) and applies
// the flags, collecting problems without failing on them.
func (c *configFlags) readAll() (*config.File, error) {
	loc, err := config.Locate(c.file, c.env)
	if err != nil {
		return nil, err
	}
	f, err := config.Read(loc, c.env)
	if err != nil {
		return nil, err
	}
	for _, o := range []struct {
		val         string
		field       *string
		key, flagNm string
	}{
		{c.listen, &f.Config.Listen, "listen", "--listen"},
		{c.stateDir, &f.Config.StateDir, "state_dir", "--state-dir"},
		{c.mode, &f.Config.Mode, "mode", "--mode"},
		{c.logFormat, &f.Config.LogFormat, "log_format", "--log-format"},
		{c.logLevel, &f.Config.LogLevel, "log_level", "--log-level"},
		{c.signingKey, &f.Config.SigningKeyFile, "signing_key_file", "--signing-key-file"},
		{c.adminToken, &f.Config.Admin.TokenFile, "admin.token_file", "--admin-token-file"},
	} {
		if o.val != "" {
			*o.field = o.val
			f.Override(o.key, o.flagNm)
		}
	}
	return f, nil
}

func cmdServe(args []string, io cmdIO) error {
	fs := newFlags("serve", "serve [-c FILE] [--listen ADDR] [--state-dir DIR] [--mode enforce|report] [--log-format text|json] [--log-level LEVEL] [--signing-key-file FILE] [--admin-token-file FILE]", io)
	cf := configFlags{env: io.env}
	cf.register(fs, true)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	f, err := cf.load()
	if err != nil {
		return err
	}
	cfg := f.Config
	log, err := newLogger(io.stderr, cfg.LogFormat, cfg.LogLevel)
	if err != nil {
		return err
	}
	srv, err := server.New(cfg, log)
	if err != nil {
		return err
	}
	defer srv.Close()

	main, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	var admin net.Listener
	if cfg.Admin.Listen != "" {
		if admin, err = net.Listen("tcp", cfg.Admin.Listen); err != nil {
			main.Close()
			return fmt.Errorf("admin.listen: %w", err)
		}
	}
	log.Info("cacheproxy serving", "config", f.Location.Name(), "listen", main.Addr().String(), "admin", cfg.Admin.Listen, "state_dir", cfg.StateDir,
		"mode", cfg.Mode, "upstreams", len(cfg.Upstreams))
	log.Info("gatekeeper public key (put it in trusted-public-keys)", "pubkey", srv.PublicKey().String())
	if cfg.Admin.Listen != "" {
		names := []string{config.DefaultTokenName}
		for _, t := range cfg.Admin.Tokens {
			names = append(names, t.Name)
		}
		log.Info("admin API", "listen", admin.Addr().String(), "token_file", cfg.AdminTokenFile(), "tokens", strings.Join(names, ","))
	}

	reread := func() (config.Config, error) {
		f, err := cf.load()
		if err != nil {
			return config.Config{}, err
		}
		return f.Config, nil
	}
	err = runServer(srv, main, admin, reread, log)
	log.Info("cacheproxy stopped")
	return err
}

// configCommand parses a command that takes only the config flags and
// returns the config as read, not yet validated.
func configCommand(name string, args []string, io cmdIO) (*configFlags, error) {
	fs := newFlags(name, name+" [-c FILE] [--state-dir DIR]", io)
	cf := configFlags{env: io.env}
	cf.register(fs, false)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return nil, err
	}
	if len(pos) > 0 {
		return nil, usageErr("unexpected argument %q", pos[0])
	}
	return &cf, nil
}

func cmdPubkey(args []string, io cmdIO) error {
	cf, err := configCommand("pubkey", args, io)
	if err != nil {
		return err
	}
	f, err := cf.load()
	if err != nil {
		return err
	}
	key, err := server.LoadKey(f.Config)
	if err != nil {
		return fmt.Errorf("%w (%s)", err, f.Location)
	}
	fmt.Fprintln(io.stdout, key.Public().String())
	return nil
}

// cmdCheckConfig reports every problem of the configuration in one run,
// one line each (FILE:LINE: KEY: what), or prints the effective
// configuration.
func cmdCheckConfig(args []string, io cmdIO) error {
	cf, err := configCommand("check-config", args, io)
	if err != nil {
		return err
	}
	f, err := cf.readAll()
	if err != nil {
		return err
	}
	if ps := f.Check(); len(ps) > 0 {
		for _, p := range ps {
			fmt.Fprintln(io.stderr, p)
		}
		n := "1 problem"
		if len(ps) > 1 {
			n = fmt.Sprintf("%d problems", len(ps))
		}
		return fmt.Errorf("%s in %s", n, f.Location)
	}
	cfg := f.Config
	cfg.ApplyStateDirDefaults()
	out, err := cfg.Marshal()
	if err != nil {
		return err
	}
	fmt.Fprintf(io.stdout, "# %s\n", f.Location)
	_, err = io.stdout.Write(out)
	return err
}

// cmdKeygen writes NAME.sec and NAME.pub in the format of
// nix-store --generate-binary-cache-key, for attesters and the gatekeeper.
func cmdKeygen(args []string, io cmdIO) error {
	fs := newFlags("keygen", "keygen NAME [--dir DIR]", io)
	dir := fs.String("dir", ".", "directory to write NAME.sec and NAME.pub into")
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("want exactly one key NAME, such as rebuilder-a-1")
	}
	name := pos[0]
	sk, err := verify.GenerateKey(name)
	if err != nil {
		return fmt.Errorf("key name %q: %w", name, err)
	}
	sec, pub := filepath.Join(*dir, name+".sec"), filepath.Join(*dir, name+".pub")
	for _, p := range []string{sec, pub} {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("%s exists; not overwriting a key", p)
		}
	}
	if err := os.WriteFile(sec, []byte(sk.String()), 0o600); err != nil {
		return fmt.Errorf("write secret key: %w", err)
	}
	if err := os.WriteFile(pub, []byte(sk.Public().String()), 0o644); err != nil {
		return fmt.Errorf("write public key: %w", err)
	}
	fmt.Fprintln(io.stdout, sk.Public().String())
	return nil
}
