package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"

	"github.com/cacheproxy/cacheproxy/internal/adminapi"
)

// Per-path outcomes of a rebuild, as printed (STATUS<TAB>PATH).
const (
	rebuildAttested     = "attested"
	rebuildNotHere      = "not instantiable here"
	rebuildBuildFailed  = "build failed"
	rebuildAttestFailed = "attestation refused"
	// rebuildDiffers and rebuildNotReproducible: see rebuildcheck.go.
)

// rebuildReason is the audit trail's reason for the imports this command makes.
const rebuildReason = "cacheproxy rebuild"

// cmdRebuild takes the gatekeeper's rebuild queue, builds each deriver that
// is valid in the local store, signs what it built with the rebuilder key
// and posts the attestations. Which substituters the build may use is the
// local nix.conf's business: the operator makes the gatekeeper the only one,
// so every input is itself verified or rebuilt here first.
func cmdRebuild(args []string, cio cmdIO) error {
	var once bool
	var keyFile string
	c, pos, err := adminCommand("rebuild", "rebuild --once --key-file REBUILDER.sec [--server URL --token-file FILE | -c FILE]", args, cio,
		func(fs *flag.FlagSet) {
			fs.BoolVar(&once, "once", false, "drain the queue once and exit (the only mode so far)")
			fs.StringVar(&keyFile, "key-file", "", "the rebuilder's Nix signing key `FILE` (nix-store --generate-binary-cache-key)")
		})
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usageErr("unexpected argument %q", pos[0])
	}
	if !once {
		return usageErr("only --once is implemented: pass --once")
	}
	if keyFile == "" {
		return usageErr("--key-file is required")
	}
	keyName, err := secretKeyName(keyFile)
	if err != nil {
		return err
	}
	r := rebuilder{client: c, keyFile: keyFile, keyName: keyName, nix: execNix{}, out: cio.stdout, log: cio.stderr}
	return r.once(context.Background())
}

// secretKeyName reads the key name ("name:base64") from a Nix secret key
// file, to ask the queue for what this key has not attested yet.
func secretKeyName(file string) (string, error) {
	raw, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("--key-file: %w", err)
	}
	name, secret, ok := strings.Cut(strings.TrimSpace(string(raw)), ":")
	if !ok || name == "" || secret == "" {
		return "", fmt.Errorf("--key-file %s: not a Nix secret key (want NAME:BASE64)", file)
	}
	return name, nil
}

// execNix runs a Nix tool and returns its standard output; the last line
// of its stderr (where Nix says what went wrong) goes into the error.
type execNix struct{}

func (e execNix) run(ctx context.Context, tool string, args ...string) (string, error) {
	if tool == "nix" {
		args = append([]string{"--extra-experimental-features", "nix-command"}, args...)
	}
	cmd := exec.CommandContext(ctx, tool, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if i := strings.LastIndexByte(msg, '\n'); i >= 0 {
			msg = msg[i+1:] // the last line says what went wrong
		}
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", tool, strings.Join(args, " "), err, msg)
	}
	return stdout.String(), nil
}

type rebuilder struct {
	client  *adminapi.Client
	keyFile string
	keyName string
	nix     execNix
	out     io.Writer // one STATUS<TAB>PATH line per queued path
	log     io.Writer // why a path was not attested
}

// once drains the queue as it is now: one pass, one line per queued path.
func (r rebuilder) once(ctx context.Context) error {
	q, err := r.client.GetRebuildQueue(ctx, r.keyName)
	if err != nil {
		return fmt.Errorf("read the rebuild queue: %w", err)
	}
	failed := 0
	// Several queued paths may be outputs of one derivation: build it once.
	done := map[string]map[string]string{} // deriver -> path -> status
	for _, e := range q.Paths {
		if e.Deriver == "" {
			failed += r.report(rebuildNotHere, e.StorePath, "the gatekeeper knows no deriver for it")
			continue
		}
		st, ok := done[e.Deriver]
		if !ok {
			st = r.rebuild(ctx, e.Deriver)
			done[e.Deriver] = st
		}
		status, ok := st[e.StorePath]
		if !ok {
			status = st[""] // the derivation's own outcome, when it failed as a whole
			if status == "" {
				status = rebuildBuildFailed
				st[e.StorePath] = status
				fmt.Fprintf(r.log, "%s did not build %s\n", e.Deriver, e.StorePath)
			}
		}
		failed += r.report(status, e.StorePath, "")
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d queued paths were not attested", failed, len(q.Paths))
	}
	return nil
}

// report prints one STATUS<TAB>PATH line and returns 1 if it is a failure.
func (r rebuilder) report(status, path, why string) int {
	fmt.Fprintf(r.out, "%s\t%s\n", status, path)
	if why != "" {
		fmt.Fprintf(r.log, "%s: %s\n", path, why)
	}
	if status == rebuildAttested {
		return 0
	}
	return 1
}

// rebuild builds one derivation, signs its outputs and posts the
// attestations. It returns each output's status; key "" holds the outcome
// of a derivation that failed as a whole.
func (r rebuilder) rebuild(ctx context.Context, drv string) map[string]string {
	whole := func(status string, err error) map[string]string {
		fmt.Fprintf(r.log, "%s: %v\n", drv, err)
		return map[string]string{"": status}
	}
	if _, err := r.nix.run(ctx, "nix-store", "--check-validity", drv); err != nil {
		return whole(rebuildNotHere, err)
	}
	// Outputs already valid here may come from anywhere (a substituter, an
	// older build): build again and compare (--check) rather than sign
	// them as they are.
	realise := []string{"--realise", drv}
	checked := r.outputsValid(ctx, drv)
	if checked {
		realise = []string{"--realise", "--check", drv}
	}
	out, err := r.nix.run(ctx, "nix-store", realise...)
	if err != nil {
		if checked && strings.Contains(err.Error(), nixNondeterministic) {
			return whole(rebuildNotReproducible, fmt.Errorf("the output already in the local store is not what a build here makes: %w", err))
		}
		return whole(rebuildBuildFailed, err)
	}
	outputs := strings.Fields(out)
	if len(outputs) == 0 {
		return whole(rebuildBuildFailed, errors.New("nix-store --realise named no outputs"))
	}
	if _, err := r.nix.run(ctx, "nix", append([]string{"store", "sign", "--key-file", r.keyFile}, outputs...)...); err != nil {
		return whole(rebuildAttestFailed, err)
	}
	infos, err := r.nix.run(ctx, "nix", append([]string{"path-info", "--json", "--sigs"}, outputs...)...)
	if err != nil {
		return whole(rebuildAttestFailed, err)
	}
	var parsed []pathInfo
	if err := json.Unmarshal([]byte(infos), &parsed); err != nil {
		return whole(rebuildAttestFailed, fmt.Errorf("nix path-info --json: %w", err))
	}
	// A rebuild that is not what the upstream serves is built once more,
	// and the report says which kind of difference it is.
	reports, err := r.classify(ctx, drv, parsed, checked)
	if err != nil {
		return whole(rebuildBuildFailed, err)
	}
	if infos, err = withReports(infos, reports); err != nil {
		return whole(rebuildAttestFailed, err)
	}
	st := map[string]string{}
	for _, o := range outputs {
		st[o] = rebuildAttestFailed // until the gatekeeper says it stored our signature
	}
	_, err = r.client.ImportAttestations(ctx, strings.NewReader(infos), rebuildReason, func(res adminapi.AttestResult) {
		if _, ours := st[res.Path]; !ours {
			return
		}
		if res.Status == adminapi.AttestStored || res.Status == adminapi.AttestKnown {
			st[res.Path] = rebuildAttested
			if rep := reports[res.Path]; rep != nil {
				st[res.Path] = rebuildDiffers
				if rep.Classification == classNotReproducible {
					st[res.Path] = rebuildNotReproducible
				}
				fmt.Fprintf(r.log, "%s: built %s, the upstream serves %s (%s)\n", res.Path, rep.Builds[0].NarHash, rep.UpstreamNarHash, rep.Classification)
			}
		} else {
			fmt.Fprintf(r.log, "%s: the gatekeeper answered %s (keys: %s)\n", res.Path, res.Status, res.Key)
		}
	})
	if err != nil {
		return whole(rebuildAttestFailed, fmt.Errorf("post the attestations: %w", err))
	}
	return st
}

// outputsValid says whether every output of drv is valid in the local store
// already (so that --realise alone would build nothing).
func (r rebuilder) outputsValid(ctx context.Context, drv string) bool {
	outs, err := r.nix.run(ctx, "nix-store", "--query", "--outputs", drv)
	if err != nil || len(strings.Fields(outs)) == 0 {
		return false
	}
	_, err = r.nix.run(ctx, "nix-store", append([]string{"--check-validity"}, strings.Fields(outs)...)...)
	return err == nil
}
