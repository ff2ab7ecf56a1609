package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/cache"
	"github.com/cacheproxy/cacheproxy/internal/config"
)

// adminFlags find the running server: from the config, or given directly.
type adminFlags struct {
	configFlags
	server    string
	tokenFile string
	caFile    string
}

func (a *adminFlags) register(fs *flag.FlagSet) {
	a.configFlags.register(fs, false)
	fs.StringVar(&a.server, "server", "", "admin API `URL` (default: admin.listen of the config)")
	fs.StringVar(&a.tokenFile, "token-file", "", "admin token `FILE` (default: admin.token_file of the config)")
	fs.StringVar(&a.caFile, "ca-file", "", "trust the CA certificates in `FILE` (PEM) for the admin server's certificate,\n"+
		"instead of the system roots (--server https://...) or admin.tls_cert_file")
}

// client finds the admin API. From the config, with admin TLS it is
// https:// to admin.listen trusting exactly admin.tls_cert_file, the
// server's own (usually self-signed) certificate; --server https://...
// trusts the system roots, like any https URL; --ca-file replaces either.
func (a *adminFlags) client() (*adminapi.Client, error) {
	server, tokenFile := a.server, a.tokenFile
	tokenFrom := "--token-file"
	var tlsConf *tls.Config
	if server == "" || tokenFile == "" {
		f, err := a.read()
		if err != nil {
			return nil, err
		}
		cfg := f.Config
		if server == "" && cfg.Admin.Listen != "" {
			server = connectAddr(cfg.Admin.Listen)
			// Either TLS key set means the server speaks only TLS: never
			// fall back to sending the token in clear text.
			if cfg.Admin.TLS() {
				server = "https://" + server
				if a.caFile == "" {
					if cfg.Admin.TLSCertFile == "" {
						return nil, errors.New("admin.tls_cert_file: must be set together with admin.tls_key_file")
					}
					if tlsConf, err = adminapi.PinnedTLS(cfg.Admin.TLSCertFile); err != nil {
						return nil, fmt.Errorf("admin.tls_cert_file: %w", err)
					}
				}
			}
		}
		if tokenFile == "" {
			tokenFile = cfg.AdminTokenFile()
			tokenFrom = tokenSource(f)
		}
	}
	if server == "" {
		return nil, errAdminOff
	}
	if a.caFile != "" {
		var err error
		if tlsConf, err = adminapi.CATLS(a.caFile); err != nil {
			return nil, fmt.Errorf("--ca-file: %w", err)
		}
	}
	c, err := adminapi.NewClient(server, tokenFile, tlsConf)
	if err != nil && errors.Is(err, os.ErrNotExist) {
		// Name the file and where its name came from: the usual cause is a
		// command that found another configuration than the server's.
		return nil, fmt.Errorf("admin token file %s (%s) does not exist: %w", tokenFile, tokenFrom, err)
	}
	return c, err
}

// tokenSource says where the admin token file's name came from.
func tokenSource(f *config.File) string {
	if f.Config.Admin.TokenFile != "" {
		return "admin.token_file of " + f.Location.String()
	}
	if f.Location.Path == "" {
		return "<state_dir>/admin-token, state_dir " + f.Config.StateDir + " of the " + f.Location.String() +
			"; pass -c, set $" + config.ConfigEnvVar + " or create " + config.SystemConfigPath
	}
	return "<state_dir>/admin-token, state_dir " + f.Config.StateDir + " of " + f.Location.String()
}

// connectAddr turns a listen address into one to connect to. A wildcard
// host (empty, 0.0.0.0, ::) says where the server accepts, not where to
// dial; the CLI reading the server's config runs beside it, and loopback is
// among the addresses the wildcard accepts on.
func connectAddr(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return listen // NewClient reports it
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified() && ip.To4() != nil) {
		host = "127.0.0.1"
	} else if ip != nil && ip.IsUnspecified() {
		host = "::1"
	}
	return net.JoinHostPort(host, port)
}

var errAdminOff = errors.New("the admin API is off (admin.listen is empty); pass --server")

// adminCommand parses flags, builds the client and returns the positionals.
func adminCommand(name, synopsis string, args []string, io cmdIO, extra func(*flag.FlagSet)) (*adminapi.Client, []string, error) {
	fs := newFlags(name, synopsis, io)
	af := adminFlags{configFlags: configFlags{env: io.env}}
	af.register(fs)
	if extra != nil {
		extra(fs)
	}
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return nil, nil, err
	}
	c, err := af.client()
	return c, pos, err
}

func cmdAttest(args []string, cio cmdIO) error {
	if len(args) == 0 || args[0] != "import" {
		if len(args) > 0 && (args[0] == "--help" || args[0] == "-h") {
			fmt.Fprintln(cio.stderr, "Usage: cacheproxy attest import [-c FILE] FILE...|-")
			return errHelp
		}
		return usageErr("the only attest command is: attest import FILE...|-")
	}
	var reason string
	c, files, err := adminCommand("attest import", "attest import [-c FILE] [--reason TEXT] FILE...|-  (nix path-info --json --sigs output or narinfo text)", args[1:], cio,
		func(fs *flag.FlagSet) { fs.StringVar(&reason, "reason", "", "why (kept in the audit trail)") })
	if err != nil {
		return err
	}
	if len(files) == 0 {
		return usageErr("name at least one FILE, or - for standard input")
	}
	total := map[string]int{}
	for _, f := range files {
		// The file is sent as it is read: an import of any size needs no
		// more memory here than in the server.
		var in io.Reader = cio.stdin
		if f != "-" {
			file, err := os.Open(f)
			if err != nil {
				return fmt.Errorf("read %s: %w", f, err)
			}
			defer file.Close()
			in = file
		}
		_, err := c.ImportAttestations(context.Background(), in, reason, func(r adminapi.AttestResult) {
			total[r.Status]++
			if r.Status != adminapi.AttestStored && r.Status != adminapi.AttestKnown {
				key := r.Key
				if key == "" {
					key = "(no signature at all)"
				}
				fmt.Fprintf(cio.stdout, "%s\t%s\tkeys: %s\n", r.Status, r.Path, key)
			}
		})
		if err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
	}
	fmt.Fprintf(cio.stdout, "stored %d, already known %d, no attester signature %d, bad signature %d\n",
		total[adminapi.AttestStored], total[adminapi.AttestKnown], total[adminapi.AttestNoAttester], total[adminapi.AttestBadSignature])
	if failed := total[adminapi.AttestNoAttester] + total[adminapi.AttestBadSignature]; failed > 0 {
		return fmt.Errorf("%d of the imported signatures were not stored (listed above)", failed)
	}
	return nil
}

func cmdAllow(args []string, io cmdIO) error {
	sub, rest, err := subcommand("allow", args, []string{"add", "list", "remove"}, io)
	if err != nil {
		return err
	}
	var closure bool
	var reason, expires string
	var asJSON bool
	c, paths, err := adminCommand("allow "+sub, "allow add [--closure] [--reason TEXT] [--expires DURATION] PATH... | allow list | allow remove [--reason TEXT] PATH...", rest, io,
		func(fs *flag.FlagSet) {
			if sub == "add" {
				fs.BoolVar(&closure, "closure", false, "also allow every path the paths reference, transitively")
				fs.StringVar(&reason, "reason", "", "why (shown by list and explain, kept in the audit trail)")
				fs.StringVar(&expires, "expires", "", "lifetime such as 30d or 12h (default: never)")
			}
			if sub == "remove" {
				fs.StringVar(&reason, "reason", "", "why (kept in the audit trail)")
			}
			if sub == "list" {
				fs.BoolVar(&asJSON, "json", false, "print JSON")
			}
		})
	if err != nil {
		return err
	}
	ctx := context.Background()
	switch sub {
	case "add":
		if len(paths) == 0 {
			return usageErr("name at least one store path or hash")
		}
		var resp adminapi.AllowList
		if err := c.Do(ctx, http.MethodPost, adminapi.PathAllowlist, adminapi.AllowRequest{Paths: paths, Closure: closure, Reason: reason, Expires: expires}, &resp); err != nil {
			return err
		}
		replaced := map[string]adminapi.AllowEntry{}
		for _, e := range resp.Replaced {
			replaced[e.StorePath] = e
		}
		for _, e := range resp.Entries {
			fmt.Fprintf(io.stdout, "allowed %s (NarHash %s)\n", e.StorePath, e.NarHash)
			if old, ok := replaced[e.StorePath]; ok {
				// Replacing is allowed (a new review, a new expiry), but
				// never silent: the old entry is in the audit trail.
				fmt.Fprintf(io.stdout, "  replaced the existing entry: reason %q, expires %s, NarHash %s, added %s\n",
					old.Reason, expiry(old.Expires), old.NarHash, old.Added.Format(time.RFC3339))
			}
		}
	case "list":
		var resp adminapi.AllowList
		if err := c.Do(ctx, http.MethodGet, adminapi.PathAllowlist, nil, &resp); err != nil {
			return err
		}
		if asJSON {
			return printJSON(io.stdout, resp)
		}
		tw := tabwriter.NewWriter(io.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PATH\tNARHASH\tEXPIRES\tREASON")
		for _, e := range resp.Entries {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", e.StorePath, e.NarHash, expiry(e.Expires), e.Reason)
		}
		return tw.Flush()
	case "remove":
		if len(paths) == 0 {
			return usageErr("name at least one store path or hash")
		}
		return removeCall(ctx, c, adminapi.PathAllowlist, adminapi.PathsRequest{Paths: paths, Reason: reason}, io)
	}
	return nil
}

func cmdDeny(args []string, io cmdIO) error {
	sub, rest, err := subcommand("deny", args, []string{"add", "list", "remove"}, io)
	if err != nil {
		return err
	}
	var reason string
	var asJSON bool
	c, pats, err := adminCommand("deny "+sub, "deny add [--reason TEXT] PATTERN... | deny list | deny remove [--reason TEXT] PATTERN...\n\nA PATTERN is a store path, a hash, a NarHash (sha256:...) or a name glob such as '*-openssl-3.0.7*'.", rest, io,
		func(fs *flag.FlagSet) {
			if sub == "add" {
				fs.StringVar(&reason, "reason", "", "why (shown by list and explain, kept in the audit trail)")
			}
			if sub == "remove" {
				fs.StringVar(&reason, "reason", "", "why (kept in the audit trail)")
			}
			if sub == "list" {
				fs.BoolVar(&asJSON, "json", false, "print JSON")
			}
		})
	if err != nil {
		return err
	}
	ctx := context.Background()
	switch sub {
	case "add":
		if len(pats) == 0 {
			return usageErr("name at least one pattern")
		}
		var resp adminapi.DenyList
		if err := c.Do(ctx, http.MethodPost, adminapi.PathDenylist, adminapi.DenyRequest{Patterns: pats, Reason: reason}, &resp); err != nil {
			return err
		}
		for _, e := range resp.Entries {
			fmt.Fprintf(io.stdout, "denied %s\n", e.Pattern)
		}
	case "list":
		var resp adminapi.DenyList
		if err := c.Do(ctx, http.MethodGet, adminapi.PathDenylist, nil, &resp); err != nil {
			return err
		}
		if asJSON {
			return printJSON(io.stdout, resp)
		}
		tw := tabwriter.NewWriter(io.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PATTERN\tADDED\tREASON")
		for _, e := range resp.Entries {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", e.Pattern, e.Added.Format(time.RFC3339), e.Reason)
		}
		return tw.Flush()
	case "remove":
		if len(pats) == 0 {
			return usageErr("name at least one pattern")
		}
		return removeCall(ctx, c, adminapi.PathDenylist, adminapi.PatternsRequest{Patterns: pats, Reason: reason}, io)
	}
	return nil
}

func removeCall(ctx context.Context, c *adminapi.Client, path string, body any, io cmdIO) error {
	var resp adminapi.Removed
	if err := c.Do(ctx, http.MethodDelete, path, body, &resp); err != nil {
		return err
	}
	for _, r := range resp.Removed {
		fmt.Fprintf(io.stdout, "removed %s\n", r)
	}
	if len(resp.Missing) > 0 {
		return fmt.Errorf("no entry for %s", strings.Join(resp.Missing, ", "))
	}
	return nil
}

func cmdExplain(args []string, io cmdIO) error {
	var asJSON bool
	c, pos, err := adminCommand("explain", "explain PATH|HASH [--json]", args, io, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print JSON")
	})
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usageErr("name exactly one store path or hash")
	}
	arg := pos[0]
	if strings.HasPrefix(arg, "/") {
		arg = filepath.Base(arg)
	}
	var ex adminapi.Explain
	if err := c.Do(context.Background(), http.MethodGet, adminapi.PathExplain+arg, nil, &ex); err != nil {
		return err
	}
	if asJSON {
		return printJSON(io.stdout, ex)
	}
	printExplain(io.stdout, ex)
	return nil
}

// printExplain shows all the evidence first, then the rule that won (the
// decision), then what each kind of request gets now.
func printExplain(w io.Writer, ex adminapi.Explain) {
	name := ex.StorePath
	if name == "" {
		name = ex.Hash
	}
	fmt.Fprintf(w, "%s\n", name)
	switch {
	case ex.Decision != nil:
		d := ex.Decision
		if d.Upstream != "" {
			fmt.Fprintf(w, "  upstream:   %s (signed by %s)\n", d.Upstream, orNone(d.UpstreamSigners))
		}
		if d.Fingerprint != "" {
			fmt.Fprintf(w, "  fingerprint: %s\n", d.Fingerprint)
		}
		fmt.Fprintf(w, "  attesters matching upstream: %s\n", orNone(d.Attesters))
		if len(d.Mismatched) > 0 {
			fmt.Fprintf(w, "  attesters that rebuilt something else: %s\n", strings.Join(d.Mismatched, ", "))
		}
		for _, r := range d.Rebuilds {
			printRebuild(w, r)
		}
		if d.Classification != "" {
			fmt.Fprintf(w, "  classification: %s (%s)\n", d.Classification, classMeaning(d.Classification))
		}
		if d.Allow != nil {
			fmt.Fprintf(w, "  allowlist:  NarHash %s, expires %s, reason %q\n", d.Allow.NarHash, expiry(d.Allow.Expires), d.Allow.Reason)
		}
		if d.Deny != nil {
			fmt.Fprintf(w, "  denylist:   %s, reason %q\n", d.Deny.Pattern, d.Deny.Reason)
		}
		if d.Quarantine != nil {
			fmt.Fprintf(w, "  quarantine: %s check failed at %s: %s (lift with cacheproxy retry)\n", d.Quarantine.Check, d.Quarantine.Time.Format(time.RFC3339), d.Quarantine.Detail)
		}
		fmt.Fprintf(w, "  decision:   %s (served: %v)\n", d, ex.Served)
		if d.Detail != "" {
			fmt.Fprintf(w, "  detail:     %s\n", d.Detail)
		}
	default:
		fmt.Fprintf(w, "  status:     %s %s\n", ex.Status, ex.Error)
	}
	fmt.Fprintf(w, "  narinfo request now: %s\n", answerLine(ex.NarInfo))
	fmt.Fprintf(w, "  NAR request now:     %s\n", answerLine(ex.NAR))
	if ex.Stored != nil {
		fmt.Fprintf(w, "  stored decision: %s since %s, NAR cached: %v\n", ex.Stored.Reason, ex.Stored.Decided.Format(time.RFC3339), ex.Stored.Cached)
	}
	if ex.Rejection != nil {
		fmt.Fprintf(w, "  last rejected: %s (%d times, last %s)\n", reasonText(*ex.Rejection), ex.Rejection.Count, ex.Rejection.Last.Format(time.RFC3339))
	}
}

// printRebuild shows one attester's rebuild: which key, when its
// attestation came, and whether it is the upstream's NarHash.
func printRebuild(w io.Writer, r adminapi.Rebuild) {
	what := "matches upstream"
	if !r.Matches {
		what = "rebuilt " + r.NarHash
	}
	fmt.Fprintf(w, "  rebuild:    %s, attested %s, %s", r.Key, r.Imported.Format(time.RFC3339), what)
	if r.Classification != "" {
		fmt.Fprintf(w, ", classified %s", r.Classification)
	}
	fmt.Fprintln(w)
}

// classMeaning says what a classification means for the operator.
func classMeaning(c string) string {
	switch c {
	case "stable":
		return "the rebuild is reproducible and the upstream serves something else: investigate"
	case "not_reproducible":
		return "the rebuilder's own builds differ; consider a reviewed allowlist entry"
	}
	return "unknown"
}

// rebuildable reports whether a rebuild and its attestation could approve a
// path rejected for reason, as the rebuild queue takes them: denied,
// malformed or quarantined paths cannot be fixed by rebuilding them, and
// an attestation_mismatch is a rebuild already done that disagreed with
// the upstream (the alarm: another rebuild does not answer it).
func rebuildable(reason string) bool {
	switch reason {
	case "unattested", "closure_incomplete":
		return true
	}
	return false
}

// answerLine renders what one kind of request would get, as an operator
// would see it with curl -i.
func answerLine(a adminapi.Answer) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d", a.Status)
	if a.File != "" {
		fmt.Fprintf(&b, " nar/%s", a.File)
		if a.Cached {
			b.WriteString(" (cached)")
		}
	}
	if a.Decision != "" {
		fmt.Fprintf(&b, ", X-Cacheproxy-Decision: %s", a.Decision)
	}
	if a.Note != "" && a.Status != http.StatusNotFound {
		fmt.Fprintf(&b, " (%s)", a.Note)
	}
	return b.String()
}

func cmdRejections(args []string, io cmdIO) error {
	var asJSON, derivers bool
	c, pos, err := adminCommand("rejections", "rejections [--json] [--derivers]", args, io, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print JSON")
		fs.BoolVar(&derivers, "derivers", false, "print only the .drv paths a rebuild could approve (unattested, closure_incomplete), one per line")
	})
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	var resp adminapi.Rejections
	if err := c.Do(context.Background(), http.MethodGet, adminapi.PathRejections, nil, &resp); err != nil {
		return err
	}
	switch {
	case derivers:
		seen := map[string]bool{}
		var out []string
		for _, r := range resp.Rejections {
			if r.Deriver != "" && !seen[r.Deriver] && rebuildable(r.Reason) {
				seen[r.Deriver] = true
				out = append(out, r.Deriver)
			}
		}
		sort.Strings(out)
		for _, d := range out {
			fmt.Fprintln(io.stdout, d)
		}
		return nil
	case asJSON:
		return printJSON(io.stdout, resp)
	}
	tw := tabwriter.NewWriter(io.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAST\tCOUNT\tREASON\tPATH\tDETAIL")
	for _, r := range resp.Rejections {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", r.Last.Format(time.RFC3339), r.Count, reasonText(r), r.StorePath, r.Detail)
	}
	return tw.Flush()
}

// reasonText is a rejection's reason with its classification, if any:
// "attestation_mismatch (stable)".
func reasonText(r adminapi.Rejection) string {
	if r.Classification == "" {
		return r.Reason
	}
	return r.Reason + " (" + r.Classification + ")"
}

func cmdRetry(args []string, io cmdIO) error {
	var reason string
	c, paths, err := adminCommand("retry", "retry [--reason TEXT] PATH...", args, io, func(fs *flag.FlagSet) {
		fs.StringVar(&reason, "reason", "", "why (kept in the audit trail)")
	})
	if err != nil {
		return err
	}
	if len(paths) == 0 {
		return usageErr("name at least one store path or hash")
	}
	var resp adminapi.Retry
	if err := c.Do(context.Background(), http.MethodPost, adminapi.PathRetry, adminapi.PathsRequest{Paths: paths, Reason: reason}, &resp); err != nil {
		return err
	}
	for _, h := range resp.Lifted {
		fmt.Fprintf(io.stdout, "quarantine lifted: %s\n", h)
	}
	for _, h := range resp.NotQuarantined {
		fmt.Fprintf(io.stdout, "not quarantined: %s\n", h)
	}
	return nil
}

// cmdVerifyCache re-hashes every blob through the running server, or
// directly on the state dir when no server answers.
func cmdVerifyCache(args []string, io cmdIO) error {
	fs := newFlags("verify-cache", "verify-cache [-c FILE] [--state-dir DIR]", io)
	af := adminFlags{configFlags: configFlags{env: io.env}}
	af.register(fs)
	if _, err := parseInterspersed(fs, args); err != nil {
		return err
	}
	var resp adminapi.VerifyCache
	c, err := af.client()
	if err == nil {
		err = c.Do(context.Background(), http.MethodPost, adminapi.PathVerifyCache, nil, &resp)
	}
	if err != nil && (errors.Is(err, adminapi.ErrUnreachable) || errors.Is(err, os.ErrNotExist) || errors.Is(err, errAdminOff)) {
		f, lerr := af.read()
		if lerr != nil {
			return lerr
		}
		resp, err = verifyOffline(f.Config.StateDir, int64(f.Config.Cache.MaxSize))
	}
	if err != nil {
		return err
	}
	for _, f := range resp.Dropped {
		fmt.Fprintf(io.stdout, "dropped %s (%s): %s\n", f.Blob, f.StorePath, f.Error)
	}
	fmt.Fprintf(io.stdout, "checked %d blobs, dropped %d\n", resp.Checked, len(resp.Dropped))
	if len(resp.Dropped) > 0 {
		return fmt.Errorf("%d cached blobs failed verification and were dropped", len(resp.Dropped))
	}
	return nil
}

func verifyOffline(stateDir string, maxSize int64) (adminapi.VerifyCache, error) {
	db, err := cache.OpenDB(filepath.Join(stateDir, "state.db"))
	if err != nil {
		return adminapi.VerifyCache{}, fmt.Errorf("no server answered and the state dir cannot be opened: %w", err)
	}
	defer db.Close()
	blobs, err := cache.OpenBlobs(db, stateDir, maxSize)
	if err != nil {
		return adminapi.VerifyCache{}, err
	}
	defer blobs.Close()
	n, failed, err := blobs.VerifyAll()
	return adminapi.NewVerifyCache(n, failed), err
}

// subcommand splits "allow add ..." into "add" and the rest.
func subcommand(name string, args []string, subs []string, io cmdIO) (string, []string, error) {
	if len(args) > 0 {
		for _, s := range subs {
			if args[0] == s {
				return s, args[1:], nil
			}
		}
		if args[0] == "-h" || args[0] == "--help" {
			fmt.Fprintf(io.stderr, "Usage: cacheproxy %s %s ...\n", name, strings.Join(subs, "|"))
			return "", nil, errHelp
		}
	}
	return "", nil, usageErr("want one of: %s %s", name, strings.Join(subs, ", "+name+" "))
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func orNone(list []string) string {
	if len(list) == 0 {
		return "none"
	}
	return strings.Join(list, ", ")
}

func expiry(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return t.Format(time.RFC3339)
}
