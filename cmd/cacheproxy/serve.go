package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/server"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

// configFlags are the flags every command that reads the config shares.
type configFlags struct {
	file     string
	listen   string
	stateDir string
	mode     string
}

func (c *configFlags) register(fs *flag.FlagSet, serve bool) {
	fs.StringVar(&c.file, "c", "", "configuration `FILE` (TOML); without it the embedded defaults apply")
	fs.StringVar(&c.file, "config", "", "configuration `FILE`, same as -c")
	fs.StringVar(&c.stateDir, "state-dir", "", "state `DIR` (overrides state_dir)")
	if serve {
		fs.StringVar(&c.listen, "listen", "", "listen `ADDR` (overrides listen)")
		fs.StringVar(&c.mode, "mode", "", "enforce or report (overrides mode)")
	}
}

// load reads the config file over the defaults, applies flags, validates.
func (c *configFlags) load() (config.Config, error) {
	cfg, err := c.read()
	if err != nil {
		return cfg, err
	}
	if err := cfg.Validate(); err != nil {
		where := "configuration"
		if c.file != "" {
			where = "config " + c.file
		}
		return cfg, fmt.Errorf("%s is invalid:\n%w", where, err)
	}
	return cfg, nil
}

// read reads the config file over the defaults and applies flags, without
// the start-up checks: admin commands only need the admin address and token,
// and an operator who may read the token need not read the signing key.
func (c *configFlags) read() (config.Config, error) {
	cfg, err := config.Load(c.file, config.EnvFromOS())
	if err != nil {
		return cfg, err
	}
	if c.listen != "" {
		cfg.Listen = c.listen
	}
	if c.stateDir != "" {
		cfg.StateDir = c.stateDir
	}
	if c.mode != "" {
		cfg.Mode = c.mode
	}
	return cfg, nil
}

func cmdServe(args []string, io cmdIO) error {
	fs := newFlags("serve", "serve [-c FILE] [--listen ADDR] [--state-dir DIR] [--mode enforce|report]", io)
	var cf configFlags
	cf.register(fs, true)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	cfg, err := cf.load()
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(io.stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
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
	log.Info("cacheproxy serving", "listen", main.Addr().String(), "admin", cfg.Admin.Listen, "state_dir", cfg.StateDir,
		"mode", cfg.Mode, "upstreams", len(cfg.Upstreams))
	log.Info("gatekeeper public key (put it in trusted-public-keys)", "pubkey", srv.PublicKey().String())
	if cfg.Admin.Listen != "" {
		names := []string{config.DefaultTokenName}
		for _, t := range cfg.Admin.Tokens {
			names = append(names, t.Name)
		}
		log.Info("admin API", "listen", admin.Addr().String(), "token_file", cfg.AdminTokenFile(), "tokens", strings.Join(names, ","))
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err = srv.Serve(ctx, main, admin)
	log.Info("cacheproxy stopped")
	return err
}

// configCommand parses a command that takes only the config flags and
// returns the validated config.
func configCommand(name string, args []string, io cmdIO) (config.Config, error) {
	fs := newFlags(name, name+" [-c FILE] [--state-dir DIR]", io)
	var cf configFlags
	cf.register(fs, false)
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return config.Config{}, err
	}
	if len(pos) > 0 {
		return config.Config{}, usageErr("unexpected argument %q", pos[0])
	}
	return cf.load()
}

func cmdPubkey(args []string, io cmdIO) error {
	cfg, err := configCommand("pubkey", args, io)
	if err != nil {
		return err
	}
	key, err := server.LoadKey(cfg)
	if err != nil {
		return err
	}
	fmt.Fprintln(io.stdout, key.Public().String())
	return nil
}

func cmdCheckConfig(args []string, io cmdIO) error {
	cfg, err := configCommand("check-config", args, io)
	if err != nil {
		return err
	}
	cfg.ApplyStateDirDefaults()
	out, err := cfg.Marshal()
	if err != nil {
		return err
	}
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
