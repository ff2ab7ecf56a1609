package main

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
	"github.com/cacheproxy/cacheproxy/internal/narinfo"
)

// Outcomes of a rebuild whose NarHash is not the upstream's, after the
// second build (`nix-store --realise --check`).
const (
	rebuildDiffers         = "differs"          // same result twice here: the upstream serves something else
	rebuildNotReproducible = "not reproducible" // the two builds here differed
)

// Classifications carried to the gatekeeper (README "Rebuild reports").
const (
	classStable          = "stable"
	classNotReproducible = "not_reproducible"
)

// nixNondeterministic is what Nix 2.8 says when --check built something
// other than the valid output.
const nixNondeterministic = "may not be deterministic"

// buildResult is one build's NAR hash and size, as a rebuild report keeps it.
type buildResult struct {
	NarHash string `json:"narHash"`
	NarSize uint64 `json:"narSize"`
}

// rebuildReport is the "cacheproxy" object of a posted path-info entry.
type rebuildReport struct {
	Classification  string        `json:"classification"`
	UpstreamNarHash string        `json:"upstreamNarHash"`
	Builds          []buildResult `json:"builds"`
}

// pathInfo is what the rebuilder reads of one `nix path-info --json` entry;
// the entry itself is posted as Nix wrote it, plus the report.
type pathInfo struct {
	Path    string `json:"path"`
	NarHash string `json:"narHash"`
	NarSize uint64 `json:"narSize"`
}

// upstreamNarHash asks the gatekeeper (explain) which NarHash the upstream
// serves for path, normalised; "" when it knows none (nothing to compare).
func (r *rebuilder) upstreamNarHash(ctx context.Context, path string) (string, error) {
	var ex adminapi.Explain
	if err := r.client.Do(ctx, http.MethodGet, adminapi.PathExplain+filepath.Base(path), nil, &ex); err != nil {
		return "", fmt.Errorf("explain %s: %w", path, err)
	}
	h := ""
	if ex.Decision != nil && ex.Decision.Fingerprint != "" {
		// 1;PATH;NARHASH;NARSIZE;REFS
		if f := strings.Split(ex.Decision.Fingerprint, ";"); len(f) >= 3 {
			h = f[2]
		}
	} else if ex.Stored != nil {
		h = ex.Stored.NarHash
	}
	if h == "" {
		return "", nil
	}
	n, err := narinfo.NormalizeHash(h)
	if err != nil {
		return "", fmt.Errorf("explain %s: upstream NarHash %q: %w", path, h, err)
	}
	return n, nil
}

// classification is what classify found out about a derivation's outputs.
type classification struct {
	reports  map[string]*rebuildReport // outputs whose NarHash is not the upstream's
	unstable map[string]bool           // outputs of a derivation two builds here disagreed on
	diffs    map[string]string         // output -> the directory keeping its two NARs (--keep-diffs)
}

// classify compares what was built with what the upstream serves and, when
// any output differs (or always, with --check), builds drv once more with
// --check, unless checked: the first build was a --check already, so two
// builds here agreed.
func (r *rebuilder) classify(ctx context.Context, drv string, infos []pathInfo, checked bool) (classification, error) {
	c := classification{reports: map[string]*rebuildReport{}, unstable: map[string]bool{}, diffs: map[string]string{}}
	for _, pi := range infos {
		up, err := r.upstreamNarHash(ctx, pi.Path)
		if err != nil {
			return c, err
		}
		mine, err := narinfo.NormalizeHash(pi.NarHash)
		if err != nil {
			return c, fmt.Errorf("nix path-info %s: narHash %q: %w", pi.Path, pi.NarHash, err)
		}
		if up == "" || up == mine {
			continue
		}
		first := buildResult{NarHash: mine, NarSize: pi.NarSize}
		c.reports[pi.Path] = &rebuildReport{UpstreamNarHash: up, Builds: []buildResult{first}}
	}
	stable := func() {
		for _, rep := range c.reports {
			rep.Classification = classStable
			rep.Builds = append(rep.Builds, rep.Builds[0])
		}
	}
	if checked {
		stable()
		return c, nil
	}
	if len(c.reports) == 0 && !r.check {
		return c, nil
	}
	// --keep-failed keeps a differing output at OUT.check, so that the
	// report can say what the second build made.
	outputs := make([]string, len(infos))
	for i, pi := range infos {
		outputs[i] = pi.Path
	}
	_, err := r.nix.run(ctx, "nix-store", "--realise", "--check", "--keep-failed", drv)
	defer r.cleanup(drv, err, outputs)
	switch {
	case err == nil:
		stable()
	case strings.Contains(err.Error(), nixNondeterministic):
		// The derivation is not reproducible as a whole: Nix stops
		// comparing at the first output that differs, so an output
		// without OUT.check may just not have been compared.
		for _, pi := range infos {
			out := pi.Path
			c.unstable[out] = true
			rep := c.reports[out]
			if rep != nil {
				rep.Classification = classNotReproducible
			}
			second, dir, err := r.keepPair(ctx, out, "1-first-build.nar")
			if errors.Is(err, os.ErrNotExist) {
				if rep != nil {
					rep.Builds = append(rep.Builds, rep.Builds[0])
				}
				continue
			} else if err != nil {
				return c, err
			}
			if dir != "" {
				c.diffs[out] = dir
			}
			if rep != nil {
				rep.Builds = append(rep.Builds, second)
			}
		}
	default:
		return c, fmt.Errorf("second build: %w", err)
	}
	return c, nil
}

// keepPair reads the NAR of OUT.check, the second build Nix kept of out,
// and with --keep-diffs keeps both NARs under DIR/<hash>-<name>/: out as
// first (what the store holds) and OUT.check as 2-check-build.nar. It
// returns the second build's hash and size and the directory (if kept);
// os.ErrNotExist when there is no OUT.check (that output did not differ).
func (r *rebuilder) keepPair(ctx context.Context, out, first string) (buildResult, string, error) {
	check := out + ".check"
	if _, err := os.Lstat(check); err != nil {
		return buildResult{}, "", err
	}
	if r.keepDiffs == "" {
		second, err := r.narOf(ctx, check, "")
		return second, "", err
	}
	dir := filepath.Join(r.keepDiffs, filepath.Base(out))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return buildResult{}, "", fmt.Errorf("--keep-diffs: %w", err)
	}
	if _, err := r.narOf(ctx, out, filepath.Join(dir, first)); err != nil {
		return buildResult{}, "", err
	}
	second, err := r.narOf(ctx, check, filepath.Join(dir, "2-check-build.nar"))
	if err != nil {
		return buildResult{}, "", err
	}
	return second, dir, nil
}

// cleanup removes what `nix-store --check --keep-failed` left behind: each
// output's OUT.check copy (outside Nix's database: only a garbage
// collection would remove it), and the build directories Nix says it kept (--keep-diffs keeps
// the NARs, which is what diffoscope compares). Only directories named as
// Nix names this derivation's (nix-build-<name>.drv-N) are removed: the
// message comes on stderr after the builder's own output.
func (r *rebuilder) cleanup(drv string, err error, outputs []string) {
	removeAll := r.removeAll
	if removeAll == nil {
		removeAll = os.RemoveAll
	}
	for _, o := range outputs {
		check := o + ".check"
		if _, statErr := os.Lstat(check); statErr != nil {
			continue
		}
		// A read-only store (NixOS, a hardened service) or one owned by
		// the Nix daemon: the daemon deletes it, as a path outside its
		// database (Nix 2.8 to 2.2x: `nix-store --delete` takes it).
		// Not the pass's context: leftovers go on an interrupt too.
		if rmErr := removeAll(check); rmErr != nil {
			if _, delErr := r.nix.run(context.Background(), "nix-store", "--delete", check); delErr != nil {
				fmt.Fprintf(r.log, "%s: remove the second build: %v; %v\n", o, rmErr, delErr)
			}
		}
	}
	prefix := "nix-build-" + storeName(drv) + "-"
	for _, d := range keptBuildDirs(err) {
		base := filepath.Base(d)
		n := strings.TrimPrefix(base, prefix)
		if !filepath.IsAbs(d) || filepath.Clean(d) != d || n == base || n == "" || strings.Trim(n, "0123456789") != "" {
			fmt.Fprintf(r.log, "%s: not removing %q: not a build directory of this derivation\n", drv, d)
			continue
		}
		if st, err := os.Lstat(d); err != nil || !st.IsDir() {
			continue
		}
		if rmErr := removeAll(d); rmErr != nil {
			fmt.Fprintf(r.log, "%s: remove the kept build directory: %v\n", drv, rmErr)
		}
	}
}

// storeName is a store path's name: /nix/store/<hash>-<name> -> <name>.
func storeName(p string) string {
	base := filepath.Base(p)
	if _, name, ok := strings.Cut(base, "-"); ok {
		return name
	}
	return base
}

// narOf serialises path as a NAR (nix-store --dump) and returns its hash
// and size, streaming: a NAR can be large. A non-empty keep also writes it
// to that file (whole, or not at all).
func (r *rebuilder) narOf(ctx context.Context, path, keep string) (buildResult, error) {
	if _, err := os.Lstat(path); err != nil {
		return buildResult{}, err
	}
	h := sha256.New()
	cw := &countWriter{w: h}
	var w io.Writer = cw
	var file *os.File
	if keep != "" {
		var err error
		if file, err = os.CreateTemp(filepath.Dir(keep), ".nar-*"); err != nil {
			return buildResult{}, fmt.Errorf("--keep-diffs: %w", err)
		}
		defer os.Remove(file.Name()) // after the rename, a no-op
		defer file.Close()
		w = io.MultiWriter(cw, file)
	}
	if err := r.nix.dump(ctx, path, w); err != nil {
		return buildResult{}, err
	}
	if file != nil {
		if err := file.Close(); err != nil {
			return buildResult{}, fmt.Errorf("--keep-diffs: %w", err)
		}
		if err := os.Rename(file.Name(), keep); err != nil {
			return buildResult{}, fmt.Errorf("--keep-diffs: %w", err)
		}
	}
	return buildResult{NarHash: narinfo.FormatHash("sha256", h.Sum(nil)), NarSize: uint64(cw.n)}, nil
}

// countWriter counts what passes through it.
type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// withReports adds each report to its path's entry of `nix path-info
// --json` output, keeps only the entries of the paths in post, and returns
// the JSON to post.
func withReports(infosJSON string, reports map[string]*rebuildReport, post []string) (string, error) {
	var entries []map[string]json.RawMessage
	if err := json.Unmarshal([]byte(infosJSON), &entries); err != nil {
		return "", fmt.Errorf("nix path-info --json: %w", err)
	}
	keep := map[string]bool{}
	for _, p := range post {
		keep[p] = true
	}
	kept := entries[:0]
	for _, e := range entries {
		var p string
		if err := json.Unmarshal(e["path"], &p); err != nil {
			return "", fmt.Errorf("nix path-info --json: entry without a path: %w", err)
		}
		if !keep[p] {
			continue
		}
		if rep, ok := reports[p]; ok {
			raw, err := json.Marshal(rep)
			if err != nil {
				return "", err
			}
			e["cacheproxy"] = raw
		}
		kept = append(kept, e)
	}
	out, err := json.Marshal(kept)
	return string(out), err
}
