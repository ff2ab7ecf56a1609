// Command cacheproxy is a verifying Nix binary-cache proxy: fleet machines
// use it as their only substituter, and it serves a store path only when the
// organisation's own evidence (rebuild attestations, a reviewed allowlist,
// a content-address proof) vouches for it. See README.md.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/config"
	"github.com/cacheproxy/cacheproxy/internal/verify"
)

const usage = `cacheproxy — a verifying Nix binary-cache proxy

Usage:
  cacheproxy serve [-c FILE] [--listen ADDR] [--state-dir DIR] [--mode enforce|report]
                   [--log-format text|json] [--log-level debug|info|warn|error]
  cacheproxy keygen NAME [--dir DIR]
  cacheproxy pubkey [-c FILE]
  cacheproxy check-config [-c FILE]
  cacheproxy attest import [-c FILE] [--reason TEXT] FILE...|-
  cacheproxy allow add [--closure] [--reason TEXT] [--expires DURATION] PATH...
  cacheproxy allow list | allow remove [--reason TEXT] PATH...
  cacheproxy deny add [--reason TEXT] PATTERN... | deny list | deny remove [--reason TEXT] PATTERN...
  cacheproxy explain PATH|HASH [--json]
  cacheproxy rejections [--json] [--derivers]
  cacheproxy retry [--reason TEXT] PATH...
  cacheproxy audit [--since DURATION] [--json]
  cacheproxy verify-cache [-c FILE]
  cacheproxy rebuild [--once] --key-file REBUILDER.sec [--interval D] [--jobs N] [--check]
                     [--keep-diffs DIR] [--instantiate FILE [-A ATTR]...]
  cacheproxy --version

Every command reads the configuration from -c FILE, else $CACHEPROXY_CONFIG,
else /etc/cacheproxy/cacheproxy.toml if it exists, else the embedded defaults.
Admin commands (attest, allow, deny, explain, rejections, retry, audit,
verify-cache, rebuild) find the running server from it (admin.listen,
admin.token_file) or from --server URL --token-file FILE. Every change is
kept in the audit trail under the token's name; --reason says why.

Run "cacheproxy COMMAND --help" for the flags of one command.
`

// errUsage marks errors that should be followed by the command's usage.
var errUsage = errors.New("usage")

// errHelp is returned when --help was asked for; it exits 0.
var errHelp = flag.ErrHelp

func main() {
	os.Exit(run(os.Args[1:], config.EnvFromOS(), os.Stdin, os.Stdout, os.Stderr))
}

// run runs one command; env is the process environment (tests pass their
// own, so that no test reads $CACHEPROXY_CONFIG or /etc).
func run(args []string, env config.Env, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmds := map[string]func(args []string, io cmdIO) error{
		"serve":        cmdServe,
		"keygen":       cmdKeygen,
		"pubkey":       cmdPubkey,
		"check-config": cmdCheckConfig,
		"attest":       cmdAttest,
		"allow":        cmdAllow,
		"deny":         cmdDeny,
		"explain":      cmdExplain,
		"rejections":   cmdRejections,
		"retry":        cmdRetry,
		"audit":        cmdAudit,
		"verify-cache": cmdVerifyCache,
		"rebuild":      cmdRebuild,
	}
	name := args[0]
	if name == "-h" || name == "--help" || name == "help" {
		fmt.Fprint(stdout, usage)
		return 0
	}
	if name == "--version" || name == "version" {
		fmt.Fprintln(stdout, versionString())
		return 0
	}
	cmd, ok := cmds[name]
	if !ok {
		fmt.Fprintf(stderr, "cacheproxy: unknown command %q (see cacheproxy --help)\n", name)
		return 2
	}
	err := cmd(args[1:], cmdIO{stdin: stdin, stdout: stdout, stderr: stderr, env: env})
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "cacheproxy %s: %s\n", name, strings.TrimPrefix(err.Error(), "usage: "))
		return 2
	default:
		fmt.Fprintf(stderr, "cacheproxy %s: %v\n", name, err)
		return 1
	}
}

type cmdIO struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	env            config.Env
}

// newFlags returns a flag set that prints its usage to stderr on --help.
func newFlags(name, synopsis string, io cmdIO) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.stderr)
	fs.Usage = func() {
		fmt.Fprintf(io.stderr, "Usage: cacheproxy %s\n\nFlags:\n", synopsis)
		printFlags(io.stderr, fs)
	}
	return fs
}

// printFlags lists flags as the README writes them, with two dashes (Go's
// flag package accepts both, but prints one).
func printFlags(w io.Writer, fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		name, usage := flag.UnquoteUsage(f)
		dash := "--"
		if len(f.Name) == 1 {
			dash = "-"
		}
		line := "  " + dash + f.Name
		if name != "" {
			line += " " + name
		}
		line += "\n    \t" + strings.ReplaceAll(usage, "\n", "\n    \t")
		if f.DefValue != "" && f.DefValue != "false" {
			line += fmt.Sprintf(" (default %q)", f.DefValue)
		}
		fmt.Fprintln(w, line)
	})
}

// versionString names the build: the module version when built from a
// tagged module, else the VCS revision the binary was built from, and the
// xz decoder (liblzma with -tags liblzma, else the pure-Go one).
func versionString() string {
	v := "cacheproxy (devel)"
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		v = "cacheproxy " + bi.Main.Version
	}
	var rev, at, dirty string
	for _, st := range bi.Settings {
		switch st.Key {
		case "vcs.revision":
			rev = st.Value
		case "vcs.time":
			at = st.Value
		case "vcs.modified":
			if st.Value == "true" {
				dirty = "+dirty"
			}
		}
	}
	if rev != "" {
		v += fmt.Sprintf(" %.12s%s %s", rev, dirty, at)
	}
	return v + " " + bi.GoVersion + ", xz decoder " + verify.XZDecoder
}

// parseInterspersed parses flags that may come before, between or after
// positional arguments ("explain PATH --json"), and returns the positionals.
// A lone "--" ends flag parsing.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, errHelp
			}
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func usageErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errUsage}, args...)...)
}
