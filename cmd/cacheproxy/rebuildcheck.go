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
	"os/exec"
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
func (r rebuilder) upstreamNarHash(ctx context.Context, path string) (string, error) {
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

// classify compares what was built with what the upstream serves and, when
// any output differs, builds drv once more with --check (unless checked:
// the first build was a --check already, so two builds here agreed). It
// returns the rebuild report of each differing output (none when all match).
func (r rebuilder) classify(ctx context.Context, drv string, infos []pathInfo, checked bool) (map[string]*rebuildReport, error) {
	reports := map[string]*rebuildReport{}
	for _, pi := range infos {
		up, err := r.upstreamNarHash(ctx, pi.Path)
		if err != nil {
			return nil, err
		}
		mine, err := narinfo.NormalizeHash(pi.NarHash)
		if err != nil {
			return nil, fmt.Errorf("nix path-info %s: narHash %q: %w", pi.Path, pi.NarHash, err)
		}
		if up == "" || up == mine {
			continue
		}
		first := buildResult{NarHash: mine, NarSize: pi.NarSize}
		reports[pi.Path] = &rebuildReport{UpstreamNarHash: up, Builds: []buildResult{first}}
	}
	if len(reports) == 0 {
		return reports, nil
	}
	if checked {
		for _, rep := range reports {
			rep.Classification = classStable
			rep.Builds = append(rep.Builds, rep.Builds[0])
		}
		return reports, nil
	}
	// --keep-failed keeps a differing output at OUT.check, so that the
	// report can say what the second build made.
	_, err := r.nix.run(ctx, "nix-store", "--realise", "--check", "--keep-failed", drv)
	switch {
	case err == nil:
		for _, rep := range reports {
			rep.Classification = classStable
			rep.Builds = append(rep.Builds, rep.Builds[0])
		}
	case strings.Contains(err.Error(), nixNondeterministic):
		for out, rep := range reports {
			rep.Classification = classNotReproducible
			second, err := narOf(ctx, out+".check")
			if errors.Is(err, os.ErrNotExist) {
				second = rep.Builds[0] // this output came out the same; another one differed
			} else if err != nil {
				return nil, err
			}
			// Nix keeps OUT.check outside its database: nobody else removes it.
			_ = os.RemoveAll(out + ".check")
			rep.Builds = append(rep.Builds, second)
		}
	default:
		return nil, fmt.Errorf("second build: %w", err)
	}
	return reports, nil
}

// narOf serialises path as a NAR (nix-store --dump) and returns its hash
// and size, streaming: a NAR can be large.
func narOf(ctx context.Context, path string) (buildResult, error) {
	if _, err := os.Lstat(path); err != nil {
		return buildResult{}, err
	}
	cmd := exec.CommandContext(ctx, "nix-store", "--dump", path)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return buildResult{}, fmt.Errorf("nix-store --dump %s: %w", path, err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return buildResult{}, fmt.Errorf("nix-store --dump %s: %w", path, err)
	}
	h := sha256.New()
	n, copyErr := io.Copy(h, stdout)
	if err := cmd.Wait(); err != nil {
		return buildResult{}, fmt.Errorf("nix-store --dump %s: %w: %s", path, err, strings.TrimSpace(stderr.String()))
	}
	if copyErr != nil {
		return buildResult{}, fmt.Errorf("nix-store --dump %s: %w", path, copyErr)
	}
	return buildResult{NarHash: narinfo.FormatHash("sha256", h.Sum(nil)), NarSize: uint64(n)}, nil
}

// withReports adds each report to its path's entry of `nix path-info
// --json` output and returns the JSON to post.
func withReports(infosJSON string, reports map[string]*rebuildReport) (string, error) {
	if len(reports) == 0 {
		return infosJSON, nil
	}
	var entries []map[string]json.RawMessage
	if err := json.Unmarshal([]byte(infosJSON), &entries); err != nil {
		return "", fmt.Errorf("nix path-info --json: %w", err)
	}
	for _, e := range entries {
		var p string
		if err := json.Unmarshal(e["path"], &p); err != nil {
			return "", fmt.Errorf("nix path-info --json: entry without a path: %w", err)
		}
		if rep, ok := reports[p]; ok {
			raw, err := json.Marshal(rep)
			if err != nil {
				return "", err
			}
			e["cacheproxy"] = raw
		}
	}
	out, err := json.Marshal(entries)
	return string(out), err
}
